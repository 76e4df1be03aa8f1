"""LoRA cost per denoising step and per switch: a FLUX.1-dev-sized transformer step at 1024^2 (4096 image + 512 text
tokens, bf16) with no LoRA, unfused LoRAs of rank 16 and 64 (all linears of every block) in the wide layout (the
default) and with separate up products, and a fused rank-64 one;
ours compiled (regional, as --compile), diffusers' eager with its PEFT adapters (load_lora_adapter) beside it on the
same weights. Then the time to switch between two rank-64 sets (both cached on the device) and the dynamo graphs
compiled while switching (should be 0), and the time of a fused switch (originals copied back, the new set merged).

Random weights built directly on the GPU (benchmarks/dit_step.py's build); the LoRA files are written as diffusers
format .safetensors to a temporary folder and read through gen/lora like any other.

  python benchmarks/lora_step.py                      # on the GPU machine (writes $OUT/lora_step.json when OUT is set)
  python benchmarks/lora_step.py --tiny               # CPU smoke check (tiny FLUX, eager backend)
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import environment, idle_gaps, kernel_breakdown, save_result, time_ms, top_kernels  # noqa: E402
from benchmarks.dit_step import build, call_ours, call_reference  # noqa: E402
from gen.models.attention import select_attention_backend  # noqa: E402
from gen.transforms.compile import compile_blocks  # noqa: E402
from gen.transforms.epilogue import fuse_gelu_epilogues  # noqa: E402
from gen.transforms.join import join_projections  # noqa: E402
from gen.transforms.norm_rope import fuse_norm_rope  # noqa: E402
from gen.transforms.lora import LoraAdapters  # noqa: E402
from pipelines.flux import FLUX_DIT  # noqa: E402


def write_lora(model, rank: int, seed: int, folder: Path) -> str:
    """A diffusers-format LoRA of `rank` on every linear layer of the model's blocks (small random values)."""
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for attr in FLUX_DIT.blocks:
        for i, block in enumerate(getattr(model, attr)):
            for name, m in block.named_modules():
                if isinstance(m, torch.nn.Linear):
                    key = f"transformer.{attr}.{i}.{name}"
                    tensors[f"{key}.lora_A.weight"] = (torch.randn(rank, m.in_features, generator=g) * 0.01).bfloat16()
                    tensors[f"{key}.lora_B.weight"] = (torch.randn(m.out_features, rank, generator=g) * 0.01).bfloat16()
    path = folder / f"lora_r{rank}_{seed}.safetensors"
    save_file(tensors, path)
    return str(path)


def _concatenated_input(x, down, before=0):
    """The wide layout's input as built before 2026-11-29's seventh session (--ab): the down product first, then x
    and it concatenated (x, already a buffer of its own for the down product, copied once more)."""
    h = torch.nn.functional.linear(x, down)
    return torch.cat([h[..., :before], x, h[..., before:]], -1).reshape(-1, x.shape[-1] + down.shape[0])


def _sync():
    if torch.accelerator.is_available():
        torch.accelerator.synchronize()


def timed_s(fn) -> float:
    _sync()
    t = time.perf_counter()
    fn()
    _sync()
    return time.perf_counter() - t


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser()
    p.add_argument("--tiny", action="store_true", help="tiny FLUX on the CPU, eager backend (smoke check)")
    p.add_argument("--ranks", default="16,64")
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--no-reference", action="store_true", help="skip diffusers' PEFT side")
    p.add_argument("--profile", action="store_true",
                   help="also GPU kernel ms per step by kind (torch.profiler): no LoRA and each unfused row")
    p.add_argument("--plain", action="store_true",
                   help="only joined projections (as before 2026-11-29), not the GELU epilogues and fused q/k norm + "
                        "RoPE that gen applies by default (gen/transforms: join)")
    p.add_argument("--top-kernels", type=int, default=0,
                   help="with --profile: also the N longest kernels of no LoRA and of the top rank's wide layout")
    p.add_argument("--interleave", type=int, default=0,
                   help="N rounds of no LoRA and the top rank's wide layout timed one after the other (the clocks "
                        "drift between runs by a few percent: the per-round ratio's median is the number to read)")
    p.add_argument("--gaps", type=int, default=0,
                   help="with --profile: also where the GPU waits between kernels (the N kernels most waited for and "
                        "the N largest gaps), no LoRA and the top rank's wide layout")
    p.add_argument("--graphed", type=int, default=0,
                   help="N more interleaved rounds with the step replayed from CUDA graphs (gen's --cuda-graphs; on "
                        "CUDA): what is left of the LoRA's cost without the host's launches")
    p.add_argument("--ab", action="store_true",
                   help="at the top rank, also the wide layout with its input concatenated after the down product (as "
                        "before 2026-11-29's seventh session), then as shipped again: an A/B in one run")
    p.add_argument("--compile-options", default="",
                   help="JSON of inductor options for the blocks' compile, e.g. '{\"max_autotune_gemm\": true, "
                        "\"max_autotune_gemm_backends\": \"TRITON,ATEN\", \"benchmark_epilogue_fusion\": true}' "
                        "(Triton GEMM templates, where the up products' adds can join their consumers' kernels)")
    p.add_argument("--out", help="JSON output (default: $OUT/lora_step.json when OUT is set)")
    args = p.parse_args(argv)
    try:
        options = json.loads(args.compile_options) if args.compile_options else None
    except json.JSONDecodeError as e:
        p.error(f"--compile-options is not JSON ({e}): {args.compile_options!r}")
    if options is not None and not isinstance(options, dict):
        p.error(f"--compile-options must be a JSON object, got {args.compile_options!r}")
    if options and args.tiny:
        print("--compile-options: inductor's; --tiny compiles with the eager backend, so they are not used")
    device = torch.device("cpu") if args.tiny or not torch.accelerator.is_available() \
        else torch.accelerator.current_accelerator()
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    iters, warmup = (2, 1) if args.tiny else (args.iters, 3)
    ranks = [int(r) for r in args.ranks.split(",")]
    if args.profile and device.type == "cpu":
        print("--profile: GPU kernels only; skipped on the CPU")
        args.profile = False
    torch._dynamo.config.automatic_dynamic_shapes = False  # one static graph per bank capacity
    from torch._dynamo.utils import counters

    graphs = lambda: counters["stats"]["unique_graphs"]
    ref, ours, inputs, tokens = build("flux", args.tiny, device, dtype)
    select_attention_backend(device, dtype, "auto")
    join_projections(ours)
    if not args.plain:  # the rest of what TransformOptions.join applies, as a served model runs
        fuse_gelu_epilogues(ours)
        fuse_norm_rope(ours)
    pipeline = type("P", (), {"dits": lambda self: [("transformer", ours, FLUX_DIT)], "device": device,
                              "dtype": dtype})()
    step = lambda: call_ours("flux", ours, inputs)
    rows, result = [], {"env": environment(), "tokens": tokens, "device": str(device), "dtype": str(dtype),
                        "transforms": "join" if args.plain else "join, gelu epilogues, norm+rope"}
    with tempfile.TemporaryDirectory() as tmp, torch.no_grad():
        files = {r: [write_lora(ours, r, seed, Path(tmp)) for seed in (1, 2)] for r in ranks}
        unfused = LoraAdapters(pipeline, max_cache_mb=1e6)  # the default: the wide layout where layers widen
        separate = LoraAdapters(pipeline, max_cache_mb=1e6, wide=False)  # every layer adds its up product
        fused = LoraAdapters(pipeline, fuse=True, max_cache_mb=1e6)
        result["compile_options"] = options
        compile_blocks(ours, FLUX_DIT.blocks, **({"backend": "eager"} if args.tiny else
                                                 {"options": options} if options else {}))
        cold = timed_s(step)
        none_ms = time_ms(step, warmup, iters)
        kernels = {"ours compiled, no LoRA": kernel_breakdown(step)} if args.profile else {}
        top_rows = {"no LoRA": top_kernels(step, n=args.top_kernels)} if args.profile and args.top_kernels else {}
        gap_rows = {"no LoRA": idle_gaps(step, args.gaps)} if args.profile and args.gaps else {}
        rows.append(("ours compiled, no LoRA", none_ms, cold))
        top = max(ranks)
        fused_switch = timed_s(lambda: fused.set([(files[top][0], 1.0)]))
        rows.append((f"ours compiled, fused rank {top}", time_ms(step, warmup, iters), None))
        fused.set([])
        agreement = {}  # rank -> relative difference of the two layouts' outputs (rounding only)
        for r in ranks:
            outs = []
            for layout, adapters in (("wide", unfused), ("separate ups", separate)):
                adapters.set([(files[r][0], 1.0)])
                cold = timed_s(step)
                rows.append((f"ours compiled, unfused rank {r} ({layout})", time_ms(step, warmup, iters), cold))
                if args.profile:
                    kernels[rows[-1][0]] = kernel_breakdown(step)
                    if top_rows and r == max(ranks) and layout == "wide":
                        top_rows[f"rank {r} wide"] = top_kernels(step, n=args.top_kernels)
                    if gap_rows and r == max(ranks) and layout == "wide":
                        gap_rows[f"rank {r} wide"] = idle_gaps(step, args.gaps)
                outs.append(step().float())
                adapters.remove()
            agreement[r] = ((outs[0] - outs[1]).norm() / outs[1].norm()).item()
        if args.ab:  # the wide layout with its input concatenated after the down product, as before 2026-11-29's
            import gen.models.layers as layers_module  # seventh session, then as shipped again

            in_place, ab_outs = layers_module.wide_lora_input, []
            for label, fn in (("input concatenated", _concatenated_input), ("as shipped, again", in_place)):
                layers_module.wide_lora_input = fn
                torch._dynamo.reset()  # the blocks' graphs are built again with this input
                unfused.set([(files[top][0], 1.0)])
                cold = timed_s(step)
                rows.append((f"ours compiled, unfused rank {top} (wide, {label})", time_ms(step, warmup, iters), cold))
                if args.profile:
                    kernels[rows[-1][0]] = kernel_breakdown(step)
                ab_outs.append(step().float())
                unfused.remove()
            result["ab_rel_err"] = ((ab_outs[0] - ab_outs[1]).norm() / ab_outs[1].norm()).item()
            layers_module.wide_lora_input = in_place
            torch._dynamo.reset()
        if args.interleave:  # both structures' graphs are compiled by now: switching back and forth recompiles none
            pairs = []
            for _ in range(args.interleave):
                unfused.remove()
                base = time_ms(step, 2, iters)
                unfused.set([(files[top][0], 1.0)])
                pairs.append((base, time_ms(step, 2, iters)))
            unfused.remove()
            ratios = sorted(w / b for b, w in pairs)
            result["interleaved"] = {"rounds": pairs, "median_ratio": ratios[len(ratios) // 2],
                                     "no_lora_ms_median": sorted(b for b, _ in pairs)[len(pairs) // 2],
                                     "wide_ms_median": sorted(w for _, w in pairs)[len(pairs) // 2]}
        if args.graphed and device.type == "cuda":  # the same rounds replayed from CUDA graphs
            from gen.transforms.cuda_graph import disable_cuda_graphs, enable_cuda_graphs

            enable_cuda_graphs(ours)
            pairs = []
            for _ in range(args.graphed):
                unfused.remove()  # (a structure change: the adapters drop the captured graphs, the step recaptures)
                base = time_ms(step, 2, iters)
                unfused.set([(files[top][0], 1.0)])
                pairs.append((base, time_ms(step, 2, iters)))
            unfused.remove()
            disable_cuda_graphs(ours)
            ratios = sorted(w / b for b, w in pairs)
            result["graphed"] = {"rounds": pairs, "median_ratio": ratios[len(ratios) // 2],
                                 "no_lora_ms_median": sorted(b for b, _ in pairs)[len(pairs) // 2],
                                 "wide_ms_median": sorted(w for _, w in pairs)[len(pairs) // 2]}
        # switching between two cached rank-`top` sets: contents copied in place, no new graph
        unfused.set([(files[top][1], 1.0)])
        step()
        before, switches = graphs(), []
        for i in range(6):
            switches.append(timed_s(lambda: unfused.set([(files[top][i % 2], 0.5 + i / 10)])))
            step()
        switch_ms = 1000 * sorted(switches)[len(switches) // 2]
        recompiles = graphs() - before
        unfused.remove()
        rows.append(("ours compiled, no LoRA again (the spread between runs)", time_ms(step, warmup, iters), None))
        result["ours"] = {name: {"ms": ms, "cold_s": cold} for name, ms, cold in rows}
        result["switch_ms"], result["recompiles_while_switching"] = switch_ms, recompiles
        result["fused_switch_s"] = fused_switch
        result["wide_vs_separate_rel_err"] = agreement
        if kernels:
            result["kernel_ms"] = kernels
        if top_rows:
            result["top_kernels"] = top_rows
        if gap_rows:
            result["idle_gaps"] = gap_rows
        ref_rows = []
        if not args.no_reference:
            ref_step = lambda: call_reference("flux", ref, inputs)
            ref_rows.append(("diffusers eager, no LoRA", time_ms(ref_step, warmup, iters)))
            ref.load_lora_adapter(files[top][0], prefix="transformer", adapter_name="a")
            ref_rows.append((f"diffusers eager, PEFT unfused rank {top}", time_ms(ref_step, warmup, iters)))
            ref.fuse_lora(lora_scale=1.0)
            ref_rows.append((f"diffusers eager, PEFT fused rank {top}", time_ms(ref_step, warmup, iters)))
            result["diffusers"] = {name: {"ms": ms} for name, ms in ref_rows}
    print(f"\nFLUX.1-dev-sized step, {tokens} tokens, {device} {dtype}" + (" (tiny)" if args.tiny else ""))
    print("| variant | ms/step | vs no LoRA | first call s |\n|---|---|---|---|")
    for name, ms, cold in rows:
        print(f"| {name} | {ms:.2f} | {ms / none_ms:.3f} | {'' if cold is None else f'{cold:.1f}'} |")
    for name, ms in ref_rows:
        print(f"| {name} | {ms:.2f} | {ms / ref_rows[0][1]:.3f} | |")
    if kernels:
        kinds = sorted({k for b in kernels.values() for k in b}, key=lambda k: -kernels["ours compiled, no LoRA"].get(k, 0))
        print("\nGPU kernel ms per step by kind\n| kind | " + " | ".join(kernels) + " |\n" + "|---" * (len(kernels) + 1) + "|")
        for k in kinds:
            print(f"| {k} | " + " | ".join(f"{b.get(k, 0):.2f}" for b in kernels.values()) + " |")
    for label, top_list in result.get("top_kernels", {}).items():
        print(f"\nlongest kernels, {label} (ms per step, launches per step)")
        for k in top_list:
            print(f"{k['ms']:8.3f} {k['calls']:5.0f}  {k['kind'][:12]:12} {k['name'][:80]}")
    for label, gaps in result.get("idle_gaps", {}).items():
        print(f"\nGPU idle, {label}: {gaps['idle_ms']:.2f} ms between {gaps['kernels']} kernels "
              f"({gaps['span_ms']:.1f} ms from first to last); most waited for:")
        for g in gaps["by_next_kernel"]:
            print(f"{g['ms']:8.3f} ms {g['gaps']:5d} gaps ({g['over_5us']} over 5 us) before {g['next'][:70]}")
        print("largest: " + "; ".join(f"{g['us']:.0f} us {g['after'][:30]} -> {g['before'][:30]}"
                                      for g in gaps["largest"][:5]))
    for key, what in (("interleaved", "interleaved"), ("graphed", "interleaved, CUDA graphs")):
        if key in result:
            il = result[key]
            print(f"\n{what}, {len(il['rounds'])} rounds: no LoRA {il['no_lora_ms_median']:.2f} ms, rank {max(ranks)} "
                  f"wide {il['wide_ms_median']:.2f} ms (medians); per-round ratio median {il['median_ratio']:.3f} "
                  f"(each: {', '.join(f'{w / b:.3f}' for b, w in il['rounds'])})")
    if "ab_rel_err" in result:
        print(f"input concatenated vs as shipped, relative difference of the outputs: {result['ab_rel_err']:.1e}")
    print("wide vs separate ups, relative difference of the outputs: "
          + ", ".join(f"rank {r} {e:.1e}" for r, e in agreement.items()))
    print(f"switch between two cached rank-{top} sets: {switch_ms:.1f} ms, {recompiles} graphs compiled while "
          f"switching; fused switch (restore + merge): {1000 * fused_switch:.0f} ms")
    save_result(args.out, "lora_step.json", result)
    return result


if __name__ == "__main__":
    main()
