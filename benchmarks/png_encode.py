"""Output encoding on this host's CPU: PIL's PNG encoder (one core, zlib level 4 as gen wrote before) against
gen/png.py (the same filters and deflate settings, rows in bands over threads), on photo-like and noise images at
the sizes gen outputs; sizes and times. Also the decode stage's tensor -> uint8 conversion (stages/decode.py) on the
device against diffusers' numpy path.

    python benchmarks/png_encode.py --out benchmarks/results/png_encode_HOST.json
"""
from __future__ import annotations

import argparse
import io
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from gen.png import encode_png  # noqa: E402


def photo_like(h: int, w: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    img = np.stack([128 + 100 * np.sin(x / 37 + y / 53), 128 + 90 * np.cos(x / 91) * np.sin(y / 17),
                    255 * (x + y) / (h + w)], -1)
    return (img + rng.normal(0, 4, img.shape)).clip(0, 255).astype(np.uint8)


def best_of(fn, n: int = 5) -> float:
    times = []
    for _ in range(n):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    rows = []
    for h, w in ((1024, 1024), (1328, 1328), (480, 832)):
        for kind, pixels in (("photo-like", photo_like(h, w)),
                             ("noise", np.random.default_rng(1).integers(0, 256, (h, w, 3), dtype=np.uint8))):
            image = Image.fromarray(pixels)
            buf = io.BytesIO()
            image.save(buf, format="PNG", compress_level=4)
            pil_s = best_of(lambda: image.save(io.BytesIO(), format="PNG", compress_level=4))
            ours = encode_png(pixels)
            ours_s = best_of(lambda: encode_png(pixels))
            rows.append({"size": f"{w}x{h}", "image": kind, "pil_s": pil_s, "ours_s": ours_s,
                         "speedup": pil_s / ours_s, "pil_bytes": len(buf.getvalue()), "ours_bytes": len(ours)})
    result = {"cpus": os.cpu_count(), "rows": rows}
    try:
        import torch

        if torch.cuda.is_available():
            from stages.decode import to_pil

            dev = torch.device("cuda")
            for name, shape in (("1024^2 image", (1, 3, 1024, 1024)), ("Wan 81 x 480 x 832", (81, 3, 480, 832))):
                x = torch.rand(shape, device=dev, dtype=torch.bfloat16) * 2 - 1

                def numpy_path():
                    a = (x.float() / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy()
                    return [Image.fromarray((im * 255).round().astype(np.uint8)) for im in a]

                def device_path():
                    return to_pil(x)

                torch.cuda.synchronize()
                rows.append({"size": name, "image": "to_pil", "numpy_s": best_of(numpy_path, 3),
                             "device_s": best_of(device_path, 3)})
    except ImportError:
        pass
    text = json.dumps(result, indent=1)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
    print(f"{'size':>20} {'image':>10} {'PIL s':>8} {'ours s':>8} {'x':>6} {'bytes ours/PIL':>14}")
    for r in rows:
        if "pil_s" in r:
            print(f"{r['size']:>20} {r['image']:>10} {r['pil_s']:8.4f} {r['ours_s']:8.4f} {r['speedup']:6.2f} "
                  f"{r['ours_bytes'] / r['pil_bytes']:14.4f}")
        else:
            print(f"{r['size']:>20} {r['image']:>10} numpy {r['numpy_s']:.4f} s  device {r['device_s']:.4f} s")
    print(f"cpus {result['cpus']}")


if __name__ == "__main__":
    main()
