"""Spurious marks in gen-shapes images: the check behind docs/SHAPES.md's blot numbers, kept as a tool.

A "mark" is a pixel more than `LEVEL` levels (of 255, on any channel) off the image's background color (the median
of its border) that lies more than `GAP` pixels away from the object (the largest connected region of such pixels,
which the evaluator reads as the object). Per image: the marked pixel count and the 4 x 4 cells that hold marks.

Three sources are compared on the same one-object scenes (the evaluation's in-distribution prompts, seed = row):
- `generated`: the model's images (20 steps, CFG 4, as `gen generate` makes them);
- `reconstructed`: the VAE's encode-decode of the scene's own render (the decoder alone, on clean latents);
- `renders`: the renders themselves (should be 0: checks the check).
When reconstructions are clean but generated images are not, the DiT writes the outliers the decoder draws.

  python -m training.shapes.marks --model assets/gen-shapes --n 30        # CPU, ~1 minute
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from training.shapes import world
from training.shapes.evaluate import dilate, largest_component

LEVEL = 12
GAP = 3
MIN_PIXELS = 1


def marks(image: np.ndarray) -> tuple[int, list[tuple[int, int]]]:
    """(marked pixels, sorted 4 x 4 cells (row, col) holding any) of an (H, W, 3) uint8 image."""
    img = image.astype(np.int16)
    border = np.concatenate([img[0], img[-1], img[:, 0], img[:, -1]])
    bg = np.median(border, axis=0)
    off = np.abs(img - bg).max(-1) > LEVEL
    if not off.any():
        return 0, []
    obj = dilate(largest_component(off), GAP)
    spots = off & ~obj
    h, w = spots.shape
    cells = sorted({(int(y) * 4 // h, int(x) * 4 // w) for y, x in zip(*np.nonzero(spots))})
    return int(spots.sum()), cells


def summarize(per_image: list[tuple[int, list]]) -> dict:
    counts = [n for n, _ in per_image]
    cells: dict[str, int] = {}
    for _, cs in per_image:
        for c in cs:
            cells[f"{c[0]},{c[1]}"] = cells.get(f"{c[0]},{c[1]}", 0) + 1
    return {"images": len(counts), "with_marks": sum(n >= MIN_PIXELS for n in counts),
            "with_4px_marks": sum(n >= 4 for n in counts), "mean_pixels": float(np.mean(counts)),
            "images_per_cell": dict(sorted(cells.items(), key=lambda kv: -kv[1]))}


def main(argv: list[str] | None = None) -> dict:
    import torch

    from gen import Generator
    from training.shapes.finetune import load_vae
    from training.shapes.train import to_pixels

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="assets/gen-shapes")
    p.add_argument("--n", type=int, default=30)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--out", help="JSON of the summary")
    args = p.parse_args(argv)
    rows = [r for r in world.eval_prompts(n_in=args.n, n_heldout=0, n_paraphrase=0)][:args.n]
    renders = np.stack([world.render(scene, np.random.default_rng(i)) for i, (_, scene, _) in enumerate(rows)])
    vae, _ = load_vae(Path(args.model), torch.device("cpu"))
    with torch.no_grad():
        x = to_pixels(renders, torch.device("cpu"))
        recon = vae.decode(vae.encode(x)[0])
    recon = ((recon.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()
    gen = Generator.from_pretrained(args.model, device="cpu")
    generated = [np.asarray(gen.generate(prompt, seed=i, num_inference_steps=args.steps).images[0].convert("RGB"))
                 for i, (_, _, prompt) in enumerate(rows)]
    result = {name: summarize([marks(im) for im in images])
              for name, images in (("renders", renders), ("reconstructed", recon), ("generated", generated))}
    result["recon_l1"] = float(np.abs(recon.astype(np.float32) - renders.astype(np.float32)).mean() / 127.5)
    print(json.dumps(result, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    return result


if __name__ == "__main__":
    main()
