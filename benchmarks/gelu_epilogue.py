"""Is GELU(tanh) worth fusing into the matmul that feeds it? cuBLASLt's GELU_BIAS epilogue (torch._addmm_activation,
CUDA: the tanh approximation, computed on the fp32 accumulator) against the matmul + the elementwise kernel inductor
fuses after it, per layer and in whole compiled steps of our FLUX.1-dev and Qwen-Image DiTs (random weights at the
real sizes, bf16, built on the GPU: no diffusers needed).

Step variants (each compiled afresh, regional, projections joined as the library does), through the library's
transform (gen/transforms/epilogue.py):
- base: no epilogue;
- ffn (FLUX): the feed-forwards (GeluProj) only;
- all: every module it marks (FLUX: also the single blocks' MLP, whose output projection then runs as two
  accumulating matmuls over views of its weight instead of one over the concatenation [attention | GELU(mlp)]);
- "@max-autotune-no-cudagraphs" (`--autotune`): the same compiled in inductor's autotuning mode.
(Results of the first run, 2026-11-28, came from the same math patched in by this script, before the transform
existed; there the single-block split also ran over contiguous copies of proj_out's column blocks.)

    python benchmarks/gelu_epilogue.py --out gelu.json          # GPU, ~5 min
    python benchmarks/gelu_epilogue.py --tiny                   # CPU smoke check of the same code
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import environment, kernel_breakdown, time_ms, write_json  # noqa: E402
from benchmarks.dit_step import build_ours, call_ours  # noqa: E402
from gen.models import flux as flux_mod  # noqa: E402
from gen.models.attention import select_attention_backend  # noqa: E402
from gen.models.layers import linear_gelu_tanh  # noqa: E402
from gen.transforms.compile import compile_blocks  # noqa: E402
from gen.transforms.epilogue import fuse_gelu_epilogues, unfuse_gelu_epilogues  # noqa: E402
from gen.transforms.join import join_projections  # noqa: E402

LAYERS = {  # (tokens, in, out) of the GELU-fed linears
    "flux double ffn (img)": (4096, 3072, 12288),
    "flux single mlp": (4608, 3072, 12288),
    "qwen-image 1328^2 ffn": (6889, 3072, 12288),
    "wan2.1-14b 480p ffn": (32760, 5120, 13824),
}


def layer_rows(device, dtype, tiny: bool) -> list[dict]:
    rows = []
    for name, (t, i, o) in LAYERS.items():
        if tiny:
            t, i, o = 64, 32, 128
        x = torch.randn(t, i, device=device, dtype=dtype)
        w = torch.randn(o, i, device=device, dtype=dtype) * i ** -0.5
        b = torch.randn(o, device=device, dtype=dtype)

        def unfused(x, w, b):
            return F.gelu(F.linear(x, w, b), approximate="tanh")

        compiled = torch.compile(unfused)
        fused_c = torch.compile(linear_gelu_tanh)
        row = {"layer": name, "shape": [t, i, o]}
        for key, fn in (("eager_ms", unfused), ("compiled_ms", compiled), ("epilogue_ms", linear_gelu_tanh),
                        ("epilogue_compiled_ms", fused_c)):
            row[key] = time_ms(lambda: fn(x, w, b), warmup=3, iters=20)
        ref = unfused(x.float(), w.float(), b.float())
        got = linear_gelu_tanh(x, w, b).float()
        row["epilogue_rel_err_vs_fp32"] = float((got - ref).norm() / ref.norm())
        row["unfused_rel_err_vs_fp32"] = float((unfused(x, w, b).float() - ref).norm() / ref.norm())
        row["gain"] = row["compiled_ms"] / row["epilogue_compiled_ms"]
        rows.append(row)
        print(f"{name:26} compiled {row['compiled_ms']:.3f} ms, epilogue {row['epilogue_compiled_ms']:.3f} ms "
              f"({row['gain']:.3f}x)", flush=True)
    return rows


def step_rows(name: str, variants: list[str], args, device, dtype) -> list[dict]:
    ours, inputs, tokens = build_ours(name, args.tiny, device, dtype)
    join_projections(ours)
    blocks = ("transformer_blocks", "single_transformer_blocks") if name == "flux" else ("transformer_blocks",)
    rows, outputs = [], {}
    for variant in variants:
        torch._dynamo.reset()
        for blk in (b for attr in blocks for b in getattr(ours, attr)):
            blk._compiled_call_impl = None
        kind, _, mode = variant.partition("@")
        unfuse_gelu_epilogues(ours)
        if kind != "base":
            fuse_gelu_epilogues(ours)
            if kind == "ffn":  # the feed-forwards only
                for m in ours.modules():
                    if isinstance(m, flux_mod.FluxSingleBlock):
                        m.__dict__.pop("gelu_epilogue")
        compile_blocks(ours, blocks, **({"mode": mode} if mode else {}))
        with torch.no_grad():
            t = time.perf_counter()
            out = call_ours(name, ours, inputs)
            torch.accelerator.synchronize() if torch.accelerator.is_available() else None
            cold = time.perf_counter() - t
            ms = time_ms(lambda: call_ours(name, ours, inputs), warmup=3, iters=2 if args.tiny else args.iters)
            prof = kernel_breakdown(lambda: call_ours(name, ours, inputs), iters=1 if args.tiny else 3) \
                if args.profile else None
        outputs[variant] = out.float()
        row = {"model": name, "tokens": tokens, "variant": variant, "ms": ms, "cold_s": cold}
        if prof is not None:
            row["profile_ms"] = prof
        if variant != "base":
            ref = outputs["base"]
            row["rel_diff_vs_base"] = float((outputs[variant] - ref).norm() / ref.norm())
            row["ratio_vs_base"] = ms / rows[0]["ms"]
        rows.append(row)
        print(f"{name} {variant:12} {ms:8.2f} ms  cold {cold:5.1f} s  " +
              (f"x{row['ratio_vs_base']:.4f} diff {row['rel_diff_vs_base']:.2e}" if variant != "base" else ""),
              flush=True)
    del ours, inputs
    torch.cuda.empty_cache() if torch.cuda.is_available() else None
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiny", action="store_true", help="CPU smoke check: tiny shapes and models")
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--profile", action="store_true", help="GPU kernel time by kind per variant")
    ap.add_argument("--models", default="flux,qwen")
    ap.add_argument("--autotune", action="store_true",
                    help="FLUX also compiled with mode max-autotune-no-cudagraphs (cold starts of minutes)")
    ap.add_argument("--variants", help="comma-separated subset of the step variants (base always first)")
    ap.add_argument("--no-layers", action="store_true", help="skip the per-layer rows")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    device = torch.device("cpu") if args.tiny else torch.accelerator.current_accelerator()
    dtype = torch.float32 if args.tiny else torch.bfloat16
    select_attention_backend(device, dtype)
    result = {"env": environment(), "steps": []}
    result["layers"] = [] if args.no_layers else layer_rows(device, dtype, args.tiny)
    for name in args.models.split(","):
        variants = ["base", "ffn", "all"] if name == "flux" else ["base", "all"]
        if args.variants:
            variants = [v for v in variants if v in args.variants.split(",")]
        if args.autotune and name == "flux":
            variants += ["base@max-autotune-no-cudagraphs", "all@max-autotune-no-cudagraphs"]
        result["steps"] += step_rows(name, variants, args, device, dtype)
    if args.out:
        write_json(args.out, result)
    print("\n| step | variant | ms | x base | rel diff vs base |\n|---|---|---:|---:|---:|")
    for r in result["steps"]:
        print(f"| {r['model']} | {r['variant']} | {r['ms']:.2f} | {r.get('ratio_vs_base', 1.0):.4f} | "
              f"{r.get('rel_diff_vs_base', 0.0):.1e} |")


if __name__ == "__main__":
    main()
