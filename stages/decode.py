"""Decoding: VAE latents -> uint8 RGB images."""
from __future__ import annotations

import numpy as np
import torch
from PIL import Image


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    """(B, 3, H, W) in [-1, 1] -> PIL images, rounded as diffusers' image processor rounds."""
    x = (images.float() / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray((im * 255).round().astype(np.uint8)) for im in x]


@torch.no_grad()
def decode_image(vae, latents: torch.Tensor) -> list[Image.Image]:
    """Un-normalise with the VAE's scaling/shift factors, decode, convert to PIL."""
    scaling = vae.config.scaling_factor
    shift = vae.config.get("shift_factor", None) or 0.0
    z = latents / scaling + shift
    return to_pil(vae.decode(z.to(vae.dtype), return_dict=False)[0])
