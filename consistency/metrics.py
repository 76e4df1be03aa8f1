"""Image similarity metrics on uint8 RGB arrays: PSNR, SSIM, mean absolute difference, CLIP embedding cosine."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from gen.types import GenError


def _f64(a) -> np.ndarray:
    return np.asarray(a, dtype=np.float64)


def psnr(a, b) -> float:
    """Peak signal-to-noise ratio in dB for 8-bit images; inf when they are equal."""
    mse = np.mean((_f64(a) - _f64(b)) ** 2)
    return float("inf") if mse == 0 else float(10 * np.log10(255.0**2 / mse))


def mad(a, b) -> float:
    """Mean absolute pixel difference, in 0..255 units."""
    return float(np.mean(np.abs(_f64(a) - _f64(b))))


def _gaussian(size: int, sigma: float) -> np.ndarray:
    x = np.arange(size, dtype=np.float64) - (size - 1) / 2
    k = np.exp(-(x**2) / (2 * sigma**2))
    return k / k.sum()


def _blur(x: np.ndarray, k: np.ndarray) -> np.ndarray:
    """Separable 'valid' filtering of (H, W, C) with the 1-D kernel `k` along H then W."""
    n = len(k)
    x = np.lib.stride_tricks.sliding_window_view(x, n, axis=0) @ k  # (H-n+1, W, C)
    return np.lib.stride_tricks.sliding_window_view(x, n, axis=1) @ k  # (H-n+1, W-n+1, C)


def ssim(a, b, window: int = 11, sigma: float = 1.5) -> float:
    """Structural similarity (Wang et al. 2004) with a Gaussian window, averaged over pixels and channels.

    The window shrinks (odd size) for images smaller than `window` pixels.
    """
    x, y = _f64(a), _f64(b)
    assert x.shape == y.shape, (x.shape, y.shape)
    if x.ndim == 2:
        x, y = x[..., None], y[..., None]
    n = min(window, *x.shape[:2])
    n -= 1 - n % 2  # odd
    k = _gaussian(n, sigma * n / window)
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    mx, my = _blur(x, k), _blur(y, k)
    vx = _blur(x * x, k) - mx * mx
    vy = _blur(y * y, k) - my * my
    cxy = _blur(x * y, k) - mx * my
    s = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx * mx + my * my + c1) * (vx + vy + c2))
    return float(s.mean())


class ClipScorer:
    """Cosine similarity of CLIP image embeddings (CLIPVisionModelWithProjection + its image processor)."""

    def __init__(self, path: str | Path, device: torch.device):
        from transformers import CLIPImageProcessor, CLIPVisionModelWithProjection

        path = Path(path)
        if not path.is_dir():
            raise GenError(f"CLIP model folder {str(path)!r} does not exist (clip_model / --clip-model)")
        processor_dir = path / "image_processor" if (path / "image_processor").is_dir() else path
        try:
            self.processor = CLIPImageProcessor.from_pretrained(processor_dir)
            self.model = CLIPVisionModelWithProjection.from_pretrained(path).to(device).eval()
        except (OSError, ValueError) as e:
            raise GenError(f"cannot load a CLIP vision model from {str(path)!r}: {e}") from None
        self.path = path
        self.device = device

    @torch.no_grad()
    def embed(self, image: np.ndarray) -> torch.Tensor:
        inputs = self.processor(images=[Image.fromarray(image)], return_tensors="pt").to(self.device)
        e = self.model(**inputs).image_embeds.double()  # (1, D)
        return e / e.norm(dim=-1, keepdim=True)

    def cosine(self, a: np.ndarray, b: np.ndarray) -> float:
        return float((self.embed(a) * self.embed(b)).sum())


def compare(golden: np.ndarray, output: np.ndarray, clip: ClipScorer | None = None) -> dict[str, float]:
    """Every metric for one pair of (H, W, 3) uint8 images of the same shape."""
    assert golden.shape == output.shape, (golden.shape, output.shape)
    values = {"psnr": psnr(golden, output), "ssim": ssim(golden, output), "mad": mad(golden, output)}
    if clip is not None:
        values["clip"] = clip.cosine(golden, output)
    return values
