"""`gen serve`: load the model, then serve the REST API and the web UI with uvicorn until SIGINT / SIGTERM."""
from __future__ import annotations

import argparse
import os

from gen.cli import add_model_arguments, model_kwargs


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model-path", help="diffusers-layout model folder (default: the embedded default model)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    p.add_argument("--port", type=int, default=30000, help="port (default: 30000)")
    p.add_argument("--api-key", default=os.environ.get("GEN_API_KEY"),
                   help="require 'Authorization: Bearer KEY' on /v1 (default: $GEN_API_KEY; none: open)")
    p.add_argument("--max-queue", type=int, default=8, help="requests that may wait; more get 429 (default: 8)")
    p.add_argument("--output-dir", default="gen-outputs", help="job database and outputs (default: ./gen-outputs)")
    p.add_argument("--timeout", type=float, default=600.0,
                   help="seconds a request may take, queueing included, before it is cancelled (default: 600)")
    p.add_argument("--max-upload-mb", type=float, default=20.0, help="largest accepted upload (default: 20 MiB)")
    p.add_argument("--shutdown-timeout", type=float, default=30.0,
                   help="on SIGTERM, seconds to let the running generation finish (default: 30)")
    p.add_argument("--cors-origin", action="append", default=[], help="allow this browser origin (repeatable; "
                                                                      "default: CORS off)")
    p.add_argument("--no-ui", action="store_true", help="do not mount the web UI at /ui")
    add_model_arguments(p)


def run(args: argparse.Namespace) -> int:
    from gen.types import GenError

    try:
        import uvicorn

        from gen.server.app import create_app
    except ImportError as e:
        raise GenError(f"gen serve needs the serving extras ({e.name} is missing): pip install -e '.[serve]'") from None
    from gen.generator import Generator

    if args.max_queue < 1:
        raise GenError(f"--max-queue must be >= 1, got {args.max_queue}", param="max_queue")
    if args.timeout <= 0:
        raise GenError(f"--timeout must be > 0, got {args.timeout}", param="timeout")
    generator = Generator.from_pretrained(args.model_path, **model_kwargs(args))
    app = create_app(generator, output_dir=args.output_dir, api_key=args.api_key, max_queue=args.max_queue,
                     timeout=args.timeout, max_upload_mb=args.max_upload_mb, shutdown_timeout=args.shutdown_timeout,
                     cors_origins=args.cors_origin, ui=not args.no_ui)
    config = uvicorn.Config(app, host=args.host, port=args.port, log_level="info",
                            timeout_graceful_shutdown=int(args.shutdown_timeout) + 1)
    server = uvicorn.Server(config)
    exit_on_signal = server.handle_exit

    def close_then_exit(sig, frame):  # new requests and /ready answer 503 while the running generation drains
        app.state.engine.close()
        exit_on_signal(sig, frame)

    server.handle_exit = close_then_exit
    print(f"serving {generator.model_path} on http://{args.host}:{args.port} (UI at /ui)", flush=True)
    try:
        server.run()
    finally:
        generator.close()  # the other ranks of a multi-GPU group
    return 0

