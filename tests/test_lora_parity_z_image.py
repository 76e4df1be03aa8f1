"""LoRA parity with diffusers on Z-Image (tiny checkpoint): diffusers/PEFT as save_lora_weights writes it, ComfyUI
(`diffusion_model.`, lora_down/up + alpha, the output projection under its original name `attention.out`), kohya; one
LoRA and two at different scales, PSNR >= 40 dB against ZImagePipeline + load_lora_weights + set_adapters. The original
fused `attention.qkv` (which diffusers reads only in another layout) is checked against a hand merge."""
from __future__ import annotations

from diffusers import ZImagePipeline

from gen import Generator
from gen.lora.formats import ZIMAGE
from lora_reference import ASSETS, LORAS, Parity, Reference
from pipelines.z_image import Z_IMAGE_DIT
from test_lora_parity_flux2 import hand_merge_check

ZI = LORAS / "z-image-tiny"


def test_z_image_matches_diffusers():
    asset = ASSETS / "z-image-tiny"
    parity = Parity(Generator.from_pretrained(asset, device="cpu", dtype="fp32"),
                    Reference(ZImagePipeline, asset),
                    dict(prompt="a red cat sitting on grass", seed=3, num_inference_steps=2, height=32, width=32,
                         guidance_scale=0.0))
    parity.check([(ZI / "diffusers.safetensors", 1.0)], changed_below=38)
    parity.check([(ZI / "comfyui.safetensors", 0.8)], changed_below=38)
    parity.check([(ZI / "kohya.safetensors", 1.5)], changed_below=38)
    parity.check([(ZI / "diffusers.safetensors", 0.6), (ZI / "kohya.safetensors", -1.2)], changed_below=38)


def test_z_image_fused_qkv_lands_on_q_k_v(tmp_path):
    hand_merge_check(tmp_path, "z-image-tiny", Z_IMAGE_DIT, ZIMAGE, ZI / "qkv.safetensors", None)
