"""FlashAttention-4 (flash-attn-4, CuTe DSL) against cuDNN's fused attention and FlashAttention-2 (both through
PyTorch SDPA) at the attention shapes of FLUX.1-dev 1024^2, Qwen-Image 1328^2, Wan2.1-1.3B and Wan2.1-14B 480p 81
frames; bf16, one H100 / H200. Also the agreement of each kernel with fp32 math attention on a smaller shape.

Where FA4 is installed and agrees, gen/models/attention.select_attention_backend races it against the SDPA backend
chosen before it at each attention shape on first use (ByShape); this table shows why one choice for every shape
would lose somewhere.

  python benchmarks/attention_fa4.py [--out fa4.json]      # GPU machine, with flash-attn-4 installed (~1 minute)
  python benchmarks/attention_fa4.py --tiny                # CPU: the script's own logic, FA4 reported unavailable
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import time_ms, write_json  # noqa: E402
from gen.models import attention as A  # noqa: E402

# model -> (B, L, H, D): one attention call of one block
SHAPES = {
    "FLUX.1-dev 1024^2": (1, 4608, 24, 128),
    "FLUX.1-dev 1024^2, Ulysses 2 ranks": (1, 4608, 12, 128),
    "Qwen-Image 1024^2 (text ~32)": (1, 4096 + 32, 24, 128),
    "Qwen-Image 1024^2, CFG batched": (2, 4096 + 32, 24, 128),
    "Qwen-Image 1328^2": (1, 6889 + 256, 24, 128),
    "Wan2.1-1.3B 480p 81f": (1, 32760, 12, 128),
    "Wan2.1-14B 480p 81f": (1, 32760, 40, 128),
}
TINY = {"tiny": (1, 64, 2, 32)}
KERNELS = ("cudnn", "flash", "fa4")


def attention_tflops(shape) -> float:
    b, n, h, d = shape
    return 4 * b * h * n * n * d / 1e12  # QK^T and PV, 2 FLOPs per multiply-add


def agreement(name: str, device, dtype, shape=(1, 1024, 8, 128)) -> float | None:
    """Relative error of backend `name` vs fp32 math attention (None: unavailable here)."""
    g = torch.Generator("cpu").manual_seed(0)
    q, k, v = (torch.randn(*shape, generator=g) for _ in range(3))
    try:
        out = A.BACKENDS[name](*(t.to(device, dtype) for t in (q, k, v)), None).float().cpu()
    except RuntimeError as e:
        print(f"{name}: unavailable ({str(e).splitlines()[0]})")
        return None
    ref = A.math_attention(q, k, v)
    return ((out - ref).norm() / ref.norm()).item()


def run(shapes: dict, device, dtype, iters: int) -> dict:
    rows = []
    errors = {name: agreement(name, device, dtype) for name in KERNELS}
    for model, shape in shapes.items():
        g = torch.Generator("cpu").manual_seed(0)
        q, k, v = (torch.randn(*shape, generator=g).to(device, dtype) for _ in range(3))
        row = {"model": model, "shape": list(shape)}
        for name in KERNELS:
            if errors[name] is None:
                row[name] = None
                continue
            row[name] = time_ms(lambda: A.BACKENDS[name](q, k, v, None), warmup=2, iters=iters)
        rows.append(row)
    return {"errors": errors, "rows": rows}


def markdown(result: dict) -> str:
    lines = ["| shape (B, L, H, D) | model | cuDNN ms | FA2 ms | FA4 ms | FA4 / cuDNN | FA4 TFLOP/s |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for r in result["rows"]:
        def ms(name):
            return "n/a" if r[name] is None else f"{r[name]:.3f}"
        ratio = "n/a" if r["fa4"] is None or r["cudnn"] is None else f"{r['fa4'] / r['cudnn']:.3f}"
        tflops = "n/a" if r["fa4"] is None else f"{attention_tflops(r['shape']) / (r['fa4'] / 1e3):.0f}"
        lines.append(f"| {tuple(r['shape'])} | {r['model']} | {ms('cudnn')} | {ms('flash')} | {ms('fa4')} | {ratio} "
                     f"| {tflops} |")
    errs = ", ".join(f"{k} {'n/a' if v is None else f'{v:.2e}'}" for k, v in result["errors"].items())
    lines.append(f"\nRelative error vs fp32 math attention (1 x 1024 x 8 x 128): {errs}")
    return "\n".join(lines)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tiny", action="store_true", help="CPU smoke check of the script")
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--out", help="write the results here as JSON")
    args = p.parse_args(argv)
    device = torch.device("cpu") if args.tiny else torch.accelerator.current_accelerator()
    dtype = torch.float32 if args.tiny else torch.bfloat16
    result = run(TINY if args.tiny else SHAPES, device, dtype, 2 if args.tiny else args.iters)
    result["device"] = str(device)
    if args.out:
        write_json(args.out, result)
    print(markdown(result))
    return result


if __name__ == "__main__":
    main()
