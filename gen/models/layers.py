"""Small layers several of our DiTs share (no weights of their own beyond plain Linear layers)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class MLPEmbedder(nn.Module):
    """Linear -> SiLU -> Linear (diffusers' TimestepEmbedding / PixArtAlphaTextProjection): `linear_1`, `linear_2`."""

    def __init__(self, in_dim: int, dim: int):
        super().__init__()
        self.linear_1 = nn.Linear(in_dim, dim)
        self.linear_2 = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(F.silu(self.linear_1(x)))


def project(x: torch.Tensor, *layers: nn.Module) -> tuple[torch.Tensor, ...]:
    """`x` through several Linear layers that all read it: one matmul when gen/fuse.py joined exactly this group
    (the first layer then holds the joined weight), else one call per layer."""
    sizes = getattr(layers[0], "joined_sizes", None)
    if sizes is None:
        return tuple(layer(x) for layer in layers)
    if len(sizes) != len(layers):
        raise RuntimeError(f"layer joined as a group of {len(sizes)} called as a group of {len(layers)}")
    return F.linear(x, layers[0].joined_weight, layers[0].joined_bias).split(sizes, dim=-1)
