"""Z-Image's single-stream diffusion transformer (diffusers' ZImageTransformer2DModel, same checkpoint keys), its
text-to-image path: one latent image and one caption per sample. Not the omni path (SigLIP features, several images),
the Qwen3 text encoder or the sampling loop (pipelines/z_image.py).

Latent patches are embedded and refined alone (`noise_refiner`, modulated by the timestep), caption features are
embedded and refined alone (`context_refiner`, unmodulated), then both run through `layers` as one sequence. Each run
of tokens is padded to a multiple of 32 with a learned pad token that is attended like any other token. Positions are
3D (frame, row, column): caption token k sits at (1 + k, 0, 0), image patch (row, col) at (caption run + 1, row, col),
image pad tokens at (0, 0, 0). The joint sequence is [caption, image] here where diffusers builds [image, caption]:
every token carries its own rotary position, so attention does not depend on the order, and the caption then leads as
the text does in our other DiTs (sequence-parallel ranks hold it whole).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from gen.models.attention import attention
from gen.models.layers import RMSNorm, apply_rope, project, timestep_embedding

SEQ_MULTIPLE = 32  # image and caption runs are padded to a multiple of this many tokens
ADALN_DIM = 256  # width of the time embedding the modulations read (min(dim, 256))
PATCH, F_PATCH = 2, 1  # the (spatial, frame) patch sizes the text-to-image path uses
KEY = f"{PATCH}-{F_PATCH}"  # their entry in all_x_embedder / all_final_layer

Rope = tuple[torch.Tensor, torch.Tensor]  # (cos, sin), each (B or 1, S, head_dim / 2) float32


def padded_length(n: int) -> int:
    """`n` tokens rounded up to the multiple of 32 the model pads each run to."""
    return -(-n // SEQ_MULTIPLE) * SEQ_MULTIPLE


@dataclass(frozen=True)
class ZImageConfig:
    """Fields = the keys of a diffusers `ZImageTransformer2DModel` config.json (defaults = diffusers' class defaults;
    Z-Image-Turbo's config.json has axes_lens (1536, 512, 512))."""

    all_patch_size: tuple[int, ...] = (2,)
    all_f_patch_size: tuple[int, ...] = (1,)
    in_channels: int = 16
    dim: int = 3840
    n_layers: int = 30
    n_refiner_layers: int = 2
    n_heads: int = 30
    n_kv_heads: int = 30  # read, not used: diffusers' attention has n_heads key/value heads as well
    norm_eps: float = 1e-5
    qk_norm: bool = True
    cap_feat_dim: int = 2560
    siglip_feat_dim: int | None = None  # the omni variant's SigLIP input: not supported
    rope_theta: float = 256.0
    t_scale: float = 1000.0
    axes_dims: tuple[int, ...] = (32, 48, 48)
    axes_lens: tuple[int, ...] = (1024, 512, 512)

    def __post_init__(self):
        for name in ("all_patch_size", "all_f_patch_size"):  # some configs write a single int
            if isinstance(getattr(self, name), int):
                object.__setattr__(self, name, (getattr(self, name),))
        if self.dim % self.n_heads:
            raise ValueError(f"dim={self.dim} is not a multiple of n_heads={self.n_heads}")
        if len(self.axes_dims) != 3 or len(self.axes_lens) != 3:
            raise ValueError(f"axes_dims={self.axes_dims} and axes_lens={self.axes_lens} must have 3 entries each")
        if sum(self.axes_dims) != self.head_dim or any(d % 2 for d in self.axes_dims):
            raise ValueError(f"axes_dims={self.axes_dims} must be even and sum to the head dim {self.head_dim}")
        if len(self.all_patch_size) != len(self.all_f_patch_size):
            raise ValueError(f"all_patch_size={self.all_patch_size} and all_f_patch_size={self.all_f_patch_size} "
                             "must have the same length")
        if KEY not in self.patch_keys:
            raise ValueError(f"patch sizes {self.patch_keys} lack the ({PATCH}, {F_PATCH}) pair text-to-image uses")
        if self.siglip_feat_dim is not None:
            raise ValueError(f"siglip_feat_dim={self.siglip_feat_dim}: the Z-Image omni variant is not supported")

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def patch_keys(self) -> list[str]:
        return [f"{p}-{f}" for p, f in zip(self.all_patch_size, self.all_f_patch_size)]


# ---------------------------------------------------------------- RoPE (3 axes, theta 256)


def _angles(pos: torch.Tensor, dim: int, theta: float) -> torch.Tensor:
    """Angles of integer positions `pos` (..., S) on one axis of `dim` channels -> (..., S, dim / 2) float32: the
    product taken in float64 (float32 where the device has no float64) and rounded once, as diffusers' table."""
    fdtype = torch.float32 if pos.device.type in ("mps", "npu") else torch.float64
    freqs = 1.0 / theta ** (torch.arange(0, dim, 2, dtype=fdtype, device=pos.device) / dim)
    return (pos.to(fdtype)[..., None] * freqs).float()


def rope_table(ids: tuple[torch.Tensor, torch.Tensor, torch.Tensor], c: ZImageConfig) -> Rope:
    """(cos, sin) for per-axis positions `ids` (each (..., S), broadcastable) -> each (..., S, head_dim / 2)."""
    angles = [_angles(p, d, c.rope_theta) for p, d in zip(torch.broadcast_tensors(*ids), c.axes_dims)]
    angle = torch.cat(angles, dim=-1)
    return angle.cos(), angle.sin()


# ---------------------------------------------------------------- layers


class TimestepEmbedder(nn.Module):
    """sin/cos(t) (256) -> Linear -> SiLU -> Linear (`mlp.0`, `mlp.2`)."""

    def __init__(self, out_dim: int, mid_dim: int = 1024, freq_dim: int = 256):
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, mid_dim), nn.SiLU(), nn.Linear(mid_dim, out_dim))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.mlp(timestep_embedding(t, self.freq_dim).to(self.mlp[0].weight.dtype))


class Attention(nn.Module):
    """Self-attention without biases: q/k RMSNorm (eps 1e-5) per head, RoPE, one output projection."""

    def __init__(self, dim: int, heads: int, qk_norm: bool):
        super().__init__()
        self.heads = heads
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_k = nn.Linear(dim, dim, bias=False)
        self.to_v = nn.Linear(dim, dim, bias=False)
        self.norm_q = RMSNorm(dim // heads, eps=1e-5) if qk_norm else None
        self.norm_k = RMSNorm(dim // heads, eps=1e-5) if qk_norm else None
        self.to_out = nn.ModuleList([nn.Linear(dim, dim, bias=False)])

    def forward(self, x: torch.Tensor, rope: Rope, mask: torch.Tensor | None) -> torch.Tensor:
        """x (B, S, dim), rope each (B or 1, S, D/2), mask (B, S) bool keys to attend or None -> (B, S, dim)."""
        q, k, v = (t.unflatten(-1, (self.heads, -1)) for t in project(x, self.to_q, self.to_k, self.to_v))  # (B,S,H,D)
        if self.norm_q is not None:
            q, k = self.norm_q(q), self.norm_k(k)
        cos, sin = (t[:, :, None] for t in rope)  # (B or 1, S, 1, D/2)
        out = attention(apply_rope(q, cos, sin), apply_rope(k, cos, sin), v, mask)  # (B, S, H, D)
        return self.to_out[0](out.flatten(2))


class SwiGLU(nn.Module):
    """w2(SiLU(w1 x) * w3 x), no biases."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)
        self.w3 = nn.Linear(dim, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = project(x, self.w1, self.w3)
        return self.w2(F.silu(gate) * up)


class ZImageBlock(nn.Module):
    """Attention and SwiGLU feed-forward, each between two RMSNorms; with modulation (`adaLN_modulation`), the
    normed inputs are scaled by 1 + scale and the branch outputs gated by tanh(gate), both from the time embedding."""

    joinable = (("attention.to_q", "attention.to_k", "attention.to_v"), ("feed_forward.w1", "feed_forward.w3"))

    def __init__(self, c: ZImageConfig, modulation: bool):
        super().__init__()
        dim = c.dim
        self.attention = Attention(dim, c.n_heads, c.qk_norm)
        self.feed_forward = SwiGLU(dim, int(dim / 3 * 8))
        self.attention_norm1 = RMSNorm(dim, eps=c.norm_eps)
        self.ffn_norm1 = RMSNorm(dim, eps=c.norm_eps)
        self.attention_norm2 = RMSNorm(dim, eps=c.norm_eps)
        self.ffn_norm2 = RMSNorm(dim, eps=c.norm_eps)
        self.adaLN_modulation = nn.Sequential(nn.Linear(min(dim, ADALN_DIM), 4 * dim)) if modulation else None

    def forward(self, x: torch.Tensor, rope: Rope, temb: torch.Tensor | None = None,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, S, dim), temb (B, min(dim, 256)) for a modulated block -> (B, S, dim)."""
        if self.adaLN_modulation is None:
            x = x + self.attention_norm2(self.attention(self.attention_norm1(x), rope, mask))
            return x + self.ffn_norm2(self.feed_forward(self.ffn_norm1(x)))
        scale_a, gate_a, scale_f, gate_f = self.adaLN_modulation(temb)[:, None].chunk(4, dim=-1)  # (B, 1, dim) each
        attn = self.attention(self.attention_norm1(x) * (1 + scale_a), rope, mask)
        x = x + gate_a.tanh() * self.attention_norm2(attn)
        return x + gate_f.tanh() * self.ffn_norm2(self.feed_forward(self.ffn_norm1(x) * (1 + scale_f)))


class ZImageJointBlock(ZImageBlock):
    """A main layer: the modulated block over the joint [caption, image] sequence, taking and returning the two runs
    separately (the step cache follows the image run; sequence-parallel ranks shard only the image run)."""

    def forward(self, img: torch.Tensor, txt: torch.Tensor, rope: Rope, temb: torch.Tensor,
                mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """img (B, N, dim), txt (B, T, dim), rope over the T + N joint positions -> (img, txt)."""
        x = super().forward(torch.cat([txt, img], dim=1), rope, temb, mask)  # (B, T+N, dim)
        return x[:, txt.shape[1]:], x[:, : txt.shape[1]]


class FinalLayer(nn.Module):
    """LayerNorm (no affine, eps 1e-6) scaled by 1 + Linear(SiLU(temb)), then the patch projection."""

    def __init__(self, dim: int, out_dim: int):
        super().__init__()
        self.linear = nn.Linear(dim, out_dim)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(min(dim, ADALN_DIM), dim))

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        scale = 1 + self.adaLN_modulation(temb)[:, None]  # (B, 1, dim)
        return self.linear(F.layer_norm(x, x.shape[-1:], eps=1e-6) * scale)


# ---------------------------------------------------------------- model


class ZImageTransformer(nn.Module):
    def __init__(self, config: ZImageConfig):
        super().__init__()
        self.config = c = config
        pairs = list(zip(c.all_patch_size, c.all_f_patch_size))
        self.all_x_embedder = nn.ModuleDict({f"{p}-{f}": nn.Linear(f * p * p * c.in_channels, c.dim) for p, f in pairs})
        self.all_final_layer = nn.ModuleDict({f"{p}-{f}": FinalLayer(c.dim, p * p * f * c.in_channels)
                                              for p, f in pairs})
        self.noise_refiner = nn.ModuleList([ZImageBlock(c, modulation=True) for _ in range(c.n_refiner_layers)])
        self.context_refiner = nn.ModuleList([ZImageBlock(c, modulation=False) for _ in range(c.n_refiner_layers)])
        self.t_embedder = TimestepEmbedder(min(c.dim, ADALN_DIM))
        self.cap_embedder = nn.Sequential(RMSNorm(c.cap_feat_dim, eps=c.norm_eps), nn.Linear(c.cap_feat_dim, c.dim))
        self.x_pad_token = nn.Parameter(torch.zeros(1, c.dim))
        self.cap_pad_token = nn.Parameter(torch.zeros(1, c.dim))
        self.layers = nn.ModuleList([ZImageJointBlock(c, modulation=True) for _ in range(c.n_layers)])

    # ---- the inputs as token runs (methods, so that sequence-parallel plans can shard their results)

    def embed_image(self, x: torch.Tensor) -> torch.Tensor:
        """Latents (B, C, H, W) -> patch tokens (B, N', dim), N = H/2 * W/2 padded to N' with the learned pad token."""
        b, ch, h, w = x.shape
        p = PATCH
        tokens = x.view(b, ch, h // p, p, w // p, p).permute(0, 2, 4, 3, 5, 1)  # (B, H/2, W/2, 2, 2, C)
        img = self.all_x_embedder[KEY](tokens.reshape(b, (h // p) * (w // p), p * p * ch))  # (B, N, dim)
        n = img.shape[1]
        pad = self.x_pad_token.to(img.dtype).expand(b, padded_length(n) - n, -1)
        return torch.cat([img, pad], dim=1)

    def embed_caption(self, feats: torch.Tensor, mask: torch.Tensor | None):
        """Caption features (B, L, cap_feat_dim) and their mask (B, L) (1 = real token, right-padded) or None ->
        tokens (B, T, dim) with T = L rounded up to 32, the keys to attend (B, T) bool or None (all of them), and each
        caption's padded length ((B,) tensor, or an int when all are equal). Tokens past a caption's end, up to its
        padded length, are the learned pad token."""
        b, l, _ = feats.shape
        t = padded_length(l)
        x = F.pad(self.cap_embedder(feats), (0, 0, 0, t - l))  # (B, T, dim)
        pos = torch.arange(t, device=feats.device)
        if mask is None:
            lengths, padded, keep = l, t, None
        else:
            lengths = mask.to(torch.long).sum(dim=1, keepdim=True)  # (B, 1)
            padded = (lengths + SEQ_MULTIPLE - 1) // SEQ_MULTIPLE * SEQ_MULTIPLE
            keep = pos < padded  # (B, T)
        is_pad = (pos >= lengths) & (pos < padded)  # (B, T) or (T,)
        x = torch.where(is_pad[..., None], self.cap_pad_token.to(x.dtype), x)
        return x, keep, padded if mask is None else padded[:, 0]

    def image_rope(self, caption_len: int | torch.Tensor, h: int, w: int) -> Rope:
        """(cos, sin) of an h x w patch grid following captions padded to `caption_len` (int, or (B,) per sample):
        each (1 or B, N', D/2); the pad tokens after the N = h * w patches sit at (0, 0, 0)."""
        c, n = self.config, h * w
        if h >= c.axes_lens[1] or w >= c.axes_lens[2]:
            raise ValueError(f"a {h} x {w} patch grid exceeds the model's {c.axes_lens[1:]} positions")
        device = self.x_pad_token.device
        real = torch.arange(padded_length(n), device=device) < n  # (N',)
        index = torch.arange(n, device=device)
        rows = F.pad(index // w, (0, padded_length(n) - n))
        cols = F.pad(index % w, (0, padded_length(n) - n))
        if isinstance(caption_len, int):  # no host-to-device copy (CUDA-graph capture forbids it)
            frame = (real * (caption_len + 1))[None]  # (1, N')
        else:
            frame = real * (caption_len[:, None] + 1)  # (B, N')
        return rope_table((frame, rows, cols), c)

    def caption_rope(self, t: int) -> Rope:
        """(cos, sin) of a caption run of `t` tokens, each (1, T, D/2): token k at (1 + k, 0, 0)."""
        if t + 1 >= self.config.axes_lens[0]:
            raise ValueError(f"a caption of {t} tokens (padded) exceeds the model's {self.config.axes_lens[0]} "
                             "positions on the first axis")
        pos = torch.arange(1, t + 1, device=self.x_pad_token.device)[None]  # (1, T)
        return rope_table((pos, pos * 0, pos * 0), self.config)

    def forward(
        self,
        hidden_states: torch.Tensor,
        timestep: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        encoder_hidden_states_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """hidden_states (B, C, H, W) latents, timestep (B,) the scheduler's timestep in [0, 1000] (1000 = pure noise;
        the model is conditioned on (1000 - timestep) / 1000, 1 = clean, computed as the reference pipeline computes
        it), encoder_hidden_states (B, L, cap_feat_dim), encoder_hidden_states_mask (B, L) (1 = real token,
        right-padded) or None -> the model output (B, C, H, W) (the pipeline negates it into the velocity)."""
        c = self.config
        b, ch, h, w = hidden_states.shape
        if ch != c.in_channels or h % PATCH or w % PATCH:
            raise ValueError(f"hidden_states {tuple(hidden_states.shape)}: expected (B, {c.in_channels}, H, W) with H "
                             f"and W multiples of {PATCH}")
        if encoder_hidden_states.shape[0] != b or encoder_hidden_states.shape[-1] != c.cap_feat_dim:
            raise ValueError(f"encoder_hidden_states {tuple(encoder_hidden_states.shape)}: expected ({b}, L, "
                             f"{c.cap_feat_dim})")
        gh, gw = h // PATCH, w // PATCH
        clean = (1000 - timestep) / 1000  # (B,) 1 = clean
        temb = self.t_embedder(clean * c.t_scale).to(hidden_states.dtype)  # (B, min(dim, 256))
        txt, keep, caption_len = self.embed_caption(encoder_hidden_states, encoder_hidden_states_mask)
        img = self.embed_image(hidden_states)  # (B, N', dim)
        img_rope = self.image_rope(caption_len, gh, gw)
        txt_rope = self.caption_rope(txt.shape[1])

        for block in self.noise_refiner:
            img = block(img, img_rope, temb)
        for block in self.context_refiner:
            txt = block(txt, txt_rope, None, keep)

        rope = tuple(torch.cat([tr.expand(ir.shape[0], -1, -1), ir], dim=1) for tr, ir in zip(txt_rope, img_rope))
        mask = None if keep is None else torch.cat([keep, keep.new_ones(b, img.shape[1])], dim=1)  # (B, T+N')
        for block in self.layers:
            img, txt = block(img, txt, rope, temb, mask)

        out = self.all_final_layer[KEY](img, temb)[:, : gh * gw]  # (B, N, 4 * C)
        out = out.reshape(b, gh, gw, PATCH, PATCH, ch).permute(0, 5, 1, 3, 2, 4)  # (B, C, H/2, 2, W/2, 2)
        return out.reshape(b, ch, h, w)
