"""LoRA parity with diffusers on Qwen-Image 2.1 (tiny checkpoint): diffusers/PEFT as save_lora_weights writes it,
ComfyUI (`diffusion_model.`), kohya (the blocks' layers diffusers' reader re-dots correctly); one LoRA and two at
different scales, PSNR >= 40 dB against QwenImage21Pipeline + load_lora_weights + set_adapters."""
from __future__ import annotations

from gen import Generator
from lora_reference import ASSETS, LORAS, Parity, Reference

Q21 = LORAS / "qwen-image21-tiny"


def test_qwen_image21_matches_diffusers():
    from test_qwen_image21_pipeline import reference

    asset = ASSETS / "qwen-image21-tiny"
    parity = Parity(Generator.from_pretrained(asset, device="cpu", dtype="fp32"), Reference(None, pipe=reference(asset)),
                    dict(prompt="a blue dog", seed=5, num_inference_steps=2, height=32, width=32))
    parity.check([(Q21 / "diffusers.safetensors", 1.0)], changed_below=38)
    parity.check([(Q21 / "comfyui.safetensors", 0.8)], changed_below=38)
    parity.check([(Q21 / "kohya.safetensors", 1.5)], changed_below=45)  # the blocks' layers only
    parity.check([(Q21 / "diffusers.safetensors", 0.6), (Q21 / "comfyui.safetensors", -0.9)], changed_below=38)
