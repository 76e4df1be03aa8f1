"""The LoRA GEMM kernel per layer: gen/kernels/lora_gemm.py against cuBLAS, at FLUX.1-dev's linear shapes (1024^2:
4096 image + 512 text tokens, bf16), eager, each op timed alone (median of CUDA-event times over repeated calls).

Rows per layer (a joined group counts as one layer): the base linear alone (cuBLAS), the same base through the
kernel with no LoRA (how close Triton's GEMM is to cuBLAS), and with a rank-R LoRA: the kernel (down product by
cuBLAS, then one Triton GEMM; pointer loads, and the TMA-descriptor variant), the wide layout (cuBLAS over [x | x A^T] against [W | block-diagonal ups]) and
separate up products (base GEMM, then each member's up added). Also the kernel's relative error against an fp32
reference. The step-level judge is benchmarks/lora_step.py (compiled, whole FLUX step).

  python benchmarks/lora_gemm.py --ranks 16,64        # on the GPU machine (writes $OUT/lora_gemm.json when OUT set)
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import environment, time_ms, write_json  # noqa: E402
from gen.kernels import lora_gemm  # noqa: E402
from gen.kernels.lora_gemm import lora_linear, lora_linear_reference  # noqa: E402
from gen.models.layers import wide_lora_linear  # noqa: E402

# name, tokens, in, member outs (FLUX.1-dev: dim 3072, MLP 12288, 512 text tokens)
LAYERS = [
    ("double img q/k/v", 4096, 3072, (3072, 3072, 3072)),
    ("double txt q/k/v", 512, 3072, (3072, 3072, 3072)),
    ("double img to_out", 4096, 3072, (3072,)),
    ("double img fc1", 4096, 3072, (12288,)),
    ("double img fc2", 4096, 12288, (3072,)),
    ("single q/k/v/mlp", 4608, 3072, (3072, 3072, 3072, 12288)),
    ("single proj_out", 4608, 15360, (3072,)),
]


def bench_layer(tokens, d_in, outs, rank, device, dtype, iters):
    g = torch.Generator(device=device).manual_seed(0)
    n, members = sum(outs), len(outs)
    rnd = lambda *s, scale=1.0: (torch.randn(*s, device=device, generator=g) * scale).to(dtype)  # noqa: E731
    x = rnd(tokens, d_in)
    w = rnd(n, d_in, scale=d_in ** -0.5)
    bias = rnd(n, scale=0.1)
    down = rnd(members * rank, d_in, scale=d_in ** -0.5)
    up = rnd(n, rank, scale=rank ** -0.5)
    bounds = tuple(sum(outs[:i + 1]) for i in range(members - 1))
    wide = torch.zeros(n, d_in + members * rank, device=device, dtype=dtype)
    wide[:, :d_in] = w
    row = 0
    for i, o in enumerate(outs):
        wide[row:row + o, d_in + i * rank:d_in + (i + 1) * rank] = up[row:row + o]
        row += o
    empty_h = x.new_zeros(tokens, 0)
    empty_up = w.new_zeros(n, 0)

    def separate():
        y = F.linear(x, w, bias)
        h = F.linear(x, down)
        row = 0
        for i, o in enumerate(outs):
            y[:, row:row + o].addmm_(h[:, i * rank:(i + 1) * rank], up[row:row + o].t())
            row += o
        return y

    def variant(tma, fn):
        def run():
            lora_gemm.TMA = tma
            return fn()
        return run

    base = lambda: lora_linear(x, w, empty_h, empty_up, bias)  # noqa: E731
    kernel = lambda: lora_linear(x, w, F.linear(x, down), up, bias, bounds)  # noqa: E731
    fns = {
        "cuBLAS base": lambda: F.linear(x, w, bias),
        "kernel base (R=0)": variant(False, base),
        "TMA kernel base (R=0)": variant(True, base),
        "kernel": variant(False, kernel),
        "TMA kernel": variant(True, kernel),
        "wide": lambda: wide_lora_linear(x, down, wide, bias),
        "separate": separate,
    }
    ms = {k: time_ms(f, 3, iters) for k, f in fns.items()}
    h = F.linear(x, down)
    ref = lora_linear_reference(x, w, h, up, bias, bounds).float()
    for tma, name in ((False, "kernel"), (True, "TMA kernel")):
        lora_gemm.TMA = tma
        got = lora_linear(x, w, h, up, bias, bounds).float()
        ms[f"{name} rel err"] = ((got - ref).norm() / ref.norm()).item()
    ms["wide rel err"] = ((wide_lora_linear(x, down, wide, bias).float() - ref).norm() / ref.norm()).item()
    ms["tflops base"] = 2 * tokens * d_in * n / ms["cuBLAS base"] / 1e9
    return ms


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--ranks", default="16,64")
    p.add_argument("--iters", type=int, default=30)
    p.add_argument("--out")
    args = p.parse_args(argv)
    device = torch.accelerator.current_accelerator()
    dtype = torch.bfloat16
    result = {"env": environment(), "layers": {}}
    with torch.no_grad():
        for rank in (int(r) for r in args.ranks.split(",")):
            for name, tokens, d_in, outs in LAYERS:
                result["layers"][f"{name} r{rank}"] = bench_layer(tokens, d_in, outs, rank, device, dtype, args.iters)
    totals = {}
    cols = ("kernel base (R=0)", "TMA kernel base (R=0)", "kernel", "TMA kernel", "wide", "separate")
    print("| layer, rank | cuBLAS base ms | " + " | ".join(cols) + " | kernel / TMA err | base TFLOP/s |")
    print("|---" * (len(cols) + 4) + "|")
    for key, r in result["layers"].items():
        base = r["cuBLAS base"]
        print(f"| {key} | {base:.3f} | " + " | ".join(f"{r[c] / base:.3f}" for c in cols)
              + f" | {r['kernel rel err']:.1e} / {r['TMA kernel rel err']:.1e} | {r['tflops base']:.0f} |")
        rank = key.rsplit(" r", 1)[1]
        for k in ("cuBLAS base", *cols):
            totals.setdefault(rank, {}).setdefault(k, 0.0)
            totals[rank][k] += r[k]
    for rank, t in totals.items():
        print(f"rank {rank}, the seven layers summed (ms): " + ", ".join(f"{k} {v:.3f}" for k, v in t.items()))
    result["totals"] = totals
    out = args.out or (os.path.join(os.environ["OUT"], "lora_gemm.json") if os.environ.get("OUT") else None)
    if out:
        write_json(out, result)
    return result


if __name__ == "__main__":
    main()
