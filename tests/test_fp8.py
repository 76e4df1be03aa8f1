"""FP8 linears (gen/transforms/fp8.py): the quantization math, Fp8Linear against its emulation and fp32 (torch._scaled_mm has a
CPU kernel), the swap inside the DiT blocks (names and state_dict kept), and the device guard."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from gen import GenError, Generator
from gen.cli import main
from gen.families import dit_of
from gen.loading import load_dit
from gen.transforms.fp8 import (FP8, FP8_MAX, Fp8Linear, check_fp8, dequantize, fp8_linear_reference, quantize_rows,
                                quantize_transformer)
from helpers import rel_err

ASSETS = Path(__file__).resolve().parents[1] / "assets"


def load(folder: Path) -> nn.Module:
    """A tiny asset's transformer, fp32 on the CPU."""
    return load_dit(folder / "transformer", torch.device("cpu"), torch.float32)


def randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def test_quantize_rows_scales_each_row_to_the_fp8_range():
    x = randn(8, 64) * torch.logspace(-3, 3, 8)[:, None]  # rows six orders of magnitude apart
    x[3] = 0  # an all-zero row stays zero, no NaN
    q, scale = quantize_rows(x)
    assert q.dtype == FP8 and scale.shape == (8, 1) and scale.dtype == torch.float32
    amax = q.float().abs().amax(dim=1)
    assert torch.equal(amax[amax > 0], torch.full_like(amax[amax > 0], FP8_MAX)) and amax[3] == 0
    back = dequantize(q, scale)
    assert torch.isfinite(back).all() and torch.equal(back[3], x[3])
    for i in (0, 7):  # e4m3 keeps 3 mantissa bits: a few percent per row
        assert rel_err(back[i], x[i]) < 0.04


@pytest.mark.parametrize("bias", [True, False])
def test_fp8_linear_matches_its_emulation_and_fp32(bias):
    lin = nn.Linear(64, 48, bias=bias)
    with torch.no_grad():
        lin.weight.copy_(randn(48, 64, seed=1) * 0.1)
        if bias:
            lin.bias.copy_(randn(48, seed=2))
    x = randn(2, 5, 64, seed=3)
    fp8 = Fp8Linear.from_linear(lin)
    assert fp8.weight.dtype == FP8 and fp8.weight_scale.shape == (48,)
    out = fp8(x)  # torch._scaled_mm with row-wise scales
    assert out.shape == (2, 5, 48) and out.dtype == x.dtype
    emulated = fp8_linear_reference(x, fp8.weight, fp8.weight_scale, fp8.bias)
    assert rel_err(out, emulated) < 1e-5
    assert 1e-3 < rel_err(out, lin(x)) < 0.05  # lossy, but only by FP8 rounding
    assert rel_err(fp8.dequantized_weight(), lin.weight) < 0.04


def test_fp8_linear_state_dict_keeps_the_original_layout():
    lin = nn.Linear(32, 16)
    fp8 = Fp8Linear.from_linear(lin)
    sd = fp8.state_dict()
    assert set(sd) == {"weight", "bias"} and sd["weight"].dtype == lin.weight.dtype
    fresh = nn.Linear(32, 16)
    fresh.load_state_dict(sd)  # a plain linear takes it, strict
    assert rel_err(fresh.weight, lin.weight) < 0.04
    other = Fp8Linear(32, 16, dtype=torch.float32)
    other.load_state_dict(lin.state_dict())  # a full-precision checkpoint is quantized on load
    assert torch.equal(other.weight.float(), fp8.weight.float()) and torch.equal(other.bias, lin.bias)
    with pytest.raises(RuntimeError, match="size mismatch for weight"):
        other.load_state_dict(nn.Linear(16, 16).state_dict())
    with pytest.raises(ValueError, match="in_features divisible by 16"):
        Fp8Linear(24, 16)


@pytest.mark.parametrize("folder", ["flux-tiny", "qwen-image-tiny", "wan-t2v-tiny"])
def test_quantize_transformer_swaps_block_linears_only(folder):
    model = load(ASSETS / folder)
    names, sd = [n for n, _ in model.named_modules()], model.state_dict()
    linears = {n for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    in_blocks = {n for n in linears if n.split(".")[0] in ("transformer_blocks", "single_transformer_blocks", "blocks")}
    fits = {n for n in in_blocks if model.get_submodule(n).in_features % 16 == model.get_submodule(n).out_features % 16
            == 0}  # tiny Wan (width 24) has none: it stays exact
    counts = quantize_transformer(model, dit_of(model).blocks)
    swapped = {n for n, m in model.named_modules() if isinstance(m, Fp8Linear)}
    assert swapped == fits and counts == {"fp8_linears": len(fits), "kept_exact": len(in_blocks - fits)}
    assert (len(fits) > 0) == (folder != "wan-t2v-tiny")
    assert [n for n, _ in model.named_modules()] == names and list(model.state_dict()) == list(sd)
    outside = linears - in_blocks  # embedders, modulation outside the blocks, the final projection
    assert "proj_out" in outside and all(type(model.get_submodule(n)) is nn.Linear for n in outside)
    model.load_state_dict(sd)  # the original checkpoint still loads (strict), quantized on the way in
    again = model.state_dict()
    assert all(rel_err(again[k], sd[k]) < 0.04 for k in sd)


@torch.no_grad()
def test_quantized_flux_output_stays_close():
    exact, model = load(ASSETS / "flux-tiny"), load(ASSETS / "flux-tiny")
    quantize_transformer(model, dit_of(model).blocks)
    g = torch.Generator().manual_seed(0)
    c = exact.config
    ids = torch.stack(torch.meshgrid(torch.zeros(1), torch.arange(4.0), torch.arange(4.0), indexing="ij"), -1)
    kw = dict(hidden_states=torch.randn(1, 16, c.in_channels, generator=g),
              encoder_hidden_states=torch.randn(1, 8, c.joint_attention_dim, generator=g),
              pooled_projections=torch.randn(1, c.pooled_projection_dim, generator=g),
              timestep=torch.tensor([0.6]), img_ids=ids.reshape(-1, 3), txt_ids=torch.zeros(8, 3),
              guidance=torch.tensor([3.5]))
    err = rel_err(model(**kw), exact(**kw))
    assert 1e-4 < err < 0.05


def test_guard():
    with pytest.raises(GenError, match="device 'cpu' has none") as info:
        check_fp8(torch.device("cpu"), torch.bfloat16)
    assert info.value.param == "fp8"
    with pytest.raises(GenError, match="compute capability 8.9\\+ .*is 8.0"):
        check_fp8(torch.device("cuda"), torch.bfloat16, capability=(8, 0))
    with pytest.raises(GenError, match="got dtype torch.float32"):
        check_fp8(torch.device("cuda"), torch.float32, capability=(9, 0))
    check_fp8(torch.device("cuda"), torch.bfloat16, capability=(9, 0))  # Hopper, bf16: fine
    check_fp8(torch.device("cuda"), torch.bfloat16, capability=(8, 9))  # Ada


def test_fp8_on_cpu_is_refused_by_the_api_and_the_cli(capsys):
    with pytest.raises(GenError, match="fp8 needs a CUDA GPU"):
        Generator.from_pretrained(ASSETS / "flux-tiny", device="cpu", fp8=True)
    code = main(["generate", "--model-path", str(ASSETS / "flux-tiny"), "--prompt", "x", "--device", "cpu", "--fp8"])
    assert code == 2 and "fp8 needs a CUDA GPU" in capsys.readouterr().err
