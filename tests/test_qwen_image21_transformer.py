"""Parity of gen.models.qwen_image21 with diffusers' QwenImage21Transformer2DModel on tiny random configs (fp32 CPU):
the block-causal joint pass and the KV-cached steps of the reference vs our encode_prefix + forward."""
from __future__ import annotations

import pytest
import torch
from diffusers import QwenImage21Transformer2DModel
from diffusers.models.transformers.transformer_qwenimage21 import QwenImage21KVCache
from helpers import rel_err

from gen.config import config_from_dict
from gen.models.qwen_image21 import Prefix, QwenImage21Config, QwenImage21Transformer, prefix_layout
from gen.transforms.join import join_projections
from gen.transforms.step_cache import StepCache
from pipelines.qwen_image21 import QWEN_IMAGE21_DIT

TINY = dict(in_channels=8, out_channels=8, num_layers=2, attention_head_dim=16, num_attention_heads=2,
            context_in_dim=24, axes_dims_rope=[4, 6, 6])
# the encoder sequence of an edit prompt: text, 6 slots (a 4x6 latent image), text, 2 slots (2x4), text
SLOTS = [0] * 3 + [1] * 6 + [0] * 2 + [1] * 2 + [0] * 7
COND = [(1, 4, 6), (1, 2, 4)]


def make_pair(meta: bool = False, **overrides):
    torch.manual_seed(0)
    ref = QwenImage21Transformer2DModel(**{**TINY, **overrides}).eval()
    with torch.no_grad():  # move every weight off its init (zero-centred norms, etc.)
        for p in ref.parameters():
            p.add_(0.1 * torch.randn_like(p))
    cfg = config_from_dict(QwenImage21Config, dict(ref.config))
    if meta:
        with torch.device("meta"):
            ours = QwenImage21Transformer(cfg)
        ours.load_state_dict(ref.state_dict(), strict=True, assign=True)
    else:
        ours = QwenImage21Transformer(cfg)
        ours.load_state_dict(ref.state_dict(), strict=True)
    return ref, ours.eval()


def inputs(batch: int, slots: list[int], cond: list[tuple], target=(1, 6, 4), pad: list[int] | None = None, seed=1):
    """The reference's keywords: condition latents then the target's, the encoder states, img_mask with the target's
    slots appended, and a right-padding mask (`pad`: padded positions per sample) or None."""
    g = torch.Generator().manual_seed(seed)
    t_len, n_cond, n_tgt = len(slots), sum(h * w for _, h, w in cond), target[1] * target[2]
    mask = None
    if pad is not None:
        mask = torch.ones(batch, t_len, dtype=torch.long)
        for i, n in enumerate(pad):
            mask[i, t_len - n:] = 0
    return dict(hidden_states=torch.randn(batch, n_cond + n_tgt, TINY["in_channels"], generator=g),
                encoder_hidden_states=torch.randn(batch, t_len, TINY["context_in_dim"], generator=g),
                timestep=torch.rand(batch, generator=g),
                img_shapes=[[*cond, target]] * batch,
                img_mask=torch.tensor(slots + [1] * (n_tgt // 4), dtype=torch.bool)[None].expand(batch, -1),
                encoder_hidden_states_mask=mask)


def ours_call(ours, kw, n_tgt: int, timestep=None):
    """encode_prefix + forward on the reference's keywords; the target's prediction (B, n_tgt, C)."""
    t = kw["timestep"] if timestep is None else timestep
    x = kw["hidden_states"]
    prefix = ours.encode_prefix(kw["encoder_hidden_states"], kw["img_mask"], kw["img_shapes"],
                                kw["encoder_hidden_states_mask"], x[:, :-n_tgt] if x.shape[1] > n_tgt else None,
                                None if ours.config.causal_condition else t)
    return ours(x[:, -n_tgt:], prefix, t, kw["img_shapes"])


def check(ref, ours, kw, n_tgt=24):
    with torch.no_grad():
        want = ref(**kw, return_dict=False)[0][:, -n_tgt:]
        got = ours_call(ours, kw, n_tgt)
    assert got.shape == want.shape
    err = rel_err(got, want)
    assert err <= 1e-5, err
    return got


def test_text_only():
    ref, ours = make_pair()
    check(ref, ours, inputs(1, [0] * 9, []))


def test_meta_assign_and_state_dict_keys():
    ref, ours = make_pair(meta=True)
    assert all(p.device.type == "cpu" for p in ours.parameters())
    assert set(ours.state_dict()) == set(ref.state_dict())
    check(ref, ours, inputs(1, [0] * 5, [], target=(1, 4, 4)), n_tgt=16)


def test_two_condition_images_padded_batch():
    """Two condition images between text runs, a batch of two whose second prompt ends in 3 padded positions, and
    a different timestep per sample."""
    ref, ours = make_pair()
    kw = inputs(2, SLOTS, COND, pad=[0, 3])
    got = check(ref, ours, kw)
    # padded positions really are never attended: changing them leaves the output unchanged
    kw2 = dict(kw, encoder_hidden_states=kw["encoder_hidden_states"].clone())
    kw2["encoder_hidden_states"][1, -3:] = 5.0
    with torch.no_grad():
        assert rel_err(ours_call(ours, kw2, 24), got) < 1e-6


def test_adjacent_condition_images_stay_separate_blocks():
    """Two images with no text between them are two blocks (their own grids and frame positions), as in the
    reference, which labels blocks by token counts rather than by runs of slots."""
    ref, ours = make_pair()
    check(ref, ours, inputs(1, [0] * 2 + [1] * 6 + [1] * 2 + [0] * 4, COND))


def test_cached_steps_match_the_reference_kv_cache():
    """One prefix, several steps: equal to the reference's prefill step then its cached steps."""
    ref, ours = make_pair()
    kw = inputs(2, SLOTS, COND, pad=[2, 0])
    cache = QwenImage21KVCache(TINY["num_layers"])
    x, n_tgt = kw["hidden_states"], 24
    with torch.no_grad():
        prefix = ours.encode_prefix(kw["encoder_hidden_states"], kw["img_mask"], kw["img_shapes"],
                                    kw["encoder_hidden_states_mask"], x[:, :-n_tgt])
        for i, t in enumerate([0.9, 0.5, 0.1]):
            step = torch.full((2,), t)
            mode = "extract" if i == 0 else "cached"
            want = ref(**dict(kw, timestep=step), kv_cache=cache, kv_cache_mode=mode, return_dict=False)[0]
            got = ours(x[:, -n_tgt:], prefix, step, kw["img_shapes"])
            assert rel_err(got, want[:, -n_tgt:]) <= 1e-5


def test_prefix_of_one_serves_a_batch():
    """A prefix encoded once (batch 1) and read by a batch of targets equals the reference on the repeated prompt."""
    ref, ours = make_pair()
    kw = inputs(3, SLOTS, COND)
    kw["encoder_hidden_states"] = kw["encoder_hidden_states"][:1].expand(3, -1, -1)
    cond = kw["hidden_states"][:1, :32]
    kw["hidden_states"] = torch.cat([cond.expand(3, -1, -1), kw["hidden_states"][:, 32:]], dim=1)
    with torch.no_grad():
        want = ref(**kw, return_dict=False)[0][:, -24:]
        prefix = ours.encode_prefix(kw["encoder_hidden_states"][:1], kw["img_mask"][:1], kw["img_shapes"][:1],
                                    None, cond)
        got = ours(kw["hidden_states"][:, 32:], prefix, kw["timestep"], kw["img_shapes"])
    assert prefix.batch == 1 and rel_err(got, want) <= 1e-5


def test_without_causal_condition():
    """causal_condition=False: the prefix is modulated at the step's t, so it is encoded per step."""
    ref, ours = make_pair(causal_condition=False)
    check(ref, ours, inputs(2, SLOTS, COND, pad=[0, 1]))
    kw = inputs(1, SLOTS, COND)
    prefix = ours.encode_prefix(kw["encoder_hidden_states"], kw["img_mask"], kw["img_shapes"],
                                condition=kw["hidden_states"][:, :32], timestep=kw["timestep"])
    with pytest.raises(ValueError, match="depends on the step"):
        ours(kw["hidden_states"][:, 32:], prefix, kw["timestep"] + 0.1, kw["img_shapes"])


def test_joined_projections_and_step_cache_layout():
    """The declared joinable groups join exactly; the step cache (threshold 0: never skips) runs the target blocks
    through its gates with the Prefix as the branch's identity."""
    ref, ours = make_pair()
    kw = inputs(1, SLOTS, COND)
    with torch.no_grad():
        before = ours_call(ours, kw, 24)
        assert join_projections(ours) == 2 * TINY["num_layers"]
        assert rel_err(ours_call(ours, kw, 24), before) <= 1e-6
        cache = StepCache(ours, QWEN_IMAGE21_DIT.blocks, QWEN_IMAGE21_DIT.cache_layout, threshold=0.0)
        try:
            assert rel_err(ours_call(ours, kw, 24), before) <= 1e-6
        finally:
            cache.remove()
    assert cache.stats["forwards"] == 1 and cache.stats["blocks"] == TINY["num_layers"]


def test_rope_layout():
    """Text advances all three axes; an image sits at the frame position reached, centred, and moves it by max(h, w)."""
    ids, pos, position = prefix_layout([False, True, True, True, True, False], [(1, 2, 2)])
    assert ids == [-1, 0, 0, 0, 0, -1]
    assert pos == [(0, 0, 0), (1, -1, -1), (1, -1, 0), (1, 0, -1), (1, 0, 0), (3, 3, 3)]
    assert position == 4


def test_bad_inputs():
    _, ours = make_pair()
    kw = inputs(1, SLOTS, COND)
    x = kw["hidden_states"]
    with pytest.raises(ValueError, match="reserved 8 image slots"):
        ours.encode_prefix(kw["encoder_hidden_states"], kw["img_mask"], [[(1, 4, 6), (1, 4, 4), (1, 6, 4)]],
                           condition=torch.zeros(1, 40, 8))
    with pytest.raises(ValueError, match="condition must be"):
        ours.encode_prefix(kw["encoder_hidden_states"], kw["img_mask"], kw["img_shapes"])
    prefix = ours.encode_prefix(kw["encoder_hidden_states"], kw["img_mask"], kw["img_shapes"], condition=x[:, :32])
    assert isinstance(prefix, Prefix)
    with pytest.raises(ValueError, match="holds 16 tokens"):
        ours(x[:, 32:], prefix, kw["timestep"], [[*COND, (1, 4, 4)]])
    with pytest.raises(TypeError, match="Prefix"):
        ours(x[:, 32:], kw["encoder_hidden_states"], kw["timestep"], kw["img_shapes"])
    with pytest.raises(ValueError, match="one frame"):
        ours(x[:, 32:], prefix, kw["timestep"], [[*COND, (2, 6, 2)]])
    with pytest.raises(ValueError, match="patch_size must be 1"):
        QwenImage21Config(patch_size=2)


def test_graphed_call_reads_a_new_prefix_into_the_same_graph():
    """The Prefix is a pytree: a CUDA-graph wrapper (run eagerly here) copies a later generation's prefix into the
    buffers captured with the first, instead of capturing again, and gives that prefix's result."""
    from gen.transforms.cuda_graph import GraphedCall, eager_capture

    _, ours = make_pair()
    call = GraphedCall(ours.forward, capture=eager_capture)
    outs = []
    with torch.no_grad():
        for seed in (1, 2):
            kw = inputs(1, SLOTS, COND, seed=seed)
            x = kw["hidden_states"]
            prefix = ours.encode_prefix(kw["encoder_hidden_states"], kw["img_mask"], kw["img_shapes"],
                                        condition=x[:, :32])
            outs.append((call(x[:, 32:], prefix, kw["timestep"], kw["img_shapes"]),
                         ours(x[:, 32:], prefix, kw["timestep"], kw["img_shapes"])))
    assert call.captures == 1
    assert all(torch.equal(graphed, plain) for graphed, plain in outs)
    assert rel_err(outs[0][0], outs[1][0]) > 0.1
