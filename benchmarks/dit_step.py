"""One denoising step (one transformer forward, one CFG branch) of our DiTs vs diffusers', side by side.

Builds each real-size architecture with random bf16 weights directly on the GPU (no download); our model shares
the diffusers model's weight tensors (load_state_dict(assign=True)), so both run on the same weights and inputs.
Variants: diffusers eager / compiled (default attention) / compiled with cuDNN attention forced; ours eager and
compiled (regional: each block) with the start-up-selected attention backend. Reports ms/step, ratios,
TFLOP/s, peak memory and cold-start (compile) time, as JSON and a markdown table.

  python benchmarks/dit_step.py --models flux,wan,qwen --out dit.json        # on the GPU machine
  python benchmarks/dit_step.py --models zimage --out zimage.json            # Z-Image-Turbo-sized (1024^2)
  python benchmarks/dit_step.py --models qwen21 --out qwen21.json            # Qwen-Image 2.1-sized (1024^2)
  python benchmarks/dit_step.py --models flux2 --iters 5 --out flux2.json   # FLUX.2 [dev]-sized (1024^2, 32B)
  python benchmarks/dit_step.py --tiny --models flux,wan,qwen                 # CPU smoke check
  python benchmarks/dit_step.py --fp8 --models flux,wan,qwen --out fp8.json  # ours bf16 vs FP8 linears (GPU sm89+)
"""
from __future__ import annotations

import argparse
import platform
import sys
from datetime import date
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import (cold_start_s, count_flops, environment, kernel_breakdown, time_ms,  # noqa: E402
                               top_kernels, write_json)
from gen.transforms.cuda_graph import GraphedCall  # noqa: E402
from gen.transforms.join import join_projections  # noqa: E402
from gen.models.attention import select_attention_backend  # noqa: E402
from gen.transforms.compile import compile_blocks  # noqa: E402

REAL = {
    "flux": dict(),  # FluxTransformer2DModel's defaults are FLUX.1-dev
    "flux2": dict(),  # Flux2Transformer2DModel's defaults are FLUX.2 [dev] (8 + 48 blocks, width 6144, 32B)
    "wan": dict(patch_size=(1, 2, 2), num_attention_heads=12, attention_head_dim=128, in_channels=16, out_channels=16,
                text_dim=4096, freq_dim=256, ffn_dim=8960, num_layers=30, cross_attn_norm=True,
                qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=1024),
    "qwen": dict(patch_size=2, in_channels=64, out_channels=16, num_layers=60, attention_head_dim=128,
                 num_attention_heads=24, joint_attention_dim=3584, guidance_embeds=False, axes_dims_rope=(16, 56, 56)),
    # Z-Image-Turbo (diffusers' defaults but axes_lens, as its config.json)
    "zimage": dict(axes_lens=(1536, 512, 512)),
    "qwen21": dict(),  # QwenImage21Transformer2DModel's defaults are Qwen-Image 2.1's (32 blocks, width 4096)
    # the default gen-shapes model (assets/gen-shapes/transformer/config.json): a small input, launch-bound
    "shapes": dict(patch_size=2, in_channels=32, out_channels=8, num_layers=8, attention_head_dim=64,
                   num_attention_heads=3, joint_attention_dim=576, guidance_embeds=False, axes_dims_rope=(16, 24, 24)),
}
TINY = {
    "flux": dict(num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=2,
                 joint_attention_dim=32, pooled_projection_dim=16, axes_dims_rope=(4, 6, 6), in_channels=16),
    "wan": dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4,
                text_dim=32, freq_dim=16, ffn_dim=32, num_layers=1, cross_attn_norm=True,
                qk_norm="rms_norm_across_heads", rope_max_seq_len=64),
    "qwen": dict(patch_size=2, in_channels=16, out_channels=4, num_layers=1, attention_head_dim=16,
                 num_attention_heads=2, joint_attention_dim=32, axes_dims_rope=(4, 6, 6)),
}
TINY["shapes"] = TINY["qwen"]
TINY["flux2"] = dict(in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=2,
                     joint_attention_dim=48, timestep_guidance_channels=32, axes_dims_rope=(4, 4, 4, 4))
TINY["qwen21"] = dict(in_channels=8, out_channels=8, num_layers=1, attention_head_dim=16, num_attention_heads=2,
                      context_in_dim=32, axes_dims_rope=(4, 6, 6))
TINY["zimage"] = dict(in_channels=4, dim=64, n_layers=1, n_refiner_layers=1, n_heads=2, n_kv_heads=2, cap_feat_dim=32,
                      axes_dims=(8, 12, 12), axes_lens=(256, 64, 64))
CLASS_NAMES = {"flux": "FluxTransformer2DModel", "wan": "WanTransformer3DModel", "qwen": "QwenImageTransformer2DModel",
               "shapes": "QwenImageTransformer2DModel", "zimage": "ZImageTransformer2DModel",
               "qwen21": "QwenImage21Transformer2DModel", "flux2": "Flux2Transformer2DModel"}


def declared(name: str):
    """Our DiT for a benchmark name, as its family declares it (gen/families.py)."""
    from gen.families import DITS

    return DITS[CLASS_NAMES[name]]


def build(name: str, tiny: bool, device, dtype):
    """(diffusers model, our model sharing its weights, inputs as kwargs for both)."""
    import diffusers

    from gen.config import config_from_dict

    cls_name = CLASS_NAMES[name]
    cfg = (TINY if tiny else REAL)[name]
    prev = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    with torch.device(device):
        ref = getattr(diffusers, cls_name)(**cfg).eval()
    torch.set_default_dtype(prev)
    dit = declared(name)
    with torch.device("meta"):
        ours = dit.model(config_from_dict(dit.config, dict(ref.config)))
    ours.load_state_dict(ref.state_dict(), assign=True)
    ours.eval()
    inputs, tokens = make_inputs(name, tiny, ref.config, device, dtype)
    return ref, ours, prefill(name, inputs, ours, ref), tokens


def build_ours(name: str, tiny: bool, device, dtype):
    """Our model alone, random weights in `dtype` on `device` (no diffusers), and its inputs."""
    from gen.config import config_from_dict

    dit = declared(name)
    config = config_from_dict(dit.config, (TINY if tiny else REAL)[name])
    prev = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            ours = dit.model(config).eval()
    finally:
        torch.set_default_dtype(prev)
    inputs, tokens = make_inputs(name, tiny, config, device, dtype)
    return ours, prefill(name, inputs, ours), tokens


def make_inputs(name: str, tiny: bool, c, device, dtype) -> tuple[dict, int]:
    """(forward keywords, tokens) of one step at the benchmark's resolution; `c` is either model's config."""
    g = torch.Generator(device).manual_seed(0)

    def rnd(*shape):
        return torch.randn(*shape, generator=g, device=device, dtype=dtype)

    if name == "flux":
        h = w = 8 if tiny else 64  # 1024^2 -> 128x128 latents -> 64x64 tokens
        txt = 16 if tiny else 512
        ids = torch.zeros(h, w, 3, device=device)
        ids[..., 1] = torch.arange(h, device=device)[:, None]
        ids[..., 2] = torch.arange(w, device=device)[None, :]
        inputs = dict(hidden_states=rnd(1, h * w, c.in_channels), encoder_hidden_states=rnd(1, txt, c.joint_attention_dim),
                      pooled_projections=rnd(1, c.pooled_projection_dim), timestep=torch.full((1,), 0.5, device=device, dtype=dtype),
                      img_ids=ids.reshape(-1, 3), txt_ids=torch.zeros(txt, 3, device=device),
                      guidance=torch.full((1,), 3.5, device=device) if c.guidance_embeds else None)
        tokens = h * w + txt
    elif name == "flux2":  # 1024^2 -> 128x128 latents -> 64x64 patchified tokens; the 512-token padded prompt
        h = w = 4 if tiny else 64
        txt = 16 if tiny else 512
        img_ids = torch.cartesian_prod(torch.arange(1), torch.arange(h), torch.arange(w), torch.arange(1))
        txt_ids = torch.cartesian_prod(torch.arange(1), torch.arange(1), torch.arange(1), torch.arange(txt))
        inputs = dict(hidden_states=rnd(1, h * w, c.in_channels), encoder_hidden_states=rnd(1, txt, c.joint_attention_dim),
                      timestep=torch.full((1,), 0.5, device=device, dtype=dtype), img_ids=img_ids.to(device),
                      txt_ids=txt_ids.to(device),
                      guidance=torch.full((1,), 4.0, device=device) if c.guidance_embeds else None)
        tokens = h * w + txt
    elif name == "wan":
        f, h, w = (3, 8, 8) if tiny else (21, 60, 104)  # 480x832, 81 frames -> 21 latent frames
        txt = 16 if tiny else 512
        inputs = dict(hidden_states=rnd(1, c.in_channels, f, h, w), timestep=torch.full((1,), 500.0, device=device),
                      encoder_hidden_states=rnd(1, txt, c.text_dim))
        tokens = f * (h // 2) * (w // 2)
    elif name == "zimage":  # 1024^2 -> 128x128 latents -> 64x64 tokens; a ~70-word prompt in the chat template
        h = w = 8 if tiny else 128
        txt = 20 if tiny else 100  # the caption's real tokens (padded to 32 inside both models)
        inputs = dict(hidden_states=rnd(1, c.in_channels, h, w), timestep=torch.full((1,), 500.0, device=device),
                      encoder_hidden_states=rnd(1, txt, c.cap_feat_dim))
        tokens = (h // 2) * (w // 2) + txt
    elif name == "qwen21":  # 1024^2 -> 64x64 latents (16x, unpatched) = 4096 target tokens; a 256-token prompt
        h = w = 4 if tiny else 64
        txt = 16 if tiny else 256
        slots = torch.cat([torch.zeros(1, txt, dtype=torch.bool), torch.ones(1, h * w // 4, dtype=torch.bool)], 1)
        inputs = dict(hidden_states=rnd(1, h * w, c.in_channels), encoder_hidden_states=rnd(1, txt, c.context_in_dim),
                      timestep=torch.full((1,), 0.5, device=device, dtype=dtype), img_shapes=[[(1, h, w)]],
                      img_mask=slots.to(device))
        tokens = h * w + txt
    else:  # Qwen-Image 1328^2 -> 166x166 latents -> 83x83 tokens; gen-shapes 128^2 -> 16x16 latents -> 8x8
        h = w = 8 if tiny or name == "shapes" else 83
        txt = 16 if tiny else 12 if name == "shapes" else 256
        inputs = dict(hidden_states=rnd(1, h * w, c.in_channels), encoder_hidden_states=rnd(1, txt, c.joint_attention_dim),
                      encoder_hidden_states_mask=None,  # what both pipelines pass for one prompt (no padding)
                      timestep=torch.full((1,), 0.5, device=device, dtype=dtype), img_shapes=[[(1, h, w)]],
                      )
        tokens = h * w + txt
    return inputs, tokens


def prefill(name: str, inputs: dict, ours, ref=None) -> dict:
    """A Qwen-Image 2.1 step reads the prompt's keys and values, computed once per generation: ours from encode_prefix
    (as its pipeline does), diffusers' from the KV cache its first call fills (its pipeline's default). Done here,
    outside the timed step, which is then a steady-state step of either pipeline."""
    if name != "qwen21":
        return inputs
    with torch.no_grad():
        prefix = ours.encode_prefix(inputs["encoder_hidden_states"], inputs["img_mask"], inputs["img_shapes"])
        cache = None
        if ref is not None:
            from diffusers.models.transformers.transformer_qwenimage21 import QwenImage21KVCache

            cache = QwenImage21KVCache(ref.config.num_layers)
            ref(**inputs, kv_cache=cache, kv_cache_mode="extract")
    return dict(inputs, prefix=prefix, kv_cache=cache)


def call_ours(name: str, ours, inputs: dict) -> torch.Tensor:
    """Our forward on the benchmark inputs (Qwen-Image 2.1: the target tokens against the encoded prefix)."""
    if name == "qwen21":
        return ours(inputs["hidden_states"], inputs["prefix"], inputs["timestep"], inputs["img_shapes"])
    return ours(**inputs)


def call_reference(name: str, ref, inputs: dict) -> torch.Tensor:
    """diffusers' forward on the benchmark inputs, as a tensor shaped like ours (Z-Image's takes lists of latents and
    captions and the clean-is-1 time its pipeline computes from the scheduler's timestep)."""
    if name == "zimage":
        x, t, cap = inputs["hidden_states"], inputs["timestep"], inputs["encoder_hidden_states"]
        out = ref(list(x[:, :, None].unbind(0)), (1000 - t) / 1000, list(cap.unbind(0)), return_dict=False)[0]
        return torch.stack(out)[:, :, 0]
    if name == "qwen21":  # a cached step: the target tokens' prediction
        kw = {k: v for k, v in inputs.items() if k != "prefix"}
        return ref(**kw, kv_cache_mode="cached", return_dict=False)[0]
    return ref(**inputs, return_dict=False)[0]


def bench_model(name: str, args, device, dtype) -> dict:
    ref, ours, inputs, tokens = build(name, args.tiny, device, dtype)
    row = {"model": name, "tokens": tokens}
    iters, warm = (2, 1) if args.tiny else (args.iters, 3)

    def run_ref():
        with torch.no_grad():
            return call_reference(name, ref, inputs)

    def run_ours():
        with torch.no_grad():
            return call_ours(name, ours, inputs)

    row["flop"] = count_flops(run_ours)
    with torch.no_grad():
        a, b = run_ref().float(), run_ours().float()
    row["rel_err_vs_diffusers"] = ((a - b).norm() / b.norm()).item()
    torch.cuda.reset_peak_memory_stats() if device.type == "cuda" else None
    row["diffusers_eager_ms"] = time_ms(run_ref, warm, iters)
    chosen = select_attention_backend(device, dtype)
    row["attention_backend"] = chosen
    row["ours_eager_ms"] = time_ms(run_ours, warm, iters)
    if not args.no_compile and not args.skip_diffusers_compile:
        compiled_ref = torch.compile(ref)

        def run_ref_c():
            with torch.no_grad():
                return call_reference(name, compiled_ref, inputs)

        row["diffusers_compile_cold_s"] = cold_start_s(run_ref_c)
        row["diffusers_compiled_ms"] = time_ms(run_ref_c, warm, iters)
        if device.type == "cuda":
            ref.set_attention_backend("_native_cudnn")
            torch._dynamo.reset()
            compiled_ref = torch.compile(ref)
            row["diffusers_compiled_cudnn_cold_s"] = cold_start_s(run_ref_c)
            row["diffusers_compiled_cudnn_ms"] = time_ms(run_ref_c, warm, iters)
    if not args.no_compile:
        compile_blocks(ours, declared(name).blocks, **({"mode": args.ours_mode} if args.ours_mode else {}))
        row["ours_compile_mode"] = args.ours_mode or "default"
        row["ours_compile_cold_s"] = cold_start_s(run_ours)
        row["ours_compiled_ms"] = time_ms(run_ours, warm, iters)
    if not args.no_join:  # q/k/v (+MLP) projections joined into one matmul each; the blocks recompile
        row["joined_groups"] = join_projections(ours)
        row["ours_joined_cold_s"] = cold_start_s(run_ours)
        row["ours_joined_ms"] = time_ms(run_ours, warm, iters)
    with torch.no_grad():
        row["rel_err_ours_vs_diffusers_eager"] = ((run_ours().float() - a).norm() / a.norm()).item()
    if args.profile and device.type == "cuda":
        row["kernels_ours"] = kernel_breakdown(run_ours)
        if "diffusers_compiled_ms" in row:
            row["kernels_diffusers_compiled"] = kernel_breakdown(run_ref_c)
        if args.top_kernels:
            row["top_kernels_ours"] = top_kernels(run_ours, n=args.top_kernels)
            if "diffusers_compiled_ms" in row:
                row["top_kernels_diffusers_compiled"] = top_kernels(run_ref_c, n=args.top_kernels)
    if args.cuda_graphs and device.type == "cuda":
        ours.forward = GraphedCall(ours.forward)
        row["ours_graphed_cold_s"] = cold_start_s(run_ours)
        row["ours_graphed_ms"] = time_ms(run_ours, warm, iters)
        with torch.no_grad():
            row["rel_err_graphed_vs_diffusers_eager"] = ((run_ours().float() - a).norm() / a.norm()).item()
        del ours.forward
    if device.type == "cuda":
        row["peak_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30
    variants = ("ours_eager_ms", "ours_compiled_ms", "ours_joined_ms", "ours_graphed_ms")
    row["ours_best"] = min((k for k in variants if k in row), key=row.get)
    best = row[row["ours_best"]]
    row["ours_tflops"] = row["flop"] / best / 1e9
    row["fraction_of_800_tflops"] = row["ours_tflops"] / 800
    for key in ("diffusers_compiled_ms", "diffusers_compiled_cudnn_ms", "diffusers_eager_ms"):
        if key in row:
            row["ratio_" + key.removesuffix("_ms")] = best / row[key]
    del ref, ours
    torch._dynamo.reset()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return row


def bench_fp8(name: str, args, device, dtype) -> dict:
    """Our model compiled (regional) exact (bf16 on GPUs), then with FP8 linears in its blocks; no diffusers needed.

    The exact run comes first; the blocks' linears are then swapped in place (gen/fp8.quantize_transformer) and the
    blocks recompiled, so one copy of the weights is held at a time."""
    from gen.transforms.fp8 import quantize_transformer

    ours, inputs, tokens = build_ours(name, args.tiny, device, dtype)
    row = {"model": name, "tokens": tokens, "mode": "fp8", "dtype": str(dtype).removeprefix("torch.")}
    iters, warm = (2, 1) if args.tiny else (args.iters, 3)
    row["attention_backend"] = select_attention_backend(device, dtype)

    def run_ours():
        with torch.no_grad():
            return call_ours(name, ours, inputs)

    row["flop"] = count_flops(run_ours)
    exact = run_ours().float()
    compile_kwargs = {"mode": args.ours_mode} if args.ours_mode else {}
    if not args.no_compile:
        compile_blocks(ours, declared(name).blocks, **compile_kwargs)
        row["exact_compile_cold_s"] = cold_start_s(run_ours)
    row["exact_ms"] = time_ms(run_ours, warm, iters)
    counts = quantize_transformer(ours, declared(name).blocks)
    row.update(counts)
    if not args.no_compile:
        torch._dynamo.reset()
        compile_blocks(ours, declared(name).blocks, **compile_kwargs)
        row["fp8_compile_cold_s"] = cold_start_s(run_ours)
    row["fp8_ms"] = time_ms(run_ours, warm, iters)
    out = run_ours().float()
    row["fp8_rel_err_vs_exact"] = ((out - exact).norm() / exact.norm()).item()
    row["fp8_mean_abs_rel_vs_exact"] = ((out - exact).abs().mean() / exact.abs().mean()).item()
    row["fp8_speedup"] = row["exact_ms"] / row["fp8_ms"]
    row["fp8_tflops"] = row["flop"] / row["fp8_ms"] / 1e9
    if device.type == "cuda":
        row["peak_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30
    del ours
    torch._dynamo.reset()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return row


def fp8_table(rows: list[dict]) -> str:
    cols = ["model", "tokens", "dtype", "attention_backend", "fp8_linears", "kept_exact", "exact_ms", "fp8_ms",
            "fp8_speedup", "fp8_tflops", "fp8_rel_err_vs_exact", "fp8_mean_abs_rel_vs_exact", "exact_compile_cold_s",
            "fp8_compile_cold_s", "peak_mem_gib"]
    return _markdown(rows, cols)


def light_environment() -> dict:
    """environment() without diffusers / transformers (the fp8 mode does not need them)."""
    props = torch.cuda.get_device_properties(0) if torch.cuda.is_available() else None
    return {"date": date.today().isoformat(), "device": props.name if props else platform.processor(),
            "torch": torch.__version__, "cuda": torch.version.cuda}


def table(rows: list[dict]) -> str:
    cols = ["model", "tokens", "attention_backend", "diffusers_eager_ms", "diffusers_compiled_ms",
            "diffusers_compiled_cudnn_ms", "ours_eager_ms", "ours_compiled_ms", "ours_joined_ms", "ours_graphed_ms",
            "ours_best", "ratio_diffusers_compiled", "ratio_diffusers_compiled_cudnn", "ours_tflops",
            "fraction_of_800_tflops", "peak_mem_gib", "ours_compile_cold_s", "diffusers_compile_cold_s",
            "rel_err_ours_vs_diffusers_eager"]
    text = _markdown(rows, cols)
    for r in rows:
        for key in ("kernels_diffusers_compiled", "kernels_ours"):
            if key in r:
                text += f"\n{r['model']} {key}: " + ", ".join(f"{k} {v:.1f}" for k, v in r[key].items())
    return text


def _markdown(rows: list[dict], cols: list[str]) -> str:
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        cells = []
        for c in cols:
            v = r.get(c, "")
            cells.append(f"{v:.4g}" if isinstance(v, float) else str(v))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--models", default="flux,wan,qwen")
    p.add_argument("--tiny", action="store_true", help="tiny configs (CPU smoke check)")
    p.add_argument("--no-compile", action="store_true")
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--ours-mode", help="torch.compile mode for our blocks, e.g. max-autotune-no-cudagraphs")
    p.add_argument("--skip-diffusers-compile", action="store_true", help="time diffusers eager only")
    p.add_argument("--fp8", action="store_true", help="exact bf16 vs FP8 linears in our compiled blocks (no diffusers)")
    p.add_argument("--no-join", action="store_true", help="skip the joined-projections variant")
    p.add_argument("--cuda-graphs", action="store_true", help="also time ours replayed from a CUDA graph")
    p.add_argument("--profile", action="store_true", help="GPU kernel time by kind (matmul, attention, ...)")
    p.add_argument("--top-kernels", type=int, default=0, help="with --profile: the N longest kernels of each, by name")
    p.add_argument("--out", default="dit_step.json")
    args = p.parse_args()
    device = torch.accelerator.current_accelerator() if torch.accelerator.is_available() else torch.device("cpu")
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    bench, env, show = (bench_fp8, light_environment, fp8_table) if args.fp8 else (bench_model, environment, table)
    rows = []
    for name in args.models.split(","):
        rows.append(bench(name, args, device, dtype))
        write_json(args.out, {"env": env(), "rows": rows})
        print(f"done {name}", flush=True)
    print(env())
    print(show(rows))


if __name__ == "__main__":
    main()
