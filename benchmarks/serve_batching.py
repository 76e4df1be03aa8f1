"""Throughput and latency of `gen serve` under concurrent HTTP clients, --max-batch 1 (one generation at a time) vs
--max-batch N (up to N at once on the worker pool, their DiT calls batched).

The server runs in this process (uvicorn in a thread, the app `gen serve` builds, no UI); each client is a thread
posting /v1/images/generations one after another (its own prompt and seed, b64_json PNG answers), so the numbers
include admission, queueing, PNG encoding and HTTP. Per setting: images per minute and p50 / p95 request latency.
The models are benchmarks/batching.py's (the Generator-level variant of this benchmark).

  python benchmarks/serve_batching.py --model shapes --clients 1 4 16                       # GPU: default model
  python benchmarks/serve_batching.py --model flux --size 512 --steps 4 --clients 1 4 16    # GPU: FLUX.1-dev-sized
  OMP_NUM_THREADS=1 python benchmarks/serve_batching.py --tiny                              # CPU check (flux-tiny)
"""
from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks.batching import PROMPTS, add_load_arguments, load, run_threads, use_random_encoder  # noqa: E402
from benchmarks.common import environment, save_result  # noqa: E402
from gen.device import resolve_device, resolve_dtype  # noqa: E402


def run_clients(url: str, clients: int, per_client: int, body: dict) -> dict:
    """`clients` threads each posting `per_client` requests; latencies in seconds and the wall time."""
    import httpx

    latencies: list[float] = []
    errors: list[str] = []
    start = threading.Barrier(clients + 1)

    def client(c: int) -> None:
        with httpx.Client(base_url=url, timeout=600) as http:
            start.wait()
            for i in range(per_client):
                t = time.perf_counter()
                r = http.post("/v1/images/generations",
                              json={**body, "prompt": PROMPTS[(c + i) % len(PROMPTS)], "seed": 1000 * c + i})
                if r.status_code != 200:
                    errors.append(f"{r.status_code} {r.text[:200]}")
                    return
                latencies.append(time.perf_counter() - t)

    wall = run_threads(client, clients, start)
    if errors:
        raise RuntimeError(f"{len(errors)} request(s) failed, first: {errors[0]}")
    lat = sorted(latencies)
    return {"clients": clients, "requests": len(lat), "wall_s": wall, "images_per_min": 60 * len(lat) / wall,
            "p50_s": statistics.median(lat), "p95_s": lat[min(len(lat) - 1, round(0.95 * (len(lat) - 1)))]}


def serve(generator, max_queue: int):
    """The app `gen serve` builds for `generator`, limits opened wide (the benchmark picks sizes and steps)."""
    from gen.server.app import create_app
    from gen.server.limits import Limits

    limits = Limits.for_model(generator, max_pixels=4096 * 4096, max_steps=1000, max_work=1e9)
    return create_app(generator, output_dir=tempfile.mkdtemp(prefix="gen-bench-"), max_queue=max_queue, ui=False,
                      limits=limits, output_ttl=None)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_load_arguments(p)
    p.add_argument("--random-encoder", metavar="DIR", help="the default model's encoder with random weights "
                                                           "(benchmarks/batching.py --write-encoder DIR first)")
    p.add_argument("--out", help="write the results here as JSON (default: $OUT/serve_batching.json when $OUT is set)")
    args = p.parse_args(argv)
    from gen.server.http import serve_in_thread

    model = "tiny" if args.tiny else args.model
    device = resolve_device(args.device or ("cpu" if args.tiny else None))
    dtype = resolve_dtype(args.dtype, device)
    if args.random_encoder:
        use_random_encoder(args.random_encoder, device, dtype)
    body: dict = {"response_format": "b64_json"}
    if args.size or args.tiny:
        body["size"] = f"{args.size or 64}x{args.size or 64}"
    if args.steps or args.tiny:
        body["num_inference_steps"] = args.steps or 2
    rows = []
    for max_batch in (1, args.max_batch):
        generator = load(model, device, dtype, max_batch, args.batch_wait_ms, args.compile)
        app = serve(generator, max_queue=2 * max(args.clients))
        with serve_in_thread(app) as url:
            run_clients(url, 1, 1, body)  # warm-up (compile, caches)
            run_clients(url, max(args.clients), 1, body)  # and one round at the largest size
            for clients in args.clients:
                group = generator.batch_group
                if group is not None:
                    group.reset_stats()
                row = run_clients(url, clients, args.per_client, body)
                row["max_batch"] = max_batch
                if group is not None:
                    row["batch_stats"] = dict(group.stats)
                    row["batchers"] = group.report()
                rows.append(row)
        del app, generator
        gc.collect()  # the app's service, queue and store refer to each other
        if device.type == "cuda":
            torch.cuda.empty_cache()
    result = {"env": {**environment(), "torch_device": str(device), "dtype": str(dtype)}, "model": model,
              "request": body, "max_batch": args.max_batch, "batch_wait_ms": args.batch_wait_ms,
              "compile": args.compile, "rows": rows}
    save_result(args.out, "serve_batching.json", result)
    print(json.dumps(result["env"]))
    print("| model | request | clients | --max-batch | images/min | p50 s | p95 s | DiT forwards / calls |")
    print("|---|---|---|---|---|---|---|---|")
    base = {r["clients"]: r for r in rows if r["max_batch"] == 1}
    for r in rows:
        stats = r.get("batch_stats") or {}
        speed = r["images_per_min"] / base[r["clients"]]["images_per_min"]
        print(f"| {model} | {body.get('size', 'default')}, {body.get('num_inference_steps', 'default')} steps | "
              f"{r['clients']} | {r['max_batch']} | {r['images_per_min']:.1f} ({speed:.2f}x) | {r['p50_s']:.3f} | "
              f"{r['p95_s']:.3f} | {stats.get('forwards', '-')} / {stats.get('calls', '-')} |")
    return result


if __name__ == "__main__":
    main()
