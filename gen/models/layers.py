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
