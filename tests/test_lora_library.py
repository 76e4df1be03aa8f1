"""What the server needs from gen/lora, tested directly: a LoraLibrary of a folder (names by file stem, a request's
`loras` field checked with param paths like `loras[0].name`, files loaded once through a shared LRU cache bounded in
MB), and the per-rank application (2 CPU ranks apply the same set: same picture as one process)."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from gen import GenError, Generator
from gen.lora import LoraCache, LoraLibrary, LoraSpec
from gen.lora.formats import FLUX
from helpers import psnr

ASSETS = Path(__file__).resolve().parents[1] / "assets"
FLUX_LORAS = ASSETS / "loras" / "flux-tiny"


@pytest.fixture
def folder(tmp_path):
    for name in ("kohya", "xlabs"):
        shutil.copy(FLUX_LORAS / f"{name}.safetensors", tmp_path / f"{name}.safetensors")
    shutil.copytree(FLUX_LORAS / "peft_folder", tmp_path / "peft_style")  # a folder holding one file: its name
    (tmp_path / "notes.txt").write_text("not a LoRA")
    return tmp_path


def test_library_lists_resolves_and_checks_requests(folder):
    lib = LoraLibrary(folder)
    assert lib.names() == ["kohya", "peft_style", "xlabs"]
    assert [e["name"] for e in lib.list()] == lib.names() and all(e["size_mb"] > 0 for e in lib.list())
    specs = lib.specs([{"name": "kohya", "scale": 0.8}, {"name": "peft_style"}], family=FLUX)
    assert specs == (LoraSpec(str(folder / "kohya.safetensors"), 0.8), LoraSpec(str(folder / "peft_style"), 1.0))
    cases = [([{"name": "kohya"}, {"name": "nope"}], "loras[1].name", "unknown LoRA 'nope'; this server offers: kohya"),
             ([{"name": "kohya", "scale": 11}], "loras[0].scale", "finite number in"),
             ([{"name": "kohya", "scale": float("nan")}], "loras[0].scale", "finite number in"),
             ([{"name": "../kohya"}], "loras[0].name", "unknown LoRA"),
             ([{"name": "kohya", "weight": 1}], "loras[0].weight", "unknown LoRA fields"),
             ([{"name": "kohya", "target": "transformer_2"}], "loras[0].target", "not a transformer of this model"),
             ([{"name": "kohya"}] * 5, "loras", "at most 4 LoRAs per request, got 5"),
             ("kohya", "loras", "must be a list"),
             ([{"name": 3}], "loras[0].name", "non-empty string")]
    for items, param, message in cases:
        with pytest.raises(GenError, match=message) as e:
            lib.specs(items, family=FLUX, slots=("transformer",))
        assert e.value.param == param, items
    (folder / "broken.safetensors").write_bytes((folder / "kohya.safetensors").read_bytes()[:3000])
    with pytest.raises(GenError, match="broken.safetensors is truncated") as e:
        lib.specs([{"name": "kohya"}, {"name": "broken"}], family=FLUX)
    assert e.value.param == "loras[1].name"
    with pytest.raises(GenError) as e:
        LoraLibrary(folder / "missing")
    assert e.value.param == "lora_dir"


def test_cache_is_lru_bounded_in_mb_and_shared_with_the_pipeline(folder):
    one = LoraCache(max_mb=0.06)  # 62914 bytes: kohya (57344 in fp32) or xlabs (12288), not both
    a = one.get(folder / "kohya.safetensors", FLUX)
    assert one.get(folder / "kohya.safetensors", FLUX) is a and one.loads == 1
    one.get(folder / "xlabs.safetensors", FLUX)
    assert one.nbytes <= one.max_bytes and len(one.entries) == 1  # kohya dropped
    assert one.get(folder / "kohya.safetensors", FLUX) is not a and one.loads == 3
    with pytest.raises(GenError) as e:
        LoraCache(max_mb=-1)
    assert e.value.param == "max_lora_cache_mb"
    gen = Generator.from_pretrained(ASSETS / "flux-tiny", device="cpu", lora_dir=folder)
    assert gen.lora_library.cache is gen.pipeline.loras.cache
    kw = dict(prompt="a dog", seed=8, num_inference_steps=1, height=32, width=32)
    by_name = gen.generate(**kw, loras=[("kohya", 1.2)]).images[0]
    assert gen.pipeline.loras.cache.loads == 1  # the library's check and the generation read the file once
    assert psnr(by_name, gen.generate(**kw, loras=[(folder / "kohya.safetensors", 1.2)]).images[0]) == float("inf")
    with pytest.raises(GenError, match="unknown LoRA 'nope'"):
        gen.generate(**kw, loras=[("nope", 1.0)])


def test_two_cpu_ranks_apply_the_same_set():
    kw = dict(prompt="a red square", seed=9, num_inference_steps=2, height=32, width=32)
    loras = [(str(FLUX_LORAS / "kohya.safetensors"), 1.5), (str(FLUX_LORAS / "diffusers.safetensors"), -0.7)]
    one = Generator.from_pretrained(ASSETS / "flux-tiny", device="cpu").generate(**kw, loras=loras).images[0]
    group = Generator.from_pretrained(ASSETS / "flux-tiny", device="cpu", num_gpus=2, ulysses_degree=2)
    try:
        assert psnr(group.generate(**kw, loras=loras).images[0], one) >= 40
        plain = group.generate(**kw, loras=[]).images[0]  # the set swapped out on every rank
        assert psnr(plain, Generator.from_pretrained(ASSETS / "flux-tiny", device="cpu").generate(**kw).images[0]) >= 40
    finally:
        group.close()
