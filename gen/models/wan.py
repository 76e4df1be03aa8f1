"""The Wan2.1 / Wan2.2 video DiT (diffusers' `WanTransformer3DModel` layout and keys); not the VAE, text encoder or sampler."""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from gen.models.attention import attention
from gen.models.layers import FeedForward, MLPEmbedder, apply_rope, project, timestep_embedding

Rope = tuple[torch.Tensor, torch.Tensor]  # cos, sin: each (1, L, 1, D/2) float32


@dataclass(frozen=True)
class WanConfig:
    patch_size: tuple[int, int, int] = (1, 2, 2)
    num_attention_heads: int = 40
    attention_head_dim: int = 128
    in_channels: int = 16
    out_channels: int | None = 16
    text_dim: int = 4096
    freq_dim: int = 256
    ffn_dim: int = 13824
    num_layers: int = 40
    cross_attn_norm: bool = True
    qk_norm: str | None = "rms_norm_across_heads"
    eps: float = 1e-6
    image_dim: int | None = None  # CLIP vision width (I2V); None for text-to-video
    added_kv_proj_dim: int | None = None  # image-token key/value projection input (I2V)
    rope_max_seq_len: int = 1024
    pos_embed_seq_len: int | None = None  # FLF2V: learned positions over both images' tokens

    def __post_init__(self):
        assert len(self.patch_size) == 3, self.patch_size
        if self.qk_norm != "rms_norm_across_heads":
            raise ValueError(f"qk_norm {self.qk_norm!r} is not supported (only 'rms_norm_across_heads')")
        if (self.image_dim is None) != (self.added_kv_proj_dim is None):
            raise ValueError(f"image_dim ({self.image_dim}) and added_kv_proj_dim ({self.added_kv_proj_dim}) "
                             "must be both set (I2V) or both None")

    @property
    def dim(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    @property
    def out_dim(self) -> int:
        return self.out_channels or self.in_channels


class FP32LayerNorm(nn.LayerNorm):
    """LayerNorm computed in fp32, returned in the input's dtype."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = None if self.weight is None else self.weight.float()
        b = None if self.bias is None else self.bias.float()
        return F.layer_norm(x.float(), self.normalized_shape, w, b, self.eps).to(x.dtype)


def rope_3d(head_dim: int, f: int, h: int, w: int, device: torch.device, theta: float = 10000.0) -> Rope:
    """Wan's 3D RoPE over an (f, h, w) token grid: head_dim split into time / height / width bands."""
    d_hw = 2 * (head_dim // 6)
    bands = []
    for d, n, axis in ((head_dim - 2 * d_hw, f, 0), (d_hw, h, 1), (d_hw, w, 2)):
        inv = 1.0 / theta ** (torch.arange(0, d, 2, dtype=torch.float64, device=device) / d)  # (d/2,)
        ang = torch.arange(n, dtype=torch.float64, device=device)[:, None] * inv  # (n, d/2)
        shape = [1, 1, 1, d // 2]
        shape[axis] = n
        bands.append(ang.view(shape).expand(f, h, w, d // 2))
    ang = torch.cat(bands, dim=-1).reshape(1, f * h * w, 1, head_dim // 2)  # (1, L, 1, D/2)
    return ang.cos().float(), ang.sin().float()


class ImageEmbedder(nn.Module):
    """CLIP image tokens -> model width: LayerNorm, GELU MLP, LayerNorm (fp32 norms)."""

    def __init__(self, d_in: int, dim: int, pos_embed_seq_len: int | None):
        super().__init__()
        self.norm1 = FP32LayerNorm(d_in)
        self.ff = FeedForward(d_in, d_in, dim, approximate="none")
        self.norm2 = FP32LayerNorm(dim)
        self.pos_embed = nn.Parameter(torch.zeros(1, pos_embed_seq_len, d_in)) if pos_embed_seq_len else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.pos_embed is not None:  # FLF2V: two images per sample, tokens joined
            x = x.reshape(-1, 2 * x.shape[1], x.shape[2]) + self.pos_embed  # (B, 2 * Li, Di)
        return self.norm2(self.ff(self.norm1(x)))


class ConditionEmbedder(nn.Module):
    def __init__(self, cfg: WanConfig):
        super().__init__()
        dim = cfg.dim
        self.freq_dim = cfg.freq_dim
        self.time_embedder = MLPEmbedder(cfg.freq_dim, dim)
        self.time_proj = nn.Linear(dim, 6 * dim)
        self.text_embedder = MLPEmbedder(cfg.text_dim, dim, functools.partial(F.gelu, approximate="tanh"))
        self.image_embedder = ImageEmbedder(cfg.image_dim, dim, cfg.pos_embed_seq_len) if cfg.image_dim else None

    def forward(self, t: torch.Tensor, text: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """t (B, Lt) with Lt = 1 or L -> temb (B, Lt, D), modulation (B, Lt, 6, D), text (B, T, D)."""
        B, Lt = t.shape
        emb = timestep_embedding(t.flatten(), self.freq_dim).unflatten(0, (B, Lt))  # (B, Lt, F)
        emb = emb.to(self.time_embedder.linear_1.weight.dtype)
        temb = self.time_embedder(emb).to(text.dtype)  # (B, Lt, D)
        mod = self.time_proj(F.silu(temb)).unflatten(-1, (6, -1))  # (B, Lt, 6, D)
        return temb, mod, self.text_embedder(text)


class WanAttention(nn.Module):
    """Multi-head attention with RMSNorm over all heads of q and k; optional extra image keys/values (I2V)."""

    def __init__(self, dim: int, heads: int, eps: float, added_kv_proj_dim: int | None = None):
        super().__init__()
        self.heads = heads
        self.to_q, self.to_k, self.to_v = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.to_out = nn.ModuleList([nn.Linear(dim, dim), nn.Identity()])
        self.norm_q, self.norm_k = nn.RMSNorm(dim, eps=eps), nn.RMSNorm(dim, eps=eps)
        if added_kv_proj_dim is not None:
            self.add_k_proj = nn.Linear(added_kv_proj_dim, dim)
            self.add_v_proj = nn.Linear(added_kv_proj_dim, dim)
            self.norm_added_k = nn.RMSNorm(dim, eps=eps)

    def forward(self, x: torch.Tensor, ctx: torch.Tensor | None = None, rope: Rope | None = None,
                ctx_img: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, L, D); ctx (B, T, D) for cross-attention (None: self-attention); ctx_img (B, Li, D)."""
        if ctx is None:
            q, k, v = project(x, self.to_q, self.to_k, self.to_v)
        else:
            q, (k, v) = self.to_q(x), project(ctx, self.to_k, self.to_v)
        q = self.norm_q(q).unflatten(-1, (self.heads, -1))  # (B, L, H, Dh)
        k = self.norm_k(k).unflatten(-1, (self.heads, -1))  # (B, T, H, Dh)
        v = v.unflatten(-1, (self.heads, -1))
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        out = attention(q, k, v).flatten(2).type_as(q)  # (B, L, D)
        if ctx_img is not None:
            k_img = self.norm_added_k(self.add_k_proj(ctx_img)).unflatten(-1, (self.heads, -1))
            v_img = self.add_v_proj(ctx_img).unflatten(-1, (self.heads, -1))
            out = out + attention(q, k_img, v_img).flatten(2).type_as(q)
        return self.to_out[0](out)


class WanBlock(nn.Module):
    """Modulated self-attention (3D RoPE), cross-attention to text (and image), modulated GELU FFN."""

    joinable = (("attn1.to_q", "attn1.to_k", "attn1.to_v"), ("attn2.to_k", "attn2.to_v"))

    def __init__(self, cfg: WanConfig):
        super().__init__()
        dim = cfg.dim
        self.norm1 = FP32LayerNorm(dim, cfg.eps, elementwise_affine=False)
        self.attn1 = WanAttention(dim, cfg.num_attention_heads, cfg.eps)
        self.attn2 = WanAttention(dim, cfg.num_attention_heads, cfg.eps, cfg.added_kv_proj_dim)
        self.norm2 = FP32LayerNorm(dim, cfg.eps) if cfg.cross_attn_norm else nn.Identity()
        self.norm3 = FP32LayerNorm(dim, cfg.eps, elementwise_affine=False)
        self.ffn = FeedForward(dim, cfg.ffn_dim, dim, approximate="tanh")
        self.scale_shift_table = nn.Parameter(torch.randn(1, 6, dim) / dim**0.5)

    def forward(self, x: torch.Tensor, text: torch.Tensor, mod: torch.Tensor, rope: Rope,
                img: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, L, D); mod (B, Lt, 6, D) with Lt = 1 or L; text (B, T, D); img (B, Li, D) or None."""
        shift, scale, gate, c_shift, c_scale, c_gate = (self.scale_shift_table[None] + mod.float()).unbind(2)
        h = (self.norm1(x.float()) * (1 + scale) + shift).type_as(x)
        x = (x.float() + self.attn1(h, rope=rope) * gate).type_as(x)
        x = x + self.attn2(self.norm2(x.float()).type_as(x), ctx=text, ctx_img=img)
        h = (self.norm3(x.float()) * (1 + c_scale) + c_shift).type_as(x)
        return (x.float() + self.ffn(h).float() * c_gate).type_as(x)


class WanTransformer(nn.Module):
    def __init__(self, cfg: WanConfig):
        super().__init__()
        self.config = cfg
        dim = cfg.dim
        self.patch_embedding = nn.Conv3d(cfg.in_channels, dim, kernel_size=cfg.patch_size, stride=cfg.patch_size)
        self.condition_embedder = ConditionEmbedder(cfg)
        self.blocks = nn.ModuleList([WanBlock(cfg) for _ in range(cfg.num_layers)])
        self.norm_out = FP32LayerNorm(dim, cfg.eps, elementwise_affine=False)
        self.proj_out = nn.Linear(dim, cfg.out_dim * math.prod(cfg.patch_size))
        self.scale_shift_table = nn.Parameter(torch.randn(1, 2, dim) / dim**0.5)

    def rope(self, grid: tuple[int, int, int], device: torch.device) -> Rope:
        return rope_3d(self.config.attention_head_dim, *grid, device=device)

    def forward(self, hidden_states: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor,
                encoder_hidden_states_image: torch.Tensor | None = None) -> torch.Tensor:
        """hidden_states (B, C, F, H, W); timestep (B,) or (B, L) per token; text (B, T, Dt); image (B, Li, Di)."""
        cfg = self.config
        B, _, F_, H, W = hidden_states.shape
        pt, ph, pw = cfg.patch_size
        grid = (F_ // pt, H // ph, W // pw)
        rope = self.rope(grid, hidden_states.device)

        x = self.patch_embedding(hidden_states).flatten(2).transpose(1, 2).contiguous()  # (B, L, D)
        t = timestep if timestep.ndim == 2 else timestep[:, None]  # (B, Lt)
        assert t.shape[1] in (1, x.shape[1]), (tuple(timestep.shape), x.shape)
        temb, mod, text = self.condition_embedder(t, encoder_hidden_states)
        img = None
        if encoder_hidden_states_image is not None:
            if self.condition_embedder.image_embedder is None:
                raise ValueError("encoder_hidden_states_image given to a Wan transformer without image_dim")
            img = self.condition_embedder.image_embedder(encoder_hidden_states_image)

        for block in self.blocks:
            x = block(x, text, mod, rope, img)

        shift, scale = (self.scale_shift_table[None] + temb[:, :, None]).unbind(2)  # (B, Lt, D) each
        x = (self.norm_out(x.float()) * (1 + scale) + shift).type_as(x)
        x = self.proj_out(x)  # (B, L, pt * ph * pw * C)
        return self.unpatchify(x, grid)

    def unpatchify(self, x: torch.Tensor, grid: tuple[int, int, int]) -> torch.Tensor:
        """(B, L, pt * ph * pw * C) -> (B, C, F, H, W)."""
        f, h, w = grid
        pt, ph, pw = self.config.patch_size
        x = x.reshape(x.shape[0], f, h, w, pt, ph, pw, -1)
        x = x.permute(0, 7, 1, 4, 2, 5, 3, 6)  # (B, C, f, pt, h, ph, w, pw)
        return x.reshape(x.shape[0], x.shape[1], f * pt, h * ph, w * pw)
