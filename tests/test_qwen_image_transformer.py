"""Parity of gen.models.qwen_image with diffusers' QwenImageTransformer2DModel on tiny random configs (fp32 CPU)."""
from __future__ import annotations

import pytest
import torch
from diffusers import QwenImageTransformer2DModel
from helpers import rel_err

from gen.config import config_from_dict
from gen.models.qwen_image import QwenImageConfig, QwenImageTransformer

TINY = dict(patch_size=2, in_channels=16, out_channels=4, num_layers=2, attention_head_dim=16,
            num_attention_heads=2, joint_attention_dim=24, axes_dims_rope=[4, 6, 6])


def make_pair(meta: bool = False, **overrides):
    torch.manual_seed(0)
    ref = QwenImageTransformer2DModel(**{**TINY, **overrides}).eval()
    with torch.no_grad():  # move every weight off its init (norm weights of 1, etc.)
        for p in ref.parameters():
            p.add_(0.1 * torch.randn_like(p))
    cfg = config_from_dict(QwenImageConfig, dict(ref.config))
    if meta:
        with torch.device("meta"):
            ours = QwenImageTransformer(cfg)
        ours.load_state_dict(ref.state_dict(), strict=True, assign=True)
    else:
        ours = QwenImageTransformer(cfg)
        ours.load_state_dict(ref.state_dict(), strict=True)
    return ref, ours.eval()


def inputs(batch, shapes, txt_len=7, lengths=None, cfg=TINY):
    g = torch.Generator().manual_seed(1)
    n = sum(f * h * w for f, h, w in shapes)
    x = torch.randn(batch, n, cfg["in_channels"], generator=g)
    txt = torch.randn(batch, txt_len, cfg["joint_attention_dim"], generator=g)
    lengths = lengths or [txt_len] * batch
    mask = (torch.arange(txt_len)[None] < torch.tensor(lengths)[:, None]).long()  # (B, T)
    t = torch.rand(batch, generator=g)
    return dict(hidden_states=x, encoder_hidden_states=txt, encoder_hidden_states_mask=mask, timestep=t,
                img_shapes=[list(shapes)] * batch)


def check(ref, ours, kw, **extra):
    with torch.no_grad():
        want = ref(**kw, **extra).sample
        got = ours(**kw, **extra)
    assert got.shape == want.shape
    err = rel_err(got, want)
    assert err <= 1e-5, err


def test_single_image():
    ref, ours = make_pair()
    check(ref, ours, inputs(1, [(1, 4, 6)]))


def test_meta_assign_and_no_mask():
    ref, ours = make_pair(meta=True)
    assert all(p.device.type == "cpu" for p in ours.parameters())
    kw = inputs(1, [(1, 6, 4)])
    kw["encoder_hidden_states_mask"] = None
    check(ref, ours, kw)


def test_padded_text_mask():
    ref, ours = make_pair()
    kw = inputs(2, [(1, 4, 4)], txt_len=9, lengths=[9, 4])
    check(ref, ours, kw)
    # the padded tokens really are ignored: changing them leaves the second sample's output unchanged
    kw2 = dict(kw, encoder_hidden_states=kw["encoder_hidden_states"].clone())
    kw2["encoder_hidden_states"][1, 4:] = 5.0
    with torch.no_grad():
        a, b = ours(**kw), ours(**kw2)
    assert rel_err(b[1], a[1]) < 1e-6


def test_two_images_edit_layout():
    ref, ours = make_pair()
    check(ref, ours, inputs(2, [(1, 4, 4), (1, 2, 6)], lengths=[7, 5]))


def test_zero_cond_t():
    ref, ours = make_pair(zero_cond_t=True)
    check(ref, ours, inputs(2, [(1, 4, 4), (1, 4, 2), (1, 2, 2)], lengths=[3, 7]))


def test_layered_rope_and_additional_t_cond():
    ref, ours = make_pair(use_additional_t_cond=True, use_layer3d_rope=True)
    check(ref, ours, inputs(2, [(1, 2, 2), (1, 2, 2), (1, 4, 4)]), additional_t_cond=torch.tensor([0, 1]))


def test_bad_inputs():
    _, ours = make_pair()
    kw = inputs(1, [(1, 4, 4)])
    with pytest.raises(ValueError, match="img_shapes"):
        ours(**dict(kw, img_shapes=[[(1, 4, 5)]]))
    with pytest.raises(ValueError, match="guidance"):
        ours(**kw, guidance=torch.ones(1))
    with pytest.raises(ValueError, match="encoder_hidden_states_mask"):
        ours(**dict(kw, encoder_hidden_states_mask=torch.ones(1, 3)))
