"""Batching concurrent generations (gen/transforms/batch.py): generations run in threads share their DiT calls and
each gets what it would have got alone (its own seed, prompt, size of text); refusals."""
from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from gen import GenError, Generator
from gen.transforms.batch import BatchGroup, CallBatcher
from gen.types import GenerationRequest
from helpers import psnr

ASSETS = Path(__file__).resolve().parents[1] / "assets"
CASES = {  # folder, requests (different prompts and seeds; gen-shapes' prompts differ in token count)
    "flux": ("flux-tiny", dict(height=32, width=32, num_inference_steps=3)),
    "wan": ("wan-t2v-tiny", dict(height=32, width=32, num_frames=5, num_inference_steps=3, guidance_scale=3.0)),
    "shapes": ("gen-shapes", dict(num_inference_steps=3)),
}
PROMPTS = ["a red circle", "a small blue square in the top left corner on a yellow background", "a green star"]


def pictures(result) -> np.ndarray:
    return np.stack([np.asarray(p) for p in (result.frames if result.frames is not None else result.images)])


def run_threads(gen: Generator, requests: list[GenerationRequest]) -> list:
    results, errors = [None] * len(requests), []
    start = threading.Barrier(len(requests))

    def work(i):
        try:
            start.wait()
            results[i] = gen.run(requests[i])
        except BaseException as e:  # reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(requests))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not errors, errors
    return results


@pytest.mark.parametrize("name", sorted(CASES))
def test_batched_generations_equal_each_alone(name):
    folder, kw = CASES[name]
    requests = [GenerationRequest(prompt=p, seed=10 + i, **kw) for i, p in enumerate(PROMPTS)]
    alone = Generator.from_pretrained(ASSETS / folder, device="cpu")
    expected = [pictures(alone.run(r)) for r in requests]
    gen = Generator.from_pretrained(ASSETS / folder, device="cpu", max_batch=4, batch_wait_ms=300)
    results = run_threads(gen, requests)
    stats = gen.batch_group.stats
    assert stats["batched_calls"] > 0 and stats["forwards"] < stats["calls"], stats  # calls were shared
    for r, want in zip(results, expected):
        got = pictures(r)
        assert got.shape == want.shape
        assert psnr(got, want) >= 50.0, psnr(got, want)
    assert gen.batch_group.active == 0


def test_partial_batches_stay_exact():
    """Short waits: batches of every composition (generations at different stages and steps); text encoding, which
    shares tokenizers whose padding settings change between calls, is serialized."""
    kw = dict(height=32, width=32, num_inference_steps=3)
    requests = [GenerationRequest(prompt=PROMPTS[i % 3] + " x" * i, seed=10 + i, **kw) for i in range(6)]
    alone = Generator.from_pretrained(ASSETS / "flux-tiny", device="cpu")
    expected = [pictures(alone.run(r)) for r in requests]
    gen = Generator.from_pretrained(ASSETS / "flux-tiny", device="cpu", max_batch=6, batch_wait_ms=20)
    for _ in range(3):
        for r, want in zip(run_threads(gen, requests), expected):
            assert psnr(pictures(r), want) >= 50.0
    assert gen.batch_group.stats["batched_calls"] > 0


def test_a_lone_generation_does_not_wait():
    gen = Generator.from_pretrained(ASSETS / "flux-tiny", device="cpu", max_batch=4, batch_wait_ms=10_000)
    result = gen.generate("a red circle", seed=1, height=32, width=32, num_inference_steps=2)  # would take 10 s/call
    assert result.images and gen.batch_group.stats["batched_calls"] == 0


def test_batcher_splits_outputs_and_pads_text():
    class Toy(torch.nn.Module):
        def forward(self, x, text, mask=None, scale=1.0):
            w = text.sum(1) if mask is None else (text * mask[..., None]).sum(1)
            return x * scale + w, {"n": x.shape[0]}

    group = BatchGroup(max_batch=3, wait_s=5.0)
    model = Toy()
    CallBatcher(model, group, ("x", "text"), (("text", "mask"),))
    calls = [(torch.full((1, 2), float(i)), torch.ones(1, i + 1, 2)) for i in range(3)]
    outs = [None] * 3

    def work(i):
        with group.member():
            outs[i] = model(*calls[i], scale=2.0)

    with group.member():  # a fourth member that never calls: the leader stops waiting when all callers are in
        threads = [threading.Thread(target=work, args=(i,)) for i in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=30)
    for i, (x, text) in enumerate(calls):
        assert torch.equal(outs[i][0], x * 2.0 + text.sum(1))
    assert group.stats["forwards"] < 3 and group.stats["batched_calls"] >= 2


def test_refusals():
    with pytest.raises(GenError, match="max_batch must be an integer >= 1, got 0"):
        Generator.from_pretrained(ASSETS / "flux-tiny", device="cpu", max_batch=0)
    with pytest.raises(GenError, match="step_cache cannot be combined"):
        Generator.from_pretrained(ASSETS / "flux-tiny", device="cpu", max_batch=2, step_cache=0.1)
    with pytest.raises(GenError, match="one process only"):
        Generator.from_pretrained(ASSETS / "flux-tiny", device="cpu", max_batch=2, num_gpus=2)


@pytest.mark.parametrize("name", ["flux", "wan", "qwen"])
def test_cfg_branches_in_one_forward(name):
    """cfg_batch: the conditional and unconditional calls of a step as one batched forward (Qwen-Image's two
    prompts of different lengths padded and masked): same pictures, half the forwards."""
    folder, kw = {"flux": ("flux-tiny", dict(height=32, width=32, negative_prompt="blue", true_cfg_scale=2.0)),
                  "wan": ("wan-t2v-tiny", dict(height=32, width=32, num_frames=5, guidance_scale=3.0)),
                  "qwen": ("qwen-image-tiny", dict(height=32, width=32, negative_prompt="a blue square x",
                                                   true_cfg_scale=2.0))}[name]
    pictures_of = {}
    for cfg_batch in (False, True):
        gen = Generator.from_pretrained(ASSETS / folder, device="cpu", cfg_batch=cfg_batch)
        calls = []
        hook = gen.pipeline.transformer.register_forward_pre_hook(lambda m, a, k: calls.append(1), with_kwargs=True)
        pictures_of[cfg_batch] = pictures(gen.generate("a red circle", seed=3, num_inference_steps=3, **kw))
        hook.remove()
        assert len(calls) == (3 if cfg_batch else 6)
    assert psnr(pictures_of[True], pictures_of[False]) >= 50.0
    with pytest.raises(GenError, match="cfg_batch and step_cache cannot be combined"):
        Generator.from_pretrained(ASSETS / folder, device="cpu", cfg_batch=True, step_cache=0.1)


class SlowDevice(torch.nn.Module):
    """A forward that takes `seconds` with the GIL free, as a launch-bound GPU forward leaves the host between
    launches: the time the other generations' host work could fill."""

    def __init__(self, seconds: float):
        super().__init__()
        self.seconds = seconds

    def forward(self, x):
        time.sleep(self.seconds)
        return x + 1


def hold_gil(seconds: float) -> None:
    """Host work between two steps (scheduler, CFG): Python holding the GIL."""
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


def stepping(group: BatchGroup, model, n: int, steps: int, host_s, start: threading.Barrier) -> list:
    """`n` generations of `steps` calls each in the denoise stage; `host_s(i)` of host work after each call."""
    outs = [None] * n

    def work(i):
        with group.member(), group.stage("denoise"):
            start.wait()
            x = torch.zeros(1)
            for _ in range(steps):
                x = model(x)
                hold_gil(host_s(i))
            outs[i] = x

    threads = [threading.Thread(target=work, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    return threads


def test_stepping_generations_keep_in_lock_step():
    """Host work between steps longer than the batch wait (and different per generation): every forward still
    takes the call of every generation, as the gatherer waits for the stepping ones, not for a timer."""
    group = BatchGroup(max_batch=8, wait_s=0.0)
    model = SlowDevice(0.02)
    CallBatcher(model, group, ("x",))
    n, steps = 6, 5
    threads = stepping(group, model, n, steps, lambda i: 0.002 * (i + 1), threading.Barrier(6))
    for t in threads:
        t.join(timeout=30)
    s = group.stats
    assert (s["calls"], s["forwards"], s["batched_calls"], s["stalls"]) == (n * steps, steps, n * steps, 0), s
    assert group.report() == {"SlowDevice.forward": s}


def test_a_stalled_generation_is_left_for_the_next_forward():
    """A stepping generation that does not call within stall_s: the others go without it."""
    group = BatchGroup(max_batch=8, wait_s=0.0, stall_s=0.05)
    model = SlowDevice(0.001)
    CallBatcher(model, group, ("x",))
    start = threading.Barrier(4)
    threads = stepping(group, model, 3, 3, lambda i: 0.0, start)
    with group.member(), group.stage("denoise"):  # in its denoise loop, but its host work takes 0.5 s
        start.wait()
        time.sleep(0.5)
    for t in threads:
        t.join(timeout=30)
    assert group.stats["stalls"] >= 1 and group.stats["forwards"] <= 3 + 1, group.stats


def test_shapes_share_text_encodes_and_decodes():
    """gen-shapes: the LLM runtime's encoder takes concurrent encodes (merged into batched prefills), and the 2D VAE's
    decodes of generations that finish together run as one batched decode."""
    gen = Generator.from_pretrained(ASSETS / "gen-shapes", device="cpu", max_batch=4, batch_wait_ms=300)
    llm = gen.pipeline.encoder.llm
    before = dict(llm.stats)
    requests = [GenerationRequest(prompt=p, seed=10 + i, num_inference_steps=2) for i, p in enumerate(PROMPTS)]
    run_threads(gen, requests)
    report = gen.batch_group.report()
    decode = report["AutoencoderKL.decode"]
    assert decode["calls"] == 3 and decode["forwards"] < 3, report
    calls, batches = (llm.stats[k] - before[k] for k in ("encode_calls", "encode_batches"))
    read = sum(not gen.prompt_guide.read_as_is(p) for p in PROMPTS)  # the prompt reader encodes these once more
    assert read == 2 and calls == 6 + read and batches < calls, llm.stats


def test_default_cfg_batch_leaves_out_branches_that_need_padding(monkeypatch):
    """By default (cfg_batch=None, as on an accelerator) a prompt and negative prompt of different lengths run as two
    forwards when the DiT's attention would need a key mask (a padded batch masks attention keys: slower on GPUs); of
    equal lengths, as one. (Qwen-Image, declared otherwise, is made to need the mask here.)"""
    import dataclasses

    gen = Generator.from_pretrained(ASSETS / "qwen-image-tiny", device="cpu", cfg_batch=True)
    pipe = gen.pipeline
    pipe.cfg_batch_padded = False  # what apply_transforms sets when cfg_batch is left to the default
    pipe.dit = dataclasses.replace(pipe.dit, padded_text_leads_keys=False)
    calls = []
    hook = pipe.transformer.register_forward_pre_hook(lambda m, a, k: calls.append(1), with_kwargs=True)
    kw = dict(height=32, width=32, true_cfg_scale=2.0, num_inference_steps=2, seed=3)
    gen.generate("a red circle", negative_prompt="a blue square on a green background x", **kw)
    assert len(calls) == 4  # different lengths: two forwards a step
    calls.clear()
    gen.generate("a red circle", negative_prompt="a red circle", **kw)
    assert len(calls) == 2  # equal lengths: one forward a step
    hook.remove()


def test_padded_cfg_batch_attends_real_keys_unmasked():
    """Qwen-Image's padded text leads its attention keys: by default its CFG branches of different lengths run as one
    forward whose attentions go row by row over the real keys, unmasked (RealKeysByRow), and the image equals the
    two-forward one."""
    from gen.models import attention as A

    kw = dict(height=32, width=32, true_cfg_scale=2.0, num_inference_steps=3, seed=3,
              negative_prompt="a blue square on a green background x")
    plain = Generator.from_pretrained(ASSETS / "qwen-image-tiny", device="cpu")  # CPU default: two forwards
    assert not plain.pipeline.cfg_batch
    ref = np.asarray(plain.generate("a red circle", **kw).images[0])
    gen = Generator.from_pretrained(ASSETS / "qwen-image-tiny", device="cpu", cfg_batch=True)
    pipe = gen.pipeline
    pipe.cfg_batch_padded = False  # the accelerator default
    calls, masks = [], []
    hook = pipe.transformer.register_forward_pre_hook(lambda m, a, k: calls.append(1), with_kwargs=True)
    inner = A.get_attention_backend()

    def spy(q, k, v, mask=None):
        masks.append(mask is not None)
        return inner(q, k, v, mask)

    previous = A.set_attention_backend(spy)
    try:
        out = np.asarray(gen.generate("a red circle", **kw).images[0])
    finally:
        A.set_attention_backend(previous)
        hook.remove()
    assert len(calls) == 3  # one forward a step
    assert masks and not any(masks)  # no attention call took a mask
    assert ref.std() > 1.0 and psnr(out, ref) >= 40, psnr(out, ref)


def test_real_keys_by_row_equals_masked_attention():
    """RealKeysByRow over rows of three text lengths (two alike) == the masked attention, queries at padded positions
    included."""
    from gen.models.attention import math_attention
    from gen.transforms.batch import RealKeysByRow

    g = torch.Generator().manual_seed(0)
    lengths, padded, image = [5, 2, 2, 3], 5, 7
    q, k, v = (torch.randn(4, padded + image, 2, 8, generator=g) for _ in range(3))
    mask = torch.ones(4, padded + image, dtype=torch.bool)
    for row, n in enumerate(lengths):
        mask[row, n:padded] = False
    seen = []

    def inner(q, k, v, mask=None):
        seen.append((q.shape[0], k.shape[1], mask is None))
        return math_attention(q, k, v, mask)

    out = RealKeysByRow(lengths, padded)(q, k, v, mask, inner)
    torch.testing.assert_close(out, math_attention(q, k, v, mask), rtol=1e-5, atol=1e-6)
    assert seen == [(1, 12, True), (2, 9, True), (1, 10, True)]  # rows of one length together, unmasked
    RealKeysByRow(lengths, padded)(q[:2], k[:2], v[:2], mask[:2], inner)  # another shape: passed through as is
    assert seen[-1] == (2, 12, False)


def test_real_keys_by_row_is_per_thread_and_compiles_once_per_lengths():
    """masked_calls_through reaches only its own thread's attention calls; under torch.compile one set of lengths
    compiles once (the lengths are guarded values), not once per merged forward."""
    import torch._dynamo

    from gen.models.attention import attention, masked_calls_through
    from gen.transforms.batch import RealKeysByRow

    q = k = v = torch.randn(2, 6, 1, 4)
    mask = torch.ones(2, 6, dtype=torch.bool)
    mask[1, 2:3] = False
    routed = []

    class Spy(RealKeysByRow):
        def __call__(self, *a):
            routed.append(threading.get_ident())
            return super().__call__(*a)

    with masked_calls_through(Spy([3, 2], 3)):
        attention(q, k, v, mask)
        other = threading.Thread(target=attention, args=(q, k, v, mask))
        other.start()
        other.join()
        attention(q, k, v, None)  # unmasked: the backend as is
    assert routed == [threading.get_ident()]

    torch._dynamo.reset()
    frames = []
    compiled = torch.compile(lambda q, k, v, m: attention(q, k, v, m) * 2, backend="eager")
    torch._dynamo.utils.counters.clear()
    for _ in range(3):  # three merged forwards of one request
        with masked_calls_through(RealKeysByRow([3, 2], 3)):
            frames.append(compiled(q, k, v, mask))
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1
    torch.testing.assert_close(frames[0], frames[2])
