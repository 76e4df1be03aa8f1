"""Host-device syncs inside the denoising loop of each pipeline, found with torch's CUDA sync debug mode.

Loads the tiny test models (assets/) on the GPU, runs one generation to warm up, then runs another with
`torch.cuda.set_sync_debug_mode("warn")` switched on (CUDA; elsewhere only the plumbing runs) for the denoise
stage only (text encoding and decoding must sync: they hand results to the host). Every synchronizing call in the
step loop (a `.item()`, a device tensor in an `if`, a blocking copy) shows up as a warning; the script prints their
count and where they came from.

  python benchmarks/sync_check.py --out sync.json          # on the GPU machine
"""
from __future__ import annotations

import argparse
import contextlib
import sys
import traceback
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks.common import write_json  # noqa: E402

CASES = {  # asset folder, request keywords (CFG on, so both branches run)
    "flux": ("flux-tiny", dict(height=64, width=64, negative_prompt="blue", true_cfg_scale=2.0)),
    "wan2.2 (two experts)": ("wan22-a14b-tiny", dict(height=32, width=32, num_frames=5, guidance_scale=3.0)),
    "wan i2v": ("wan-i2v-tiny", dict(height=32, width=32, num_frames=5, guidance_scale=3.0)),
    "qwen-image": ("qwen-image-tiny", dict(height=64, width=64, negative_prompt="blue", true_cfg_scale=2.0)),
}


@contextlib.contextmanager
def watched_denoise(found: list[str]):
    """Run every pipeline's denoise stage in sync-debug mode, collecting (message, innermost repo frame)."""
    import pipelines.flux
    import pipelines.qwen_image
    import pipelines.wan

    mods = (pipelines.flux, pipelines.qwen_image, pipelines.wan)
    original = {m: m.denoise for m in mods}

    def watched(*args, **kwargs):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            if torch.cuda.is_available():
                torch.cuda.set_sync_debug_mode("warn")
            try:
                return original[mods[0]](*args, **kwargs)
            finally:
                if torch.cuda.is_available():
                    torch.cuda.set_sync_debug_mode("default")
                for w in caught:
                    found.append(f"{w.message} at {w.filename}:{w.lineno}")

    for m in mods:
        m.denoise = watched
    try:
        yield
    finally:
        for m, fn in original.items():
            m.denoise = fn


def main() -> None:
    from PIL import Image

    from gen import Generator

    p = argparse.ArgumentParser()
    p.add_argument("--out", default="sync_check.json")
    p.add_argument("--steps", type=int, default=4)
    args = p.parse_args()
    image = Image.new("RGB", (32, 32), (200, 30, 30))
    results = {}
    for name, (folder, kw) in CASES.items():
        gen = Generator.from_pretrained(ROOT / "assets" / folder)  # the accelerator when there is one
        if "i2v" in name:
            kw = {**kw, "images": [image]}
        gen.generate("a red circle", seed=1, num_inference_steps=args.steps, **kw)  # warm-up
        found: list[str] = []
        try:
            with watched_denoise(found):
                gen.generate("a red circle", seed=2, num_inference_steps=args.steps, **kw)
        except RuntimeError:
            found.append(traceback.format_exc(limit=3))
        results[name] = {"syncs": len(found), "steps": args.steps, "where": sorted(set(found))[:10]}
        print(name, results[name], flush=True)
        del gen
    write_json(args.out, results)
    print("| pipeline | host-device syncs in the denoise loop |\n|---|---|")
    for name, r in results.items():
        print(f"| {name} ({r['steps']} steps, CFG) | {r['syncs']} |")


if __name__ == "__main__":
    main()
