"""`gen serve` as a real process: it serves the embedded default model, and SIGTERM drains the running request."""
from __future__ import annotations

import concurrent.futures
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

pytest.importorskip("fastapi")

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_gen_serve_answers_then_drains_on_sigterm(tmp_path):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen([sys.executable, "-m", "gen.cli", "serve", "--port", str(port), "--output-dir",
                             str(tmp_path), "--max-queue", "2", "--no-ui"], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, proc.stdout.read()
            assert time.monotonic() < deadline, "gen serve did not become ready"
            try:
                if httpx.get(f"{url}/ready").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        body = {"prompt": "a boat", "size": "64x64", "num_inference_steps": 2}
        assert httpx.post(f"{url}/v1/images/generations", json=body, timeout=60).status_code == 200

        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            long = pool.submit(httpx.post, f"{url}/v1/images/generations",
                               json={**body, "num_inference_steps": 15}, timeout=120)
            while "gen_running 1.0" not in httpx.get(f"{url}/metrics").text:
                assert not long.done(), long.result().text
                time.sleep(0.05)
            proc.send_signal(signal.SIGTERM)
            assert long.result().status_code == 200  # the running generation finishes and answers
        assert proc.wait(timeout=60) in (0, -signal.SIGTERM)  # uvicorn re-raises the signal once it has drained
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()


def test_gen_serve_help():
    out = subprocess.run([sys.executable, "-m", "gen.cli", "serve", "--help"], cwd=ROOT, capture_output=True,
                         text=True, timeout=60, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert out.returncode == 0
    for flag in ("--model-path", "--host", "--port", "--api-key", "--max-queue", "--output-dir"):
        assert flag in out.stdout
