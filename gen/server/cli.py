"""`gen serve`: load the models, then serve the REST API and the web UI with uvicorn until SIGINT / SIGTERM.

The first signal drains (new requests and /ready answer 503 while the running generation gets --shutdown-timeout
seconds), then uvicorn stops; a second signal stops at once.
"""
from __future__ import annotations

import argparse
import logging
import os
import re
import threading
from pathlib import Path

from gen.cli import add_model_arguments, model_kwargs
from gen.types import GenError

log = logging.getLogger(__name__)
MODEL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")

_DURATION = re.compile(r"(\d+(?:\.\d+)?)\s*([smhd]?)")
_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


def duration(text: str) -> float | None:
    """'90', '90s', '15m', '24h', '7d' -> seconds; '0' or 'none' -> None (never)."""
    if text.strip().lower() in ("0", "none", "never"):
        return None
    m = _DURATION.fullmatch(text.strip().lower())
    if m is None or float(m[1]) <= 0:
        raise argparse.ArgumentTypeError(f"expected a duration like 3600, 90m, 24h or 7d (or 0 for never), "
                                         f"got {text!r}")
    return float(m[1]) * _UNITS[m[2]]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model-path", action="append", default=[], metavar="[NAME=]PATH",
                   help="diffusers-layout model folder, served as NAME (default: the folder's name); repeatable: "
                        "several models on one queue, requests pick one by `model` (default: the embedded default "
                        "model)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    p.add_argument("--port", type=int, default=30000, help="port (default: 30000)")
    p.add_argument("--api-key", default=os.environ.get("GEN_API_KEY"),
                   help="require 'Authorization: Bearer KEY' on /v1 and /metrics (default: $GEN_API_KEY; none: open)")
    p.add_argument("--max-queue", type=int, default=8, help="requests that may wait; more get 429 (default: 8)")
    p.add_argument("--output-dir", default="gen-outputs", help="job database and outputs (default: ./gen-outputs)")
    p.add_argument("--public-url", help="scheme://host[:port][/prefix] of returned URLs (default: the address the "
                                        "request reached, never its Host header)")
    p.add_argument("--timeout", type=float, default=600.0,
                   help="seconds an image request may take, queueing included, or a video job once started, before "
                        "it is cancelled (default: 600)")
    p.add_argument("--max-upload-mb", type=float, default=20.0, help="largest accepted upload (default: 20 MiB)")
    p.add_argument("--read-timeout", type=float, default=30.0,
                   help="seconds a request's headers, then its whole body, may take to arrive (default: 30)")
    p.add_argument("--shutdown-timeout", type=float, default=30.0,
                   help="on SIGTERM, seconds to let the running generation finish (default: 30)")
    p.add_argument("--cors-origin", action="append", default=[], help="allow this browser origin (repeatable; "
                                                                      "default: CORS off)")
    p.add_argument("--no-ui", action="store_true", help="do not mount the web UI at /ui")
    g = p.add_argument_group("concurrency")
    g.add_argument("--max-batch", type=int, default=1,
                   help="generations of one model run at once, their transformer calls batched together (default: "
                        "1, one at a time)")
    g.add_argument("--batch-wait-ms", type=float, default=5.0,
                   help="how long a transformer call waits for others to join its batch (default: 5)")
    g.add_argument("--max-running", type=int,
                   help="generations running at once, all models together (default: --max-batch x models)")
    g.add_argument("--lora-dir", metavar="DIR",
                   help="the LoRAs requests may name: the .safetensors files in DIR (and folders holding one), by "
                        "file stem (default: none)")
    g = p.add_argument_group("limits per request (defaults sized to the loaded model; docs/SERVING.md)")
    g.add_argument("--max-pixels", type=int, help="largest width x height (default: 4 x the model's default size, "
                                                  "at least 256 x 256)")
    g.add_argument("--max-frames", type=int, help="most video frames (default: about 2 x the model's default)")
    g.add_argument("--max-steps", type=int, help="most denoising steps (default: 2 x the model's default, at least 50)")
    g.add_argument("--max-n", type=int, help="most images per request (default: 10)")
    g.add_argument("--max-prompt-tokens", type=int,
                   help="longest prompt in tokens (default: the model's text encoder limit, else 1024)")
    g.add_argument("--max-work", type=float,
                   help="most work per request in default generations: n x pixels x frames x steps over the "
                        "model's default request's (default: 8)")
    g.add_argument("--max-decode-gb", type=float,
                   help="video models: most memory a decode may need (default: 90%% of the memory free after loading)")
    g = p.add_argument_group("retention")
    g.add_argument("--output-ttl", type=duration, default=86400.0,
                   help="remove url images, UI outputs and finished video jobs this long after they were made "
                        "(e.g. 3600, 90m, 24h, 7d; 0: never; default: 24h)")
    g.add_argument("--max-output-gb", type=float, help="cap on the outputs' total size; the oldest go first "
                                                       "(default: no cap)")
    g = p.add_argument_group("video jobs")
    g.add_argument("--job-store", default=os.environ.get("GEN_JOB_STORE"), metavar="URL",
                   help="postgresql://user:password@host:port/db: a job store shared by several replicas, which then "
                        "must share --output-dir (default: $GEN_JOB_STORE, else SQLite in --output-dir)")
    g.add_argument("--job-lease", type=float, default=30.0,
                   help="seconds a worker holds a running video job between heartbeats before another may take it "
                        "(default: 30)")
    g.add_argument("--job-retries", type=int, default=1,
                   help="times a job whose worker died goes back to the queue before it fails (default: 1)")
    g.add_argument("--webhook-allow-host", action="append", default=[], metavar="HOST[:PORT]",
                   help="a host video jobs' webhook_url may name (repeatable; default: none, webhooks off)")
    g.add_argument("--webhook-secret", default=os.environ.get("GEN_WEBHOOK_SECRET"),
                   help="HMAC key signing webhook calls, 'whsec_<base64>' or any string (default: "
                        "$GEN_WEBHOOK_SECRET)")
    add_model_arguments(p)


def limit_kwargs(args: argparse.Namespace) -> dict:
    return dict(max_pixels=args.max_pixels, max_frames=args.max_frames, max_steps=args.max_steps, max_n=args.max_n,
                max_prompt_tokens=args.max_prompt_tokens, max_work=args.max_work, max_decode_gb=args.max_decode_gb)


def model_paths(values: list[str]) -> dict[str, str | None]:
    """--model-path values ([NAME=]PATH) -> {name: path}; none given: the embedded default model."""
    if not values:
        from gen.generator import DEFAULT_MODEL

        return {DEFAULT_MODEL: None}
    out: dict[str, str | None] = {}
    for text in values:
        name, sep, path = text.partition("=")
        if not sep or Path(text).expanduser().exists() or not MODEL_NAME.fullmatch(name):
            name, path = Path(text).expanduser().resolve().name, text
        if not MODEL_NAME.fullmatch(name):
            raise GenError(f"--model-path {text!r}: model name {name!r} must be letters, digits, '.', '_' or '-' "
                           "(write NAME=PATH)", param="model_path")
        if name in out:
            raise GenError(f"--model-path: two models named {name!r}; name them with NAME=PATH", param="model_path")
        out[name] = path
    return out


def shared_encoders(generators: dict) -> list[dict]:
    """The LLM runtime instances (gen/llm/registry.py) the served models' pipelines hold, each with the models that
    share it and the parameter bytes that sharing saves (one copy instead of one per model)."""
    from gen.llm import LLM

    users: dict[int, tuple[object, list[str]]] = {}
    for name, g in generators.items():
        components = getattr(getattr(g.pipeline, "components", None), "modules", None) or {}
        held = [*components.values(), *vars(g.pipeline).values()]  # a component, or an encoder the pipeline holds
        held += [getattr(v, "llm", None) for v in held]  # an encoder wrapping the runtime (gen-shapes' GGUF one)
        for value in {id(v): v for v in held if isinstance(v, LLM)}.values():
            users.setdefault(id(value), (value, []))[1].append(name)
    out = []
    for llm, names in users.values():
        size = sum(p.numel() * p.element_size() for p in llm.model.parameters())
        out.append({"encoder": llm.name, "models": names, "parameter_bytes": size,
                    "saved_bytes": size * (len(names) - 1)})
    return out


def run(args: argparse.Namespace) -> int:
    try:
        import uvicorn  # noqa: F401

        from gen.server.app import create_app
        from gen.server.http import make_server
        from gen.server.limits import Limits
    except ImportError as e:
        raise GenError(f"gen serve needs the serving extras ({e.name} is missing): pip install -e '.[serve]'") from None
    from gen.generator import Generator

    if args.max_queue < 1:
        raise GenError(f"--max-queue must be >= 1, got {args.max_queue}", param="max_queue")
    if args.timeout <= 0:
        raise GenError(f"--timeout must be > 0, got {args.timeout}", param="timeout")
    paths = model_paths(args.model_path)
    generators: dict = {}
    try:
        for name, path in paths.items():
            generators[name] = Generator.from_pretrained(path, **model_kwargs(args), max_batch=args.max_batch,
                                                         batch_wait_ms=args.batch_wait_ms, lora_dir=args.lora_dir)
        for shared in shared_encoders(generators):
            if len(shared["models"]) > 1:
                print(f"models {', '.join(shared['models'])} share one text encoder ({shared['encoder']}): "
                      f"{shared['saved_bytes'] / 2**20:.1f} MiB of parameters saved", flush=True)
        limits = {name: Limits.for_model(g, **limit_kwargs(args)) for name, g in generators.items()}
        app = create_app(generators, output_dir=args.output_dir, api_key=args.api_key, max_queue=args.max_queue,
                         timeout=args.timeout, max_upload_mb=args.max_upload_mb,
                         shutdown_timeout=args.shutdown_timeout, read_timeout=args.read_timeout,
                         cors_origins=args.cors_origin, ui=not args.no_ui, limits=limits, public_url=args.public_url,
                         output_ttl=args.output_ttl, max_output_gb=args.max_output_gb, job_store=args.job_store,
                         job_lease=args.job_lease, job_retries=args.job_retries,
                         webhook_hosts=args.webhook_allow_host, webhook_secret=args.webhook_secret,
                         max_running=args.max_running)
        server = make_server(app, args.host, args.port, log_level="info")
        exit_now = server.handle_exit
        signalled = []

        def drain_then_exit(sig, frame):  # the first signal drains while still answering (503, /ready); a second exits
            if signalled:
                return exit_now(sig, frame)
            signalled.append(sig)

            def drain():
                app.state.drain()
                exit_now(sig, frame)

            threading.Thread(target=drain, name="gen-drain", daemon=True).start()

        server.handle_exit = drain_then_exit
        served = ", ".join(f"{name} ({g.model_path})" for name, g in generators.items())
        print(f"serving {served} on http://{args.host}:{args.port} (UI at /ui)", flush=True)
        server.run()
    finally:
        for g in generators.values():
            g.close()  # the other ranks of a multi-GPU group
    return 0
