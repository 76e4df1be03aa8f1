"""The FLUX.2 diffusion transformer ([dev] and [klein]), parameter names = diffusers' Flux2Transformer2DModel checkpoint
keys; not the pipelines (pipelines/flux2.py) nor the text encoders (gen/llm).

An MMDiT like FLUX.1 with these differences: no biases anywhere; the timestep (+ guidance for [dev]) embedding alone
conditions the model (no pooled text); the adaLN modulations are computed once per call and shared by every block
of a kind (`double_stream_modulation_img` / `_txt`, `single_stream_modulation`); the feed-forwards are SwiGLU; a
single block reads q, k, v and its MLP input from one fused projection (`to_qkv_mlp_proj`) and writes attention and
MLP through one (`to_out`); RoPE runs over 4 position axes (time, row, column, text index) with theta 2000.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from gen.models.attention import attention
from gen.models.flux import Rope, rope_from_ids, rotate
from gen.models.layers import AdaNormOut, MLPEmbedder, project, timestep_embedding, unbatch_ids

Mod = tuple[torch.Tensor, ...]  # shift, scale, gate (per set), each (B, 1, dim)


@dataclass(frozen=True)
class Flux2Config:
    """Fields = the keys of a diffusers `Flux2Transformer2DModel` config.json (defaults = FLUX.2 [dev])."""

    patch_size: int = 1
    in_channels: int = 128
    out_channels: int | None = None  # None = in_channels
    num_layers: int = 8
    num_single_layers: int = 48
    attention_head_dim: int = 128
    num_attention_heads: int = 48
    joint_attention_dim: int = 15360
    timestep_guidance_channels: int = 256
    mlp_ratio: float = 3.0
    axes_dims_rope: tuple[int, ...] = (32, 32, 32, 32)
    rope_theta: int = 2000
    eps: float = 1e-6
    guidance_embeds: bool = True

    def __post_init__(self):
        if sum(self.axes_dims_rope) != self.attention_head_dim:
            raise ValueError(f"axes_dims_rope={self.axes_dims_rope} must sum to attention_head_dim="
                             f"{self.attention_head_dim}")
        if any(d % 2 for d in self.axes_dims_rope):
            raise ValueError(f"axes_dims_rope={self.axes_dims_rope} must all be even")
        if self.patch_size != 1:
            raise ValueError(f"patch_size={self.patch_size}: FLUX.2 patchifies in the pipeline, the transformer "
                             "takes patch_size 1")

    @property
    def inner_dim(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    @property
    def mlp_dim(self) -> int:
        return int(self.inner_dim * self.mlp_ratio)


# ---------------------------------------------------------------- embeddings and modulation


class TimeGuidanceEmbed(nn.Module):
    """temb = MLP(sin(t)) [+ MLP(sin(guidance))], both MLPs without biases; t and guidance already scaled to
    [0, 1000]."""

    def __init__(self, channels: int, dim: int, guidance: bool):
        super().__init__()
        self.channels = channels
        self.timestep_embedder = MLPEmbedder(channels, dim, bias=False)
        self.guidance_embedder = MLPEmbedder(channels, dim, bias=False) if guidance else None

    def forward(self, t: torch.Tensor, guidance: torch.Tensor | None) -> torch.Tensor:
        emb = self.timestep_embedder(timestep_embedding(t, self.channels).to(t.dtype))  # (B, dim)
        if self.guidance_embedder is not None:
            emb = emb + self.guidance_embedder(timestep_embedding(guidance, self.channels).to(guidance.dtype))
        return emb


class Modulation(nn.Module):
    """SiLU(temb) -> Linear (no bias) -> `sets` x (shift, scale, gate), each (B, 1, dim)."""

    def __init__(self, dim: int, sets: int):
        super().__init__()
        self.sets = sets
        self.linear = nn.Linear(dim, 3 * sets * dim, bias=False)

    def forward(self, temb: torch.Tensor) -> Mod:
        return self.linear(F.silu(temb))[:, None].chunk(3 * self.sets, dim=-1)


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float) -> torch.Tensor:
    """LayerNorm (no affine) of x (B, L, dim), then scale / shift (B, 1, dim)."""
    return (1 + scale) * F.layer_norm(x, x.shape[-1:], eps=eps) + shift


def swiglu(x: torch.Tensor) -> torch.Tensor:
    """SiLU of the first half of the channels times the second half."""
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate) * up


class FeedForward(nn.Module):
    """dim -> 2 * mlp_dim (`linear_in`) -> SwiGLU -> dim (`linear_out`), no biases."""

    def __init__(self, dim: int, mlp_dim: int):
        super().__init__()
        self.linear_in = nn.Linear(dim, 2 * mlp_dim, bias=False)
        self.linear_out = nn.Linear(mlp_dim, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_out(swiglu(self.linear_in(x)))


# ---------------------------------------------------------------- blocks


class JointAttention(nn.Module):
    """Double-stream attention: image (to_*) and text (add_*_proj) projections, q/k RMSNorm per head, one attention
    over [txt, img] with RoPE."""

    def __init__(self, dim: int, head_dim: int, eps: float):
        super().__init__()
        self.head_dim = head_dim
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_k = nn.Linear(dim, dim, bias=False)
        self.to_v = nn.Linear(dim, dim, bias=False)
        self.norm_q = nn.RMSNorm(head_dim, eps=eps)
        self.norm_k = nn.RMSNorm(head_dim, eps=eps)
        self.to_out = nn.ModuleList([nn.Linear(dim, dim, bias=False)])
        self.add_q_proj = nn.Linear(dim, dim, bias=False)
        self.add_k_proj = nn.Linear(dim, dim, bias=False)
        self.add_v_proj = nn.Linear(dim, dim, bias=False)
        self.norm_added_q = nn.RMSNorm(head_dim, eps=eps)
        self.norm_added_k = nn.RMSNorm(head_dim, eps=eps)
        self.to_add_out = nn.Linear(dim, dim, bias=False)

    def forward(self, img: torch.Tensor, txt: torch.Tensor, rope: Rope) -> tuple[torch.Tensor, torch.Tensor]:
        """img (B, L, dim), txt (B, T, dim), rope over the T + L joint positions -> (img_out, txt_out)."""
        iq, ik, iv = (t.unflatten(-1, (-1, self.head_dim)) for t in project(img, self.to_q, self.to_k, self.to_v))
        tq, tk, tv = (t.unflatten(-1, (-1, self.head_dim))
                      for t in project(txt, self.add_q_proj, self.add_k_proj, self.add_v_proj))  # (B, T, H, D)
        q = rotate(torch.cat([self.norm_added_q(tq), self.norm_q(iq)], dim=1), rope)  # (B, T+L, H, D)
        k = rotate(torch.cat([self.norm_added_k(tk), self.norm_k(ik)], dim=1), rope)
        out = attention(q, k, torch.cat([tv, iv], dim=1)).flatten(2)  # (B, T+L, dim)
        txt_out, img_out = out.split([txt.shape[1], img.shape[1]], dim=1)
        return self.to_out[0](img_out), self.to_add_out(txt_out)


def _clip_fp16(x: torch.Tensor) -> torch.Tensor:
    return x.clip(-65504, 65504) if x.dtype == torch.float16 else x


class Flux2DoubleBlock(nn.Module):
    """Image and text streams, each with its own SwiGLU MLP, attending jointly; modulated by the shared
    double-stream modulations."""

    joinable = (("attn.to_q", "attn.to_k", "attn.to_v"), ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"))

    def __init__(self, c: Flux2Config):
        super().__init__()
        self.eps = c.eps
        self.attn = JointAttention(c.inner_dim, c.attention_head_dim, c.eps)
        self.ff = FeedForward(c.inner_dim, c.mlp_dim)
        self.ff_context = FeedForward(c.inner_dim, c.mlp_dim)

    def forward(self, img: torch.Tensor, txt: torch.Tensor, mod_img: Mod, mod_txt: Mod, rope: Rope):
        """img (B, L, dim), txt (B, T, dim), mod_* the 6 (B, 1, dim) modulations of a stream -> (img, txt)."""
        shift, scale, gate, shift2, scale2, gate2 = mod_img
        t_shift, t_scale, t_gate, t_shift2, t_scale2, t_gate2 = mod_txt
        img_attn, txt_attn = self.attn(modulate(img, shift, scale, self.eps), modulate(txt, t_shift, t_scale, self.eps),
                                       rope)
        img = img + gate * img_attn
        img = img + gate2 * self.ff(modulate(img, shift2, scale2, self.eps))
        txt = txt + t_gate * txt_attn
        txt = txt + t_gate2 * self.ff_context(modulate(txt, t_shift2, t_scale2, self.eps))
        return img, _clip_fp16(txt)


class ParallelAttention(nn.Module):
    """The single block's weights: q, k, v and the MLP input from one projection, attention and MLP output through
    one projection."""

    def __init__(self, dim: int, head_dim: int, mlp_dim: int, eps: float):
        super().__init__()
        self.head_dim, self.dim, self.mlp_dim = head_dim, dim, mlp_dim
        self.to_qkv_mlp_proj = nn.Linear(dim, 3 * dim + 2 * mlp_dim, bias=False)
        self.norm_q = nn.RMSNorm(head_dim, eps=eps)
        self.norm_k = nn.RMSNorm(head_dim, eps=eps)
        self.to_out = nn.Linear(dim + mlp_dim, dim, bias=False)

    def forward(self, x: torch.Tensor, rope: Rope) -> torch.Tensor:
        """x (B, S, dim) normed and modulated -> (B, S, dim)."""
        q, k, v, mlp = self.to_qkv_mlp_proj(x).split([self.dim] * 3 + [2 * self.mlp_dim], dim=-1)
        q, k, v = (t.unflatten(-1, (-1, self.head_dim)) for t in (q, k, v))  # (B, S, H, D)
        out = attention(rotate(self.norm_q(q), rope), rotate(self.norm_k(k), rope), v).flatten(2)  # (B, S, dim)
        return self.to_out(torch.cat([out, swiglu(mlp)], dim=-1))


class Flux2SingleBlock(nn.Module):
    """Parallel attention + SwiGLU MLP over the joint [txt, img] sequence, modulated by the shared single-stream
    modulation."""

    def __init__(self, c: Flux2Config):
        super().__init__()
        self.eps = c.eps
        self.attn = ParallelAttention(c.inner_dim, c.attention_head_dim, c.mlp_dim, c.eps)

    def forward(self, x: torch.Tensor, mod: Mod, rope: Rope) -> torch.Tensor:
        """x (B, T+L, dim), mod the 3 (B, 1, dim) modulations -> same shape as x."""
        shift, scale, gate = mod
        return _clip_fp16(x + gate * self.attn(modulate(x, shift, scale, self.eps), rope))


# ---------------------------------------------------------------- model


class Flux2Transformer(nn.Module):
    def __init__(self, config: Flux2Config):
        super().__init__()
        self.config = c = config
        dim = c.inner_dim
        self.out_channels = c.out_channels or c.in_channels
        self.time_guidance_embed = TimeGuidanceEmbed(c.timestep_guidance_channels, dim, c.guidance_embeds)
        self.double_stream_modulation_img = Modulation(dim, 2)
        self.double_stream_modulation_txt = Modulation(dim, 2)
        self.single_stream_modulation = Modulation(dim, 1)
        self.x_embedder = nn.Linear(c.in_channels, dim, bias=False)
        self.context_embedder = nn.Linear(c.joint_attention_dim, dim, bias=False)
        self.transformer_blocks = nn.ModuleList([Flux2DoubleBlock(c) for _ in range(c.num_layers)])
        self.single_transformer_blocks = nn.ModuleList([Flux2SingleBlock(c) for _ in range(c.num_single_layers)])
        self.norm_out = AdaNormOut(dim, bias=False, eps=c.eps)
        self.proj_out = nn.Linear(dim, c.patch_size**2 * self.out_channels, bias=False)

    def rope(self, txt_ids: torch.Tensor, img_ids: torch.Tensor) -> Rope:
        """(cos, sin) for the joint sequence [txt, img], each (T+L, head_dim / 2)."""
        return rope_from_ids(torch.cat([txt_ids, img_ids], dim=0), self.config.axes_dims_rope, self.config.rope_theta)

    def forward(
        self,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        timestep: torch.Tensor,
        img_ids: torch.Tensor,
        txt_ids: torch.Tensor,
        guidance: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """hidden_states (B, L, in_channels) packed latents (the noise tokens, then any reference image's),
        encoder_hidden_states (B, T, joint_attention_dim), timestep (B,) in [0, 1], img_ids (L, 4) and txt_ids
        (T, 4) positions (time, row, column, text index; (B, S, 4) is read from its first entry), guidance (B,) for
        a guidance-distilled model ([dev]) -> (B, L, out_channels)."""
        if self.config.guidance_embeds and guidance is None:
            raise ValueError("guidance is None, but this model has guidance_embeds=True (FLUX.2 [dev]): pass guidance")
        if not self.config.guidance_embeds and guidance is not None:
            raise ValueError("guidance was given, but this model has guidance_embeds=False (FLUX.2 [klein])")
        img_ids, txt_ids = unbatch_ids(img_ids, "img_ids"), unbatch_ids(txt_ids, "txt_ids")
        rope = self.rope(txt_ids, img_ids)

        t = timestep.to(hidden_states.dtype) * 1000
        g = guidance.to(hidden_states.dtype) * 1000 if guidance is not None else None
        temb = self.time_guidance_embed(t, g)  # (B, dim)
        mod_img = self.double_stream_modulation_img(temb)
        mod_txt = self.double_stream_modulation_txt(temb)
        mod_single = self.single_stream_modulation(temb)

        img = self.x_embedder(hidden_states)  # (B, L, dim)
        txt = self.context_embedder(encoder_hidden_states)  # (B, T, dim)
        for block in self.transformer_blocks:
            img, txt = block(img, txt, mod_img, mod_txt, rope)
        x = torch.cat([txt, img], dim=1)  # (B, T+L, dim)
        for block in self.single_transformer_blocks:
            x = block(x, mod_single, rope)
        img = x[:, txt.shape[1]:]  # (B, L, dim)
        return self.proj_out(self.norm_out(img, temb))  # (B, L, out_channels)
