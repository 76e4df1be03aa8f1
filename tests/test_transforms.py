"""The transforms composed from outside the models (gen/transforms): apply in one order, undo in reverse, the
combinations that work tested together, the ones that cannot refused by name."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from gen import GenError, Generator
from gen.families import dit_of
from gen.transforms import TransformOptions, apply_transforms, check_options
from gen.transforms.compile import compile_blocks
from gen.transforms.forward import unwrap_forward, wrap_forward, wrapper_names
from gen.transforms.fp8 import Fp8Linear, dequantize_transformer, quantize_transformer
from helpers import rel_err

ASSETS = Path(__file__).resolve().parents[1] / "assets"
CPU = torch.device("cpu")


def image(gen: Generator) -> np.ndarray:
    r = gen.generate("a red circle", seed=5, height=32, width=32, num_inference_steps=3, negative_prompt="blue",
                     true_cfg_scale=2.0)
    return np.asarray(r.images[0])


def test_apply_then_undo_gives_back_the_plain_model():
    gen = Generator.from_pretrained(ASSETS / "flux-tiny", device="cpu")
    pipeline, model = gen.pipeline, gen.pipeline.transformer
    pipeline.transforms.undo()  # whatever from_pretrained applied: the plain model
    plain, state = image(gen), {k: v.clone() for k, v in model.state_dict().items()}
    applied = apply_transforms(pipeline, TransformOptions(join=True, step_cache=0.05, cfg_batch=False))
    assert [s.name for s in applied] == ["cfg_batch", "attention", "joined_projections", "gelu_epilogues",
                                        "norm_rope", "lora", "step_cache", "vae"]
    # the q/k norms of every double (4) and single (2) block's attention
    assert applied.get("norm_rope").detail == 4 * len(model.transformer_blocks) + 2 * len(
        model.single_transformer_blocks) and model.transformer_blocks[0].attn.norm_added_k.fused_rope
    assert wrapper_names(model) == ["step_cache"] and hasattr(model.transformer_blocks[0].attn.to_q, "joined_sizes")
    # a double block's image and text feed-forwards, and each single block
    n = 2 * len(model.transformer_blocks) + len(model.single_transformer_blocks)
    assert applied.get("gelu_epilogues").detail == n and model.transformer_blocks[0].ff.net[0].gelu_epilogue
    image(gen)  # runs with them
    applied.undo()
    assert wrapper_names(model) == [] and "forward" not in model.__dict__
    assert not any(hasattr(m, "joined_sizes") or "gelu_epilogue" in m.__dict__ for m in model.modules())
    after = model.state_dict()
    assert list(after) == list(state) and all(torch.equal(after[k], state[k]) for k in state)
    assert np.array_equal(image(gen), plain)


def test_forward_wrappers_come_off_in_reverse_order():
    m = torch.nn.Linear(2, 2)
    wrap_forward(m, "a", lambda inner: lambda x: inner(x) + 1)
    wrap_forward(m, "b", lambda inner: lambda x: inner(x) * 2)
    x = torch.ones(1, 2)
    assert torch.equal(m(x), (torch.nn.functional.linear(x, m.weight, m.bias) + 1) * 2)
    with pytest.raises(RuntimeError, match="remove the outer ones first"):
        unwrap_forward(m, "a")
    with pytest.raises(RuntimeError, match="already has a 'b' forward wrapper"):
        wrap_forward(m, "b", lambda inner: inner)
    unwrap_forward(m, "b")
    unwrap_forward(m, "a")
    assert "forward" not in m.__dict__ and wrapper_names(m) == []


@torch.no_grad()
def test_fp8_and_compile_together():
    """FP8 linears inside regionally compiled blocks (eager backend on the CPU) equal the FP8 model uncompiled;
    undoing FP8 gives nn.Linear layers back."""
    gen = Generator.from_pretrained(ASSETS / "flux-tiny", device="cpu")
    model, blocks = gen.pipeline.transformer, dit_of(gen.pipeline.transformer).blocks
    gen.pipeline.transforms.undo()
    counts = quantize_transformer(model, blocks)
    assert counts["fp8_linears"] > 0
    g = torch.Generator().manual_seed(0)
    c = model.config
    kw = dict(hidden_states=torch.randn(1, 16, c.in_channels, generator=g),
              encoder_hidden_states=torch.randn(1, 8, c.joint_attention_dim, generator=g),
              pooled_projections=torch.randn(1, c.pooled_projection_dim, generator=g), timestep=torch.tensor([0.5]),
              img_ids=torch.rand(16, 3, generator=g), txt_ids=torch.zeros(8, 3), guidance=torch.tensor([3.5]))
    eager = model(**kw)
    try:
        compile_blocks(model, blocks, backend="eager")
        assert rel_err(model(**kw), eager) < 1e-6
    finally:
        torch._dynamo.reset()
    assert dequantize_transformer(model, blocks) == counts["fp8_linears"]
    assert not any(isinstance(m, Fp8Linear) for m in model.modules())


@pytest.mark.parametrize("options, parallel, message", [
    (TransformOptions(step_cache=0.1), True, "step_cache=0.1 works in one process only"),
    (TransformOptions(cuda_graphs=True), False, "cuda_graphs needs a CUDA device"),
    (TransformOptions(fp8=True), False, "fp8 needs a CUDA GPU"),
    (TransformOptions(max_batch=2, step_cache=0.1), False, "step_cache cannot be combined"),
    (TransformOptions(cfg_batch=True), True, "cfg_batch works in one process"),
    (TransformOptions(step_cache=2.0), False, "step_cache must be a threshold between 0 and 1"),
    (TransformOptions(kernel_tuning=True), False, "kernel_tuning tunes the compiled blocks' kernels: add compile"),
])
def test_combinations_that_cannot_work_are_refused(options, parallel, message):
    with pytest.raises(GenError, match=message):
        check_options(options, CPU, torch.float32, parallel)


def test_kernel_tuning_is_passed_to_inductor_only_when_asked_and_nothing_else_chose():
    """compile_blocks(tune_kernels=True) compiles with inductor's coordinate-descent tuning unless a backend, mode or
    options were given (they win); without it, the blocks compile as before."""
    seen = []

    class Block(torch.nn.Module):
        def compile(self, **kw):
            seen.append(kw)

    model = torch.nn.Module()
    model.blocks = torch.nn.ModuleList([Block(), Block()])
    assert compile_blocks(model, ("blocks",), tune_kernels=True) == 2
    assert compile_blocks(model, ("blocks",)) == 2
    compile_blocks(model, ("blocks",), tune_kernels=True, backend="eager")
    compile_blocks(model, ("blocks",), tune_kernels=True, mode="max-autotune")
    assert seen == [{"options": {"coordinate_descent_tuning": True}}] * 2 + [{}] * 2 + [{"backend": "eager"}] * 2 \
        + [{"mode": "max-autotune"}] * 2
