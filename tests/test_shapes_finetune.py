"""The GPU fine-tuning path of gen-shapes, checked on the CPU: the training VAE equals diffusers' AutoencoderKL, the
two-part encoder pack equals the full SmolLM2 (bit for bit, without the gguf package), stash + train in two calls,
and a seconds-long run of the whole fine-tune whose output the export turns into a model folder with its guide."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from training.shapes import configs, encoder_pack, finetune

ASSETS = Path(__file__).resolve().parents[1] / "assets"
MODEL = ASSETS / "gen-shapes"


def test_training_vae_equals_diffusers():
    from diffusers import AutoencoderKL as Reference

    from training.shapes.vae import AutoencoderKL

    ref = Reference.from_pretrained(MODEL / "vae").float().eval()
    ours, stats = finetune.load_vae(MODEL, torch.device("cpu"))
    assert stats == {"scaling_factor": ref.config.scaling_factor, "shift_factor": ref.config.shift_factor}
    assert isinstance(ours, AutoencoderKL) and set(ours.state_dict()) == set(ref.state_dict())
    x = torch.rand(2, 3, 128, 128, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        mean, logvar = ours.encode(x)
        dist = ref.encode(x).latent_dist
        assert torch.equal(mean, dist.mean) and torch.equal(logvar, dist.logvar)
        assert torch.equal(ours.decode(mean), ref.decode(mean).sample)


def test_training_dit_is_ours_with_the_shipped_weights():
    from diffusers import QwenImageTransformer2DModel

    dit = finetune.load_dit(MODEL, torch.device("cpu")).eval()
    ref = QwenImageTransformer2DModel.from_pretrained(MODEL / "transformer").float().eval()
    g = torch.Generator().manual_seed(1)
    x, e = torch.randn(1, 64, 32, generator=g), torch.randn(1, 7, 576, generator=g)
    kw = dict(hidden_states=x, encoder_hidden_states=e, encoder_hidden_states_mask=torch.ones(1, 7, dtype=torch.long),
              timestep=torch.tensor([0.4]), img_shapes=[[(1, 8, 8)]])
    with torch.no_grad():
        assert (dit(**kw) - ref(**kw, return_dict=False)[0]).abs().max() < 1e-4


@pytest.fixture(scope="module")
def pack_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("pack")
    info = encoder_pack.pack(out)
    assert len(info["part_bytes"]) == 2 and max(info["part_bytes"]) < 14.5 * 2**20  # each fits one device call
    return out


def test_dequantize_is_the_gguf_packages(pack_dir):
    import gguf

    from gen.llm.gguf import smollm2_path

    reader = gguf.GGUFReader(str(smollm2_path()))
    seen = set()
    for t in reader.tensors:
        kind = int(t.tensor_type)
        if kind in seen or kind not in (encoder_pack.Q4_1, encoder_pack.Q8_0, encoder_pack.F32):
            continue
        seen.add(kind)
        shape = tuple(int(n) for n in reversed(t.shape))
        assert np.array_equal(encoder_pack.dequantize(kind, np.array(t.data), shape),
                              gguf.quants.dequantize(t.data, t.tensor_type)), t.name
    assert seen == {encoder_pack.Q4_1, encoder_pack.Q8_0, encoder_pack.F32}


def test_two_part_pack_equals_the_full_encoder(pack_dir, tmp_path):
    from gen.llm import registry
    from gen.llm.gguf import smollm2_path

    stashed = finetune.stash(pack_dir / "part-0", tmp_path / "stash")
    parts = finetune.pack_parts([pack_dir / "part-1"], tmp_path / "stash")
    assert [p.name for p in parts] == ["part-1", "part-0"] and stashed == parts[1]
    llm = encoder_pack.load_pack(parts, "cpu")
    full = registry.get_llm(smollm2_path(), "cpu", torch.float32)
    texts = [configs.PROMPT_TEMPLATE.format(t) for t in
             ("a tiny scarlet disk in the upper left corner, navy backdrop", "a large yellow star in the center "
              "on a purple background", "")]
    a, b = llm.encode(texts, hidden_layer=configs.ENCODER_LAYER), full.encode(texts, hidden_layer=configs.ENCODER_LAYER)
    assert torch.equal(a.mask, b.mask) and torch.equal(a.hidden, b.hidden)
    with pytest.raises(ValueError, match="needs all its parts"):
        encoder_pack.load_pack([pack_dir / "part-1"], "cpu")


def test_tiny_finetune_then_export(pack_dir, tmp_path, monkeypatch):
    import sys

    from gen.generator import Generator

    finetune.stash(pack_dir / "part-0", tmp_path / "stash")
    out = tmp_path / "run"
    with monkeypatch.context() as m:  # the GPU machine has neither
        m.setitem(sys.modules, "diffusers", None)
        m.setitem(sys.modules, "gguf", None)
        finetune.main(["train", "--pack", str(pack_dir / "part-1"), "--stash", str(tmp_path / "stash"),
                       "--out", str(out), "--tiny"])
    files = sorted(p.name for p in out.iterdir())
    assert files == ["dit-0.safetensors", "dit-1.safetensors", "dit-2.safetensors", "meta.tar", "run.json",
                     "vae.safetensors", "vae_stats.json"]
    run = json.loads((out / "run.json").read_text())
    assert run["augmented"] and run["dit_steps"] >= 2 and run["decoder_steps"] >= 1
    shipped = load_file(str(MODEL / "vae" / "diffusion_pytorch_model.safetensors"))
    tuned = load_file(str(out / "vae.safetensors"))
    assert torch.equal(tuned["encoder.conv_in.weight"], shipped["encoder.conv_in.weight"].float())  # encoder frozen
    assert not torch.equal(tuned["decoder.conv_out.weight"], shipped["decoder.conv_out.weight"].float())

    from training.shapes.export import export

    folder = export(out, tmp_path / "exported")
    guide = json.loads((folder / "prompt_guide.json").read_text())
    assert "crimson" in guide["reads"]["words"]["color"]  # the augmented model reads its augmentation words
    assert sum(f.stat().st_size for f in folder.rglob("*") if f.is_file()) <= 30e6
    image = Generator.from_pretrained(folder).generate("a red circle", seed=0, num_inference_steps=2).images[0]
    assert image.size == (128, 128)
