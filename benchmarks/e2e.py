"""End-to-end generations, ours vs diffusers' pipeline side by side in one run on the same random real-size weights
(issue 21): FLUX.1-dev 1024^2 (28 and 50 steps, guidance 3.5), Qwen-Image 1024^2 and 1328^2 (50 steps, true CFG 4
against " "), Wan2.1-I2V-14B 480x832 81 frames (CFG 5: seconds per denoising step, and the one-off stages).

The components are built once per model with random weights directly on the device (benchmarks/e2e_models.py).
diffusers' pipeline runs first (eager; `--diffusers-compile` adds its regional compile), then ours takes the same
tensors (our DiT assigned the diffusers model's weights, Qwen-Image's text encoder our LLM runtime over the
transformers model's weights; the other encoders, the VAE and scheduler are the same objects), diffusers' DiT is
freed (never two copies of a 12-20B transformer), and ours runs as Generator.from_pretrained would set it up
(apply_transforms: joined projections, CFG branches batched on one GPU, `--compile`: regional compile + a 2D VAE's
decoder). Ours transforms the shared VAE in place, which is why diffusers always runs first.

Timing: per size, one warm-up generation of `--warmup-steps` steps (compilation included: reported as the cold
start), then `--runs` timed generations per workload (default 1). The clock waits for the device at stage edges:
ours' stage times are its pipeline's Timings, made to synchronize; both sides' VAE encode / decode, CLIP image
encode and (diffusers) encode_prompt are wrapped by timers that synchronize; the denoise stage runs from the first
DiT call to the end of the last step (diffusers' callback_on_step_end, ours' progress). Image rows: total wall
clock including PNG encoding of the output. Wan (`per_step`): the mean of the timed steps (every step boundary
synchronized) and the one-off stages. TFLOP/s of the denoise stage: the DiT FLOPs counted analytically per step
(e2e_models.Spec.dit_flops; the formula is printed) times the steps over the denoise seconds. Peak memory: the
device's peak allocation during the side's runs (all weights resident then included).

`--num-gpus 2`: ours runs on 2 ranks (FLUX: Ulysses, `--sp ring` for Ring; Qwen-Image and Wan: CFG parallel);
every rank builds the same components with the same seed, diffusers runs on rank 0 alone first (1 GPU) while the
other rank waits, then every rank runs our pipeline with the parallel layout and rank 0 reports.

  python benchmarks/e2e.py --model flux --compile                     # 1 H200: FLUX 28 + 50 steps (~1.2 min)
  python benchmarks/e2e.py --model qwen-image --compile               # 1 H200: Qwen-Image 1024^2, 1328^2 (~2.3 min)
  python benchmarks/e2e.py --model wan-i2v --compile                  # 1 H200: Wan2.1-I2V-14B, 3 steps (~1.8 min)
  python benchmarks/e2e.py --model flux,qwen-image --steps 50 --sizes 1024 --num-gpus 2 --compile   # 2 GPUs (~2 min)
  python benchmarks/e2e.py --model wan-i2v --num-gpus 2 --compile     # 2 GPUs (~1.5 min)
  OMP_NUM_THREADS=1 python benchmarks/e2e.py --tiny                   # CPU check, all three, tiny assets' configs
  OMP_NUM_THREADS=1 python benchmarks/e2e.py --tiny --num-gpus 2      # CPU check on 2 gloo ranks
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import json
import math
import os
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks.common import environment, write_json  # noqa: E402
from benchmarks.e2e_flux import _memory_api, memory_gib, peak_memory_gib, synced_timings  # noqa: E402
from benchmarks.e2e_models import SPECS, Spec, Workload, param_counts  # noqa: E402
from gen.types import image_bytes  # noqa: E402

PROMPT = "a photo of an astronaut riding a horse on a mountain at sunset, detailed, golden light"
COMPONENT_TIMERS = (("vae", "encode", "vae_encode"), ("vae", "decode", "vae_decode"),
                    ("image_encoder", "forward", "image_encode"))


# ---------------------------------------------------------------- the clock


class Clock:
    """One generation's stage seconds and step boundaries, waiting for the device (and, on ranks, for every rank
    at the start) so queued work lands in the stage that queued it."""

    def __init__(self, device: torch.device, group=None):
        self.device, self.group = device, group
        self.per_step = False

    def sync(self) -> None:
        if self.device.type != "cpu":
            torch.accelerator.synchronize(self.device)

    def begin(self, per_step: bool) -> None:
        self.sync()
        if self.group is not None:
            import torch.distributed as dist

            dist.barrier(group=self.group)
        self.per_step = per_step
        self.stages: dict[str, float] = {}
        self.first_call: float | None = None
        self.ends: list[float] = []
        self.t0 = time.perf_counter()

    def timed(self, fn, name: str):
        def wrapper(*args, **kwargs):
            self.sync()
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.sync()
                self.stages[name] = self.stages.get(name, 0.0) + time.perf_counter() - start

        return wrapper

    def step_end(self, step: int, total: int) -> None:
        """After denoising step `step` of `total` (1-based): every step when per_step, else only the last."""
        if self.per_step or step == total:
            self.sync()
            self.ends.append(time.perf_counter())

    def dit_called(self, module, args, kwargs) -> None:
        if self.first_call is None:
            self.sync()
            self.first_call = time.perf_counter()

    @contextlib.contextmanager
    def watching(self, targets: list[tuple[object, str, str]], dit: torch.nn.Module):
        """Within the block, each (object, method, stage) is timed and `dit`'s first call marks the denoise start."""
        saved = []
        for obj, attr, name in targets:
            saved.append((obj, attr, attr in vars(obj), vars(obj).get(attr)))
            setattr(obj, attr, self.timed(getattr(obj, attr), name))
        handle = dit.register_forward_pre_hook(self.dit_called, with_kwargs=True)
        try:
            yield
        finally:
            handle.remove()
            for obj, attr, had, value in reversed(saved):
                if had:
                    setattr(obj, attr, value)
                else:
                    delattr(obj, attr)

    def finish(self, row: dict, steps: int) -> dict:
        """`row` with the stage timers, the denoise time (first DiT call to the last step's end) and, per step, the
        seconds of each step."""
        row.update(self.stages)
        assert self.first_call is not None and self.ends, "the DiT never ran or no step ended"
        row["denoise_clock"] = self.ends[-1] - self.first_call
        if self.per_step:
            assert len(self.ends) == steps, (len(self.ends), steps)
            bounds = [self.first_call, *self.ends]
            row["step_s"] = [b - a for a, b in zip(bounds, bounds[1:])]
        return row


def component_targets(components: dict) -> list[tuple[object, str, str]]:
    return [(components[slot], attr, name) for slot, attr, name in COMPONENT_TIMERS if components.get(slot) is not None]


@contextlib.contextmanager
def synced_stages(pipeline, device: torch.device):
    """Within the block, the module of `pipeline`'s class times its stages with a Timings that synchronizes."""
    module = sys.modules[type(pipeline).__module__]
    original = module.Timings
    module.Timings = synced_timings(device)
    try:
        yield
    finally:
        module.Timings = original


def save_output(images, out_dir: Path, ours: bool) -> float:
    """Seconds to write the first image as PNG (the output encoding both sides pay: ours as gen's CLI and server
    encode it, gen.types.image_bytes; diffusers' as `image.save(path)` does); 0 for video frames."""
    if not images:
        return 0.0
    start = time.perf_counter()
    if ours:
        (out_dir / "out.png").write_bytes(image_bytes(images[0], "png"))
    else:
        images[0].save(out_dir / "out.png")
    return time.perf_counter() - start


def first_output(images, frames) -> np.ndarray:
    """The first image, or the first and last frames side by side, as uint8 (for the agreement check)."""
    if frames:
        return np.concatenate([np.asarray(frames[0].convert("RGB")), np.asarray(frames[-1].convert("RGB"))], axis=1)
    return np.asarray(images[0].convert("RGB"))


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return math.inf if mse == 0 else 10 * math.log10(255.0 ** 2 / mse)


# ---------------------------------------------------------------- one generation per side


def ours_once(gen, spec: Spec, work: Workload, steps: int, clock: Clock, args, image, out_dir: Path) -> dict:
    req = spec.request(replace(work, steps=steps), args.prompt, args.seed, image)
    pipeline = gen.pipeline
    with synced_stages(pipeline, clock.device), clock.watching(component_targets(pipeline.components.modules),
                                                               pipeline.transformer):
        clock.begin(work.per_step)
        result = gen.run(req, progress=clock.step_end)
        row = dict(result.timings)
        row["encode_output"] = save_output(result.images, out_dir, ours=True)
        row["total"] = time.perf_counter() - clock.t0
    row["output"] = first_output(result.images, result.frames)
    return clock.finish(row, steps)


def diffusers_once(pipe, spec: Spec, work: Workload, steps: int, clock: Clock, args, image, out_dir: Path) -> dict:
    kwargs = spec.diffusers_kwargs(replace(work, steps=steps), args.prompt, args.seed, image)
    targets = [(pipe, "encode_prompt", "encode_text"), *component_targets(pipe.components)]

    def on_step_end(p, i, t, tensors):
        clock.step_end(i + 1, steps)
        return {}

    with clock.watching(targets, pipe.transformer):
        clock.begin(work.per_step)
        out = pipe(**kwargs, callback_on_step_end=on_step_end)
        images = out.images if hasattr(out, "images") else []
        frames = list(out.frames[0]) if hasattr(out, "frames") else None
        row = {"encode_output": save_output(images, out_dir, ours=False)}
        row["total"] = time.perf_counter() - clock.t0
    row["output"] = first_output(images, frames)
    row = clock.finish(row, steps)
    row["denoise"] = row["denoise_clock"]  # diffusers has no stage timers of its own
    return row


def time_side(once, works: list[Workload], args, device: torch.device) -> dict:
    """One warm-up generation per size (`--warmup-steps` steps), then `--runs` timed generations per workload;
    the device's peak memory over all of them."""
    if device.type != "cpu":
        _memory_api(device, "reset_peak_memory_stats")()
    resident = memory_gib(device)
    warmups, rows = {}, []
    for work in works:
        if work.size not in warmups:
            warm = args.warmup_steps or (1 if work.per_step else 2)
            row = once(work, warm)
            warmups[work.size] = {"steps": warm, "total_s": row["total"]}
        rows.append([once(work, work.steps) for _ in range(args.runs)])
    return {"warmups": list(warmups.values()), "runs": rows, "resident_gib": resident,
            "peak_gib": peak_memory_gib(device)}


# ---------------------------------------------------------------- one model


def summarize(runs: list[dict], work: Workload, flops: dict) -> dict:
    """Medians over the timed runs: stages, total (image rows) or s/step (per_step rows), denoise TFLOP/s."""
    keys = sorted({k for r in runs for k, v in r.items() if isinstance(v, (int, float)) and k != "png_bytes"})
    stages = {k: statistics.median(r[k] for r in runs) for k in keys if all(k in r for r in runs)}
    out = {"stages_s": stages, "total_s": stages["total"]}
    if work.per_step:
        out["s_per_step"] = statistics.median(statistics.fmean(r["step_s"]) for r in runs)
        out["denoise_tflops"] = flops["per_step"] / out["s_per_step"] / 1e12
    else:
        out["denoise_tflops"] = flops["per_step"] * work.steps / stages["denoise"] / 1e12
    return out


def layout(spec: Spec, args):
    """Ours on `--num-gpus` ranks: CFG parallel for true-CFG models (Ulysses within each half beyond 2 GPUs),
    else all Ulysses or, with `--sp ring`, all Ring."""
    from gen.distributed.groups import ParallelConfig

    if spec.parallel == "cfg":
        return ParallelConfig.from_flags(args.num_gpus, cfg_parallel=True)
    return ParallelConfig.from_flags(args.num_gpus, ring_degree=args.num_gpus if args.sp == "ring" else None,
                                     ulysses_chunks=args.ulysses_chunks)


def free_device_memory(device: torch.device) -> None:
    gc.collect()
    if device.type != "cpu":
        (getattr(torch.accelerator, "empty_cache", None) or getattr(torch, device.type).empty_cache)()


def bench_models(args, device: torch.device, dtype: torch.dtype, rank: int = 0, group=None) -> list[dict]:
    """Each model of `--model` in turn; compiled code and freed weights are dropped between them."""
    models = []
    for name in args.models:
        models.append(bench_model(SPECS[name], args, device, dtype, rank, group))
        torch._dynamo.reset()
        free_device_memory(device)
    return models


def bench_model(spec: Spec, args, device: torch.device, dtype: torch.dtype, rank: int = 0, group=None) -> dict:
    from gen import Generator
    from gen.transforms import TransformOptions, apply_transforms
    from gen.models.attention import get_attention_backend

    clock = Clock(device, group)
    works = spec.workloads(args)
    start = time.perf_counter()
    modules = spec.build(args.tiny, device, dtype, args.seed)
    clock.sync()
    result = {"model": spec.name, "title": spec.title, "params": param_counts(modules),
              "build_s": time.perf_counter() - start}
    config = modules["transformer"].config
    flops = [spec.dit_flops(config, w, modules, args.prompt) for w in works]
    image = spec.input_image(works[0])
    sides: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        out_dir = Path(tmp)
        if rank == 0 and not args.skip_diffusers:
            pipe = spec.diffusers_pipeline(modules)
            sides["diffusers"] = time_side(
                lambda w, s: diffusers_once(pipe, spec, w, s, Clock(device), args, image, out_dir), works, args, device)
            if args.diffusers_compile:
                start = time.perf_counter()
                pipe.transformer.compile_repeated_blocks(fullgraph=True)
                sides["diffusers_compiled"] = time_side(
                    lambda w, s: diffusers_once(pipe, spec, w, s, Clock(device), args, image, out_dir), works, args,
                    device)
                sides["diffusers_compiled"]["compile_call_s"] = time.perf_counter() - start
            del pipe
        if group is not None:
            import torch.distributed as dist

            dist.barrier(group=group)  # the other ranks waited for rank 0's diffusers runs
        ours_modules = spec.our_modules(modules, device, dtype)
        del modules  # diffusers' DiT (and Qwen-Image's transformers text encoder) freed: ours holds the tensors
        free_device_memory(device)
        start = time.perf_counter()
        pipeline = spec.our_pipeline(ours_modules, device, dtype)
        parallel = None
        if args.num_gpus > 1:
            from gen.distributed.groups import ParallelContext

            parallel = ParallelContext.build(layout(spec, args), device, timeout_s=1800)
        options = TransformOptions(compile=args.compile, kernel_tuning=args.kernel_tuning and args.compile,
                                   attention=args.attention, cfg_batch=False if args.no_cfg_batch else None,
                                   modulation_schedule=False if args.no_modulation_schedule else None)
        applied = apply_transforms(pipeline, options, parallel)
        if args.no_gelu_epilogue:  # the library before gen/transforms/epilogue.py, for a same-run comparison
            from gen.transforms.epilogue import unfuse_gelu_epilogues

            for _, m, _ in pipeline.dits():
                unfuse_gelu_epilogues(m)
        if args.no_norm_rope:  # the library before gen/transforms/norm_rope.py, for a same-run comparison
            from gen.transforms.norm_rope import unfuse_norm_rope

            for _, m, _ in pipeline.dits():
                unfuse_norm_rope(m)
        result["ours_setup_s"] = time.perf_counter() - start
        result["ours_transforms"] = {k: v for k, v in applied.summary().items() if k != "parallel"}
        result["ours_layout"] = None if parallel is None else asdict(parallel.config)
        result["ours_classes"] = {slot: type(m).__name__ for slot, m in ours_modules.items()
                                  if slot in ("transformer", "text_encoder")}
        gen = Generator(pipeline, pipeline.components.index.path)
        sides["ours"] = time_side(lambda w, s: ours_once(gen, spec, w, s, clock, args, image, out_dir), works, args,
                                  device)
        if args.profile and device.type != "cpu":  # every rank runs it (the collectives pair up); rank 0 reports
            from benchmarks.common import kernel_breakdown

            work = works[0]
            per_gen = kernel_breakdown(lambda: ours_once(gen, spec, work, work.steps, clock, args, image, out_dir), 1)
            result["ours_kernel_ms_per_step"] = {k: v / work.steps for k, v in per_gen.items()}
            from benchmarks.common import top_kernels

            top = top_kernels(lambda: ours_once(gen, spec, work, work.steps, clock, args, image, out_dir), 1, n=40)
            result["ours_top_kernels_per_step"] = [dict(k, ms=k["ms"] / work.steps, calls=k["calls"] / work.steps)
                                                   for k in top]
        choices = getattr(get_attention_backend(), "choices", None)  # ByShape: the kernel raced in per shape
        if choices is not None:
            result["ours_attention_by_shape"] = {f"q {q} k {k}": name for (q, k, _), name in choices().items()}
    if rank != 0:
        return {}
    result["workloads"] = [report_row(spec, w, f, i, sides, args) for i, (w, f) in enumerate(zip(works, flops))]
    result["sides"] = {name: {k: v for k, v in side.items() if k != "runs"} for name, side in sides.items()}
    return result


def report_row(spec: Spec, work: Workload, flops: dict, i: int, sides: dict, args) -> dict:
    row = {"workload": work.label, **asdict(work), "flops": flops, "ours_gpus": args.num_gpus}
    outputs = {}
    for name, side in sides.items():
        runs = side["runs"][i]
        outputs[name] = runs[0]["output"]
        row[name] = {**summarize(runs, work, flops), "peak_gib": side["peak_gib"], "warmups": side["warmups"],
                     "runs": [{k: v for k, v in r.items() if k != "output"} for r in runs]}
    measure = "s_per_step" if work.per_step else "total_s"
    for name in ("diffusers", "diffusers_compiled"):
        if name in row:
            row[f"ours_over_{name}"] = row["ours"][measure] / row[name][measure]
            row[f"psnr_ours_vs_{name}_db"] = psnr(outputs["ours"], outputs[name])
    key = (*spec.key(work), args.num_gpus)
    row["peer"] = spec.peers.get(key)
    row["target"] = spec.targets.get(key)
    row["target_met"] = None if row["target"] is None else row["ours"][measure] <= row["target"]
    return row


# ---------------------------------------------------------------- ranks


def rank_main(rank: int, device: torch.device, options: dict) -> list[dict]:
    """On every rank of `--num-gpus`: build, (rank 0: time diffusers), time ours on the parallel layout."""
    import torch.distributed as dist

    args = argparse.Namespace(**options)
    if device.type == "cpu":
        torch.set_num_threads(1)  # CPU ranks share the cores
    dtype = torch.float32 if device.type == "cpu" else run_dtype(args)
    group = dist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=3600))
    return bench_models(args, device, dtype, rank, group)


def run_dtype(args) -> torch.dtype:
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]


# ---------------------------------------------------------------- report


def fmt(x, spec: str = ".2f") -> str:
    return "-" if x is None else format(x, spec)


def markdown(models: list[dict]) -> str:
    lines = ["| workload | ours GPUs | ours s | diffusers s (1 GPU) | ours / diffusers | ours stages s | "
             "peak GiB ours / diffusers | denoise TFLOP/s ours / diffusers | published (H100) | target | met |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for model in models:
        for row in model["workloads"]:
            ours, ref = row["ours"], row.get("diffusers")
            measure = "s_per_step" if row["per_step"] else "total_s"
            st = ours["stages_s"]
            if row["per_step"]:
                stages = (f"text {fmt(st.get('encode_text'), '.3f')} / CLIP {fmt(st.get('image_encode'), '.3f')} / "
                          f"VAE enc {fmt(st.get('vae_encode'), '.2f')} / VAE dec {fmt(st.get('vae_decode'), '.2f')}")
            else:
                stages = (f"text {fmt(st.get('encode_text'), '.3f')} / denoise {fmt(st.get('denoise'))} / "
                          f"decode {fmt(st.get('decode'), '.3f')} / PNG {fmt(st.get('encode_output'), '.3f')}")
            unit = " s/step" if row["per_step"] else ""
            ratio = row.get("ours_over_diffusers")
            if "diffusers_compiled" in row:
                ratio_c = row["ours_over_diffusers_compiled"]
                ref_s = f"{fmt(ref[measure])} (compiled {fmt(row['diffusers_compiled'][measure])})"
                ratio_s = f"{fmt(ratio, '.3f')} (vs compiled {fmt(ratio_c, '.3f')})"
            else:
                ref_s, ratio_s = fmt(ref[measure] if ref else None), fmt(ratio, ".3f")
            target = "-" if row["target"] is None else f"<= {row['target']}{unit or ' s'}"
            met = "-" if row["target_met"] is None else ("yes" if row["target_met"] else "NO")
            lines.append(
                f"| {row['workload']} | {row['ours_gpus']} | {fmt(ours[measure])}{unit} | {ref_s} | {ratio_s} | "
                f"{stages} | {fmt(ours['peak_gib'], '.1f')} / {fmt(ref['peak_gib'] if ref else None, '.1f')} | "
                f"{fmt(ours['denoise_tflops'], '.0f')} / {fmt(ref['denoise_tflops'] if ref else None, '.0f')} | "
                f"{row['peer'] or '-'} | {target} | {met} |")
    return "\n".join(lines)


def notes(models: list[dict]) -> str:
    lines = []
    for m in models:
        sides = m["sides"]
        cold = "; ".join(f"{name} warm-up {', '.join(fmt(w['total_s'], '.1f') + ' s' for w in side['warmups'])}"
                         for name, side in sides.items())
        lines.append(f"- {m['title']}: build {m['build_s']:.1f} s, ours setup {m['ours_setup_s']:.1f} s; {cold} "
                     f"(warm-ups include compilation); layout {m['ours_layout'] or 'one GPU'}; "
                     f"FLOPs: {m['workloads'][0]['flops']['formula']}")
        for row in m["workloads"]:
            agree = {k.removeprefix("psnr_ours_vs_").removesuffix("_db"): round(v, 1)
                     for k, v in row.items() if k.startswith("psnr_")}
            lines.append(f"  - {row['workload']}: {row['flops']['per_step'] / 1e12:.1f} TFLOP per step, "
                         f"text tokens {row['flops']['text_tokens']}; ours vs diffusers output PSNR {agree} dB")
        if "ours_kernel_ms_per_step" in m:  # --profile
            kinds = ", ".join(f"{k} {v:.2f}" for k, v in m["ours_kernel_ms_per_step"].items())
            lines.append(f"  - ours, GPU kernel ms per step (rank 0, the first workload's generation): {kinds}")
    return "\n".join(lines)


# ---------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=",".join(SPECS), help=f"comma-separated subset of {list(SPECS)}")
    p.add_argument("--steps", help="comma-separated step counts (FLUX: 28,50; Qwen-Image: 50; Wan: timed steps, 3)")
    p.add_argument("--sizes", help="comma-separated square sizes (FLUX: 1024; Qwen-Image: 1024,1328; not Wan)")
    p.add_argument("--tiny", action="store_true", help="the tiny assets' configs on the CPU (a check, both sides)")
    p.add_argument("--num-gpus", type=int, default=1, help="ranks ours runs on (diffusers: rank 0 alone)")
    p.add_argument("--sp", choices=["ulysses", "ring"], default="ulysses", help="FLUX's layout on several GPUs")
    p.add_argument("--ulysses-chunks", type=int, default=1, help="Ulysses head groups pipelined with the all-to-alls")
    p.add_argument("--runs", type=int, default=1, help="timed generations per workload after the warm-up")
    p.add_argument("--warmup-steps", type=int, help="steps of the warm-up generation per size (default 2; Wan 1)")
    p.add_argument("--compile", action="store_true", help="ours: regional compile (+ a 2D VAE's decoder)")
    p.add_argument("--diffusers-compile", action="store_true",
                   help="also time diffusers with transformer.compile_repeated_blocks(fullgraph=True)")
    p.add_argument("--skip-diffusers", action="store_true", help="time ours only")
    p.add_argument("--no-cfg-batch", action="store_true",
                   help="ours: CFG branches as two forwards (default on one GPU: one batched forward)")
    p.add_argument("--attention", default="auto", help="ours: attention backend name or auto")
    p.add_argument("--no-modulation-schedule", action="store_true",
                   help="ours: the adaLN modulations per step (before gen/transforms/modulation.py), for an A/B")
    p.add_argument("--no-gelu-epilogue", action="store_true",
                   help="ours: GELU(tanh) and its matmul as separate kernels (gen/transforms/epilogue.py off)")
    p.add_argument("--no-norm-rope", action="store_true",
                   help="ours: q/k RMSNorm and RoPE as compiled plain ops, not the fused kernel (an A/B)")
    p.add_argument("--kernel-tuning", action="store_true",
                   help="ours, with --compile: inductor's coordinate-descent tuning of its Triton kernels")
    p.add_argument("--profile", action="store_true",
                   help="ours: GPU kernel ms per step by kind over one more generation of the first workload (rank 0)")
    p.add_argument("--device", help="default: the accelerator (cpu with --tiny)")
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"], help="(fp32 on the CPU)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--prompt", default=PROMPT)
    p.add_argument("--out", help="JSON results (default: $OUT/e2e_<models>_<n>gpu.json when $OUT is set)")
    args = p.parse_args(argv)
    args.models = [m for m in args.model.split(",") if m]
    unknown = [m for m in args.models if m not in SPECS]
    if unknown or not args.models:
        p.error(f"--model {args.model!r}: unknown {unknown}; choose from {list(SPECS)}")
    for name, value in (("--runs", args.runs), ("--num-gpus", args.num_gpus), ("--warmup-steps", args.warmup_steps)):
        if value is not None and value < 1:
            p.error(f"{name} must be at least 1, got {value}")
    try:
        for name in args.models:
            SPECS[name].workloads(args)
    except ValueError as e:
        p.error(str(e))
    return args


def main(argv: list[str] | None = None) -> dict:
    from gen.device import resolve_device

    args = parse_args(argv)
    device = resolve_device(args.device or ("cpu" if args.tiny else None))
    if device.type == "cpu" and not args.tiny:
        raise SystemExit("the real-size models need an accelerator (12-20B DiTs); use --tiny on the CPU")
    dtype = torch.float32 if device.type == "cpu" else run_dtype(args)
    if args.num_gpus == 1:
        models = bench_models(args, device, dtype)
    else:
        from gen.distributed.ranks import run_on_ranks

        if device.type != "cpu" and torch.accelerator.device_count() < args.num_gpus:
            raise SystemExit(f"--num-gpus {args.num_gpus}: this machine has {torch.accelerator.device_count()}")
        models = run_on_ranks(rank_main, args.num_gpus, vars(args), device_type=device.type, timeout_s=3600)[0]
    result = {"env": {**environment(), "torch_device": str(device), "dtype": str(dtype).removeprefix("torch."),
                      "mode": "tiny" if args.tiny else "real"},
              "args": {k: v for k, v in vars(args).items() if k != "model"}, "models": models}
    out = args.out or (os.path.join(os.environ["OUT"], f"e2e_{'_'.join(args.models)}_{args.num_gpus}gpu.json")
                       if os.environ.get("OUT") else None)
    if out:
        write_json(out, result)
        print(f"wrote {out}")
    print(json.dumps(result["env"]))
    print(notes(models))
    print()
    print(markdown(models))
    return result


if __name__ == "__main__":
    main()
