"""Qwen2.5-VL: the Qwen2 text decoder with M-RoPE (3D position ids) and its windowed-attention vision tower; images only, no video."""
from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from gen.config import config_from_dict
from gen.llm.models.llama import (KVCache, LlamaConfig, LlamaForCausalLM, LlamaModel, RMSNorm, cos_sin, rope_inv_freq, rope_scale,
                                  rotate_half)


@dataclass
class VisionConfig:
    depth: int = 32
    hidden_size: int = 1280
    intermediate_size: int = 3420
    num_heads: int = 16
    out_hidden_size: int = 3584
    in_channels: int = 3
    patch_size: int = 14
    temporal_patch_size: int = 2
    spatial_merge_size: int = 2
    window_size: int = 112
    fullatt_block_indexes: tuple = (7, 15, 23, 31)
    hidden_act: str = "silu"
    rope_theta: float = 10000.0

    def __post_init__(self):
        if self.hidden_act != "silu":
            raise ValueError(f"vision hidden_act {self.hidden_act!r} is not supported (only 'silu')")
        assert self.hidden_size % self.num_heads == 0, (self.hidden_size, self.num_heads)


@dataclass
class Qwen2_5_VLConfig:
    text: LlamaConfig = field(default_factory=LlamaConfig)
    vision: VisionConfig = field(default_factory=VisionConfig)
    mrope_section: tuple = (16, 24, 24)  # rotary pairs given to the (t, h, w) position axes
    image_token_id: int = 151655

    def __post_init__(self):
        assert sum(self.mrope_section) == self.text.head_dim // 2, (self.mrope_section, self.text.head_dim)

    @classmethod
    def from_hf(cls, d: dict) -> "Qwen2_5_VLConfig":
        text = {**d, **d.get("text_config", {})}
        rope = {**(text.get("rope_scaling") or {}), **(text.get("rope_parameters") or {})}
        return cls(text=LlamaConfig.from_hf(text), vision=config_from_dict(VisionConfig, d.get("vision_config", {})),
                   mrope_section=tuple(rope.get("mrope_section", (16, 24, 24))),
                   image_token_id=d.get("image_token_id", 151655))


# ---- vision tower ------------------------------------------------------------------------------------
class PatchEmbed(nn.Module):
    def __init__(self, c: VisionConfig):
        super().__init__()
        self.c = c
        k = (c.temporal_patch_size, c.patch_size, c.patch_size)
        self.proj = nn.Conv3d(c.in_channels, c.hidden_size, kernel_size=k, stride=k, bias=False)

    def forward(self, x):  # (N, C * tp * p * p) -> (N, E)
        c = self.c
        x = x.view(-1, c.in_channels, c.temporal_patch_size, c.patch_size, c.patch_size).to(self.proj.weight.dtype)
        return self.proj(x).view(-1, c.hidden_size)


def apply_rope_vision(x, cos, sin):
    """x (N, H, D) rotated in fp32; cos/sin (N, D)."""
    cos, sin = cos[:, None].float(), sin[:, None].float()
    xf = x.float()
    return (xf * cos + rotate_half(xf) * sin).to(x.dtype)


class VisionAttention(nn.Module):
    def __init__(self, c: VisionConfig):
        super().__init__()
        self.h, self.d = c.num_heads, c.hidden_size // c.num_heads
        self.qkv = nn.Linear(c.hidden_size, 3 * c.hidden_size, bias=True)
        self.proj = nn.Linear(c.hidden_size, c.hidden_size)

    def forward(self, x, cos, sin, mask):  # x (N, C), mask (N, N) block-diagonal
        n = x.shape[0]
        q, k, v = self.qkv(x).view(n, 3, self.h, self.d).unbind(1)  # (N, H, D) each
        q, k = apply_rope_vision(q, cos, sin), apply_rope_vision(k, cos, sin)
        o = F.scaled_dot_product_attention(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), attn_mask=mask)  # (H, N, D)
        return self.proj(o.transpose(0, 1).reshape(n, -1))


class VisionMLP(nn.Module):
    def __init__(self, c: VisionConfig):
        super().__init__()
        self.gate_proj = nn.Linear(c.hidden_size, c.intermediate_size)
        self.up_proj = nn.Linear(c.hidden_size, c.intermediate_size)
        self.down_proj = nn.Linear(c.intermediate_size, c.hidden_size)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class VisionBlock(nn.Module):
    def __init__(self, c: VisionConfig):
        super().__init__()
        self.norm1 = RMSNorm(c.hidden_size, 1e-6)
        self.norm2 = RMSNorm(c.hidden_size, 1e-6)
        self.attn = VisionAttention(c)
        self.mlp = VisionMLP(c)

    def forward(self, x, cos, sin, mask):
        x = x + self.attn(self.norm1(x), cos, sin, mask)
        return x + self.mlp(self.norm2(x))


class PatchMerger(nn.Module):
    def __init__(self, c: VisionConfig):
        super().__init__()
        self.dim = c.hidden_size * c.spatial_merge_size**2
        self.ln_q = RMSNorm(c.hidden_size, 1e-6)
        self.mlp = nn.Sequential(nn.Linear(self.dim, self.dim), nn.GELU(), nn.Linear(self.dim, c.out_hidden_size))

    def forward(self, x):  # (N, C) -> (N / merge^2, out)
        return self.mlp(self.ln_q(x).view(-1, self.dim))


def segment_mask(cu_seqlens: list[int], device) -> torch.Tensor:
    """Bool (N, N): token i sees token j iff they lie in the same [cu[s], cu[s+1]) segment."""
    lengths = torch.tensor([b - a for a, b in zip(cu_seqlens[:-1], cu_seqlens[1:])], device=device)
    seg = torch.repeat_interleave(torch.arange(len(lengths), device=device), lengths)
    return seg[:, None] == seg[None, :]


class VisionTransformer(nn.Module):
    def __init__(self, c: VisionConfig):
        super().__init__()
        self.c = c
        self.patch_embed = PatchEmbed(c)
        self.blocks = nn.ModuleList(VisionBlock(c) for _ in range(c.depth))
        self.merger = PatchMerger(c)

    def layout(self, grid_thw: list[list[int]], device):
        """Per-patch (h, w) positions (N, 2) in merge-block order, the window order of merge units, window and frame bounds."""
        c, m = self.c, self.c.spatial_merge_size
        win = c.window_size // m // c.patch_size  # window side in merged units
        pos, order, cu_win, cu_full, base = [], [], [0], [0], 0
        for t, h, w in grid_thw:
            hh, ww = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
            blocks = lambda a: a.reshape(h // m, m, w // m, m).transpose(1, 2).flatten()  # noqa: E731
            pos.append(torch.stack([blocks(hh), blocks(ww)], -1).repeat(t, 1))  # (t*h*w, 2)
            gh, gw = h // m, w // m
            idx = torch.arange(t * gh * gw).view(t, gh, gw)
            ph, pw = -gh % win, -gw % win
            idx = F.pad(idx, (0, pw, 0, ph), value=-1).view(t, (gh + ph) // win, win, (gw + pw) // win, win)
            idx = idx.permute(0, 1, 3, 2, 4).reshape(t, -1, win * win)  # (t, windows, units)
            for window in idx.flatten(0, 1):
                units = window[window >= 0]
                if len(units):
                    order.append(units + base)
                    cu_win.append(cu_win[-1] + len(units) * m * m)
            base += t * gh * gw
            start = cu_full[-1]
            cu_full.extend(start + h * w * (i + 1) for i in range(t))  # each frame attends within itself
        return torch.cat(pos).to(device), torch.cat(order).to(device), cu_win, cu_full

    def rope(self, pos):
        """cos, sin (N, head_dim): half the rotary pairs follow h, half follow w."""
        d = self.c.hidden_size // self.c.num_heads // 2
        inv = 1.0 / (self.c.rope_theta ** (torch.arange(0, d, 2, dtype=torch.float, device=pos.device) / d))
        freqs = (pos[..., None].float() * inv).flatten(1)  # (N, 2 * d/2): [h freqs, w freqs]
        emb = torch.cat((freqs, freqs), -1)
        return emb.cos(), emb.sin()

    def forward(self, pixel_values, grid_thw):
        """pixel_values (N, C*tp*p*p) as the Qwen2-VL image processor flattens them, grid_thw (images, 3) -> (N / merge^2, out)."""
        grid = [[int(v) for v in row] for row in grid_thw.tolist()]
        pos, order, cu_win, cu_full = self.layout(grid, pixel_values.device)
        unit = self.c.spatial_merge_size**2
        x = self.patch_embed(pixel_values)
        n = x.shape[0]
        to_windows = lambda a: a.reshape(n // unit, unit, -1)[order].reshape(n, -1)  # noqa: E731
        x = to_windows(x)
        cos, sin = (to_windows(t) for t in self.rope(pos))
        full, window = segment_mask(cu_full, x.device), segment_mask(cu_win, x.device)
        for i, blk in enumerate(self.blocks):
            x = blk(x, cos, sin, full if i in self.c.fullatt_block_indexes else window)
        return self.merger(x)[torch.argsort(order)]


# ---- text decoder with M-RoPE ------------------------------------------------------------------------
class MRopeModel(LlamaModel):
    """The Qwen2 decoder; rope takes position ids (3, B, T) for (t, h, w), or (B, T) for text (all axes equal)."""

    def __init__(self, cfg: LlamaConfig, mrope_section: tuple):
        super().__init__(cfg)
        self.mrope_section = list(mrope_section)

    def rope(self, position_ids, dtype):
        if position_ids.dim() == 2:
            position_ids = position_ids[None].expand(3, -1, -1)
        freqs = position_ids[..., None].float() * rope_inv_freq(self.cfg, position_ids.device, position_ids)  # (3, B, T, D/2)
        freqs = torch.cat([f[i % 3] for i, f in enumerate(freqs.split(self.mrope_section, dim=-1))], dim=-1)  # (B, T, D/2)
        return cos_sin(freqs, rope_scale(self.cfg), dtype)


class Qwen2_5_VLForConditionalGeneration(LlamaForCausalLM):
    Config = Qwen2_5_VLConfig
    # transformers >= 4.52 names (in memory, and in checkpoints saved that way) -> the original checkpoint names we use
    checkpoint_key_map = {r"^model\.language_model\.": "model.", r"^model\.visual\.": "visual."}

    def __init__(self, config: Qwen2_5_VLConfig):
        nn.Module.__init__(self)
        self.config = config
        self.model = MRopeModel(config.text, config.mrope_section)
        self.visual = VisionTransformer(config.vision)
        self.lm_head = nn.Linear(config.text.hidden_size, config.text.vocab_size, bias=False)

    def new_cache(self, batch_size, max_len, device, dtype):
        c = self.config.text
        return KVCache(c.num_hidden_layers, batch_size, c.num_key_value_heads, max_len, c.head_dim, device, dtype)

    def forward(self, input_ids, position_ids, attention_mask, cache=None, cache_offset=0, output_hidden_states=False,
                pixel_values=None, image_grid_thw=None, num_layers: int | None = None):
        """As LlamaForCausalLM; with pixel_values, image-pad tokens take the vision features and positions become 3D."""
        x = self.model.embed_tokens(input_ids)  # (B, T, D)
        if pixel_values is not None:
            assert cache_offset == 0, "images are only supported in a prefill"
            image = self.visual(pixel_values, image_grid_thw).to(x.dtype)  # (tokens, D)
            slots = input_ids == self.config.image_token_id
            if int(slots.sum()) != image.shape[0]:
                raise ValueError(f"{int(slots.sum())} image tokens in the prompt but {image.shape[0]} image features")
            x = x.masked_scatter(slots[..., None], image)
            position_ids = self.rope_index(input_ids, attention_mask, image_grid_thw)
        return self.model(input_ids, position_ids, attention_mask, cache, cache_offset, output_hidden_states, inputs_embeds=x,
                          num_layers=num_layers)

    def rope_index(self, input_ids, attention_mask, image_grid_thw) -> torch.Tensor:
        """3D position ids (3, B, T): text counts on all axes; an image's tokens take (start, start+h, start+w) grid positions."""
        m = self.config.vision.spatial_merge_size
        grids = iter(image_grid_thw.tolist())
        out = torch.zeros(3, *input_ids.shape, dtype=torch.long, device=input_ids.device)
        for b in range(input_ids.shape[0]):
            real = attention_mask[b]
            is_image = (input_ids[b][real] == self.config.image_token_id).tolist()
            parts, cur = [], 0
            for image, group in itertools.groupby(is_image):
                n = len(list(group))
                if not image:
                    parts.append(torch.arange(cur, cur + n).expand(3, -1))
                    cur += n
                    continue
                t, h, w = next(grids)
                tt, hh, ww = torch.meshgrid(torch.arange(t), torch.arange(h // m), torch.arange(w // m), indexing="ij")
                grid = torch.stack([tt, hh, ww]).reshape(3, -1) + cur  # (3, t*h*w/m^2)
                assert grid.shape[1] == n, (grid.shape, n)
                parts.append(grid)
                cur += max(h, w) // m
            out[:, b, real] = torch.cat(parts, 1).to(out.device)
        return out
