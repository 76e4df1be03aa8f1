"""Z-Image on 2 gloo CPU ranks (Ulysses, Ring, CFG parallel) equals the single-rank run.

One spawn of 2 ranks for the module: each rank loads the tiny model once, rank 0 runs the single-rank reference, then
each layout runs on both ranks and rank 0 reports latent and image differences. The request uses CFG with prompts of
different lengths (two caption prefixes, each padded to 32 tokens) and an image of 6 patch tokens padded to 32: the
image run, its pad tokens and its RoPE are sharded, the noise refiner attends over the shards alone, the caption
refiner stays on each rank.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import psnr

from gen.distributed.apply import parallelize
from gen.distributed.groups import ParallelConfig, ParallelContext
from gen.distributed.ranks import run_on_ranks

ASSET = Path(__file__).resolve().parents[1] / "assets" / "z-image-tiny"
LAYOUTS = [(2, 1, 1), (1, 2, 1), (1, 1, 2)]  # (ulysses, ring, cfg); the tiny model has 2 heads
REQUEST = dict(prompt="a red cat on the grass", negative_prompt="blue", guidance_scale=3.0, height=48, width=32,
               num_inference_steps=2, seed=3)


def _run(generator) -> tuple[torch.Tensor, np.ndarray]:
    """Generate; the final latents (captured from the denoise stage) and the decoded picture."""
    import pipelines.z_image as mod
    from gen.types import GenerationRequest

    original, captured = mod.denoise, []
    mod.denoise = lambda *a, **kw: captured.append(original(*a, **kw)) or captured[-1]
    try:
        result = generator.run(GenerationRequest(**REQUEST))
    finally:
        mod.denoise = original
    return captured[0], np.asarray(result.images[0])


def _layouts(rank: int, device: torch.device) -> dict | None:
    from gen.generator import Generator

    torch.set_num_threads(1)
    gen = Generator.from_pretrained(ASSET, device="cpu")
    ref = _run(gen) if rank == 0 else None
    report = {}
    for layout in LAYOUTS:
        ctx = ParallelContext.build(ParallelConfig(*layout), device, timeout_s=120)
        parallel = parallelize(gen.pipeline, ctx)
        try:
            latents, picture = _run(gen)
        finally:
            parallel.remove()
        if rank == 0:
            report[layout] = ((latents - ref[0]).abs().max().item(), psnr(picture, ref[1]), float(ref[1].std()),
                              parallel.cfg.exchanges)
    return report if rank == 0 else None


@pytest.fixture(scope="module")
def report() -> dict:
    return run_on_ranks(_layouts, 2, timeout_s=300)[0]


@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda l: "u{}r{}c{}".format(*l))
def test_two_ranks_equal_one(report, layout):
    latent_diff, picture_psnr, std, exchanges = report[layout]
    assert std > 1.0, "reference picture is flat: the comparison would prove nothing"
    assert exchanges == (1 if layout[2] == 2 else 0), exchanges  # CFG parallel: learnt on step 0, split on step 1
    assert latent_diff <= 1e-4, latent_diff
    assert picture_psnr >= 50.0, picture_psnr
