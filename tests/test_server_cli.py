"""`gen serve` as a real process on the embedded default model: SIGTERM answers queued requests 503 at once, keeps
answering /ready 503 while the running request drains, and cancels it with a JSON 503 past --shutdown-timeout."""
from __future__ import annotations

import base64
import concurrent.futures
import io
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from helpers import metric, psnr

pytest.importorskip("fastapi")

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_serve(tmp_path, *flags) -> tuple[subprocess.Popen, str]:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen([sys.executable, "-m", "gen.cli", "serve", "--port", str(port), "--output-dir",
                             str(tmp_path), "--no-ui", *flags], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 120
    while True:
        assert proc.poll() is None, proc.stdout.read()
        assert time.monotonic() < deadline, "gen serve did not become ready"
        try:
            if httpx.get(f"{url}/ready").status_code == 200:
                return proc, url
        except httpx.TransportError:
            pass
        time.sleep(0.2)


def wait_for(predicate, what: str, timeout: float = 60.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, what
        time.sleep(0.05)


def test_gen_serve_answers_then_drains_on_sigterm(tmp_path):
    proc, url = start_serve(tmp_path, "--max-queue", "2", "--shutdown-timeout", "120")
    try:
        body = {"prompt": "a boat", "size": "64x64", "num_inference_steps": 2}
        assert httpx.post(f"{url}/v1/images/generations", json=body, timeout=60).status_code == 200
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            # 256^2 x 40 steps (about 2 s here, the most --max-work allows): still running after the queued
            # request's 503 and /ready, also on a busy CI (64^2 x 20 steps took 0.4 s)
            long = pool.submit(httpx.post, f"{url}/v1/images/generations",
                               json={**body, "size": "256x256", "num_inference_steps": 40}, timeout=180)
            wait_for(lambda: metric(url, "gen_running") == 1 or long.done(), "the generation did not start")
            queued = pool.submit(httpx.post, f"{url}/v1/images/generations", json=body, timeout=60)
            wait_for(lambda: metric(url, "gen_queue_depth") == 1, "the second request was not queued")
            proc.send_signal(signal.SIGTERM)
            r = queued.result(timeout=10)  # at once, as JSON
            assert r.status_code == 503 and r.json()["error"]["code"] == "shutting_down"
            ready = httpx.get(f"{url}/ready")  # still listening while the running one drains
            assert ready.status_code == 503 and ready.json()["error"]["code"] == "not_ready"
            assert not long.done()
            assert long.result().status_code == 200  # the running generation finishes and answers
        assert proc.wait(timeout=60) in (0, -signal.SIGTERM)  # uvicorn re-raises the signal once it has drained
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()


def test_gen_serve_cancels_past_the_shutdown_timeout_with_json(tmp_path):
    proc, url = start_serve(tmp_path, "--shutdown-timeout", "0.5")
    try:
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            long = pool.submit(httpx.post, f"{url}/v1/images/generations",
                               json={"prompt": "a boat", "size": "256x256", "num_inference_steps": 40}, timeout=180)
            wait_for(lambda: metric(url, "gen_running") == 1 or long.done(), "the generation did not start")
            assert not long.done(), long.result().text
            proc.send_signal(signal.SIGTERM)
            r = long.result(timeout=60)
            assert r.status_code == 503 and r.json()["error"]["code"] == "shutting_down"
        assert proc.wait(timeout=60) in (0, -signal.SIGTERM)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()


def test_gen_serve_help():
    out = subprocess.run([sys.executable, "-m", "gen.cli", "serve", "--help"], cwd=ROOT, capture_output=True,
                         text=True, timeout=60, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert out.returncode == 0
    for flag in ("--model-path", "--host", "--port", "--api-key", "--max-queue", "--output-dir", "--public-url",
                 "--timeout", "--read-timeout", "--max-pixels", "--max-frames", "--max-steps", "--max-n",
                 "--max-prompt-tokens", "--max-work", "--max-decode-gb", "--output-ttl", "--max-output-gb",
                 "--job-store", "--job-lease", "--job-retries", "--webhook-allow-host", "--webhook-secret",
                 "--max-batch", "--batch-wait-ms", "--max-running", "--lora-dir", "[NAME=]PATH"):
        assert flag in out.stdout, flag


def test_serve_flags_reach_the_limits_and_durations():
    from gen.cli import build_parser
    from gen.server.cli import limit_kwargs

    args = build_parser().parse_args(["serve", "--max-pixels", "4096", "--max-steps", "9", "--max-work", "0.5",
                                      "--output-ttl", "90m"])
    assert limit_kwargs(args)["max_pixels"] == 4096 and limit_kwargs(args)["max_work"] == 0.5
    assert args.output_ttl == 5400 and args.max_frames is None
    assert build_parser().parse_args(["serve", "--output-ttl", "0"]).output_ttl is None
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--output-ttl", "soon"])


def test_gen_serve_several_models_batching_and_loras(tmp_path):
    """Two names for the default model (one encoder, shared), --max-batch, --lora-dir."""
    loras = ROOT / "assets" / "loras" / "flux-tiny"
    shapes = ROOT / "assets" / "gen-shapes"
    proc, url = start_serve(tmp_path, "--model-path", f"shapes={shapes}", "--model-path", f"again={shapes}",
                            "--max-batch", "2", "--batch-wait-ms", "50", "--lora-dir", str(loras))
    try:
        assert [m["id"] for m in httpx.get(f"{url}/v1/models").json()["data"]] == ["shapes", "again"]
        assert "kohya" in [e["id"] for e in httpx.get(f"{url}/v1/loras").json()["data"]]
        body = {"prompt": "a red circle", "size": "64x64", "num_inference_steps": 2, "seed": 1}
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            answers = list(pool.map(lambda m: httpx.post(f"{url}/v1/images/generations", json={**body, "model": m},
                                                         timeout=120), ["shapes", "again"]))
        assert [a.status_code for a in answers] == [200, 200]
        a, b = (np.asarray(Image.open(io.BytesIO(base64.b64decode(r.json()["data"][0]["b64_json"]))))
                for r in answers)
        assert psnr(a, b) >= 40  # the same weights and seed (their prompts may be encoded in one batch)
        r = httpx.post(f"{url}/v1/images/generations", json={**body, "loras": [{"name": "kohya"}]}, timeout=60)
        assert r.status_code == 400 and r.json()["error"]["param"] == "loras[0].name"  # a FLUX LoRA on gen-shapes
    finally:
        proc.terminate()
        out = proc.communicate(timeout=60)[0]
    assert "models shapes, again share one text encoder" in out, out
