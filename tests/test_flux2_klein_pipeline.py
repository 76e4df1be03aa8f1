"""FLUX.2 [klein] end to end: pipelines/flux2.py Flux2KleinPipeline vs diffusers' Flux2KleinPipeline on the tiny asset
(same seed, fp32 CPU): text-to-image with and without CFG, editing, a negative prompt, a step-distilled checkpoint;
the Qwen3 prompt encoding on gen's LLM runtime vs the reference's; defaults, validation; CFG branches in one forward
and the step cache applied from outside."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import psnr, rel_err
from PIL import Image

from gen import GenError, Generator

ASSET = Path(__file__).resolve().parents[1] / "assets" / "flux2-klein-tiny"
DISC = Path(__file__).resolve().parents[1] / "assets" / "consistency" / "inputs" / "gradient-disc.png"
# below this PSNR an input changed the output (in the tiny random model the padded 512-token text moves the picture
# little: 43-46 dB between prompts here)
CHANGED = 55


@pytest.fixture(scope="module")
def gen() -> Generator:
    return Generator.from_pretrained(ASSET, device="cpu", dtype="fp32")


@pytest.fixture(scope="module")
def reference():
    from diffusers import Flux2KleinPipeline

    pipe = Flux2KleinPipeline.from_pretrained(str(ASSET), dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def run_reference(pipe, seed: int, **kw):
    with torch.no_grad():
        return pipe(generator=torch.Generator("cpu").manual_seed(seed), **kw).images


def test_text_to_image_matches_diffusers(gen, reference):
    """guidance_scale > 1: true CFG against the empty prompt (two transformer calls per step); 1: one call."""
    kw = dict(prompt="a red fox in the snow", num_inference_steps=2, height=48, width=64)
    pictures = {}
    for guidance in (4.0, 1.0):
        ours = gen.generate(seed=3, guidance_scale=guidance, **kw).images[0]
        ref = run_reference(reference, 3, guidance_scale=guidance, **kw)[0]
        assert ours.size == (64, 48)
        assert np.asarray(ref).std() > 10, "flat reference: the comparison would prove nothing"
        assert psnr(ours, ref) >= 40
        pictures[guidance] = ours
    assert psnr(pictures[4.0], pictures[1.0]) < CHANGED  # CFG changed the picture


def test_edit_matches_diffusers(gen, reference):
    image = Image.open(DISC)
    kw = dict(prompt="make the disc red", num_inference_steps=2, guidance_scale=3.0)
    ours = gen.generate(images=[image], seed=5, num_outputs=2, **kw).images
    ref = run_reference(reference, 5, image=[image], num_images_per_prompt=2, **kw)
    assert [im.size for im in ours] == [(64, 64)] * 2  # the input's size
    assert all(psnr(a, b) >= 40 for a, b in zip(ours, ref))


def test_negative_prompt_matches_reference_negative_embeds(gen, reference):
    """The reference's negative prompt is always ""; ours may be given, and equals passing its embeds there."""
    kw = dict(prompt="a red fox", num_inference_steps=2, height=32, width=48, guidance_scale=3.0)
    ours = gen.generate(seed=7, negative_prompt="blurry, dark", **kw).images[0]
    neg, _ = reference.encode_prompt("blurry, dark", device="cpu")
    ref = run_reference(reference, 7, negative_prompt_embeds=neg, **kw)[0]
    assert psnr(ours, ref) >= 40
    assert psnr(ours, gen.generate(seed=7, **kw).images[0]) < CHANGED  # the negative prompt took part


def test_prompt_encoding_matches_reference(gen, reference):
    """The runtime's states equal Flux2KleinPipeline._get_qwen3_prompt_embeds (transformers' Qwen3, layers 9, 18, 27
    stacked per token, the whole 512-token padded sequence), long prompts cut alike."""
    prompts = ["a red fox", "", " ".join(["a red cat on the grass"] * 150)]
    want = reference._get_qwen3_prompt_embeds(reference.text_encoder, reference.tokenizer, prompts)
    got = gen.pipeline.encode(prompts)
    assert got.shape == want.shape == (3, 512, 48)
    assert rel_err(got, want) <= 1e-5


def test_base_defaults_and_validation(gen):
    d = gen.pipeline.defaults
    assert (d.num_inference_steps, d.guidance_scale, d.height, d.width) == (50, 4.0, 1024, 1024)
    run = dict(num_inference_steps=1, height=32, width=32)
    with pytest.raises(GenError, match="true_cfg_scale=2.0: Flux2KleinPipeline has no true CFG"):
        gen.generate("x", true_cfg_scale=2.0, **run)
    with pytest.raises(GenError, match="negative_prompt given, but Flux2KleinPipeline does not use one here"):
        gen.generate("x", negative_prompt="blurry", guidance_scale=1.0, **run)


@pytest.fixture(scope="module")
def distilled(tmp_path_factory) -> Path:
    """The asset as a step-distilled checkpoint (model_index.json is_distilled: true, as FLUX.2 [klein] 4B / 9B)."""
    folder = tmp_path_factory.mktemp("klein") / "distilled"
    shutil.copytree(ASSET, folder)
    index = json.loads((folder / "model_index.json").read_text())
    (folder / "model_index.json").write_text(json.dumps({**index, "is_distilled": True}))
    return folder


def test_distilled_runs_without_cfg_as_the_reference(distilled):
    from diffusers import Flux2KleinPipeline

    g = Generator.from_pretrained(distilled, device="cpu", dtype="fp32")
    d = g.pipeline.defaults
    assert (d.num_inference_steps, d.guidance_scale) == (4, 1.0)
    calls = []
    hook = g.pipeline.transformer.register_forward_pre_hook(lambda m, a, k: calls.append(1), with_kwargs=True)
    try:
        ours = g.generate("a red fox", seed=3, height=48, width=32).images[0]
    finally:
        hook.remove()
    assert len(calls) == 4  # the default 4 steps, one call each
    ref = Flux2KleinPipeline.from_pretrained(str(distilled), dtype=torch.float32)
    ref.set_progress_bar_config(disable=True)
    want = run_reference(ref, 3, prompt="a red fox", num_inference_steps=4, guidance_scale=1.0, height=48, width=32)
    assert psnr(ours, want[0]) >= 40
    with pytest.raises(GenError, match="guidance_scale=4.0: this FLUX.2 \\[klein\\] checkpoint is step-distilled"):
        g.generate("x", guidance_scale=4.0, num_inference_steps=1, height=32, width=32)


# ---------------------------------------------------------------- transforms applied from outside


def _outputs_of(g: Generator, **kw) -> tuple[np.ndarray, int]:
    calls = []
    hook = g.pipeline.transformer.register_forward_pre_hook(lambda m, a, k: calls.append(1), with_kwargs=True)
    try:
        image = g.generate("a red circle", seed=7, **kw).images[0]
    finally:
        hook.remove()
    return np.asarray(image), len(calls)


CFG = dict(num_inference_steps=3, height=32, width=32, guidance_scale=3.0, negative_prompt="a blue square")


def test_cfg_branches_in_one_forward():
    pictures, calls = {}, {}
    for cfg_batch in (False, True):
        g = Generator.from_pretrained(ASSET, device="cpu", cfg_batch=cfg_batch)
        pictures[cfg_batch], calls[cfg_batch] = _outputs_of(g, **CFG)
    assert (calls[False], calls[True]) == (6, 3)
    assert psnr(pictures[True], pictures[False]) >= 50


def test_step_cache_exact_at_zero_and_skipping_when_large(gen):
    from gen.transforms.step_cache import StepCache

    plain, _ = _outputs_of(gen, **CFG)
    for threshold, skipped in ((0.0, False), (1e9, True)):
        caches = [StepCache(m, dit.blocks, dit.cache_layout, threshold) for _, m, dit in gen.pipeline.dits()]
        try:
            image, _ = _outputs_of(gen, **CFG)
        finally:
            for c in caches:
                c.remove()
        stats = caches[0].stats
        assert stats["forwards"] == 6 and stats["blocks"] == 6 * (2 + 2)
        if skipped:  # both CFG branches skip every step after the first
            assert stats["skipped_forwards"] == 4 and np.isfinite(image).all()
            assert psnr(image, plain) < 60
        else:
            assert stats["skipped_forwards"] == 0 and psnr(image, plain) == float("inf")


def test_components_that_do_not_fit_are_refused(tmp_path):
    """[dev]'s folder under the [klein] class: a transformer with guidance embedding; [klein]'s under [dev]'s: an
    encoder without the layers [dev] reads."""
    dev = Path(__file__).resolve().parents[1] / "assets" / "flux2-tiny"
    for source, class_name, message in [(dev, "Flux2KleinPipeline", "transformer guidance_embeds=True, but "
                                         "Flux2KleinPipeline never passes the guidance"),
                                        (ASSET, "Flux2Pipeline", r"the text encoder has 28 layers; Flux2Pipeline reads "
                                         r"hidden states of layers \(10, 20, 30\)")]:
        folder = shutil.copytree(source, tmp_path / class_name)
        index = json.loads((folder / "model_index.json").read_text())
        (folder / "model_index.json").write_text(json.dumps({**index, "_class_name": class_name}))
        with pytest.raises(GenError, match=message):
            Generator.from_pretrained(folder, device="cpu", dtype="fp32")


def test_cuda_graph_wrapper_replays_one_signature(gen):
    """The CUDA-graph wrapper's logic on CPU (eager_capture): both CFG branches (prompts padded to 512 tokens) share
    one signature, captured once and replayed; the pictures equal the plain ones."""
    from gen.transforms.cuda_graph import disable_cuda_graphs, eager_capture, enable_cuda_graphs

    plain, _ = _outputs_of(gen, **CFG)
    graphed = enable_cuda_graphs(gen.pipeline.transformer, capture=eager_capture)
    try:
        first, _ = _outputs_of(gen, **CFG)
        again, _ = _outputs_of(gen, **CFG)
    finally:
        disable_cuda_graphs(gen.pipeline.transformer)
    np.testing.assert_array_equal(first, plain)
    np.testing.assert_array_equal(again, plain)
    assert graphed.captures == 1
