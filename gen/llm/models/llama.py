"""Dense decoder LLMs (Llama, Qwen2/2.5 with qkv bias, Qwen3 with q/k RMSNorm) with a contiguous KV cache; not the tokenizer or sampling."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from gen.config import config_from_dict


@dataclass
class LlamaConfig:
    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    hidden_act: str = "silu"
    # switches that make the family members
    qkv_bias: bool = False  # Qwen2 / Qwen2.5: bias on q, k, v only
    o_bias: bool = False  # Llama attention_bias: bias on q, k, v and o
    mlp_bias: bool = False
    qk_norm: bool = False  # Qwen3: RMSNorm on each head of q and k before RoPE
    # RoPE (read from rope_parameters / rope_scaling / rope_theta)
    rope_theta: float = 10000.0
    rope_type: str = "default"
    rope_factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int | None = None

    def __post_init__(self):
        self.num_key_value_heads = self.num_key_value_heads or self.num_attention_heads
        self.head_dim = self.head_dim or self.hidden_size // self.num_attention_heads
        assert self.num_attention_heads % self.num_key_value_heads == 0, (self.num_attention_heads, self.num_key_value_heads)
        if self.hidden_act != "silu":
            raise ValueError(f"hidden_act {self.hidden_act!r} is not supported (only 'silu')")
        if self.rope_type not in ("default", "linear", "llama3"):
            raise ValueError(f"rope_type {self.rope_type!r} is not supported (default, linear, llama3)")

    @classmethod
    def from_hf(cls, d: dict) -> "LlamaConfig":
        d = {**d, **d["text_config"]} if isinstance(d.get("text_config"), dict) else dict(d)  # VL configs nest the text part
        d.update(rope_fields(d))
        model_type = d.get("model_type", "llama")
        bias = bool(d.get("attention_bias", False))
        if model_type.startswith("qwen2"):  # qwen2, qwen2_5_vl(_text): q, k, v carry a bias, o does not
            d.update(qkv_bias=True, o_bias=False)
        else:
            d.update(qkv_bias=bias, o_bias=bias)
        d["qk_norm"] = model_type.startswith("qwen3")
        return config_from_dict(cls, d)


def rope_fields(d: dict) -> dict:
    """RoPE settings from a config.json, as transformers 5 (`rope_parameters`) or 4 (`rope_theta` + `rope_scaling`) writes them."""
    p = dict(d.get("rope_scaling") or {})
    p.update(d.get("rope_parameters") or {})
    out = {"rope_theta": p.get("rope_theta", d.get("rope_theta", 10000.0)), "rope_type": p.get("rope_type", p.get("type", "default"))}
    if out["rope_type"] == "mrope":  # Qwen2-VL writes type "mrope" for what is default RoPE on 3 position axes
        out["rope_type"] = "default"
    for key, name in [("factor", "rope_factor"), ("low_freq_factor", "low_freq_factor"), ("high_freq_factor", "high_freq_factor"),
                      ("original_max_position_embeddings", "original_max_position_embeddings")]:
        if key in p:
            out[name] = p[key]
    return out


def rope_inv_freq(cfg: LlamaConfig, device) -> torch.Tensor:
    """Inverse frequencies (head_dim // 2,) fp32 for the configured RoPE type."""
    dim = cfg.head_dim
    inv = 1.0 / (cfg.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64, device=device).float() / dim))
    if cfg.rope_type == "linear":
        inv = inv / cfg.rope_factor
    elif cfg.rope_type == "llama3":
        old_len = cfg.original_max_position_embeddings
        low_wl, high_wl = old_len / cfg.low_freq_factor, old_len / cfg.high_freq_factor
        wavelen = 2 * math.pi / inv
        scaled = torch.where(wavelen > low_wl, inv / cfg.rope_factor, inv)
        smooth = (old_len / wavelen - cfg.low_freq_factor) / (cfg.high_freq_factor - cfg.low_freq_factor)
        smoothed = (1 - smooth) * scaled / cfg.rope_factor + smooth * scaled
        medium = (wavelen >= high_wl) & (wavelen <= low_wl)
        inv = torch.where(medium, smoothed, scaled)
    return inv


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (B, H, T, D), cos/sin (B, T, D)."""
    cos, sin = cos[:, None], sin[:, None]
    return x * cos + rotate_half(x) * sin


def causal_mask(attention_mask: torch.Tensor, cache_offset, t: int) -> torch.Tensor:
    """Bool (B, 1, T, S): query cache_offset+i sees key j iff j <= cache_offset+i and attention_mask[:, j].

    cache_offset is an int (S == cache_offset + T), or a 0-dim tensor for the static-shape decode step,
    where S is the whole cache and attention_mask marks the filled slots. A query always sees itself,
    so padded query rows stay finite (their outputs are never used).
    """
    s, dev = attention_mask.shape[1], attention_mask.device
    assert torch.is_tensor(cache_offset) or s == cache_offset + t, (s, cache_offset, t)
    q_pos = (cache_offset + torch.arange(t, device=dev))[:, None]  # (T, 1)
    k_pos = torch.arange(s, device=dev)[None, :]  # (1, S)
    mask = (k_pos <= q_pos)[None] & attention_mask[:, None, :]  # (B, T, S)
    return (mask | (k_pos == q_pos)[None])[:, None]


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


class KVCache:
    """Contiguous keys and values for every layer, allocated once: (layers, B, Hkv, max_len, D)."""

    def __init__(self, num_layers: int, batch_size: int, num_kv_heads: int, max_len: int, head_dim: int, device, dtype):
        shape = (num_layers, batch_size, num_kv_heads, max_len, head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.max_len = max_len

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor, offset) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v (B, Hkv, T, D) at [offset, offset+T); return the filled prefix (B, Hkv, offset+T, D).

        With a 0-dim tensor offset (static-shape decode) the write is an index_copy_ and the whole cache is returned.
        """
        b, t = k.shape[0], k.shape[2]
        if torch.is_tensor(offset):
            idx = offset + torch.arange(t, device=k.device)
            self.k[layer].index_copy_(2, idx, k)
            self.v[layer].index_copy_(2, idx, v)
            return self.k[layer], self.v[layer]
        end = offset + t
        assert end <= self.max_len, (end, self.max_len)
        self.k[layer, :b, :, offset:end] = k
        self.v[layer, :b, :, offset:end] = v
        return self.k[layer, :b, :, :end], self.v[layer, :b, :, :end]


class Attention(nn.Module):
    def __init__(self, cfg: LlamaConfig, layer: int):
        super().__init__()
        self.layer, self.h, self.hkv, self.d = layer, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        qkv_bias = cfg.qkv_bias or cfg.o_bias
        self.q_proj = nn.Linear(cfg.hidden_size, self.h * self.d, bias=qkv_bias)
        self.k_proj = nn.Linear(cfg.hidden_size, self.hkv * self.d, bias=qkv_bias)
        self.v_proj = nn.Linear(cfg.hidden_size, self.hkv * self.d, bias=qkv_bias)
        self.o_proj = nn.Linear(self.h * self.d, cfg.hidden_size, bias=cfg.o_bias)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(self.d, cfg.rms_norm_eps)
            self.k_norm = RMSNorm(self.d, cfg.rms_norm_eps)
        self.qk_norm = cfg.qk_norm
        # q|k|v weights in one tensor (the three parameters are views of it), set by engine.fuse_projections
        self.register_buffer("fused_weight", None, persistent=False)
        self.register_buffer("fused_bias", None, persistent=False)

    fusable = ("q_proj", "k_proj", "v_proj")

    def forward(self, x, cos, sin, mask, cache: KVCache | None, offset: int):
        b, t, _ = x.shape
        if self.fused_weight is not None:
            q, k, v = F.linear(x, self.fused_weight, self.fused_bias).split([self.h * self.d, self.hkv * self.d, self.hkv * self.d], -1)
        else:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        q = q.view(b, t, self.h, self.d)  # (B, T, H, D)
        k = k.view(b, t, self.hkv, self.d)
        v = v.view(b, t, self.hkv, self.d).transpose(1, 2)  # (B, Hkv, T, D)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope(q.transpose(1, 2), cos, sin), apply_rope(k.transpose(1, 2), cos, sin)  # (B, H, T, D)
        if cache is not None:
            k, v = cache.update(self.layer, k, v, offset)  # (B, Hkv, S, D)
        causal = mask is None  # plain causal prefill (no padding): lets SDPA pick its flash kernel
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, enable_gqa=self.h != self.hkv)  # (B, H, T, D)
        return self.o_proj(o.transpose(1, 2).reshape(b, t, self.h * self.d))


class MLP(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=cfg.mlp_bias)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=cfg.mlp_bias)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=cfg.mlp_bias)
        self.register_buffer("fused_weight", None, persistent=False)  # gate|up, see Attention
        self.register_buffer("fused_bias", None, persistent=False)

    fusable = ("gate_proj", "up_proj")

    def forward(self, x):
        if self.fused_weight is not None:
            gate, up = F.linear(x, self.fused_weight, self.fused_bias).chunk(2, dim=-1)
        else:
            gate, up = self.gate_proj(x), self.up_proj(x)
        return self.down_proj(F.silu(gate) * up)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: LlamaConfig, layer: int):
        super().__init__()
        self.self_attn = Attention(cfg, layer)
        self.mlp = MLP(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x, cos, sin, mask, cache, offset):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache, offset)
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaModel(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def rope(self, position_ids: torch.Tensor, dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin (B, T, D) for position_ids (B, T)."""
        freqs = position_ids[..., None].float() * rope_inv_freq(self.cfg, position_ids.device)  # (B, T, D/2)
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(dtype), emb.sin().to(dtype)

    def forward(self, input_ids, position_ids, attention_mask, cache=None, cache_offset=0, output_hidden_states=False, inputs_embeds=None,
                num_layers: int | None = None):
        """`num_layers` = k: run only the first k decoder layers and return hidden state k (HF numbering: the raw output
        of layer k, or the normed output when k is every layer), as a prefill for embeddings stops early."""
        n = len(self.layers) if num_layers is None else num_layers
        assert 0 <= n <= len(self.layers), (num_layers, len(self.layers))
        x = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds  # (B, T, D)
        cos, sin = self.rope(position_ids, x.dtype)
        plain = isinstance(cache_offset, int) and cache_offset == 0 and x.shape[1] > 1 and bool(attention_mask.all())
        mask = None if plain else causal_mask(attention_mask, cache_offset, x.shape[1])
        hidden = [x] if output_hidden_states else None
        for layer in self.layers[:n]:
            x = layer(x, cos, sin, mask, cache, cache_offset)
            if hidden is not None:
                hidden.append(x)
        if n < len(self.layers):  # stopped early: no final norm
            return x, (tuple(hidden) if hidden is not None else None)
        x = self.norm(x)
        if hidden is not None:
            hidden[-1] = x  # as transformers: the last entry is the normed output
        return x, (tuple(hidden) if hidden is not None else None)


class LlamaForCausalLM(nn.Module):
    """Also Qwen2ForCausalLM and Qwen3ForCausalLM (config switches)."""

    Config = LlamaConfig
    static_decode = True  # forward accepts a 0-dim tensor cache_offset (static-shape decode, see causal_mask)

    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.config = config
        self.model = LlamaModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)

    def new_cache(self, batch_size: int, max_len: int, device, dtype) -> KVCache:
        c = self.config
        return KVCache(c.num_hidden_layers, batch_size, c.num_key_value_heads, max_len, c.head_dim, device, dtype)

    def forward(self, input_ids, position_ids, attention_mask, cache=None, cache_offset=0, output_hidden_states=False,
                num_layers: int | None = None):
        return self.model(input_ids, position_ids, attention_mask, cache, cache_offset, output_hidden_states, num_layers=num_layers)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden).float()
