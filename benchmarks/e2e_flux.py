"""One full FLUX.1-dev generation end to end (1024x1024, 28 steps, guidance 3.5, bf16) with per-stage times.

No download: the components of a FLUX.1-dev-sized model folder are built in memory with random weights of the real
architectures (CLIP-L text model, T5-XXL encoder (4.7B params, built directly on the device in the run's dtype),
our FLUX transformer with the FLUX.1-dev config, diffusers' AutoencoderKL with FLUX's VAE config, the
FlowMatchEulerDiscreteScheduler with FLUX's config) and assembled into our FluxPipeline, wrapped in a Generator.
Tokenizers: the tiny asset's (assets/flux-tiny); their ids are checked to fit the real vocabularies, and prompts
are padded to the real lengths (77 CLIP, 512 T5 tokens), so every model sees the real shapes.

Timed: one warm-up generation (compile included when --compile), then --runs generations; per stage the median of
GenerationResult.timings plus output encoding (result.save to a PNG in a temp dir), the wall-clock total, the
non-denoising share, and peak device memory. Stage boundaries wait for the device (the pipeline's Timings is
swapped, for this script only, for one that synchronizes), so each stage's queued device work counts in its own
stage. Images from random weights are noise-like, which makes the PNG encoding a pessimistic bound.

  python benchmarks/e2e_flux.py --compile --out e2e_flux.json   # GPU machine: ~1-1.5 min once started
  OMP_NUM_THREADS=1 python benchmarks/e2e_flux.py --tiny          # CPU smoke check: assets/flux-tiny, 2 steps, 64x64
  OMP_NUM_THREADS=1 python benchmarks/e2e_flux.py --scale-down    # CPU: the build-from-configs path, tiny dims
"""
from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import pipelines.flux as flux_pipeline_module  # noqa: E402
from benchmarks.common import environment, write_json  # noqa: E402
from benchmarks.e2e_models import check_built  # noqa: E402
from gen import Generator  # noqa: E402
from gen.device import resolve_device, resolve_dtype  # noqa: E402
from gen.types import GenerationRequest, GenerationResult  # noqa: E402
from pipelines.base import Timings  # noqa: E402

TINY_ASSET = ROOT / "assets" / "flux-tiny"
PROMPT = "a photo of an astronaut riding a horse on a mountain at sunset"
STAGES = ("validate", "encode_text", "prepare_latents", "timesteps", "denoise", "decode", "encode_output")
TARGET_ADDED = 0.10  # the target: non-denoising stages add <= 10% to the denoising time

# FLUX.1-dev's component configs (black-forest-labs/FLUX.1-dev, */config.json), as constructor keywords.
REAL = {
    "clip": dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                 num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768,
                 layer_norm_eps=1e-5),
    "t5": dict(vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
               relative_attention_num_buckets=32, relative_attention_max_distance=128, feed_forward_proj="gated-gelu",
               layer_norm_epsilon=1e-6, is_encoder_decoder=False),
    "transformer": dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
                        num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768,
                        guidance_embeds=True, axes_dims_rope=(16, 56, 56)),
    "vae": dict(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
                up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(128, 256, 512, 512), layers_per_block=2,
                act_fn="silu", latent_channels=16, norm_num_groups=32, sample_size=1024, scaling_factor=0.3611,
                shift_factor=0.1159, use_quant_conv=False, use_post_quant_conv=False, force_upcast=True,
                mid_block_add_attention=True),
    "scheduler": dict(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                      base_image_seq_len=256, max_image_seq_len=4096),
}
# The same components with tiny widths and depths (real vocabularies, latent channels and scheduler): CPU check.
SCALED_DOWN = {
    "clip": {**REAL["clip"], "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
             "num_attention_heads": 2, "projection_dim": 32},
    "t5": {**REAL["t5"], "d_model": 32, "d_kv": 8, "d_ff": 64, "num_layers": 2, "num_heads": 4,
           "relative_attention_num_buckets": 8},
    "transformer": {**REAL["transformer"], "num_layers": 1, "num_single_layers": 1, "attention_head_dim": 16,
                    "num_attention_heads": 2, "joint_attention_dim": 32, "pooled_projection_dim": 32,
                    "axes_dims_rope": (4, 6, 6)},
    "vae": {**REAL["vae"], "block_out_channels": (8, 16, 16, 16), "layers_per_block": 1, "norm_num_groups": 4},
    "scheduler": REAL["scheduler"],
}
# model_index.json's [library, class] per slot of a FLUX.1 folder
CLASSES = {"tokenizer": ("transformers", "CLIPTokenizer"), "text_encoder": ("transformers", "CLIPTextModel"),
           "tokenizer_2": ("transformers", "T5Tokenizer"), "text_encoder_2": ("transformers", "T5EncoderModel"),
           "transformer": ("diffusers", "FluxTransformer2DModel"), "vae": ("diffusers", "AutoencoderKL"),
           "scheduler": ("diffusers", "FlowMatchEulerDiscreteScheduler")}


# ---------------------------------------------------------------- building the pipeline


@contextlib.contextmanager
def building_on(device: torch.device, dtype: torch.dtype) -> Iterator[None]:
    """Modules constructed inside get their parameters directly on `device` in `dtype` (no CPU copy)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            yield
    finally:
        torch.set_default_dtype(previous)


def check_vocab(tokenizer, vocab_size: int, name: str) -> None:
    """Every id `tokenizer` can produce must index the text model's embedding table."""
    if len(tokenizer) > vocab_size:
        raise ValueError(f"{name}: the tokenizer has {len(tokenizer)} ids but the model's vocab_size is {vocab_size}; "
                         "ids would fall outside the embedding table")


def build_modules(cfg: dict[str, dict], device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
    """The seven components of a FLUX.1 folder, random weights built from `cfg` directly on `device` in `dtype`."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer, T5Config, T5EncoderModel, T5Tokenizer

    from gen.models.flux import FluxConfig, FluxTransformer

    tokenizer = CLIPTokenizer.from_pretrained(str(TINY_ASSET / "tokenizer"))
    tokenizer_2 = T5Tokenizer.from_pretrained(str(TINY_ASSET / "tokenizer_2"))
    check_vocab(tokenizer, cfg["clip"]["vocab_size"], "tokenizer (CLIP)")
    check_vocab(tokenizer_2, cfg["t5"]["vocab_size"], "tokenizer_2 (T5)")
    special = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                   pad_token_id=tokenizer.pad_token_id)  # CLIP pools at the tokenizer's end-of-text id
    torch.manual_seed(0)
    with building_on(device, dtype):
        modules: dict[str, Any] = {
            "tokenizer": tokenizer,
            "text_encoder": CLIPTextModel(CLIPTextConfig(**cfg["clip"], **special)).eval(),
            "tokenizer_2": tokenizer_2,
            "text_encoder_2": T5EncoderModel(T5Config(**cfg["t5"], pad_token_id=tokenizer_2.pad_token_id,
                                                      eos_token_id=tokenizer_2.eos_token_id)).eval(),
            "transformer": FluxTransformer(FluxConfig(**cfg["transformer"])).eval(),
            "vae": AutoencoderKL(**cfg["vae"]).eval(),
        }
    modules["scheduler"] = FlowMatchEulerDiscreteScheduler(**cfg["scheduler"])
    check_built(modules, device, dtype)
    return modules


def param_counts(modules: dict[str, Any]) -> dict[str, int]:
    return {slot: sum(p.numel() for p in m.parameters()) for slot, m in modules.items()
            if isinstance(m, torch.nn.Module)}


def build_generator(cfg: dict[str, dict], device: torch.device, dtype: torch.dtype, compile: bool,
                    attention: str, **options) -> tuple[Generator, dict]:
    """Our FluxPipeline assembled from build_modules(cfg), optimized as Generator.from_pretrained does."""
    from component_loaders import Components
    from component_loaders.model_index import ModelIndex
    from gen.transforms import TransformOptions, apply_transforms

    modules = build_modules(cfg, device, dtype)
    index = ModelIndex(path=Path("<in-memory FLUX.1-dev-sized folder>"), class_name="FluxPipeline",
                       components={slot: CLASSES[slot] for slot in modules}, extra={})
    pipeline = flux_pipeline_module.FluxPipeline(Components(index=index, modules=modules), device, dtype)
    applied = apply_transforms(pipeline, TransformOptions(compile=compile, attention=attention, **options)).summary()
    info = {"params": param_counts(modules), "optimizations": applied,
            "text_encoder_attn": modules["text_encoder"].config._attn_implementation,
            "text_encoder_2_attn": modules["text_encoder_2"].config._attn_implementation}
    return Generator(pipeline, index.path), info


def load_tiny(device: torch.device, dtype: torch.dtype, compile: bool, attention: str) -> tuple[Generator, dict]:
    generator = Generator.from_pretrained(TINY_ASSET, device=device, dtype=dtype, compile=compile, attention=attention)
    return generator, {"params": param_counts(generator.pipeline.components.modules)}


# ---------------------------------------------------------------- timing


def synchronize(device: torch.device) -> None:
    if device.type != "cpu":
        torch.accelerator.synchronize(device)


def synced_timings(device: torch.device) -> type[Timings]:
    """A Timings whose stages wait for `device` on entry and exit, so queued work lands in the stage that queued it."""

    class SyncedTimings(Timings):
        @contextlib.contextmanager
        def __call__(self, name: str):
            synchronize(device)
            with Timings.__call__(self, name):
                try:
                    yield
                finally:
                    synchronize(device)

    return SyncedTimings


@contextlib.contextmanager
def stage_sync(device: torch.device) -> Iterator[None]:
    """Within the block, pipelines/flux.py times its stages with synced_timings(device)."""
    original = flux_pipeline_module.Timings
    flux_pipeline_module.Timings = synced_timings(device)
    try:
        yield
    finally:
        flux_pipeline_module.Timings = original


def generate_once(generator: Generator, req: GenerationRequest, out_dir: Path, device: torch.device) -> dict:
    """One generation plus PNG encoding: its stage seconds, the wall-clock total and the PNG's size."""
    synchronize(device)
    start = time.perf_counter()
    result: GenerationResult = generator.run(req)
    path = out_dir / "image.png"
    save_start = time.perf_counter()
    result.save(path)
    end = time.perf_counter()
    row = dict(result.timings)
    row["encode_output"] = end - save_start
    row["total"] = end - start
    row["png_bytes"] = path.stat().st_size
    row["image_size"] = list(result.images[0].size)
    return row


def _memory_api(device: torch.device, name: str):
    """torch.accelerator's memory function `name`, or the device module's (torch.<type>) where torch is older."""
    fn = getattr(torch.accelerator, name, None) or getattr(getattr(torch, device.type), name)
    return lambda: fn(device)


def peak_memory_gib(device: torch.device) -> float | None:
    return None if device.type == "cpu" else _memory_api(device, "max_memory_allocated")() / 2**30


def memory_gib(device: torch.device) -> float | None:
    return None if device.type == "cpu" else _memory_api(device, "memory_allocated")() / 2**30


def backend_name() -> str:
    """The name of the attention backend every model now runs (the start-up selection)."""
    from gen.models.attention import BACKENDS, get_attention_backend

    current = get_attention_backend()
    return next((name for name, fn in BACKENDS.items() if fn is current), repr(current))


def summarize(runs: list[dict], steps: int) -> dict:
    """Medians per stage and of the total; the non-denoising time = total - denoise (untimed gaps included)."""
    median = {k: statistics.median(r[k] for r in runs) for k in (*STAGES, "total") if all(k in r for r in runs)}
    non_denoise = [r["total"] - r["denoise"] for r in runs]
    added = [(r["total"] - r["denoise"]) / r["denoise"] for r in runs]
    return {
        "median_s": median,
        "non_denoise_s": statistics.median(non_denoise),
        "non_denoise_share_of_total": statistics.median(n / r["total"] for n, r in zip(non_denoise, runs)),
        "non_denoise_added_to_denoise": statistics.median(added),
        "target_added_to_denoise": TARGET_ADDED,
        "target_met": statistics.median(added) <= TARGET_ADDED,
        "denoise_s_per_step": median["denoise"] / steps,
    }


def markdown(summary: dict, peak_gib: float | None) -> str:
    med = summary["median_s"]
    total = med["total"]
    lines = ["| stage | median s | % of total |", "|---|---:|---:|"]
    for stage in STAGES:
        if stage in med:
            lines.append(f"| {stage} | {med[stage]:.4f} | {100 * med[stage] / total:.1f} |")
    lines.append(f"| **total (wall)** | {total:.4f} | 100.0 |")
    lines.append(f"| non-denoising (total - denoise) | {summary['non_denoise_s']:.4f} | "
                 f"{100 * summary['non_denoise_share_of_total']:.1f} |")
    verdict = "met" if summary["target_met"] else "NOT met"
    lines.append("")
    lines.append(f"Non-denoising stages add {100 * summary['non_denoise_added_to_denoise']:.1f}% to the denoising "
                 f"time (target <= {100 * TARGET_ADDED:.0f}%: {verdict}); denoise "
                 f"{1000 * summary['denoise_s_per_step']:.1f} ms/step; peak memory "
                 + (f"{peak_gib:.2f} GiB." if peak_gib is not None else "n/a (CPU)."))
    return "\n".join(lines)


# ---------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--tiny", action="store_true", help="assets/flux-tiny via Generator.from_pretrained (CPU check)")
    mode.add_argument("--scale-down", action="store_true", help="build the components from tiny configs (CPU check)")
    p.add_argument("--device", help="default: the accelerator for the full size, cpu for --tiny / --scale-down")
    p.add_argument("--dtype", default="bf16")
    p.add_argument("--steps", type=int, help="default 28 (2 for --tiny / --scale-down)")
    p.add_argument("--height", type=int, help="default 1024 (64 for --tiny / --scale-down)")
    p.add_argument("--width", type=int, help="default 1024 (64 for --tiny / --scale-down)")
    p.add_argument("--guidance", type=float, default=3.5)
    p.add_argument("--runs", type=int, default=3, help="timed generations after the warm-up")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--prompt", default=PROMPT)
    p.add_argument("--compile", action="store_true", help="regional torch.compile of the DiT blocks (gen.transforms)")
    p.add_argument("--attention", default="auto", help="attention backend name or auto (gen.models.attention)")
    p.add_argument("--out", help="write the results here as JSON")
    args = p.parse_args(argv)
    small = args.tiny or args.scale_down
    args.steps = args.steps or (2 if small else 28)
    args.height = args.height or (64 if small else 1024)
    args.width = args.width or (64 if small else 1024)
    if args.runs < 1:
        p.error(f"--runs must be at least 1, got {args.runs}")
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    small = args.tiny or args.scale_down
    device = resolve_device(args.device or ("cpu" if small else None))
    dtype = resolve_dtype(args.dtype, device)
    if not small and device.type == "cpu":
        raise SystemExit("the full-size FLUX.1-dev run needs an accelerator (~31 GiB of bf16 weights); "
                         "use --tiny or --scale-down on the CPU")
    mode = "tiny" if args.tiny else ("scale-down" if args.scale_down else "flux1-dev")
    start = time.perf_counter()
    if args.tiny:
        generator, info = load_tiny(device, dtype, args.compile, args.attention)
    else:
        cfg = SCALED_DOWN if args.scale_down else REAL
        generator, info = build_generator(cfg, device, dtype, args.compile, args.attention)
    synchronize(device)
    build_s = time.perf_counter() - start
    weights_gib = memory_gib(device)
    if device.type != "cpu":
        _memory_api(device, "reset_peak_memory_stats")()
    req = GenerationRequest(prompt=args.prompt, seed=args.seed, num_inference_steps=args.steps,
                            guidance_scale=args.guidance, height=args.height, width=args.width)
    with stage_sync(device), tempfile.TemporaryDirectory() as tmp:
        warmup = generate_once(generator, req, Path(tmp), device)
        runs = [generate_once(generator, req, Path(tmp), device) for _ in range(args.runs)]
    summary = summarize(runs, args.steps)
    peak_gib = peak_memory_gib(device)
    result = {
        "env": {**environment(), "torch_device": str(device), "dtype": str(dtype).removeprefix("torch."),
                "mode": mode},
        "request": {"prompt": args.prompt, "steps": args.steps, "height": args.height, "width": args.width,
                    "guidance_scale": args.guidance, "seed": args.seed},
        "compile": args.compile,
        "attention": backend_name(),
        **info,
        "build_s": build_s,
        "warmup_total_s": warmup["total"],
        "warmup": warmup,
        "runs": runs,
        **summary,
        "weights_gib": weights_gib,
        "peak_memory_gib": peak_gib,
    }
    if args.out:
        write_json(args.out, result)
    print(json.dumps({k: result[k] for k in ("env", "request", "compile", "attention", "params", "build_s",
                                              "warmup_total_s", "weights_gib", "peak_memory_gib")}, indent=1))
    print(markdown(summary, peak_gib))
    return result


if __name__ == "__main__":
    main()
