"""Small helpers shared by the tests."""
from __future__ import annotations

import numpy as np
import torch


def rel_err(ours: torch.Tensor, ref: torch.Tensor) -> float:
    """Relative error ||ours - ref|| / ||ref|| (fp64)."""
    ours, ref = ours.detach().double(), ref.detach().double()
    return ((ours - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def psnr(a, b) -> float:
    """PSNR in dB between two uint8 images (PIL or arrays) of the same shape; inf when equal."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    assert a.shape == b.shape, (a.shape, b.shape)
    mse = np.mean((a - b) ** 2)
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)
