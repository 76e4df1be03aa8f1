"""Z-Image end to end: pipelines/z_image.py vs diffusers' ZImagePipeline on the tiny asset (same seed, fp32 CPU), the
Qwen3 prompt encoding on gen's LLM runtime vs the reference's, the Turbo defaults, request validation, and the
transforms applied from outside (step cache, CFG branches in one forward, concurrent generations batched)."""
from __future__ import annotations

import threading
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import psnr, rel_err

from gen import GenError, Generator
from gen.llm import registry
from gen.types import GenerationRequest

ASSET = Path(__file__).resolve().parents[1] / "assets" / "z-image-tiny"


@pytest.fixture(scope="module")
def gen() -> Generator:
    return Generator.from_pretrained(ASSET, device="cpu", dtype="fp32")


@pytest.fixture(scope="module")
def reference():
    from diffusers import ZImagePipeline

    pipe = ZImagePipeline.from_pretrained(str(ASSET), dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def run_reference(pipe, seed: int, **kw):
    with torch.no_grad():
        return pipe(generator=torch.Generator("cpu").manual_seed(seed), **kw).images


def test_turbo_no_cfg_two_outputs_match_diffusers(gen, reference):
    kw = dict(prompt="a red cat sitting on grass", num_inference_steps=3, height=64, width=48, guidance_scale=0.0)
    ours = gen.generate(seed=3, num_outputs=2, **kw).images
    ref = run_reference(reference, 3, num_images_per_prompt=2, **kw)
    assert [im.size for im in ours] == [(48, 64)] * 2
    assert np.asarray(ref[0]).std() > 10, "flat reference: the comparison would prove nothing"
    assert all(psnr(a, b) >= 40 for a, b in zip(ours, ref))
    assert psnr(ours[0], ours[1]) < 40  # two draws, not one image twice


@pytest.mark.parametrize("negative", ["blurry, low quality", None])
def test_cfg_matches_diffusers(gen, reference, negative):
    """guidance_scale > 0: the reference's CFG (cond + g * (cond - uncond)), the negative prompt defaulting to ""."""
    kw = dict(prompt="a blue dog in the snow", num_inference_steps=2, height=32, width=48, guidance_scale=3.0)
    ours = gen.generate(seed=5, negative_prompt=negative, **kw).images[0]
    ref = run_reference(reference, 5, negative_prompt=negative, **kw)[0]
    assert psnr(ours, ref) >= 40
    plain = gen.generate(seed=5, **{**kw, "guidance_scale": 0.0}).images[0]
    assert psnr(ours, plain) < 40  # guidance changed the picture


def test_prompt_encoding_matches_reference(gen, reference):
    """The runtime's states equal ZImagePipeline._encode_prompt (transformers' Qwen3, hidden_states[-2], the real
    tokens of the 512-token padded batch); a prompt past 512 tokens is cut as the reference cuts it."""
    pipeline = gen.pipeline
    long = " ".join(["a red cat on the grass"] * 150)
    for prompt in ["a red cat", "", long]:
        want = reference._encode_prompt([prompt], device="cpu")[0]
        got = pipeline.encode(prompt)[0]
        assert got.shape == want.shape
        assert rel_err(got, want) <= 1e-5
    assert pipeline.encode(long).shape[1] == 512


def test_encoder_is_the_shared_runtime_instance(gen):
    from gen.llm import LLM

    assert isinstance(gen.pipeline.encoder, LLM)
    assert registry.key(ASSET / "text_encoder", "cpu", torch.float32) in registry.loaded()


def test_turbo_defaults_and_validation(gen):
    d = gen.pipeline.defaults
    assert (d.num_inference_steps, d.guidance_scale, d.height, d.width, d.size_multiple) == (9, 0.0, 1024, 1024, 16)
    with pytest.raises(GenError, match="true_cfg_scale=3.0: Z-Image's classifier-free guidance is guidance_scale"):
        gen.generate("x", true_cfg_scale=3.0, num_inference_steps=1, height=32, width=32)
    with pytest.raises(GenError, match="does not take input images"):
        from PIL import Image
        gen.generate("x", images=[Image.new("RGB", (32, 32))], num_inference_steps=1, height=32, width=32)
    with pytest.raises(GenError, match="multiple of 16"):
        gen.generate("x", num_inference_steps=1, height=40, width=32)


# ---------------------------------------------------------------- transforms applied from outside


def _outputs_of(g: Generator, **kw) -> tuple[np.ndarray, int]:
    calls = []
    hook = g.pipeline.transformer.register_forward_pre_hook(lambda m, a, k: calls.append(1), with_kwargs=True)
    try:
        image = g.generate("a red circle", seed=7, **kw).images[0]
    finally:
        hook.remove()
    return np.asarray(image), len(calls)


CFG = dict(num_inference_steps=4, height=32, width=32, guidance_scale=2.0, negative_prompt="a blue square")


def test_step_cache_exact_at_zero_and_skipping_when_large(gen):
    from gen.transforms.step_cache import StepCache

    plain, _ = _outputs_of(gen, **CFG)
    for threshold, skipped in ((0.0, False), (1e9, True)):
        dits = gen.pipeline.dits()
        caches = [StepCache(m, dit.blocks, dit.cache_layout, threshold) for _, m, dit in dits]
        try:
            image, _ = _outputs_of(gen, **CFG)
        finally:
            for c in caches:
                c.remove()
        stats = caches[0].stats
        assert stats["forwards"] == 8 and stats["blocks"] == 8 * (2 + 2 + 2)
        if skipped:  # both CFG branches skip every step after the first
            assert stats["skipped_forwards"] == 6 and np.isfinite(image).all()
            assert psnr(image, plain) < 60
        else:
            assert stats["skipped_forwards"] == 0 and psnr(image, plain) == float("inf")


def test_cfg_branches_in_one_forward():
    """The conditional and unconditional prompts (different lengths: padded and masked) in one batched forward."""
    pictures, calls = {}, {}
    for cfg_batch in (False, True):
        g = Generator.from_pretrained(ASSET, device="cpu", cfg_batch=cfg_batch)
        pictures[cfg_batch], calls[cfg_batch] = _outputs_of(g, **CFG)
    assert (calls[False], calls[True]) == (8, 4)
    assert psnr(pictures[True], pictures[False]) >= 50


def test_concurrent_generations_batched_equal_each_alone(gen):
    kw = dict(height=32, width=32, num_inference_steps=3)
    prompts = ["a red circle", "a small blue square in the top left corner on a yellow background"]
    requests = [GenerationRequest(prompt=p, seed=10 + i, **kw) for i, p in enumerate(prompts)]
    expected = [np.asarray(gen.run(r).images[0]) for r in requests]
    batched = Generator.from_pretrained(ASSET, device="cpu", max_batch=2, batch_wait_ms=2000)
    results, start = [None, None], threading.Barrier(2)

    def work(i):
        start.wait()
        results[i] = batched.run(requests[i])

    threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert batched.batch_group.stats["batched_calls"] > 0
    for r, want in zip(results, expected):
        assert psnr(np.asarray(r.images[0]), want) >= 50
