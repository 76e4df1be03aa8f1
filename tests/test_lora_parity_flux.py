"""LoRA parity with diffusers on FLUX.1 (tiny checkpoint): one LoRA and several at different scales, in every format of
assets/loras/flux-tiny diffusers loads (diffusers/PEFT incl. rank/alpha patterns, kohya, ComfyUI, XLabs), same seed,
PSNR >= 40 dB against FluxPipeline + load_lora_weights + set_adapters."""
from __future__ import annotations

import pytest
from diffusers import FluxPipeline

from gen import Generator
from lora_reference import ASSETS, LORAS, Parity, Reference

FLUX = LORAS / "flux-tiny"
KW = dict(prompt="a red circle on a blue background", seed=3, num_inference_steps=2, height=32, width=32,
          guidance_scale=3.5)


@pytest.fixture(scope="module")
def parity():
    return Parity(Generator.from_pretrained(ASSETS / "flux-tiny", device="cpu"),
                  Reference(FluxPipeline, ASSETS / "flux-tiny"), KW)


@pytest.mark.parametrize("loras", [
    [(FLUX / "diffusers.safetensors", 1.0)],
    [(FLUX / "diffusers_patterns.safetensors", 1.5)],  # PEFT rank_pattern / alpha_pattern
    [(FLUX / "kohya.safetensors", 1.5)],
    [(FLUX / "comfyui.safetensors", -1.2)],
    [(FLUX / "xlabs.safetensors", 2.0)],
    [(FLUX / "diffusers.safetensors", 0.8), (FLUX / "kohya.safetensors", -0.6)],
    [(FLUX / "xlabs.safetensors", 1.5), (FLUX / "comfyui.safetensors", 0.7), (FLUX / "diffusers_patterns.safetensors", 2.0)],
], ids=["diffusers", "peft-patterns", "kohya", "comfyui", "xlabs", "two", "three"])
def test_flux_matches_diffusers(parity, loras):
    parity.check(loras, changed_below=38)
