"""Builds the tiny random-weight checkpoints under assets/ (diffusers layout, real config keys, tiny dims).

Usage: python -m assets.build_assets [family ...]   (families: see BUILDERS; default: all)
Weights are seeded and tokenizers use fixed vocabularies, so a rebuild writes the same files.
"""
from __future__ import annotations

import importlib
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent
BUILDERS = {
    "flux": "assets.builders.flux",
    "flux2": "assets.builders.flux2",
    "wan": "assets.builders.wan",
    "qwen_image": "assets.builders.qwen_image",
    "qwen_image21": "assets.builders.qwen_image21",
    "z_image": "assets.builders.z_image",
    "lora": "assets.builders.lora",  # tiny LoRAs of the FLUX / Wan / Qwen-Image checkpoints above (after them)
}


def main(argv: list[str]) -> int:
    families = argv or list(BUILDERS)
    unknown = [f for f in families if f not in BUILDERS]
    if unknown:
        print(f"unknown families {unknown}; known: {sorted(BUILDERS)}", file=sys.stderr)
        return 2
    for family in families:
        for path in importlib.import_module(BUILDERS[family]).build(ROOT):
            size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
            print(f"{family}: wrote {path.relative_to(ROOT.parent)} ({size / 1e6:.2f} MB)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
