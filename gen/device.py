"""Device and dtype resolution, done once at start-up and passed down (no device literals elsewhere)."""
from __future__ import annotations

import torch

from gen.types import GenError

_DTYPES = {
    "fp32": torch.float32, "float32": torch.float32,
    "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
    "fp16": torch.float16, "float16": torch.float16, "half": torch.float16,
}


def is_cuda(device: str | torch.device) -> bool:
    """Is `device` a torch.cuda device (NVIDIA, or ROCm under the same name)? For the features built on torch.cuda
    APIs alone: CUDA graphs, FP8 scaled matmuls. Everything else takes whatever device was resolved."""
    return torch.device(device).type == "cuda"


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """`None` -> the machine's accelerator if there is one, else the CPU."""
    if device is None:
        if torch.accelerator.is_available():
            return torch.accelerator.current_accelerator()
        return torch.device("cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError):
        raise GenError(f"unknown device {device!r} (expected e.g. 'cpu' or an accelerator name)", param="device") from None
    if resolved.type != "cpu":
        accel = torch.accelerator.current_accelerator() if torch.accelerator.is_available() else None
        if accel is None or accel.type != resolved.type:
            raise GenError(f"device {device!r} is not available on this machine", param="device")
    return resolved


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """`None` -> bf16 on accelerators, fp32 on the CPU."""
    if dtype is None:
        return torch.float32 if device.type == "cpu" else torch.bfloat16
    if isinstance(dtype, torch.dtype):
        if dtype not in _DTYPES.values():
            raise GenError(f"unsupported dtype {dtype}", param="dtype")
        return dtype
    key = str(dtype).lower().removeprefix("torch.")
    if key not in _DTYPES:
        raise GenError(f"unknown dtype {dtype!r} (expected one of fp32, bf16, fp16)", param="dtype")
    return _DTYPES[key]
