"""Side by side, the longest kernels of ours and of diffusers compiled from a `dit_step.py --profile --top-kernels N`
result file: where one spends GPU time the other does not (by kernel kind, then by kernel).

    python benchmarks/kernel_diff.py dit_qwen_kernels_h200.json [--kinds "fused elementwise"]
"""
from __future__ import annotations

import argparse
import json


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("result")
    ap.add_argument("--kinds", nargs="*", help="only these kernel kinds (default: all)")
    args = ap.parse_args()
    data = json.load(open(args.result))
    for row in data["rows"]:
        print(f"== {row['model']} ({row['tokens']} tokens)")
        for who in ("ours", "diffusers_compiled"):
            kinds = row.get(f"kernels_{who}", {})
            print(f"{who:20}", " ".join(f"{k}={v:.1f}" for k, v in kinds.items()))
        for who in ("ours", "diffusers_compiled"):
            print(f"-- {who}: longest kernels (ms per call, launches per call)")
            for k in row.get(f"top_kernels_{who}", []):
                if args.kinds and k["kind"] not in args.kinds:
                    continue
                print(f"{k['ms']:8.2f} {k['calls']:6.0f}  {k['kind'][:18]:18} {k['name'][:90]}")


if __name__ == "__main__":
    main()
