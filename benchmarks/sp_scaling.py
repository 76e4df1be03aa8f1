"""Sequence-parallel scaling: per-step transformer time of real-size Wan2.1-14B (720p, 81 frames = 75,600 tokens)
and FLUX.1-dev (1024^2) with random weights, on 1, 2, 4 ... ranks in one run; JSON + a markdown table.

Not a test. GPU:   python benchmarks/sp_scaling.py --gpus 1,2,4 --out sp_scaling.json
CPU smoke check:   python benchmarks/sp_scaling.py --tiny --gpus 1,2,4
Each world size is a fresh spawn of ranks (gen.distributed.run_on_ranks); the model is built on every rank's
device (random weights, no checkpoint) and the plan-wrapped transformer (shard, SP attention, gather) is timed.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gen.distributed.apply import CfgParallel, ShardedTransformer  # noqa: E402
from gen.distributed.groups import ParallelConfig, ParallelContext  # noqa: E402
from gen.distributed.plans import plan_for  # noqa: E402
from gen.distributed.ranks import run_on_ranks  # noqa: E402

# name -> (model config kwargs, input sizes); "tiny" variants keep the shapes' structure for a CPU smoke check
MODELS = {
    "wan2.1-14b-720p": dict(kind="wan", config=dict(num_attention_heads=40, attention_head_dim=128, ffn_dim=13824,
                                                    num_layers=40, text_dim=4096, in_channels=16, out_channels=16),
                            latents=(16, 21, 90, 160), text=(512, 4096)),  # 21 * 45 * 80 = 75,600 tokens
    "flux.1-dev-1024": dict(kind="flux", config=dict(num_layers=19, num_single_layers=38, guidance_embeds=True),
                            latents=(64, 64), text=(512, 4096)),  # 64 * 64 = 4,096 image tokens + 512 text
}
TINY = {
    "wan2.1-14b-720p": dict(kind="wan", config=dict(num_attention_heads=4, attention_head_dim=16, ffn_dim=64,
                                                    num_layers=2, text_dim=32, in_channels=16, out_channels=16),
                            latents=(16, 5, 16, 18), text=(16, 32)),  # 5 * 8 * 9 = 360 tokens
    "flux.1-dev-1024": dict(kind="flux", config=dict(num_layers=1, num_single_layers=1, guidance_embeds=True,
                                                     num_attention_heads=4, attention_head_dim=16,
                                                     axes_dims_rope=(4, 6, 6), joint_attention_dim=32,
                                                     pooled_projection_dim=32, in_channels=16),
                            latents=(15, 16), text=(16, 32)),  # 240 image tokens
}


def build(spec: dict, device: torch.device, dtype: torch.dtype):
    """(model, forward kwargs) with random weights, made directly on `device` (meta first: no host copy)."""
    g = torch.Generator(device="cpu").manual_seed(0)
    if spec["kind"] == "wan":
        from gen.models.wan import WanConfig, WanTransformer

        cfg = WanConfig(**spec["config"])
        with torch.device("meta"):
            model = WanTransformer(cfg)
        inputs = dict(hidden_states=torch.randn(1, *spec["latents"], generator=g),
                      timestep=torch.tensor([500.0]), encoder_hidden_states=torch.randn(1, *spec["text"], generator=g))
    else:
        from gen.models.flux import FluxConfig, FluxTransformer

        cfg = FluxConfig(**spec["config"])
        with torch.device("meta"):
            model = FluxTransformer(cfg)
        h, w = spec["latents"]
        axes = (torch.zeros(1), torch.arange(h).float(), torch.arange(w).float())
        ids = torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1)  # (1, h, w, 3)
        inputs = dict(hidden_states=torch.randn(1, h * w, cfg.in_channels, generator=g),
                      encoder_hidden_states=torch.randn(1, *spec["text"], generator=g),
                      pooled_projections=torch.randn(1, cfg.pooled_projection_dim, generator=g),
                      timestep=torch.tensor([0.5]), img_ids=ids.reshape(h * w, 3),
                      txt_ids=torch.zeros(spec["text"][0], 3),
                      guidance=torch.tensor([3.5]))
    model = model.to_empty(device=device)
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.02)
    model = model.to(dtype).eval()
    inputs = {k: v.to(device, dtype if v.is_floating_point() and k not in ("timestep", "guidance") else v.dtype)
              for k, v in inputs.items()}
    return model, inputs


def layout(n: int, mode: str) -> ParallelConfig:
    if mode == "ring" or n == 1:
        return ParallelConfig(1, n, 1) if mode == "ring" else ParallelConfig()
    if mode == "hybrid" and n >= 4:
        return ParallelConfig(2, n // 2, 1)
    return ParallelConfig(n, 1, 1)


def bench_rank(rank: int, device: torch.device, name: str, tiny: bool, mode: str, warmup: int, iters: int) -> dict:
    """On every rank: build, wrap with the model's plan, time `iters` forwards (rank 0's wall clock)."""
    import torch.distributed as dist

    spec = (TINY if tiny else MODELS)[name]
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    config = layout(dist.get_world_size(), mode)
    ctx = ParallelContext.build(config, device, timeout_s=900)
    model, inputs = build(spec, device, dtype)
    ShardedTransformer(model, plan_for(model), ctx, CfgParallel(ctx))

    def sync():
        if device.type != "cpu":
            torch.accelerator.synchronize()
        dist.barrier()

    times = []
    with torch.no_grad():
        for i in range(warmup + iters):
            sync()
            start = time.perf_counter()
            out = model(**inputs)
            sync()
            if i >= warmup:
                times.append(time.perf_counter() - start)
    assert torch.isfinite(out.float()).all() or not tiny, "non-finite output"
    mem = torch.accelerator.max_memory_allocated() / 2**30 if device.type != "cpu" else 0.0
    return dict(step_s=statistics.median(times), times=times, ulysses=config.ulysses_degree,
                ring=config.ring_degree, peak_gib=mem)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--gpus", default="1,2,4", help="world sizes to measure, comma-separated (first should be 1)")
    p.add_argument("--models", default=",".join(MODELS), help=f"comma-separated subset of {list(MODELS)}")
    p.add_argument("--mode", default="ulysses", choices=["ulysses", "ring", "hybrid"],
                   help="layout per world size: all Ulysses, all Ring, or Ulysses 2 x Ring n/2")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--iters", type=int, default=3)
    p.add_argument("--tiny", action="store_true", help="tiny configs on CPU ranks (gloo): a smoke check")
    p.add_argument("--out", default="sp_scaling.json", help="JSON results file")
    args = p.parse_args(argv)

    device_type = "cpu"
    if not args.tiny:
        if not torch.accelerator.is_available():
            p.error("no accelerator: use --tiny for the CPU smoke check")
        device_type = torch.accelerator.current_accelerator().type
    sizes = [int(n) for n in args.gpus.split(",")]
    if not args.tiny and max(sizes) > torch.accelerator.device_count():
        p.error(f"--gpus {args.gpus}: this machine has {torch.accelerator.device_count()} devices")
    results = []
    for name in args.models.split(","):
        base = None
        for n in sizes:
            r = run_on_ranks(bench_rank, n, name, args.tiny, args.mode, args.warmup, args.iters,
                             device_type=device_type, timeout_s=1800)[0]
            base = r["step_s"] if n == 1 else base
            eff = base / (n * r["step_s"]) if base else None
            results.append(dict(model=name, gpus=n, **r, speedup=base / r["step_s"] if base else None, efficiency=eff))
            print(f"{name} x{n}: {r['step_s']:.3f} s/step", file=sys.stderr, flush=True)
    device = "cpu (tiny)" if args.tiny else device_type
    if not args.tiny and hasattr(torch.accelerator, "get_device_name"):
        device = torch.accelerator.get_device_name()
    Path(args.out).write_text(json.dumps(dict(device=str(device), mode=args.mode, results=results), indent=2))
    print(f"\n| model | GPUs | ulysses x ring | s/step (1 forward) | speedup | efficiency | peak GiB |")
    print("|---|---|---|---|---|---|---|")
    for r in results:
        sp = "-" if r["speedup"] is None else f"{r['speedup']:.2f}x"
        ef = "-" if r["efficiency"] is None else f"{100 * r['efficiency']:.0f}%"
        print(f"| {r['model']} | {r['gpus']} | {r['ulysses']} x {r['ring']} | {r['step_s']:.3f} | {sp} | {ef} | "
              f"{r['peak_gib']:.1f} |")
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
