"""Masked vs unmasked attention at the CFG-batched Qwen-Image shapes (prompt and negative prompt padded to one
length, keys masked): what one batched forward pays for the mask, against two unmasked calls at their own lengths.

  python benchmarks/masked_attention.py        # GPU, a few seconds
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import time_ms  # noqa: E402
from gen.models import attention as A  # noqa: E402


def main() -> None:
    device, dtype = torch.accelerator.current_accelerator(), torch.bfloat16
    print("| image tokens | text (prompt, negative) | backend | batched + mask ms | two unmasked calls ms |")
    print("|---|---|---|---|---|")
    for img, texts in ((4096, (60, 6)), (6889, (60, 6))):
        lt = max(texts)
        q, k, v = (torch.randn(2, lt + img, 24, 128, device=device, dtype=dtype) for _ in range(3))
        mask = torch.ones(2, lt + img, dtype=torch.bool, device=device)
        mask[1, texts[1]:lt] = False
        singles = [tuple(t[i:i + 1, lt - n:] for t in (q, k, v)) for i, n in enumerate(texts)]
        for name in ("cudnn", "flash", "efficient"):
            fn = A.BACKENDS[name]
            masked = time_ms(lambda: fn(q, k, v, mask), iters=10)
            two = time_ms(lambda: [fn(*s, None) for s in singles], iters=10)
            print(f"| {img} | {texts} | {name} | {masked:.3f} | {two:.3f} |")


if __name__ == "__main__":
    main()
