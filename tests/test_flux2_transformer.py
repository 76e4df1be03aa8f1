"""Parity of our Flux2Transformer with diffusers' Flux2Transformer2DModel on tiny random configs (fp32 CPU): [dev]
(guidance embedding) and [klein] (none), reference-image tokens after the noise tokens, batched ids, joined
projections, and the config checks."""
from __future__ import annotations

import pytest
import torch
from diffusers import Flux2Transformer2DModel
from helpers import rel_err

from gen.config import config_from_dict
from gen.models.flux2 import Flux2Config, Flux2Transformer
from gen.transforms.join import join_projections, unjoin_projections

TINY = {
    "_class_name": "Flux2Transformer2DModel",
    "_diffusers_version": "0.42.1",
    "patch_size": 1,
    "in_channels": 16,
    "out_channels": None,
    "num_layers": 2,
    "num_single_layers": 2,
    "attention_head_dim": 16,
    "num_attention_heads": 2,
    "joint_attention_dim": 24,
    "timestep_guidance_channels": 32,
    "mlp_ratio": 3.0,
    "axes_dims_rope": [4, 4, 4, 4],
    "rope_theta": 2000,
    "eps": 1e-6,
}


def _ids(h: int, w: int, t: int, ref: tuple[int, int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(img_ids (h*w [+ ref tokens], 4), txt_ids (t, 4)) laid out as diffusers' Flux2Pipeline makes them."""
    img = torch.cartesian_prod(torch.arange(1), torch.arange(h), torch.arange(w), torch.arange(1))
    if ref is not None:  # a reference image on time coordinate 10
        img = torch.cat([img, torch.cartesian_prod(torch.tensor([10]), torch.arange(ref[0]), torch.arange(ref[1]),
                                                   torch.arange(1))])
    txt = torch.cartesian_prod(torch.arange(1), torch.arange(1), torch.arange(1), torch.arange(t))
    return img, txt


def _inputs(guidance: bool, batch: int = 2, h: int = 4, w: int = 3, t: int = 5, ref=None) -> dict:
    g = torch.Generator().manual_seed(1)
    img_ids, txt_ids = _ids(h, w, t, ref)
    return {
        "hidden_states": torch.randn(batch, img_ids.shape[0], TINY["in_channels"], generator=g),
        "encoder_hidden_states": torch.randn(batch, t, TINY["joint_attention_dim"], generator=g),
        "timestep": torch.tensor([0.25, 0.9])[:batch],
        "img_ids": img_ids,
        "txt_ids": txt_ids,
        "guidance": torch.full((batch,), 4.0) if guidance else None,
    }


def _pair(guidance_embeds: bool, on_meta: bool = True):
    config = {**TINY, "guidance_embeds": guidance_embeds}
    torch.manual_seed(0)
    ref = Flux2Transformer2DModel(**{k: v for k, v in config.items() if not k.startswith("_")}).eval()
    with torch.no_grad():  # no trivial init left (RMSNorm weights start at 1): a swapped norm must show
        for p in ref.parameters():
            p.add_(0.05 * torch.randn_like(p))
    cfg = config_from_dict(Flux2Config, config)
    if on_meta:
        with torch.device("meta"):
            ours = Flux2Transformer(cfg)
        ours.load_state_dict(ref.state_dict(), strict=True, assign=True)
    else:
        ours = Flux2Transformer(cfg)
        ours.load_state_dict(ref.state_dict(), strict=True)
    return ref, ours.eval()


@pytest.mark.parametrize("guidance_embeds, on_meta", [(True, True), (False, True), (True, False)])
def test_parity_with_diffusers(guidance_embeds: bool, on_meta: bool):
    ref, ours = _pair(guidance_embeds, on_meta)
    assert set(ours.state_dict()) == set(ref.state_dict())
    assert not any(p.is_meta for p in ours.parameters())
    inputs = _inputs(guidance_embeds)
    with torch.no_grad():
        want = ref(**inputs, return_dict=False)[0]
        got = ours(**inputs)
    assert got.shape == want.shape == (2, 12, 16)
    assert rel_err(got, want) <= 1e-5


def test_reference_tokens_and_batched_ids():
    """Noise tokens followed by a reference image's tokens (time coordinate 10), ids given per batch (B, S, 4)."""
    ref, ours = _pair(True)
    inputs = _inputs(True, ref=(2, 3))
    batched = {**inputs, "img_ids": inputs["img_ids"].expand(2, -1, -1), "txt_ids": inputs["txt_ids"].expand(2, -1, -1)}
    with torch.no_grad():
        want = ref(**batched, return_dict=False)[0]
        assert rel_err(ours(**batched), want) <= 1e-5
        assert rel_err(ours(**inputs), want) <= 1e-5
        plain = ours(**_inputs(True))
    assert want.shape == (2, 18, 16)
    assert rel_err(want[:, :12], plain) > 1e-3  # the reference tokens take part in the attention


def test_joined_projections_same_output():
    ref, ours = _pair(False)
    inputs = _inputs(False)
    with torch.no_grad():
        plain = ours(**inputs)
        assert join_projections(ours) == 2 * TINY["num_layers"]
        joined = ours(**inputs)
        unjoin_projections(ours)
    assert rel_err(joined, plain) <= 1e-6


def test_guidance_argument_must_match_the_config():
    _, dev = _pair(True)
    _, klein = _pair(False)
    with pytest.raises(ValueError, match="guidance is None, but this model has guidance_embeds=True"):
        dev(**_inputs(False))
    with pytest.raises(ValueError, match="guidance was given, but this model has guidance_embeds=False"):
        klein(**_inputs(True))


def test_config_checks():
    with pytest.raises(ValueError, match=r"axes_dims_rope=\(4, 4, 4, 2\) must sum to attention_head_dim=16"):
        config_from_dict(Flux2Config, {**TINY, "axes_dims_rope": [4, 4, 4, 2]})
    with pytest.raises(ValueError, match="patch_size=2"):
        config_from_dict(Flux2Config, {**TINY, "patch_size": 2})
    assert config_from_dict(Flux2Config, {}).inner_dim == 6144  # FLUX.2 [dev]: 48 heads of 128
