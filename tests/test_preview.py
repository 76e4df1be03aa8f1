"""Latent previews (stages/preview.py): a linear latent -> RGB map fitted from a model's own VAE."""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from gen import Generator
from stages.preview import LatentPreview, color_fields

ASSETS = Path(__file__).resolve().parents[1] / "assets"


@torch.no_grad()
def test_preview_of_gen_shapes_latents_shows_the_colours():
    vae = Generator.from_pretrained(ASSETS / "gen-shapes", device="cpu").pipeline.vae
    scale, shift = vae.config.scaling_factor, vae.config.shift_factor

    def encode(pixels):
        return (vae.encode(pixels).latent_dist.mode() - shift) * scale

    preview = LatentPreview.fit(encode)
    held_out = color_fields(6, 64, seed=99)  # images the fit never saw
    latents = encode(held_out)
    target = F.adaptive_avg_pool2d(held_out, latents.shape[-2:])
    got = torch.stack([preview.rgb(z) for z in latents])
    err, blank = (got - target).abs().mean(), target.abs().mean()  # of a [-1, 1] range
    assert err < 0.25 and err < 0.4 * blank, (err, blank)  # roughly the right colours: a preview, not the image
    image = preview.image(latents[0])
    assert image.size == (latents.shape[-1], latents.shape[-2]) and image.mode == "RGB"
