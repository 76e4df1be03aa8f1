"""The request queue: a bounded queue in front of one Generator and one worker thread, so one generation runs at a time.

Every door (REST images, the web UI, video jobs claimed from the job store) goes through one RequestQueue. Not HTTP
(the app turns its exceptions into status codes) and not storage (video jobs come from the store through `claim`).
"""
from __future__ import annotations

import collections
import logging
import math
import threading
import time
import uuid
from typing import Any, Callable

from gen.types import Cancelled, GenError, GenerationRequest, GenerationResult

log = logging.getLogger(__name__)
SHUTDOWN = "the server is shutting down"


class QueueFull(RuntimeError):
    """More requests are waiting than the queue holds (HTTP 429)."""

    def __init__(self, retry_after: int):
        super().__init__(f"the queue is full; retry in about {retry_after} s")
        self.retry_after = retry_after


class QueueClosed(RuntimeError):
    """The queue is shutting down and takes no new work (HTTP 503)."""


class Job:
    """One queued generation. The worker fills `result` (and `output`, what `finish` returned) or `error`, calls
    `on_done`, then sets `done`. `deadline` is a time.monotonic() value; past it the job stops at its next check."""

    def __init__(self, request: GenerationRequest, deadline: float, on_progress=None, finish=None, on_done=None):
        self.id = uuid.uuid4().hex
        self.request = request
        self.deadline = deadline
        self.on_progress: Callable[[Job], None] | None = on_progress  # in the worker, at start and after each step
        self.finish: Callable[[Job], Any] | None = finish  # in the worker after the generation: encode / write
        self.on_done: Callable[[Job], None] | None = on_done  # in the worker, before `done` is set
        self.step = 0
        self.total = 0
        self.started = False
        self.cancel_reason: str | None = None
        self.result: GenerationResult | None = None
        self.output: Any = None
        self.error: BaseException | None = None
        self.done = threading.Event()

    def cancel(self, reason: str) -> None:
        """Ask the job to stop; it does so at its next check (between steps and stages, between output frames)."""
        if self.cancel_reason is None:
            self.cancel_reason = reason

    def should_stop(self) -> bool:
        if self.cancel_reason is None and time.monotonic() > self.deadline:
            self.cancel_reason = "timeout"
        return self.cancel_reason is not None

    def check(self) -> None:
        """Raise Cancelled if the job should stop (for work done outside the pipeline: encoding, writing)."""
        if self.should_stop():
            raise Cancelled(f"cancelled ({self.cancel_reason})")

    @property
    def progress(self) -> int:
        """Percent of denoising steps done."""
        return int(100 * self.step / self.total) if self.total else 0


class RequestQueue:
    """`submit()` queues a request and returns its Job at once; the one worker thread runs jobs in order.

    `claim()` (optional) is asked for work when the local queue is empty: it returns a Job from a durable store (a
    video job) or None; it is polled every `poll` seconds while idle. `depth()` (optional) is the queue depth that
    admission compares with `max_queue` (the cluster's, with a shared store); by default the local one.
    """

    def __init__(self, generator, max_queue: int = 8, timeout: float = 600.0, metrics=None,
                 claim: Callable[[], Job | None] | None = None, poll: float = 0.25):
        assert max_queue >= 1 and timeout > 0, (max_queue, timeout)
        self.generator = generator
        self.max_queue = max_queue
        self.timeout = timeout
        self.metrics = metrics
        self.accepting = True
        self.running: Job | None = None
        self.poll = poll
        self._claim = claim
        self._queue: collections.deque[Job] = collections.deque()
        self._cond = threading.Condition()
        self._idle = threading.Event()  # set while nothing runs
        self._idle.set()
        self._avg_seconds = 1.0  # moving average of a job's run time, for Retry-After
        self._claim_error_logged = 0.0
        self._worker = threading.Thread(target=self._loop, name="gen-queue", daemon=True)
        self._worker.start()

    @property
    def queue_depth(self) -> int:
        return len(self._queue)

    @property
    def avg_seconds(self) -> float:
        return self._avg_seconds

    @property
    def ready(self) -> bool:
        return self.accepting and self._worker.is_alive() and self.generator.ready

    def retry_after(self, waiting: int, workers: int = 1) -> int:
        """Seconds until about one slot frees, with `waiting` requests ahead spread over `workers` workers."""
        return max(1, math.ceil(self._avg_seconds * (waiting + 1) / max(1, workers)))

    def submit(self, request: GenerationRequest, *, on_progress=None, finish=None, on_done=None,
               timeout: float | None = None) -> Job:
        job = Job(request, time.monotonic() + (timeout or self.timeout), on_progress, finish, on_done)
        with self._cond:
            if not self.accepting:
                raise QueueClosed(SHUTDOWN)
            if len(self._queue) >= self.max_queue:
                raise QueueFull(self.retry_after(len(self._queue)))
            self._queue.append(job)
            self._cond.notify()
        return job

    def wake(self) -> None:
        """Ask an idle worker to look for work now (a video job was just stored) instead of at its next poll."""
        with self._cond:
            self._cond.notify()

    def cancel(self, job: Job, reason: str) -> None:
        """Stop `job`: a waiting one leaves the queue at once (its slot is free for the next client) and is done; a
        running one stops at its next check."""
        job.cancel(reason)
        with self._cond:
            try:
                self._queue.remove(job)
            except ValueError:
                return  # running, finished, or never queued here
        self._finish_unstarted(job)

    def close(self) -> None:
        """Refuse new work and end the waiting jobs at once (503); the running job goes on (see `drain`)."""
        with self._cond:
            self.accepting = False
            waiting = list(self._queue)
            self._queue.clear()
            self._cond.notify_all()
        for job in waiting:
            job.cancel(SHUTDOWN)
            self._finish_unstarted(job)

    def drain(self, timeout: float) -> None:
        """`close()`, give the running job `timeout` seconds to finish, then cancel it and wait for it to stop."""
        self.close()
        if not self._idle.wait(timeout):
            running = self.running
            if running is not None:
                log.warning("cancelling the running generation: it ran past the shutdown timeout")
                running.cancel(SHUTDOWN)
            self._idle.wait(60)

    def shutdown(self, timeout: float = 30.0) -> None:
        """`drain(timeout)`, then stop the worker thread."""
        self.drain(timeout)
        self._worker.join(10)

    # --- the worker

    def _loop(self) -> None:
        busy = False  # the last pass ran a job: look for the next at once
        while True:
            with self._cond:
                if not self._queue and self.accepting and not busy:
                    self._cond.wait(self.poll if self._claim is not None else None)
                if self._queue:
                    job = self._queue.popleft()
                    self._start(job)
                elif not self.accepting:
                    return
                else:
                    job = None
            if job is None:
                job = self._claimed()
                if job is None:
                    busy = False
                    continue
            busy = True
            try:
                self._run(job)
            finally:
                with self._cond:
                    self.running = None
                    self._idle.set()

    def _start(self, job: Job) -> None:
        self.running = job
        self._idle.clear()

    def _claimed(self) -> Job | None:
        """A job from `claim`, or None (nothing to do, or the store is unreachable: logged, retried next poll)."""
        if self._claim is None:
            return None
        with self._cond:
            self._idle.clear()
        try:
            job = self._claim()
        except Exception as e:  # an unreachable store must not stop the worker; /ready reports it
            now = time.monotonic()
            if now - self._claim_error_logged > 30:
                log.warning("could not claim a job from the store: %s", e)
                self._claim_error_logged = now
            job = None
        with self._cond:
            if job is None:
                self._idle.set()
            else:
                self.running = job
        return job

    def _run(self, job: Job) -> None:
        start = time.monotonic()
        try:
            job.check()
            job.started = True
            if job.on_progress is not None:
                job.on_progress(job)
            job.result = self.generator.run(job.request, progress=lambda i, n: self._progress(job, i, n),
                                            cancel=job.should_stop)
            if job.finish is not None:
                job.output = job.finish(job)
        except Cancelled as e:
            job.error = e
        except GenError as e:  # bad input found late: the request's fault, not the server's
            job.error = e
        except Exception as e:  # a failed generation (or output write) fails its job, never the worker
            log.exception("generation %s failed", job.id)
            job.error = e
        if job.started:
            self._avg_seconds = 0.8 * self._avg_seconds + 0.2 * (time.monotonic() - start)
        self._done(job)

    def _finish_unstarted(self, job: Job) -> None:
        if job.done.is_set():
            return
        job.error = Cancelled(f"cancelled before it started ({job.cancel_reason})")
        self._done(job)

    def _done(self, job: Job) -> None:
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
