"""Qwen-Image 2.1's single-stream, block-causal diffusion transformer (diffusers' QwenImage21Transformer2DModel, same
checkpoint keys).

The reference runs one joint sequence [prefix, target]: the prefix is the Qwen3-VL prompt states with each condition
image's latent tokens dropped into the vision slots the encoder reserved for it (one slot = 2x2 latent tokens), the
target image's tokens follow. Attention is block-causal: the prefix is causal except inside an image block, which is
bidirectional, and the target attends to everything. The prefix therefore never sees the target, and with
`causal_condition` (prefix tokens modulated at t = 0) its activations do not depend on the step. So the model has two
entry points: `encode_prefix` runs the prefix through every block once and returns its keys and values per block (the
reference's KV cache, a `Prefix`), and `forward` runs the target tokens against them each step, returning the target
tokens' prediction (the reference returns the whole joint sequence; only the target rows are ever read).

Not the text encoder, the VAE or the sampling loop (pipelines/qwen_image21.py).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils import _pytree

from gen.models.attention import attention
from gen.models.layers import MLPEmbedder, RMSNorm, project, timestep_embedding
from gen.models.qwen_image import _axis_angles, _centered, _image_angles, _per_sample_shapes, rotate

SLOT_TOKENS = 4  # latent tokens behind one vision slot of the encoder (a 2x2 group)


@dataclass(frozen=True)
class QwenImage21Config:
    patch_size: int = 1
    in_channels: int = 64
    out_channels: int | None = 64
    num_layers: int = 32
    attention_head_dim: int = 128
    num_attention_heads: int = 32
    context_in_dim: int = 4096
    mlp_ratio: int = 3
    axes_dims_rope: tuple[int, ...] = (16, 56, 56)
    eps: float = 1e-6
    causal_condition: bool = True  # prefix tokens modulated at t = 0 (their keys / values are step-independent)

    def __post_init__(self):
        if self.patch_size != 1:
            raise ValueError(f"Qwen-Image 2.1 takes latents unpatched: patch_size must be 1, got {self.patch_size}")
        assert len(self.axes_dims_rope) == 3, self.axes_dims_rope
        assert all(d % 2 == 0 for d in self.axes_dims_rope), self.axes_dims_rope
        assert sum(self.axes_dims_rope) == self.attention_head_dim, (self.axes_dims_rope, self.attention_head_dim)

    @property
    def inner_dim(self) -> int:
        return self.num_attention_heads * self.attention_head_dim


@dataclass(eq=False)
class Prefix:
    """What the target image attends to, from `encode_prefix`: the prefix's keys and values at every block ((B or 1, P,
    H, D) each, RoPE applied), which of its keys are real ((B or 1, P) bool; None: all), the RoPE position the target's
    frame axis takes, and the timestep its modulation used (None: t = 0, `causal_condition`)."""

    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    key_valid: torch.Tensor | None
    position: int
    timestep: torch.Tensor | None = None

    @property
    def batch(self) -> int:
        return self.keys[0].shape[0]


# a pytree node, so that code flattening a call's arguments (CUDA-graph capture, torch.compile) sees its tensors
_pytree.register_dataclass(Prefix)


# ---------------------------------------------------------------- positions

def _shapes(img_shapes, batch: int) -> list[tuple[int, int, int]]:
    """The per-sample list [(1, h, w) of each condition image..., (1, h, w) of the target], shared by the batch."""
    shapes = _per_sample_shapes(img_shapes, batch)
    if any(f != 1 for f, _, _ in shapes):
        raise ValueError(f"Qwen-Image 2.1 images have one frame each, got img_shapes {shapes}")
    return shapes


def prefix_layout(is_image: list[bool], shapes: list[tuple[int, int, int]]):
    """Per prefix token: its image block (-1 for text) and its (frame, height, width) RoPE position; and the position
    the next block (the target) takes.

    Text advances one position on all three axes; an image block sits at the frame position reached by the text before
    it, its height and width centred on zero, and moves the position on by max(h, w)."""
    assert sum(is_image) == sum(h * w for _, h, w in shapes), (sum(is_image), shapes)
    ids, pos = [], []
    position, block, left, grid, frame = 0, -1, 0, [], 0
    for img in is_image:
        if not img:
            ids.append(-1)
            pos.append((position, position, position))
            position += 1
            continue
        if left == 0:  # the next image block starts
            block += 1
            _, h, w = shapes[block]
            grid = [(y, x) for y in _centered(h, "cpu").tolist() for x in _centered(w, "cpu").tolist()]
            left, frame = h * w, position
            position += max(h, w)
        ids.append(block)
        pos.append((frame, *grid[len(grid) - left]))
        left -= 1
    return ids, pos, position


def segments(ids: list[int]) -> list[tuple[int, int, bool]]:
    """(start, end, is_text) runs of equal block ids: the prefix's text runs and image blocks in order."""
    runs, start = [], 0
    for i in range(1, len(ids) + 1):
        if i == len(ids) or ids[i] != ids[start]:
            runs.append((start, i, ids[start] < 0))
            start = i
    return runs


def angles_at(pos: torch.Tensor, axes: tuple[int, ...]) -> torch.Tensor:
    """(N, 3) integer (frame, height, width) positions -> (N, head_dim / 2) rotation angles, fp32."""
    return torch.cat([_axis_angles(pos[:, i], d) for i, d in enumerate(axes)], dim=-1)


# ---------------------------------------------------------------- attention

def _causal_tail(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_valid: torch.Tensor | None) -> torch.Tensor:
    """The last Lq of Lk positions attending causally: query i sees keys 0 .. Lk - Lq + i (and only `key_valid` ones).
    (B, L, H, D) in and out. Plain SDPA with an explicit mask: the attention backends take key masks only, and text
    runs are short and run once per generation."""
    lq, lk = q.shape[1], k.shape[1]
    mask = torch.ones(lq, lk, dtype=torch.bool, device=q.device).tril(lk - lq)[None, None]  # (1, 1, Lq, Lk)
    if key_valid is not None:
        mask = mask & key_valid[:, None, None, :].bool()
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask)
    return out.transpose(1, 2)


def block_causal_attention(q, k, v, runs: list[tuple[int, int, bool]], key_valid: torch.Tensor | None) -> torch.Tensor:
    """The prefix's attention (B, P, H, D) under the block-causal mask, one call per run: a run's queries see every key
    before it and its own (an image block all of them, a text run causally); keys not `key_valid` are never seen."""
    outs = []
    for start, end, is_text in runs:
        valid = None if key_valid is None else key_valid[:, :end]
        if is_text:
            outs.append(_causal_tail(q[:, start:end], k[:, :end], v[:, :end], valid))
        else:
            outs.append(attention(q[:, start:end], k[:, :end], v[:, :end], valid))
    return torch.cat(outs, dim=1)


# ---------------------------------------------------------------- layers

class ZeroCenteredRMSNorm(nn.Module):
    """RMSNorm whose checkpoint weight stores scale - 1; fp32 math."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.zeros(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return (h * (self.weight.float() + 1)).to(x.dtype)


class TextProjection(nn.Module):
    """Encoder states -> model width: zero-centred RMSNorm, Linear, GELU (tanh), Linear; no biases."""

    def __init__(self, in_dim: int, dim: int, eps: float):
        super().__init__()
        self.text_norm = ZeroCenteredRMSNorm(in_dim, eps)
        self.in_layer = nn.Linear(in_dim, dim, bias=False)
        self.out_layer = nn.Linear(dim, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out_layer(F.gelu(self.in_layer(self.text_norm(x)), approximate="tanh"))


class TimeEmbed(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.timestep_embedder = MLPEmbedder(256, dim, bias=False)

    def forward(self, t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """t (N,) in [0, 1] -> (N, dim); scaled by 1000 in fp32 before the frequencies, as the reference does."""
        return self.timestep_embedder(timestep_embedding(1000.0 * t.float(), 256).to(dtype))


class SwiGLU(nn.Module):
    def __init__(self, dim: int, inner: int):
        super().__init__()
        self.proj = nn.Linear(dim, inner, bias=False)
        self.gate_layer = nn.Linear(dim, inner, bias=False)
        self.out = nn.Linear(inner, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = project(x, self.gate_layer, self.proj)
        return self.out(F.silu(gate) * up)


class Attention(nn.Module):
    """q / k / v projections (no biases), q / k RMSNorm per head, RoPE; the attention itself is the caller's."""

    def __init__(self, dim: int, heads: int, head_dim: int, eps: float):
        super().__init__()
        self.head_dim = head_dim
        inner = heads * head_dim
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_k = nn.Linear(dim, inner, bias=False)
        self.to_v = nn.Linear(dim, inner, bias=False)
        self.to_out = nn.ModuleList([nn.Linear(inner, dim, bias=False)])
        self.norm_q, self.norm_k = RMSNorm(head_dim, eps), RMSNorm(head_dim, eps)

    def qkv(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """x (B, L, D) -> q, k, v (B, L, H, head_dim), q and k normed and rotated."""
        q, k, v = (t.unflatten(-1, (-1, self.head_dim)) for t in project(x, self.to_q, self.to_k, self.to_v))
        q = rotate(self.norm_q(q).to(v.dtype), cos, sin)
        k = rotate(self.norm_k(k).to(v.dtype), cos, sin)
        return q, k, v

    def out(self, o: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return self.to_out[0](o.flatten(2).to(dtype))


class QwenImage21Block(nn.Module):
    """Single-stream block; its scales and gates come from the model's one shared modulation (no weights here)."""

    joinable = (("attn.to_q", "attn.to_k", "attn.to_v"), ("img_mlp.gate_layer", "img_mlp.proj"))

    def __init__(self, cfg: QwenImage21Config):
        super().__init__()
        dim = cfg.inner_dim
        self.eps = cfg.eps
        self.attn = Attention(dim, cfg.num_attention_heads, cfg.attention_head_dim, cfg.eps)
        self.img_mlp = SwiGLU(dim, dim * cfg.mlp_ratio)

    def _ln(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, x.shape[-1:], eps=self.eps)

    def _run(self, x, mod, cos, sin, attend) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        scale1, gate1, scale2, gate2 = mod[:, None].chunk(4, dim=-1)  # (B or 1, 1, D) each
        q, k, v = self.attn.qkv(self._ln(x) * (1 + scale1), cos, sin)
        x = x + gate1.tanh() * self.attn.out(attend(q, k, v), q.dtype)
        x = x + gate2.tanh() * self.img_mlp(self._ln(x) * (1 + scale2))
        if x.dtype == torch.float16:
            x = x.clip(-65504, 65504)
        return x, k, v

    def forward(self, x, mod, cos, sin, prefix_k, prefix_v, key_mask):
        """Target tokens x (B, L, D) -> (B, L, D): they attend to the prefix's keys / values (B or 1, P, H, hd) and to
        each other; mod (B, 4D) their modulation; key_mask (B, P + L) bool or None."""
        b = x.shape[0]

        def attend(q, k, v):
            keys = torch.cat([prefix_k.expand(b, -1, -1, -1), k], dim=1)
            values = torch.cat([prefix_v.expand(b, -1, -1, -1), v], dim=1)
            return attention(q, keys, values, key_mask)

        return self._run(x, mod, cos, sin, attend)[0]

    def forward_prefix(self, x, mod, cos, sin, runs, key_valid):
        """Prefix tokens x (B, P, D) -> (x, k, v): the block's output and the keys / values the target reads."""
        return self._run(x, mod, cos, sin, lambda q, k, v: block_causal_attention(q, k, v, runs, key_valid))


class ScaleNormOut(nn.Module):
    """Final LayerNorm (no affine) times (1 + scale) projected from the time embedding; no shift, no bias."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.linear = nn.Linear(dim, dim, bias=False)

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        scale = self.linear(F.silu(temb).to(x.dtype))[:, None]  # (B, 1, D)
        return F.layer_norm(x, x.shape[-1:], eps=self.eps) * (1 + scale)


class QwenImage21Transformer(nn.Module):
    def __init__(self, cfg: QwenImage21Config):
        super().__init__()
        self.config = cfg
        dim = cfg.inner_dim
        self.out_channels = cfg.out_channels or cfg.in_channels
        self.time_text_embed = TimeEmbed(dim)
        self.txt_in = TextProjection(cfg.context_in_dim, dim, cfg.eps)
        self.img_in = nn.Linear(cfg.in_channels, dim, bias=False)
        self.modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 4 * dim, bias=False))
        self.transformer_blocks = nn.ModuleList([QwenImage21Block(cfg) for _ in range(cfg.num_layers)])
        self.norm_out = ScaleNormOut(dim, cfg.eps)
        self.proj_out = nn.Linear(dim, self.out_channels, bias=False)

    def _modulation(self, t: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """(time embedding (N, D), the blocks' shared modulation (N, 4D)) at t (N,) in [0, 1]."""
        temb = self.time_text_embed(t.to(dtype), dtype)
        return temb, self.modulation(temb)

    def encode_prefix(
        self,
        encoder_hidden_states: torch.Tensor,
        img_mask: torch.Tensor,
        img_shapes,
        encoder_hidden_states_mask: torch.Tensor | None = None,
        condition: torch.Tensor | None = None,
        timestep: torch.Tensor | None = None,
    ) -> Prefix:
        """The prefix's keys and values at every block.

        encoder_hidden_states (B, T, context_in_dim): the encoder's states of the prompt (and condition images);
        img_mask (B, >= T) bool: True at the encoder's image slots (entries past T, the reference's slots for the
        target, are not read; samples share the layout of row 0); img_shapes: per sample [(1, h, w) of each condition
        image..., (1, h, w) of the target]; encoder_hidden_states_mask (B, T) (1 = real token) or None; condition
        (B, L_c, in_channels): the condition images' latent tokens in img_shapes order; timestep (B,) in [0, 1]: only
        without causal_condition, where the prefix is modulated at the step's t instead of 0."""
        b, t_len, _ = encoder_hidden_states.shape
        cond_shapes = _shapes(img_shapes, b)[:-1]
        if img_mask.shape[0] not in (1, b) or img_mask.shape[1] < t_len:
            raise ValueError(f"img_mask shape {tuple(img_mask.shape)} does not cover {b} texts of {t_len} tokens")
        slots = img_mask[0, :t_len].bool()
        n_cond, n_slots = sum(h * w for _, h, w in cond_shapes), int(slots.sum())
        if n_cond != SLOT_TOKENS * n_slots:
            raise ValueError(f"condition img_shapes {cond_shapes} hold {n_cond} latent tokens; the encoder reserved "
                             f"{n_slots} image slots ({SLOT_TOKENS * n_slots} tokens)")
        if n_cond and (condition is None or condition.shape[:2] != (b, n_cond)):
            got = None if condition is None else tuple(condition.shape)
            raise ValueError(f"condition must be (B={b}, {n_cond}, C) latent tokens for img_shapes {cond_shapes}, got {got}")
        if self.config.causal_condition != (timestep is None):
            raise ValueError("encode_prefix takes a timestep exactly when the model has causal_condition=False "
                             f"(causal_condition={self.config.causal_condition}, timestep given: {timestep is not None})")
        repeats = torch.where(slots, SLOT_TOKENS, 1)
        is_image = slots.repeat_interleave(repeats)  # (P,)
        x = self.txt_in(encoder_hidden_states).repeat_interleave(repeats, dim=1)  # (B, P, D)
        ids, pos, position = prefix_layout(is_image.tolist(), cond_shapes)
        if n_cond:
            x[:, is_image] = self.img_in(condition)
        key_valid = None
        if encoder_hidden_states_mask is not None:
            if encoder_hidden_states_mask.shape != (b, t_len):
                raise ValueError(f"encoder_hidden_states_mask shape {tuple(encoder_hidden_states_mask.shape)} != "
                                 f"{(b, t_len)}")
            key_valid = torch.ones(b, x.shape[1], dtype=torch.bool, device=x.device)
            key_valid[:, ~is_image] = encoder_hidden_states_mask.bool()[:, ~slots]
        ang = angles_at(torch.tensor(pos, device=x.device), self.config.axes_dims_rope)  # (P, hd / 2)
        cos, sin = ang.cos(), ang.sin()
        t = x.new_zeros(1) if timestep is None else timestep
        _, mod = self._modulation(t, x.dtype)
        runs = segments(ids)
        keys, values = [], []
        for block in self._modules["transformer_blocks"]:  # the blocks themselves, whatever wraps the target loop
            x, k, v = block.forward_prefix(x, mod, cos, sin, runs, key_valid)
            keys.append(k)
            values.append(v)
        return Prefix(keys, values, key_valid, position, None if timestep is None else timestep.clone())

    def target_rope(self, height: int, width: int, position: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        """(cos, sin) (h*w, head_dim / 2) of the target image's tokens."""
        ang = _image_angles(torch.tensor([position], device=device), height, width, self.config.axes_dims_rope)
        return ang.cos(), ang.sin()

    def forward(self, hidden_states: torch.Tensor, encoder_hidden_states: Prefix, timestep: torch.Tensor,
                img_shapes) -> torch.Tensor:
        """hidden_states (B, h*w, in_channels) the target image's latent tokens; encoder_hidden_states the encoded
        condition (`encode_prefix`: the prompt, and the condition images, as keys and values per block); timestep (B,)
        in [0, 1]; img_shapes as for encode_prefix (the last entry is the target's) -> (B, h*w, out_channels)."""
        prefix = encoder_hidden_states
        if not isinstance(prefix, Prefix):
            raise TypeError(f"encoder_hidden_states must be the Prefix encode_prefix returns, got {type(prefix).__name__}")
        b, l, _ = hidden_states.shape
        _, h, w = _shapes(img_shapes, b)[-1]
        if l != h * w:
            raise ValueError(f"the target's img_shapes entry {(1, h, w)} holds {h * w} tokens, hidden_states has {l}")
        if prefix.batch not in (1, b) or len(prefix.keys) != len(self.transformer_blocks):
            raise ValueError(f"the prefix (batch {prefix.batch}, {len(prefix.keys)} blocks) does not fit a batch of "
                             f"{b} on {len(self.transformer_blocks)} blocks")
        if not self.config.causal_condition and (prefix.timestep is None or not torch.equal(prefix.timestep, timestep)):
            raise ValueError("without causal_condition the prefix depends on the step: encode it at this timestep")
        x = self.img_in(hidden_states)  # (B, L, D)
        cos, sin = self.target_rope(h, w, prefix.position, x.device)
        temb, mod = self._modulation(timestep, x.dtype)  # (B, D), (B, 4D)
        key_mask = None
        if prefix.key_valid is not None:
            key_mask = torch.cat([prefix.key_valid.expand(b, -1), prefix.key_valid.new_ones(b, x.shape[1])], dim=1)
        for block, k, v in zip(self.transformer_blocks, prefix.keys, prefix.values):
            x = block(x, mod, cos, sin, k, v, key_mask)
        return self.proj_out(self.norm_out(x, temb))  # (B, L, out_channels)
