"""benchmarks/e2e_flux.py: --tiny and --scale-down run on the CPU; the real configs have FLUX.1-dev's sizes."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import pipelines.flux  # noqa: E402
from benchmarks.e2e_flux import REAL, STAGES, build_modules, check_vocab, main, param_counts  # noqa: E402
from pipelines.base import Timings  # noqa: E402


@pytest.mark.parametrize("mode", ["--tiny", "--scale-down"])
def test_cpu_modes_report_every_stage(mode, tmp_path, capsys):
    out = tmp_path / "e2e.json"
    result = main([mode, "--runs", "2", "--out", str(out)])
    assert json.loads(out.read_text())["median_s"] == result["median_s"]
    assert pipelines.flux.Timings is Timings  # the synced Timings is put back
    assert result["env"]["mode"] == mode.removeprefix("--")
    assert result["request"] == {"prompt": result["request"]["prompt"], "steps": 2, "height": 64, "width": 64,
                                 "guidance_scale": 3.5, "seed": 0}
    assert len(result["runs"]) == 2
    for run in [result["warmup"], *result["runs"]]:
        assert set(STAGES) <= run.keys() and all(run[s] >= 0 for s in STAGES)
        assert sum(run[s] for s in STAGES) <= run["total"]  # the wall clock covers every stage
        assert run["image_size"] == [64, 64] and run["png_bytes"] > 0
    med = result["median_s"]
    assert med["denoise"] > 0 and med["encode_text"] > 0
    assert result["non_denoise_added_to_denoise"] > 0
    assert result["target_met"] == (result["non_denoise_added_to_denoise"] <= 0.10)
    assert all(n > 0 for n in result["params"].values()) and result["peak_memory_gib"] is None
    assert capsys.readouterr().out.rstrip().splitlines()[-1].startswith("Non-denoising stages add")


def test_real_configs_have_flux1_dev_sizes():
    """Built on the meta device (no memory): CLIP-L, the T5-XXL encoder, FLUX.1-dev and its VAE, bf16."""
    modules = build_modules(REAL, torch.device("meta"), torch.bfloat16)
    assert param_counts(modules) == {"text_encoder": 123_060_480, "text_encoder_2": 4_762_310_656,
                                     "transformer": 11_901_408_320, "vae": 83_819_683}
    assert modules["transformer"].config.guidance_embeds and modules["vae"].config.latent_channels == 16


def test_check_vocab_names_the_sizes():
    class Tok:
        def __len__(self):
            return 700

    check_vocab(Tok(), 700, "t")
    with pytest.raises(ValueError, match="700 ids but the model's vocab_size is 699"):
        check_vocab(Tok(), 699, "t")
