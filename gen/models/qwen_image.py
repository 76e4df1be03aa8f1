"""Qwen-Image's dual-stream diffusion transformer (diffusers' QwenImageTransformer2DModel, same checkpoint keys).

Not the text encoder, the VAE or the sampling loop: those live in `pipelines/qwen_image.py`.
"""
from __future__ import annotations

from dataclasses import dataclass
from math import prod

import torch
import torch.nn as nn
import torch.nn.functional as F

from gen.models.attention import attention
from gen.models.layers import (AdaNormOut, FeedForward, MLPEmbedder, RMSNorm, apply_rope, norm_rope, project,
                               timestep_embedding)


@dataclass(frozen=True)
class QwenImageConfig:
    patch_size: int = 2
    in_channels: int = 64
    out_channels: int | None = 16
    num_layers: int = 60
    attention_head_dim: int = 128
    num_attention_heads: int = 24
    joint_attention_dim: int = 3584
    guidance_embeds: bool = False
    axes_dims_rope: tuple[int, ...] = (16, 56, 56)
    zero_cond_t: bool = False  # edit-2511 layout: reference-image tokens are modulated with t = 0
    use_additional_t_cond: bool = False  # layered layout: a learned 2-way embedding added to the time embedding
    use_layer3d_rope: bool = False  # layered layout: the last image (the condition) sits at frame index -1

    def __post_init__(self):
        assert len(self.axes_dims_rope) == 3, self.axes_dims_rope
        assert all(d % 2 == 0 for d in self.axes_dims_rope), self.axes_dims_rope
        assert sum(self.axes_dims_rope) == self.attention_head_dim, (self.axes_dims_rope, self.attention_head_dim)

    @property
    def inner_dim(self) -> int:
        return self.num_attention_heads * self.attention_head_dim


# ---------------------------------------------------------------- RoPE (3 axes: frame, height, width)

def _axis_angles(pos: torch.Tensor, dim: int, theta: float = 10000) -> torch.Tensor:
    """Rotation angles for integer positions `pos` (N,) on one axis of `dim` channels -> (N, dim // 2), fp32."""
    inv_freq = 1.0 / torch.pow(theta, torch.arange(0, dim, 2, device=pos.device).to(torch.float32).div(dim))
    return pos.to(torch.float32)[:, None] * inv_freq[None, :]


def _centered(n: int, device: torch.device) -> torch.Tensor:
    """Positions -(n - n//2) .. n//2 - 1: an axis of n tokens centred on zero (Qwen's `scale_rope`)."""
    return torch.arange(-(n - n // 2), n // 2, device=device)


def _image_angles(frame_pos: torch.Tensor, height: int, width: int, axes: tuple[int, ...]) -> torch.Tensor:
    """Angles for one latent image of `frame_pos` (F,) frames x height x width tokens -> (F*H*W, head_dim // 2)."""
    device, f = frame_pos.device, frame_pos.shape[0]
    a_f = _axis_angles(frame_pos, axes[0])[:, None, None, :].expand(f, height, width, -1)
    a_h = _axis_angles(_centered(height, device), axes[1])[None, :, None, :].expand(f, height, width, -1)
    a_w = _axis_angles(_centered(width, device), axes[2])[None, None, :, :].expand(f, height, width, -1)
    return torch.cat([a_f, a_h, a_w], dim=-1).reshape(f * height * width, -1)


def qwen_rope(
    shapes: list[tuple[int, int, int]], txt_len: int, axes: tuple[int, ...], layer3d: bool, device: torch.device
) -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """(cos, sin) for the image tokens (sum F*H*W, D/2) and the text tokens (txt_len, D/2).

    Image i sits at frame index i (the last one at -1 in the layered layout); height and width are centred;
    text continues on all three axes right after the largest half-extent of any image.
    """
    img, max_index = [], 0
    for i, (f, h, w) in enumerate(shapes):
        is_condition = layer3d and i == len(shapes) - 1
        frame_pos = torch.full((f,), -1, device=device) if is_condition else torch.arange(i, i + f, device=device)
        img.append(_image_angles(frame_pos, h, w, axes))
        max_index = max(max_index, h // 2, w // 2)
    if layer3d:
        max_index = max(max_index, len(shapes) - 1)
    txt_pos = torch.arange(max_index, max_index + txt_len, device=device)
    txt = torch.cat([_axis_angles(txt_pos, d) for d in axes], dim=-1)
    img = torch.cat(img, dim=0)
    return (img.cos(), img.sin()), (txt.cos(), txt.sin())


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (B, L, H, D) rotated by angles given as cos / sin (L, D/2)."""
    return apply_rope(x, cos[None, :, None, :], sin[None, :, None, :])


# ---------------------------------------------------------------- layers

class TimeTextEmbed(nn.Module):
    def __init__(self, dim: int, use_additional_t_cond: bool):
        super().__init__()
        self.timestep_embedder = MLPEmbedder(256, dim)
        if use_additional_t_cond:
            self.addition_t_embedding = nn.Embedding(2, dim)

    def forward(self, t: torch.Tensor, dtype: torch.dtype, additional_t_cond: torch.Tensor | None) -> torch.Tensor:
        # t in [0, 1] scaled by 1000; the frequencies rounded to t's dtype, as the reference does
        emb = self.timestep_embedder(timestep_embedding(t, scale=1000.0, freqs_dtype=t.dtype).to(dtype))  # (B, D)
        if hasattr(self, "addition_t_embedding"):
            if additional_t_cond is None:
                raise ValueError("this model has use_additional_t_cond=True: pass additional_t_cond (B,) in {0, 1}")
            emb = emb + self.addition_t_embedding(additional_t_cond).to(dtype)
        return emb


class JointAttention(nn.Module):
    """Attention over the concatenation [txt, img]: per-stream q/k/v projections, q/k RMSNorm, RoPE on both."""

    rope_norms = ("norm_q", "norm_k", "norm_added_q", "norm_added_k")  # gen/transforms/norm_rope.py

    def __init__(self, dim: int, heads: int, head_dim: int):
        super().__init__()
        self.heads, self.head_dim = heads, head_dim
        inner = heads * head_dim
        self.to_q, self.to_k, self.to_v = nn.Linear(dim, inner), nn.Linear(dim, inner), nn.Linear(dim, inner)
        self.add_q_proj, self.add_k_proj, self.add_v_proj = nn.Linear(dim, inner), nn.Linear(dim, inner), nn.Linear(dim, inner)
        self.norm_q, self.norm_k = RMSNorm(head_dim), RMSNorm(head_dim)
        self.norm_added_q, self.norm_added_k = RMSNorm(head_dim), RMSNorm(head_dim)
        self.to_out = nn.ModuleList([nn.Linear(inner, dim)])
        self.to_add_out = nn.Linear(inner, dim)

    def forward(self, img: torch.Tensor, txt: torch.Tensor, mask: torch.Tensor | None, rope) -> tuple[torch.Tensor, torch.Tensor]:
        (img_cos, img_sin), (txt_cos, txt_sin) = rope
        split = lambda x: x.unflatten(-1, (-1, self.head_dim))  # (B, L, H, D)
        q, k, v = (split(t) for t in project(img, self.to_q, self.to_k, self.to_v))
        tq, tk, tv = (split(t) for t in project(txt, self.add_q_proj, self.add_k_proj, self.add_v_proj))
        q = norm_rope((self.norm_added_q, tq, txt_cos, txt_sin), (self.norm_q, q, img_cos, img_sin))  # (B, T+L, H, D)
        k = norm_rope((self.norm_added_k, tk, txt_cos, txt_sin), (self.norm_k, k, img_cos, img_sin))
        out = attention(q, k, torch.cat([tv, v], 1), mask)  # (B, T+L, H, D)
        out = out.flatten(2).to(q.dtype)
        t = txt.shape[1]
        return self.to_out[0](out[:, t:]), self.to_add_out(out[:, :t])


def modulate(x: torch.Tensor, params: torch.Tensor, index: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """x (B, L, D) -> (x * (1 + scale) + shift, gate). params is (B, 3D), or (2B, 3D) with index (B, L) in {0, 1}
    choosing per token between the first half (the real t) and the second half (t = 0)."""
    shift, scale, gate = params[:, None].chunk(3, dim=-1)  # (B or 2B, 1, D) each
    if index is not None:
        b, sel = x.shape[0], (index == 0)[..., None]  # (B, L, 1)
        shift, scale, gate = (torch.where(sel, p[:b], p[b:]) for p in (shift, scale, gate))
    return x * (1 + scale) + shift, gate


class QwenImageTransformerBlock(nn.Module):
    joinable = (("attn.to_q", "attn.to_k", "attn.to_v"), ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"))

    def __init__(self, cfg: QwenImageConfig):
        super().__init__()
        dim = cfg.inner_dim
        self.zero_cond_t = cfg.zero_cond_t
        self.img_mod = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))
        self.txt_mod = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))
        self.attn = JointAttention(dim, cfg.num_attention_heads, cfg.attention_head_dim)
        self.img_mlp = FeedForward(dim, 4 * dim)
        self.txt_mlp = FeedForward(dim, 4 * dim)

    def forward(self, img, txt, mask, temb, rope, mod_index):
        ln = lambda x: F.layer_norm(x, x.shape[-1:], eps=1e-6)
        img_mod1, img_mod2 = self.img_mod(temb).chunk(2, dim=-1)  # (B or 2B, 3D) each
        txt_temb = temb.chunk(2, dim=0)[0] if self.zero_cond_t else temb
        txt_mod1, txt_mod2 = self.txt_mod(txt_temb).chunk(2, dim=-1)

        img_x, img_gate = modulate(ln(img), img_mod1, mod_index)
        txt_x, txt_gate = modulate(ln(txt), txt_mod1, None)
        img_attn, txt_attn = self.attn(img_x, txt_x, mask, rope)
        img = img + img_gate * img_attn
        txt = txt + txt_gate * txt_attn

        img_x, img_gate = modulate(ln(img), img_mod2, mod_index)
        img = img + img_gate * self.img_mlp(img_x)
        txt_x, txt_gate = modulate(ln(txt), txt_mod2, None)
        txt = txt + txt_gate * self.txt_mlp(txt_x)
        if img.dtype == torch.float16:
            img, txt = img.clip(-65504, 65504), txt.clip(-65504, 65504)
        return img, txt


def _per_sample_shapes(img_shapes, batch: int) -> list[tuple[int, int, int]]:
    """Normalize `img_shapes` (one entry per sample: an (F, H, W) or a list of them) to the shared list of shapes."""
    if not isinstance(img_shapes, (list, tuple)) or len(img_shapes) == 0:
        raise ValueError(f"img_shapes must be a non-empty list (one entry per sample), got {img_shapes!r}")
    is_shape = lambda s: isinstance(s, (list, tuple)) and len(s) > 0 and isinstance(s[0], int)
    samples = [[tuple(s)] if is_shape(s) else [tuple(x) for x in s] for s in img_shapes]
    if any(s != samples[0] for s in samples):
        raise ValueError(f"img_shapes must be the same for every sample in the batch, got {img_shapes!r}")
    if len(samples) not in (1, batch):
        raise ValueError(f"img_shapes has {len(samples)} entries for a batch of {batch}")
    if any(len(s) != 3 for s in samples[0]):
        raise ValueError(f"each image shape must be (frames, height, width), got {samples[0]!r}")
    return samples[0]


class QwenImageTransformer(nn.Module):
    def __init__(self, cfg: QwenImageConfig):
        super().__init__()
        self.config = cfg
        dim = cfg.inner_dim
        self.out_channels = cfg.out_channels or cfg.in_channels
        self.time_text_embed = TimeTextEmbed(dim, cfg.use_additional_t_cond)
        self.txt_norm = RMSNorm(cfg.joint_attention_dim)
        self.img_in = nn.Linear(cfg.in_channels, dim)
        self.txt_in = nn.Linear(cfg.joint_attention_dim, dim)
        self.transformer_blocks = nn.ModuleList([QwenImageTransformerBlock(cfg) for _ in range(cfg.num_layers)])
        self.norm_out = AdaNormOut(dim)
        self.proj_out = nn.Linear(dim, cfg.patch_size * cfg.patch_size * self.out_channels)

    def rope(self, img_shapes, txt_len: int, device: torch.device):
        """((cos, sin) for image tokens, (cos, sin) for text tokens); computed once per forward."""
        return qwen_rope(img_shapes, txt_len, self.config.axes_dims_rope, self.config.use_layer3d_rope, device)

    def time_embedding(self, timestep: torch.Tensor, additional_t_cond: torch.Tensor | None,
                       dtype: torch.dtype) -> torch.Tensor:
        """temb of a call's timestep (B,) in [0, 1] (and additional_t_cond (B,) for the layered layout); `dtype`: the
        image tokens' dtype. (B, D), or (2B, D) with zero_cond_t: the rows at t, then the rows at t = 0."""
        t = timestep.to(dtype)
        if self.config.zero_cond_t:  # first image at t, reference images at t = 0
            t = torch.cat([t, t * 0], dim=0)  # (2B,)
        return self.time_text_embed(t, dtype, additional_t_cond)

    def forward(
        self,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        encoder_hidden_states_mask: torch.Tensor | None,
        timestep: torch.Tensor,
        img_shapes,
        txt_seq_lens: list[int] | None = None,
        guidance: torch.Tensor | None = None,
        additional_t_cond: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """hidden_states (B, L, C) packed latents (target then reference images), encoder_hidden_states (B, T, D),
        encoder_hidden_states_mask (B, T) (1 = real token) or None, timestep (B,) in [0, 1] -> (B, L, p*p*out)."""
        b, l, _ = hidden_states.shape
        t_len = encoder_hidden_states.shape[1]
        if guidance is not None:
            raise ValueError("guidance embedding is not supported by QwenImageTransformer2DModel; pass guidance=None")
        if txt_seq_lens is not None and (len(txt_seq_lens) != b or max(txt_seq_lens) > t_len):
            raise ValueError(f"txt_seq_lens {txt_seq_lens} does not fit a batch of {b} texts of {t_len} tokens")
        shapes = _per_sample_shapes(img_shapes, b)
        if sum(prod(s) for s in shapes) != l:
            raise ValueError(f"img_shapes {shapes} hold {sum(prod(s) for s in shapes)} tokens, hidden_states has {l}")
        mask = None
        if encoder_hidden_states_mask is not None:
            if encoder_hidden_states_mask.shape != (b, t_len):
                raise ValueError(f"encoder_hidden_states_mask shape {tuple(encoder_hidden_states_mask.shape)} != {(b, t_len)}")
            img_keys = torch.ones(b, l, dtype=torch.bool, device=hidden_states.device)
            mask = torch.cat([encoder_hidden_states_mask.to(torch.bool), img_keys], dim=1)  # (B, T+L) keys [txt, img]

        img = self.img_in(hidden_states)  # (B, L, D)
        txt = self.txt_in(self.txt_norm(encoder_hidden_states))  # (B, T, D)
        mod_index = None
        if self.config.zero_cond_t:  # first image at t, reference images at t = 0
            first = prod(shapes[0])
            mod_index = (torch.arange(l, device=img.device) >= first).to(torch.int)[None].expand(b, l)  # (B, L)
        temb = self.time_embedding(timestep, additional_t_cond, img.dtype)  # (B or 2B, D)
        rope = self.rope(shapes, t_len, img.device)

        for block in self.transformer_blocks:
            img, txt = block(img, txt, mask, temb, rope, mod_index)

        if self.config.zero_cond_t:
            temb = temb.chunk(2, dim=0)[0]
        return self.proj_out(self.norm_out(img, temb))  # (B, L, p*p*out)
