"""benchmarks/offload.py on the CPU: its tiny path runs every variant it can without an accelerator, its real-size
builders give the real models' parameter counts (built on the meta device: no memory), its Q8_0 encoder is GGUF's."""
from __future__ import annotations

import numpy as np
import torch

from benchmarks.offload import build, main, q8_0


def test_tiny_run_covers_the_variants():
    result = main(["--tiny", "--models", "flux", "--quant", "q8"])
    rows = {r["variant"]: r for r in result["rows"]}
    assert set(rows) == {"resident", "ours", "ours-layer", "ours-q8", "diffusers-resident"}
    assert all(r["status"] == "ok" for r in rows.values()), rows
    assert rows["resident"]["mode"] == "none" and rows["ours"]["mode"] == "model"
    assert rows["ours-layer"]["mode"] == "layer" and rows["ours-layer"]["moved_gb"] > 0
    assert all(r["ttfi_s"] > 0 and r["step_s"] > 0 for r in rows.values())


def test_real_size_builders_on_meta():
    counts = {}
    for model in ("flux", "wan", "qwen"):
        for ours in (True, False):
            modules = build(model, False, ours, torch.device("meta"), torch.bfloat16)
            counts[model, ours] = {slot: round(sum(p.numel() for p in m.parameters()) / 1e9, 2)
                                   for slot, m in modules.items() if isinstance(m, torch.nn.Module)}
    assert counts["flux", True] == counts["flux", False] == {"text_encoder": 0.12, "text_encoder_2": 4.76,
                                                             "transformer": 11.9, "vae": 0.08}
    assert counts["wan", True] == counts["wan", False] == {"text_encoder": 5.68, "transformer": 14.29, "vae": 0.13}
    assert counts["qwen", True] == counts["qwen", False] == {"text_encoder": 8.29, "transformer": 20.43, "vae": 0.13}


def test_q8_0_encoder_matches_gguf():
    import gguf

    w = torch.randn(8, 256, generator=torch.Generator().manual_seed(0))
    ours = q8_0(w).numpy()
    theirs = gguf.quants.quantize(w.numpy(), gguf.GGMLQuantizationType.Q8_0)
    decoded = gguf.quants.dequantize(ours, gguf.GGMLQuantizationType.Q8_0)
    assert ours.shape == theirs.shape and np.abs(decoded - w.numpy()).max() <= w.abs().max().item() / 254 + 1e-6
    assert (ours != theirs).mean() < 0.01  # the same bytes but for rounding ties
