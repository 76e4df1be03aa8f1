"""LoRA parity with diffusers on Qwen-Image (tiny checkpoint): diffusers/PEFT, Qwen-Image-Lightning, ComfyUI and kohya
files, one LoRA and two at different scales, PSNR >= 40 dB against QwenImagePipeline + load_lora_weights + set_adapters."""
from __future__ import annotations

import pytest
from diffusers import QwenImagePipeline

from gen import Generator
from lora_reference import ASSETS, LORAS, Parity, Reference

QWEN = LORAS / "qwen-image-tiny"
KW = dict(prompt="a cozy cabin", seed=5, num_inference_steps=2, height=32, width=32, true_cfg_scale=1.0)


@pytest.fixture(scope="module")
def parity():
    return Parity(Generator.from_pretrained(ASSETS / "qwen-image-tiny", device="cpu"),
                  Reference(QwenImagePipeline, ASSETS / "qwen-image-tiny"), KW)


@pytest.mark.parametrize("loras", [
    [(QWEN / "diffusers.safetensors", 1.0)],
    [(QWEN / "lightning.safetensors", 0.7)],
    [(QWEN / "comfyui.safetensors", 0.7)],
    [(QWEN / "kohya.safetensors", 1.2)],
    [(QWEN / "diffusers.safetensors", 0.6), (QWEN / "lightning.safetensors", -0.4)],
], ids=["diffusers", "lightning", "comfyui", "kohya", "two"])
def test_qwen_image_matches_diffusers(parity, loras):
    parity.check(loras, changed_below=35)
