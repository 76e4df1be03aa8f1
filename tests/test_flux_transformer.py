"""Parity of our FluxTransformer with diffusers' FluxTransformer2DModel on tiny random configs (fp32 CPU)."""
from __future__ import annotations

import pytest
import torch
from diffusers import FluxTransformer2DModel
from helpers import rel_err

from gen.config import config_from_dict
from gen.models.flux import FluxConfig, FluxTransformer

TINY = {
    "_class_name": "FluxTransformer2DModel",
    "_diffusers_version": "0.42.1",
    "patch_size": 1,
    "in_channels": 16,
    "out_channels": None,
    "num_layers": 2,
    "num_single_layers": 2,
    "attention_head_dim": 16,
    "num_attention_heads": 2,
    "joint_attention_dim": 32,
    "pooled_projection_dim": 16,
    "axes_dims_rope": [4, 6, 6],
}


def _ids(h: int, w: int, t: int) -> tuple[torch.Tensor, torch.Tensor]:
    img_ids = torch.zeros(h, w, 3)
    img_ids[..., 1] = torch.arange(h)[:, None]
    img_ids[..., 2] = torch.arange(w)[None, :]
    return img_ids.reshape(h * w, 3), torch.zeros(t, 3)


def _inputs(guidance: bool, batch: int = 2, h: int = 4, w: int = 3, t: int = 5) -> dict:
    g = torch.Generator().manual_seed(1)
    img_ids, txt_ids = _ids(h, w, t)
    txt_ids[:, 0] = torch.arange(t)  # non-zero text positions too, so every axis is exercised
    return {
        "hidden_states": torch.randn(batch, h * w, TINY["in_channels"], generator=g),
        "encoder_hidden_states": torch.randn(batch, t, TINY["joint_attention_dim"], generator=g),
        "pooled_projections": torch.randn(batch, TINY["pooled_projection_dim"], generator=g),
        "timestep": torch.tensor([0.25, 0.9])[:batch],
        "img_ids": img_ids,
        "txt_ids": txt_ids,
        "guidance": torch.full((batch,), 3.5) if guidance else None,
    }


def _reference(config: dict) -> FluxTransformer2DModel:
    torch.manual_seed(0)
    ref = FluxTransformer2DModel(**{k: v for k, v in config.items() if not k.startswith("_")}).eval()
    # Perturb every parameter so none keeps a trivial init (RMSNorm weights start at 1): a swapped norm must show.
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return ref


@pytest.mark.parametrize("guidance_embeds, on_meta", [(True, False), (False, True), (True, True)])
def test_parity_with_diffusers(guidance_embeds: bool, on_meta: bool):
    config = {**TINY, "guidance_embeds": guidance_embeds}
    ref = _reference(config)
    cfg = config_from_dict(FluxConfig, config)
    if on_meta:
        with torch.device("meta"):
            ours = FluxTransformer(cfg)
        ours.load_state_dict(ref.state_dict(), strict=True, assign=True)
    else:
        ours = FluxTransformer(cfg)
        ours.load_state_dict(ref.state_dict(), strict=True)
    ours.eval()
    assert ours.config is cfg
    assert not any(p.is_meta for p in ours.parameters())

    inputs = _inputs(guidance_embeds)
    with torch.no_grad():
        expected = ref(**inputs, return_dict=False)[0]
        got = ours(**inputs)
    assert isinstance(got, torch.Tensor)
    assert got.shape == (2, 12, TINY["in_channels"])
    assert rel_err(got, expected) <= 1e-5

    # The deprecated batched ids (B, S, 3) give the same result.
    batched = {**inputs, "img_ids": inputs["img_ids"][None], "txt_ids": inputs["txt_ids"][None]}
    with torch.no_grad():
        assert torch.equal(ours(**batched), got)


def test_out_channels_and_config_tuple():
    cfg = config_from_dict(FluxConfig, {**TINY, "out_channels": 8, "guidance_embeds": False})
    assert cfg.axes_dims_rope == (4, 6, 6)
    ref = _reference({**TINY, "out_channels": 8, "guidance_embeds": False})
    ours = FluxTransformer(cfg)
    ours.load_state_dict(ref.state_dict(), strict=True)
    inputs = _inputs(False)
    with torch.no_grad():
        expected = ref(**inputs, return_dict=False)[0]
        got = ours(**inputs)
    assert got.shape[-1] == 8
    assert rel_err(got, expected) <= 1e-5


def test_guidance_mismatch_is_an_error():
    dev = FluxTransformer(config_from_dict(FluxConfig, {**TINY, "guidance_embeds": True}))
    with pytest.raises(ValueError, match="guidance"):
        dev(**_inputs(False))
    schnell = FluxTransformer(config_from_dict(FluxConfig, {**TINY, "guidance_embeds": False}))
    with pytest.raises(ValueError, match="guidance"):
        schnell(**_inputs(True))


def test_bad_rope_axes_is_an_error():
    with pytest.raises(ValueError, match="axes_dims_rope"):
        config_from_dict(FluxConfig, {**TINY, "axes_dims_rope": [4, 4, 4]})
