"""Where an unfused LoRA's time goes on FLUX.1-dev's layers at 1024^2 (rank 64 per member, bf16), kernel time only
(profiler, eager: one GEMM per call, as inside a compiled graph):

- the down products x A^T alone, as cuBLAS runs them and split over K (`--split-k`): the group's A stacked is only
  R = 64-256 wide, so a GEMM over M x R output tiles has few tiles for 132 SMs and a long K loop;
- a joined group in the wide layout as one GEMM over [x | x A^T] against [W | block-diagonal ups] (zeros where a
  member's rows meet another member's up columns), against two GEMMs over the column ranges [hL | x] and [x | hR]
  of one buffer [hL | x | hR] (each segment's members only: fewer zeros), the MLP's segment with its GELU in the
  epilogue as without LoRAs;
- the plain layer (no LoRA) beside each, with its GELU epilogue where the model has one.

  python benchmarks/lora_layouts.py            # GPU, well under a minute
  python benchmarks/lora_layouts.py --tiny     # CPU smoke check (every size / 16, fp32, wall time)
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import environment, gpu_ms, save_result  # noqa: E402
from gen.models.layers import linear_gelu_tanh  # noqa: E402

DOWNS = {  # name: (tokens M, in K, stacked rank N) at rank 64 per member
    "double img q/k/v": (4096, 3072, 192), "double txt q/k/v": (512, 3072, 192), "double img to_out": (4096, 3072, 64),
    "double img fc1": (4096, 3072, 64), "double img fc2": (4096, 12288, 64), "single q/k/v/mlp": (4608, 3072, 256),
    "single proj_out": (4608, 15360, 64),
}
PER_STEP = {"double img q/k/v": 19, "double txt q/k/v": 19, "double img to_out": 19, "double img fc1": 19,
            "double img fc2": 19, "single q/k/v/mlp": 38, "single proj_out": 38}


def split_k_linear(x: torch.Tensor, w: torch.Tensor, parts: int) -> torch.Tensor:
    """x (M, K) @ w (N, K)^T as `parts` products over K slices summed in fp32 (one batched GEMM)."""
    m, k = x.shape
    xs = x.view(m, parts, k // parts).transpose(0, 1)  # (parts, M, K/parts), no copy
    ws = w.view(w.shape[0], parts, k // parts).permute(1, 2, 0)  # (parts, K/parts, N)
    try:
        parts_out = torch.bmm(xs, ws, out_dtype=torch.float32)
    except (RuntimeError, NotImplementedError):  # no fp32-output bmm here: bf16 partials
        parts_out = torch.bmm(xs, ws).float()
    return parts_out.sum(0).to(x.dtype)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def group_case(m: int, k: int, sizes: list[int], rank: int, split: int, gelu_last: bool, dev, dtype) -> dict:
    """One joined group: base, wide (one GEMM), split (two segments: members [:split] and [split:]; with
    `gelu_last`, the last member alone in the second)."""
    g = torch.Generator(device=dev).manual_seed(0)
    rnd = lambda *s, scale=1.0: (torch.randn(*s, device=dev, generator=g) * scale).to(dtype)
    n, members = sum(sizes), len(sizes)
    x, w, b = rnd(m, k), rnd(n, k, scale=k ** -0.5), rnd(n, scale=0.1)
    down = rnd(members * rank, k, scale=k ** -0.5)
    ups = [rnd(s, rank, scale=0.1) for s in sizes]
    wide = torch.zeros(n, k + members * rank, device=dev, dtype=dtype)  # [W | block-diagonal ups]
    wide[:, :k] = w
    row = 0
    for i, (s, u) in enumerate(zip(sizes, ups)):
        wide[row:row + s, k + i * rank:k + (i + 1) * rank] = u
        row += s
    nl, rl = sum(sizes[:split]), split * rank
    left = torch.cat([wide[:nl, k:k + rl], w[:nl]], dim=1)  # [ups_L | W_L] for [hL | x]
    right = torch.cat([w[nl:], wide[nl:, k + rl:]], dim=1)  # [W_R | ups_R] for [x | hR]
    last = sizes[-1]

    def act(y):  # the model's consumer of the last member (GELU on the single block's MLP)
        if not gelu_last:
            return y
        return torch.cat([y[:, :n - last], F.gelu(y[:, n - last:], approximate="tanh")], dim=1)

    def base():
        if gelu_last:
            return torch.cat([F.linear(x, w[:n - last], b[:n - last]), linear_gelu_tanh(x, w[n - last:], b[n - last:])], 1)
        return F.linear(x, w, b)

    def one_gemm():
        return act(F.linear(torch.cat([x, F.linear(x, down)], dim=1), wide, b))

    def two_gemms():
        h = F.linear(x, down)
        buf = torch.cat([h[:, :rl], x, h[:, rl:]], dim=1)
        yl = F.linear(buf[:, :rl + k], left, b[:nl])
        yr = (linear_gelu_tanh if gelu_last else F.linear)(buf[:, rl:], right, b[nl:])  # gelu_last: the MLP alone
        return torch.cat([yl, yr], dim=1)

    ref = act((x.float() @ w.float().T + b.float()) + torch.cat(
        [(x.float() @ down[i * rank:(i + 1) * rank].float().T) @ u.float().T for i, u in enumerate(ups)], dim=1))
    out = {"tokens": m, "in": k, "sizes": sizes, "split_after": split}
    for name, fn in (("base", base), ("wide, one GEMM", one_gemm), ("split, two GEMMs", two_gemms)):
        out[name] = {"ms": gpu_ms(fn), "rel_err_vs_fp32": None if name == "base" else rel(fn(), ref)}
    return out


def main(argv=None) -> dict:
    p = argparse.ArgumentParser()
    p.add_argument("--rank", type=int, default=64)
    p.add_argument("--tiny", action="store_true", help="every size / 16 on the CPU in fp32 (smoke check)")
    p.add_argument("--out", help="JSON output (default: $OUT/lora_layouts.json when OUT is set)")
    args = p.parse_args(argv)
    gpu = torch.accelerator.is_available() and not args.tiny
    dev = torch.accelerator.current_accelerator() if gpu else torch.device("cpu")
    dtype, f = (torch.bfloat16, 1) if gpu else (torch.float32, 16)
    r = args.rank // f
    result = {"env": environment(), "rank": r, "downs": {}, "groups": {}}
    g = torch.Generator(device=dev).manual_seed(1)
    with torch.no_grad():
        for name, (m, k, n) in DOWNS.items():
            m, k, n = m // f, k // f, n * r // 64
            x = torch.randn(m, k, device=dev, generator=g).to(dtype)
            a = (torch.randn(n, k, device=dev, generator=g) * k ** -0.5).to(dtype)
            ref = x.float() @ a.float().T
            row = {"M": m, "K": k, "N": n, "cublas_ms": gpu_ms(lambda: F.linear(x, a)),
                   "cublas_rel_err": rel(F.linear(x, a), ref)}
            for parts in (2, 4, 8):
                row[f"split{parts}_ms"] = gpu_ms(lambda: split_k_linear(x, a, parts))
                row[f"split{parts}_rel_err"] = rel(split_k_linear(x, a, parts), ref)
            row["tflops_cublas"] = 2 * m * k * n / row["cublas_ms"] / 1e9
            result["downs"][name] = row
        d = 3072 // f
        result["groups"]["single q/k/v/mlp"] = group_case(4608 // f, d, [d] * 3 + [4 * d], r, 3, True, dev, dtype)
        result["groups"]["double img q/k/v"] = group_case(4096 // f, d, [d] * 3, r, 1, False, dev, dtype)
    print(f"\ndown products x A^T (rank {r} per member), kernel ms; x per step")
    print("| layer | M x K x N | cuBLAS | split 2 | split 4 | split 8 | cuBLAS TFLOP/s | per step |\n|---|---|---:|---:|---:|---:|---:|---|")
    for name, d in result["downs"].items():
        print(f"| {name} | {d['M']}x{d['K']}x{d['N']} | {d['cublas_ms']:.4f} | {d['split2_ms']:.4f} | "
              f"{d['split4_ms']:.4f} | {d['split8_ms']:.4f} | {d['tflops_cublas']:.0f} | {PER_STEP[name]} |")
    print("\njoined groups, kernel ms (rel. err vs fp32)")
    print("| group | base | wide, one GEMM | split, two GEMMs |\n|---|---:|---:|---:|")
    for name, c in result["groups"].items():
        cells = [f"{c[v]['ms']:.4f}" + ("" if c[v]["rel_err_vs_fp32"] is None else f" ({c[v]['rel_err_vs_fp32']:.1e})")
                 for v in ("base", "wide, one GEMM", "split, two GEMMs")]
        print(f"| {name} | " + " | ".join(cells) + " |")
    save_result(args.out, "lora_layouts.json", result)
    return result


if __name__ == "__main__":
    main()
