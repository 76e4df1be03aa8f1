"""LoRA parity with diffusers on FLUX.2 (tiny checkpoint): diffusers/PEFT as save_lora_weights writes it, ComfyUI /
ai-toolkit (BFL names under `diffusion_model.`), kohya; one LoRA and two at different scales, same seed, PSNR >= 40 dB
against Flux2Pipeline + load_lora_weights + set_adapters. The final modulation, which diffusers' reader does not swap
from BFL's (shift, scale), is checked against a hand merge (the helper the Z-Image test shares)."""
from __future__ import annotations

import types

import torch
from safetensors.torch import load_file, save_file

from gen import Generator
from gen.loading import load_dit
from gen.lora import read_lora
from gen.lora.formats import FLUX2
from gen.transforms.lora import LoraAdapters
from lora_reference import ASSETS, LORAS, Parity, Reference
from pipelines.flux2 import FLUX2_DIT

F2 = LORAS / "flux2-tiny"


def test_flux2_matches_diffusers():
    from test_flux2_pipeline import reference_pipeline

    asset = ASSETS / "flux2-tiny"
    parity = Parity(Generator.from_pretrained(asset, device="cpu", dtype="fp32"),
                    Reference(None, pipe=reference_pipeline(asset)),
                    dict(prompt="a red fox in the snow", seed=3, num_inference_steps=2, height=32, width=32))
    parity.check([(F2 / "diffusers.safetensors", 1.0)], changed_below=38)
    parity.check([(F2 / "comfyui.safetensors", 1.2)], changed_below=38)
    parity.check([(F2 / "kohya.safetensors", 1.5)], changed_below=38)
    parity.check([(F2 / "diffusers.safetensors", 0.7), (F2 / "comfyui.safetensors", -0.8)], changed_below=38)


def test_flux2_final_modulation_is_swapped_into_ours(tmp_path):
    hand_merge_check(tmp_path, "flux2-tiny", FLUX2_DIT, FLUX2, F2 / "bfl_all.safetensors",
                     ("final_layer.adaLN_modulation.1", "img_in"))


def _hand_delta(module: str, delta: torch.Tensor) -> dict[str, torch.Tensor]:
    """Their module's delta W on our weights, the splits and swaps written out by hand."""
    if module == "final_layer.adaLN_modulation.1":  # BFL: (shift, scale); ours (scale, shift)
        shift, scale = delta.chunk(2)
        return {"norm_out.linear.weight": torch.cat([scale, shift])}
    if module.endswith("attention.qkv"):  # Z-Image's original fused q/k/v, 1:1:1
        block = module[:-len(".qkv")]
        return {f"{block}.{n}.weight": part for n, part in zip(("to_q", "to_k", "to_v"), delta.chunk(3))}
    return {{"img_in": "x_embedder", "txt_in": "context_embedder"}[module] + ".weight": delta}


def hand_merge_check(tmp_path, asset, dit, family, file, modules):
    """`modules` of `file` (None: all) merged by us (fuse) == merged by hand from the raw keys."""
    raw = load_file(file)
    names = {k[len("diffusion_model."):-len(".lora_down.weight")] for k in raw if k.endswith(".lora_down.weight")}
    names = sorted(names if modules is None else set(modules))
    path = tmp_path / "part.safetensors"
    save_file({k: v for k, v in raw.items() if any(k.startswith(f"diffusion_model.{m}.") for m in names)}, path)
    cpu = torch.device("cpu")
    model = load_dit(ASSETS / asset / "transformer", cpu, torch.float32)
    want = {k: v.clone() for k, v in model.state_dict().items()}
    before = {k: v.clone() for k, v in want.items()}
    scale = 1.3
    for m in names:
        down, up = raw[f"diffusion_model.{m}.lora_down.weight"], raw[f"diffusion_model.{m}.lora_up.weight"]
        alpha = float(raw[f"diffusion_model.{m}.alpha"])
        for name, d in _hand_delta(m, scale * alpha / down.shape[0] * (up @ down)).items():
            want[name] += d
    pipeline = types.SimpleNamespace(dits=lambda: [("transformer", model, dit)], device=cpu, dtype=torch.float32)
    LoraAdapters(pipeline, fuse=True).set([(str(path), scale)])
    got = model.state_dict()
    touched = {k for k in want if not torch.equal(want[k], before[k])}
    assert touched and touched == {k for k in got if not torch.equal(got[k], before[k])}
    assert read_lora(path, family).format.startswith(("BFL", "ComfyUI"))
    for k in want:
        assert torch.allclose(got[k], want[k], rtol=0, atol=1e-6), k
