"""q/k RMSNorm + RoPE (gen/transforms/norm_rope.py) at the FLUX.1-dev and Qwen-Image shapes: the fused Triton kernel
against the same plain ops compiled by inductor (what the blocks ran before), per call, with the bytes it must move.

    python benchmarks/norm_rope.py --out norm_rope.json     # GPU, under a minute
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import environment, gpu_ms, time_ms, write_json  # noqa: E402
from gen.models.layers import RMSNorm, norm_rope  # noqa: E402
import gen.transforms.norm_rope as fused_op  # noqa: E402  (registers the op)

# (name, batch, [part lengths], heads, torch's RMSNorm (FLUX.1) or diffusers' (Qwen-Image))
SHAPES = [("FLUX.1-dev 1024^2 double block [txt, img]", 1, [512, 4096], 24, True),
          ("FLUX.1-dev 1024^2 single block", 1, [4608], 24, True),
          ("Qwen-Image 1024^2 [txt, img]", 1, [60, 4096], 24, False),
          ("Qwen-Image 1024^2, CFG batched [txt, img]", 2, [60, 4096], 24, False),
          ("Qwen-Image 1328^2 [txt, img]", 1, [256, 6889], 24, False)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out")
    ap.add_argument("--sweep", action="store_true", help="also the kernel's GPU time per launch shape (profiler)")
    args = ap.parse_args()
    dev, dt, d = torch.device("cuda"), torch.bfloat16, 128
    rows = []
    for name, b, lengths, heads, fp32_weight in SHAPES:
        parts = []
        for n in lengths:  # the q slice of a joined q/k/v output, as the attention reads it
            qkv = torch.randn(b, n, 3 * heads * d, device=dev, dtype=dt)
            norm = (nn.RMSNorm(d, eps=1e-6) if fp32_weight else RMSNorm(d)).to(dev, dt)
            with torch.no_grad():
                norm.weight.uniform_(0.5, 1.5)
            angle = torch.rand(n, d // 2, device=dev) * 6
            parts.append((norm, qkv[..., :heads * d].unflatten(-1, (heads, d)), angle.cos(), angle.sin()))

        def plain():
            with torch.no_grad():
                return compiled(*parts)

        compiled = torch.compile(norm_rope)
        want = plain()
        t_plain = time_ms(plain, 5, 50)
        for p in parts:
            p[0].fused_rope = True

        def fused():
            with torch.no_grad():
                return norm_rope(*parts)

        got = fused()
        t_fused = time_ms(fused, 5, 50)
        kernel_us = {}
        if args.sweep:
            for block in (16, 32, 64, 128):
                for warps in (2, 4, 8):
                    fused_op.LAUNCH.update(block=block, num_warps=warps)
                    kernel_us[f"{block}x{warps}"] = 1e3 * gpu_ms(fused)
            fused_op.LAUNCH.update(block=16, num_warps=8)
            kernel_us["plain compiled"] = 1e3 * gpu_ms(plain)
        for p in parts:
            del p[0].fused_rope
        err = ((got.float() - want.float()).norm() / want.float().norm()).item()
        moved = 2 * got.numel() * got.element_size()  # each element read once and written once
        rows.append({"shape": name, "tokens": sum(lengths), "batch": b, "plain_compiled_us": 1e3 * t_plain,
                     "fused_us": 1e3 * t_fused, "speedup": t_plain / t_fused, "fused_GBps": moved / t_fused / 1e6,
                     "plain_GBps": moved / t_plain / 1e6, "rel_err_vs_plain": err,
                     "bit_equal_fraction": (got == want).float().mean().item(), "kernel_us": kernel_us})
    print("| shape | plain compiled us | fused us | speedup | fused GB/s | rel. err | bit-equal |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['shape']} | {r['plain_compiled_us']:.1f} | {r['fused_us']:.1f} | {r['speedup']:.2f} | "
              f"{r['fused_GBps']:.0f} | {r['rel_err_vs_plain']:.1e} | {r['bit_equal_fraction']:.4f} |")
    for r in rows:
        if r["kernel_us"]:
            print(r["shape"], " ".join(f"{k}={v:.1f}" for k, v in r["kernel_us"].items()))
    if args.out:
        write_json(args.out, {"env": environment(), "rows": rows})


if __name__ == "__main__":
    main()
