"""Is a CuTe DSL Hopper GEMM (quack-kernels, the GEMMs that ship beside FlashAttention-4) as fast as cuBLAS at
FLUX.1-dev's layer shapes, and what does a K longer by a rank-64 LoRA cost it? (issue 15)

The unfused LoRA target (<= 5% a step at rank 64) needs the low-rank update inside the base GEMM: y = [x | h] @
[W | U]^T with h = x A^T, the h/U tiles read as extra K steps of the same kernel (no copy of x, no zero blocks for a
joined q/k/v group). The Triton version of that kernel lost because Triton's own GEMM ran 1.3-1.8x cuBLAS at these
shapes (docs/LORA.md, Cost). This script measures the base such a kernel would be built on:
- `cublas`: torch.mm (cuBLAS) at K = in, and at K = in + 64 (the wide layout's longer K, a lower bound for it);
- `quack`: quack.gemm_interface.gemm with its default SM90 config (128 x 192 tiles, 2 x 1 cluster, ping-pong), at
  K = in and K = in + 64: the second is what the two-segment kernel would cost at best; `--tune` adds quack's
  autotuned configs (every SM90 config per shape: minutes per shape);
- `quack_add` / `cublas_addmm`: y = x W^T + C with C read in the epilogue (the up product added there).
All in bf16 on random inputs; outputs checked against cuBLAS (relative error printed).

  python benchmarks/quack_gemm.py [--out quack_gemm.json]      # GPU with quack-kernels (pip install ".[fa4]")
  python benchmarks/quack_gemm.py --tiny                       # CPU: the cuBLAS side of the script's own logic
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import gpu_ms, write_json  # noqa: E402

RANK = 64
# FLUX.1-dev 1024^2 layer kinds: name -> (tokens, in, out)
LAYERS = {
    "double img q/k/v": (4096, 3072, 9216),
    "double txt q/k/v": (512, 3072, 9216),
    "double img to_out": (4096, 3072, 3072),
    "double img fc1": (4096, 3072, 12288),
    "double img fc2": (4096, 12288, 3072),
    "single q/k/v/mlp": (4608, 3072, 21504),
    "single proj_out": (4608, 15360, 3072),
}
TINY = {"tiny": (64, 32, 96)}


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def quack_or_none():
    try:
        from quack import gemm_interface
    except ImportError as e:
        print(f"quack-kernels unavailable: {e}")
        return None
    return gemm_interface


def run(layers: dict, device, dtype, iters: int, tune: bool = False, out_path: str | None = None) -> list[dict]:
    q = quack_or_none() if device.type == "cuda" else None
    rows = []
    for name, (t, k_in, n_out) in layers.items():
        g = torch.Generator("cpu").manual_seed(0)
        x = (torch.randn(t, k_in + RANK, generator=g) / 8).to(device, dtype)
        w = (torch.randn(n_out, k_in + RANK, generator=g) / 8).to(device, dtype)
        c = torch.randn(t, n_out, generator=g).to(device, dtype)
        xk, wk = x[:, :k_in].contiguous(), w[:, :k_in].contiguous()
        ref = xk @ wk.t()
        row = {"layer": name, "tokens": t, "in": k_in, "out": n_out,
               "tflop": 2 * t * k_in * n_out / 1e12,
               "cublas_ms": gpu_ms(lambda: torch.mm(xk, wk.t()), iters),
               "cublas_k64_ms": gpu_ms(lambda: torch.mm(x, w.t()), iters),
               "cublas_addmm_ms": gpu_ms(lambda: torch.addmm(c, xk, wk.t()), iters)}
        if q is not None:
            variants = {
                "quack_default": lambda: q.gemm(xk, wk.t(), tuned=False),
                "quack_default_k64": lambda: q.gemm(x, w.t(), tuned=False),
                "quack_add_default": lambda: q.gemm_add(xk, wk.t(), c, tuned=False),
            }
            if tune:  # every SM90 config per shape: minutes per shape on a 16-core host
                variants.update({
                    "quack_tuned": lambda: q.gemm(xk, wk.t(), tuned=True),
                    "quack_tuned_k64": lambda: q.gemm(x, w.t(), tuned=True),
                    "quack_add_tuned": lambda: q.gemm_add(xk, wk.t(), c, tuned=True),
                })
            for label, fn in variants.items():
                out = fn()  # compiles / autotunes once
                expect = ref + c if "add" in label else (x @ w.t() if "k64" in label else ref)
                row[f"{label}_err"] = rel_err(out, expect)
                row[f"{label}_ms"] = gpu_ms(fn, iters)
        rows.append(row)
        print(row, flush=True)
        if out_path:  # after every row: a run stopped at its time limit keeps what it measured
            write_json(out_path, {"device": str(device), "rows": rows})
    return rows


def markdown(rows: list[dict]) -> str:
    lines = ["| layer (tokens x in -> out) | cuBLAS ms | quack | quack tuned | cuBLAS K+64 | quack K+64 "
             "| cuBLAS addmm | quack + C |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]

    def rel(r, key):
        v = r.get(f"{key}_ms")
        return "n/a" if v is None else f"{v / r['cublas_ms']:.3f}"

    for r in rows:
        lines.append(f"| {r['layer']} ({r['tokens']} x {r['in']} -> {r['out']}) | {r['cublas_ms']:.3f} "
                     f"| {rel(r, 'quack_default')} | {rel(r, 'quack_tuned')} | {rel(r, 'cublas_k64')} "
                     f"| {rel(r, 'quack_default_k64')} | {rel(r, 'cublas_addmm')} | {rel(r, 'quack_add_default')} |")
    total = {key: sum(r.get(f"{key}_ms") or 0.0 for r in rows)
             for key in ("cublas", "quack_default", "cublas_k64", "quack_default_k64")}
    lines.append(f"\nSums over the layer kinds (ms): " + ", ".join(f"{k} {v:.3f}" for k, v in total.items()))
    lines.append("(ratios are to cuBLAS at K = in; `n/a`: quack-kernels not installed here)")
    return "\n".join(lines)


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tiny", action="store_true", help="CPU check of the script (cuBLAS side only)")
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--tune", action="store_true", help="also quack's autotuned configs (slow: minutes per shape)")
    p.add_argument("--out", help="write the rows here as JSON")
    args = p.parse_args(argv)
    device = torch.device("cpu") if args.tiny else torch.accelerator.current_accelerator()
    dtype = torch.float32 if args.tiny else torch.bfloat16
    rows = run(TINY if args.tiny else LAYERS, device, dtype, 2 if args.tiny else args.iters, args.tune, args.out)
    print(markdown(rows))
    return rows


if __name__ == "__main__":
    main()
