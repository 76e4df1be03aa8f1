"""Qwen-Image 2.1 on 2 gloo ranks (Ulysses, Ring, CFG parallel) equals the single-rank run: text-to-image with true
CFG, and generation on a condition image, whose prompt and image tokens every rank holds whole (the target image's
tokens are sharded and attend to them as keys without queries).

One spawn of 2 CPU ranks for the module: each rank loads the tiny model once, rank 0 runs the single-rank reference,
then every layout runs on both ranks and rank 0 reports latent and image differences. (Sizes are multiples of 32
pixels, so the target's token count always divides by 4: no shard padding on 2 ranks.)
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

ASSET = Path(__file__).resolve().parents[1] / "assets" / "qwen-image21-tiny"
LAYOUTS = [(2, 1, 1), (1, 2, 1), (1, 1, 2)]  # (ulysses, ring, cfg)
CASES = {
    "text": dict(prompt="a red cat", negative_prompt="blue", true_cfg_scale=3.0, height=64, width=96,
                 num_inference_steps=2, seed=3),
    "condition": dict(prompt="make it green", negative_prompt=" ", true_cfg_scale=2.0, height=32, width=64,
                      num_inference_steps=2, seed=5),
}


def _run(generator, request) -> tuple[torch.Tensor, np.ndarray]:
    """Generate; return the final latents (captured from the denoise stage) and the decoded pictures."""
    import pipelines.qwen_image21 as mod
    from gen.types import GenerationRequest

    original, captured = mod.denoise, []
    mod.denoise = lambda *a, **kw: captured.append(original(*a, **kw)) or captured[-1]
    try:
        result = generator.run(GenerationRequest(**request))
    finally:
        mod.denoise = original
    return captured[0], np.stack([np.asarray(p) for p in result.images])


def _cases(rank: int, device: torch.device) -> dict | None:
    from gen.generator import Generator

    torch.set_num_threads(1)
    gen = Generator.from_pretrained(ASSET, device="cpu")
    gen.pipeline.output_resolution = 320  # a condition image of 384 x 256 pixels (the processor's minimum is 256^2)
    rng = np.random.default_rng(0)
    from PIL import Image

    image = Image.fromarray(rng.integers(0, 256, (50, 70, 3), dtype=np.uint8))
    report = {}
    for name, request in CASES.items():
        request = dict(request, images=(image,)) if name == "condition" else request
        ref = _run(gen, request) if rank == 0 else None
        for layout in LAYOUTS:
            ctx = ParallelContext.build(ParallelConfig(*layout), device, timeout_s=120)
            parallel = parallelize(gen.pipeline, ctx)
            try:
                latents, pictures = _run(gen, request)
            finally:
                parallel.remove()
            if rank == 0:
                report[(name, layout)] = ((latents - ref[0]).abs().max().item(), psnr(pictures, ref[1]),
                                          float(ref[1].std()), parallel.cfg.exchanges)
    return report if rank == 0 else None


@pytest.fixture(scope="module")
def report() -> dict:
    return run_on_ranks(_cases, 2, timeout_s=300)[0]


@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda l: "u{}r{}c{}".format(*l))
@pytest.mark.parametrize("case", list(CASES))
def test_parallel_equals_single_rank(report, case, layout):
    latent_diff, picture_psnr, std, exchanges = report[(case, layout)]
    assert std > 10.0, "reference pictures are flat: the comparison would prove nothing"
    # CFG parallel learns the pairing on step 0, then splits the branches: 1 exchange in 2 steps
    assert exchanges == (1 if layout[2] == 2 else 0), exchanges
    assert latent_diff <= 1e-4, latent_diff
    assert picture_psnr >= 50.0, picture_psnr
