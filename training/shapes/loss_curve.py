"""Draw the training log (train.py's log.json) as a loss-curve PNG, with PIL only (no plotting library).

    python -m training.shapes.loss_curve docs/shapes/training-log.json docs/shapes/loss-curve.png
"""
from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from PIL import Image, ImageDraw

W, H, PAD = 900, 420, 60


def _panel(draw: ImageDraw.ImageDraw, box, points, title: str, color, breaks=()) -> None:
    """A log-scale y panel of (x, y) points inside box = (x0, y0, x1, y1)."""
    x0, y0, x1, y1 = box
    draw.rectangle(box, outline=(0, 0, 0))
    draw.text((x0, y0 - 16), title, fill=(0, 0, 0))
    xs, ys = [p[0] for p in points], [math.log10(p[1]) for p in points]
    xmin, xmax = min(xs), max(xs) or 1
    ymin, ymax = math.floor(min(ys) * 2) / 2, math.ceil(max(ys) * 2) / 2
    fx = lambda x: x0 + (x - xmin) / max(xmax - xmin, 1) * (x1 - x0)  # noqa: E731
    fy = lambda y: y1 - (y - ymin) / max(ymax - ymin, 1e-9) * (y1 - y0)  # noqa: E731
    tick = ymin
    while tick <= ymax + 1e-9:
        draw.line([(x0, fy(tick)), (x1, fy(tick))], fill=(225, 225, 225))
        draw.text((x0 - 50, fy(tick) - 6), f"{10 ** tick:.3g}", fill=(0, 0, 0))
        tick += 0.5
    for b in breaks:  # where a training call resumed
        draw.line([(fx(b), y0), (fx(b), y1)], fill=(200, 200, 255))
    draw.line([(fx(x), fy(y)) for x, y in zip(xs, ys)], fill=color, width=2)
    draw.text((x0, y1 + 6), f"step {xmin:.0f}", fill=(0, 0, 0))
    draw.text((x1 - 70, y1 + 6), f"step {xmax:.0f}", fill=(0, 0, 0))


def draw(log: list[dict]) -> Image.Image:
    vae = [(h["step"], h["l1"]) for h in log if h.get("stage") == "vae"]
    dit = [(h["step"], h["loss"]) for h in log if h.get("stage") == "dit" and h.get("loss") and not h.get("end_of_run")]
    breaks = [h["step"] for h in log if h.get("end_of_run")][:-1]
    img = Image.new("RGB", (W, H), "white")
    d = ImageDraw.Draw(img)
    half = W // 2
    _panel(d, (PAD, 40, half - 20, H - 40), vae, "VAE reconstruction L1 (log scale)", (200, 60, 40))
    _panel(d, (half + PAD, 40, W - 20, H - 40), dit, "DiT flow-matching MSE (log scale; blue: resumed calls)",
           (40, 90, 200), breaks)
    return img


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("log", type=Path)
    ap.add_argument("png", type=Path)
    args = ap.parse_args()
    draw(json.loads(args.log.read_text())).save(args.png)


if __name__ == "__main__":
    main()
