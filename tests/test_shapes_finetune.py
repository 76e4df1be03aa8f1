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
    # each part fits one device call beside the ~50 MiB repository
    assert len(info["part_bytes"]) == 3 and max(info["part_bytes"]) < 10 * 2**20
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


def test_three_part_pack_equals_the_full_encoder(pack_dir, tmp_path):
    from gen.llm import registry
    from gen.llm.gguf import smollm2_path

    stashed = [finetune.stash(pack_dir / f"part-{k}", tmp_path / "stash") for k in (0, 1)]
    parts = finetune.pack_parts([pack_dir / "part-2"], tmp_path / "stash")
    assert [p.name for p in parts] == ["part-2", "part-0", "part-1"] and stashed == parts[1:]
    llm = encoder_pack.load_pack(parts, "cpu")
    full = registry.get_llm(smollm2_path(), "cpu", torch.float32)
    texts = [configs.PROMPT_TEMPLATE.format(t) for t in
             ("a tiny scarlet disk in the upper left corner, navy backdrop", "a large yellow star in the center "
              "on a purple background", "")]
    a, b = llm.encode(texts, hidden_layer=configs.ENCODER_LAYER), full.encode(texts, hidden_layer=configs.ENCODER_LAYER)
    assert torch.equal(a.mask, b.mask) and torch.equal(a.hidden, b.hidden)
    with pytest.raises(ValueError, match="needs all its parts"):
        encoder_pack.load_pack([pack_dir / "part-2", pack_dir / "part-0"], "cpu")


def test_tiny_finetune_then_export(pack_dir, tmp_path, monkeypatch):
    import sys

    from gen.generator import Generator

    for k in (0, 1):
        finetune.stash(pack_dir / f"part-{k}", tmp_path / "stash")
    out, again, decoder = tmp_path / "run", tmp_path / "run2", tmp_path / "run3"
    common = ["--pack", str(pack_dir / "part-2"), "--stash", str(tmp_path / "stash"), "--tiny"]
    with monkeypatch.context() as m:  # the GPU machine has neither
        m.setitem(sys.modules, "diffusers", None)
        m.setitem(sys.modules, "gguf", None)
        finetune.main(["train", *common, "--out", str(out)])
        finetune.main(["train", *common, "--out", str(again), "--resume", str(out), "--vae-s", "0",
                       "--aux-weight", "0.1"])  # with the auxiliary text readout
        finetune.main(["train", *common, "--out", str(decoder), "--decoder-only"])
    files = sorted(p.name for p in out.iterdir())
    assert files == ["dit-0.safetensors", "dit-1.safetensors", "dit-2.safetensors", "meta.tar", "run.json",
                     "vae.safetensors", "vae_stats.json"]
    run = json.loads((out / "run.json").read_text())
    assert run["augmented"] and run["dit_steps"] >= 2 and run["vae_steps"] >= 1 and run["vae_encoder"]
    shipped = load_file(str(MODEL / "vae" / "diffusion_pytorch_model.safetensors"))
    tuned = load_file(str(out / "vae.safetensors"))
    for key in ("encoder.conv_in.weight", "decoder.conv_out.weight"):  # encoder and decoder trained
        assert not torch.equal(tuned[key], shipped[key].float()), key
    only_decoder = load_file(str(decoder / "vae.safetensors"))
    assert torch.equal(only_decoder["encoder.conv_in.weight"], shipped["encoder.conv_in.weight"].float())
    assert not torch.equal(only_decoder["decoder.conv_out.weight"], shipped["decoder.conv_out.weight"].float())
    # resumed: starts from the first run's weights (its VAE kept as it is with --vae-s 0), trains the DiT on
    assert json.loads((again / "run.json").read_text())["from"] == str(out)
    assert load_file(str(again / "vae.safetensors")).keys() == tuned.keys()
    assert all(torch.equal(v, tuned[k]) for k, v in load_file(str(again / "vae.safetensors")).items())
    first, second = (load_file(str(d / "dit-0.safetensors")) for d in (out, again))
    assert any(not torch.equal(first[k], second[k]) for k in first)

    from training.shapes.export import export

    folder = export(out, tmp_path / "exported")
    guide = json.loads((folder / "prompt_guide.json").read_text())
    assert "crimson" in guide["reads"]["words"]["color"]  # the augmented model reads its augmentation words
    assert sum(f.stat().st_size for f in folder.rglob("*") if f.is_file()) <= 30e6
    image = Generator.from_pretrained(folder).generate("a red circle", seed=0, num_inference_steps=2).images[0]
    assert image.size == (128, 128)


def test_background_cells_and_the_flat_latent_term():
    """The cells the blot fix flattens: only those whose pixels and neighbours' pixels are all background."""
    x = torch.full((1, 3, 128, 128), -0.5)
    x[:, :, 40:56, 64:80] = 0.9  # an object over latent cells rows 5-6, columns 8-9
    cells = finetune.background_cells(x)[0]
    assert cells.shape == (16, 16)
    assert not cells[4:8, 7:11].any() and cells[:3].all() and cells[9:].all() and cells[:, :6].all()
    assert int((~cells).sum()) == 16  # the object's 2x2 cells and the ring of cells around them
    x[:, :, 0, :] = 0.9  # a different top row does not change the background (the border's median)
    assert torch.equal(finetune.background_cells(x)[0][2:], cells[2:])
