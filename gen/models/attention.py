"""The one attention entry point every model calls; backends and sequence parallelism plug in here.

Not a module with weights: projections, norms and RoPE live in the model files.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

# (q, k, v, mask) -> out; q/k/v are (B, L, H, D); mask is None or bool (B, Lk) with True = attend.
AttentionFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor]


def sdpa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Plain PyTorch scaled-dot-product attention. q, k, v: (B, L, H, D) -> (B, Lq, H, D)."""
    attn_mask = None
    if mask is not None:
        attn_mask = mask[:, None, None, :].to(torch.bool)  # (B, 1, 1, Lk)
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=attn_mask)
    return out.transpose(1, 2)


_BACKEND: AttentionFn = sdpa_attention


def set_attention_backend(fn: AttentionFn) -> AttentionFn:
    """Install `fn` as the attention used by every model; returns the previous one (to restore)."""
    global _BACKEND
    previous, _BACKEND = _BACKEND, fn
    return previous


def get_attention_backend() -> AttentionFn:
    return _BACKEND


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Attention over (B, L, H, D) tensors; `mask` (B, Lk) bool marks keys to attend. Returns (B, Lq, H, D)."""
    return _BACKEND(q, k, v, mask)
