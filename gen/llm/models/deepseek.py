"""DeepSeek-V2 / V3 decoders (MLA with a compressed latent KV cache, grouped top-k MoE, YaRN RoPE); not the engine or loader.

Static-shape decode (`static_decode = True`, as gen/llm/models/llama.py): a 0-dim tensor cache_offset writes the new
latents at that slot and attends over the whole cache (masked), so the engine can torch.compile one decode step.
The MoE then needs a path without data-dependent shapes: `MoE.stack_experts()` stacks the routed experts into two
tensors (the per-expert parameters become views of them) and a call with few tokens gathers each token's top-k experts'
weights instead of looping over the experts hit. The path is chosen from the real token count, in plain Python.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from gen.config import config_from_dict
from gen.llm.models.llama import yarn_attention_factor, yarn_inv_freq, yarn_mscale


@dataclass(frozen=True)
class DeepseekConfig:
    vocab_size: int = 102400
    hidden_size: int = 4096
    intermediate_size: int = 11008
    moe_intermediate_size: int = 1407
    num_hidden_layers: int = 30
    num_attention_heads: int = 32
    q_lora_rank: int | None = None  # None: a plain q_proj (V2-Lite)
    kv_lora_rank: int = 512
    qk_nope_head_dim: int = 128
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128
    n_routed_experts: int = 64
    n_shared_experts: int | None = 2
    num_experts_per_tok: int = 6
    n_group: int | None = None
    topk_group: int | None = None
    topk_method: str = "greedy"  # V2: greedy | group_limited_greedy; V3: noaux_tc (sigmoid + correction bias)
    norm_topk_prob: bool = False
    routed_scaling_factor: float = 1.0
    first_k_dense_replace: int = 0
    hidden_act: str = "silu"
    attention_bias: bool = False
    mlp_bias: bool = False
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    num_nextn_predict_layers: int = 0  # V3's multi-token-prediction layers, stored after the last layer; not run here
    rope_interleave: bool = True  # DeepSeek stores the rotary dims as interleaved pairs (x0, x1), (x2, x3), ...
    rope_theta: float = 10000.0
    rope_type: str = "default"  # default | yarn
    rope_factor: float | None = None
    rope_original_max_position_embeddings: int | None = None
    rope_attention_factor: float | None = None
    rope_mscale: float | None = None
    rope_mscale_all_dim: float | None = None
    rope_beta_fast: float | None = None
    rope_beta_slow: float | None = None
    rope_truncate: bool = True

    def __post_init__(self):
        if self.hidden_act != "silu":
            raise ValueError(f"hidden_act={self.hidden_act!r} is not supported (only 'silu')")
        if self.rope_type not in ("default", "yarn"):
            raise ValueError(f"rope_type={self.rope_type!r} is not supported (default, yarn)")
        if self.topk_method not in ("greedy", "group_limited_greedy", "noaux_tc"):
            raise ValueError(f"topk_method={self.topk_method!r} is not supported (greedy, group_limited_greedy, noaux_tc)")
        if self.topk_method != "greedy" and (not self.n_group or self.n_routed_experts % self.n_group):
            raise ValueError(f"n_group={self.n_group} must divide n_routed_experts={self.n_routed_experts}")
        assert self.qk_rope_head_dim % 2 == 0, self.qk_rope_head_dim

    @classmethod
    def from_hf(cls, d: dict) -> "DeepseekConfig":
        """Read a config.json dict; rope settings come from `rope_parameters` (transformers 5) or `rope_scaling` (older).

        Raw: V2 / V3 defaults are filled in by DeepseekV2Config / DeepseekV3Config."""
        rope = dict(d.get("rope_parameters") or d.get("rope_scaling") or {})
        kw = dict(d)
        kw.update(
            rope_theta=float(rope.get("rope_theta", d.get("rope_theta", 10000.0))),
            rope_type=rope.get("rope_type", rope.get("type", "default")),
            rope_factor=rope.get("factor"),
            rope_original_max_position_embeddings=rope.get("original_max_position_embeddings"),
            rope_attention_factor=rope.get("attention_factor"),
            rope_mscale=rope.get("mscale"),
            rope_mscale_all_dim=rope.get("mscale_all_dim"),
            rope_beta_fast=rope.get("beta_fast"),
            rope_beta_slow=rope.get("beta_slow"),
            rope_truncate=rope.get("truncate", True),
        )
        return config_from_dict(cls, kw)

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def yarn_factor(self) -> float:
        if self.rope_factor is not None:
            return float(self.rope_factor)
        return self.max_position_embeddings / (self.rope_original_max_position_embeddings or self.max_position_embeddings)


def rope_tables(cfg: DeepseekConfig, device) -> tuple[torch.Tensor, float]:
    """Inverse frequencies (qk_rope_head_dim / 2,) and the cos/sin scale (YaRN's attention factor; 1 by default)."""
    dim, base = cfg.qk_rope_head_dim, cfg.rope_theta
    if cfg.rope_type == "default":
        return 1.0 / base ** (torch.arange(0, dim, 2, device=device, dtype=torch.float32) / dim), 1.0
    factor = cfg.yarn_factor
    orig = cfg.rope_original_max_position_embeddings or cfg.max_position_embeddings
    inv_freq = yarn_inv_freq(dim, base, factor, orig, cfg.rope_beta_fast, cfg.rope_beta_slow, cfg.rope_truncate, device)
    return inv_freq, yarn_attention_factor(factor, cfg.rope_attention_factor, cfg.rope_mscale, cfg.rope_mscale_all_dim)


def softmax_scale(cfg: DeepseekConfig) -> float:
    """1/sqrt(qk_head_dim), times YaRN's mscale(factor, mscale_all_dim)^2 when YaRN is on."""
    scale = cfg.qk_head_dim**-0.5
    if cfg.rope_type != "default" and cfg.rope_mscale_all_dim:
        m = yarn_mscale(cfg.yarn_factor, cfg.rope_mscale_all_dim)
        scale = scale * m * m
    return scale


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleave: bool) -> torch.Tensor:
    """Rotate x (B, T, H, Dr) by cos/sin (B, T, 1, Dr/2). Interleaved pairs come out de-interleaved (evens then odds);
    q and k get the same permutation, so their dot products are those of the interleaved form."""
    if interleave:
        x1, x2 = x[..., 0::2], x[..., 1::2]
    else:
        x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


class MLP(nn.Module):
    def __init__(self, dim: int, hidden: int, bias: bool = False):
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=bias)
        self.up_proj = nn.Linear(dim, hidden, bias=bias)
        self.down_proj = nn.Linear(hidden, dim, bias=bias)
        # gate|up in one tensor (the two parameters are views of it): engine.fuse_projections or MoE.stack_experts
        self.register_buffer("fused_weight", None, persistent=False)
        self.register_buffer("fused_bias", None, persistent=False)

    fusable = ("gate_proj", "up_proj")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fused_weight is not None:
            gate, up = F.linear(x, self.fused_weight, self.fused_bias).chunk(2, dim=-1)
        else:
            gate, up = self.gate_proj(x), self.up_proj(x)
        return self.down_proj(F.silu(gate) * up)


@dataclass
class MLACache:
    """Compressed KV cache: per layer and position, the normed latent c_kv and the roped shared key k_pe.

    Attributes are only tensors: the engine marks each one a static address for CUDA graphs."""

    latent: torch.Tensor  # (layers, B, max_len, kv_lora_rank)
    k_pe: torch.Tensor  # (layers, B, max_len, qk_rope_head_dim)

    @property
    def max_len(self) -> int:
        return self.latent.shape[2]


class MLAttention(nn.Module):
    """Multi-head latent attention. Prefill up-projects the latent to full K/V; decode (cache_offset > 0) runs in the
    absorbed form: q_nope is mapped into latent space by W_UK and the latent output back by W_UV, so K/V are never built.
    A 0-dim tensor cache_offset (static-shape decode) writes at that slot and attends over the whole cache, masked."""

    def __init__(self, cfg: DeepseekConfig):
        super().__init__()
        self.cfg = cfg
        H, D = cfg.num_attention_heads, cfg.hidden_size
        if cfg.q_lora_rank is None:
            self.q_proj = nn.Linear(D, H * cfg.qk_head_dim, bias=False)
        else:
            self.q_a_proj = nn.Linear(D, cfg.q_lora_rank, bias=cfg.attention_bias)
            self.q_a_layernorm = RMSNorm(cfg.q_lora_rank)
            self.q_b_proj = nn.Linear(cfg.q_lora_rank, H * cfg.qk_head_dim, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(D, cfg.kv_lora_rank + cfg.qk_rope_head_dim, bias=cfg.attention_bias)
        self.kv_a_layernorm = RMSNorm(cfg.kv_lora_rank)
        self.kv_b_proj = nn.Linear(cfg.kv_lora_rank, H * (cfg.qk_nope_head_dim + cfg.v_head_dim), bias=False)
        self.o_proj = nn.Linear(H * cfg.v_head_dim, D, bias=cfg.attention_bias)
        self.scale = softmax_scale(cfg)
        # the two projections of x (q or q_a, and kv_a) in one tensor, set by engine.fuse_projections; only when both
        # are unbiased or both biased
        q_in = "q_proj" if cfg.q_lora_rank is None else "q_a_proj"
        self.fusable = (q_in, "kv_a_proj_with_mqa") if cfg.q_lora_rank is not None or not cfg.attention_bias else ()
        self.register_buffer("fused_weight", None, persistent=False)
        self.register_buffer("fused_bias", None, persistent=False)

    def forward(self, x, cos, sin, mask, kv_cache=None, cache_offset: int | torch.Tensor = 0, absorb: bool = False):
        cfg = self.cfg
        B, T, _ = x.shape
        H, dn, dr, dv = cfg.num_attention_heads, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
        q_size = H * (dn + dr) if cfg.q_lora_rank is None else cfg.q_lora_rank
        if self.fused_weight is not None:
            q, kv_a = F.linear(x, self.fused_weight, self.fused_bias).split([q_size, cfg.kv_lora_rank + dr], dim=-1)
        else:
            q, kv_a = (self.q_proj if cfg.q_lora_rank is None else self.q_a_proj)(x), self.kv_a_proj_with_mqa(x)
        if cfg.q_lora_rank is not None:
            q = self.q_b_proj(self.q_a_layernorm(q))
        q_nope, q_pe = q.view(B, T, H, dn + dr).split([dn, dr], dim=-1)  # (B, T, H, dn), (B, T, H, dr)
        c, k_pe = kv_a.split([cfg.kv_lora_rank, dr], dim=-1)
        c = self.kv_a_layernorm(c)  # (B, T, r)
        q_pe = apply_rope(q_pe, cos, sin, cfg.rope_interleave)
        k_pe = apply_rope(k_pe[:, :, None], cos, sin, cfg.rope_interleave)[:, :, 0]  # (B, T, dr)
        if kv_cache is not None:
            latent, pe = kv_cache
            if torch.is_tensor(cache_offset):  # static shapes: write at the slots, attend over the whole cache
                slots = cache_offset + torch.arange(T, device=x.device)
                latent.index_copy_(1, slots, c)
                pe.index_copy_(1, slots, k_pe)
                c, k_pe = latent, pe  # (B, max_len, r), (B, max_len, dr)
            else:
                latent[:, cache_offset : cache_offset + T] = c
                pe[:, cache_offset : cache_offset + T] = k_pe
                c, k_pe = latent[:, : cache_offset + T], pe[:, : cache_offset + T]  # (B, S, r), (B, S, dr)
        S = c.shape[1]
        w_kv = self.kv_b_proj.weight.view(H, dn + dv, cfg.kv_lora_rank)
        if absorb:
            # every head shares the one latent key / value (MQA in latent space): batched matmuls over (H * T) query
            # rows, no per-head copy of the cache
            q_lat = torch.einsum("bthd,hdr->bhtr", q_nope, w_kv[:, :dn])  # (B, H, T, r)
            scores = torch.bmm(q_lat.reshape(B, H * T, -1), c.transpose(1, 2))  # (B, H*T, S)
            scores = scores + torch.bmm(q_pe.transpose(1, 2).reshape(B, H * T, dr), k_pe.transpose(1, 2))
            scores = (scores.float() * self.scale).view(B, H, T, S).masked_fill(~mask, float("-inf"))
            p = scores.softmax(dim=-1).to(c.dtype)  # (B, H, T, S)
            o = torch.bmm(p.view(B, H * T, S), c).view(B, H, T, -1)  # (B, H, T, r)
            o = torch.einsum("bhtr,hvr->bthv", o, w_kv[:, dn:])  # (B, T, H, dv)
        else:
            k_nope, v = self.kv_b_proj(c).view(B, S, H, dn + dv).split([dn, dv], dim=-1)
            k = torch.cat([k_nope, k_pe[:, :, None].expand(B, S, H, dr)], dim=-1)  # (B, S, H, dn + dr)
            qry = torch.cat([q_nope, q_pe], dim=-1)  # (B, T, H, dn + dr)
            o = F.scaled_dot_product_attention(
                qry.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask, scale=self.scale
            ).transpose(1, 2)  # (B, T, H, dv)
        return self.o_proj(o.reshape(B, T, H * dv))


class Experts(nn.ModuleList):
    """Routed experts stored one MLP per expert, as checkpoints name them (`experts.E.gate_proj.weight`)."""

    @torch.compiler.disable  # data-dependent shapes (tokens per expert): always eager, also inside a compiled step
    def forward(self, x: torch.Tensor, idx: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """x (N, D), idx / w (N, K): sum over each token's K experts of w * expert(x). Works for any N."""
        out = torch.zeros_like(x)
        for e in torch.unique(idx).tolist():
            tok, slot = torch.where(idx == e)  # the tokens routed to e, and which of their K slots chose it
            y = self[e](x[tok]) * w[tok, slot, None]
            out.index_add_(0, tok, y.to(out.dtype))
        return out


class Router(nn.Module):
    """Grouped top-k routing: V2 softmax (greedy / group-limited greedy), V3 sigmoid + correction bias (noaux_tc)."""

    def __init__(self, cfg: DeepseekConfig):
        super().__init__()
        self.cfg = cfg
        self.weight = nn.Parameter(torch.empty(cfg.n_routed_experts, cfg.hidden_size))
        if cfg.topk_method == "noaux_tc":
            self.register_buffer("e_score_correction_bias", torch.zeros(cfg.n_routed_experts))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x (N, D) -> expert ids (N, K) and weights (N, K) fp32."""
        cfg = self.cfg
        N, E, G, K = x.shape[0], cfg.n_routed_experts, cfg.n_group, cfg.num_experts_per_tok
        logits = F.linear(x.float(), self.weight.float())  # (N, E)
        if cfg.topk_method == "noaux_tc":
            scores = logits.sigmoid()
            choice = scores + self.e_score_correction_bias.float()
            group_scores = choice.view(N, G, E // G).topk(2, dim=-1).values.sum(-1)  # (N, G)
            choice = self._keep_groups(choice, group_scores, float("-inf"))
            idx = choice.topk(K, dim=-1, sorted=False).indices
            w = scores.gather(1, idx)
            if cfg.norm_topk_prob:
                w = w / (w.sum(-1, keepdim=True) + 1e-20)
            return idx, w * cfg.routed_scaling_factor
        scores = logits.softmax(dim=-1)
        if cfg.topk_method == "group_limited_greedy":
            scores = self._keep_groups(scores, scores.view(N, G, E // G).amax(-1), 0.0)
        w, idx = scores.topk(K, dim=-1, sorted=False)
        if cfg.norm_topk_prob and K > 1:  # as DeepSeek-V2's own code: normalize, or else scale
            return idx, w / (w.sum(-1, keepdim=True) + 1e-20)
        return idx, w * cfg.routed_scaling_factor

    def _keep_groups(self, scores: torch.Tensor, group_scores: torch.Tensor, fill: float) -> torch.Tensor:
        """Fill every expert outside each token's topk_group best groups with `fill`."""
        N, G = group_scores.shape
        top = group_scores.topk(self.cfg.topk_group, dim=-1, sorted=False).indices
        keep = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, top, True)  # (N, G)
        keep = keep[:, :, None].expand(N, G, scores.shape[1] // G).reshape(N, -1)  # (N, E)
        return scores.masked_fill(~keep, fill)


class MoE(nn.Module):
    """Router, routed experts and shared experts. Two routed paths with the same result:

    - gathered (static shapes, compilable): each token's K experts' weights are read from the stacked tensors `w13`
      (E, 2I, D) = every expert's gate|up and `w2` (E, D, I); taken when the experts are stacked and
      tokens * K <= `gather_max` (default: the number of experts, past which gathering reads more weights than exist);
    - loop over the experts hit (`Experts.forward`, data-dependent shapes, eager): prefill and larger batches.

    The choice is made in Python from the real token count of the call, so a graph compiled for one decode shape
    (torch.compile guards every input shape) is never used for another, and many tokens never take the gathered path.
    """

    def __init__(self, cfg: DeepseekConfig):
        super().__init__()
        self.experts = Experts(MLP(cfg.hidden_size, cfg.moe_intermediate_size, cfg.mlp_bias) for _ in range(cfg.n_routed_experts))
        self.gate = Router(cfg)
        if cfg.n_shared_experts:
            self.shared_experts = MLP(cfg.hidden_size, cfg.moe_intermediate_size * cfg.n_shared_experts, cfg.mlp_bias)
        self.gather_max = cfg.n_routed_experts
        self.register_buffer("w13", None, persistent=False)
        self.register_buffer("w2", None, persistent=False)

    @torch.no_grad()
    def stack_experts(self) -> bool:
        """Stack the routed experts' weights into `w13` / `w2`; each expert's parameters become views of them (names,
        state_dict and memory unchanged once the old tensors are freed; one layer's experts extra while copying).
        Experts with biases are left unstacked (the loop path serves every call). Returns whether they are stacked."""
        if self.w13 is not None:
            return True
        if any(lin.bias is not None for m in self.experts for lin in (m.gate_proj, m.up_proj, m.down_proj)):
            return False
        inter = self.experts[0].gate_proj.weight.shape[0]
        w13 = torch.stack([torch.cat([m.gate_proj.weight, m.up_proj.weight]) for m in self.experts])  # (E, 2I, D)
        w2 = torch.stack([m.down_proj.weight for m in self.experts])  # (E, D, I)
        for e, m in enumerate(self.experts):
            m.gate_proj.weight = nn.Parameter(w13[e, :inter], requires_grad=False)
            m.up_proj.weight = nn.Parameter(w13[e, inter:], requires_grad=False)
            m.down_proj.weight = nn.Parameter(w2[e], requires_grad=False)
            m.fused_weight = w13[e]
        self.w13, self.w2 = w13, w2
        return True

    def gathered(self, x: torch.Tensor, idx: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """x (N, D), idx / w (N, K) -> (N, D): the routed experts from the stacked weights, fp32 accumulation.

        Compiled, it is written as multiply-and-sum so that inductor reads the K chosen experts' rows in place inside
        one reduction kernel (a matmul would first copy the gathered weights); eager, as a batched matmul over a copy
        of the chosen weights (N * K experts' worth, at most one layer's experts under the default gather_max).
        """
        if self.w13 is None:
            raise RuntimeError("MoE.gathered needs stacked experts: call stack_experts() first")
        if torch.compiler.is_compiling():
            gate_up = (self.w13[idx].float() * x.float()[:, None, None, :]).sum(-1)  # (N, K, 2I)
        else:
            gate_up = torch.matmul(self.w13[idx], x[:, None, :, None]).squeeze(-1).float()
        gate, up = gate_up.chunk(2, dim=-1)
        h = F.silu(gate) * up  # (N, K, I)
        if torch.compiler.is_compiling():
            y = (self.w2[idx].float() * h[:, :, None, :]).sum(-1)  # (N, K, D)
        else:
            y = torch.matmul(self.w2[idx], h.to(x.dtype)[..., None]).squeeze(-1).float()
        return (y * w[..., None]).sum(1).to(x.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, D = x.shape
        flat = x.reshape(B * T, D)
        idx, w = self.gate(flat)
        if self.w13 is not None and idx.numel() <= self.gather_max:  # tokens * K, a Python int (static under compile)
            out = self.gathered(flat, idx, w).view(B, T, D)
        else:
            out = self.experts(flat, idx, w).view(B, T, D)
        if hasattr(self, "shared_experts"):
            out = out + self.shared_experts(x)
        return out


class DecoderLayer(nn.Module):
    def __init__(self, cfg: DeepseekConfig, i: int):
        super().__init__()
        self.self_attn = MLAttention(cfg)
        dense = i < cfg.first_k_dense_replace
        self.mlp = MLP(cfg.hidden_size, cfg.intermediate_size, cfg.mlp_bias) if dense else MoE(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x, cos, sin, mask, kv_cache=None, cache_offset: int = 0, absorb: bool = False):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, kv_cache, cache_offset, absorb)
        return x + self.mlp(self.post_attention_layernorm(x))


class DeepseekModel(nn.Module):
    def __init__(self, cfg: DeepseekConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class DeepseekForCausalLM(nn.Module):
    """The shared V2 / V3 decoder; the two public classes differ only in how config.json is read.

    `absorb` picks the attention form: None (default) = absorbed when decoding on top of a cache (cache_offset > 0),
    up-projected K/V otherwise; True / False force one form (both compute the same attention)."""

    Config = DeepseekConfig
    static_decode = True  # forward accepts a 0-dim tensor cache_offset (static-shape decode over the whole cache)
    # The loader keeps these float32 whatever the load dtype, as HF does (`_keep_in_fp32_modules_strict`): near-tied
    # expert choices can flip if the routing bias is rounded to bf16.
    keep_fp32_checkpoint_keys = (r"e_score_correction_bias$",)

    def __init__(self, config: DeepseekConfig):
        super().__init__()
        self.config = config
        n, k = config.num_hidden_layers, config.num_nextn_predict_layers
        # The loader drops these checkpoint keys: the MTP layers (model.layers.{n..n+k-1}) of V3 / R1 checkpoints.
        self.ignored_checkpoint_keys = (rf"^model\.layers\.({'|'.join(map(str, range(n, n + k)))})\.",) if k else ()
        self.model = DeepseekModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.absorb: bool | None = None
        self._rope: tuple | None = None  # (device, inv_freq, attention factor), computed lazily off meta

    def new_cache(self, batch_size: int, max_len: int, device, dtype) -> MLACache:
        cfg = self.config
        n = cfg.num_hidden_layers
        return MLACache(
            latent=torch.zeros(n, batch_size, max_len, cfg.kv_lora_rank, device=device, dtype=dtype),
            k_pe=torch.zeros(n, batch_size, max_len, cfg.qk_rope_head_dim, device=device, dtype=dtype),
        )

    def stack_experts(self) -> None:
        """Stack every MoE layer's routed experts (see MoE.stack_experts); engine.fuse_projections calls it."""
        for layer in self.model.layers:
            if isinstance(layer.mlp, MoE):
                layer.mlp.stack_experts()

    def _cos_sin(self, position_ids: torch.Tensor, dtype) -> tuple[torch.Tensor, torch.Tensor]:
        if self._rope is None or self._rope[0] != position_ids.device:
            self._rope = (position_ids.device, *rope_tables(self.config, position_ids.device))
        _, inv_freq, attn_factor = self._rope
        freqs = position_ids[..., None].float() * inv_freq  # (B, T, Dr/2)
        cos, sin = freqs.cos() * attn_factor, freqs.sin() * attn_factor
        return cos[:, :, None].to(dtype), sin[:, :, None].to(dtype)  # (B, T, 1, Dr/2)

    def forward(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        cache: MLACache | None = None,
        cache_offset: int | torch.Tensor = 0,
        output_hidden_states: bool = False,
        num_layers: int | None = None,
    ):
        """`cache_offset`: an int (attention_mask covers the S = offset + T positions so far), or a 0-dim tensor for the
        static-shape decode step (attention_mask (B, cache.max_len) marks the filled slots; the whole cache is attended).
        `num_layers` = k: run only the first k layers and return the raw output of layer k (no final norm, also when k
        is every layer)."""
        B, T = input_ids.shape
        static = torch.is_tensor(cache_offset)
        if static and cache is None:
            raise ValueError("a tensor cache_offset (static-shape decode) needs a cache")
        S = cache.max_len if static else cache_offset + T
        if attention_mask.shape != (B, S):
            raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)}, expected {(B, S)}")
        if cache is None and cache_offset != 0:
            raise ValueError(f"cache_offset={cache_offset} needs a cache")
        if cache is not None and S > cache.max_len:
            raise ValueError(f"{S} positions do not fit in a cache of max_len={cache.max_len}")
        n = len(self.model.layers) if num_layers is None else num_layers
        if not 0 <= n <= len(self.model.layers):
            raise ValueError(f"num_layers={num_layers} is outside 0..{len(self.model.layers)}")
        x = self.model.embed_tokens(input_ids)  # (B, T, D)
        cos, sin = self._cos_sin(position_ids, x.dtype)
        q_pos = (cache_offset + torch.arange(T, device=x.device))[:, None]  # (T, 1) absolute query index
        k_pos = torch.arange(S, device=x.device)[None, :]  # (1, S)
        # A query that sees nothing (a left pad) sees itself, so its row stays finite (no all-masked softmax); real
        # rows never see pads (as llama.causal_mask).
        mask = (k_pos <= q_pos) & attention_mask[:, None, :].bool()  # (B, T, S)
        mask = (mask | ((k_pos == q_pos) & ~mask.any(-1, keepdim=True)))[:, None]  # (B, 1, T, S)
        absorb = self.absorb if self.absorb is not None else (static or cache_offset > 0)
        hidden = [x] if output_hidden_states else None
        for i, layer in enumerate(self.model.layers[:n]):
            kv = (cache.latent[i], cache.k_pe[i]) if cache is not None else None
            x = layer(x, cos, sin, mask, kv, cache_offset, absorb)
            if hidden is not None:
                hidden.append(x)
        if num_layers is not None:  # stopped after k layers: the raw output, no final norm
            return x, (tuple(hidden) if hidden is not None else None)
        x = self.model.norm(x)
        if hidden is not None:
            hidden[-1] = x
        return x, (tuple(hidden) if hidden is not None else None)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden).float()

    def tie_weights(self) -> None:
        """Share the embedding with lm_head when config.tie_word_embeddings (call after loading)."""
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight


class DeepseekV2Config(DeepseekConfig):
    @classmethod
    def from_hf(cls, d: dict) -> DeepseekConfig:
        """V2 routing is softmax (greedy / group_limited_greedy); its rotary dims are always interleaved pairs."""
        return super().from_hf({**d, "topk_method": d.get("topk_method") or "greedy", "rope_interleave": True})


class DeepseekV3Config(DeepseekConfig):
    @classmethod
    def from_hf(cls, d: dict) -> DeepseekConfig:
        """V3 routing is sigmoid + correction bias whatever `topk_method` says; transformers' defaults fill the rest."""
        defaults = {"norm_topk_prob": True, "routed_scaling_factor": 2.5, "n_shared_experts": 1, "n_group": 8,
                    "topk_group": 4, "num_experts_per_tok": 8, "first_k_dense_replace": 3}
        return super().from_hf({**defaults, **d, "topk_method": "noaux_tc"})


class DeepseekV2ForCausalLM(DeepseekForCausalLM):
    """DeepSeek-V2 / V2-Lite / V2.5 / Coder-V2."""

    Config = DeepseekV2Config


class DeepseekV3ForCausalLM(DeepseekForCausalLM):
    """DeepSeek-V3 / R1, bf16 or as released in block-scaled FP8 (dequantized to the load dtype by the loader)."""

    Config = DeepseekV3Config
