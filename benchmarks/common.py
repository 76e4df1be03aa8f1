"""Timing helpers for the GPU benchmarks: event timing with warm-up and medians, FLOP counting, peak memory."""
from __future__ import annotations

import json
import platform
import statistics
import time
from datetime import date

import torch
from torch.utils.flop_counter import FlopCounterMode


def _sync() -> None:
    if torch.accelerator.is_available():
        torch.accelerator.synchronize()


def time_ms(fn, warmup: int = 3, iters: int = 10) -> float:
    """Median milliseconds of `fn()` on the current accelerator (events; host clock on CPU), after `warmup` calls."""
    for _ in range(warmup):
        fn()
    _sync()
    if not torch.accelerator.is_available():
        times = []
        for _ in range(iters):
            t = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t) * 1e3)
        return statistics.median(times)
    times = []
    for _ in range(iters):
        start, end = torch.Event(enable_timing=True), torch.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def cold_start_s(fn) -> float:
    """Seconds for the first call (compilation / warm-up included)."""
    _sync()
    t = time.perf_counter()
    fn()
    _sync()
    return time.perf_counter() - t


def count_flops(fn) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def environment() -> dict:
    import diffusers
    import transformers

    props = torch.cuda.get_device_properties(0) if torch.cuda.is_available() else None
    return {"date": date.today().isoformat(), "device": props.name if props else platform.processor(),
            "torch": torch.__version__, "diffusers": diffusers.__version__, "transformers": transformers.__version__,
            "cuda": torch.version.cuda}


def write_json(path, data) -> None:
    with open(path, "w") as f:
        json.dump(data, f, indent=2)


def save_result(out: str | None, name: str, data) -> str | None:
    """Write `data` as JSON to `out`, else to $OUT/`name` when the device tool's OUT is set; the path, or None."""
    import os

    path = out or (os.path.join(os.environ["OUT"], name) if os.environ.get("OUT") else None)
    if path:
        write_json(path, data)
    return path


KERNEL_KINDS = (  # (kind, substrings of the lower-cased kernel name), first match wins
    ("communication (nccl)", ("nccl",)),
    ("attention", ("flash", "fmha", "sdpa", "attention", "attn")),
    ("matmul", ("gemm", "nvjet", "xmma", "cutlass", "matmul", "_mm_", "scaled_mm")),
    ("fused elementwise / norm (triton)", ("triton",)),
    ("copy / cat", ("copy", "cat", "memcpy", "memset")),
)


def kernel_kind(name: str) -> str:
    low = name.lower()
    for kind, keys in KERNEL_KINDS:
        if any(k in low for k in keys):
            return kind
    return "other elementwise"


def top_kernels(fn, iters: int = 3, n: int | None = 40) -> list[dict]:
    """The `n` kernels (None: all) with the most GPU time per call of `fn` (torch.profiler): name, kind, ms and
    launches per call; for comparing two implementations kernel by kernel."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    _sync()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            fn()
        _sync()
    rows = []
    for evt in prof.key_averages():
        us = getattr(evt, "self_device_time_total", 0) or 0
        if us and evt.device_type == torch.autograd.DeviceType.CUDA:
            rows.append({"name": evt.key[:120], "kind": kernel_kind(evt.key), "ms": us / 1e3 / iters,
                         "calls": evt.count / iters})
    return sorted(rows, key=lambda r: -r["ms"])[:n]


def gpu_ms(fn, iters: int = 20) -> float:
    """Milliseconds of GPU kernel time per call of `fn` (the profiler's sum over the kernels it launched): the host
    cost of launching from Python is left out, as it would be inside a compiled graph. Wall time off CUDA."""
    if not torch.cuda.is_available():
        return time_ms(fn, warmup=1, iters=iters)
    return sum(k["ms"] for k in top_kernels(fn, iters, n=None))


def kernel_breakdown(fn, iters: int = 3) -> dict:
    """GPU kernel milliseconds per call of `fn` by kind (torch.profiler), plus the wall time per call and the
    share of it no kernel ran ('gpu idle'): launch gaps and host waits."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    _sync()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        start, end = torch.Event(enable_timing=True), torch.Event(enable_timing=True)
        start.record()
        for _ in range(iters):
            fn()
        end.record()
        end.synchronize()
    totals: dict[str, float] = {}
    for evt in prof.key_averages():
        us = getattr(evt, "self_device_time_total", 0) or 0
        if us and evt.device_type == torch.autograd.DeviceType.CUDA:
            kind = kernel_kind(evt.key)
            totals[kind] = totals.get(kind, 0.0) + us / 1e3 / iters
    wall = start.elapsed_time(end) / iters
    out = dict(sorted(totals.items(), key=lambda kv: -kv[1]))
    out["wall"] = wall
    out["gpu idle"] = max(0.0, wall - sum(totals.values()))
    return out
