"""Small layers several of our DiTs share, where the math is the same (no weights beyond plain Linear layers and
norm scales): feed-forward, RMSNorm, the final adaptive norm, timestep embedding, RoPE application."""
from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn


class MLPEmbedder(nn.Module):
    """Linear -> activation (SiLU) -> Linear (diffusers' TimestepEmbedding / PixArtAlphaTextProjection):
    `linear_1`, `linear_2` (`bias=False`: both without bias, as `sample_proj_bias=False` makes them)."""

    def __init__(self, in_dim: int, dim: int, act: Callable[[torch.Tensor], torch.Tensor] = F.silu, bias: bool = True):
        super().__init__()
        self.linear_1 = nn.Linear(in_dim, dim, bias=bias)
        self.linear_2 = nn.Linear(dim, dim, bias=bias)
        self.act = act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(self.act(self.linear_1(x)))


class GeluProj(nn.Module):
    """Linear then GELU (the checkpoint names the linear `proj`). `gelu_epilogue` (set by
    gen/transforms/epilogue.py): tanh GELU applied in the matmul's epilogue, one cuBLASLt call, on CUDA inputs."""

    gelu_epilogue = False

    def __init__(self, dim_in: int, dim_out: int, approximate: str = "tanh"):
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out)
        self.approximate = approximate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = self.proj
        if self.gelu_epilogue and x.is_cuda:
            if plain_linears(x, p):
                return linear_gelu_tanh(x, p.weight, p.bias)
            wide = getattr(p, "lora_wide", None)  # a LoRA's wide layout (gen/transforms/lora.py): GELU kept there
            if wide is not None and p.bias is not None and wide.dtype == x.dtype:
                return _unflatten(linear_gelu_tanh(wide_lora_input(x, p.lora_down), wide, p.bias), x)
        return F.gelu(p(x), approximate=self.approximate)


def plain_linears(x: torch.Tensor, *layers: nn.Module) -> bool:
    """Whether `layers` are all plain nn.Linear with a bias, in x's dtype (not LoRA or FP8 layers, whose own forward
    must run)."""
    return all(type(m) is nn.Linear and m.bias is not None and m.weight.dtype == x.dtype for m in layers)


def linear_gelu_tanh(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """GELU(tanh)(x W^T + b); on CUDA one cuBLASLt call with bias and GELU in its epilogue (torch._addmm_activation
    there is the tanh approximation on the accumulator; elsewhere it means exact GELU, so the separate calls)."""
    if not x.is_cuda:
        return F.gelu(F.linear(x, weight, bias), approximate="tanh")
    out = torch._addmm_activation(bias, x.reshape(-1, x.shape[-1]), weight.t(), use_gelu=True)
    return out.view(*x.shape[:-1], weight.shape[0])


class FeedForward(nn.Module):
    """dim -> inner (GELU) -> dim_out; `net.0.proj` / `net.2` as in diffusers (net.1 is its dropout slot)."""

    def __init__(self, dim: int, inner: int, dim_out: int | None = None, approximate: str = "tanh"):
        super().__init__()
        self.net = nn.Sequential(GeluProj(dim, inner, approximate), nn.Identity(), nn.Linear(inner, dim_out or dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class RMSNorm(nn.Module):
    """RMSNorm as diffusers computes it: statistics in fp32, the normalized value cast to the weight's dtype, then
    scaled by the weight."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm_rounded(x, self.weight, self.eps)


def rms_norm_rounded(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm's arithmetic as diffusers has it (RMSNorm above): fp32 statistics, the normalized value rounded to the
    weight's dtype, then multiplied by the weight (torch's F.rms_norm multiplies in fp32 and rounds once)."""
    x = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + eps)
    return x.to(weight.dtype) * weight


class AdaNormOut(nn.Module):
    """Final LayerNorm (no affine, eps 1e-6 unless given) with scale and shift (in that order: diffusers'
    AdaLayerNormContinuous) projected from the time embedding: `linear` (`bias=False`: without bias, FLUX.2)."""

    def __init__(self, dim: int, bias: bool = True, eps: float = 1e-6):
        super().__init__()
        self.linear = nn.Linear(dim, 2 * dim, bias=bias)
        self.eps = eps

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        """x (B, L, dim), temb (B, dim) -> (B, L, dim)."""
        scale, shift = self.linear(F.silu(temb).to(x.dtype)).chunk(2, dim=1)  # (B, dim) each
        return F.layer_norm(x, x.shape[-1:], eps=self.eps) * (1 + scale[:, None]) + shift[:, None]


def timestep_embedding(t: torch.Tensor, dim: int = 256, scale: float = 1.0, max_period: float = 10000.0,
                       freqs_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Sinusoidal embedding of t (N,) -> (N, dim) float32, laid out [cos | sin] (zero-padded for an odd dim).
    `freqs_dtype`: the frequencies rounded to this dtype first (Qwen-Image rounds them to the timestep's)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t[:, None].float() * freqs.to(freqs_dtype)[None]  # (N, half)
    if scale != 1.0:
        args = scale * args
    return F.pad(torch.cat([args.cos(), args.sin()], dim=-1), (0, dim % 2))


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the interleaved channel pairs (2i, 2i+1) of x (B, L, H, D) by angles given as cos / sin broadcastable to
    (B, L, H, D/2); math in fp32, result in x's dtype."""
    xr, xi = x.float().unflatten(-1, (-1, 2)).unbind(-1)  # (B, L, H, D/2) each
    return torch.stack([xr * cos - xi * sin, xr * sin + xi * cos], dim=-1).flatten(-2).type_as(x)


def norm_rope(*parts: tuple[nn.Module, torch.Tensor, torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """Parts (norm, x (B, L_i, H, D), cos, sin (L_i, D/2)) -> (B, sum L_i, H, D): each x through its RMSNorm
    (per head) and rotated by its part of the joint sequence's angles, concatenated along the sequence. One fused
    kernel on CUDA where gen/transforms/norm_rope.py marked every norm (`fused_rope`)."""
    norms = [p[0] for p in parts]
    if parts[0][1].is_cuda and all(getattr(n, "fused_rope", False) for n in norms):
        eps = {n.eps if n.eps is not None else torch.finfo(torch.float32).eps for n in norms}
        fp32 = {isinstance(n, nn.RMSNorm) for n in norms}  # torch's multiplies the weight in fp32 (see RMSNorm)
        if len(eps) == 1 and len(fp32) == 1:
            return torch.ops.gen.rms_norm_rope([p[1] for p in parts], [n.weight for n in norms],
                                               [p[2] for p in parts], [p[3] for p in parts], eps.pop(), fp32.pop())
    outs = [apply_rope(n(x), cos[None, :, None], sin[None, :, None]) for n, x, cos, sin in parts]
    return outs[0] if len(outs) == 1 else torch.cat(outs, dim=1)


def unbatch_ids(ids: torch.Tensor, name: str) -> torch.Tensor:
    """Position ids (S, n_axes), or the deprecated (B, S, n_axes) read from its first entry as diffusers does."""
    if ids.ndim == 3:
        ids = ids[0]
    if ids.ndim != 2:
        raise ValueError(f"{name} must be (S, n_axes) or (B, S, n_axes), got shape {tuple(ids.shape)}")
    return ids


def project(x: torch.Tensor, *layers: nn.Module, gelu_last: bool = False,
            epilogue: bool = False) -> tuple[torch.Tensor, ...]:
    """`x` through several Linear layers that all read it: one matmul when gen/transforms/join.py joined exactly this
    group (the first layer then holds the joined weight), else one call per layer. LoRA adapters on a joined group
    (gen/transforms/lora.py: the members' down matrices stacked on the first layer) add one down matmul for the
    group and each member's up product added to its slice of the joined output (in place when eager: see
    add_lora; the LoRA scales are already in the down rows), or, in the wide layout, run as part of the GEMM.
    `gelu_last`: the last output through tanh GELU; `epilogue` (CUDA): in its matmul's epilogue where that member
    is a GEMM of its own (unjoined, or the wide layout's last segment)."""
    first, last = layers[0], layers[-1]
    sizes = getattr(first, "joined_sizes", None)
    if sizes is None:
        if gelu_last and epilogue and x.is_cuda and plain_linears(x, last):
            return *(layer(x) for layer in layers[:-1]), linear_gelu_tanh(x, last.weight, last.bias)
        return _gelu_last(tuple(layer(x) for layer in layers), gelu_last)
    if len(sizes) != len(layers):
        raise RuntimeError(f"layer joined as a group of {len(sizes)} called as a group of {len(layers)}")
    down = getattr(first, "joined_lora_down", None)
    wide = getattr(first, "joined_lora_wide", None)
    last_wide = getattr(first, "joined_lora_wide_last", None)
    if last_wide is not None:  # two segments of one buffer [h_rest | x | h_last]: the rest's GEMM, the last's GEMM
        rest, k = wide.shape[1] - x.shape[-1], x.shape[-1]
        buf = wide_lora_input(x, down, before=rest)
        n = wide.shape[0]
        bias = first.joined_bias
        b_rest, b_last = (None, None) if bias is None else (bias[:n], bias[n:])
        out = _unflatten(F.linear(buf[:, :rest + k], wide, b_rest), x).split(sizes[:-1], dim=-1)
        if gelu_last and epilogue and x.is_cuda and b_last is not None:
            return *out, _unflatten(linear_gelu_tanh(buf[:, rest:], last_wide, b_last), x)
        return _gelu_last((*out, _unflatten(F.linear(buf[:, rest:], last_wide, b_last), x)), gelu_last)
    if wide is not None:  # LoRA's wide layout: one GEMM over [x | x A^T] against [W | the members' ups]
        return _gelu_last(wide_lora_linear(x, down, wide, first.joined_bias).split(sizes, dim=-1), gelu_last)
    out = F.linear(x, first.joined_weight, first.joined_bias).split(sizes, dim=-1)
    if down is not None:
        h = F.linear(x, down).split(first.joined_lora_ranks, dim=-1)  # (..., R) each
        out = tuple(add_lora(o, hi, layer.lora_up) for o, hi, layer in zip(out, h, layers))
    return _gelu_last(out, gelu_last)


def _gelu_last(out: tuple[torch.Tensor, ...], gelu: bool) -> tuple[torch.Tensor, ...]:
    return (*out[:-1], F.gelu(out[-1], approximate="tanh")) if gelu else tuple(out)


def linear_of_cat(parts: list[torch.Tensor], layer: nn.Module) -> torch.Tensor:
    """layer(torch.cat(parts, dim=-1)) without writing the concatenation: one GEMM per part over its column block of
    the weight, accumulated (addmm), and for a LoRA layer (gen/transforms/lora.py) its down product the same way
    before its up product is added. Other layers (FP8, a LoRA's wide layout) get the concatenation."""
    if not (isinstance(layer, nn.Linear) and layer.weight.dtype == parts[0].dtype and "lora_wide" not in layer._buffers):
        return layer(torch.cat(parts, dim=-1))
    w, down = layer.weight, layer._buffers.get("lora_down")
    y = h = None
    col = 0
    for part in parts:
        rows, cols = part.flatten(0, -2), slice(col, col + part.shape[-1])
        y = F.linear(rows, w[:, cols], layer.bias) if y is None else torch.addmm(y, rows, w[:, cols].t())
        if down is not None:
            h = F.linear(rows, down[:, cols]) if h is None else torch.addmm(h, rows, down[:, cols].t())
        col = cols.stop
    if down is not None:
        y = add_lora(y, h, layer.lora_up)
    return y.view(*parts[0].shape[:-1], w.shape[0])


def wide_lora_input(x: torch.Tensor, down: torch.Tensor, before: int = 0) -> torch.Tensor:
    """The rows of a wide-layout LoRA GEMM's input (gen/transforms/lora.py), (rows, in + R): [x | x down^T], or, with
    `before` columns of the down product first, [h[:, :before] | x | h[:, before:]] (a split group). x is
    concatenated with zero columns first and the down product then read from the buffer and written into those
    columns (gen::lora_down_into, in place). Under torch.compile x's producer (a norm) so writes x straight into the
    buffer: concatenating after the down product copied x once more, since the down had made x a buffer of its own
    (one pass over x written and read per adapted group); writing into a slice (`buf[:, a:b] = ...`) became a pass
    over the whole buffer."""
    rows = x.reshape(-1, x.shape[-1])
    m, r = rows.shape[0], down.shape[0]
    parts = [rows.new_zeros(m, before)] if before else []
    buf = torch.cat([*parts, rows, rows.new_zeros(m, r - before)], dim=1)
    torch.ops.gen.lora_down_into(buf, down, before)
    return buf


@torch.library.custom_op("gen::lora_down_into", mutates_args=("buf",))
def lora_down_into(buf: torch.Tensor, down: torch.Tensor, before: int) -> None:
    """buf (rows, in + R) holding x in columns before .. before + in: x down^T (R columns) written into the others,
    [h[:, :before] | x | h[:, before:]]. (The matmul into a fresh tensor, then copied: cuBLAS writing straight into
    the buffer's columns chose slower kernels, +3.7 ms a FLUX.1-dev step at rank 64 on an H200.)"""
    k = buf.shape[1] - down.shape[0]
    h = torch.mm(buf[:, before:before + k], down.t())
    if before:
        buf[:, :before].copy_(h[:, :before])
    buf[:, before + k:].copy_(h[:, before:])


@lora_down_into.register_fake
def _(buf: torch.Tensor, down: torch.Tensor, before: int) -> None:
    return None


def wide_lora_linear(x: torch.Tensor, down: torch.Tensor, wide: torch.Tensor, bias: torch.Tensor | None):
    """A linear with LoRAs in the wide layout (gen/transforms/lora.py): [x | x down^T] @ wide^T + bias, where `wide` is
    [W | ups]; a GEMM over 2-D rows, so that the bias stays in its epilogue."""
    return _unflatten(F.linear(wide_lora_input(x, down), wide, bias), x)


def _unflatten(rows: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """A GEMM's (rows, out) result shaped as x's leading dimensions. (A GEMM over a 3-D view that is not contiguous,
    a column range of a buffer, runs as a batched matmul with its bias added by a kernel apart: keep them 2-D.)"""
    return rows.view(*x.shape[:-1], rows.shape[-1])


def add_lora(y: torch.Tensor, h: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """y (..., out) + h (..., R) @ up (out, R)^T. Eager: accumulated into y in place (one GEMM reading and writing
    y: two passes over it, where a separate matmul and add make four); under torch.compile: a matmul and an add,
    which inductor fuses into y's consumer (its addmm would copy y into a new buffer first), also two passes."""
    rows = None if torch.compiler.is_compiling() else _as_rows(y)
    if rows is None or rows.dtype != h.dtype:
        return y + F.linear(h, up)
    rows.addmm_(h.reshape(-1, h.shape[-1]), up.t())
    return y


def _as_rows(y: torch.Tensor) -> torch.Tensor | None:
    """A (rows, out) view of y sharing its memory (y may be a column slice of a wider output), or None."""
    if y.ndim < 2 or y.stride(-1) != 1:
        return None
    for i in range(y.ndim - 2):
        if y.stride(i) != y.stride(i + 1) * y.shape[i + 1]:
            return None
    return y.as_strided((y.numel() // y.shape[-1] if y.shape[-1] else 0, y.shape[-1]), (y.stride(-2), 1))

