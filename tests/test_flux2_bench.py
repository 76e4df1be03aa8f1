"""The FLUX.2 benchmarks on their tiny configs on CPU: the [dev]-sized entry of benchmarks/dit_step.py (ours and
diffusers' class on the same weights, outputs equal, FLOPs counted) and benchmarks/flux2_encoder.py (our LLM runtime's
encoding of a padded prompt vs transformers' forward, same weights)."""
from __future__ import annotations

import argparse

import torch


def test_dit_step_flux2_tiny_runs_on_cpu():
    from benchmarks.dit_step import bench_model, build, call_reference

    ref, ours, inputs, tokens = build("flux2", True, torch.device("cpu"), torch.float32)
    assert inputs["hidden_states"].shape == (1, 16, 16) and tokens == 16 + 16
    with torch.no_grad():
        a, b = call_reference("flux2", ref, inputs), ours(**inputs)
    assert a.shape == b.shape and ((a - b).norm() / a.norm()).item() <= 1e-5

    args = argparse.Namespace(tiny=True, no_compile=True, skip_diffusers_compile=True, no_join=False, iters=1,
                              ours_mode=None, profile=False, cuda_graphs=False)
    row = bench_model("flux2", args, torch.device("cpu"), torch.float32)
    assert row["rel_err_vs_diffusers"] <= 1e-5 and row["rel_err_ours_vs_diffusers_eager"] <= 1e-5
    assert row["joined_groups"] == 2 and row["flop"] > 0
    assert {"diffusers_eager_ms", "ours_eager_ms", "ours_joined_ms", "ours_tflops"} <= row.keys()


def test_flux2_encoder_benchmark_tiny_runs_on_cpu(tmp_path, monkeypatch):
    from benchmarks.flux2_encoder import main

    monkeypatch.setenv("OUT", str(tmp_path))
    result = main(["--tiny", "--batches", "2", "--real-tokens", "40"])
    rows = {r["batch"]: r for r in result["rows"]}
    assert set(rows) == {2} and all(r["padded_to"] == 512 and r["real_tokens"] == 40 for r in rows.values())
    for r in rows.values():  # fp32 on the CPU: our runtime's embeddings are transformers' (layers 10, 20, 30)
        assert r["rel_err_ours_vs_transformers"] <= 1e-5
        assert r["ours_ms"] > 0 and r["transformers_ms"] > 0 and 0 < r["flop_ours"] < r["flop_transformers"]
    assert (tmp_path / "flux2_encoder.json").is_file()
