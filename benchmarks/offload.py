"""Offload on real-size models with random weights: GPU memory capped (torch.cuda.set_per_process_memory_fraction) to
24 and 16 GB; per run the time per denoising step, the time to the first image (text encoding, the steps and the VAE
decode, weight moves included), the peak GPU memory and the setup time (pinning), side by side in one process:

- `resident`: ours, every component on the GPU (uncapped: the step time offload is measured against);
- `ours`: ours with max_gpu_memory = the cap (the plan it picks: model, or layer with as many blocks kept as fit);
- `ours-layer`: ours streaming every DiT block (no budget; at the smallest cap): the bandwidth-bound case;
- `ours-fp8`, `ours-q8`: (`--quant`) the DiT's block linears as FP8 (Fp8Linear, as an FP8 checkpoint loads on
  Hopper) or GGUF Q8_0 (GGUFLinear, dequantized per layer), with max_gpu_memory = the cap;
- `diffusers-model`: diffusers' pipeline with enable_model_cpu_offload (skipped where its largest component alone
  exceeds the cap);
- `diffusers-group`: diffusers' pipeline with enable_group_offload(block_level, 1 block per group, use_stream=True,
  record_stream=True).

Models (the real architectures; tokenizers and schedulers from the tiny assets, whose ids fit the real vocabularies):
FLUX.1-dev (CLIP-L, T5-XXL, 12B DiT, 16-channel VAE) at 1024^2; Wan2.1-T2V-14B (UMT5-XXL, 14B DiT, Wan VAE) at
480x832 (--frames, default 33: 14k tokens, CFG); Qwen-Image (Qwen2.5-VL-7B through transformers, 20B DiT, its VAE) at
1328^2 with true CFG. Each run builds its models on the GPU (fast random init), moves them to the host when it
offloads, caps the GPU, generates once with --steps steps, and frees everything. Also measured: pinned host-to-device
bandwidth, from which the layer target is 1.15 x max(resident step, DiT bytes / bandwidth).

  python benchmarks/offload.py --models flux --out offload_flux.json            # H200: ~2.5 min
  python benchmarks/offload.py --models wan --out offload_wan.json              # ~3 min
  python benchmarks/offload.py --models qwen --quant fp8,q8 --out offload_qwen.json  # ~4.5 min
  OMP_NUM_THREADS=1 python benchmarks/offload.py --tiny                         # CPU check: tiny configs
Rows are appended to the JSON as they finish (--out, or $OUT/offload.json), so a killed run keeps what it measured.
The CUDA allocator runs with expandable segments (PYTORCH_CUDA_ALLOC_CONF, unless set) for every variant alike.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")  # every variant alike: less fragmentation
import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks.common import environment, write_json  # noqa: E402
from benchmarks.e2e_flux import REAL as FLUX_REAL, building_on  # noqa: E402

GB = 1e9
GIB = 1 << 30
ASSETS = ROOT / "assets"
PROMPT = "a photo of an astronaut riding a horse on a mountain at sunset"
BOOKKEEPING = ("_class_name", "_diffusers_version", "_name_or_path", "architectures", "transformers_version", "dtype")

# slot -> (library, class, config class or None) per model; a model's folder layout is its tiny asset's
CLASSES = {
    "flux": {"text_encoder": ("transformers", "CLIPTextModel", "CLIPTextConfig"),
             "text_encoder_2": ("transformers", "T5EncoderModel", "T5Config"),
             "transformer": ("diffusers", "FluxTransformer2DModel", None), "vae": ("diffusers", "AutoencoderKL", None)},
    "wan": {"text_encoder": ("transformers", "UMT5EncoderModel", "UMT5Config"),
            "transformer": ("diffusers", "WanTransformer3DModel", None),
            "vae": ("diffusers", "AutoencoderKLWan", None)},
    "qwen": {"text_encoder": ("transformers", "Qwen2_5_VLForConditionalGeneration", "Qwen2_5_VLConfig"),
             "transformer": ("diffusers", "QwenImageTransformer2DModel", None),
             "vae": ("diffusers", "AutoencoderKLQwenImage", None)},
}
ASSET = {"flux": "flux-tiny", "wan": "wan-t2v-tiny", "qwen": "qwen-image-tiny"}
UMT5_XXL = dict(vocab_size=256384, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_decoder_layers=24,
                num_heads=64, relative_attention_num_buckets=32, relative_attention_max_distance=128)
REAL = {  # the real sizes, over the tiny assets' configs (None: the class's defaults, which are the real model's)
    "flux": {"text_encoder": FLUX_REAL["clip"], "text_encoder_2": FLUX_REAL["t5"],
             "transformer": FLUX_REAL["transformer"], "vae": FLUX_REAL["vae"]},
    "wan": {"text_encoder": UMT5_XXL,
            "transformer": dict(patch_size=[1, 2, 2], num_attention_heads=40, attention_head_dim=128, in_channels=16,
                                out_channels=16, text_dim=4096, freq_dim=256, ffn_dim=13824, num_layers=40,
                                cross_attn_norm=True, qk_norm="rms_norm_across_heads", eps=1e-6, image_dim=None,
                                added_kv_proj_dim=None, rope_max_seq_len=1024),
            "vae": None},
    "qwen": {"text_encoder": {"vocab_size": 152064,
                              "text_config": dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                                                  num_attention_heads=28, num_key_value_heads=4, vocab_size=152064,
                                                  rms_norm_eps=1e-6, max_position_embeddings=128000,
                                                  layer_types=["full_attention"] * 28,
                                                  rope_parameters={"mrope_section": [16, 24, 24], "rope_theta": 1e6,
                                                                   "rope_type": "default"}),
                              "vision_config": dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16,
                                                    out_hidden_size=3584, fullatt_block_indexes=[7, 15, 23, 31])},
             "transformer": dict(patch_size=2, in_channels=64, out_channels=16, num_layers=60, attention_head_dim=128,
                                 num_attention_heads=24, joint_attention_dim=3584, guidance_embeds=False,
                                 axes_dims_rope=[16, 56, 56]),
             "vae": None},
}
REQUESTS = {  # real, tiny
    "flux": (dict(height=1024, width=1024, guidance_scale=3.5), dict(height=64, width=64, guidance_scale=3.5)),
    "wan": (dict(height=480, width=832, guidance_scale=5.0, negative_prompt=""),
            dict(height=32, width=32, guidance_scale=5.0, negative_prompt="", num_frames=5)),
    "qwen": (dict(height=1328, width=1328, true_cfg_scale=4.0, negative_prompt=" "),
             dict(height=32, width=32, true_cfg_scale=4.0, negative_prompt=" ")),
}


# ---------------------------------------------------------------- building the models


def tiny_config(model: str, slot: str) -> dict:
    cfg = json.loads((ASSETS / ASSET[model] / slot / "config.json").read_text())
    return {k: v for k, v in cfg.items() if k not in BOOKKEEPING}


def merged(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = merged(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def slot_config(model: str, slot: str, tiny: bool) -> dict:
    if tiny:
        return tiny_config(model, slot)
    over = REAL[model][slot]
    if over is None:  # the diffusers class's defaults are the real VAE
        return {}
    base = tiny_config(model, slot) if CLASSES[model][slot][0] == "transformers" else {}
    return merged(base, over)


def build(model: str, tiny: bool, ours: bool, device: torch.device, dtype: torch.dtype,
          quant: str | None = None) -> dict[str, Any]:
    """Every component of `model`'s folder: tokenizers and scheduler from its tiny asset, the models built with
    random weights directly on `device` in `dtype` (ours: our DiT; else diffusers')."""
    import diffusers
    import transformers

    from component_loaders.model_index import read_model_index
    from gen.config import config_from_dict
    from gen.families import DITS

    index = read_model_index(ASSETS / ASSET[model])
    modules: dict[str, Any] = {}
    for slot, spec in index.components.items():
        if spec is None:
            continue
        library, cls_name = spec
        if slot not in CLASSES[model]:  # tokenizer, scheduler
            if library == "transformers":
                modules[slot] = getattr(transformers, cls_name).from_pretrained(str(ASSETS / ASSET[model] / slot))
            else:
                modules[slot] = getattr(diffusers, cls_name).from_pretrained(str(ASSETS / ASSET[model] / slot))
    torch.manual_seed(0)
    with building_on(device, dtype):
        for slot, (library, cls_name, config_cls) in CLASSES[model].items():
            cfg = slot_config(model, slot, tiny)
            if config_cls is not None:
                config = getattr(transformers, config_cls).from_dict(cfg)
                modules[slot] = getattr(transformers, cls_name)(config).eval()
            elif slot == "transformer" and ours:
                dit = DITS[cls_name]
                modules[slot] = dit.model(config_from_dict(dit.config, cfg)).eval()
            else:
                modules[slot] = getattr(diffusers, cls_name).from_config(cfg).eval()
    if quant is not None:
        quantize_blocks(modules["transformer"], quant)
    return modules


def q8_0(w: torch.Tensor) -> torch.Tensor:
    """(out, in) weights -> GGUF Q8_0 blocks (out, in / 32 * 34) uint8, on w's device: fp16 scale, 32 int8."""
    b = w.float().reshape(-1, 32)
    d = b.abs().amax(dim=1, keepdim=True) / 127
    q = torch.where(d > 0, b / d, torch.zeros_like(b)).round().clamp(-127, 127).to(torch.int8)
    return torch.cat([d.half().view(torch.uint8), q.view(torch.uint8)], dim=1).reshape(w.shape[0], -1)


def quantize_blocks(model: torch.nn.Module, quant: str) -> int:
    """The DiT's block linears as Fp8Linear (`fp8`) or GGUFLinear Q8_0 (`q8`), quantized where they are."""
    from gen.families import dit_of
    from gen.models.quantized import GGUFLinear
    from gen.transforms.fp8 import quantize_transformer

    blocks = dit_of(model).blocks
    if quant == "fp8":
        return quantize_transformer(model, blocks)["fp8_linears"]
    assert quant == "q8", quant
    n = 0
    for attr in blocks:
        for block in getattr(model, attr):
            for name, lin in list(block.named_modules()):
                if type(lin) is not torch.nn.Linear or lin.in_features % 32:
                    continue
                layer = GGUFLinear(lin.in_features, lin.out_features, "Q8_0", lin.bias is not None,
                                   lin.weight.dtype, lin.weight.device)
                layer.weight = q8_0(lin.weight.detach())
                if lin.bias is not None:
                    layer.bias.data = lin.bias.detach()
                parent, _, child = name.rpartition(".")
                setattr(block.get_submodule(parent) if parent else block, child, layer)
                n += 1
    return n


def nbytes(module: torch.nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in list(module.parameters()) + list(module.buffers()))


def to_host(modules: dict[str, Any]) -> None:
    for m in modules.values():
        if isinstance(m, torch.nn.Module):
            m.to("cpu")


# ---------------------------------------------------------------- running


class Clock:
    """Wall-clock marks at each denoising step (the device synchronized first)."""

    def __init__(self, device: torch.device):
        self.device, self.start, self.steps = device, 0.0, []

    def sync(self) -> None:
        if self.device.type != "cpu":
            torch.accelerator.synchronize()

    def begin(self) -> None:
        self.sync()
        self.start, self.steps = time.perf_counter(), []

    def step(self) -> None:
        self.sync()
        self.steps.append(time.perf_counter())

    def end(self) -> dict:
        self.sync()
        total = time.perf_counter() - self.start
        marks = [self.start] + self.steps
        durations = [b - a for a, b in zip(marks, marks[1:])]
        return {"ttfi_s": total, "step_s": durations[-1] if len(durations) > 1 else None,
                "first_step_s": durations[0] if durations else None}


def request(model: str, tiny: bool, steps: int, frames: int) -> dict:
    kw = dict(REQUESTS[model][1 if tiny else 0], prompt=PROMPT, num_inference_steps=steps, seed=0)
    if model == "wan" and not tiny:
        kw["num_frames"] = frames
    return kw


def run_ours(model: str, modules: dict, device, dtype, req: dict, options: dict) -> dict:
    from component_loaders import Components
    from component_loaders.model_index import read_model_index
    from gen.families import pipeline_class
    from gen.transforms import TransformOptions, apply_transforms
    from gen.types import GenerationRequest

    index = read_model_index(ASSETS / ASSET[model])
    pipeline = pipeline_class(index.class_name)(Components(index, modules), device, dtype)
    clock = Clock(device)
    clock.begin()
    apply_transforms(pipeline, TransformOptions(**options))
    setup = time.perf_counter() - clock.start
    step = pipeline.transforms.get("offload")
    row = {"setup_s": setup, "plan": None if step is None else step.detail.plan.describe(),
           "mode": "none" if step is None else step.detail.plan.mode}
    clock.begin()
    pipeline(GenerationRequest(**req), progress=lambda i, n: clock.step())
    row.update(clock.end())
    if step is not None:
        row["moved_gb"] = step.detail.mover.stats["bytes"] / GB
    return row


def run_diffusers(model: str, modules: dict, device, req: dict, how: str, low_cpu_mem: bool = False) -> dict:
    import diffusers

    from component_loaders.model_index import read_model_index

    index = read_model_index(ASSETS / ASSET[model])
    pipe = getattr(diffusers, index.class_name)(**{k: v for k, v in modules.items() if k in index.components})
    pipe.set_progress_bar_config(disable=True)
    clock = Clock(device)
    clock.begin()
    if how == "model":
        pipe.enable_model_cpu_offload(device=device)
    elif how == "group":
        pipe.enable_group_offload(onload_device=device, offload_device=torch.device("cpu"), offload_type="block_level",
                                  num_blocks_per_group=1, use_stream=True, record_stream=True,
                                  low_cpu_mem_usage=low_cpu_mem)
    else:
        pipe.to(device)
    setup = time.perf_counter() - clock.start
    kw = {k: v for k, v in req.items() if k != "seed"}
    kw["generator"] = torch.Generator("cpu").manual_seed(req["seed"])
    kw["output_type"] = "np"

    def on_step(p, i, t, kwargs):
        clock.step()
        return kwargs

    clock.begin()
    pipe(**kw, callback_on_step_end=on_step)
    return {"setup_s": setup, "mode": how, **clock.end()}


def free() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.set_per_process_memory_fraction(1.0)
        if hasattr(torch.accelerator, "empty_host_cache"):  # torch >= 2.12
            torch.accelerator.empty_host_cache()
        elif hasattr(torch._C, "_host_emptyCache"):
            torch._C._host_emptyCache()


def cap_gpu(cap_gb: float | None) -> None:
    if cap_gb is not None and torch.cuda.is_available():
        total = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, cap_gb * GB / total))
        torch.cuda.reset_peak_memory_stats()


def bandwidth_gbs(device: torch.device, size: int = 2 * GIB) -> float | None:
    """Pinned host -> device copy bandwidth (GB/s), median of 3."""
    if device.type == "cpu":
        return None
    host = torch.empty(size, dtype=torch.uint8, pin_memory=True)
    dev = torch.empty(size, dtype=torch.uint8, device=device)
    times = []
    for _ in range(3):
        start, end = torch.Event(enable_timing=True), torch.Event(enable_timing=True)
        start.record()
        dev.copy_(host, non_blocking=True)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    del host, dev
    free()
    return size / sorted(times)[1] / GB


def one_run(model, variant, cap, args, device, dtype, req) -> dict:
    """Build, (move to the host), cap, run, free: one row."""
    row = {"model": model, "variant": variant, "cap_gb": cap}
    quant = {"ours-fp8": "fp8", "ours-q8": "q8"}.get(variant)
    ours = variant == "resident" or variant.startswith("ours")
    modules = build(model, args.tiny, ours, device, dtype, quant)
    sizes = {s: nbytes(m) for s, m in modules.items() if isinstance(m, torch.nn.Module)}
    row["dit_gb"] = sizes["transformer"] / GB
    row["largest_gb"] = max(sizes.values()) / GB
    try:
        if variant == "diffusers-model" and cap is not None and max(sizes.values()) > cap * GB:
            row["status"] = f"skipped: its largest component ({max(sizes, key=sizes.get)}, " \
                            f"{max(sizes.values()) / GB:.1f} GB) alone exceeds the cap"
            return row
        if variant != "resident":
            to_host(modules)
            free()
        cap_gpu(cap)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        if ours:
            options = {}
            if variant == "ours-layer":
                options = dict(offload="layer")
            elif variant != "resident":  # on the CPU there is no cap: model offload, for the plumbing
                options = dict(offload="model") if args.tiny else dict(max_gpu_memory=cap * GB / GIB)
            options["vae_tiling"] = cap is not None and not args.tiny
            row.update(run_ours(model, modules, device, dtype, req, options))
        else:
            how = variant.removeprefix("diffusers-")
            if cap is not None and not args.tiny:
                modules["vae"].enable_tiling()
            row.update(run_diffusers(model, modules, device, req, how, args.group_low_cpu_mem))
        row["status"] = "ok"
        row["peak_gib"] = torch.cuda.max_memory_allocated() / GIB if device.type == "cuda" else None
    except torch.OutOfMemoryError as e:
        row["status"] = f"OOM: {str(e).splitlines()[0][:160]}"
    except Exception as e:  # noqa: BLE001 (a failed variant is a row, the others still run)
        row["status"] = f"error: {type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
    finally:
        modules.clear()
        free()
    return row


def table(rows: list[dict]) -> str:
    lines = ["| model | cap GB | variant | mode | step s | first step s | TTFI s | setup s | peak GiB | status |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    f = lambda v: "-" if v is None else (f"{v:.2f}" if isinstance(v, float) else str(v))  # noqa: E731
    for r in rows:
        lines.append(f"| {r['model']} | {f(r['cap_gb'])} | {r['variant']} | {r.get('mode', '-')} | "
                     f"{f(r.get('step_s'))} | {f(r.get('first_step_s'))} | {f(r.get('ttfi_s'))} | "
                     f"{f(r.get('setup_s'))} | {f(r.get('peak_gib'))} | {r.get('status', '')[:60]} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", default="flux,wan,qwen")
    p.add_argument("--caps", default="24,16", help="GPU caps in GB (decimal), comma separated")
    p.add_argument("--variants", default="resident,ours,ours-layer,diffusers-model,diffusers-group",
                   help="which runs (ours-layer runs at the smallest cap only)")
    p.add_argument("--quant", default="", help="also ours with quantized DiT blocks: fp8, q8 (comma separated)")
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--frames", type=int, default=33, help="Wan frames (4k+1; 81 is Wan's default)")
    p.add_argument("--tiny", action="store_true", help="CPU check: the tiny assets' configs, no caps, no diffusers "
                                                       "offload (it needs an accelerator)")
    p.add_argument("--group-low-cpu-mem", action="store_true",
                   help="diffusers-group pins on the fly (low_cpu_mem_usage): for hosts short of RAM")
    p.add_argument("--out", help="JSON path (default: $OUT/offload.json when $OUT is set)")
    args = p.parse_args(argv)
    device = torch.device("cpu") if args.tiny else torch.device("cuda")
    dtype = torch.float32 if args.tiny else torch.bfloat16
    out = args.out or (os.path.join(os.environ["OUT"], "offload.json") if os.environ.get("OUT") else None)
    caps = [None] if args.tiny else [float(c) for c in args.caps.split(",") if c]
    variants = [v for v in args.variants.split(",") if v]
    variants += [f"ours-{q}" for q in args.quant.split(",") if q]
    if args.tiny:
        variants = [v for v in variants if v not in ("diffusers-model", "diffusers-group")] + ["diffusers-resident"]
    result = {"environment": environment(), "args": vars(args), "bandwidth_gbs": bandwidth_gbs(device), "rows": []}
    for model in [m for m in args.models.split(",") if m]:
        req = request(model, args.tiny, args.steps, args.frames)
        for variant in variants:
            if variant in ("resident", "diffusers-resident"):
                runs = [None]
            elif variant == "ours-layer":
                runs = [min(caps, key=lambda c: c or 0)]
            else:
                runs = caps
            for cap in runs:
                row = one_run(model, variant, cap, args, device, dtype, req)
                result["rows"].append(row)
                print(f"{model} {variant} cap={cap}: {row.get('status')} step={row.get('step_s')} "
                      f"ttfi={row.get('ttfi_s')} peak={row.get('peak_gib')}", flush=True)
                if out:
                    write_json(out, result)
        resident = next((r for r in result["rows"] if r["model"] == model and r["variant"] == "resident"
                         and r.get("step_s")), None)
        bw = result["bandwidth_gbs"]
        if resident and bw:
            bound = max(resident["step_s"], resident["dit_gb"] / bw)
            for r in result["rows"]:
                if r["model"] == model and r.get("mode") == "layer" and r.get("step_s"):
                    r["layer_target_s"] = 1.15 * bound
                    r["within_target"] = r["step_s"] <= 1.15 * bound
    print(table(result["rows"]))
    if result["bandwidth_gbs"]:
        print(f"pinned host -> device: {result['bandwidth_gbs']:.1f} GB/s")
    if out:
        write_json(out, result)
    return result


if __name__ == "__main__":
    main()
