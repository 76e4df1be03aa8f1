"""gen/transforms/modulation.py: every step's adaLN modulations prepared at once give the per-step values (fp32,
CPU), are really served (counted), follow CFG branches, survive torch.compile without recompiling, and come off."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from gen import GenError
from gen.loading import load_pipeline
from gen.transforms import TransformOptions, check_options
from gen.types import GenerationRequest
from stages.denoise import current_step

ASSETS = Path(__file__).resolve().parents[1] / "assets"
CPU = torch.device("cpu")


def _pipeline(name: str, **options):
    return load_pipeline(ASSETS / name, CPU, torch.float32, options=TransformOptions(**options))


def _run(pipe, **kw) -> np.ndarray:
    req = GenerationRequest(prompt="a red cube on a table", height=64, width=64, num_inference_steps=4, seed=3, **kw)
    return np.asarray(pipe(req).images[0], dtype=np.float64)


def _latents_of(pipe, **kw) -> torch.Tensor:
    """The denoised latents (the decode's input), to compare closer than 8-bit pixels."""
    seen = []
    vae = pipe.components["vae"]
    decode = vae.decode

    def spy(z, *a, **k):
        seen.append(z.detach().clone())
        return decode(z, *a, **k)

    vae.decode = spy
    try:
        _run(pipe, **kw)
    finally:
        del vae.decode
    return seen[0]


@pytest.mark.parametrize("name,kw,calls_per_step", [
    ("flux-tiny", {}, 1),
    ("flux-tiny", {"negative_prompt": "blurry", "true_cfg_scale": 3.0}, 2),  # true CFG: two forwards a step
    ("qwen-image-tiny", {"negative_prompt": "blurry", "true_cfg_scale": 4.0}, 2),
])
def test_prepared_modulations_equal_per_step_ones(name, kw, calls_per_step):
    plain = _latents_of(_pipeline(name, modulation_schedule=False), **kw)
    pipe = _pipeline(name, modulation_schedule=True)
    step = pipe.transforms.get("modulation_schedule")
    assert step is not None and step.detail > 0
    ours = _latents_of(pipe, **kw)
    rel = ((ours - plain).norm() / plain.norm()).item()
    assert rel < 1e-5, rel
    schedule = _schedules(pipe)[0]
    assert schedule._prepared_calls == 4 * calls_per_step  # every forward of the loop was served from the table
    assert len(schedule._tables) == calls_per_step and all(t.rows is None for t in schedule._tables)  # freed
    again = _latents_of(pipe, **kw)  # a second generation rebuilds its tables and gives the same result
    assert torch.equal(again, ours) and schedule._prepared_calls == 8 * calls_per_step


def _schedules(pipe):
    from gen.transforms.modulation import ModulationSchedule

    return [m.time_embedding.__self__ for _, m, _ in pipe.dits()
            if isinstance(getattr(m.time_embedding, "__self__", None), ModulationSchedule)]


def test_calls_outside_the_loop_or_unlike_the_prepared_ones_run_the_modules():
    pipe = _pipeline("flux-tiny", modulation_schedule=True)
    model = pipe.transformer
    schedule = _schedules(pipe)[0]
    g = torch.Generator().manual_seed(0)
    cfg = model.config
    x = dict(hidden_states=torch.randn(1, 16, cfg.in_channels, generator=g),
             encoder_hidden_states=torch.randn(1, 5, cfg.joint_attention_dim, generator=g),
             pooled_projections=torch.randn(1, cfg.pooled_projection_dim, generator=g),
             timestep=torch.tensor([0.7]), img_ids=torch.zeros(16, 3), txt_ids=torch.zeros(5, 3),
             guidance=torch.tensor([3.5]) if cfg.guidance_embeds else None)
    with torch.no_grad():
        expected = model(**x)
        assert current_step() is None and schedule._prepared_calls == 0
        # inside a loop: prepared from this call's arguments, then a call with other pooled text is not served
        import stages.denoise as d

        timesteps = torch.tensor([700.0, 300.0])
        d._STEP.value = (0, timesteps)
        try:
            served = model(**x)
            assert schedule._prepared_calls == 1
            other = dict(x, pooled_projections=x["pooled_projections"] * 2)
            d._STEP.value = (1, timesteps)
            model(**other)
            assert schedule._prepared_calls == 1  # other tensors than those prepared: computed as they are
        finally:
            d._STEP.value = None
    assert ((served - expected).norm() / expected.norm()).item() < 1e-6


def test_compiled_blocks_do_not_recompile_across_steps_and_generations():
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    pipe = _pipeline("flux-tiny", modulation_schedule=True)
    from gen.transforms.compile import compile_blocks
    from pipelines.flux import FLUX_DIT

    compile_blocks(pipe.transformer, FLUX_DIT.blocks, backend="eager")
    graphs = lambda: counters["stats"]["unique_graphs"]
    first = _run(pipe)
    after_first = graphs()
    second = _run(pipe)
    assert graphs() == after_first, f"{graphs() - after_first} new graphs in the second generation"
    assert np.array_equal(first, second)
    assert _schedules(pipe)[0]._prepared_calls == 8


def test_undo_restores_the_model():
    pipe = _pipeline("qwen-image-tiny", modulation_schedule=True)
    model = pipe.transformer
    assert "time_embedding" in model.__dict__
    pipe.transforms.undo()
    assert "time_embedding" not in model.__dict__
    assert all("forward" not in b.img_mod.__dict__ and "_scheduled" not in b.img_mod.__dict__
               for b in model.transformer_blocks)


def test_default_is_off_on_the_cpu_and_clashes_are_refused():
    assert _pipeline("flux-tiny").transforms.get("modulation_schedule") is None
    for clash, opts in (("cuda_graphs", dict(cuda_graphs=True)), ("offload", dict(offload="model")),
                        ("max_batch", dict(max_batch=2))):
        with pytest.raises(GenError, match=f"modulation_schedule and {clash}") as e:
            check_options(TransformOptions(modulation_schedule=True, **opts), CPU, torch.float32)
        assert e.value.param == "modulation_schedule"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_on_the_gpu_compiled_with_inductor():
    """bf16, blocks compiled by inductor: the schedule is on by default there, serves every call, gives the per-step
    result up to bf16 rounding and compiles nothing new in a second generation."""
    from torch._dynamo.utils import counters

    cuda = torch.device("cuda")
    for name, kw, calls in (("flux-tiny", {}, 1), ("qwen-image-tiny", {"negative_prompt": "blurry"}, 1)):
        torch._dynamo.reset()
        outs = {}
        for on in (False, True):
            pipe = load_pipeline(ASSETS / name, cuda, torch.bfloat16,
                                 options=TransformOptions(compile=True, modulation_schedule=None if on else False))
            assert (pipe.transforms.get("modulation_schedule") is not None) == on
            outs[on] = _latents_of(pipe, **kw).float()
        graphs = counters["stats"]["unique_graphs"]
        again = _latents_of(pipe, **kw).float()
        assert counters["stats"]["unique_graphs"] == graphs and torch.equal(again, outs[True])
        assert _schedules(pipe)[0]._prepared_calls == 8 * calls  # Qwen's two branches run as one batched forward
        rel = ((outs[True] - outs[False]).norm() / outs[False].norm()).item()
        assert rel < 2e-2, (name, rel)


def test_loras_on_the_modulation_linears_are_in_the_prepared_rows():
    """The test LoRAs adapt the modulation linears (img_mod / norm1 ...): the rows are made through the adapters, so
    a switched set between generations gives that set's per-step result."""
    loras = ASSETS / "loras" / "flux-tiny"
    plain, pipe = _pipeline("flux-tiny", modulation_schedule=False), _pipeline("flux-tiny", modulation_schedule=True)
    for lora_set in ([(loras / "kohya.safetensors", 1.0)], [(loras / "diffusers.safetensors", -0.7)], []):
        plain.loras.set(lora_set)
        pipe.loras.set(lora_set)
        a, b = _latents_of(plain), _latents_of(pipe)
        assert ((b - a).norm() / a.norm()).item() < 1e-5, lora_set
    assert _schedules(pipe)[0]._prepared_calls == 12
