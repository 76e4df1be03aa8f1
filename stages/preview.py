"""Cheap previews of a generation in progress: a linear map from latent channels to RGB, no VAE call per step.

The map is fitted once per loaded model from its own VAE (`LatentPreview.fit`): a few synthetic images of smooth
colour fields are encoded to normalised latents, and least squares finds the 3 x C matrix (plus bias) that best
gives each latent pixel the mean colour of the image patch it covers. It works for any checkpoint a user brings,
where published per-family factors would only fit the released weights. A preview is the map applied to the
loop's latents: one small image per latent frame, at latent resolution (upscaled for display by the caller).
"""
from __future__ import annotations

import contextlib
import contextvars
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

# (N, 3, H, W) pixels in [-1, 1] -> (N, C, H / s, W / s) normalised latents, as the denoise loop holds them
Encode = Callable[[torch.Tensor], torch.Tensor]
# step (1-based), total steps, the preview of the first output (its first frame for video)
PreviewFn = Callable[[int, int, Image.Image], None]

# the previews the generation running in this thread asked for: (callback, every how many steps), or None
_WANTED: contextvars.ContextVar[tuple[PreviewFn, int] | None] = contextvars.ContextVar("previews", default=None)


@contextlib.contextmanager
def previews(callback: PreviewFn | None, every: int = 1):
    """Within the block, this thread's generation calls `callback` every `every` steps (and at the last)."""
    if every < 1:
        raise ValueError(f"preview_every must be at least 1, got {every}")
    token = _WANTED.set(None if callback is None else (callback, every))
    try:
        yield
    finally:
        _WANTED.reset(token)


def wanted() -> tuple[PreviewFn, int] | None:
    return _WANTED.get()


def color_fields(n: int, size: int, seed: int = 0) -> torch.Tensor:
    """`n` smooth random colour images (N, 3, size, size) in [-1, 1]: coarse random colours, bilinearly upsampled,
    plus a few flat ones (black, white, primaries), so the fit sees the whole colour cube."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(n, 3, 4, 4, generator=g) * 2 - 1
    images = F.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False)
    flat = torch.tensor([[-1, -1, -1], [1, 1, 1], [1, -1, -1], [-1, 1, -1], [-1, -1, 1]], dtype=torch.float32)
    return torch.cat([images, flat[:, :, None, None].expand(-1, -1, size, size)])


class LatentPreview:
    """latents (C, ...) -> RGB through `weight` (3, C) and `bias` (3,)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor):
        assert weight.ndim == 2 and weight.shape[0] == 3 and bias.shape == (3,), (weight.shape, bias.shape)
        self.weight, self.bias = weight.float(), bias.float()

    @classmethod
    @torch.no_grad()
    def fit(cls, encode: Encode, size: int = 64, n: int = 24) -> "LatentPreview":
        pixels = color_fields(n, size)
        latents = encode(pixels).float().cpu()  # (N, C, h, w)
        if latents.ndim != 4:
            raise ValueError(f"the preview encoder must give (N, C, h, w) latents, got {tuple(latents.shape)}")
        target = F.adaptive_avg_pool2d(pixels, latents.shape[-2:])  # (N, 3, h, w): the patch each latent covers
        x = latents.permute(0, 2, 3, 1).reshape(-1, latents.shape[1])  # (N*h*w, C)
        y = target.permute(0, 2, 3, 1).reshape(-1, 3)
        x1 = torch.cat([x, torch.ones(len(x), 1)], dim=1)
        solution = torch.linalg.lstsq(x1.double(), y.double()).solution.float()  # (C + 1, 3)
        return cls(solution[:-1].T.contiguous(), solution[-1])

    def rgb(self, latents: torch.Tensor) -> torch.Tensor:
        """(C, ...) -> (3, ...) in [-1, 1]."""
        flat = latents.float().cpu().reshape(latents.shape[0], -1)
        out = self.weight @ flat + self.bias[:, None]
        return out.reshape(3, *latents.shape[1:]).clamp(-1, 1)

    def image(self, latents: torch.Tensor) -> Image.Image:
        """One (C, h, w) latent image -> a PIL image of h x w pixels."""
        rgb = ((self.rgb(latents) + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()
        return Image.fromarray(np.ascontiguousarray(rgb))
