"""LoRA parity with diffusers on Wan (tiny checkpoints): Wan2.1 T2V with diffusers/PEFT, lightx2v (lora_down/up, alpha,
diff_b biases, zero norm diffs), ComfyUI and musubi-tuner files, one and two LoRAs; Wan2.2 A14B with lightx2v's
high-noise / low-noise pair, each on its expert (diffusers' load_into_transformer_2). PSNR >= 40 dB."""
from __future__ import annotations

import pytest
from diffusers import WanPipeline

from gen import Generator
from lora_reference import ASSETS, LORAS, Parity, Reference

WAN = LORAS / "wan-t2v-tiny"
KW = dict(prompt="a cat surfing", seed=7, num_inference_steps=2, height=32, width=32, num_frames=5, guidance_scale=1.0)


@pytest.fixture(scope="module")
def parity():
    return Parity(Generator.from_pretrained(ASSETS / "wan-t2v-tiny", device="cpu"),
                  Reference(WanPipeline, ASSETS / "wan-t2v-tiny"), KW)


@pytest.mark.parametrize("loras, changed_below", [
    ([(WAN / "diffusers.safetensors", 3.0)], 38),
    ([(WAN / "lightx2v.safetensors", 3.0)], 38),
    ([(WAN / "comfyui.safetensors", 2.0)], 38),
    ([(WAN / "musubi.safetensors", 4.0)], 45),  # the blocks' layers only: a smaller change of the tiny picture
    ([(WAN / "diffusers.safetensors", 2.0), (WAN / "lightx2v.safetensors", -2.5)], 38),
], ids=["diffusers", "lightx2v", "comfyui", "musubi", "two"])
def test_wan_matches_diffusers(parity, loras, changed_below):
    parity.check(loras, changed_below=changed_below)


def test_wan22_experts_each_take_their_lora():
    pair = [(LORAS / "wan22-a14b-tiny" / "high_noise.safetensors", 3.0, "transformer"),
            (LORAS / "wan22-a14b-tiny" / "low_noise.safetensors", 2.5, "transformer_2")]
    parity = Parity(Generator.from_pretrained(ASSETS / "wan22-a14b-tiny", device="cpu"),
                    Reference(WanPipeline, ASSETS / "wan22-a14b-tiny"), dict(KW, num_inference_steps=4))
    parity.check(pair, changed_below=38)
    parity.check(pair[1:], changed_below=45)  # the low-noise expert's only: the high-noise one runs without
    adapters = parity.ours.pipeline.loras
    assert adapters.capacity["transformer"] == {} and adapters.capacity["transformer_2"]
