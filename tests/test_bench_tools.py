"""Helpers of the GPU benchmarks that must be right on CPU too: kernel classification, the sync-check plumbing."""
from __future__ import annotations

from pathlib import Path

from benchmarks.common import gaps_of, kernel_kind
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
    assert kernel_kind("ncclDevKernel_SendRecv(ncclDevKernelArgsStorage<4096ul>)") == "communication (nccl)"


def test_idle_gaps_sum_the_time_no_kernel_ran_by_the_kernel_waited_for():
    """Overlapping kernels leave no gap; each gap is charged to the kernel that ends it, its predecessor the kernel
    that had run longest."""
    spans = [(0, 10, "gemm"), (12, 20, "norm"), (15, 30, "copy"), (30, 31, "norm"), (40, 50, "gemm"), (5, 5, "empty")]
    g = gaps_of(spans, n=2)
    assert g["kernels"] == 5 and g["span_ms"] == 0.05
    assert g["idle_ms"] == (2 + 9) / 1e3  # 10 -> 12 and 31 -> 40; 20 -> 15 overlaps, 30 -> 30 touches
    assert [(r["next"], r["gaps"], r["over_5us"]) for r in g["by_next_kernel"]] == [("gemm", 1, 1), ("norm", 1, 0)]
    assert g["largest"][0] == {"us": 9, "after": "norm", "before": "gemm"}
    assert gaps_of([])["idle_ms"] == 0


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
    assert {"encode_text", "denoise", "decode", "queued"} <= rows[2, False]["stage_s"].keys()
    assert rows[2, True]["batchers"]["FluxTransformer.forward"]["calls"] > 0
    assert all(r["p95_s"] >= r["p50_s"] > 0 for r in result["rows"])


def test_quack_gemm_benchmark_runs_on_cpu():
    """benchmarks/quack_gemm.py --tiny: the cuBLAS side of every row, the quack columns reported unavailable."""
    from benchmarks.quack_gemm import main

    rows = main(["--tiny"])
    assert len(rows) == 1 and rows[0]["cublas_ms"] > 0 and rows[0]["cublas_k64_ms"] > 0
    assert "quack_tuned_ms" not in rows[0]


def test_attention_fa4_benchmark_runs_on_cpu():
    from benchmarks.attention_fa4 import main

    result = main(["--tiny"])
    assert result["errors"]["fa4"] is None  # no FA4 on the CPU: reported unavailable, not timed
    assert result["errors"]["cudnn"] < 1e-5 and result["rows"][0]["cudnn"] > 0


# ---------------------------------------------------------------- benchmarks/e2e.py (issue 21)


def _check_e2e_rows(result: dict, models: list[str], gpus: int) -> None:
    from benchmarks.e2e_models import SPECS

    assert [m["model"] for m in result["models"]] == models
    for m in result["models"]:
        spec = SPECS[m["model"]]
        assert m["ours_classes"]["transformer"] == spec.dit_class_name()  # our DiT, not diffusers'
        assert m["ours_layout"] == (None if gpus == 1 else
                                    {"ulysses_degree": 2 if spec.parallel == "ulysses" else 1, "ring_degree": 1,
                                     "cfg_degree": 2 if spec.parallel == "cfg" else 1, "ulysses_chunks": 1})
        for row in m["workloads"]:
            assert row["ours_gpus"] == gpus and row["flops"]["per_step"] > 0
            # both pipelines did the same work on the same weights: fp32 outputs agree
            assert row["psnr_ours_vs_diffusers_db"] >= 40
            for side in ("ours", "diffusers"):
                runs = row[side]["runs"]
                assert len(runs) == 1 and row[side]["total_s"] > 0 and row[side]["denoise_tflops"] > 0
                for run in runs:
                    assert run["denoise_clock"] <= run["total"]
                    if row["per_step"]:  # every timed step measured; the one-off stages timed on both sides
                        assert len(run["step_s"]) == row["steps"] and all(s > 0 for s in run["step_s"])
                        assert {"encode_text", "image_encode", "vae_encode", "vae_decode"} <= run.keys()
                    else:
                        assert {"encode_text", "denoise", "vae_decode", "encode_output"} <= run.keys()
            stages = row["ours"]["stages_s"]
            assert {"encode_text", "denoise", "decode"} <= stages.keys()
            assert row["ours"]["warmups"][0]["steps"] == (1 if row["per_step"] else 2)


def test_e2e_benchmark_tiny_runs_both_pipelines(tmp_path, capsys):
    """benchmarks/e2e.py --tiny: all three models built from the tiny assets' configs, ours and diffusers' pipelines
    on the same tensors, every stage timed, the JSON written and the table printed last."""
    import json

    import torch

    from benchmarks.e2e import main

    out = tmp_path / "e2e.json"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # hundreds of tiny ops: a second thread only waits (10x slower on a busy machine)
    try:
        result = main(["--tiny", "--out", str(out)])
    finally:
        torch.set_num_threads(threads)
    _check_e2e_rows(result, ["flux", "qwen-image", "wan-i2v"], 1)
    assert json.loads(out.read_text())["models"][0]["workloads"][0]["workload"] == "FLUX.1-dev 64^2, 2 steps"
    rows = [r for m in result["models"] for r in m["workloads"]]
    assert [(r["model"], r["height"], r["steps"]) for r in rows] == [
        ("flux", 64, 2), ("flux", 64, 3), ("qwen-image", 64, 2), ("qwen-image", 96, 2), ("wan-i2v", 32, 2)]
    lines = capsys.readouterr().out.rstrip().splitlines()
    assert lines[-7].startswith("| workload |") and all(line.startswith("| ") for line in lines[-5:])
    assert "s/step" in lines[-1]


def test_e2e_benchmark_two_ranks_on_cpu():
    """--num-gpus 2 on two gloo ranks: ours runs Ulysses (FLUX) or CFG parallel (Qwen-Image, Wan) and still agrees
    with diffusers' one-process run."""
    from benchmarks.e2e import main

    result = main(["--tiny", "--num-gpus", "2", "--steps", "2", "--sizes", "64"])
    _check_e2e_rows(result, ["flux", "qwen-image", "wan-i2v"], 2)


def test_e2e_benchmark_refuses_bad_flags(capsys):
    import pytest

    from benchmarks.e2e import main

    for argv, message in ((["--model", "sdxl"], "unknown ['sdxl']"), (["--steps", "28,x"], "'28,x'"),
                          (["--runs", "0"], "--runs must be at least 1, got 0")):
        with pytest.raises(SystemExit):
            main(["--tiny", *argv])
        assert message in capsys.readouterr().err


def _meta_flops(model, **inputs) -> int:
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(**inputs)
    return counter.get_total_flops()


def test_e2e_flop_formulas_match_torch_counts_at_real_size():
    """The analytic DiT FLOPs per step (the TFLOP/s column) against torch's FLOP counter running our DiTs at the real
    sizes on the meta device (no memory): within 0.5% (the formulas leave out modulation and time embeddings)."""
    import types

    import torch

    from benchmarks.e2e_models import SPECS, Workload, building_on, make, our_dit

    meta, bf16 = torch.device("meta"), torch.bfloat16

    def empty(*shape, dtype=bf16):
        return torch.empty(*shape, device=meta, dtype=dtype)

    def build(spec, cfg):
        with building_on(meta, bf16):
            ref = make("diffusers", spec.classes["transformer"][1], cfg)
        return ref.config, our_dit(ref)

    tok = types.SimpleNamespace(bos_token_id=0, eos_token_id=1, pad_token_id=1)
    flux = SPECS["flux"]
    config, model = build(flux, flux.real_configs({"tokenizer": tok, "tokenizer_2": tok})["transformer"])
    want = flux.dit_flops(config, Workload("flux", 1024, 1024, 28), {}, "")
    got = _meta_flops(model, hidden_states=empty(1, 4096, 64), encoder_hidden_states=empty(1, 512, 4096),
                      pooled_projections=empty(1, 768), timestep=empty(1), img_ids=torch.zeros(4096, 3, device=meta),
                      txt_ids=torch.zeros(512, 3, device=meta), guidance=empty(1, dtype=torch.float32))
    assert abs(want["per_step"] / got - 1) < 0.005

    qwen = SPECS["qwen-image"]
    config, model = build(qwen, qwen.real_configs({})["transformer"])
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(ASSETS / "qwen-image-tiny" / "tokenizer"))
    want = qwen.dit_flops(config, Workload("qwen-image", 1328, 1328, 50), {"tokenizer": tokenizer}, "a red fox")
    got = sum(_meta_flops(model, hidden_states=empty(1, 83 * 83, 64), encoder_hidden_states=empty(1, t, 3584),
                          encoder_hidden_states_mask=None, timestep=empty(1), img_shapes=[[(1, 83, 83)]])
              for t in want["text_tokens"])  # the prompt's and the negative prompt's calls
    assert want["text_tokens"][1] < want["text_tokens"][0] and abs(want["per_step"] / got - 1) < 0.005

    wan = SPECS["wan-i2v"]
    config, model = build(wan, wan.real_configs({})["transformer"])
    clip = types.SimpleNamespace(config=types.SimpleNamespace(image_size=224, patch_size=14))
    work = Workload("wan-i2v", 480, 832, 3, frames=81, per_step=True)
    want = wan.dit_flops(config, work, {"image_encoder": clip}, "")
    got = 2 * _meta_flops(model, hidden_states=empty(1, 36, 21, 60, 104), timestep=empty(1),
                          encoder_hidden_states=empty(1, 512, 4096), encoder_hidden_states_image=empty(1, 257, 1280))
    assert want["image_tokens"] == 21 * 30 * 52 and abs(want["per_step"] / got - 1) < 0.005


def test_e2e_real_configs_have_the_real_sizes():
    """Built on the meta device (no memory): the parameter counts of the real checkpoints' components (Qwen2.5-VL-7B's
    vision tower cut to one block: the text-to-image encode does not run it)."""
    import torch

    from benchmarks.e2e_models import SPECS, param_counts

    want = {"flux": {"text_encoder": 123_060_480, "text_encoder_2": 4_762_310_656, "transformer": 11_901_408_320,
                     "vae": 83_819_683},
            "qwen-image": {"text_encoder": 7_681_398_456, "transformer": 20_430_401_088, "vae": 126_892_531},
            "wan-i2v": {"text_encoder": 5_680_910_336, "image_encoder": 630_766_080, "transformer": 16_394_878_784,
                        "vae": 126_892_531}}
    for name, spec in SPECS.items():
        modules = spec.build(False, torch.device("meta"), torch.bfloat16)
        assert param_counts(modules) == want[name]
        assert all(p.dtype == torch.bfloat16 for m in modules.values() if isinstance(m, torch.nn.Module)
                   for p in m.parameters())


def test_sync_check_does_not_count_torchs_prototype_note():
    """torch's one-off note about the sync-debug mode also says "synchronizing"; it is not a sync (the H200 rerun
    counted it as FLUX's one sync)."""
    from benchmarks.sync_check import is_sync

    note = ("Synchronization debug mode is a prototype feature and does not yet detect all synchronizing operations "
            "(Triggered internally at /pytorch/torch/csrc/cuda/Module.cpp:1003.)")
    assert not is_sync(note)
    assert is_sync("called a synchronizing CUDA operation (Triggered internally at CUDAFunctions.cpp:162.)")
