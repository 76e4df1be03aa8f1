"""FLUX.1 Kontext image editing: FluxKontextPipeline (pipelines/flux.py) vs diffusers' FluxKontextPipeline on the tiny
asset (same seed, fp32 CPU; the input image auto-resized to the preferred resolution as the reference does), the
resolution choice, request validation."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from helpers import psnr, rel_err

from gen import GenError, Generator
from pipelines.flux import KONTEXT_RESOLUTIONS, kontext_size

ASSET = Path(__file__).resolve().parents[1] / "assets" / "flux-kontext-tiny"


def picture(w: int, h: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def gen() -> Generator:
    return Generator.from_pretrained(ASSET, device="cpu", dtype="fp32")


@pytest.fixture(scope="module")
def reference():
    from diffusers import FluxKontextPipeline

    pipe = FluxKontextPipeline.from_pretrained(str(ASSET), dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def run_reference(pipe, seed: int, image, **kw):
    """The reference at the requested size: it rescales height x width to max_area pixels, so max_area = h * w."""
    with torch.no_grad():
        return pipe(image=image, generator=torch.Generator("cpu").manual_seed(seed),
                    max_area=kw["height"] * kw["width"], **kw).images


def first_call(model, run) -> dict:
    """The keyword arguments of `model`'s first forward during `run()`."""
    calls = []
    hook = model.register_forward_pre_hook(lambda m, a, k: calls.append(k), with_kwargs=True)
    try:
        run()
    finally:
        hook.remove()
    return calls[0]


def test_edit_matches_diffusers(gen, reference):
    image = picture(64, 48, 0)
    kw = dict(prompt="make the cat red", num_inference_steps=2, height=32, width=48, guidance_scale=2.5)
    out = {}
    ours_in = first_call(gen.pipeline.transformer, lambda: out.update(ours=gen.generate(seed=3, images=[image], **kw)))
    ref_in = first_call(reference.transformer, lambda: out.update(ref=run_reference(reference, 3, image, **kw)))
    ours, ref = out["ours"].images[0], out["ref"][0]
    assert ours.size == (48, 32)
    assert np.asarray(ref).std() > 10, "flat reference: the comparison would prove nothing"
    assert psnr(ours, ref) >= 40
    # the tiny model barely reacts to its input image, so the pictures alone would not show a wrong reference:
    # the transformer gets the same tokens (6 noise tokens, then 55 x 74 of the image resized to 1184 x 880) and ids
    assert ours_in["hidden_states"].shape == ref_in["hidden_states"].shape == (1, 6 + 55 * 74, 16)
    assert rel_err(ours_in["hidden_states"], ref_in["hidden_states"]) <= 1e-6
    assert torch.equal(ours_in["img_ids"], ref_in["img_ids"]) and bool((ours_in["img_ids"][6:, 0] == 1).all())


def test_true_cfg_two_outputs_tall_input_match_diffusers(gen, reference):
    image = picture(40, 90, 2)  # a tall input: another preferred resolution
    kw = dict(prompt="a blue sky", negative_prompt="blurry", true_cfg_scale=2.0, num_inference_steps=2, height=48,
              width=32, guidance_scale=3.5)
    ours = gen.generate(seed=5, images=[image], num_outputs=2, **kw).images
    ref = run_reference(reference, 5, image, num_images_per_prompt=2, **kw)
    assert all(psnr(a, b) >= 40 for a, b in zip(ours, ref))


def test_resolution_choice_is_the_references():
    from diffusers.pipelines.flux.pipeline_flux_kontext import PREFERRED_KONTEXT_RESOLUTIONS

    assert KONTEXT_RESOLUTIONS == tuple(PREFERRED_KONTEXT_RESOLUTIONS)
    assert kontext_size(1024, 1024, 16) == (1024, 1024)
    assert kontext_size(64, 48, 16) == (1184, 880)  # 4:3 -> the closest ratio, 1.345
    assert kontext_size(47, 40, 16) == (1024, 1024)  # sides first cut to 32 x 32
    with pytest.raises(GenError, match="smaller than 16 x 16"):
        kontext_size(15, 200, 16)


def test_validation(gen):
    kw = dict(num_inference_steps=1, height=32, width=32)
    with pytest.raises(GenError, match="needs an input image"):
        gen.generate("x", **kw)
    with pytest.raises(GenError, match="takes one input image, got 2"):
        gen.generate("x", images=[picture(32, 32, 0)] * 2, **kw)
    with pytest.raises(GenError, match="smaller than 16 x 16"):
        gen.generate("x", images=[picture(8, 64, 0)], **kw)
    assert gen.pipeline.defaults.guidance_scale == 3.5 and gen.pipeline.defaults.num_inference_steps == 28


# ---------------------------------------------------------------- 2 CPU ranks


LAYOUTS = [(2, 1, 1)]  # (ulysses, ring, cfg): the noise and reference tokens are sharded together


def _two_rank_layouts(rank: int, device: torch.device) -> dict | None:
    from gen.distributed.apply import parallelize
    from gen.distributed.groups import ParallelConfig, ParallelContext
    from gen.generator import Generator as Gen

    torch.set_num_threads(1)
    gen = Gen.from_pretrained(ASSET, device="cpu")
    kw = dict(prompt="make it red", images=[picture(64, 48, 0)], num_inference_steps=2, height=48, width=32, seed=3)
    ref = np.asarray(gen.generate(**kw).images[0])
    report = {}
    for layout in LAYOUTS:
        ctx = ParallelContext.build(ParallelConfig(*layout), device, timeout_s=120)
        parallel = parallelize(gen.pipeline, ctx)
        try:
            report[layout] = psnr(np.asarray(gen.generate(**kw).images[0]), ref)
        finally:
            parallel.remove()
    return report if rank == 0 else None


def test_two_ranks_equal_one():
    from gen.distributed.ranks import run_on_ranks

    report = run_on_ranks(_two_rank_layouts, 2, timeout_s=300)[0]
    assert all(v >= 50.0 for v in report.values()), report
