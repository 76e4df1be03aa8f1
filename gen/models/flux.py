"""The FLUX.1 diffusion transformer (dev and schnell), parameter names = diffusers checkpoint keys; not the pipeline."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from gen.models.attention import attention
from gen.models.layers import (AdaNormOut, FeedForward, MLPEmbedder, apply_rope, linear_gelu_tanh, linear_of_cat,
                               norm_rope, plain_linears, project, timestep_embedding, unbatch_ids)

Rope = tuple[torch.Tensor, torch.Tensor]  # (cos, sin), each (S, head_dim / 2) float32


@dataclass(frozen=True)
class FluxConfig:
    """Fields = the keys of a diffusers `FluxTransformer2DModel` config.json (defaults = FLUX.1-dev)."""

    patch_size: int = 1
    in_channels: int = 64
    out_channels: int | None = None  # None = in_channels
    num_layers: int = 19
    num_single_layers: int = 38
    attention_head_dim: int = 128
    num_attention_heads: int = 24
    joint_attention_dim: int = 4096
    pooled_projection_dim: int = 768
    guidance_embeds: bool = False
    axes_dims_rope: tuple[int, ...] = (16, 56, 56)

    def __post_init__(self):
        if sum(self.axes_dims_rope) != self.attention_head_dim:
            raise ValueError(
                f"axes_dims_rope={self.axes_dims_rope} must sum to attention_head_dim={self.attention_head_dim}"
            )
        if any(d % 2 for d in self.axes_dims_rope):
            raise ValueError(f"axes_dims_rope={self.axes_dims_rope} must all be even")

    @property
    def inner_dim(self) -> int:
        return self.num_attention_heads * self.attention_head_dim


# ---------------------------------------------------------------- RoPE


def rope_from_ids(ids: torch.Tensor, axes_dims: tuple[int, ...], theta: float = 10000.0) -> Rope:
    """Per-axis rotary tables for positions `ids` (S, n_axes) -> (cos, sin), each (S, sum(axes_dims) / 2) float32:
    one angle per channel pair (2i, 2i+1) (interleaved layout, as BFL and diffusers)."""
    if ids.ndim != 2 or ids.shape[-1] != len(axes_dims):
        raise ValueError(f"ids must be (S, {len(axes_dims)}) for axes_dims={axes_dims}, got shape {tuple(ids.shape)}")
    # float64 where the device has it (diffusers does the same), float32 elsewhere.
    fdtype = torch.float32 if ids.device.type in ("mps", "npu") else torch.float64
    pos = ids.float().to(fdtype)  # (S, n_axes)
    angles = []
    for i, dim in enumerate(axes_dims):
        freqs = 1.0 / theta ** (torch.arange(0, dim, 2, dtype=fdtype, device=ids.device) / dim)  # (dim/2,)
        angles.append(torch.outer(pos[:, i], freqs))  # (S, dim/2)
    angle = torch.cat(angles, dim=-1)  # (S, D/2)
    return angle.cos().float(), angle.sin().float()


def rotate(x: torch.Tensor, rope: Rope) -> torch.Tensor:
    """x (B, S, H, D) rotated by the joint sequence's (cos, sin)."""
    cos, sin = (t.to(x.device)[None, :, None, :] for t in rope)  # (1, S, 1, D/2)
    return apply_rope(x, cos, sin)


# ---------------------------------------------------------------- embeddings


class TimeTextEmbed(nn.Module):
    """temb = MLP(sin(t)) [+ MLP(sin(guidance))] + MLP(pooled text); t and guidance already scaled to [0, 1000]."""

    def __init__(self, dim: int, pooled_dim: int, guidance: bool):
        super().__init__()
        self.timestep_embedder = MLPEmbedder(256, dim)
        self.guidance_embedder = MLPEmbedder(256, dim) if guidance else None
        self.text_embedder = MLPEmbedder(pooled_dim, dim)

    def forward(self, t: torch.Tensor, guidance: torch.Tensor | None, pooled: torch.Tensor) -> torch.Tensor:
        emb = self.timestep_embedder(timestep_embedding(t).to(pooled.dtype))  # (B, dim)
        if self.guidance_embedder is not None:
            emb = emb + self.guidance_embedder(timestep_embedding(guidance).to(pooled.dtype))
        return emb + self.text_embedder(pooled)


# ---------------------------------------------------------------- layers


class Modulation(nn.Module):
    """adaLN: SiLU(temb) -> Linear -> n chunks of (B, dim) (diffusers' AdaLayerNormZero[Single]'s `linear`)."""

    def __init__(self, dim: int, n: int):
        super().__init__()
        self.n = n
        self.linear = nn.Linear(dim, n * dim)

    def forward(self, temb: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self.linear(F.silu(temb)).chunk(self.n, dim=1)


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """LayerNorm (no affine, eps 1e-6) of x (B, L, dim), then scale/shift (B, dim) per sample."""
    return F.layer_norm(x, x.shape[-1:], eps=1e-6) * (1 + scale[:, None]) + shift[:, None]


def _heads(x: torch.Tensor, head_dim: int) -> torch.Tensor:
    return x.unflatten(-1, (-1, head_dim))  # (B, L, H*D) -> (B, L, H, D)


class SelfAttention(nn.Module):
    """Single-stream attention: q/k/v + q/k RMSNorm + RoPE; the output projection lives in the block's proj_out.

    The block computes q/k/v itself (with its MLP input projection, one joined matmul when gen/transforms/join.py joined them)."""

    rope_norms = ("norm_q", "norm_k")  # gen/transforms/norm_rope.py

    def __init__(self, dim: int, heads: int, head_dim: int):
        super().__init__()
        self.head_dim = head_dim
        self.norm_q = nn.RMSNorm(head_dim, eps=1e-6)
        self.norm_k = nn.RMSNorm(head_dim, eps=1e-6)
        self.to_q = nn.Linear(dim, heads * head_dim)
        self.to_k = nn.Linear(dim, heads * head_dim)
        self.to_v = nn.Linear(dim, heads * head_dim)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rope: Rope) -> torch.Tensor:
        """Projected q, k, v (B, S, H*D) -> attention output (B, S, H*D)."""
        q, k, v = (t.unflatten(-1, (-1, self.head_dim)) for t in (q, k, v))  # (B, S, H, D)
        cos, sin = (t.to(q.device) for t in rope)
        out = attention(norm_rope((self.norm_q, q, cos, sin)), norm_rope((self.norm_k, k, cos, sin)), v)
        return out.flatten(2)


class JointAttention(nn.Module):
    """Double-stream attention: separate image (to_*) and text (add_*_proj) weights, one attention over [txt, img]."""

    rope_norms = ("norm_q", "norm_k", "norm_added_q", "norm_added_k")  # gen/transforms/norm_rope.py

    def __init__(self, dim: int, heads: int, head_dim: int):
        super().__init__()
        self.head_dim = head_dim
        inner = heads * head_dim
        self.norm_q = nn.RMSNorm(head_dim, eps=1e-6)
        self.norm_k = nn.RMSNorm(head_dim, eps=1e-6)
        self.to_q = nn.Linear(dim, inner)
        self.to_k = nn.Linear(dim, inner)
        self.to_v = nn.Linear(dim, inner)
        self.to_out = nn.ModuleList([nn.Linear(inner, dim)])
        self.norm_added_q = nn.RMSNorm(head_dim, eps=1e-6)
        self.norm_added_k = nn.RMSNorm(head_dim, eps=1e-6)
        self.add_q_proj = nn.Linear(dim, inner)
        self.add_k_proj = nn.Linear(dim, inner)
        self.add_v_proj = nn.Linear(dim, inner)
        self.to_add_out = nn.Linear(inner, dim)

    def forward(self, img: torch.Tensor, txt: torch.Tensor, rope: Rope) -> tuple[torch.Tensor, torch.Tensor]:
        """img (B, L, dim), txt (B, T, dim), rope over the T + L joint positions -> (img_out, txt_out)."""
        iq, ik, iv = (_heads(t, self.head_dim) for t in project(img, self.to_q, self.to_k, self.to_v))  # (B, L, H, D)
        tq, tk, tv = (_heads(t, self.head_dim) for t in project(txt, self.add_q_proj, self.add_k_proj,
                                                                 self.add_v_proj))  # (B, T, H, D)
        t = txt.shape[1]
        cos, sin = (r.to(img.device) for r in rope)
        tc, ts, ic, is_ = cos[:t], sin[:t], cos[t:], sin[t:]
        q = norm_rope((self.norm_added_q, tq, tc, ts), (self.norm_q, iq, ic, is_))  # (B, T+L, H, D)
        k = norm_rope((self.norm_added_k, tk, tc, ts), (self.norm_k, ik, ic, is_))
        v = torch.cat([tv, iv], dim=1)
        out = attention(q, k, v).flatten(2)  # (B, T+L, H*D)
        txt_out, img_out = out.split([txt.shape[1], img.shape[1]], dim=1)
        return self.to_out[0](img_out), self.to_add_out(txt_out)


def _clip_fp16(x: torch.Tensor) -> torch.Tensor:
    return x.clip(-65504, 65504) if x.dtype == torch.float16 else x


class FluxDoubleBlock(nn.Module):
    """MMDiT block: image and text streams each with own modulation / MLP, attending jointly."""

    joinable = (("attn.to_q", "attn.to_k", "attn.to_v"), ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"))

    def __init__(self, dim: int, heads: int, head_dim: int):
        super().__init__()
        self.norm1 = Modulation(dim, 6)
        self.norm1_context = Modulation(dim, 6)
        self.attn = JointAttention(dim, heads, head_dim)
        self.ff = FeedForward(dim, 4 * dim)
        self.ff_context = FeedForward(dim, 4 * dim)

    def forward(self, img: torch.Tensor, txt: torch.Tensor, temb: torch.Tensor, rope: Rope):
        """img (B, L, dim), txt (B, T, dim), temb (B, dim) -> (img, txt)."""
        i_shift, i_scale, i_gate, i_shift2, i_scale2, i_gate2 = self.norm1(temb)
        t_shift, t_scale, t_gate, t_shift2, t_scale2, t_gate2 = self.norm1_context(temb)
        img_attn, txt_attn = self.attn(modulate(img, i_shift, i_scale), modulate(txt, t_shift, t_scale), rope)

        img = img + i_gate[:, None] * img_attn
        img = img + i_gate2[:, None] * self.ff(modulate(img, i_shift2, i_scale2))

        txt = txt + t_gate[:, None] * txt_attn
        txt = txt + t_gate2[:, None] * self.ff_context(modulate(txt, t_shift2, t_scale2))
        return img, _clip_fp16(txt)


class FluxSingleBlock(nn.Module):
    """Parallel attention + MLP over the joint [txt, img] sequence, one fused output projection."""

    joinable = (("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"),)
    gelu_epilogue = False  # set by gen/transforms/epilogue.py: see mlp_in_epilogue

    def __init__(self, dim: int, heads: int, head_dim: int, mlp_ratio: float = 4.0):
        super().__init__()
        mlp_dim = int(dim * mlp_ratio)
        self.norm = Modulation(dim, 3)
        self.attn = SelfAttention(dim, heads, head_dim)
        self.proj_mlp = nn.Linear(dim, mlp_dim)
        self.proj_out = nn.Linear(heads * head_dim + mlp_dim, dim)

    def forward(self, x: torch.Tensor, temb: torch.Tensor, rope: Rope) -> torch.Tensor:
        """x (B, T+L, dim) -> same."""
        shift, scale, gate = self.norm(temb)
        h = modulate(x, shift, scale)
        a = self.attn
        if self.gelu_epilogue and h.is_cuda and plain_linears(h, a.to_q, a.to_k, a.to_v, self.proj_mlp, self.proj_out):
            out = self.mlp_in_epilogue(h, rope)
        else:
            # LoRA adapters (gen/transforms/lora.py) keep the GELU epilogue where the MLP has a GEMM of its own
            q, k, v, mlp = project(h, a.to_q, a.to_k, a.to_v, self.proj_mlp, gelu_last=True,
                                   epilogue=self.gelu_epilogue)  # mlp: (B, S, mlp_dim), GELU applied
            parts = [a(q, k, v, rope), mlp]
            out = linear_of_cat(parts, self.proj_out) if self.gelu_epilogue and h.is_cuda \
                else self.proj_out(torch.cat(parts, dim=-1))  # (B, S, dim)
        return _clip_fp16(x + gate[:, None] * out)

    def mlp_in_epilogue(self, h: torch.Tensor, rope: Rope) -> torch.Tensor:
        """The same as the concatenated path without writing [attention | GELU(mlp)]: the MLP's projection with its
        GELU in the matmul's epilogue (linear_gelu_tanh), and proj_out as two accumulating matmuls over its column
        blocks (views of its weight). On an H200 at FLUX.1-dev 1024^2: the step 2% faster (docs/BENCHMARKS.md)."""
        a, inner = self.attn, self.proj_out.in_features - self.proj_mlp.out_features
        if getattr(a.to_q, "joined_sizes", None) == [inner] * 3 + [self.proj_mlp.out_features]:  # row blocks
            w, b, n = a.to_q.joined_weight, a.to_q.joined_bias, 3 * inner
            q, k, v = F.linear(h, w[:n], b[:n]).split(inner, dim=-1)
            mlp = linear_gelu_tanh(h, w[n:], b[n:])
        else:
            q, k, v = project(h, a.to_q, a.to_k, a.to_v)
            mlp = linear_gelu_tanh(h, self.proj_mlp.weight, self.proj_mlp.bias)
        w = self.proj_out.weight
        y = F.linear(a(q, k, v, rope), w[:, :inner], self.proj_out.bias)  # (B, S, dim)
        return torch.addmm(y.flatten(0, 1), mlp.flatten(0, 1), w[:, inner:].t()).view_as(y)


# ---------------------------------------------------------------- model


class FluxTransformer(nn.Module):
    def __init__(self, config: FluxConfig):
        super().__init__()
        self.config = c = config
        dim, heads, hd = c.inner_dim, c.num_attention_heads, c.attention_head_dim
        self.out_channels = c.out_channels or c.in_channels
        self.x_embedder = nn.Linear(c.in_channels, dim)
        self.context_embedder = nn.Linear(c.joint_attention_dim, dim)
        self.time_text_embed = TimeTextEmbed(dim, c.pooled_projection_dim, c.guidance_embeds)
        self.transformer_blocks = nn.ModuleList([FluxDoubleBlock(dim, heads, hd) for _ in range(c.num_layers)])
        self.single_transformer_blocks = nn.ModuleList(
            [FluxSingleBlock(dim, heads, hd) for _ in range(c.num_single_layers)]
        )
        self.norm_out = AdaNormOut(dim)
        self.proj_out = nn.Linear(dim, c.patch_size * c.patch_size * self.out_channels)

    def rope(self, txt_ids: torch.Tensor, img_ids: torch.Tensor) -> Rope:
        """(cos, sin) for the joint sequence [txt, img], each (T+L, head_dim)."""
        return rope_from_ids(torch.cat([txt_ids, img_ids], dim=0), self.config.axes_dims_rope)

    def time_embedding(self, timestep: torch.Tensor, guidance: torch.Tensor | None, pooled_projections: torch.Tensor,
                       dtype: torch.dtype) -> torch.Tensor:
        """temb (B, dim) of a call's timestep (B,) in [0, 1], guidance (B,) or None and pooled text (B, P); `dtype`:
        the image tokens' dtype. What every modulation of the step reads."""
        t = timestep.to(dtype) * 1000
        g = guidance.to(dtype) * 1000 if guidance is not None else None
        return self.time_text_embed(t, g, pooled_projections)

    def forward(
        self,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        pooled_projections: torch.Tensor,
        timestep: torch.Tensor,
        img_ids: torch.Tensor,
        txt_ids: torch.Tensor,
        guidance: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """hidden_states (B, L, C) packed latents, encoder_hidden_states (B, T, joint_dim), pooled (B, P),
        timestep (B,) in [0, 1], img_ids (L, 3), txt_ids (T, 3), guidance (B,) for dev -> (B, L, out_channels)."""
        if self.config.guidance_embeds and guidance is None:
            raise ValueError("guidance is None, but this model has guidance_embeds=True (FLUX.1-dev): pass guidance")
        if not self.config.guidance_embeds and guidance is not None:
            raise ValueError("guidance was given, but this model has guidance_embeds=False (FLUX.1-schnell)")
        img_ids, txt_ids = unbatch_ids(img_ids, "img_ids"), unbatch_ids(txt_ids, "txt_ids")
        rope = self.rope(txt_ids, img_ids)

        img = self.x_embedder(hidden_states)  # (B, L, dim)
        txt = self.context_embedder(encoder_hidden_states)  # (B, T, dim)
        temb = self.time_embedding(timestep, guidance, pooled_projections, img.dtype)  # (B, dim)

        for block in self.transformer_blocks:
            img, txt = block(img, txt, temb, rope)
        x = torch.cat([txt, img], dim=1)  # (B, T+L, dim)
        for block in self.single_transformer_blocks:
            x = block(x, temb, rope)
        img = x[:, txt.shape[1] :]  # (B, L, dim)
        return self.proj_out(self.norm_out(img, temb))  # (B, L, out_channels)
