"""Parity of gen.models.wan.WanTransformer with diffusers' WanTransformer3DModel on tiny random configs (fp32 CPU)."""
from __future__ import annotations

import pytest
import torch
from diffusers import WanTransformer3DModel
from helpers import rel_err

from gen.config import config_from_dict
from gen.models.wan import WanConfig, WanTransformer

TINY = dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=4, out_channels=4,
            text_dim=16, freq_dim=16, ffn_dim=32, num_layers=2, rope_max_seq_len=32)
I2V = dict(TINY, in_channels=12, image_dim=20, added_kv_proj_dim=24)
FLF2V = dict(I2V, pos_embed_seq_len=2 * 5)


def make_ref(config: dict, seed: int = 0) -> WanTransformer3DModel:
    torch.manual_seed(seed)
    ref = WanTransformer3DModel(**config).eval()
    with torch.no_grad():  # perturb every weight (norm gains, zero-initialised pos_embed included)
        for p in ref.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return ref


def make_ours(ref: WanTransformer3DModel, on_meta: bool = False) -> WanTransformer:
    cfg = config_from_dict(WanConfig, dict(ref.config))
    if on_meta:
        with torch.device("meta"):
            ours = WanTransformer(cfg)
        ours.load_state_dict(ref.state_dict(), strict=True, assign=True)
    else:
        ours = WanTransformer(cfg)
        ours.load_state_dict(ref.state_dict(), strict=True)
    return ours.eval()


def inputs(config: dict, text_len: int = 7, image_tokens: int = 0, image_batch: int = 2, per_token: bool = False,
           frames: int = 3):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, config["in_channels"], frames, 8, 6, generator=g)  # (B, C, F, H, W)
    t = torch.tensor([999.0, 421.5])
    if per_token:  # (B, L): Wan2.2 TI2V expand_timesteps, first frame's tokens at t = 0
        L = 3 * 4 * 3
        t = t[:, None].repeat(1, L)
        t[:, :12] = 0.0
    kw = dict(hidden_states=x, timestep=t, encoder_hidden_states=torch.randn(2, text_len, config["text_dim"], generator=g))
    if image_tokens:
        kw["encoder_hidden_states_image"] = torch.randn(image_batch, image_tokens, config["image_dim"], generator=g)
    return kw


def check(config: dict, on_meta: bool = False, **input_kw):
    ref = make_ref(config)
    ours = make_ours(ref, on_meta=on_meta)
    kw = inputs(config, **input_kw)
    with torch.no_grad():
        want = ref(**kw, return_dict=False)[0]
        got = ours(**kw)
    assert got.shape == want.shape == (2, config["out_channels"], input_kw.get("frames", 3), 8, 6)
    err = rel_err(got, want)
    assert err <= 1e-5, err


def test_t2v_parity():
    check(TINY)


def test_t2v_parity_built_on_meta():
    check(dict(TINY, cross_attn_norm=False), on_meta=True)


def test_per_token_timesteps_parity():
    check(dict(TINY, in_channels=8, out_channels=8, patch_size=(1, 2, 2)), per_token=True)


def test_i2v_parity():
    # diffusers splits image tokens off the front of the context assuming 512 text tokens: give it exactly 512.
    check(I2V, text_len=512, image_tokens=5)


def test_flf2v_pos_embed_parity():
    check(FLF2V, text_len=512, image_tokens=5, image_batch=4)  # two images per sample


def test_temporal_patch_and_head_dim_parity():
    check(dict(TINY, patch_size=(2, 2, 2), attention_head_dim=18, num_attention_heads=1), frames=4)


def test_state_dict_keys_equal_diffusers():
    for config in (TINY, I2V, FLF2V):
        ref = make_ref(config)
        with torch.device("meta"):
            ours = WanTransformer(config_from_dict(WanConfig, dict(ref.config)))
        assert list(ours.state_dict()) == list(ref.state_dict())


def test_config_errors():
    with pytest.raises(ValueError, match="qk_norm"):
        WanConfig(qk_norm="layer_norm")
    with pytest.raises(ValueError, match="added_kv_proj_dim"):
        WanConfig(image_dim=1280)
    ours = WanTransformer(config_from_dict(WanConfig, TINY))
    kw = inputs(TINY, image_tokens=0)
    with pytest.raises(ValueError, match="image_dim"):
        ours(**kw, encoder_hidden_states_image=torch.zeros(2, 3, 20))
