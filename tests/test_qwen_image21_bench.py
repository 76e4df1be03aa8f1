"""The Qwen-Image 2.1-sized entry of benchmarks/dit_step.py, on its tiny config on CPU: ours and diffusers' class on
the same weights, each fed a steady-state step (ours: the target tokens against encode_prefix's keys and values;
diffusers: its cached step after the prefill call), outputs equal, FLOPs counted."""
from __future__ import annotations

import argparse

import torch


def test_dit_step_qwen21_tiny_runs_on_cpu():
    from benchmarks.dit_step import bench_model, build, call_ours, call_reference

    ref, ours, inputs, tokens = build("qwen21", True, torch.device("cpu"), torch.float32)
    assert inputs["hidden_states"].shape == (1, 16, 8) and tokens == 16 + 16
    with torch.no_grad():
        a, b = call_reference("qwen21", ref, inputs), call_ours("qwen21", ours, inputs)
    assert a.shape == b.shape == (1, 16, 8) and ((a - b).norm() / a.norm()).item() <= 1e-5

    args = argparse.Namespace(tiny=True, no_compile=True, skip_diffusers_compile=True, no_join=False, iters=1,
                              ours_mode=None, profile=False, cuda_graphs=False)
    row = bench_model("qwen21", args, torch.device("cpu"), torch.float32)
    assert row["rel_err_vs_diffusers"] <= 1e-5 and row["rel_err_ours_vs_diffusers_eager"] <= 1e-5
    assert row["joined_groups"] == 2 and row["flop"] > 0
    assert {"diffusers_eager_ms", "ours_eager_ms", "ours_joined_ms", "ours_tflops"} <= row.keys()
