"""VAE decode split by rows over gloo ranks (gen/distributed/vae.py) equals the whole decode, for every VAE class the
families load: AutoencoderKL (FLUX.1, Z-Image, the trained default model), FLUX.2's, Wan's, Qwen-Image's and Qwen-Image
2.1's. One spawn of 3 ranks: uneven bands (7 latent rows -> 3 / 2 / 2), a middle rank with halos on both sides.
"""
from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

from gen.distributed.ranks import run_on_ranks
from gen.distributed.vae import SplitDecode, bands

ASSETS = Path(__file__).resolve().parents[1] / "assets"
# assets, and Wan2.2's residual VAE (TI2V-5B: channel-to-space up blocks, patchified output) built here
VAES = ["flux-tiny", "flux2-tiny", "gen-shapes", "qwen-image-tiny", "qwen-image21-tiny", "wan-t2v-tiny", "wan2.2-vae"]
ROWS, COLS = 7, 5


def _load(asset: str):
    import json

    import diffusers

    if asset == "wan2.2-vae":  # Wan2.2-TI2V-5B's layout at a tiny width
        torch.manual_seed(0)
        vae = diffusers.AutoencoderKLWan(base_dim=8, decoder_base_dim=16, z_dim=4, dim_mult=[1, 2, 2, 2],
                                         num_res_blocks=1, is_residual=True, in_channels=12, out_channels=12,
                                         patch_size=2, scale_factor_spatial=16, latents_mean=[0.0] * 4,
                                         latents_std=[1.0] * 4).eval()
        return vae, torch.randn((1, 4, 2, ROWS, COLS), generator=torch.Generator().manual_seed(0))
    name = json.loads((ASSETS / asset / "vae" / "config.json").read_text())["_class_name"]
    vae = getattr(diffusers, name).from_pretrained(ASSETS / asset / "vae").eval()
    channels = vae.config.get("latent_channels") or vae.config.get("z_dim")
    video = hasattr(vae.config, "z_dim") or "z_dim" in vae.config
    frames = 1 if name == "AutoencoderKLQwenImage21" else 2  # its convs fold a single frame away; two: the caches
    shape = (1, channels, frames, ROWS, COLS) if video else (1, channels, ROWS, COLS)
    return vae, torch.randn(shape, generator=torch.Generator().manual_seed(0))


def _decode_cases(rank: int, device: torch.device) -> dict | None:
    torch.set_num_threads(1)
    report = {}
    for asset in VAES:
        vae, z = _load(asset)
        with torch.no_grad():
            whole = vae.decode(z, return_dict=False)[0] if rank == 0 else None
            split = SplitDecode(vae, None, rank, 3)
            seen = []  # the latent rows this rank's decoder received
            hook = vae.decoder.conv_in.register_forward_pre_hook(lambda m, a: seen.append(a[0].shape[-2]), prepend=True)
            try:
                out = vae.decode(z).sample  # the DecoderOutput form
                out_tuple = vae.decode(z, return_dict=False)[0]
            finally:
                hook.remove()
                split.remove()
            after = vae.decode(z, return_dict=False)[0] if rank == 0 else None  # hooks gone: the plain decode
        if rank == 0:
            scale = whole.abs().max().item()
            report[asset] = dict(err=(out - whole).abs().max().item() / scale,
                                 err_tuple=(out_tuple - whole).abs().max().item() / scale, seen=set(seen),
                                 std=whole.std().item(), shape=(tuple(out.shape), tuple(whole.shape)),
                                 after=torch.equal(after, whole), unsupported=split.unsupported)
    return report if rank == 0 else None


@pytest.fixture(scope="module")
def report() -> dict:
    return run_on_ranks(_decode_cases, 3, timeout_s=300)[0]


@pytest.mark.parametrize("asset", VAES)
def test_split_decode_equals_whole(report, asset):
    r = report[asset]
    assert not r["unsupported"], r["unsupported"]
    assert r["seen"] == {3}, r["seen"]  # rank 0 decoded its band of 3 rows (and 2 + 2 on the others)
    assert r["std"] > 1e-3, "flat output: the comparison would prove nothing"
    assert r["shape"][0] == r["shape"][1]
    assert r["err"] <= 1e-5 and r["err_tuple"] <= 1e-5, r
    assert r["after"]  # remove() restores the plain decode bit for bit


def test_bands():
    assert bands(7, 3) == [3, 2, 2] and bands(6, 2) == [3, 3] and bands(2, 4) == [1, 1, 0, 0]


def test_too_few_rows_or_tiled_decode_whole(monkeypatch):
    """One rank of a group of 4 (no collective runs): bands under 2 rows, or a tiled VAE, decode whole."""
    vae, z = _load("flux-tiny")
    split = SplitDecode(vae, None, 0, 4)
    try:
        with torch.no_grad():
            whole = vae.decode(z[..., :6, :], return_dict=False)[0]  # 6 rows over 4 ranks: 2 / 2 / 1 / 1
            assert whole.shape[-2] == 6 * 8
            vae.enable_tiling()
            assert vae.decode(z, return_dict=False)[0].shape[-2] == ROWS * 8
    finally:
        split.remove()
        vae.disable_tiling()


def test_unknown_module_type_is_not_split(caplog):
    """A decoder holding a module type not declared row-local is decoded whole, with a warning naming it."""
    vae, z = _load("flux-tiny")
    vae.decoder.mid_block.add_module("extra", torch.nn.BatchNorm2d(16))
    with caplog.at_level(logging.WARNING, logger="gen.distributed.vae"):
        split = SplitDecode(vae, None, 0, 2)
    assert split.unsupported == {"BatchNorm2d"} and "BatchNorm2d" in caplog.text
    assert "decode" not in vae.__dict__ and not vae.decoder.conv_in._forward_pre_hooks  # nothing left installed
