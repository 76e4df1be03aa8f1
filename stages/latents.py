"""Latent preparation: seeded noise drawn as diffusers draws it, and the 2x2 patch packing FLUX/Qwen-Image use."""
from __future__ import annotations

import torch


def draw_noise(shape: tuple[int, ...], seed: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """Standard normal noise from a CPU generator seeded with `seed`, then moved to `device`.

    This is what diffusers' `randn_tensor` does with `generator=torch.Generator("cpu").manual_seed(seed)`,
    so the same seed gives the same noise (and image) as the reference pipeline on any device.
    """
    generator = torch.Generator("cpu").manual_seed(seed)
    return torch.randn(shape, generator=generator, dtype=dtype).to(device)


def pack_2x2(latents: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, H/2 * W/2, C*4): each 2x2 latent patch becomes one token."""
    b, c, h, w = latents.shape
    x = latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)  # (B, H/2, W/2, C, 2, 2)
    return x.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_2x2(tokens: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """(B, H/2 * W/2, C*4) -> (B, C, H, W); `h`, `w` are latent sizes."""
    b, _, d = tokens.shape
    x = tokens.view(b, h // 2, w // 2, d // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)  # (B, C, H/2, 2, W/2, 2)
    return x.reshape(b, d // 4, h, w)


def image_token_ids(h: int, w: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """(h*w, 3) position ids (0, row, col) of packed latent tokens, as FLUX's RoPE expects."""
    ids = torch.zeros(h, w, 3)
    ids[..., 1] = torch.arange(h)[:, None]
    ids[..., 2] = torch.arange(w)[None, :]
    return ids.reshape(h * w, 3).to(device=device, dtype=dtype)


def latent_stats(vae, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A video-style VAE's per-channel latent mean and std (config `latents_mean` / `latents_std`), each shaped
    (1, z, 1, 1, 1) on `like`'s device in its dtype. Normalised latents are (z - mean) / std."""
    c = vae.config
    mean = torch.tensor(c.latents_mean).view(1, c.z_dim, 1, 1, 1).to(like.device, like.dtype)
    std = torch.tensor(c.latents_std).view(1, c.z_dim, 1, 1, 1).to(like.device, like.dtype)
    return mean, std
