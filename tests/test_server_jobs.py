"""Video jobs never stuck, nothing orphaned, nothing lost (real servers on the tiny Wan, uvicorn in a thread): a
failing or too slow MP4 write fails the job with a reason; DELETE during the write leaves no file; a restart
reconciles files and rows; a job whose worker died goes back to the queue once, then fails; a job running at
shutdown goes back to the queue and the next server runs it; retention removes what has expired."""
from __future__ import annotations

import io
import os
import time
from pathlib import Path

import httpx
import imageio.v2 as imageio
import numpy as np
import pytest
from PIL import Image

pytest.importorskip("fastapi")

import gen.server.videos as videos_module  # noqa: E402
from gen.generator import Generator  # noqa: E402
from gen.server.app import create_app, serve_in_thread  # noqa: E402
from gen.server.jobs import SQLiteJobStore  # noqa: E402
from helpers import psnr, wait_for  # noqa: E402

ASSETS = Path(__file__).resolve().parents[1] / "assets"
V = {"prompt": "waves", "size": "32x32", "num_frames": 9, "num_inference_steps": 2, "seed": 3}
PARAMS = {"prompt": "waves", "negative_prompt": None, "seed": 3, "num_inference_steps": 2, "guidance_scale": 5.0,
          "true_cfg_scale": 1.0, "height": 32, "width": 32, "num_frames": 5, "fps": 16}


@pytest.fixture(scope="module")
def wan():
    return Generator.from_pretrained(ASSETS / "wan-t2v-tiny")


def wait_status(http, vid, statuses=("completed", "failed"), timeout=60.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        r = http.get(f"/v1/videos/{vid}")
        if r.status_code == 200 and r.json()["status"] in statuses:
            return r.json()
        assert time.monotonic() < deadline, r.text
        time.sleep(0.05)


def files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []


def slow_writes(monkeypatch, seconds_per_frame: float, started: list | None = None):
    """Make every MP4 frame written take `seconds_per_frame` (before the job's own check)."""
    real = videos_module.write_mp4

    def slow(path, frames, fps, check):
        def slow_check():
            if started is not None:
                started.append(time.monotonic())
            time.sleep(seconds_per_frame)
            check()
        return real(path, frames, fps, slow_check)

    monkeypatch.setattr(videos_module, "write_mp4", slow)


def metric(http, name: str) -> float:
    for line in http.get("/metrics").text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    return 0.0


def test_failing_mp4_write_fails_the_job_and_the_next_runs(wan, tmp_path, monkeypatch):
    calls = []

    def broken(path, frames, fps, check):
        calls.append(path)
        Path(path).write_bytes(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(videos_module, "write_mp4", broken)
    with serve_in_thread(create_app(wan, output_dir=tmp_path, ui=False)) as url, httpx.Client(base_url=url) as http:
        vid = http.post("/v1/videos", json=V).json()["id"]
        video = wait_status(http, vid)
        assert video["status"] == "failed" and video["error"]["code"] == "generation_failed"
        assert "writing the video" in video["error"]["message"] and "space" not in video["error"]["message"]
        assert video["expires_at"] is not None
        assert files(tmp_path / "videos") == []  # the partial temp file is gone
        assert metric(http, 'gen_generations_total{outcome="failed"}') == 1
        assert metric(http, 'gen_generations_total{outcome="completed"}') == 0
        monkeypatch.undo()
        vid = http.post("/v1/videos", json=V).json()["id"]
        assert wait_status(http, vid)["status"] == "completed"
        assert http.get(f"/v1/videos/{vid}/content").content[4:8] == b"ftyp"


def test_deadline_reaches_into_the_mp4_write(wan, tmp_path, monkeypatch):
    started = []
    slow_writes(monkeypatch, 0.3, started)  # 9 frames: 2.7 s of writing
    app = create_app(wan, output_dir=tmp_path, timeout=1.5, ui=False)
    with serve_in_thread(app) as url, httpx.Client(base_url=url) as http:
        vid = http.post("/v1/videos", json=V).json()["id"]
        video = wait_status(http, vid)
        assert video["status"] == "failed" and video["error"]["code"] == "timeout", video
        assert 0 < len(started) < 9  # stopped between frames
        assert files(tmp_path / "videos") == []


def test_delete_during_the_write_leaves_no_file(wan, tmp_path, monkeypatch):
    started = []
    slow_writes(monkeypatch, 0.4, started)  # 9 frames: the DELETE lands within 3.6 s of the first, also on a busy CI
    app = create_app(wan, output_dir=tmp_path, ui=False)
    with serve_in_thread(app) as url, httpx.Client(base_url=url) as http:
        vid = http.post("/v1/videos", json=V).json()["id"]
        wait_for(lambda: started, timeout=60)
        assert http.delete(f"/v1/videos/{vid}").json()["deleted"] is True
        wait_for(lambda: not app.state.queue.running)
        assert http.get(f"/v1/videos/{vid}").status_code == 404
        assert files(tmp_path / "videos") == []
        assert metric(http, 'gen_generations_total{outcome="cancelled"}') == 1


def test_restart_reconciles_files_and_rows(wan, tmp_path):
    with serve_in_thread(create_app(wan, output_dir=tmp_path, ui=False)) as url, httpx.Client(base_url=url) as http:
        kept = http.post("/v1/videos", json=V).json()["id"]
        lost = http.post("/v1/videos", json=V).json()["id"]
        for vid in (kept, lost):
            assert wait_status(http, vid)["status"] == "completed"
    videos = tmp_path / "videos"
    (videos / f"{lost}.mp4").unlink()  # removed behind the server's back
    orphan = videos / f"video_{'b' * 32}.mp4"  # a file whose job is gone (written just before a crash)
    orphan.write_bytes(b"x")
    stale = videos / f".video_{'c' * 32}.0000.tmp.mp4"  # a crashed writer's temp file, hours old
    stale.write_bytes(b"x")
    old = time.time() - 2 * 3600
    os.utime(stale, (old, old))
    with serve_in_thread(create_app(wan, output_dir=tmp_path, ui=False)) as url, httpx.Client(base_url=url) as http:
        assert not orphan.exists() and not stale.exists()
        assert http.get(f"/v1/videos/{kept}/content").content[4:8] == b"ftyp"
        video = http.get(f"/v1/videos/{lost}").json()
        assert video["status"] == "failed" and video["error"]["code"] == "content_lost"
        assert files(videos) == [f"{kept}.mp4", f"{kept}.webp"]  # the video and its thumbnail


def test_lease_expiry_requeues_once_then_fails(wan, tmp_path):
    store = SQLiteJobStore(tmp_path / "jobs.sqlite3")
    again = store.create(model="wan-t2v-tiny", prompt="waves", params=PARAMS, inputs=[], size="32x32", seconds="0.31")
    twice = store.create(model="wan-t2v-tiny", prompt="waves", params=PARAMS, inputs=[], size="32x32", seconds="0.31")
    assert store.claim("wan-t2v-tiny", "dead-worker", lease=0.0)["id"] == again["id"]  # its worker then died
    store.claim("wan-t2v-tiny", "dead-worker", lease=0.0)
    with store._tx() as c:  # the second had already been re-run once
        c.execute("UPDATE videos SET attempts = 2 WHERE id = ?", (twice["id"],))
    store.close()
    # recovery at startup requeues or fails the dead worker's jobs; a lease long enough that the live worker's own
    # never runs out on a busy machine (recovery every lease / 2 would take the running job away)
    app = create_app(wan, output_dir=tmp_path, ui=False, job_lease=10.0, job_retries=1)
    with serve_in_thread(app) as url, httpx.Client(base_url=url) as http:
        video = wait_status(http, again["id"])
        assert video["status"] == "completed" and http.get(f"/v1/videos/{again['id']}/content").status_code == 200
        failed = wait_status(http, twice["id"])
        assert failed["status"] == "failed" and failed["error"]["code"] == "worker_lost"
        assert app.state.store.row(again["id"])["attempts"] == 2


def test_running_job_at_shutdown_goes_back_to_the_queue(wan, tmp_path, monkeypatch):
    started = []
    slow_writes(monkeypatch, 0.4, started)  # 9 frames: drained within 3.6 s of the first, also on a busy CI
    app = create_app(wan, output_dir=tmp_path, ui=False, shutdown_timeout=0.1)
    with serve_in_thread(app) as url, httpx.Client(base_url=url) as http:
        vid = http.post("/v1/videos", json=V).json()["id"]
        wait_for(lambda: started, timeout=60)
        app.state.drain()  # SIGTERM: the running job is cancelled after the shutdown timeout
        video = http.get(f"/v1/videos/{vid}").json()
        assert video["status"] == "queued" and video["progress"] == 0
        r = http.post("/v1/videos", json=V)
        assert r.status_code == 503 and r.json()["error"]["code"] == "shutting_down"
    assert files(tmp_path / "videos") == []
    monkeypatch.undo()
    with serve_in_thread(create_app(wan, output_dir=tmp_path, ui=False)) as url, httpx.Client(base_url=url) as http:
        video = wait_status(http, vid)  # nothing lost: the next server runs it
        assert video["status"] == "completed"


def test_retention_removes_expired_outputs_and_jobs(wan, tmp_path):
    # a TTL long enough that the polls below see the video completed and fetch it before it expires (CI load)
    app = create_app(wan, output_dir=tmp_path, ui=False, output_ttl=3.0, sweep_interval=0.2)
    with serve_in_thread(app) as url, httpx.Client(base_url=url) as http:
        vid = http.post("/v1/videos", json=V).json()["id"]
        video = wait_status(http, vid)
        assert video["status"] == "completed" and video["expires_at"] == video["completed_at"] + 3
        assert http.get(f"/v1/videos/{vid}/content").status_code == 200
        wait_for(lambda: http.get(f"/v1/videos/{vid}").status_code == 404, timeout=30)
        # the sweep deletes the row, then the files, then counts them: the 404 may come a moment before
        wait_for(lambda: files(tmp_path / "videos") == [], timeout=10)
        wait_for(lambda: metric(http, 'gen_outputs_removed_total{reason="expired"}') >= 1, timeout=10)


def test_disk_cap_removes_oldest_first(wan, tmp_path):
    app = create_app(wan, output_dir=tmp_path, ui=False, output_ttl=None, sweep_interval=3600)
    with serve_in_thread(app) as url, httpx.Client(base_url=url) as http:
        ids = []
        for seed in range(3):
            ids.append(http.post("/v1/videos", json={**V, "seed": seed}).json()["id"])
            assert wait_status(http, ids[-1])["status"] == "completed"
            time.sleep(0.05)
        sizes = [sum((tmp_path / "videos" / f"{vid}.{ext}").stat().st_size for ext in ("mp4", "webp"))
                 for vid in ids]  # each video and its thumbnail
        retention = app.state.retention
        retention.max_bytes = sizes[1] + sizes[2]  # room for the two newest
        assert retention.sweep()["disk_cap"] == 2  # the oldest video and its thumbnail
        assert http.get(f"/v1/videos/{ids[0]}").status_code == 404
        assert [http.get(f"/v1/videos/{vid}/content").status_code for vid in ids[1:]] == [200, 200]


@pytest.mark.filterwarnings("ignore:The Sora API:DeprecationWarning")  # the SDK's notice on videos.*
def test_progress_and_thumbnail_preview_while_running(wan, tmp_path, monkeypatch):
    openai = pytest.importorskip("openai")
    transformer = wan.pipeline.transformer
    forward = transformer.forward

    def slow_forward(*args, **kwargs):
        time.sleep(0.3)
        return forward(*args, **kwargs)

    monkeypatch.setattr(transformer, "forward", slow_forward)
    app = create_app(wan, output_dir=tmp_path, ui=False)
    with serve_in_thread(app) as url, httpx.Client(base_url=url) as http:
        body = {**V, "num_inference_steps": 8, "guidance_scale": 1.0}  # one call a step: about 2.4 s
        vid = http.post("/v1/videos", json=body).json()["id"]
        queued = http.post("/v1/videos", json=body).json()["id"]  # waits behind the first
        r = http.get(f"/v1/videos/{queued}/content", params={"variant": "thumbnail"})
        assert r.status_code == 409 and r.json()["error"]["code"] == "video_not_ready"
        seen = []
        deadline = time.monotonic() + 60
        while True:  # the thumbnail first: once a preview is there, the progress read after it counts its step
            thumb = http.get(f"/v1/videos/{vid}/content", params={"variant": "thumbnail"})
            video = http.get(f"/v1/videos/{vid}").json()
            if video["status"] == "completed":
                break
            assert time.monotonic() < deadline and video["status"] != "failed", video
            if video["status"] == "in_progress" and thumb.status_code == 200:
                seen.append((video["progress"], Image.open(io.BytesIO(thumb.content))))
            time.sleep(0.1)
        assert seen and 0 < seen[0][0] < 100  # a preview while it ran, with its progress
        assert seen[0][1].format == "WEBP" and seen[0][1].size == (32, 32)  # shown at the video's size
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        final = Image.open(io.BytesIO(client.videos.download_content(vid, variant="thumbnail").read()))
        frames = imageio.mimread(str(tmp_path / "videos" / f"{vid}.mp4"), format="FFMPEG")
        assert final.size == (32, 32) and psnr(np.asarray(final.convert("RGB")), frames[0]) >= 25  # first frame
        http.delete(f"/v1/videos/{vid}")
        assert not (tmp_path / "videos" / f"{vid}.webp").exists()
        r = http.get(f"/v1/videos/{queued}/content", params={"variant": "spritesheet"})
        assert r.status_code == 400 and r.json()["error"]["param"] == "variant"
