"""Host-device syncs inside the denoising loop of each pipeline, found with torch's CUDA sync debug mode.

Loads the tiny test models (assets/) on the GPU, runs one generation to warm up, then runs another with
`torch.cuda.set_sync_debug_mode("warn")` switched on (CUDA; elsewhere only the plumbing runs) for the denoise
stage only (text encoding and decoding must sync: they hand results to the host). Every synchronizing call in the
step loop (a `.item()`, a device tensor in an `if`, a blocking copy) shows up as a warning; the script prints their
count and where they came from, and which scheduler class each pipeline stepped with.

Then Wan's scheduler alone at the real latent size (Wan2.1 480p 81 frames: (1, 16, 21, 60, 104), 40 steps, bf16
velocities into fp32 latents as the pipeline gives them): our UniPCScheduler (gen/schedulers/unipc.py) and
diffusers' UniPCMultistepScheduler side by side, each with its syncs counted the same way, its ms per step (host
clock around the whole loop, the device waited for at the end) and ours' largest relative error against diffusers'
over the steps. `--tiny`: a small latent (the CPU test).

  python benchmarks/sync_check.py                  # on the GPU machine; JSON to $OUT/sync_check.json (or --out)
"""
from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
import traceback
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks.common import _sync, environment, save_result  # noqa: E402

CASES = {  # asset folder, request keywords (CFG on, so both branches run)
    "flux": ("flux-tiny", dict(height=64, width=64, negative_prompt="blue", true_cfg_scale=2.0)),
    "wan2.2 (two experts)": ("wan22-a14b-tiny", dict(height=32, width=32, num_frames=5, guidance_scale=3.0)),
    "wan i2v": ("wan-i2v-tiny", dict(height=32, width=32, num_frames=5, guidance_scale=3.0)),
    "qwen-image": ("qwen-image-tiny", dict(height=64, width=64, negative_prompt="blue", true_cfg_scale=2.0)),
}


def is_sync(message: str) -> bool:
    """A sync-debug warning about a synchronizing call (not torch's one-off note that the mode is a prototype)."""
    return "synchronizing" in message and "prototype feature" not in message  # the note also says "synchronizing"


@contextlib.contextmanager
def sync_warnings(found: list[str]):
    """Collect (message at file:line) of every warning raised inside, with CUDA's sync-debug mode on."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if torch.cuda.is_available():
            torch.cuda.set_sync_debug_mode("warn")
        try:
            yield
        finally:
            if torch.cuda.is_available():
                torch.cuda.set_sync_debug_mode("default")
            found.extend(f"{w.message} at {w.filename}:{w.lineno}" for w in caught)


@contextlib.contextmanager
def watched_denoise(found: list[str], schedulers: list[str] | None = None):
    """Run every pipeline's denoise stage in sync-debug mode, collecting (message, innermost repo frame) into
    `found` and the scheduler's class name into `schedulers`."""
    import pipelines.flux
    import pipelines.qwen_image
    import pipelines.wan

    mods = (pipelines.flux, pipelines.qwen_image, pipelines.wan)
    original = {m: m.denoise for m in mods}

    def watched(*args, **kwargs):
        if schedulers is not None:
            schedulers.append(type(args[1] if len(args) > 1 else kwargs["scheduler"]).__name__)
        with sync_warnings(found):
            return original[mods[0]](*args, **kwargs)

    for m in mods:
        m.denoise = watched
    try:
        yield
    finally:
        for m, fn in original.items():
            m.denoise = fn


WAN_480P_LATENT = (1, 16, 21, 60, 104)  # 480 x 832, 81 frames through the Wan VAE (4x temporal, 8x spatial)


def unipc_steps(device: torch.device, shape: tuple[int, ...] = WAN_480P_LATENT, steps: int = 40) -> dict:
    """Ours and diffusers' UniPC on `device` over the same bf16 velocities (the scheduler alone, no model): syncs
    per loop, ms per step, ours' largest relative error against diffusers' over the steps."""
    from diffusers import UniPCMultistepScheduler

    from gen.schedulers.unipc import UniPCScheduler

    config = json.loads((ROOT / "assets" / "wan-i2v-tiny" / "scheduler" / "scheduler_config.json").read_text())
    g = torch.Generator(device).manual_seed(0)
    x_init = torch.randn(shape, generator=g, device=device)
    vs = [torch.randn(shape, generator=g, device=device, dtype=torch.bfloat16) for _ in range(steps)]

    def loop(scheduler, outputs: list | None = None) -> torch.Tensor:
        scheduler.set_timesteps(steps, device=device)
        scheduler.set_begin_index(0)
        x = x_init
        for v, t in zip(vs, scheduler.timesteps):
            x = scheduler.step(v, t, x, return_dict=False)[0]
            if outputs is not None:
                outputs.append(x)
        return x

    rows, outputs = {}, {}
    for name, cls in (("ours", UniPCScheduler), ("diffusers", UniPCMultistepScheduler)):
        scheduler = cls.from_config(config)
        loop(scheduler)  # warm-up
        found: list[str] = []
        with sync_warnings(found):
            loop(scheduler)
        _sync()
        t0 = time.perf_counter()
        loop(scheduler)
        _sync()
        ms = (time.perf_counter() - t0) * 1e3 / steps
        outputs[name] = []
        loop(scheduler, outputs[name])
        syncs = [f for f in found if is_sync(f)]
        rows[name] = {"class": cls.__name__, "syncs": len(syncs), "syncs_per_step": len(syncs) / steps,
                      "ms_per_step": ms, "where": sorted(set(syncs))[:10]}
    err = max(((a - b).norm() / b.norm()).item() for a, b in zip(outputs["ours"], outputs["diffusers"]))
    return {"shape": list(shape), "steps": steps, "max_rel_err": err, **rows}


def main(argv: list[str] | None = None) -> dict:
    from PIL import Image

    from gen import Generator
    from gen.device import resolve_device

    p = argparse.ArgumentParser()
    p.add_argument("--out", help="JSON results (default: $OUT/sync_check.json when $OUT is set)")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--tiny", action="store_true", help="a small latent for the scheduler comparison (CPU test)")
    p.add_argument("--no-pipelines", action="store_true", help="only the scheduler comparison")
    args = p.parse_args(argv)
    image = Image.new("RGB", (32, 32), (200, 30, 30))
    results = {"env": environment(), "pipelines": {}}
    for name, (folder, kw) in ({} if args.no_pipelines else CASES).items():
        gen = Generator.from_pretrained(ROOT / "assets" / folder)  # the accelerator when there is one
        if "i2v" in name:
            kw = {**kw, "images": [image]}
        gen.generate("a red circle", seed=1, num_inference_steps=args.steps, **kw)  # warm-up
        found: list[str] = []
        schedulers: list[str] = []
        try:
            with watched_denoise(found, schedulers):
                gen.generate("a red circle", seed=2, num_inference_steps=args.steps, **kw)
        except RuntimeError:
            found.append("synchronizing call raised: " + traceback.format_exc(limit=3))
        syncs = [f for f in found if is_sync(f)]
        results["pipelines"][name] = {"syncs": len(syncs), "steps": args.steps, "scheduler": sorted(set(schedulers)),
                                      "where": sorted(set(syncs))[:10], "other_warnings": len(found) - len(syncs)}
        print(name, results["pipelines"][name], flush=True)
        del gen
    results["unipc_step"] = unipc_steps(resolve_device(None), (1, 4, 3, 6, 8) if args.tiny else WAN_480P_LATENT)
    print(results["unipc_step"], flush=True)
    save_result(args.out, "sync_check.json", results)
    print("| pipeline | scheduler | host-device syncs in the denoise loop |\n|---|---|---|")
    for name, r in results["pipelines"].items():
        print(f"| {name} ({r['steps']} steps, CFG) | {', '.join(r['scheduler'])} | {r['syncs']} |")
    u = results["unipc_step"]
    print(f"\nUniPC alone, latent {tuple(u['shape'])}, {u['steps']} steps (ours vs diffusers: max rel err "
          f"{u['max_rel_err']:.2e})\n| scheduler | syncs per step | ms per step |\n|---|---|---|")
    for name in ("ours", "diffusers"):
        print(f"| {u[name]['class']} | {u[name]['syncs_per_step']:g} | {u[name]['ms_per_step']:.3f} |")
    return results


if __name__ == "__main__":
    main()
