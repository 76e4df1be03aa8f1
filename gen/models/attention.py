"""The one attention entry point every model calls; backends and sequence parallelism plug in here.

Not a module with weights: projections, norms and RoPE live in the model files. The backend is chosen once
(`select_attention_backend`) and every model's attention goes through `attention()`.
"""
from __future__ import annotations

import contextlib
import logging
import threading
from typing import Callable

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

log = logging.getLogger(__name__)

# (q, k, v, mask) -> out; q/k/v are (B, L, H, D); mask is None or bool (B, Lk) with True = attend.
AttentionFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor]


def _sdpa(q, k, v, mask, backends: list[SDPBackend] | None = None) -> torch.Tensor:
    """SDPA on (B, L, H, D) tensors; `backends`: the kernels to use, in priority order (None: PyTorch's choice).
    The list always ends in kernels that run everywhere, so a shape the preferred kernel cannot take (a small or
    odd head dim, say) falls back instead of failing."""
    attn_mask = None if mask is None else mask[:, None, None, :].to(torch.bool)  # (B, 1, 1, Lk)
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H, L, D)
    if backends is None:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
    else:
        with sdpa_kernel(backends, set_priority=True):
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
    return out.transpose(1, 2)


_FALLBACK = [SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


def sdpa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """PyTorch SDPA with PyTorch's own choice of kernel. q, k, v: (B, L, H, D) -> (B, Lq, H, D)."""
    return _sdpa(q, k, v, mask)


def math_attention(q, k, v, mask=None) -> torch.Tensor:
    """The plain softmax(QK^T/sqrt(d))V reference, in the inputs' dtype."""
    return _sdpa(q, k, v, mask, [SDPBackend.MATH])


def cudnn_attention(q, k, v, mask=None) -> torch.Tensor:
    """SDPA preferring cuDNN's fused attention (fastest on Hopper for head dim 128, masks included), then flash
    (not with a mask)."""
    if mask is not None:
        return _sdpa(q, k, v, mask, [SDPBackend.CUDNN_ATTENTION, *_FALLBACK])
    return _sdpa(q, k, v, mask, [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, *_FALLBACK])


def flash_attention(q, k, v, mask=None) -> torch.Tensor:
    """SDPA preferring the FlashAttention-2 kernel (no masks: memory-efficient first for those)."""
    if mask is not None:
        return _sdpa(q, k, v, mask, _FALLBACK)
    return _sdpa(q, k, v, mask, [SDPBackend.FLASH_ATTENTION, *_FALLBACK])


def efficient_attention(q, k, v, mask=None) -> torch.Tensor:
    return _sdpa(q, k, v, mask, _FALLBACK)


_FA4_OP = None


def _fa4_op():
    """FlashAttention-4's forward (the `flash-attn-4` package, CuTe DSL kernels for Hopper and Blackwell) wrapped as a
    torch custom op, so torch.compile treats it as one opaque kernel; RuntimeError when the package is missing."""
    global _FA4_OP
    if _FA4_OP is None:
        try:
            from flash_attn.cute import flash_attn_func
        except ImportError as e:
            raise RuntimeError(f"flash-attn-4 is not installed (pip install '.[fa4]'): {e}") from None

        @torch.library.custom_op("gen::fa4_attention", mutates_args=())
        def fa4_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            out, _ = flash_attn_func(q.contiguous(), k.contiguous(), v.contiguous())
            return out

        @fa4_forward.register_fake
        def _(q, k, v):
            return torch.empty_like(q)

        _FA4_OP = fa4_forward
    return _FA4_OP


def fa4_attention(q, k, v, mask=None) -> torch.Tensor:
    """FlashAttention-4 (optional: `pip install ".[fa4]"`) for unmasked attention on (B, L, H, D); a key mask goes to
    cuDNN's fused attention instead (FA4 takes no key-padding mask)."""
    if mask is not None:
        return cudnn_attention(q, k, v, mask)
    if q.device.type == "cpu":
        raise RuntimeError("flash-attn-4 runs on CUDA devices only")
    return _fa4_op()(q, k, v)


# name -> backend; the order of PREFERENCE lists the fastest first for accelerators.
BACKENDS: dict[str, AttentionFn] = {
    "sdpa": sdpa_attention,
    "math": math_attention,
    "cudnn": cudnn_attention,
    "flash": flash_attention,
    "efficient": efficient_attention,
    "fa4": fa4_attention,
}
PREFERENCE = ("cudnn", "flash", "efficient", "sdpa")

_BACKEND: AttentionFn = sdpa_attention


def set_attention_backend(fn: AttentionFn | str) -> AttentionFn:
    """Install `fn` (or a name from BACKENDS) as the attention used by every model; returns the previous one."""
    global _BACKEND
    if isinstance(fn, str):
        if fn not in BACKENDS:
            raise ValueError(f"unknown attention backend {fn!r}; known: {sorted(BACKENDS)}")
        fn = BACKENDS[fn]
    previous, _BACKEND = _BACKEND, fn
    return previous


def get_attention_backend() -> AttentionFn:
    return _BACKEND


_MASKED = threading.local()  # `fn`: how this thread's masked calls run meanwhile (masked_calls_through)


@contextlib.contextmanager
def masked_calls_through(fn: Callable):
    """In this thread, until the block ends, masked calls go to `fn(q, k, v, mask, backend)` (a merged forward's
    gen.transforms.batch.RealKeysByRow), unless the backend shards the sequence. Other threads are unaffected."""
    previous = getattr(_MASKED, "fn", None)
    _MASKED.fn = fn
    try:
        yield
    finally:
        _MASKED.fn = previous


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Attention over (B, L, H, D) tensors; `mask` (B, Lk) bool marks keys to attend. Returns (B, Lq, H, D)."""
    if mask is not None:
        masked = getattr(_MASKED, "fn", None)
        if masked is not None and not getattr(_BACKEND, "shards_sequence", False):
            return masked(q, k, v, mask, _BACKEND)
    return _BACKEND(q, k, v, mask)


def backend_agrees(name: str, device: torch.device, dtype: torch.dtype, head_dim: int = 128) -> bool:
    """Does backend `name` run here and match the math reference (fp32) on random inputs, with and without a mask?"""
    g = torch.Generator("cpu").manual_seed(0)
    q, k, v = (torch.randn(2, 77, 4, head_dim, generator=g).to(device, dtype) for _ in range(3))
    mask = torch.ones(2, 77, dtype=torch.bool, device=device)
    mask[1, 50:] = False
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    for m in (None, mask):
        try:
            out = BACKENDS[name](q, k, v, m).float()
        except RuntimeError as e:  # the kernel is not available for this device/dtype/shape
            log.info("attention backend %s unavailable: %s", name, str(e).splitlines()[0])
            return False
        ref = math_attention(q.float(), k.float(), v.float(), m)
        if ((out - ref).norm() / ref.norm()).item() > tol:
            log.warning("attention backend %s disagrees with the math reference; not used", name)
            return False
    return True


def select_attention_backend(device: torch.device, dtype: torch.dtype, name: str = "auto") -> str:
    """Choose once at start-up: on accelerators the first of PREFERENCE that runs and agrees; plain SDPA on CPU."""
    if name != "auto":
        if name not in BACKENDS:
            raise ValueError(f"unknown attention backend {name!r}; known: {sorted(BACKENDS)}")
        set_attention_backend(name)
        return name
    chosen = "sdpa"
    if device.type != "cpu":
        chosen = next((n for n in PREFERENCE if backend_agrees(n, device, dtype)), "sdpa")
        if backend_agrees("fa4", device, dtype):  # installed and exact: kept only where it is faster
            chosen = faster_backend(chosen, "fa4", device, dtype)
    set_attention_backend(chosen)
    log.info("attention backend: %s", chosen)
    return chosen


def faster_backend(a: str, b: str, device: torch.device, dtype: torch.dtype, shape=(1, 4608, 24, 128),
                   iters: int = 5) -> str:
    """Of backends `a` and `b`, the one with the lower median time at a DiT-sized `shape` (B, L, H, D) (FLUX.1 at
    1024^2 by default); `a` on a tie."""
    import statistics
    import time

    g = torch.Generator("cpu").manual_seed(0)
    q, k, v = (torch.randn(*shape, generator=g).to(device, dtype) for _ in range(3))
    times = {}
    for name in (a, b):
        fn = BACKENDS[name]
        fn(q, k, v, None)  # warm-up (kernel compilation)
        samples = []
        for _ in range(iters):
            _synchronize(device)
            start = time.perf_counter()
            fn(q, k, v, None)
            _synchronize(device)
            samples.append(time.perf_counter() - start)
        times[name] = statistics.median(samples)
    log.info("attention %s %.3f ms vs %s %.3f ms", a, times[a] * 1e3, b, times[b] * 1e3)
    return b if times[b] < times[a] else a


def _synchronize(device: torch.device) -> None:
    if device.type != "cpu":
        torch.accelerator.synchronize(device)
