"""The engine: a bounded queue in front of one Generator and one worker thread, so one generation runs at a time.

Not HTTP (the app turns its exceptions into status codes) and not storage (video jobs persist in jobs.py).
"""
from __future__ import annotations

import collections
import logging
import math
import threading
import time
import uuid
from typing import Callable

from gen.types import Cancelled, GenerationRequest, GenerationResult

log = logging.getLogger(__name__)


class QueueFull(RuntimeError):
    """More requests are waiting than the queue holds (HTTP 429)."""

    def __init__(self, retry_after: int):
        super().__init__(f"the queue is full; retry in about {retry_after} s")
        self.retry_after = retry_after


class EngineClosed(RuntimeError):
    """The engine is shutting down and takes no new work (HTTP 503)."""


class Job:
    """One queued generation. The worker fills `result` or `error`, calls `on_done`, then sets `done`."""

    def __init__(self, request: GenerationRequest, deadline: float, on_progress=None, on_done=None):
        self.id = uuid.uuid4().hex
        self.request = request
        self.deadline = deadline  # time.monotonic() after which the job is cancelled
        self.on_progress: Callable[[Job], None] | None = on_progress  # called in the worker at start and each step
        self.on_done: Callable[[Job], None] | None = on_done  # called in the worker before `done` is set
        self.step = 0
        self.total = 0
        self.started = False
        self.cancel_reason: str | None = None
        self.result: GenerationResult | None = None
        self.error: BaseException | None = None
        self.done = threading.Event()

    def cancel(self, reason: str) -> None:
        """Ask the job to stop; it does so before its next denoising step (or before it starts)."""
        if self.cancel_reason is None:
            self.cancel_reason = reason

    def should_stop(self) -> bool:
        if self.cancel_reason is None and time.monotonic() > self.deadline:
            self.cancel_reason = "timeout"
        return self.cancel_reason is not None

    @property
    def progress(self) -> int:
        """Percent of denoising steps done."""
        return int(100 * self.step / self.total) if self.total else 0


class Engine:
    """`submit()` queues a request and returns its Job at once; the one worker thread runs jobs in order."""

    def __init__(self, generator, max_queue: int = 8, timeout: float = 600.0, metrics=None):
        assert max_queue >= 1 and timeout > 0, (max_queue, timeout)
        self.generator = generator
        self.max_queue = max_queue
        self.timeout = timeout
        self.metrics = metrics
        self.accepting = True
        self.running: Job | None = None
        self._queue: collections.deque[Job] = collections.deque()
        self._cond = threading.Condition()
        self._avg_seconds = 1.0  # moving average of a job's run time, for Retry-After
        self._worker = threading.Thread(target=self._loop, name="gen-engine", daemon=True)
        self._worker.start()

    @property
    def queue_depth(self) -> int:
        return len(self._queue)

    @property
    def ready(self) -> bool:
        return self.accepting and self._worker.is_alive() and getattr(self.generator, "ready", True)

    def submit(self, request: GenerationRequest, on_progress=None, on_done=None,
               timeout: float | None = None) -> Job:
        job = Job(request, time.monotonic() + (timeout or self.timeout), on_progress, on_done)
        with self._cond:
            if not self.accepting:
                raise EngineClosed("the server is shutting down")
            if len(self._queue) >= self.max_queue:
                raise QueueFull(max(1, math.ceil(self._avg_seconds * (len(self._queue) + 1))))
            self._queue.append(job)
            self._cond.notify()
        return job

    def close(self) -> None:
        """Refuse new work and cancel the waiting jobs; the running job goes on (see `shutdown`)."""
        with self._cond:
            self.accepting = False
            for job in self._queue:
                job.cancel("the server is shutting down")
            self._cond.notify()

    def shutdown(self, timeout: float = 30.0) -> None:
        """`close()`, let the running job finish for up to `timeout` seconds, then cancel it and stop."""
        self.close()
        self._worker.join(timeout)
        if self._worker.is_alive() and self.running is not None:
            self.running.cancel("the server is shutting down")
            self._worker.join(10)

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._queue and self.accepting:
                    self._cond.wait()
                if not self._queue:  # closed and drained
                    return
                job = self._queue.popleft()
                self.running = job
            try:
                self._run(job)
            finally:
                self.running = None

    def _run(self, job: Job) -> None:
        start = time.monotonic()
        try:
            if job.should_stop():
                raise Cancelled(f"cancelled before it started ({job.cancel_reason})")
            job.started = True
            if job.on_progress is not None:
                job.on_progress(job)
            job.result = self.generator.run(job.request, progress=lambda i, n: self._progress(job, i, n),
                                            cancel=job.should_stop)
        except Cancelled as e:
            job.error = e
        except Exception as e:  # a failed generation fails its job, never the worker
            log.exception("generation %s failed", job.id)
            job.error = e
        if job.started:
            self._avg_seconds = 0.8 * self._avg_seconds + 0.2 * (time.monotonic() - start)
        if self.metrics is not None:
            self.metrics.observe_job(job)
        try:
            if job.on_done is not None:
                job.on_done(job)
        except Exception as e:
            log.exception("finishing job %s failed", job.id)
            job.error = job.error or e
        job.done.set()

    def _progress(self, job: Job, step: int, total: int) -> None:
        job.step, job.total = step, total
        if job.on_progress is not None:
            job.on_progress(job)
