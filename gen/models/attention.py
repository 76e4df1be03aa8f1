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
            return q.new_empty(q.shape)  # FA4 writes a fresh contiguous (B, L, H, D) output

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
    """Choose once at start-up: on accelerators the first of PREFERENCE that runs and agrees; plain SDPA on CPU.
    Where FlashAttention-4 is installed and agrees too, the two are raced per attention shape (`ByShape`): on an
    H200 FA4 is 3-6% slower than cuDNN at FLUX.1's 4608 tokens and 10-13% faster at Qwen-Image 1328^2 and Wan's
    32760 (docs/BENCHMARKS.md), so one choice for every shape would lose somewhere."""
    if name != "auto":
        if name not in BACKENDS:
            raise ValueError(f"unknown attention backend {name!r}; known: {sorted(BACKENDS)}")
        set_attention_backend(name)
        return name
    chosen, backend = "sdpa", sdpa_attention
    if device.type != "cpu":
        chosen = next((n for n in PREFERENCE if backend_agrees(n, device, dtype)), "sdpa")
        backend = BACKENDS[chosen]
        if backend_agrees("fa4", device, dtype):  # installed and exact: raced per shape, kept where it is faster
            backend = ByShape((chosen, "fa4"))
            chosen = backend.name
    set_attention_backend(backend)
    log.info("attention backend: %s", chosen)
    return chosen


# (candidates, q shape, k shape, v shape, dtype, device) -> the candidate that was fastest there
_SHAPE_CHOICE: dict[tuple, str] = {}


class ByShape:
    """Attention through whichever of `names` (exact backends, all agreeing with the math reference) was fastest at
    this call's shape, timed once per shape on that first call's own tensors (attention has no side effects, so
    running it a few more times is harmless); later calls at the shape go straight to the winner. Masked calls go
    to the first name (FA4 takes no key mask). Under torch.compile the race and the call are one opaque op, so the
    graph is traced once and the choice is made with real tensors at run time."""

    def __init__(self, names: tuple[str, ...]):
        unknown = [n for n in names if n not in BACKENDS]
        if len(names) < 2 or unknown:
            raise ValueError(f"ByShape needs two or more known backends; got {names!r}")
        self.names = tuple(names)
        self.name = "|".join(self.names) + " by shape"

    def __call__(self, q, k, v, mask=None) -> torch.Tensor:
        if mask is not None:
            return BACKENDS[self.names[0]](q, k, v, mask)
        return _by_shape_op(q, k, v, ",".join(self.names))

    def choices(self) -> dict[tuple, str]:
        """(q shape, k shape, v shape) -> chosen backend, for the shapes seen so far."""
        return {key[1:4]: name for key, name in _SHAPE_CHOICE.items() if key[0] == self.names}


def fastest_for_shape(names: tuple[str, ...], q, k, v, iters: int = 3) -> str:
    """The backend of `names` to use at q/k/v's shape: cached, else timed now (median of `iters` after one warm-up
    call, which also compiles a JIT kernel); the first name on a tie, and without timing while a CUDA graph is
    being captured (synchronizing there is not allowed). A candidate other than the first that refuses the shape
    (FA4 asserts on head dims it has no kernel for, e.g. 12) is left out there."""
    import statistics
    import time

    key = (names, tuple(q.shape), tuple(k.shape), tuple(v.shape), q.dtype, q.device)
    name = _SHAPE_CHOICE.get(key)
    if name is not None:
        return name
    if q.is_cuda and torch.cuda.is_current_stream_capturing():
        return names[0]
    times = {}
    for n in names:
        fn = BACKENDS[n]
        if n != names[0]:  # the first is the installed backend, which must run; a challenger may not at this shape
            try:
                fn(q, k, v, None)
            except (AssertionError, RuntimeError, ValueError, NotImplementedError) as e:  # FA4 asserts on head dims
                log.info("attention at q %s: %s does not run at this shape (%s)", tuple(q.shape), n,
                         str(e).splitlines()[0] if str(e) else type(e).__name__)
                continue
        else:
            fn(q, k, v, None)
        samples = []
        for _ in range(iters):
            _synchronize(q.device)
            start = time.perf_counter()
            fn(q, k, v, None)
            _synchronize(q.device)
            samples.append(time.perf_counter() - start)
        times[n] = statistics.median(samples)
    name = min(times, key=lambda n: (times[n], names.index(n)))
    _SHAPE_CHOICE[key] = name
    log.info("attention at q %s k %s: %s (%s)", tuple(q.shape), tuple(k.shape), name,
             ", ".join(f"{n} {t * 1e3:.3f} ms" for n, t in times.items()))
    return name


@torch.library.custom_op("gen::attention_by_shape", mutates_args=())
def _by_shape_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, names: str) -> torch.Tensor:
    """ByShape's race and call as one torch custom op (`names`: the candidates, comma-separated)."""
    return BACKENDS[fastest_for_shape(tuple(names.split(",")), q, k, v)](q, k, v, None).contiguous()


@_by_shape_op.register_fake
def _(q, k, v, names):
    return q.new_empty((*q.shape[:-1], v.shape[-1]))


def _synchronize(device: torch.device) -> None:
    if device.type != "cpu":
        torch.accelerator.synchronize(device)
