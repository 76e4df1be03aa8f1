"""benchmarks/lora_step.py, lora_variants.py and lora_layouts.py run on the CPU (--tiny): every variant timed and
computing the same function, switching compiles no graph."""
from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.lora_step import main  # noqa: E402


def test_lora_step_benchmark_runs_on_cpu(tmp_path, capsys):
    out = tmp_path / "lora.json"
    result = main(["--tiny", "--ranks", "2,4", "--interleave", "2", "--ab", "--out", str(out)])
    assert set(result["ours"]) == {"ours compiled, no LoRA", "ours compiled, fused rank 4",
                                   "ours compiled, no LoRA again (the spread between runs)",
                                   *(f"ours compiled, unfused rank {r} ({layout})" for r in (2, 4)
                                     for layout in ("wide", "separate ups")),
                                   *(f"ours compiled, unfused rank 4 (wide, {v})"
                                     for v in ("input concatenated", "as shipped, again"))}
    assert all(e <= 1e-5 for e in result["wide_vs_separate_rel_err"].values())  # the same function (fp32 here)
    assert result["recompiles_while_switching"] == 0 and result["switch_ms"] > 0
    assert len(result["diffusers"]) == 3 and json.loads(out.read_text())["tokens"] == result["tokens"]
    assert len(result["interleaved"]["rounds"]) == 2 and result["interleaved"]["median_ratio"] > 0
    assert "| ours compiled, unfused rank 4 (wide) |" in capsys.readouterr().out


def test_lora_variants_benchmark_runs_on_cpu(tmp_path, capsys):
    """Every way of adding the LoRA computes the same as the reference (fp32: rel err <= 1e-5), compiled and eager."""
    from benchmarks.lora_variants import JOINED_VARIANTS, VARIANTS, main as variants

    out = tmp_path / "variants.json"
    result = variants(["--tiny", "--ranks", "4", "--out", str(out)])
    assert result["all_agree"]
    assert {(r["case"], r["mode"]) for r in result["rows"]} == {
        (c, m) for c in ("32->32", "32->128", "128->32", "qkv", "qkv+mlp") for m in ("compiled", "eager")}
    for r in result["rows"]:
        want = set(JOINED_VARIANTS if r["case"].startswith("qkv") else VARIANTS) - (
            {"inplace"} if r["mode"] == "compiled" else set())
        assert {v for v in JOINED_VARIANTS if v in r} == want and all(r[v]["rel_err"] <= 1e-5 for v in want)
    assert json.loads(out.read_text())["tokens"] == 64
    assert "| qkv+mlp | 4 | compiled |" in capsys.readouterr().out


def test_lora_layouts_benchmark_runs_on_cpu(tmp_path):
    """The group layouts compute the LoRA'd layer (fp32 reference: rel err <= 1e-5), and split-K downs the plain ones."""
    from benchmarks.lora_layouts import main as layouts

    result = layouts(["--tiny", "--out", str(tmp_path / "layouts.json")])
    assert len(result["downs"]) == 7 and all(d[f"split{p}_rel_err"] <= 1e-5 for d in result["downs"].values()
                                             for p in (2, 4, 8))
    for case in result["groups"].values():
        assert all(case[v]["rel_err_vs_fp32"] <= 1e-5 for v in ("wide, one GEMM", "split, two GEMMs"))


def test_lora_step_refuses_compile_options_that_are_not_a_json_object(capsys):
    import pytest

    for bad, said in (("{max_autotune: 1}", "is not JSON"), ("[1]", "must be a JSON object")):
        with pytest.raises(SystemExit) as info:
            main(["--tiny", "--compile-options", bad])
        assert info.value.code == 2 and said in capsys.readouterr().err
