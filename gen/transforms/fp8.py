"""FP8 linears for the DiT blocks: a lossy speed-up, off by default.

`Fp8Linear` holds its weight in float8_e4m3fn with one fp32 scale per output channel; each call scales every
activation row by its own absmax (dynamic, per token) and multiplies on the FP8 tensor cores through
`torch._scaled_mm` with row-wise scales (Hopper), the bias added after. `quantize_transformer(model, blocks)` swaps
the nn.Linear layers inside the repeated blocks (the family's `DiT.blocks`) from outside the model files; embedders and the final projection stay
exact. Module names and state_dict keys do not change: a state_dict is written in the original dtype (weights
dequantized) and loading a full-precision one quantizes it. Quantize last: a later `.to(dtype)` would cast the
FP8 weights like any floating-point parameter.
"""
from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn

from gen.device import is_cuda
from gen.types import GenError

log = logging.getLogger(__name__)

FP8 = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8).max  # 448
MIN_CAPABILITY = (8, 9)  # FP8 tensor cores: Ada (sm89) and Hopper (sm90) on


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x (M, K) -> (float8 (M, K), fp32 scales (M, 1)) with x ~= q * scale; each row's absmax maps to 448."""
    xf = x.float()
    scale = xf.abs().amax(dim=-1, keepdim=True).clamp_min(1e-12) / FP8_MAX
    return (xf / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8), scale


def dequantize(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """float8 (M, K) and scales (M, 1) -> fp32 (M, K)."""
    return q.float() * scale


def fp8_linear_reference(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
                         bias: torch.Tensor | None) -> torch.Tensor:
    """What Fp8Linear computes, emulated: activations through the FP8 round trip, then an fp32 matmul."""
    xq, xs = quantize_rows(x.reshape(-1, x.shape[-1]))
    out = F.linear(dequantize(xq, xs), dequantize(weight, weight_scale[:, None]))
    if bias is not None:
        out = out + bias.float()
    return out.reshape(*x.shape[:-1], -1).to(x.dtype)


class Fp8Linear(nn.Module):
    """nn.Linear with an FP8 weight (per-output-channel scales) and dynamic per-row FP8 activations."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, dtype: torch.dtype = torch.bfloat16,
                 device: torch.device | None = None):
        super().__init__()
        for name, n in (("in_features", in_features), ("out_features", out_features)):
            if n % 16:
                raise ValueError(f"Fp8Linear needs {name} divisible by 16 (torch._scaled_mm), got {n}")
        self.in_features, self.out_features = in_features, out_features
        self.orig_dtype = dtype  # of the full-precision weight: the bias and the state_dict's weight
        self.weight = nn.Parameter(torch.zeros(out_features, in_features, dtype=FP8, device=device),
                                   requires_grad=False)
        self.register_buffer("weight_scale", torch.ones(out_features, dtype=torch.float32, device=device),
                             persistent=False)
        bias_param = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device), requires_grad=False)
        self.register_parameter("bias", bias_param if bias else None)

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> "Fp8Linear":
        w = linear.weight.detach()
        new = cls(linear.in_features, linear.out_features, linear.bias is not None, w.dtype, w.device)
        new.set_weight(w)
        if linear.bias is not None:
            new.bias.data.copy_(linear.bias.detach())
        return new

    @torch.no_grad()
    def set_weight(self, weight: torch.Tensor) -> None:
        """Quantize a full-precision (out, in) weight into this layer."""
        q, scale = quantize_rows(weight.to(self.weight.device))
        self.weight.data.copy_(q)
        self.weight_scale.copy_(scale[:, 0])

    def dequantized_weight(self) -> torch.Tensor:
        return dequantize(self.weight, self.weight_scale[:, None]).to(self.orig_dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xq, xs = quantize_rows(x.reshape(-1, self.in_features))
        out = torch._scaled_mm(xq, self.weight.t(), scale_a=xs, scale_b=self.weight_scale[None],
                               out_dtype=x.dtype)  # (M, N); weight.t() is the column-major operand it wants
        if self.bias is not None:
            out = out + self.bias.to(out.dtype)
        return out.reshape(*x.shape[:-1], self.out_features)

    # ---- state_dict in the original layout: weight dequantized to `dtype`; a full-precision weight loads

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        destination[prefix + "weight"] = self.dequantized_weight()
        if self.bias is not None:
            destination[prefix + "bias"] = self.bias if keep_vars else self.bias.detach()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        key = prefix + "weight"
        weight = state_dict.get(key)
        rest = {k: v for k, v in state_dict.items() if k != key}
        super()._load_from_state_dict(rest, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)  # the bias; reports the weight as missing
        if weight is None:
            return
        missing_keys.remove(key)
        if weight.shape != self.weight.shape:
            error_msgs.append(f"size mismatch for {key}: copying a param with shape {tuple(weight.shape)}, "
                              f"the Fp8Linear weight has {tuple(self.weight.shape)}")
        else:
            self.set_weight(weight)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


def _swap(block: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(block.get_submodule(parent_name) if parent_name else block, child, new)


def quantize_transformer(model: nn.Module, block_lists: tuple[str, ...]) -> dict:
    """Swap the nn.Linear layers inside the model's repeated blocks (`block_lists`) for Fp8Linear, in place.

    Layers whose sizes are not multiples of 16 stay exact. Returns {"fp8_linears": n, "kept_exact": m}.
    """
    swapped, kept = 0, 0
    for attr in block_lists:
        for block in getattr(model, attr):
            for name, module in list(block.named_modules()):
                if type(module) is not nn.Linear:
                    continue
                if module.in_features % 16 or module.out_features % 16:
                    kept += 1
                    continue
                _swap(block, name, Fp8Linear.from_linear(module))
                swapped += 1
    log.info("fp8: %d linears swapped, %d kept exact (sizes not multiples of 16)", swapped, kept)
    return {"fp8_linears": swapped, "kept_exact": kept}


@torch.no_grad()
def dequantize_transformer(model: nn.Module, block_lists: tuple[str, ...]) -> int:
    """Undo quantize_transformer: each Fp8Linear becomes an nn.Linear again, its weight dequantized (the FP8 rounding
    stays: the original weights are not kept). Returns the count."""
    n = 0
    for attr in block_lists:
        for block in getattr(model, attr):
            for name, module in list(block.named_modules()):
                if isinstance(module, Fp8Linear):
                    w = module.dequantized_weight()
                    linear = nn.Linear(module.in_features, module.out_features, module.bias is not None,
                                       device=w.device, dtype=w.dtype)
                    linear.weight.copy_(w)
                    if module.bias is not None:
                        linear.bias.copy_(module.bias)
                    _swap(block, name, linear)
                    n += 1
    return n


def check_fp8(device: torch.device, dtype: torch.dtype, capability: tuple[int, int] | None = None) -> None:
    """Raise a GenError unless `device` runs FP8 matmuls: a CUDA GPU of compute capability 8.9+ in bf16.

    `capability` defaults to the device's own (asked only for CUDA devices)."""
    if not is_cuda(device):
        raise GenError(f"fp8 needs a CUDA GPU with FP8 tensor cores (compute capability 8.9+, e.g. H100/H200); "
                       f"device {str(device)!r} has none", param="fp8")
    if capability is None:
        capability = torch.cuda.get_device_capability(device)
    if tuple(capability) < MIN_CAPABILITY:
        raise GenError(f"fp8 needs compute capability 8.9+ (Ada, Hopper); device {str(device)!r} is "
                       f"{capability[0]}.{capability[1]}", param="fp8")
    if dtype != torch.bfloat16:
        raise GenError(f"fp8 runs with bf16 activations (row-wise scaled matmuls output bf16); got dtype {dtype}",
                       param="fp8")
