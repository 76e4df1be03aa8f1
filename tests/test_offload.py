"""Weight offload (gen/transforms/offload.py) on the CPU: the same transformer outputs and pictures as resident, bit
for bit, with the moves the stages call for (encoders, then the DiT or its blocks one ahead, then the VAE), the plan
`max_gpu_memory` picks, packed host copies keeping joined views, undo, refusals. With other transforms, quantized
DiTs, parallel ranks and the CLI: tests/test_offload_combinations.py."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from gen import GenError, Generator
from gen.transforms import TransformOptions, check_options
from gen.transforms.offload import GIB, DiTSizes, Mover, Offload, module_tensors, plan_offload

ASSETS = Path(__file__).resolve().parents[1] / "assets"
CPU = torch.device("cpu")
CASES = {  # asset -> request (true CFG where the family has it: two DiT calls per step)
    "flux-tiny": dict(prompt="a red circle", negative_prompt="blue", true_cfg_scale=2.0, seed=3, height=32, width=48,
                      num_inference_steps=2),
    "wan-t2v-tiny": dict(prompt="a red cat", negative_prompt="blue", guidance_scale=4.0, seed=3, height=32, width=32,
                         num_frames=5, num_inference_steps=2),
    "qwen-image-tiny": dict(prompt="a red cat", negative_prompt="blue", true_cfg_scale=3.0, seed=3, height=32,
                            width=32, num_inference_steps=2),
    "gen-shapes": dict(prompt="a red circle", seed=3, height=32, width=32, num_inference_steps=2),
}
ROLE = {"text_encoder": 0, "text_encoder_2": 0, "transformer": 1, "vae": 2}


def pictures(gen: Generator, request: dict, dit_outputs: list | None = None) -> np.ndarray:
    """The generated pictures; `dit_outputs` (a list) receives every transformer output on the way."""
    hook = None
    if dit_outputs is not None:
        hook = gen.pipeline.transformer.register_forward_hook(lambda m, a, out: dit_outputs.append(out.clone()))
    try:
        result = gen.generate(**request)
    finally:
        if hook is not None:
            hook.remove()
    return np.stack([np.asarray(p) for p in (result.frames or result.images)])


def offload_of(gen: Generator) -> Offload:
    return gen.pipeline.transforms.get("offload").detail


@pytest.fixture(scope="module")
def resident() -> dict:
    """asset -> (pictures, transformer outputs) without offload."""
    out = {}
    for asset, request in CASES.items():
        outputs = []
        out[asset] = pictures(Generator.from_pretrained(ASSETS / asset, device="cpu"), request, outputs), outputs
    return out


@pytest.mark.parametrize("asset, mode", [("flux-tiny", "model"), ("flux-tiny", "layer"), ("wan-t2v-tiny", "layer"),
                                         ("qwen-image-tiny", "model"), ("gen-shapes", "layer")])
def test_same_pictures_and_moves_follow_the_stages(resident, asset, mode):
    gen = Generator.from_pretrained(ASSETS / asset, device="cpu", offload=mode)
    off = offload_of(gen)
    off.mover.log = []
    try:
        outputs = []
        assert np.array_equal(pictures(gen, CASES[asset], outputs), resident[asset][0])
        assert len(outputs) == len(resident[asset][1])
        assert all(torch.equal(a, b) for a, b in zip(outputs, resident[asset][1]))  # bit for bit
        loads = [name for op, name, _ in off.mover.log if op == "load"]
        roles = [ROLE[name.split(".")[0]] for name in loads]
        assert roles == sorted(roles) and set(roles) == {0, 1, 2}, loads  # encoders, then the DiT, then the VAE
        blocks = [n for n in loads if ".block" in n]
        assert bool(blocks) == (mode == "layer")
        if mode == "layer":  # each block once per DiT call (2 CFG branches a step), plus the next call's first
            n_blocks = len(off.streams["transformer"].blocks)
            assert len(blocks) == 2 * CASES[asset]["num_inference_steps"] * n_blocks + 1, blocks
        # at the end only the VAE (the last stage) is on the device
        assert [u.name for u in off.units.values() if u.loaded is not None] == ["vae"]
    finally:
        gen.pipeline.transforms.undo()  # the gen-shapes LLM is shared process-wide: leave it unmanaged


def test_layer_streams_one_block_ahead_and_weights_really_move():
    """While block i runs it and block i+1 (only) are on the device, copied from their host copies; block i+1 was
    requested before block i ran; afterwards every block points at its host copy again."""
    gen = Generator.from_pretrained(ASSETS / "flux-tiny", device="cpu", offload="layer")
    off = offload_of(gen)
    stream = off.streams["transformer"]
    home = {i: [t.data_ptr() for t in module_tensors([b])] for i, b in enumerate(stream.blocks)}
    seen = []

    def probe(i):
        def hook(module, args):
            ptrs = [t.data_ptr() for t in module_tensors([module])]
            seen.append((i, set(stream.ahead), any(p in home[i] for p in ptrs)))
        return hook

    handles = [b.register_forward_pre_hook(probe(i)) for i, b in enumerate(stream.blocks)]  # after the offload hooks
    off.mover.log = []
    try:
        gen.generate(**CASES["flux-tiny"])
    finally:
        for h in handles:
            h.remove()
    n = len(stream.blocks)
    assert len(seen) == 2 * 2 * n  # 2 steps x 2 CFG branches x every block
    for i, ahead, on_host in seen:
        assert ahead == {i, (i + 1) % n}, (i, ahead)
        assert not on_host, f"block {i} ran on its host copy"
    log = [(op, name) for op, name, _ in off.mover.log]
    for i in range(n - 1):  # the copy of block i+1 starts before block i runs and leaves
        assert log.index(("load", f"transformer.block{i + 1}")) < log.index(("evict", f"transformer.block{i}"))
    for i, b in enumerate(stream.blocks):
        assert [t.data_ptr() for t in module_tensors([b])] == home[i]
    gen.pipeline.transforms.undo()


def test_packed_host_copies_keep_joined_views_and_undo_makes_resident():
    """Host copies packed into (here unpinned) slabs: joined q/k/v stay views of one weight, outputs are bit-exact;
    undo leaves every weight on the device for good with no hooks."""
    gen = Generator.from_pretrained(ASSETS / "flux-tiny", device="cpu")
    request = CASES["flux-tiny"]
    plain = pictures(gen, request)
    mover = Mover(CPU, pack=True)
    off = Offload(gen.pipeline, "layer", mover=mover)
    off.settle()
    attn = gen.pipeline.transformer.transformer_blocks[0].attn
    assert attn.to_q.weight.untyped_storage().data_ptr() in mover.arena.bases
    assert attn.to_k.weight.untyped_storage().data_ptr() == attn.to_q.joined_weight.untyped_storage().data_ptr()
    assert all(buf.numel() & (buf.numel() - 1) == 0 for buf, _ in mover.arena.slabs)  # whole powers of two
    assert np.array_equal(pictures(gen, request), plain)
    off.remove()
    assert not any(b._forward_pre_hooks for b in gen.pipeline.transformer.transformer_blocks)
    assert "decode" not in gen.pipeline.vae.__dict__
    assert attn.to_q.weight.untyped_storage().data_ptr() not in mover.arena.bases
    assert np.array_equal(pictures(gen, request), plain)


def test_plan_picks_the_lightest_mode_that_fits():
    components = {"text_encoder": 9 * GIB, "transformer": 24 * GIB, "vae": GIB // 4}
    dit = DiTSizes("transformer", rest=GIB, blocks=(GIB // 2,) * 46)
    plan = lambda mode, cap: plan_offload(mode, cap, components, [dit])  # noqa: E731
    assert plan(None, None).mode == "none"
    assert plan(None, 40).mode == "none"
    assert plan(None, 30).mode == "model"  # 24 GiB DiT + 3 GiB working memory
    p = plan(None, 24)
    assert p.mode == "layer" and p.need <= 24 * GIB
    # text encoder (9) is the largest unit moved at once: 12 GiB; the DiT keeps as many leading blocks as fit with
    # 40% of the budget left to activations (RESIDENT_MARGIN): 1 + 24 x 0.5 + 2 x 0.5 = 14 GiB <= 24 - 9.6
    assert p.resident_blocks["transformer"] == 24
    assert plan("layer", None).resident_blocks == {}
    with pytest.raises(GenError, match=r"max_gpu_memory=11 GiB is below what any offload mode needs: the lightest, "
                                       r"layer, needs at least 12.0 GiB .*text_encoder"):
        plan(None, 11)
    with pytest.raises(GenError, match=r"offload=model needs at least 27.0 GiB .* offload=layer fits"):
        plan("model", 24)


def test_refused_combinations_and_values():
    for options, match in [
        (TransformOptions(offload="layer", cuda_graphs=True), "cuda_graphs and offload"),
        (TransformOptions(offload="model", max_batch=2), "max_batch=2 and offload"),
        (TransformOptions(offload="disk"), "offload must be one of"),
        (TransformOptions(max_gpu_memory=-1.0), "max_gpu_memory must be a positive number"),
    ]:
        with pytest.raises(GenError, match=match):
            check_options(options, CPU, torch.float32)
    with pytest.raises(GenError, match="needs at least"):
        Generator.from_pretrained(ASSETS / "flux-tiny", device="cpu", max_gpu_memory=0.5)


@pytest.mark.parametrize("mode", ["model", "layer"])
def test_declared_entry_points_move_too(mode):
    """Qwen-Image 2.1 runs its prompt prefix through `encode_prefix` / the blocks' `forward_prefix` before the steps
    (declared on its DiT): the weights are on the device there too, never their host copies, and the picture is
    the resident one."""
    asset, request = "qwen-image21-tiny", dict(prompt="a red cat", seed=3, height=32, width=32, num_inference_steps=2)
    expected = pictures(Generator.from_pretrained(ASSETS / asset, device="cpu"), request)
    gen = Generator.from_pretrained(ASSETS / asset, device="cpu", offload=mode)
    off = offload_of(gen)
    model = gen.pipeline.transformer
    blocks = [b for attr in gen.pipeline.dit.blocks for b in getattr(model, attr)]
    host = {p for u in off.units.values() for p in []}  # filled below from the host copies
    host = {t.data_ptr() for t in module_tensors(blocks)}
    seen = []
    original = blocks[0].__dict__.get("forward_prefix") or blocks[0].forward_prefix

    def probe(*args, **kwargs):
        seen.append(any(t.data_ptr() in host for t in module_tensors([blocks[0]])))
        return original(*args, **kwargs)

    blocks[0].__dict__["forward_prefix"] = probe
    try:
        assert np.array_equal(pictures(gen, request), expected)
    finally:
        blocks[0].__dict__["forward_prefix"] = original
        gen.pipeline.transforms.undo()
    assert seen and not any(seen), "the prefix pass ran on host copies"
