"""Single-file transformer checkpoints (`--transformer PATH`, component_loaders/single_file.py): each layout a small
writer makes from a tiny model folder's transformer (diffusers, original BFL FLUX / Wan, ComfyUI prefix, GGUF) loads
and gives the folder's pictures; the writers agree with diffusers' own converters; wrong, incomplete, mismatched and
truncated files are refused by name (exit code 2 on the CLI)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from checkpoint_writers import (comfy, flux_to_bfl, wan_to_original, write_gguf, write_safetensors)
from component_loaders.single_file import load_single_file
from gen import GenError, Generator
from gen.cli import main
from gen.families import DITS
from gen.transforms.join import join_projections
from helpers import psnr

ASSETS = Path(__file__).resolve().parents[1] / "assets"
CPU = torch.device("cpu")
CASES = {  # asset -> (GGUF architecture, ours -> original keys, request)
    "flux-tiny": ("flux", flux_to_bfl, dict(prompt="a red circle", seed=3, height=32, width=48,
                                            num_inference_steps=2)),
    "wan-t2v-tiny": ("wan", wan_to_original, dict(prompt="a red cat", seed=3, height=32, width=32, num_frames=5,
                                                  num_inference_steps=2)),
    "wan-i2v-tiny": ("wan", wan_to_original, dict(prompt="a red cat", seed=3, height=32, width=32, num_frames=5,
                                                  num_inference_steps=2,
                                                  images=[Image.new("RGB", (32, 32), (200, 40, 40))])),
    "qwen-image-tiny": ("qwen_image", lambda sd: dict(sd), dict(prompt="a red cat", seed=3, height=32, width=32,
                                                                num_inference_steps=2)),
}
LAYOUTS = ("diffusers", "original", "comfy", "gguf-f32", "gguf-bf16")


def transformer_state(asset: str) -> dict[str, torch.Tensor]:
    return load_file(str(next((ASSETS / asset / "transformer").glob("*.safetensors"))))


def write(asset: str, layout: str, folder: Path) -> Path:
    arch, to_original, _ = CASES[asset]
    sd = transformer_state(asset)
    if layout == "diffusers":
        return write_safetensors(folder / "t.safetensors", sd)
    if layout == "original":
        return write_safetensors(folder / "t.safetensors", to_original(sd))
    if layout == "comfy":  # an all-in-one file: other components' keys beside the DiT's
        return write_safetensors(folder / "t.safetensors", comfy(to_original(sd), {"vae.decoder.x": torch.ones(2)}))
    return write_gguf(folder / "t.gguf", arch, to_original(sd), layout.removeprefix("gguf-").upper())


def pictures(gen: Generator, asset: str) -> np.ndarray:
    result = gen.generate(**CASES[asset][2])
    return np.stack([np.asarray(p) for p in (result.frames or result.images)])


@pytest.fixture(scope="module")
def generators() -> dict:
    return {asset: Generator.from_pretrained(ASSETS / asset, device="cpu") for asset in CASES}


@pytest.fixture(scope="module")
def folder_pictures(generators) -> dict:
    return {asset: pictures(gen, asset) for asset, gen in generators.items()}


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("asset", list(CASES))
def test_each_layout_gives_the_folders_pictures(generators, folder_pictures, asset, layout, tmp_path):
    """The file's transformer, swapped into the loaded folder's pipeline (joined as the folder's is)."""
    gen = generators[asset]
    file = write(asset, layout, tmp_path)
    dit = DITS[gen.pipeline.dit.checkpoint_class]
    model = load_single_file(file, ASSETS / asset / "transformer", dit, CPU, torch.float32)
    join_projections(model)
    original = gen.pipeline.transformer
    gen.pipeline.transformer = gen.pipeline.components.modules["transformer"] = model
    try:
        ours = pictures(gen, asset)
    finally:
        gen.pipeline.transformer = gen.pipeline.components.modules["transformer"] = original
    assert psnr(ours, folder_pictures[asset]) >= 60  # inf for all but GGUF BF16 (weights rounded: 67-78 dB)


def test_generator_and_cli_take_a_file(folder_pictures, tmp_path):
    """Through Generator.from_pretrained(transformer=...) and `gen generate --transformer` (a ComfyUI BFL file)."""
    file = write("flux-tiny", "comfy", tmp_path)
    gen = Generator.from_pretrained(ASSETS / "flux-tiny", device="cpu", transformer=file)
    assert psnr(pictures(gen, "flux-tiny"), folder_pictures["flux-tiny"]) >= 60
    out = tmp_path / "o.png"
    args = ["generate", "--model-path", str(ASSETS / "flux-tiny"), "--transformer", str(file), "--prompt", "x",
            "--height", "32", "--width", "32", "--num-inference-steps", "1", "--device", "cpu", "--output", str(out)]
    assert main(args) == 0 and out.is_file()


def test_writers_agree_with_diffusers_converters():
    """Our BFL / Wan writers are the inverse of diffusers' single_file_utils converters (the reference key maps).
    Diffusers' FLUX converter splits single blocks at FLUX.1's real width, so those rows are real-size (1 column)."""
    from diffusers.loaders.single_file_utils import (convert_flux_transformer_checkpoint_to_diffusers,
                                                     convert_wan_transformer_to_diffusers)

    for asset in ("wan-t2v-tiny", "wan-i2v-tiny"):
        sd = transformer_state(asset)
        back = convert_wan_transformer_to_diffusers(wan_to_original(sd))
        assert back.keys() == sd.keys() and all(torch.equal(back[k], sd[k]) for k in sd)
    sd = transformer_state("flux-tiny")
    g = torch.Generator().manual_seed(0)
    for key in list(sd):
        if key.startswith("single_transformer_blocks.") and any(p in key for p in ("to_q.", "to_k.", "to_v.",
                                                                                     "proj_mlp.")):
            rows = 12288 if "proj_mlp" in key else 3072
            sd[key] = torch.randn(rows, 1, generator=g) if key.endswith("weight") else torch.randn(rows, generator=g)
    back = convert_flux_transformer_checkpoint_to_diffusers(flux_to_bfl(sd))
    assert back.keys() == sd.keys() and all(torch.equal(back[k], sd[k]) for k in sd)


def refusal(tmp_path, sd: dict, asset: str = "flux-tiny", gguf_arch: str | None = None) -> str:
    file = write_gguf(tmp_path / "t.gguf", gguf_arch, sd, "F32") if gguf_arch else \
        write_safetensors(tmp_path / "t.safetensors", sd)
    with pytest.raises(GenError) as e:
        load_single_file(file, ASSETS / asset / "transformer", DITS[
            {"flux-tiny": "FluxTransformer2DModel", "qwen-image-tiny": "QwenImageTransformer2DModel"}[asset]],
            CPU, torch.float32)
    message = str(e.value)
    assert str(file) in message and "\n" not in message
    return message


def test_wrong_files_are_refused_by_name(tmp_path):
    bfl = flux_to_bfl(transformer_state("flux-tiny"))
    assert "holds a WanTransformer3DModel (Wan (original) keys), but the model folder's transformer is " \
           "FluxTransformer2DModel" in refusal(tmp_path, wan_to_original(transformer_state("wan-t2v-tiny")))
    missing = {k: v for k, v in bfl.items() if k != "double_blocks.1.img_attn.proj.weight"}
    assert "missing transformer_blocks.1.attn.to_out.0.weight" in refusal(tmp_path, missing)
    assert "unexpected double_blocks.0.img_attn.extra.weight" in \
        refusal(tmp_path, {**bfl, "double_blocks.0.img_attn.extra.weight": torch.zeros(2)})
    schnell = flux_to_bfl(transformer_state("flux-schnell-tiny"))  # no guidance embedder: not this dev folder's
    assert "missing time_text_embed.guidance_embedder.linear_1.bias" in refusal(tmp_path, schnell)
    wide = {**bfl, "img_in.weight": torch.zeros(32, 64)}
    assert "wrong shape" in (m := refusal(tmp_path, wide)) and "x_embedder.weight (file (32, 64), model (32, 16))" in m
    odd = {**bfl, "single_blocks.0.linear1.weight": torch.zeros(10, 32)}
    assert "single_blocks.0.linear1.weight has 10 rows; our" in refusal(tmp_path, odd)
    unknown = refusal(tmp_path, {"a.weight": torch.ones(1)})
    assert "is not a FluxTransformer2DModel checkpoint in a known layout" in unknown
    assert "is a GGUF file of architecture 'wan'" in refusal(tmp_path, bfl, gguf_arch="wan")
    assert "holds a FluxTransformer2DModel" in refusal(tmp_path, bfl, asset="qwen-image-tiny", gguf_arch=None)


def test_truncated_files_are_refused_with_their_keys(tmp_path, capsys):
    bfl = flux_to_bfl(transformer_state("flux-tiny"))
    full = write_safetensors(tmp_path / "full.safetensors", bfl)
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(full.read_bytes()[:-3000])
    with pytest.raises(GenError, match=r"cut.safetensors is truncated \(\d+ bytes\): tensors .+ lie past its end"):
        load_single_file(cut, ASSETS / "flux-tiny" / "transformer", DITS["FluxTransformer2DModel"], CPU,
                         torch.float32)
    gguf_file = write_gguf(tmp_path / "full.gguf", "flux", bfl, "F32")
    cut_gguf = tmp_path / "cut.gguf"
    cut_gguf.write_bytes(gguf_file.read_bytes()[:-3000])
    with pytest.raises(GenError, match=r"cut.gguf is not a readable GGUF file \(truncated or corrupt"):
        load_single_file(cut_gguf, ASSETS / "flux-tiny" / "transformer", DITS["FluxTransformer2DModel"], CPU,
                         torch.float32)
    out = tmp_path / "o.png"
    code = main(["generate", "--model-path", str(ASSETS / "flux-tiny"), "--transformer", str(cut), "--prompt", "x",
                 "--device", "cpu", "--output", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and str(cut) in err[0] and "lie past its end" in err[0], err
    assert not out.exists()


def test_parallel_ranks_load_the_file(folder_pictures, tmp_path):
    """Every rank reads the single file (2 CPU ranks, Ulysses): the folder's picture."""
    file = write("flux-tiny", "original", tmp_path)
    gen = Generator.from_pretrained(ASSETS / "flux-tiny", device="cpu", transformer=file, num_gpus=2)
    try:
        assert psnr(pictures(gen, "flux-tiny"), folder_pictures["flux-tiny"]) >= 50
    finally:
        gen.close()
