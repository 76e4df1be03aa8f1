"""benchmarks/lora_step.py runs on the CPU (--tiny): every variant timed, switching compiles no graph."""
from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.lora_step import main  # noqa: E402


def test_lora_step_benchmark_runs_on_cpu(tmp_path, capsys):
    out = tmp_path / "lora.json"
    result = main(["--tiny", "--ranks", "2,4", "--out", str(out)])
    assert set(result["ours"]) == {"ours compiled, no LoRA", "ours compiled, fused rank 4",
                                   "ours compiled, unfused rank 2", "ours compiled, unfused rank 4"}
    assert result["recompiles_while_switching"] == 0 and result["switch_ms"] > 0
    assert len(result["diffusers"]) == 3 and json.loads(out.read_text())["tokens"] == result["tokens"]
    assert "| ours compiled, unfused rank 4 |" in capsys.readouterr().out
