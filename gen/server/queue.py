"""The request queue: one bounded queue in front of the served models and a pool of worker threads.

A model takes as many generations at once as its Generator's batch group allows (`max_batch`; 1 without batching:
one at a time, as a Generator not loaded for batching is not thread-safe); generations of different models may run
at the same time, up to `max_running` in all. A worker takes the oldest waiting job whose model has a free slot.
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
from pathlib import Path
from typing import Any, Callable

from PIL import Image

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
    """One queued generation of model `model`. The worker fills `result` (and `output`, what `finish` returned) or
    `error`, calls `on_done`, then sets `done`. `deadline` is a time.monotonic() value; past it the job stops at its
    next check. `on_preview(job, step, total, image)`: a cheap preview of the first output (stages/preview.py) every
    `preview_every` steps and at the last, where the model's family has one."""

    def __init__(self, request: GenerationRequest, deadline: float, on_progress=None, finish=None, on_done=None,
                 model: str | None = None, on_preview=None, preview_every: int = 1):
        self.id = uuid.uuid4().hex
        self.request = request
        self.deadline = deadline
        self.model = model  # None until submitted: the queue's first model
        self.on_progress: Callable[[Job], None] | None = on_progress  # in the worker, at start and after each step
        self.on_preview: Callable[[Job, int, int, Image.Image], None] | None = on_preview  # in the worker
        self.preview_every = preview_every
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


def model_slots(generator) -> int:
    """Generations `generator` may run at once: its batch group's max_batch (loaded with max_batch > 1), else 1."""
    group = getattr(generator, "batch_group", None)
    return group.max_batch if group is not None else 1


class RequestQueue:
    """`submit()` queues a request for one model and returns its Job at once; the workers run jobs oldest first, each
    model up to its slots at once (`model_slots`), all models together up to `max_running` (default: the sum).

    `models`: {name: Generator}, or one Generator (named by its folder). `claim(names)` (optional) is asked for work
    when no local job can run: it returns a Job of one of the models `names` (those with a free slot) from a durable
    store (a video job), or None; the store is asked at most every `poll` seconds while nothing is found (at once
    after `wake()`).
    """

    def __init__(self, models, max_queue: int = 8, timeout: float = 600.0, metrics=None,
                 claim: Callable[[list[str]], Job | None] | None = None, poll: float = 0.25,
                 max_running: int | None = None):
        assert max_queue >= 1 and timeout > 0, (max_queue, timeout)
        if not isinstance(models, dict):
            models = {Path(models.model_path).name: models}
        assert models, "a queue needs a model"
        self.models = dict(models)
        self.default_model = next(iter(self.models))
        self.slots = {name: model_slots(g) for name, g in self.models.items()}
        self.max_running = max_running or sum(self.slots.values())
        assert self.max_running >= 1, self.max_running
        self.max_queue = max_queue
        self.timeout = timeout
        self.metrics = metrics
        self.accepting = True
        self.poll = poll
        self._claim = claim
        self._queue: collections.deque[Job] = collections.deque()
        self._running: list[Job] = []
        self._claiming = 0
        self._reserved: collections.Counter[str] = collections.Counter()  # a slot per model being claimed for
        self._next_claim = 0.0  # time.monotonic() of the next look into the store
        self._cond = threading.Condition()
        self._idle = threading.Event()  # set while nothing runs (and nothing is being claimed)
        self._idle.set()
        self._avg_seconds = 1.0  # moving average of a job's run time, for Retry-After
        self._claim_error_logged = 0.0
        self._workers = [threading.Thread(target=self._loop, name=f"gen-queue-{i}", daemon=True)
                         for i in range(self.max_running)]
        for w in self._workers:
            w.start()

    @property
    def generator(self):
        """The first model's Generator."""
        return self.models[self.default_model]

    @property
    def queue_depth(self) -> int:
        return len(self._queue)

    def depth_of(self, model: str) -> int:
        return sum(1 for j in list(self._queue) if j.model == model)

    @property
    def running(self) -> list[Job]:
        """The jobs running now (a copy)."""
        with self._cond:
            return list(self._running)

    def running_of(self, model: str) -> int:
        with self._cond:
            return sum(1 for j in self._running if j.model == model)

    @property
    def avg_seconds(self) -> float:
        return self._avg_seconds

    @property
    def ready(self) -> bool:
        return (self.accepting and all(w.is_alive() for w in self._workers)
                and all(g.ready for g in self.models.values()))

    def retry_after(self, waiting: int, replicas: int = 1) -> int:
        """Seconds until about one slot frees, with `waiting` requests ahead spread over `replicas` replicas of this
        server's workers."""
        return max(1, math.ceil(self._avg_seconds * (waiting + 1) / (max(1, replicas) * self.max_running)))

    def submit(self, request: GenerationRequest, *, model: str | None = None, on_progress=None, finish=None,
               on_done=None, on_preview=None, preview_every: int = 1, timeout: float | None = None) -> Job:
        model = model or self.default_model
        assert model in self.models, model
        job = Job(request, time.monotonic() + (timeout or self.timeout), on_progress, finish, on_done, model,
                  on_preview, preview_every)
        with self._cond:
            if not self.accepting:
                raise QueueClosed(SHUTDOWN)
            if len(self._queue) >= self.max_queue:
                raise QueueFull(self.retry_after(len(self._queue)))
            self._queue.append(job)
            self._cond.notify_all()
        return job

    def wake(self) -> None:
        """Ask an idle worker to look for work in the store now (a video job was just stored), not at its next poll."""
        with self._cond:
            self._next_claim = 0.0
            self._cond.notify_all()

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
        """Refuse new work and end the waiting jobs at once (503); the running jobs go on (see `drain`)."""
        with self._cond:
            self.accepting = False
            waiting = list(self._queue)
            self._queue.clear()
            self._cond.notify_all()
        for job in waiting:
            job.cancel(SHUTDOWN)
            self._finish_unstarted(job)

    def drain(self, timeout: float) -> None:
        """`close()`, give the running jobs `timeout` seconds to finish, then cancel them and wait for them to stop."""
        self.close()
        if not self._idle.wait(timeout):
            running = self.running
            if running:
                log.warning("cancelling %d running generation(s): past the shutdown timeout", len(running))
            for job in running:
                job.cancel(SHUTDOWN)
            self._idle.wait(60)

    def shutdown(self, timeout: float = 30.0) -> None:
        """`drain(timeout)`, then stop the worker threads."""
        self.drain(timeout)
        for w in self._workers:
            w.join(10)

    # --- the workers

    def _free(self) -> list[str]:
        """Models with a free slot (under the lock)."""
        if len(self._running) + self._claiming >= self.max_running:
            return []
        busy = collections.Counter(j.model for j in self._running) + self._reserved
        return [name for name, n in self.slots.items() if busy[name] < n]

    def _next_local(self) -> Job | None:
        """The oldest waiting job whose model has a free slot, taken from the queue (under the lock)."""
        free = self._free()
        for job in self._queue:
            if job.model in free:
                self._queue.remove(job)
                self._start(job)
                return job
        return None

    def _start(self, job: Job) -> None:
        self._running.append(job)
        self._idle.clear()

    def _loop(self) -> None:
        while True:
            names = None
            with self._cond:
                while True:
                    job = self._next_local()
                    if job is not None:
                        break
                    if not self.accepting:
                        return
                    wait = None
                    if self._claim is not None:
                        free = self._free()
                        wait = self._next_claim - time.monotonic()
                        if free and wait <= 0:
                            names = free
                            self._claiming += 1
                            self._reserved.update(names)
                            self._next_claim = math.inf  # one worker looks at a time
                            self._idle.clear()
                            break
                        wait = self.poll if not free or wait == math.inf else wait
                    self._cond.wait(wait)
            if job is None:
                job = self._claimed(names)
                if job is None:
                    continue
            try:
                self._run(job)
            finally:
                with self._cond:
                    self._running.remove(job)
                    if not self._running and not self._claiming:
                        self._idle.set()
                    self._cond.notify_all()  # a slot is free: a waiting job of this model may start

    def _claimed(self, names: list[str]) -> Job | None:
        """A job from `claim` for one of `names`, or None (nothing to do, or the store is unreachable: logged,
        retried next poll)."""
        try:
            job = self._claim(names)
        except Exception as e:  # an unreachable store must not stop the worker; /ready reports it
            now = time.monotonic()
            if now - self._claim_error_logged > 30:
                log.warning("could not claim a job from the store: %s", e)
                self._claim_error_logged = now
            job = None
        with self._cond:
            self._claiming -= 1
            self._reserved.subtract(names)
            self._reserved += collections.Counter()  # drop zeros
            self._next_claim = 0.0 if job is not None else time.monotonic() + self.poll
            if job is not None:
                assert job.model in self.models, job.model
                self._start(job)
            elif not self._running and not self._claiming:
                self._idle.set()
            self._cond.notify_all()
        return job

    def _run(self, job: Job) -> None:
        start = time.monotonic()
        generator = self.models[job.model]
        preview = None
        if job.on_preview is not None:
            preview = lambda step, total, image: job.on_preview(job, step, total, image)  # noqa: E731
        try:
            job.check()
            job.started = True
            if job.on_progress is not None:
                job.on_progress(job)
            job.result = generator.run(job.request, progress=lambda i, n: self._progress(job, i, n),
                                       cancel=job.should_stop, preview=preview, preview_every=job.preview_every)
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
