"""The LoRA GEMM kernel (gen/kernels/lora_gemm.py) run by Triton's interpreter on the CPU (TRITON_INTERPRET=1, in a
subprocess: the interpreter is chosen when Triton's kernels are defined): the kernel against the torch reference
(joined groups with each member reading its own down columns, bias or none, ragged M / K / R edges), and the
"kernel" layout of gen/transforms/lora.py on the tiny FLUX against the separate up products, with the weights
restored after. fp16: the interpreter computes through numpy, which has no bfloat16 (bf16 is checked on the GPU
by benchmarks/lora_gemm.py's error column)."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytest.importorskip("triton")
ROOT = Path(__file__).resolve().parents[1]


def run_interpreted(code: str) -> str:
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'tests'}"}
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_kernel_equals_the_reference_on_joined_groups_and_ragged_edges():
    out = run_interpreted("""
        import torch
        from gen.kernels.lora_gemm import lora_linear, lora_linear_reference, supported
        torch.manual_seed(0)
        dt = torch.float16
        worst = 0.0
        # (tokens, in, member outs, R, bias): one layer, joined groups of 3 and 4, ragged M / K / R
        for m, k, outs, r, bias in [(40, 96, (64,), 16, True), (37, 48, (16, 32, 16), 8, False),
                                    (21, 40, (32, 32, 16, 48), 40, True), (5, 64, (16,), 64, False)]:
            n = sum(outs)
            x, w = torch.randn(m, k, dtype=dt), (torch.randn(n, k) / k ** 0.5).to(dt)
            h, up = torch.randn(m, len(outs) * r, dtype=dt), (torch.randn(n, r) / r ** 0.5).to(dt)
            b = torch.randn(n, dtype=dt) if bias else None
            bounds = tuple(sum(outs[:i + 1]) for i in range(len(outs) - 1))
            got = lora_linear(x, w, h, up, b, bounds).float()
            ref = lora_linear_reference(x, w, h, up, b, bounds).float()
            worst = max(worst, ((got - ref).norm() / ref.norm()).item())
            # each member really reads its own columns of h: another member's columns give another answer
            if len(outs) > 1:
                shifted = lora_linear(x, w, h.roll(r, dims=-1), up, b, bounds).float()
                assert ((shifted - ref).norm() / ref.norm()).item() > 1e-2
        x3 = torch.randn(2, 3, 32, dtype=dt)  # leading dims kept
        w3 = torch.randn(16, 32, dtype=dt)
        assert lora_linear(x3, w3, torch.randn(2, 3, 8, dtype=dt), torch.randn(16, 8, dtype=dt)).shape == (2, 3, 16)
        assert supported(w3) and not supported(w3.float()) and not supported(torch.randn(16, 40, dtype=dt))
        assert not supported(w3, (8,))  # a member bound inside a tile
        print(f"worst {worst:.2e}")
    """)
    worst = float(out.split("worst")[1])
    assert worst < 1e-3  # fp16 output rounding (the accumulation is fp32 in both)


def test_kernel_layout_on_flux_equals_the_separate_up_products_and_comes_off_cleanly():
    run_interpreted("""
        import torch
        from test_lora import BFL, DIFFUSERS, KOHYA, adapters, flux_inputs, flux_model
        from gen.transforms.lora import KernelLoraLayer, LoraLayer
        from helpers import rel_err
        loras = [(KOHYA, 0.7), (DIFFUSERS, -0.4), (BFL, 1.2)]
        model, separate = flux_model(join=True).half(), flux_model(join=True).half()
        original = {k: v.clone() for k, v in model.state_dict().items()}
        x = {k: v.half() if v.is_floating_point() and k not in ("timestep", "guidance") else v
             for k, v in flux_inputs(5).items()}
        a = adapters(model, layout="kernel")
        a.dtypes = {slot: torch.float16 for slot in a.dtypes}  # the banks in the activations' dtype
        a.set(loras)
        s = adapters(separate, layout="separate")
        s.dtypes = dict(a.dtypes)
        s.set(loras)
        block, single = model.transformer_blocks[0], model.single_transformer_blocks[0]
        assert isinstance(block.attn.to_out[0], KernelLoraLayer) and isinstance(block.ff.net[0].proj, KernelLoraLayer)
        first = single.attn.to_q  # q, k, v, mlp joined: one up tensor, the members' banks its row blocks
        assert first.joined_lora_up.shape == (224, first.joined_lora_ranks[0]) and first.joined_lora_bounds == (32, 64, 96)
        assert single.proj_mlp.lora_up.data_ptr() == first.joined_lora_up[96:].data_ptr()
        assert type(single.attn.to_k).__mro__[1] is LoraLayer  # members alone would add their own up product
        with torch.no_grad():
            err = rel_err(model(**x).float(), separate(**x).float())
            assert err < 5e-3, err
            a.set([])
            after = model.state_dict()
            assert all(torch.equal(after[k], original[k]) for k in original)
            assert not any(n.startswith(("lora_", "joined_lora_")) for m in model.modules() for n in m._buffers)
            assert not hasattr(first, "joined_lora_bounds")
        print("ok", err)
    """)
