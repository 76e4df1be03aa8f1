"""What the adaLN modulation linears cost per denoising step at batch 1 (GEMV: every weight read once a step) and
what one GEMM over all steps' time embeddings would cost instead (the weights read once a generation): FLUX.1-dev
(19 double blocks x 2 x (3072 -> 18432), 38 single x (3072 -> 9216), norm_out 3072 -> 6144) and Qwen-Image (60 x 2 x
(3072 -> 18432), rows = 2 with batched CFG). bf16, CUDA events over 20 repeats.

    python benchmarks/modulation_gemv.py
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

MODELS = {
    "FLUX.1-dev": ([(3072, 18432)] * 38 + [(3072, 9216)] * 38 + [(3072, 6144)], 1),
    "Qwen-Image": ([(3072, 18432)] * 120 + [(3072, 6144)], 2),
}


def timed(fn, reps: int = 20) -> float:
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / reps


def main() -> None:
    dev, dt = torch.device("cuda"), torch.bfloat16
    print(f"{'model':>12} {'GB':>6} {'per step ms':>12} {'x50 ms':>8} {'one GEMM, 50 steps ms':>22}")
    for name, (shapes, rows) in MODELS.items():
        weights = [(torch.randn(n, k, device=dev, dtype=dt) * 0.02, torch.zeros(n, device=dev, dtype=dt))
                   for k, n in shapes]
        x1 = torch.randn(rows, 3072, device=dev, dtype=dt)
        x50 = torch.randn(50 * rows, 3072, device=dev, dtype=dt)
        per_step = timed(lambda: [F.linear(x1, w, b) for w, b in weights])
        all_steps = timed(lambda: [F.linear(x50, w, b) for w, b in weights])
        gb = sum(w.numel() for w, _ in weights) * 2 / 1e9
        print(f"{name:>12} {gb:6.2f} {per_step:12.3f} {per_step * 50:8.1f} {all_steps:22.3f}")


if __name__ == "__main__":
    main()
