"""Qwen3-VL (Qwen-Image 2.1's text encoder): the Qwen3 text decoder with interleaved M-RoPE and DeepStack (vision
features of early vision blocks added to the image tokens' states after the first decoder layers), and its vision tower
(learned position grid resampled per image, full attention per frame); images only, no video."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from gen.config import config_from_dict
from gen.llm.models.llama import KVCache, LlamaConfig, LlamaModel, cos_sin, rope_inv_freq, rope_scale
from gen.llm.models.qwen2_5_vl import Qwen2_5_VLForConditionalGeneration, apply_rope_vision, segment_mask


@dataclass
class VisionConfig:
    depth: int = 27
    hidden_size: int = 1152
    hidden_act: str = "gelu_pytorch_tanh"
    intermediate_size: int = 4304
    num_heads: int = 16
    in_channels: int = 3
    patch_size: int = 16
    spatial_merge_size: int = 2
    temporal_patch_size: int = 2
    out_hidden_size: int = 3584
    num_position_embeddings: int = 2304
    deepstack_visual_indexes: tuple = (8, 16, 24)
    rope_theta: float = 10000.0

    def __post_init__(self):
        if self.hidden_act not in ("gelu_pytorch_tanh", "gelu"):
            raise ValueError(f"vision hidden_act {self.hidden_act!r} is not supported (gelu_pytorch_tanh, gelu)")
        assert self.hidden_size % self.num_heads == 0, (self.hidden_size, self.num_heads)
        side = int(self.num_position_embeddings**0.5)
        if side * side != self.num_position_embeddings:
            raise ValueError(f"num_position_embeddings {self.num_position_embeddings} is not a square grid")


@dataclass
class Qwen3VLConfig:
    text: LlamaConfig = field(default_factory=LlamaConfig)
    vision: VisionConfig = field(default_factory=VisionConfig)
    mrope_section: tuple = (24, 20, 20)  # rotary pairs of the (t, h, w) axes, interleaved t h w t h w ... t t
    image_token_id: int = 151655

    def __post_init__(self):
        assert sum(self.mrope_section) == self.text.head_dim // 2, (self.mrope_section, self.text.head_dim)
        if self.text.rope_type != "default":
            raise ValueError(f"Qwen3-VL with rope_type {self.text.rope_type!r} is not supported (default M-RoPE only)")

    @classmethod
    def from_hf(cls, d: dict) -> "Qwen3VLConfig":
        text = {**d, **d.get("text_config", {})}
        rope = {**(text.get("rope_scaling") or {}), **(text.get("rope_parameters") or {})}
        if rope.get("mrope_interleaved") is False:
            raise ValueError("Qwen3-VL with mrope_interleaved=False is not supported (its M-RoPE is interleaved)")
        v = dict(d.get("vision_config", {}))
        v.setdefault("rope_theta", (v.get("rope_parameters") or {}).get("rope_theta", 10000.0))
        return cls(text=LlamaConfig.from_hf(text), vision=config_from_dict(VisionConfig, v),
                   mrope_section=tuple(rope.get("mrope_section", (24, 20, 20))), image_token_id=d.get("image_token_id", 151655))


# ---- vision tower ------------------------------------------------------------------------------------
class PatchEmbed(nn.Module):
    def __init__(self, c: VisionConfig):
        super().__init__()
        self.c = c
        k = (c.temporal_patch_size, c.patch_size, c.patch_size)
        self.proj = nn.Conv3d(c.in_channels, c.hidden_size, kernel_size=k, stride=k, bias=True)

    def forward(self, x):  # (N, C * tp * p * p) -> (N, E)
        c = self.c
        x = x.view(-1, c.in_channels, c.temporal_patch_size, c.patch_size, c.patch_size).to(self.proj.weight.dtype)
        return self.proj(x).view(-1, c.hidden_size)


class VisionAttention(nn.Module):
    def __init__(self, c: VisionConfig):
        super().__init__()
        self.h, self.d = c.num_heads, c.hidden_size // c.num_heads
        self.qkv = nn.Linear(c.hidden_size, 3 * c.hidden_size, bias=True)
        self.proj = nn.Linear(c.hidden_size, c.hidden_size)

    def forward(self, x, cos, sin, mask):  # x (N, C), mask (N, N): each frame attends within itself
        n = x.shape[0]
        q, k, v = self.qkv(x).view(n, 3, self.h, self.d).unbind(1)  # (N, H, D) each
        q, k = apply_rope_vision(q, cos, sin), apply_rope_vision(k, cos, sin)
        o = F.scaled_dot_product_attention(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), attn_mask=mask)  # (H, N, D)
        return self.proj(o.transpose(0, 1).reshape(n, -1))


class VisionMLP(nn.Module):
    def __init__(self, c: VisionConfig):
        super().__init__()
        self.linear_fc1 = nn.Linear(c.hidden_size, c.intermediate_size)
        self.linear_fc2 = nn.Linear(c.intermediate_size, c.hidden_size)
        self.approximate = "tanh" if c.hidden_act == "gelu_pytorch_tanh" else "none"

    def forward(self, x):
        return self.linear_fc2(F.gelu(self.linear_fc1(x), approximate=self.approximate))


class VisionBlock(nn.Module):
    def __init__(self, c: VisionConfig):
        super().__init__()
        self.norm1 = nn.LayerNorm(c.hidden_size, eps=1e-6)
        self.norm2 = nn.LayerNorm(c.hidden_size, eps=1e-6)
        self.attn = VisionAttention(c)
        self.mlp = VisionMLP(c)

    def forward(self, x, cos, sin, mask):
        x = x + self.attn(self.norm1(x), cos, sin, mask)
        return x + self.mlp(self.norm2(x))


class PatchMerger(nn.Module):
    """Each spatial_merge_size^2 patches -> one token of out_hidden_size; DeepStack's mergers norm after the merge."""

    def __init__(self, c: VisionConfig, norm_after_merge: bool):
        super().__init__()
        self.dim, self.norm_after_merge = c.hidden_size * c.spatial_merge_size**2, norm_after_merge
        self.norm = nn.LayerNorm(self.dim if norm_after_merge else c.hidden_size, eps=1e-6)
        self.linear_fc1 = nn.Linear(self.dim, self.dim)
        self.linear_fc2 = nn.Linear(self.dim, c.out_hidden_size)

    def forward(self, x):  # (N, C) -> (N / merge^2, out)
        x = self.norm(x.view(-1, self.dim) if self.norm_after_merge else x).view(-1, self.dim)
        return self.linear_fc2(F.gelu(self.linear_fc1(x)))


def resample_taps(index: torch.Tensor, size: int, side: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Bilinear (align_corners) taps (n, 2) into a `side`-long grid for positions `index` (n,) of a `size`-long axis."""
    src = index.float() * (side - 1) / max(size - 1, 1)
    floor = src.floor()
    offsets = torch.arange(2, device=index.device)
    taps = (floor.long()[:, None] + offsets).clamp(0, side - 1)
    return taps, (1 - (src[:, None] - floor[:, None] - offsets).abs()).clamp(min=0)


class VisionTransformer(nn.Module):
    def __init__(self, c: VisionConfig):
        super().__init__()
        self.c = c
        self.patch_embed = PatchEmbed(c)
        self.pos_embed = nn.Embedding(c.num_position_embeddings, c.hidden_size)
        self.blocks = nn.ModuleList(VisionBlock(c) for _ in range(c.depth))
        self.merger = PatchMerger(c, norm_after_merge=False)
        self.deepstack_merger_list = nn.ModuleList(PatchMerger(c, True) for _ in c.deepstack_visual_indexes)

    def layout(self, grid_thw: list[list[int]], device):
        """Per-patch (h, w) grid positions (N, 2) in merge-block order, the learned-position taps (N, 4) and their
        weights (N, 4) (the square table resampled bilinearly to each image's h x w), and the frame bounds."""
        m, side = self.c.spatial_merge_size, int(self.c.num_position_embeddings**0.5)
        pos, taps, weights, cu = [], [], [], [0]
        for t, h, w in grid_thw:
            hh, ww = torch.meshgrid(torch.arange(h, device=device), torch.arange(w, device=device), indexing="ij")
            blocks = lambda a: a.reshape(h // m, m, w // m, m).transpose(1, 2).flatten()  # noqa: E731
            rows, cols = blocks(hh), blocks(ww)  # (h*w,) in merge-block order
            (th, wh), (tw, wtw) = resample_taps(rows, h, side), resample_taps(cols, w, side)
            taps.append((th[:, :, None] * side + tw[:, None, :]).reshape(-1, 4).repeat(t, 1))
            weights.append((wh[:, :, None] * wtw[:, None, :]).reshape(-1, 4).repeat(t, 1))
            pos.append(torch.stack([rows, cols], -1).repeat(t, 1))
            start = cu[-1]
            cu.extend(start + h * w * (i + 1) for i in range(t))  # each frame attends within itself
        return torch.cat(pos), torch.cat(taps), torch.cat(weights), cu

    def rope(self, pos):
        """cos, sin (N, head_dim): half the rotary pairs follow h, half follow w."""
        d = self.c.hidden_size // self.c.num_heads // 2
        inv = 1.0 / (self.c.rope_theta ** (torch.arange(0, d, 2, dtype=torch.float, device=pos.device) / d))
        freqs = (pos[..., None].float() * inv).flatten(1)  # (N, 2 * d/2): [h freqs, w freqs]
        emb = torch.cat((freqs, freqs), -1)
        return emb.cos(), emb.sin()

    def forward(self, pixel_values, grid_thw) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """pixel_values (N, C*tp*p*p) as the Qwen2-VL/Qwen3-VL image processor flattens them, grid_thw (images, 3) ->
        merged tokens (N / merge^2, out) and one DeepStack feature of that shape per deepstack_visual_indexes entry."""
        grid = [[int(v) for v in row] for row in grid_thw.tolist()]
        pos, taps, weights, cu = self.layout(grid, pixel_values.device)
        x = self.patch_embed(pixel_values)
        x = x + (self.pos_embed(taps) * weights[:, :, None]).sum(1).to(x.dtype)  # (N, C)
        cos, sin = self.rope(pos)
        mask = segment_mask(cu, x.device)
        deep = []
        for i, blk in enumerate(self.blocks):
            x = blk(x, cos, sin, mask)
            if i in self.c.deepstack_visual_indexes:
                deep.append(self.deepstack_merger_list[self.c.deepstack_visual_indexes.index(i)](x))
        return self.merger(x), deep


# ---- text decoder with interleaved M-RoPE --------------------------------------------------------------
class InterleavedMRopeModel(LlamaModel):
    """The Qwen3 decoder; rope takes position ids (3, B, T) for (t, h, w), or (B, T) for text (all axes equal). Rotary
    pair j follows axis h when j % 3 == 1 and j < 3 * sections[1], w when j % 3 == 2 and j < 3 * sections[2], else t."""

    def __init__(self, cfg: LlamaConfig, mrope_section: tuple):
        super().__init__(cfg)
        self.mrope_section = tuple(mrope_section)

    def rope(self, position_ids, dtype):
        if position_ids.dim() == 2:
            position_ids = position_ids[None].expand(3, -1, -1)
        freqs = position_ids[..., None].float() * rope_inv_freq(self.cfg, position_ids.device, position_ids)  # (3, B, T, D/2)
        axis = torch.zeros(freqs.shape[-1], dtype=torch.long, device=freqs.device)  # which position axis each pair follows
        axis[1 : 3 * self.mrope_section[1] : 3] = 1
        axis[2 : 3 * self.mrope_section[2] : 3] = 2
        freqs = freqs.gather(0, axis.expand(1, *freqs.shape[1:]))[0]  # (B, T, D/2)
        return cos_sin(freqs, rope_scale(self.cfg), dtype)


class Qwen3VLForConditionalGeneration(Qwen2_5_VLForConditionalGeneration):
    """Text, or text with images (encode only: the image tokens' 3D positions come from rope_index in a prefill)."""

    Config = Qwen3VLConfig
    checkpoint_key_map = {r"^model\.language_model\.": "model.", r"^model\.visual\.": "visual."}

    def __init__(self, config: Qwen3VLConfig):
        nn.Module.__init__(self)
        self.config = config
        self.model = InterleavedMRopeModel(config.text, config.mrope_section)
        self.visual = VisionTransformer(config.vision)
        self.lm_head = nn.Linear(config.text.hidden_size, config.text.vocab_size, bias=False)

    def new_cache(self, batch_size, max_len, device, dtype):
        c = self.config.text
        return KVCache(c.num_hidden_layers, batch_size, c.num_key_value_heads, max_len, c.head_dim, device, dtype)

    def forward(self, input_ids, position_ids, attention_mask, cache=None, cache_offset=0, output_hidden_states=False,
                pixel_values=None, image_grid_thw=None, num_layers: int | None = None):
        """As LlamaForCausalLM; with pixel_values, image-pad tokens take the vision features, positions become 3D and
        the DeepStack features are added to the image tokens after the first len(deepstack_visual_indexes) layers
        (hidden states report each layer's output before that addition, as transformers does)."""
        x = self.model.embed_tokens(input_ids)  # (B, T, D)
        adds = None
        if pixel_values is not None:
            assert cache_offset == 0, "images are only supported in a prefill"
            image, deep = self.visual(pixel_values, image_grid_thw)  # (tokens, D), [(tokens, D)] per deepstack layer
            slots = input_ids == self.config.image_token_id
            if int(slots.sum()) != image.shape[0]:
                raise ValueError(f"{int(slots.sum())} image tokens in the prompt but {image.shape[0]} image features")
            x = x.masked_scatter(slots[..., None], image.to(x.dtype))
            adds = [(slots, d) for d in deep]
            position_ids = self.rope_index(input_ids, attention_mask, image_grid_thw)
        return self.model(input_ids, position_ids, attention_mask, cache, cache_offset, output_hidden_states, inputs_embeds=x,
                          num_layers=num_layers, layer_adds=adds)
