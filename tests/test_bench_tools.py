"""Helpers of the GPU benchmarks that must be right on CPU too: kernel classification, the sync-check plumbing."""
from __future__ import annotations

from pathlib import Path

from benchmarks.common import kernel_kind
from benchmarks.sync_check import watched_denoise
from gen import Generator

ASSETS = Path(__file__).resolve().parents[1] / "assets"


def test_kernel_kinds():
    assert kernel_kind("cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16_knob_3") == "attention"
    assert kernel_kind("void pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<128>>") == "attention"
    assert kernel_kind("fmha_cutlassF_bf16_aligned_64x128_rf_sm80") == "attention"
    assert kernel_kind("nvjet_tst_256x128_64x4_2x1_v_bz_coopB_TNT") == "matmul"
    assert kernel_kind("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x256x64") == "matmul"
    assert kernel_kind("triton_per_fused_add_mul_native_layer_norm_0") == "fused elementwise / norm (triton)"
    assert kernel_kind("void at::native::vectorized_elementwise_kernel<4, CUDAFunctor_add>") == "other elementwise"
    assert kernel_kind("Memcpy DtoD (Device -> Device)") == "copy / cat"


def test_sync_check_watches_only_the_denoise_stage():
    gen = Generator.from_pretrained(ASSETS / "flux-tiny", device="cpu")
    found: list[str] = []
    with watched_denoise(found):
        import pipelines.flux

        assert pipelines.flux.denoise.__name__ == "watched"
        gen.generate("a red circle", seed=1, num_inference_steps=2, height=32, width=32)
    assert found == []  # no CUDA here: nothing to flag, but the generation ran through the wrapper
    assert pipelines.flux.denoise.__name__ == "denoise"  # restored


def test_batching_benchmark_runs_on_cpu():
    from benchmarks.batching import main

    result = main(["--tiny", "--clients", "1", "2", "--per-client", "1"])
    rows = {(r["clients"], r["batching"]): r for r in result["rows"]}
    assert set(rows) == {(1, False), (2, False), (1, True), (2, True)}
    assert rows[2, True]["requests"] == 2 and rows[2, True]["batch_stats"]["calls"] > 0
    assert all(r["p95_s"] >= r["p50_s"] > 0 for r in result["rows"])


def test_attention_fa4_benchmark_runs_on_cpu():
    from benchmarks.attention_fa4 import main

    result = main(["--tiny"])
    assert result["errors"]["fa4"] is None  # no FA4 on the CPU: reported unavailable, not timed
    assert result["errors"]["cudnn"] < 1e-5 and result["rows"][0]["cudnn"] > 0
