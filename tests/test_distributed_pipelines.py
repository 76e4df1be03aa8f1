"""FLUX, Wan and Qwen-Image on 2 and 4 gloo ranks (Ulysses, Ring, both, CFG parallel) equal the single-rank run.

One spawn of 4 CPU ranks for the module: each rank loads the tiny models once, rank 0 runs the single-rank
reference, then every layout runs on its ranks (the others idle) and rank 0 reports latent and image differences.
Sizes are chosen so that the token count does not divide by 4 (padding is exercised).
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

ASSETS = Path(__file__).resolve().parents[1] / "assets"
# (ulysses, ring, cfg); the tiny models have 2 heads, so Ulysses stops at 2
LAYOUTS = [(2, 1, 1), (1, 2, 1), (1, 4, 1), (2, 2, 1), (1, 1, 2), (2, 1, 2), (1, 2, 2)]
CASES = {  # model -> (asset, pipeline module, request); 6 image tokens (FLUX / Qwen), 18 video tokens (Wan)
    "flux": ("flux-tiny", "pipelines.flux", dict(prompt="a red cat", negative_prompt="blue", true_cfg_scale=3.0,
                                                  height=48, width=32, num_inference_steps=2, seed=3)),
    "wan": ("wan-t2v-tiny", "pipelines.wan", dict(prompt="a red cat", negative_prompt="blue", guidance_scale=4.0,
                                                   height=48, width=48, num_frames=5, num_inference_steps=2, seed=3)),
    "qwen-image": ("qwen-image-tiny", "pipelines.qwen_image", dict(prompt="a red cat", negative_prompt="blue",
                                                                    true_cfg_scale=3.0, height=48, width=32,
                                                                    num_inference_steps=2, seed=3)),
}


def _pictures(result) -> np.ndarray:
    pictures = result.frames if result.frames is not None else result.images
    return np.stack([np.asarray(p) for p in pictures])


def _run(generator, module, request) -> tuple[torch.Tensor, np.ndarray]:
    """Generate; return the final latents (captured from the denoise stage) and the decoded pictures."""
    import importlib

    from gen.types import GenerationRequest

    mod = importlib.import_module(module)
    original, captured = mod.denoise, []
    mod.denoise = lambda *a, **kw: captured.append(original(*a, **kw)) or captured[-1]
    try:
        result = generator.run(GenerationRequest(**request))
    finally:
        mod.denoise = original
    return captured[0], _pictures(result)


def _pipeline_cases(rank: int, device: torch.device) -> dict | None:
    from gen.generator import Generator

    torch.set_num_threads(1)
    report = {}
    for name, (asset, module, request) in CASES.items():
        gen = Generator.from_pretrained(ASSETS / asset, device="cpu")
        ref = _run(gen, module, request) if rank == 0 else None
        for layout in LAYOUTS:
            ctx = ParallelContext.build(ParallelConfig(*layout), device, timeout_s=120)
            if not ctx.member:
                continue
            parallel = parallelize(gen.pipeline, ctx)
            texts = []  # the text lengths the DiT's text stream saw on this rank
            embedder = getattr(gen.pipeline.transformer, "context_embedder", None) if name == "flux" else None
            hook = embedder.register_forward_hook(lambda m, a, o: texts.append(a[0].shape[1])) if embedder else None
            try:
                latents, pictures = _run(gen, module, request)
            finally:
                parallel.remove()
                if hook is not None:
                    hook.remove()
            if rank == 0:
                report[(name, layout)] = ((latents - ref[0]).abs().max().item(), psnr(pictures, ref[1]),
                                          float(ref[1].std()), parallel.cfg.exchanges, set(texts))
    return report if rank == 0 else None


@pytest.fixture(scope="module")
def report() -> dict:
    return run_on_ranks(_pipeline_cases, 4, timeout_s=600)[0]


@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda l: "u{}r{}c{}".format(*l))
@pytest.mark.parametrize("model", list(CASES))
def test_parallel_equals_single_rank(report, model, layout):
    latent_diff, picture_psnr, std, exchanges, texts = report[(model, layout)]
    assert std > 1.0, "reference pictures are flat: the comparison would prove nothing"
    if model == "flux":  # FLUX's 512 text tokens are sharded with the image tokens, not replicated on every rank
        assert texts == {512 // (layout[0] * layout[1])}, texts
    # CFG parallel learns the pairing on step 0, then splits the branches: 1 exchange in 2 steps
    assert exchanges == (1 if layout[2] == 2 else 0), exchanges
    assert latent_diff <= 1e-4, latent_diff
    assert picture_psnr >= 50.0, picture_psnr


def test_plain_transformer_unchanged_after_remove():
    """parallelize() only wraps: after remove() the model's forward and attention backend are the originals."""
    from gen.generator import Generator
    from gen.models.attention import get_attention_backend

    gen = Generator.from_pretrained(ASSETS / "flux-tiny", device="cpu")
    model = gen.pipeline.transformer
    before = (model.forward, get_attention_backend())
    ctx = ParallelContext(ParallelConfig(), 0, torch.device("cpu"))  # one rank: no groups needed
    parallel = parallelize(gen.pipeline, ctx)
    assert "forward" in model.__dict__
    parallel.remove()
    assert "forward" not in model.__dict__ and (model.forward, get_attention_backend()) == before


def test_text_stays_replicated_when_it_does_not_shard_evenly():
    """The text is split with the sequence only when its length divides by the sp degree and no mask is passed."""
    from gen.distributed.apply import ShardedTransformer
    from gen.distributed.attention import CallState
    from gen.generator import Generator

    gen = Generator.from_pretrained(ASSETS / "flux-tiny", device="cpu")
    model = gen.pipeline.transformer
    ctx = ParallelContext(ParallelConfig(ulysses_degree=2), 1, torch.device("cpu"))  # rank 1 of 2 (no call is run)
    sharded = ShardedTransformer(model, gen.pipeline.dit.shard_plan, ctx, cfg=lambda run, args: run())
    try:
        def split(length, **extra):
            args = {"encoder_hidden_states": torch.arange(2 * length).reshape(1, length, 2).float(),
                    "txt_ids": torch.zeros(length, 3), **extra}
            return sharded._shard_text(args, CallState(prefix_len=length)), args

        done, args = split(8)
        assert done and torch.equal(args["encoder_hidden_states"][0, :, 0], torch.arange(8.0, 16.0, 2.0))
        assert args["txt_ids"].shape == (4, 3)  # rank 1's half
        done, args = split(7)  # odd: replicated
        assert not done and args["encoder_hidden_states"].shape[1] == 7
        done, args = split(8, attention_mask=torch.tensor([[True] * 6 + [False] * 2]))  # a mask: replicated
        assert not done and args["txt_ids"].shape == (8, 3)
        assert split(8, attention_mask=None)[0]  # no mask given
    finally:
        sharded.remove()
