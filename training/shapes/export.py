"""Write the trained gen-shapes checkpoint (a train or finetune call's --out folder) as assets/gen-shapes in the
diffusers layout: fp16 weights, transformer sharded under 8 MB a file, the VAE's scaling/shift factors from training,
and the model's prompt guide (training/shapes/guide.py; with the augmented vocabulary when run.json says so).

    python -m training.shapes.export .shapes/run3 [--to assets/gen-shapes]
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from assets.builders.shapes import init_kwargs, write_folder
from training.shapes import configs, guide
from training.shapes.train import load_dit

ASSETS = Path(__file__).resolve().parents[2] / "assets"


def export(run_dir: Path, out_dir: Path) -> Path:
    from diffusers import AutoencoderKL, QwenImageTransformer2DModel

    stats = json.loads((run_dir / "vae_stats.json").read_text())
    dit = QwenImageTransformer2DModel(**init_kwargs(configs.TRANSFORMER))
    dit.load_state_dict(load_dit(run_dir))
    vae = AutoencoderKL(**dict(init_kwargs(configs.VAE), scaling_factor=stats["scaling_factor"],
                               shift_factor=stats["shift_factor"]))
    vae.load_state_dict(load_file(str(run_dir / "vae.safetensors")))
    out = write_folder(out_dir, dit.to(torch.float16).eval(), vae.to(torch.float16).eval())
    run = json.loads((run_dir / "run.json").read_text()) if (run_dir / "run.json").is_file() else {}
    guide.write(out, augmented=bool(run.get("augmented")))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run_dir", type=Path)
    ap.add_argument("--to", type=Path, default=ASSETS / configs.MODEL_DIR)
    args = ap.parse_args()
    out = export(args.run_dir, args.to)
    total = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    print(f"wrote {out}: {total / 1e6:.1f} MB")


if __name__ == "__main__":
    main()
