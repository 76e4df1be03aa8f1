"""`gen serve --max-batch N`: up to N generations of a model run at once on the queue's worker pool, their
transformer calls batched (gen/transforms/batch.py), each answer what the request gives alone (same seed); deadlines,
disconnects, shutdown and video jobs keep working with several running; the pool's slots per model and in all."""
from __future__ import annotations

import base64
import concurrent.futures
import io
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

pytest.importorskip("fastapi")

from gen.generator import Generator  # noqa: E402
from gen.server.app import create_app, serve_in_thread  # noqa: E402
from gen.server.queue import RequestQueue  # noqa: E402
from gen.server.videos import VideoJobs  # noqa: E402
from gen.types import GenerationRequest, GenerationResult, write_mp4  # noqa: E402
from helpers import metric, psnr, slow_steps, wait_for  # noqa: E402

ASSETS = Path(__file__).resolve().parents[1] / "assets"
PROMPTS = ["a red circle", "a small blue square in the top left corner on a yellow background", "a green star"]
SMALL = {"prompt": "a lighthouse", "size": "32x32", "num_inference_steps": 1}


@pytest.fixture(scope="module")
def alone():
    return Generator.from_pretrained(ASSETS / "flux-tiny", device="cpu")


@pytest.fixture(scope="module")
def batched():
    return Generator.from_pretrained(ASSETS / "flux-tiny", device="cpu", max_batch=3, batch_wait_ms=2000)


@pytest.fixture
def slow(batched, monkeypatch):
    """Every denoising step of a generation takes at least 0.1 s; returns the list of calls."""
    return slow_steps(batched.pipeline.transformer, monkeypatch)


def post_all(url: str, bodies: list[dict], timeout: float = 120) -> list[httpx.Response]:
    with concurrent.futures.ThreadPoolExecutor(len(bodies)) as pool:
        return list(pool.map(lambda b: httpx.post(f"{url}/v1/images/generations", json=b, timeout=timeout), bodies))


def test_batched_requests_equal_each_alone(alone, batched, tmp_path):
    app = create_app(batched, output_dir=tmp_path, ui=False)
    before = dict(batched.batch_group.stats)
    bodies = [{"prompt": p, "seed": 10 + i, "size": "32x32", "num_inference_steps": 3} for i, p in enumerate(PROMPTS)]
    with serve_in_thread(app) as url:
        answers = post_all(url, bodies)
    stats = {k: v - before[k] for k, v in batched.batch_group.stats.items()}
    assert stats["batched_calls"] > 0 and stats["forwards"] < stats["calls"], stats  # they ran as batches
    for body, answer in zip(bodies, answers):
        assert answer.status_code == 200, answer.text
        got = Image.open(io.BytesIO(base64.b64decode(answer.json()["data"][0]["b64_json"]))).convert("RGB")
        want = alone.generate(body["prompt"], seed=body["seed"], height=32, width=32, num_inference_steps=3)
        assert psnr(np.asarray(got), np.asarray(want.images[0])) >= 50


def test_a_disconnect_cancels_only_its_own_generation(batched, tmp_path, slow):
    app = create_app(batched, output_dir=tmp_path, ui=False)
    with serve_in_thread(app) as url, concurrent.futures.ThreadPoolExecutor(1) as pool:
        kept = pool.submit(httpx.post, f"{url}/v1/images/generations", json={**SMALL, "num_inference_steps": 12},
                           timeout=60)
        wait_for(lambda: app.state.queue.running)
        with pytest.raises(httpx.ReadTimeout):  # a second client, running beside the first, gives up
            httpx.post(f"{url}/v1/images/generations", json={**SMALL, "num_inference_steps": 50}, timeout=1.0)
        assert kept.result().status_code == 200
        wait_for(lambda: not app.state.queue.running)
        assert len(slow) < 12 + 50
        assert metric(url, 'gen_generations_total{outcome="cancelled"}') == 1
        assert metric(url, 'gen_generations_total{outcome="completed"}') == 1


def test_deadline_cuts_every_running_generation(batched, tmp_path, monkeypatch):
    slow = slow_steps(batched.pipeline.transformer, monkeypatch, 0.2)  # 40 steps: 8 s uncut
    app = create_app(batched, output_dir=tmp_path, timeout=1.5, ui=False)
    with serve_in_thread(app) as url:
        start = time.monotonic()
        answers = post_all(url, [{**SMALL, "num_inference_steps": 40}] * 2)
        assert [a.status_code for a in answers] == [504, 504]
        assert time.monotonic() - start < 1.5 + 2.5  # at the deadline (slack for a busy machine), long before 8 s
        wait_for(lambda: not app.state.queue.running, timeout=3.0)  # the workers are free within about a step
        assert len(slow) < 2 * 20  # about 7 steps each by the deadline; 80 calls uncut
        assert post_all(url, [SMALL])[0].status_code == 200


def test_shutdown_finishes_the_running_and_refuses_the_waiting(batched, tmp_path, slow):
    # max_queue 4: the three first requests may all wait at once before a worker claims them (a loaded machine)
    app = create_app(batched, output_dir=tmp_path, max_queue=4, shutdown_timeout=30, ui=False)
    # 30 steps of >= 0.1 s: the first generation (which, alone, waits for nobody) is still running when the third
    # request arrives, also on a loaded machine
    body = {**SMALL, "num_inference_steps": 30}
    with serve_in_thread(app) as url, concurrent.futures.ThreadPoolExecutor(5) as pool:
        running = [pool.submit(httpx.post, f"{url}/v1/images/generations", json=body, timeout=60) for _ in range(3)]
        wait_for(lambda: len(app.state.queue.running) == 3)  # max_batch=3: all three run
        queued = pool.submit(httpx.post, f"{url}/v1/images/generations", json=body, timeout=60)
        wait_for(lambda: app.state.queue.queue_depth == 1)
        draining = pool.submit(app.state.drain)
        assert queued.result(timeout=5).status_code == 503
        assert [r.result().status_code for r in running] == [200, 200, 200]
        draining.result(timeout=10)


def test_video_jobs_run_side_by_side_and_equal_each_alone(tmp_path, monkeypatch):
    wan = Generator.from_pretrained(ASSETS / "wan-t2v-tiny", device="cpu", max_batch=2, batch_wait_ms=2000)
    alone = Generator.from_pretrained(ASSETS / "wan-t2v-tiny", device="cpu")
    # both jobs are in the store before a worker claims either (else a fast first job ends before the second is
    # posted: a 0.3 s stall between the posts made it fail), and steps of >= 0.2 s keep the first stepping while the
    # second starts
    stored = threading.Event()
    claim = VideoJobs.claim
    monkeypatch.setattr(VideoJobs, "claim", lambda self, names: (stored.wait(60), claim(self, names))[1])
    slow_steps(wan.pipeline.transformer, monkeypatch, 0.2)
    seen = []
    app = create_app(wan, output_dir=tmp_path, ui=False)
    queue = app.state.queue
    sampler_stop = threading.Event()

    def sample():
        while not sampler_stop.is_set():
            seen.append(len(queue.running))
            time.sleep(0.005)

    sampler = threading.Thread(target=sample)
    sampler.start()
    bodies = [{"prompt": p, "seed": i, "size": "32x32", "num_frames": 5, "num_inference_steps": 3}
              for i, p in enumerate(["waves", "a red car driving"])]
    try:
        with serve_in_thread(app) as url, httpx.Client(base_url=url, timeout=60) as http:
            ids = [http.post("/v1/videos", json=b).json()["id"] for b in bodies]
            stored.set()
            deadline = time.monotonic() + 120
            while any(http.get(f"/v1/videos/{vid}").json()["status"] not in ("completed", "failed") for vid in ids):
                assert time.monotonic() < deadline
                time.sleep(0.05)
            contents = [http.get(f"/v1/videos/{vid}/content").content for vid in ids]
    finally:
        stored.set()
        sampler_stop.set()
        sampler.join()
    assert max(seen) == 2  # both jobs claimed and run at once
    assert wan.batch_group.stats["batched_calls"] > 0
    import imageio.v2 as imageio

    for body, content in zip(bodies, contents):
        served = tmp_path / "served.mp4"
        served.write_bytes(content)
        ref = alone.generate(body["prompt"], seed=body["seed"], height=32, width=32, num_frames=5,
                             num_inference_steps=3)
        write_mp4(str(tmp_path / "ref.mp4"), ref.frames, ref.fps)
        got, want = (np.stack(imageio.mimread(str(p), format="FFMPEG")) for p in (served, tmp_path / "ref.mp4"))
        assert psnr(got, want) >= 40


class FakeGenerator:
    """Runs a request by sleeping; records how many of its runs overlap."""

    modality, ready = "image", True

    def __init__(self, name: str, slots: int, log: list):
        self.model_path = Path(name)
        self.batch_group = type("Group", (), {"max_batch": slots})() if slots > 1 else None
        self.log = log

    def run(self, req, progress=None, cancel=None, preview=None, preview_every=1):
        self.log.append((str(self.model_path), +1))
        time.sleep(0.05)
        self.log.append((str(self.model_path), -1))
        return GenerationResult(seed=0)


def peak(log: list, model: str | None = None) -> int:
    n = best = 0
    for name, delta in log:
        if model is None or name == model:
            n += delta
            best = max(best, n)
    return best


def test_queue_slots_per_model_and_in_all():
    log: list = []
    models = {"a": FakeGenerator("a", 3, log), "b": FakeGenerator("b", 1, log)}
    req = GenerationRequest(prompt="x")
    for max_running, want in ((None, (3, 1, 4)), (2, (2, 1, 2))):
        log.clear()
        queue = RequestQueue(models, max_queue=20, max_running=max_running)
        jobs = [queue.submit(req, model=m) for m in ["b", "b"] + ["a"] * 6 + ["b"]]
        for job in jobs:
            assert job.done.wait(30) and job.error is None
        queue.shutdown(1)
        assert (peak(log, "a"), peak(log, "b"), peak(log)) == want, log
