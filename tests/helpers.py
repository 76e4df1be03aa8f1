"""Small helpers shared by the tests."""
from __future__ import annotations

import threading
import time

import numpy as np
import torch


def rel_err(ours: torch.Tensor, ref: torch.Tensor) -> float:
    """Relative error ||ours - ref|| / ||ref|| (fp64)."""
    ours, ref = ours.detach().double(), ref.detach().double()
    return ((ours - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def psnr(a, b) -> float:
    """PSNR in dB between two uint8 images (PIL or arrays) of the same shape; inf when equal."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    assert a.shape == b.shape, (a.shape, b.shape)
    mse = np.mean((a - b) ** 2)
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


def run_together(call, items) -> list:
    """`call(item)` for every item, each on its own thread started at once; the results in the items' order."""
    results = [None] * len(items)

    def run(i):
        results[i] = call(items[i])

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(items))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


def slow_steps(transformer: torch.nn.Module, monkeypatch, seconds: float = 0.1) -> list[float]:
    """Every forward of `transformer` (one denoising step) takes at least `seconds`; returns the list of call
    times, appended as they start."""
    forward = transformer.forward
    calls = []

    def slow_forward(*args, **kwargs):
        calls.append(time.monotonic())
        time.sleep(seconds)
        return forward(*args, **kwargs)

    monkeypatch.setattr(transformer, "forward", slow_forward)
    return calls


def wait_for(predicate, timeout: float = 30.0) -> None:
    """Poll `predicate` every 10 ms until it holds; fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def metric(url: str, name: str) -> float:
    """The value of Prometheus metric `name` on the server at `url` (0 when absent)."""
    import httpx

    for line in httpx.get(f"{url}/metrics").text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    return 0.0
