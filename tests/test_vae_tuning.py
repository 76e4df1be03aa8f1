"""VAE decode settings (gen/transforms/vae.py): channels-last gives the same decode, undo restores, tiling is switched on."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKL, AutoencoderKLWan
from helpers import rel_err

from gen import GenError, Generator
from gen.cli import main
from gen.transforms.vae import is_3d, tune_vae

ASSETS = Path(__file__).resolve().parents[1] / "assets"


def _vaes():
    torch.manual_seed(0)
    flat = AutoencoderKL(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                         up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=4).eval()
    video = AutoencoderKLWan(base_dim=8, z_dim=4).eval()
    return [(flat, torch.randn(1, 4, 8, 8)), (video, torch.randn(1, 4, 3, 8, 8))]


@pytest.mark.parametrize("index", [0, 1], ids=["2d", "video"])
def test_channels_last_decodes_the_same_and_undoes(index):
    vae, z = _vaes()[index]
    with torch.no_grad():
        expected = vae.decode(z, return_dict=False)[0]
        undo = tune_vae(vae, channels_last=True)
        convs = [m for m in vae.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Conv3d))]
        fmt = lambda m: torch.channels_last if isinstance(m, torch.nn.Conv2d) else torch.channels_last_3d
        assert all(m.weight.is_contiguous(memory_format=fmt(m)) for m in convs if m.weight.shape[1:].numel() > 1)
        got = vae.decode(z, return_dict=False)[0]
        undo()
    assert rel_err(got, expected) <= 1e-5
    assert all(m.weight.is_contiguous() for m in convs)
    assert is_3d(vae) == (index == 1)


def test_tiling_switches_and_undoes():
    vae, _ = _vaes()[0]
    undo = tune_vae(vae, tiling=True)
    assert vae.use_tiling
    undo()
    assert not vae.use_tiling
    with pytest.raises(GenError, match="Linear has no tiled decode"):
        tune_vae(torch.nn.Linear(2, 2), tiling=True)


def test_generator_and_cli_flag(tmp_path, monkeypatch):
    gen = Generator.from_pretrained(ASSETS / "flux-tiny", device="cpu", vae_tiling=True)
    assert gen.pipeline.vae.use_tiling
    assert not Generator.from_pretrained(ASSETS / "flux-tiny", device="cpu").pipeline.vae.use_tiling
    monkeypatch.chdir(tmp_path)
    args = ["generate", "--model-path", str(ASSETS / "wan-t2v-tiny"), "--prompt", "x", "--device", "cpu",
            "--height", "32", "--width", "32", "--num-frames", "5", "--num-inference-steps", "2", "--vae-tiling",
            "--output", "a.mp4"]
    assert main(args) == 0
    assert (tmp_path / "a.mp4").stat().st_size > 0
