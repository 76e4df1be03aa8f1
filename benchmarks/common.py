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


def idle_gaps(fn, n: int = 15) -> dict:
    """Where the GPU waits during one call of `fn` (torch.profiler, kernels only): see gaps_of."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    _sync()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        _sync()
    return gaps_of([(e.time_range.start, e.time_range.end, e.name[:100]) for e in prof.events()
                    if e.device_type == torch.autograd.DeviceType.CUDA], n)


def gaps_of(spans: list[tuple[float, float, str]], n: int = 15) -> dict:
    """Kernel spans (start us, end us, name) -> the time no kernel ran between the first and the last, summed by
    the kernel that came next (what the GPU waited to be given), with the count of gaps over 5 us, and the `n`
    largest gaps with their neighbours. Launch gaps of a few us sit before every kernel; longer ones before the same
    kernel in every block point at the host. (Under the profiler the host is slower: read the sums as relative.)"""
    spans = sorted(s for s in spans if s[1] > s[0])
    by_next: dict[str, list] = {}
    largest = []
    busy_until = spans[0][1] if spans else 0.0
    prev = spans[0][2] if spans else ""
    for start, end, name in spans[1:]:
        gap = start - busy_until
        if gap > 0:
            row = by_next.setdefault(name, [0.0, 0, 0])
            row[0] += gap / 1e3
            row[1] += 1
            row[2] += gap > 5
            largest.append((gap, prev, name))
        if end > busy_until:
            busy_until, prev = end, name
    largest.sort(reverse=True)
    return {"kernels": len(spans), "idle_ms": sum(r[0] for r in by_next.values()),
            "span_ms": (spans[-1][1] - spans[0][0]) / 1e3 if spans else 0.0,
            "by_next_kernel": [{"next": k, "ms": v[0], "gaps": v[1], "over_5us": v[2]}
                               for k, v in sorted(by_next.items(), key=lambda kv: -kv[1][0])[:n]],
            "largest": [{"us": g, "after": a, "before": b} for g, a, b in largest[:n]]}


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
