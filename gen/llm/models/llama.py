"""Dense decoder LLMs (Llama, Mistral with its sliding window, Qwen2/2.5 with qkv bias, Qwen3 with q/k RMSNorm) with a contiguous KV cache; not the tokenizer or sampling."""
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
    sliding_window: int | None = None  # Mistral: a query sees the last `sliding_window` cache slots only
    # RoPE (read from rope_parameters / rope_scaling / rope_theta)
    rope_theta: float = 10000.0
    rope_type: str = "default"
    rope_factor: float = 1.0
    low_freq_factor: float = 1.0  # llama3
    high_freq_factor: float = 4.0  # llama3
    original_max_position_embeddings: int | None = None  # llama3, yarn
    attention_factor: float | None = None  # yarn: scale of cos / sin (None: from factor, mscale, mscale_all_dim)
    beta_fast: float | None = None  # yarn (None: 32)
    beta_slow: float | None = None  # yarn (None: 1)
    mscale: float | None = None  # yarn
    mscale_all_dim: float | None = None  # yarn
    truncate: bool = True  # yarn: round the correction range to whole dims

    def __post_init__(self):
        self.num_key_value_heads = self.num_key_value_heads or self.num_attention_heads
        self.head_dim = self.head_dim or self.hidden_size // self.num_attention_heads
        assert self.num_attention_heads % self.num_key_value_heads == 0, (self.num_attention_heads, self.num_key_value_heads)
        if self.hidden_act != "silu":
            raise ValueError(f"hidden_act {self.hidden_act!r} is not supported (only 'silu')")
        if self.rope_type not in ROPE_TYPES:
            raise ValueError(f"rope_type {self.rope_type!r} is not supported ({', '.join(ROPE_TYPES)})")
        if self.rope_type in ("llama3", "yarn") and not self.original_max_position_embeddings:
            self.original_max_position_embeddings = self.max_position_embeddings  # as transformers fills it in
        if self.sliding_window is not None and self.sliding_window <= 0:
            raise ValueError(f"sliding_window must be positive or None, got {self.sliding_window}")

    @property
    def max_context(self) -> int:
        """Tokens the model is meant to see: max_position_embeddings, stretched by `factor` for dynamic NTK (which
        scales from max_position_embeddings) and YaRN (from original_max_position_embeddings; Qwen2.5 documents
        max_position_embeddings = original = 32768 with factor 4 for 128K)."""
        if self.rope_type == "dynamic":
            return int(self.max_position_embeddings * self.rope_factor)
        if self.rope_type == "yarn":
            return max(self.max_position_embeddings, int(self.original_max_position_embeddings * self.rope_factor))
        return self.max_position_embeddings

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
        if model_type.startswith("qwen"):  # Qwen configs carry a sliding_window size that is off unless use_sliding_window
            if d.get("use_sliding_window"):
                raise ValueError("use_sliding_window=True (Qwen's per-layer sliding window) is not supported")
            d["sliding_window"] = None
        return config_from_dict(cls, d)


ROPE_TYPES = ("default", "linear", "llama3", "yarn", "dynamic")


def rope_fields(d: dict) -> dict:
    """RoPE settings from a config.json, as transformers 5 (`rope_parameters`) or 4 (`rope_theta` + `rope_scaling`) writes them.

    A top-level `original_max_position_embeddings` wins over the one in the rope dict (as transformers reads it)."""
    p = dict(d.get("rope_scaling") or {})
    p.update(d.get("rope_parameters") or {})
    out = {"rope_theta": p.get("rope_theta", d.get("rope_theta", 10000.0)), "rope_type": p.get("rope_type", p.get("type", "default"))}
    if out["rope_type"] == "mrope":  # Qwen2-VL writes type "mrope" for what is default RoPE on 3 position axes
        out["rope_type"] = "default"
    names = {"factor": "rope_factor", "low_freq_factor": "low_freq_factor", "high_freq_factor": "high_freq_factor",
             "original_max_position_embeddings": "original_max_position_embeddings", "attention_factor": "attention_factor",
             "beta_fast": "beta_fast", "beta_slow": "beta_slow", "mscale": "mscale", "mscale_all_dim": "mscale_all_dim",
             "truncate": "truncate"}
    for key, name in names.items():
        if p.get(key) is not None:
            out[name] = p[key]
    if d.get("original_max_position_embeddings") is not None and out["rope_type"] in ("llama3", "yarn"):
        out["original_max_position_embeddings"] = d["original_max_position_embeddings"]
    if out["rope_type"] == "yarn" and "rope_factor" not in out:  # DeepSeek style: the ratio of the two lengths
        max_len = d.get("max_position_embeddings", LlamaConfig.max_position_embeddings)
        out["rope_factor"] = max_len / out.get("original_max_position_embeddings", max_len)
    return out


def yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def yarn_attention_factor(factor: float, attention_factor: float | None, mscale: float | None,
                          mscale_all_dim: float | None) -> float:
    """YaRN's scale of cos / sin: given, or mscale(factor, mscale) / mscale(factor, mscale_all_dim), or mscale(factor)."""
    if attention_factor is not None:
        return float(attention_factor)
    if mscale and mscale_all_dim:
        return float(yarn_mscale(factor, mscale) / yarn_mscale(factor, mscale_all_dim))
    return yarn_mscale(factor)


def yarn_inv_freq(dim: int, base: float, factor: float, original_max: int, beta_fast: float | None, beta_slow: float | None,
                  truncate: bool, device) -> torch.Tensor:
    """YaRN inverse frequencies (dim // 2,) fp32: interpolated (/ factor) below the beta_slow rotations, kept above
    beta_fast, a linear ramp between (as transformers' _compute_yarn_parameters, same operation order)."""

    def correction_dim(rotations: float) -> float:
        return dim * math.log(original_max / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = correction_dim(beta_fast or 32), correction_dim(beta_slow or 1)
    if truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # no division by zero
    pos_freqs = base ** (torch.arange(0, dim, 2, device=device, dtype=torch.float32) / dim)
    ramp = ((torch.arange(dim // 2, dtype=torch.float32, device=device) - low) / (high - low)).clamp(0, 1)
    extrapolate = 1 - ramp  # 1 where the original frequency is kept (high frequencies)
    return (1.0 / (factor * pos_freqs)) * (1 - extrapolate) + (1.0 / pos_freqs) * extrapolate


def rope_inv_freq(cfg: LlamaConfig, device, position_ids: torch.Tensor | None = None) -> torch.Tensor:
    """Inverse frequencies (head_dim // 2,) fp32 for the configured RoPE type.

    `dynamic` (NTK) depends on the sequence: its base grows with max(position_ids) + 1 once that passes
    max_position_embeddings, computed per call from the positions of the call (as transformers' dynamic_rope_update:
    a decode step uses the length so far, keys already cached keep the rotation they were written with; in a padded
    batch the longest row sets the length for all rows). Tensor math: no host sync, traceable."""
    dim = cfg.head_dim
    exponents = torch.arange(0, dim, 2, dtype=torch.int64, device=device).float() / dim
    if cfg.rope_type == "yarn":
        return yarn_inv_freq(dim, cfg.rope_theta, cfg.rope_factor, cfg.original_max_position_embeddings, cfg.beta_fast,
                             cfg.beta_slow, cfg.truncate, device)
    if cfg.rope_type == "dynamic":
        if position_ids is None:
            raise ValueError("rope_type 'dynamic' needs the position ids of the call")
        max_len = cfg.max_position_embeddings
        seq_len = torch.clamp_min(position_ids.max() + 1, max_len)  # int64 0-dim
        base = cfg.rope_theta * ((cfg.rope_factor * seq_len / max_len) - (cfg.rope_factor - 1)) ** (dim / (dim - 2))
        return 1.0 / (base ** exponents)
    inv = 1.0 / (cfg.rope_theta ** exponents)
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


def rope_scale(cfg: LlamaConfig) -> float:
    """The factor cos and sin are multiplied by: YaRN's attention factor, else 1."""
    if cfg.rope_type != "yarn":
        return 1.0
    return yarn_attention_factor(cfg.rope_factor, cfg.attention_factor, cfg.mscale, cfg.mscale_all_dim)


def cos_sin(freqs: torch.Tensor, scale: float, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin (..., 2 * F) in dtype of rotation angles freqs (..., F) fp32, times `scale` before the cast."""
    emb = torch.cat((freqs, freqs), dim=-1)
    if scale == 1.0:
        return emb.cos().to(dtype), emb.sin().to(dtype)
    return (emb.cos() * scale).to(dtype), (emb.sin() * scale).to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (B, H, T, D), cos/sin (B, T, D)."""
    cos, sin = cos[:, None], sin[:, None]
    return x * cos + rotate_half(x) * sin


def causal_mask(attention_mask: torch.Tensor, cache_offset, t: int, window: int | None = None) -> torch.Tensor:
    """Bool (B, 1, T, S): query cache_offset+i sees key j iff j <= cache_offset+i and attention_mask[:, j]
    (and, with a sliding `window`, j > cache_offset+i - window).

    cache_offset is an int (S == cache_offset + T), or a 0-dim tensor for the static-shape decode step,
    where S is the whole cache and attention_mask marks the filled slots. A query that sees no key (a left pad) sees
    itself, so its row stays finite (its output is never used); a right pad sees the real tokens before it, as in
    transformers.
    """
    s, dev = attention_mask.shape[1], attention_mask.device
    assert torch.is_tensor(cache_offset) or s == cache_offset + t, (s, cache_offset, t)
    q_pos = (cache_offset + torch.arange(t, device=dev))[:, None]  # (T, 1)
    k_pos = torch.arange(s, device=dev)[None, :]  # (1, S)
    seen = k_pos <= q_pos
    if window is not None:
        seen = seen & (k_pos > q_pos - window)
    mask = seen[None] & attention_mask[:, None, :]  # (B, T, S)
    lonely = ~mask.any(-1, keepdim=True)  # (B, T, 1) rows that see nothing
    return (mask | ((k_pos == q_pos)[None] & lonely))[:, None]


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
        freqs = position_ids[..., None].float() * rope_inv_freq(self.cfg, position_ids.device, position_ids)  # (B, T, D/2)
        return cos_sin(freqs, rope_scale(self.cfg), dtype)

    def forward(self, input_ids, position_ids, attention_mask, cache=None, cache_offset=0, output_hidden_states=False, inputs_embeds=None,
                num_layers: int | None = None, layer_adds=None):
        """-> (output, hidden states or None). `num_layers` = k: run only the first k decoder layers and return the raw
        output of layer k (no final norm, also when k is every layer; HF hidden state k, except that HF's last one is
        normed), as a prefill for embeddings stops early. `layer_adds`: [(positions (B, T) bool, values (N, D))] per
        layer, added to that layer's output at those positions after it is recorded as a hidden state (Qwen3-VL's
        deepstack visual features)."""
        n = len(self.layers) if num_layers is None else num_layers
        assert 0 <= n <= len(self.layers), (num_layers, len(self.layers))
        x = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds  # (B, T, D)
        cos, sin = self.rope(position_ids, x.dtype)
        t, window = x.shape[1], self.cfg.sliding_window
        plain = (isinstance(cache_offset, int) and cache_offset == 0 and t > 1 and bool(attention_mask.all())
                 and (window is None or t <= window))
        mask = None if plain else causal_mask(attention_mask, cache_offset, t, window)
        hidden = [x] if output_hidden_states else None
        out = x
        for i, layer in enumerate(self.layers[:n]):
            out = x = layer(x, cos, sin, mask, cache, cache_offset)
            if hidden is not None:
                hidden.append(out)
            if layer_adds is not None and i < len(layer_adds):
                where, values = layer_adds[i]
                x = x.masked_scatter(where[..., None], x[where] + values.to(x.dtype))
        if num_layers is not None:  # stopped after k layers: the raw output, no final norm
            return out, (tuple(hidden) if hidden is not None else None)
        x = self.norm(x)
        if hidden is not None:
            hidden[-1] = x  # as transformers: the last entry is the normed output
        return x, (tuple(hidden) if hidden is not None else None)


class LlamaForCausalLM(nn.Module):
    """Also Qwen2ForCausalLM, Qwen3ForCausalLM and MistralForCausalLM (config switches)."""

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


class LlamaModelOnly(LlamaForCausalLM):
    """A bare decoder checkpoint (transformers' Qwen3Model / Qwen2Model / LlamaModel / MistralModel saved without a
    head: keys without the `model.` prefix, no lm_head), as re-saved text encoders are. It encodes; its head is the
    input embedding (what tied checkpoints use), so generating is refused unless the config ties them."""

    checkpoint_key_map = {r"^(?!model\.)": "model."}
    headless = True

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        if not self.config.tie_word_embeddings:
            raise ValueError("this checkpoint is a bare decoder without an LM head (tie_word_embeddings is false): "
                             "it can encode prompts, not generate")
        return super().compute_logits(hidden)
