"""Latent previews (stages/preview.py): a linear latent -> RGB map fitted from a model's own VAE."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
import torch.nn.functional as F

from gen import Generator
from gen.types import GenerationRequest
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


CASES = {  # asset -> request keywords
    "flux-tiny": dict(height=32, width=48),
    "flux-kontext-tiny": dict(height=32, width=32, images=["KONTEXT"]),
    "wan-t2v-tiny": dict(height=32, width=32, num_frames=5),
    "qwen-image-tiny": dict(height=32, width=32),
    "gen-shapes": dict(),
    "z-image-tiny": dict(height=32, width=32),
    "flux2-klein-tiny": dict(height=32, width=32),
    "qwen-image21-tiny": dict(height=64, width=64),
}


@pytest.mark.parametrize("asset", sorted(CASES))
def test_every_family_previews_each_step_without_changing_the_output(asset):
    kw = dict(CASES[asset])
    if kw.get("images") == ["KONTEXT"]:
        kw["images"] = [Image.new("RGB", (48, 48), (200, 30, 30))]
    gen = Generator.from_pretrained(ASSETS / asset, device="cpu")
    plain = gen.generate("a red circle", seed=4, num_inference_steps=3, **kw)
    seen = []
    req = GenerationRequest(prompt="a red circle", seed=4, num_inference_steps=3,
                            **{k: (tuple(v) if k == "images" else v) for k, v in kw.items()})
    result = gen.run(req, preview=lambda step, total, image: seen.append((step, total, image)), preview_every=2)
    assert [(s, t) for s, t, _ in seen] == [(2, 3), (3, 3)]  # every 2 steps and the last
    out = result.frames[0] if result.frames is not None else result.images[0]
    first = plain.frames[0] if plain.frames is not None else plain.images[0]
    assert np.array_equal(np.asarray(out), np.asarray(first))  # previews change nothing
    image = seen[-1][2]
    assert image.mode == "RGB" and 1 <= image.size[0] <= out.size[0] and 1 <= image.size[1] <= out.size[1]


def test_the_last_gen_shapes_preview_looks_like_the_image():
    gen = Generator.from_pretrained(ASSETS / "gen-shapes", device="cpu")
    seen = []
    req = GenerationRequest(prompt="a large yellow star in the center on a purple background", seed=1)
    result = gen.run(req, preview=lambda s, t, image: seen.append(image))
    final = np.asarray(result.images[0].resize(seen[-1].size, Image.BILINEAR)).astype(float)
    preview = np.asarray(seen[-1]).astype(float)
    assert np.abs(final.mean((0, 1)) - preview.mean((0, 1))).max() < 25  # roughly the right colours
    for c in range(3):  # and the shape where it is: each channel follows the image's (16 x 16 latent pixels)
        assert np.corrcoef(final[..., c].ravel(), preview[..., c].ravel())[0, 1] > 0.5
