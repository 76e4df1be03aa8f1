"""Parity of our ZImageTransformer with diffusers' ZImageTransformer2DModel on tiny random configs (fp32 CPU): one
caption, several captions of different lengths (masked batch vs diffusers' lists), captions and images that are and
are not multiples of 32 tokens, joined projections; config errors."""
from __future__ import annotations

import pytest
import torch
from diffusers import ZImageTransformer2DModel
from helpers import rel_err

from gen.config import config_from_dict
from gen.models.z_image import ZImageConfig, ZImageTransformer, padded_length
from gen.transforms.join import join_projections

TINY = {
    "_class_name": "ZImageTransformer2DModel",
    "_diffusers_version": "0.42.1",
    "all_patch_size": [2],
    "all_f_patch_size": [1],
    "in_channels": 4,
    "dim": 64,
    "n_layers": 2,
    "n_refiner_layers": 2,
    "n_heads": 2,
    "n_kv_heads": 2,
    "norm_eps": 1e-5,
    "qk_norm": True,
    "cap_feat_dim": 24,
    "rope_theta": 256.0,
    "t_scale": 1000.0,
    "axes_dims": [8, 12, 12],
    "axes_lens": [256, 64, 64],
}


def _pair(**overrides) -> tuple[ZImageTransformer2DModel, ZImageTransformer]:
    config = {**TINY, **overrides}
    torch.manual_seed(0)
    ref = ZImageTransformer2DModel(**{k: v for k, v in config.items() if not k.startswith("_")}).eval()
    with torch.no_grad():  # no trivial init (pad tokens start at zero, norms at one): a swapped piece must show
        for p in ref.parameters():
            p.add_(0.05 * torch.randn_like(p))
    with torch.device("meta"):
        ours = ZImageTransformer(config_from_dict(ZImageConfig, config))
    ours.load_state_dict(ref.state_dict(), strict=True, assign=True)
    return ref, ours.eval()


def _reference(ref, x: torch.Tensor, t: torch.Tensor, captions: list[torch.Tensor]) -> torch.Tensor:
    """diffusers' call on scheduler timesteps `t` (as its pipeline converts them): lists of (C, 1, H, W) latents and
    (L_i, D) captions -> (B, C, H, W)."""
    out = ref(list(x[:, :, None].unbind(0)), (1000 - t) / 1000, captions, return_dict=False)[0]
    return torch.stack(out)[:, :, 0]


def _padded(captions: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded (B, L, D) features and their (B, L) mask."""
    length = max(c.shape[0] for c in captions)
    feats = torch.zeros(len(captions), length, captions[0].shape[1])
    mask = torch.zeros(len(captions), length, dtype=torch.long)
    for i, c in enumerate(captions):
        feats[i, : c.shape[0]], mask[i, : c.shape[0]] = c, 1
    return feats, mask


@pytest.mark.parametrize("size, length", [((10, 6), 7), ((16, 16), 32), ((8, 12), 45)])
def test_one_caption_matches_diffusers(size, length):
    ref, ours = _pair()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, *size, generator=g)
    caption = torch.randn(length, 24, generator=g)
    t = torch.tensor([300.0, 812.5])
    with torch.no_grad():
        want = _reference(ref, x, t, [caption, caption])
        got = ours(x, t, caption.expand(2, -1, -1))
    assert got.shape == x.shape
    assert rel_err(got, want) <= 1e-5


def test_captions_of_different_lengths_match_diffusers():
    """A masked batch (as CFG batching and concurrent generations pad it) equals diffusers' per-sample lists, whose
    padding to 32 and image positions differ per sample; and each sample alone."""
    ref, ours = _pair()
    g = torch.Generator().manual_seed(2)
    x = torch.randn(3, 4, 6, 10, generator=g)
    captions = [torch.randn(n, 24, generator=g) for n in (5, 40, 33)]
    t = torch.tensor([990.0, 500.0, 37.0])
    feats, mask = _padded(captions)
    with torch.no_grad():
        want = _reference(ref, x, t, captions)
        got = ours(x, t, feats, mask)
        alone = [ours(x[i:i + 1], t[i:i + 1], c[None]) for i, c in enumerate(captions)]
    assert rel_err(got, want) <= 1e-5
    for i in range(3):
        assert rel_err(alone[i][0], want[i]) <= 1e-5
    # an all-ones mask is the same as no mask
    with torch.no_grad():
        ones = ours(x[:1], t[:1], captions[0][None], torch.ones(1, 5, dtype=torch.long))
    assert rel_err(ones, alone[0]) <= 1e-6


def test_without_qk_norm_and_several_patch_sizes():
    """qk_norm off, and a config with a second (unused) patch pair whose weights still load."""
    ref, ours = _pair(qk_norm=False, all_patch_size=[2, 1], all_f_patch_size=[1, 1])
    assert ours.layers[0].attention.norm_q is None and set(ours.all_x_embedder) == {"2-1", "1-1"}
    g = torch.Generator().manual_seed(3)
    x, caption, t = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 9, 24, generator=g), torch.tensor([400.0])
    with torch.no_grad():
        assert rel_err(ours(x, t, caption), _reference(ref, x, t, [caption[0]])) <= 1e-5


def test_joined_projections_are_exact():
    ref, ours = _pair()
    g = torch.Generator().manual_seed(4)
    x, caption, t = torch.randn(1, 4, 6, 6, generator=g), torch.randn(1, 12, 24, generator=g), torch.tensor([600.0])
    with torch.no_grad():
        before = ours(x, t, caption)
        assert join_projections(ours) == 2 * (2 + 2 + 2)  # q/k/v and w1/w3 in every block
        after = ours(x, t, caption)
    assert rel_err(after, before) <= 1e-6
    assert set(ours.state_dict()) == set(ref.state_dict())


def test_padded_length():
    assert [padded_length(n) for n in (1, 31, 32, 33, 64)] == [32, 32, 32, 64, 64]


@pytest.mark.parametrize("bad, match", [
    (dict(dim=60, n_heads=8), "multiple of n_heads"),
    (dict(axes_dims=(8, 12, 10)), "sum to the head dim"),
    (dict(all_patch_size=(1,)), r"lack the \(2, 1\) pair"),
    (dict(siglip_feat_dim=32), "omni variant is not supported"),
])
def test_bad_configs_name_the_value(bad, match):
    with pytest.raises(ValueError, match=match):
        ZImageConfig(**{**config_from_dict(ZImageConfig, TINY).__dict__, **bad})


def test_bad_inputs_name_the_shape():
    _, ours = _pair()
    with pytest.raises(ValueError, match=r"expected \(B, 4, H, W\)"):
        ours(torch.zeros(1, 4, 7, 8), torch.zeros(1), torch.zeros(1, 3, 24))
    with pytest.raises(ValueError, match=r"expected \(1, L, 24\)"):
        ours(torch.zeros(1, 4, 8, 8), torch.zeros(1), torch.zeros(1, 3, 16))
    with pytest.raises(ValueError, match="patch grid exceeds"):
        ours(torch.zeros(1, 4, 128, 8), torch.zeros(1), torch.zeros(1, 3, 24))
