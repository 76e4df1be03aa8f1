"""First-block step cache (gen/transforms/step_cache.py) on the tiny FLUX, Wan and Qwen-Image assets: exact when it never
skips, counted and finite when it skips, per-CFG-branch residuals, reset between generations, flag validation."""
from __future__ import annotations

import contextlib
from pathlib import Path

import numpy as np
import pytest
import torch

from gen import GenError, Generator
from gen.cli import main
from gen.transforms.step_cache import StepCache, step_cache_stats, step_caches
from helpers import rel_err

ASSETS = Path(__file__).resolve().parents[1] / "assets"
STEPS = 4
CASES = {  # model folder, request keywords (every case runs two CFG branches per step)
    "flux": ("flux-tiny", dict(height=64, width=64, negative_prompt="a blue square", true_cfg_scale=2.0)),
    "wan": ("wan-t2v-tiny", dict(height=32, width=32, num_frames=5, guidance_scale=3.0)),
    "qwen": ("qwen-image-tiny", dict(height=64, width=64, negative_prompt="a blue square", true_cfg_scale=2.0)),
}


@contextlib.contextmanager
def cached(gen: Generator, threshold: float):
    """Step caches on the generator's transformers for the duration (StepCache itself takes any threshold)."""
    caches = [StepCache(m, dit.blocks, dit.cache_layout, threshold) for _, m, dit in gen.pipeline.dits()]
    try:
        yield caches
    finally:
        for c in caches:
            c.remove()


def run(gen: Generator, kw: dict, prompt: str = "a red circle") -> tuple[np.ndarray, list[torch.Tensor]]:
    """(first image or frame as an array, every transformer output of the generation)."""
    outputs = []
    hooks = [m.register_forward_hook(lambda mod, args, out: outputs.append(out.clone()))
             for _, m, _ in gen.pipeline.dits()]
    try:
        result = gen.generate(prompt, seed=7, num_inference_steps=STEPS, **kw)
    finally:
        for h in hooks:
            h.remove()
    return np.asarray(result.images[0] if result.images else result.frames[0]), outputs


class _Generators(dict):
    """name -> uncached generator of that tiny model, loaded on first use."""

    def __missing__(self, name: str) -> Generator:
        self[name] = Generator.from_pretrained(ASSETS / CASES[name][0], device="cpu")
        return self[name]


@pytest.fixture(scope="module")
def gens() -> _Generators:
    return _Generators()


@pytest.fixture(scope="module", params=sorted(CASES))
def case(request, gens):
    """(generator, request keywords, exact run (image, transformer outputs), its first transformer call's keywords)."""
    gen, kw = gens[request.param], CASES[request.param][1]
    calls = []
    hook = gen.pipeline.transformer.register_forward_pre_hook(lambda m, a, k: calls.append(dict(k)), with_kwargs=True)
    try:
        exact = run(gen, kw)
    finally:
        hook.remove()
    return gen, kw, exact, calls[0]


def n_blocks(gen: Generator) -> int:
    m = gen.pipeline.transformer
    return sum(len(getattr(m, a, None) or []) for a in ("transformer_blocks", "single_transformer_blocks", "blocks"))


def test_threshold_zero_is_bit_identical(case):
    gen, kw, (image, outputs), _ = case
    with cached(gen, 0.0) as caches:
        image_c, outputs_c = run(gen, kw)
    assert len(outputs) == len(outputs_c) == 2 * STEPS
    assert all(torch.equal(a, b) for a, b in zip(outputs, outputs_c))
    assert np.array_equal(image, image_c)
    assert caches[0].stats == {"forwards": 2 * STEPS, "skipped_forwards": 0, "blocks": 2 * STEPS * n_blocks(gen),
                               "skipped_blocks": 0}


def test_large_threshold_skips_every_later_step(case):
    gen, kw, (image, outputs), _ = case
    with cached(gen, 1e9) as caches:
        image_c, outputs_c = run(gen, kw)
    skipped = 2 * (STEPS - 1)  # each branch computes its first step, then only first blocks
    assert caches[0].stats == {"forwards": 2 * STEPS, "skipped_forwards": skipped,
                               "blocks": 2 * STEPS * n_blocks(gen), "skipped_blocks": skipped * (n_blocks(gen) - 1)}
    assert all(torch.equal(a, b) for a, b in zip(outputs[:2], outputs_c[:2]))  # step 1: both branches computed
    assert all(torch.isfinite(o).all() for o in outputs_c)
    assert not torch.equal(outputs[-1], outputs_c[-1])
    assert not np.array_equal(image, image_c)
    m = gen.pipeline.transformer  # whole again after the cached calls
    assert "forward" not in m.__dict__ and all(isinstance(getattr(m, a), torch.nn.ModuleList)
                                                for a in ("transformer_blocks", "blocks") if hasattr(m, a))


@torch.no_grad()
def test_skipped_step_adds_its_own_branch_residual(case):
    """Two branches (different text tensors) at t1, then at the next float below t1: the skipped calls must
    reproduce each branch's exact output (their later blocks barely change), which they cannot with the other
    branch's residual or none."""
    gen, _, _, k = case
    m = gen.pipeline.transformer
    a = k["encoder_hidden_states"]
    b = torch.randn(a.shape, generator=torch.Generator().manual_seed(0)).to(a)
    t1 = k["timestep"].float()
    t2 = torch.nextafter(t1, torch.zeros_like(t1))
    call = lambda text, t: m(**{**k, "encoder_hidden_states": text, "timestep": t})
    exact = {(name, i): call(text, t) for name, text in (("a", a), ("b", b)) for i, t in ((1, t1), (2, t2))}
    assert rel_err(exact["a", 2], exact["b", 2]) > 1e-2  # the branches differ
    with cached(gen, 1e9) as caches:
        out = {(name, i): call(text, t) for i, t in ((1, t1), (2, t2)) for name, text in (("a", a), ("b", b))}
        assert caches[0].stats["skipped_forwards"] == 2
        again = call(a, t1)  # the same text tensor, timestep back up: a new generation, computed whole
        assert caches[0].stats["skipped_forwards"] == 2
        shared = [call(a, t) for t in (t1, t1, t2, t2)]  # one text tensor for both branches: they are never skipped
        assert caches[0].stats["skipped_forwards"] == 2
    for name in "ab":
        assert torch.equal(out[name, 1], exact[name, 1])
        assert rel_err(out[name, 2], exact[name, 2]) < 1e-4
    assert torch.equal(again, exact["a", 1])
    assert all(torch.equal(o, exact["a", i]) for o, i in zip(shared, (1, 1, 2, 2)))


def test_cache_resets_between_generations(gens):
    """Through the public flag: a second generation equals a fresh generator's first."""
    path, kw = ASSETS / CASES["flux"][0], CASES["flux"][1]
    gen = Generator.from_pretrained(path, device="cpu", step_cache=0.5)
    run(gen, kw, prompt="a green star")
    stats_first = step_cache_stats(gen.pipeline)
    second, outputs = run(gen, kw)
    with cached(gens["flux"], 0.5) as fresh_caches:  # another generator, its cache new
        fresh_image, fresh_outputs = run(gens["flux"], kw)
    assert stats_first["skipped_forwards"] > 0  # the cache does skip here
    assert np.array_equal(second, fresh_image)
    assert all(torch.equal(a, b) for a, b in zip(outputs, fresh_outputs))
    stats = step_cache_stats(gen.pipeline)
    assert stats["forwards"] == 2 * stats_first["forwards"]
    assert stats["skipped_forwards"] - stats_first["skipped_forwards"] == fresh_caches[0].stats["skipped_forwards"]
    assert 0 < stats["skipped_block_fraction"] < 1


def test_both_wan22_experts_cache():
    gen = Generator.from_pretrained(ASSETS / "wan22-a14b-tiny", device="cpu", step_cache=0.9)
    gen.generate("a red circle", seed=1, num_inference_steps=6, height=32, width=32, num_frames=5,
                 guidance_scale=3.0)
    caches = step_caches(gen.pipeline)
    assert len(caches) == 2 and all(c.stats["skipped_forwards"] > 0 for c in caches)


def test_works_around_regionally_compiled_blocks(gens):
    """The gates call the blocks as the model would, so compiled blocks stay compiled (dynamo, eager backend)."""
    from gen.transforms.compile import compile_blocks

    kw = CASES["flux"][1]
    with cached(gens["flux"], 0.5) as plain:
        image, outputs = run(gens["flux"], kw)
    gen = Generator.from_pretrained(ASSETS / CASES["flux"][0], device="cpu")
    try:
        blocks = gen.pipeline.dit.blocks
        assert compile_blocks(gen.pipeline.transformer, blocks, backend="eager") == n_blocks(gen)
        with cached(gen, 0.5) as caches:
            image_c, outputs_c = run(gen, kw)
    finally:
        torch._dynamo.reset()
    assert caches[0].stats == plain[0].stats and caches[0].stats["skipped_forwards"] > 0
    assert all(torch.allclose(a, b, rtol=1e-5, atol=1e-6) for a, b in zip(outputs, outputs_c))


def test_model_is_unchanged_but_for_forward(gens):
    m = gens["qwen"].pipeline.transformer
    names, keys = [n for n, _ in m.named_modules()], list(m.state_dict())
    with cached(gens["qwen"], 0.1):
        assert [n for n, _ in m.named_modules()] == names and list(m.state_dict()) == keys
        assert "forward" in m.__dict__
    from gen.families import dit_of

    with pytest.raises(GenError, match="Linear is not a DiT any family declares"):
        dit_of(torch.nn.Linear(2, 2))  # no declaration: no blocks or layout to cache


@pytest.mark.parametrize("bad", [0, 1, 1.5, -0.1, "0.1", True])
def test_bad_threshold_is_a_gen_error(bad):
    with pytest.raises(GenError, match="step_cache must be a threshold between 0 and 1") as info:
        Generator.from_pretrained(ASSETS / "flux-tiny", device="cpu", step_cache=bad)
    assert info.value.param == "step_cache" and repr(bad) in str(info.value)


def test_step_cache_refuses_parallel_ranks():
    with pytest.raises(GenError, match="one process only"):
        Generator.from_pretrained(ASSETS / "flux-tiny", device="cpu", step_cache=0.1, num_gpus=2)


def test_cli_flag(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    small = ["--model-path", str(ASSETS / "flux-tiny"), "--prompt", "x", "--height", "32", "--width", "32",
             "--num-inference-steps", "2", "--device", "cpu"]
    assert main(["generate", *small, "--step-cache", "0"]) == 2
    assert "step_cache must be a threshold between 0 and 1" in capsys.readouterr().err
    assert main(["generate", *small, "--step-cache", "0.2", "--output", "a.png"]) == 0
    assert (tmp_path / "a.png").is_file()
