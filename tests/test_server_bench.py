"""The server-level batching benchmark's CPU path (benchmarks/serve_batching.py --tiny): a real `gen serve` app in
this process, clients over HTTP, --max-batch 1 vs N."""
from __future__ import annotations

import json

import pytest

pytest.importorskip("fastapi")


def test_serve_batching_benchmark_runs_on_cpu(tmp_path, capsys):
    from benchmarks.serve_batching import main

    out = tmp_path / "result.json"
    result = main(["--tiny", "--clients", "1", "3", "--per-client", "1", "--max-batch", "3", "--batch-wait-ms", "50",
                   "--out", str(out)])
    rows = {(r["clients"], r["max_batch"]): r for r in result["rows"]}
    assert set(rows) == {(1, 1), (3, 1), (1, 3), (3, 3)}
    assert rows[3, 3]["requests"] == 3 and rows[3, 3]["batch_stats"]["batched_calls"] > 0  # batched over HTTP
    assert "batch_stats" not in rows[3, 1]
    assert all(r["p95_s"] >= r["p50_s"] > 0 for r in result["rows"])
    assert json.loads(out.read_text())["rows"] == result["rows"]
    assert "| tiny | 64x64, 2 steps | 3 | 3 |" in capsys.readouterr().out
