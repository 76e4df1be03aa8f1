"""Step caching (gen/transforms/step_cache.py) on the trained default model: what it skips, what it saves, what it changes.

Runs the embedded gen-shapes model (Generator.from_pretrained() with no path) on prompts of the shapes world's
evaluation set (training/shapes/world.eval_prompts; seed = row index, 128x128, 20 steps, as training/shapes/eval_model),
exactly and with the step cache at each threshold (true CFG on, the model's default: two branches a step). For
every prompt the exact and the cached runs are interleaved, so load on the machine falls on all of them alike. Reports per threshold: the fraction of block computations
skipped, the speed-up of the denoising loop and of the whole generation, PSNR and mean absolute difference (0-255)
against the exact image, and the shapes evaluator's accuracy (training/shapes/evaluate.score) next to the exact one.

  OMP_NUM_THREADS=1 python benchmarks/step_cache_quality.py --prompts 16                  # this CPU, ~4 min
  python benchmarks/step_cache_quality.py --device cuda --out step_cache_gen_shapes_gpu.json
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from datetime import date
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from training.shapes import world  # noqa: E402
from training.shapes.evaluate import ATTRIBUTES, score  # noqa: E402
from gen import Generator  # noqa: E402
from gen.transforms.step_cache import apply_step_cache, remove_step_cache, step_cache_stats  # noqa: E402

COLUMNS = ("all",) + ATTRIBUTES


def psnr(a: np.ndarray, b: np.ndarray) -> float | None:
    """PSNR in dB of two uint8 images; None when they are equal."""
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return None if mse == 0 else float(10 * np.log10(255.0**2 / mse))


def eval_rows(n: int) -> list[tuple[str, world.Scene, str]]:
    """n rows of world.eval_prompts: half in-distribution, a quarter held-out, a quarter paraphrased."""
    n_held = n_para = n // 4
    return world.eval_prompts(n_in=n - n_held - n_para, n_heldout=n_held, n_paraphrase=n_para)


def generate(gen: Generator, prompt: str, seed: int, args) -> tuple[np.ndarray, float, float]:
    """(image, denoise seconds, total seconds)."""
    kw = {"true_cfg_scale": args.cfg} if args.cfg is not None else {}
    start = time.perf_counter()
    result = gen.generate(prompt, seed=seed, num_inference_steps=args.steps, height=world.SIZE, width=world.SIZE,
                          **kw)
    total = time.perf_counter() - start
    return np.asarray(result.images[0].convert("RGB")), result.timings["denoise"], total


def run(args) -> dict:
    gen = Generator.from_pretrained(device=args.device)
    rows = eval_rows(args.prompts)
    thresholds = [float(t) for t in args.thresholds.split(",")]
    configs = [None] + thresholds
    generate(gen, rows[0][2], 0, args)  # warm-up
    per = {c: [] for c in configs}  # config -> per-prompt records
    for i, (split, scene, prompt) in enumerate(rows):
        exact = None
        for c in configs:
            if c is not None:
                apply_step_cache(gen.pipeline, c)
            try:
                image, denoise_s, total_s = generate(gen, prompt, i, args)
                stats = step_cache_stats(gen.pipeline)
            finally:
                remove_step_cache(gen.pipeline)
            if c is None:
                exact = image
            per[c].append({"index": i, "split": split, "prompt": prompt, "denoise_s": denoise_s,
                           "total_s": total_s, "skipped_block_fraction": stats["skipped_block_fraction"],
                           "psnr": psnr(image, exact), "mad": float(np.abs(image.astype(np.float64) - exact).mean()),
                           "score": score(scene, image)})
        print(f"{i + 1}/{len(rows)} {prompt!r}", file=sys.stderr, flush=True)
    base = per[None]
    summary = []
    for c in configs:
        recs = per[c]
        finite = [r["psnr"] for r in recs if r["psnr"] is not None]
        summary.append({
            "threshold": c,
            "skipped_block_fraction": statistics.mean(r["skipped_block_fraction"] for r in recs),
            "denoise_s": sum(r["denoise_s"] for r in recs),
            "total_s": sum(r["total_s"] for r in recs),
            "denoise_speedup": sum(r["denoise_s"] for r in base) / sum(r["denoise_s"] for r in recs),
            "total_speedup": sum(r["total_s"] for r in base) / sum(r["total_s"] for r in recs),
            "psnr_mean": statistics.mean(finite) if finite else None,  # over the images that differ
            "psnr_min": min(finite) if finite else None,
            "identical_images": len(recs) - len(finite),
            "mad_mean": statistics.mean(r["mad"] for r in recs),
            "accuracy": {k: statistics.mean(r["score"][k] for r in recs) for k in COLUMNS},
            "same_verdict_as_exact": statistics.mean(r["score"]["all"] == b["score"]["all"]
                                                     for r, b in zip(recs, base)),
        })
    env = {"date": date.today().isoformat(), "device": str(gen.pipeline.device), "machine": platform.machine(),
           "cpus": os.cpu_count(), "torch": torch.__version__, "threads": torch.get_num_threads()}
    settings = {"model": str(gen.model_path.relative_to(ROOT)) if gen.model_path.is_relative_to(ROOT)
                else str(gen.model_path), "prompts": len(rows), "steps": args.steps, "size": world.SIZE,
                "true_cfg_scale": args.cfg if args.cfg is not None else gen.defaults.true_cfg_scale,
                "cfg_branches": 2 if (args.cfg is None or args.cfg > 1) else 1, "thresholds": thresholds}
    return {"env": env, "settings": settings, "summary": summary,
            "rows": {("exact" if c is None else str(c)): per[c] for c in configs}}


def table(summary: list[dict]) -> str:
    head = ["threshold", "blocks skipped", "denoise speed-up", "total speed-up", "PSNR mean / min (dB)", "identical",
            "mean abs diff", "accuracy all", "color", "shape", "position", "size", "same verdict"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for s in summary:
        a = s["accuracy"]
        psnr_cell = "identical" if s["psnr_mean"] is None else f"{s['psnr_mean']:.1f} / {s['psnr_min']:.1f}"
        lines.append("| " + " | ".join([
            "exact" if s["threshold"] is None else f"{s['threshold']:g}", f"{s['skipped_block_fraction']:.0%}",
            f"{s['denoise_speedup']:.2f}x", f"{s['total_speedup']:.2f}x", psnr_cell, str(s["identical_images"]),
            f"{s['mad_mean']:.2f}",
            f"{a['all']:.0%}", f"{a['color']:.0%}", f"{a['shape']:.0%}", f"{a['position']:.0%}", f"{a['size']:.0%}",
            f"{s['same_verdict_as_exact']:.0%}"]) + " |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--prompts", type=int, default=16, help="rows of the shapes eval set (default 16)")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--thresholds", default="0.05,0.08,0.1,0.15,0.2,0.3")
    p.add_argument("--cfg", type=float, help="true CFG scale against the empty prompt (default: the model's, 4; "
                                             "1 turns CFG off)")
    p.add_argument("--device", help="default: the accelerator if present")
    p.add_argument("--out", default=str(ROOT / "benchmarks/results/step_cache_gen_shapes_cpu.json"))
    args = p.parse_args()
    result = run(args)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(json.dumps(result["env"]))
    print(json.dumps(result["settings"]))
    print(table(result["summary"]))


if __name__ == "__main__":
    main()
