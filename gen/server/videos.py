"""Video jobs end to end: created by any door into the job store, claimed by this process's queue worker when it is
idle, run under a lease its heartbeat renews, written to `videos/<id>.mp4` atomically before the row says completed,
and always ended (completed, failed with a reason, or put back in the queue at shutdown). While a job runs, its
latest preview (the first frame, from the latents: stages/preview.py) is `videos/<id>.webp`; once completed that
file is the video's first frame: OpenAI's `thumbnail` variant. Also the store's upkeep: leases that ran out, expired
jobs, and files and rows that disagree after a crash.

Not HTTP (the app maps its results) and not SQL (gen/server/jobs.py).
"""
from __future__ import annotations

import io
import json
import logging
import os
import socket
import threading
import time
import uuid
from pathlib import Path

from PIL import Image

from gen.server.jobs import VIDEO_ID, JobStore, StoreUnavailable
from gen.server.outputs import STALE_TEMP_SECONDS, atomic_write
from gen.server.queue import SHUTDOWN, Job
from gen.types import Cancelled, GenError, GenerationRequest, write_mp4

PREVIEW_SECONDS = 1.0  # a running job's preview file is rewritten at most this often (and at the last step)

log = logging.getLogger(__name__)
PARAMS = ("prompt", "negative_prompt", "seed", "num_inference_steps", "guidance_scale", "true_cfg_scale", "height",
          "width", "num_frames", "fps")
DELETED = "deleted"
LEASE_LOST = "its lease was lost (the store was unreachable for too long)"


def worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


class VideoJobs:
    """The video jobs of the served video models `models` ({name: Generator}; their LoRA libraries resolve the
    LoRA names a job stored)."""

    def __init__(self, store: JobStore, output_dir: Path, models: dict, *, timeout: float, lease: float = 30.0,
                 retries: int = 1, ttl: float | None = None, metrics=None):
        self.store, self.output_dir, self.models = store, Path(output_dir), dict(models)
        self.timeout, self.lease, self.retries, self.ttl = timeout, lease, retries, ttl
        self.metrics = metrics
        self.worker = worker_id()
        self.dir = self.output_dir / "videos"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.running: dict[str, Job] = {}  # video id -> its job, while this process runs it
        self._stop = threading.Event()
        self._heartbeat = threading.Thread(target=self._beat, name="gen-video-heartbeat", daemon=True)
        self._heartbeat.start()

    # --- any door

    def create(self, req: GenerationRequest, *, model: str, size: str, seconds: str, webhook_url: str | None,
               loras: list[dict] | None = None) -> dict:
        """A queued job of `model` for `req` (validated, seed fixed so that a re-run makes the same video); `loras`:
        the request's LoRAs by name ([{name, scale, target}]; None: the model's default set), resolved again by the
        worker that runs it (a request never names a path)."""
        params = {k: getattr(req, k) for k in PARAMS}
        if loras is not None:
            params["loras"] = loras
        inputs = []
        for image in req.images:
            buf = io.BytesIO()
            image.save(buf, format="PNG")
            inputs.append(buf.getvalue())
        return self.store.create(model=model, prompt=req.prompt, params=params, inputs=inputs, size=size,
                                 seconds=seconds, webhook_url=webhook_url)

    def delete(self, video_id: str) -> bool:
        """Cancel the job if this process runs it, delete its row and file; False when there is no such job. A job
        another replica runs stops at that replica's next heartbeat (its renewal fails)."""
        if not VIDEO_ID.fullmatch(video_id):
            return False
        job = self.running.get(video_id)
        if job is not None:
            job.cancel(DELETED)
        existed, file = self.store.delete(video_id)
        self.video_path(video_id).unlink(missing_ok=True)  # written but not yet marked completed: gone too
        self.thumbnail_path(video_id).unlink(missing_ok=True)
        if file:
            (self.output_dir / file).unlink(missing_ok=True)
        return existed

    def content(self, video: dict) -> Path:
        return self.video_path(video["id"])

    def video_path(self, video_id: str) -> Path:
        assert VIDEO_ID.fullmatch(video_id), video_id  # ids are ours, never a user path
        return self.dir / f"{video_id}.mp4"

    def thumbnail_path(self, video_id: str) -> Path:
        """The running job's latest preview, then the completed video's first frame (WEBP)."""
        assert VIDEO_ID.fullmatch(video_id), video_id
        return self.dir / f"{video_id}.webp"

    # --- this process's worker

    def claim(self, names: list[str]) -> Job | None:
        """The next queued job of one of the models `names` (those of them served here) as a queue Job, or None
        (RequestQueue's `claim`)."""
        for model in names:
            if model not in self.models:
                continue
            row = self.store.claim(model, self.worker, self.lease)
            if row is not None:
                return self._job(model, row)
        return None

    def _job(self, model: str, row: dict) -> Job | None:
        vid = row["id"]
        try:
            req = request_of(row, self.models[model])
        except GenError as e:  # a LoRA it names is no longer offered
            log.error("video job %s cannot run: %s", vid, e)
            self.store.fail(vid, self.worker, {"code": "invalid_value", "message": str(e)}, self.ttl)
            return None
        except (ValueError, KeyError, TypeError, OSError) as e:
            log.error("video job %s has unreadable parameters (%s); failing it", vid, e)
            self.store.fail(vid, self.worker, {"code": "invalid_job", "message": "the stored job cannot be read"},
                            self.ttl)
            return None
        job = Job(req, time.monotonic() + self.timeout, on_progress=lambda j: self._progress(vid, j),
                  finish=lambda j: self._write(vid, j), on_done=lambda j: self._done(vid, j), model=model,
                  on_preview=lambda j, step, total, image: self._preview(vid, j, step, total, image))
        job.preview_written = 0.0
        self.running[vid] = job
        return job

    def _progress(self, vid: str, job: Job) -> None:  # 100 only once the file is written
        try:
            if not self.store.renew(vid, self.worker, self.lease, progress=min(job.progress, 99)):
                job.cancel(DELETED)
        except StoreUnavailable as e:  # the heartbeat keeps the lease, or gives the job up in time
            log.warning("could not record the progress of %s: %s", vid, e)

    def _preview(self, vid: str, job: Job, step: int, total: int, image: Image.Image) -> None:
        """The latest preview as the job's thumbnail file, shown at the video's size (at most every
        PREVIEW_SECONDS, and the last step's); a failed write only loses the preview."""
        now = time.monotonic()
        if step < total and now - job.preview_written < PREVIEW_SECONDS:
            return
        job.preview_written = now
        req = job.request
        try:
            self._write_thumbnail(vid, image.resize((req.width, req.height), Image.BILINEAR))
        except OSError as e:
            log.warning("could not write the preview of %s: %s", vid, e)

    def _write_thumbnail(self, vid: str, image: Image.Image) -> None:
        atomic_write(self.thumbnail_path(vid), lambda tmp: image.save(tmp, format="WEBP", quality=80))

    def _write(self, vid: str, job: Job) -> str:
        """In the worker, under the job's deadline: the MP4, renamed into place, then the row marked completed; a job
        deleted meanwhile leaves no file."""
        result = job.result
        path = self.video_path(vid)
        atomic_write(path, lambda tmp: write_mp4(tmp, result.frames, result.fps or 16, job.check))
        self._write_thumbnail(vid, result.frames[0])
        if not self._persist(self.store.complete, vid, self.worker, str(path.relative_to(self.output_dir)), self.ttl):
            path.unlink(missing_ok=True)
            self.thumbnail_path(vid).unlink(missing_ok=True)
            job.cancel(DELETED)
            raise Cancelled("the job was deleted while its file was written")
        return str(path)

    def _done(self, vid: str, job: Job) -> None:
        self.running.pop(vid, None)
        if job.error is None:
            return
        reason = job.cancel_reason
        if reason == LEASE_LOST:
            return  # another worker holds it now
        self.thumbnail_path(vid).unlink(missing_ok=True)  # a preview of what will not be, or be made again
        if reason == DELETED:
            return  # the row is gone
        if reason == SHUTDOWN:
            self._persist(self.store.release, vid, self.worker)  # another replica, or this one restarted, runs it
            return
        self._persist(self.store.fail, vid, self.worker, job_error(job), self.ttl)

    def _persist(self, update, *args):
        """A store update from the worker, retried while the store is unreachable for most of a lease; past that the
        job's lease runs out and recovery (another replica, or this one) takes over."""
        deadline = time.monotonic() + 0.8 * self.lease
        while True:
            try:
                return update(*args)
            except StoreUnavailable as e:
                if time.monotonic() > deadline:
                    raise
                log.warning("the job store is unreachable (%s); retrying", e)
                time.sleep(0.5)

    def _beat(self) -> None:
        """Renew the leases of the jobs this process runs every lease / 3 seconds; a job whose row is gone (deleted
        on another replica) is cancelled, and so is one whose lease could not be renewed for most of its length."""
        last_ok = time.monotonic()
        while not self._stop.wait(self.lease / 3):
            for vid, job in list(self.running.items()):
                try:
                    if not self.store.renew(vid, self.worker, self.lease):
                        job.cancel(DELETED)
                    last_ok = time.monotonic()
                except Exception as e:  # the store is unreachable: keep trying until the lease would run out
                    log.warning("could not renew the lease of %s: %s", vid, e)
                    if time.monotonic() - last_ok > 0.8 * self.lease:
                        job.cancel(LEASE_LOST)
            if not self.running:
                last_ok = time.monotonic()

    def close(self) -> None:
        self._stop.set()
        self._heartbeat.join(5)

    # --- upkeep, from any replica

    def recover(self) -> None:
        """Jobs whose worker died (lease ran out) go back to the queue or fail; their partial files are removed."""
        requeued, failed = self.store.recover(self.retries, self.ttl)
        for vid in requeued + failed:
            self.video_path(vid).unlink(missing_ok=True)
            self.thumbnail_path(vid).unlink(missing_ok=True)
        if requeued or failed:
            log.warning("jobs whose worker stopped: %d back in the queue, %d failed", len(requeued), len(failed))

    def expire(self) -> list[Path]:
        """Delete the jobs past their expires_at; the files to remove."""
        return [p for vid, file in self.store.take_expired()
                for p in (self.output_dir / file if file else self.video_path(vid), self.thumbnail_path(vid))]

    def drop_file(self, path: Path) -> list[Path]:
        """The disk cap removes `path`: its job goes too, and the job's other file (returned when removed)."""
        vid = path.stem
        if not VIDEO_ID.fullmatch(vid):
            return []
        self.store.delete(vid)
        removed = []
        for other in (self.video_path(vid), self.thumbnail_path(vid)):
            if other != path and other.is_file():
                other.unlink(missing_ok=True)
                removed.append(other)
        return removed

    def reconcile(self) -> tuple[int, int]:
        """After a crash: remove video files whose job is gone or failed (and stale temp files); completed jobs
        without their file become failed (`content_lost`). Returns (files removed, jobs failed)."""
        files = {p.stem: p for p in self.dir.glob("video_*.mp4") if VIDEO_ID.fullmatch(p.stem)}
        thumbs = {p.stem: p for p in self.dir.glob("video_*.webp") if VIDEO_ID.fullmatch(p.stem)}
        statuses = self.store.statuses(sorted(set(files) | set(thumbs)))
        removed = 0
        for vid, path in files.items():
            if statuses.get(vid) in (None, "failed"):
                path.unlink(missing_ok=True)
                removed += 1
        for vid, path in thumbs.items():  # a completed job's thumbnail, or a preview of a job that may run again
            if statuses.get(vid) != "completed":
                path.unlink(missing_ok=True)
                removed += 1
        now = time.time()
        for tmp in self.dir.glob(".*"):
            try:
                if now - tmp.stat().st_mtime > STALE_TEMP_SECONDS:
                    tmp.unlink()
                    removed += 1
            except FileNotFoundError:
                continue
        lost = 0
        for vid, file in self.store.completed_files():
            if not (self.output_dir / file if file else self.video_path(vid)).is_file():
                self.store.mark_lost(vid, {"code": "content_lost",
                                           "message": "the video file was lost (removed outside the server)"})
                self.thumbnail_path(vid).unlink(missing_ok=True)
                lost += 1
        if removed or lost:
            log.warning("reconciled the job store with %s: %d files removed, %d jobs without a file failed",
                        self.dir, removed, lost)
        return removed, lost


def request_of(row: dict, generator=None) -> GenerationRequest:
    """The stored, validated request of a claimed row; its LoRAs (by name) resolved by `generator`'s library
    (GenError when one is no longer offered)."""
    params = json.loads(row["params"])
    images = tuple(Image.open(io.BytesIO(data)).convert("RGB") for data in row["inputs"])
    req = GenerationRequest(**{k: params[k] for k in PARAMS}, images=images)
    if params.get("loras") is not None:
        library = getattr(generator, "lora_library", None)
        if library is None:
            raise GenError("the job names LoRAs but this server offers none (start it with --lora-dir)", param="loras")
        req = req.replace(loras=library.specs(params["loras"]))
    return req


def job_error(job: Job) -> dict:
    """A failed job's error object: {code, message}; internals stay in the server log."""
    e = job.error
    if job.cancel_reason == "timeout":
        return {"code": "timeout", "message": "the job took longer than the server's timeout"}
    if isinstance(e, GenError):
        return {"code": getattr(e, "code", "invalid_value"), "message": str(e)}
    if isinstance(e, Cancelled):
        return {"code": "cancelled", "message": f"cancelled: {job.cancel_reason}"}
    stage = "writing the video" if job.result is not None else "the generation"
    return {"code": "generation_failed", "message": f"{stage} failed ({type(e).__name__}); see the server log"}
