"""q/k RMSNorm and RoPE in one kernel: each attention's query and key norms and their rotation, written straight into
the joint sequence's buffer.

FLUX.1 and Qwen-Image normalize every head of q and k (RMSNorm over the head dimension) and then rotate the
interleaved channel pairs. Inside a compiled block, inductor fused a block's q and k norms and rotations into one
looped reduction that took 168 us a block at Qwen-Image 1328^2 on an H200, where the same ops alone run in about
30 us a call (docs/BENCHMARKS.md). As a custom op they are kept out of that fusion: a Triton kernel that reads each
head's channels once, keeps them in registers for the statistics, the weight and the rotation, and writes each part
(the text and image streams of a joint attention) at its place in the concatenated output, so the concatenation is
not written apart. End to end on the H200: FLUX.1-dev 1024^2 50 steps 6.71 -> 6.45 s, Qwen-Image 12.68 -> 12.42 s.

The arithmetic is the models' own: statistics in fp32; the normalized value times the weight either in fp32 and then
rounded (torch's nn.RMSNorm, FLUX.1) or rounded first and multiplied in the weight's dtype (diffusers' RMSNorm,
Qwen-Image); the rotation in fp32 on the rounded value, rounded once. Results can differ from the unfused kernels
by a rounding of the last bf16 bit where the compiler contracts a product and a sum differently.

`fuse_norm_rope(model)` marks the norms that the attention classes name in `rope_norms`; gen.models.layers.norm_rope
takes the fused op for their CUDA inputs (other devices, or a head size the kernel does not take, run the plain
ops). Applied with the other exact fusions (TransformOptions.join).
"""
from __future__ import annotations

import importlib.util
from functools import lru_cache

import torch
import torch.nn.functional as F
from torch import nn

_KERNEL = None
LAUNCH = {"block": 16, "num_warps": 8}  # rows of (batch, position, head) per program; benchmarks/norm_rope.py sweeps


def _kernel():
    """The Triton kernel, compiled on first use (Triton is imported only on a CUDA machine)."""
    global _KERNEL
    if _KERNEL is None:
        import triton
        import triton.language as tl

        @triton.jit
        def rms_norm_rope(x_ptr, w_ptr, cos_ptr, sin_ptr, out_ptr, rows, heads, length, sxb, sxl, sxh, sob, sol, soh,
                          scl, ssl, eps, D: tl.constexpr, BLOCK: tl.constexpr, WEIGHT_FP32: tl.constexpr):
            r = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)  # rows of (batch, position, head)
            live = r < rows
            h = r % heads
            bl = r // heads
            pos = bl % length
            b = bl // length
            d = tl.arange(0, D)
            x = tl.load(x_ptr + (b * sxb + pos * sxl + h * sxh)[:, None] + d[None, :], mask=live[:, None],
                        other=0.0).to(tl.float32)
            inv = tl.math.rsqrt(tl.sum(x * x, axis=1) / D + eps)
            w = tl.load(w_ptr + d).to(tl.float32)
            dtype = out_ptr.dtype.element_ty
            if WEIGHT_FP32:
                y = (x * inv[:, None] * w[None, :]).to(dtype)
            else:
                y = ((x * inv[:, None]).to(dtype).to(tl.float32) * w[None, :]).to(dtype)
            ye, yo = tl.split(tl.reshape(y.to(tl.float32), (BLOCK, D // 2, 2)))
            j = tl.arange(0, D // 2)
            c = tl.load(cos_ptr + pos[:, None] * scl + j[None, :], mask=live[:, None], other=0.0)
            s = tl.load(sin_ptr + pos[:, None] * ssl + j[None, :], mask=live[:, None], other=0.0)
            out = tl.reshape(tl.join(ye * c - yo * s, ye * s + yo * c), (BLOCK, D))
            tl.store(out_ptr + (b * sob + pos * sol + h * soh)[:, None] + d[None, :], out.to(dtype),
                     mask=live[:, None])

        _KERNEL = rms_norm_rope
    return _KERNEL


def reference(xs: list[torch.Tensor], weights: list[torch.Tensor], coss: list[torch.Tensor],
              sins: list[torch.Tensor], eps: float, weight_fp32: bool) -> torch.Tensor:
    """The plain ops: each part's RMSNorm and rotation, concatenated along the sequence (B, sum L_i, H, D)."""
    from gen.models.layers import apply_rope, rms_norm_rounded

    outs = []
    for x, w, cos, sin in zip(xs, weights, coss, sins):
        y = F.rms_norm(x, x.shape[-1:], w, eps) if weight_fp32 else rms_norm_rounded(x, w, eps)
        outs.append(apply_rope(y.to(x.dtype), cos[None, :, None], sin[None, :, None]))
    return outs[0] if len(outs) == 1 else torch.cat(outs, dim=1)


@lru_cache(maxsize=1)
def _have_triton() -> bool:
    return importlib.util.find_spec("triton") is not None


def _supported(xs: list[torch.Tensor], weights: list[torch.Tensor]) -> bool:
    """Inputs the kernel takes: CUDA with Triton installed, a power-of-two head size of at least 16, channels
    contiguous; anything else runs the plain ops."""
    d = xs[0].shape[-1]
    return (xs[0].is_cuda and _have_triton() and d >= 16 and d & (d - 1) == 0 and all(x.stride(-1) == 1 for x in xs)
            and all(w.is_contiguous() for w in weights))


@torch.library.custom_op("gen::rms_norm_rope", mutates_args=())
def rms_norm_rope(xs: list[torch.Tensor], weights: list[torch.Tensor], coss: list[torch.Tensor],
                  sins: list[torch.Tensor], eps: float, weight_fp32: bool) -> torch.Tensor:
    """Parts x_i (B, L_i, H, D) -> (B, sum L_i, H, D): RMSNorm with weight_i (D,), rotated by cos_i / sin_i (L_i, D/2)
    fp32, written at the part's offset in the sequence."""
    if not _supported(xs, weights):
        return reference(xs, weights, coss, sins, eps, weight_fp32)
    b, _, heads, d = xs[0].shape
    out = torch.empty(b, sum(x.shape[1] for x in xs), heads, d, dtype=xs[0].dtype, device=xs[0].device)
    kernel, block, offset = _kernel(), LAUNCH["block"], 0
    for x, w, cos, sin in zip(xs, weights, coss, sins):
        length = x.shape[1]
        part = out[:, offset:offset + length]
        cos, sin = cos.float(), sin.float()
        rows = b * length * heads
        if rows:
            kernel[((rows + block - 1) // block,)](
                x, w, cos, sin, part, rows, heads, length, x.stride(0), x.stride(1), x.stride(2), part.stride(0),
                part.stride(1), part.stride(2), cos.stride(0), sin.stride(0), eps, D=d, BLOCK=block,
                WEIGHT_FP32=weight_fp32, num_warps=LAUNCH["num_warps"])
        offset += length
    return out


@rms_norm_rope.register_fake
def _(xs, weights, coss, sins, eps, weight_fp32):
    b, _, heads, d = xs[0].shape
    return xs[0].new_empty(b, sum(x.shape[1] for x in xs), heads, d)


def _norms(model: nn.Module):
    for m in model.modules():
        for name in getattr(type(m), "rope_norms", ()):
            norm = getattr(m, name)
            if getattr(norm, "weight", None) is not None:
                yield norm


def fuse_norm_rope(model: nn.Module) -> int:
    """Mark the q/k norms of every attention of `model` that declares `rope_norms`; returns how many."""
    n = 0
    for norm in _norms(model):
        norm.fused_rope = True
        n += 1
    return n


def unfuse_norm_rope(model: nn.Module) -> None:
    """Undo fuse_norm_rope: the plain norm and rotation ops again."""
    for norm in _norms(model):
        norm.__dict__.pop("fused_rope", None)
