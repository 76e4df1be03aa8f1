"""What every door (REST, the web UI) shares: admission (the served model, Generator.validate, the server's limits)
onto the one request queue, and how a job that ended without a result is answered.

Not routing (app.py, web/ui.py).
"""
from __future__ import annotations

from gen.server.jobs import JobStore
from gen.server.limits import Budget
from gen.server.outputs import Outputs
from gen.server.queue import SHUTDOWN, Job, QueueClosed, QueueFull, RequestQueue
from gen.server.schemas import ApiError
from gen.server.videos import VideoJobs
from gen.server.webhooks import WebhookPolicy
from gen.types import Cancelled, GenError, GenerationRequest


class Service:
    """What every door shares: admission (the served model, Generator.validate, the limits), the queue, output files,
    video jobs and webhooks; `opts` is the server's gen.server.app.ServeOptions."""

    def __init__(self, generator, model_id: str, budget: Budget, queue: RequestQueue, outputs: Outputs,
                 videos: VideoJobs, store: JobStore, webhooks: WebhookPolicy, opts):
        self.generator, self.model_id, self.budget, self.queue = generator, model_id, budget, queue
        self.outputs, self.videos, self.store, self.webhooks, self.opts = outputs, videos, store, webhooks, opts
        self.view: dict | None = None  # the cluster as the job store saw it last (set by the upkeep thread)

    def admit(self, req: GenerationRequest, modality: str, model: str | None = None,
              renames: dict[str, str] | None = None) -> GenerationRequest:
        """`req` checked and filled in, or ApiError 400 naming the field as the client sent it (`renames`)."""
        if model is not None and model != self.model_id:
            raise ApiError(400, f"model {model!r} is not served here; this server serves {self.model_id!r}",
                           "model", "model_not_found")
        if self.generator.modality != modality:
            raise ApiError(400, f"model {self.model_id!r} makes {self.generator.modality}s, not {modality}s; "
                                f"use the {self.generator.modality} endpoints", "model", "wrong_modality")
        renames = renames or {}
        try:
            full = self.generator.validate(req)
            self.budget.check(full)
        except GenError as e:
            raise ApiError(400, str(e), renames.get(e.param, e.param), getattr(e, "code", "invalid_value")) from None
        return full

    def submit(self, req: GenerationRequest, finish=None) -> Job:
        """Onto this replica's queue: 429 when it is full, or when the cluster's queues are (as the job store last
        saw them: every replica's waiting requests and the queued video jobs, against --max-queue per replica)."""
        cluster = self.cluster()
        waiting = cluster["waiting"] - cluster.get("own", 0) + self.queue.queue_depth  # our own queue: as it is now
        if waiting >= self.opts.max_queue * cluster["replicas"]:
            raise queue_error(QueueFull(self.queue.retry_after(waiting, cluster["replicas"])))
        try:
            return self.queue.submit(req, finish=finish)
        except (QueueFull, QueueClosed) as e:
            raise queue_error(e) from None

    def cluster(self) -> dict:
        """{replicas, waiting, running} of this model's replicas as the job store saw them last (about every second;
        this replica alone until then)."""
        return self.view or {"replicas": 1, "waiting": self.queue.queue_depth, "running": 0}

    def check_video_room(self) -> None:
        """429 when the video jobs queued in the store fill the cluster's queues (--max-queue per live replica)."""
        waiting = self.store.queued(self.model_id)
        replicas = self.cluster()["replicas"]
        if waiting >= self.opts.max_queue * replicas:
            retry = self.queue.retry_after(waiting, replicas)
            raise ApiError(429, f"the queue is full; retry in about {retry} s", None, "queue_full", "rate_limit_error",
                           {"Retry-After": str(retry)})


def queue_error(e: Exception) -> ApiError:
    if isinstance(e, QueueFull):
        return ApiError(429, str(e), None, "queue_full", "rate_limit_error", {"Retry-After": str(e.retry_after)})
    return ApiError(503, str(e), None, "shutting_down", "server_error")


def job_api_error(job: Job) -> ApiError:
    """Why a job has no result, as the ApiError its request answers with."""
    e = job.error
    if job.cancel_reason == "timeout":
        return ApiError(504, "the generation took longer than the server's request timeout", None, "timeout",
                        "server_error")
    if job.cancel_reason == SHUTDOWN:
        return ApiError(503, SHUTDOWN, None, "shutting_down", "server_error")
    if isinstance(e, GenError):
        return ApiError(400, str(e), e.param, getattr(e, "code", "invalid_value"))
    if isinstance(e, Cancelled) or job.cancel_reason:
        return ApiError(499, f"cancelled: {job.cancel_reason}", None, "cancelled", "server_error")
    return ApiError(500, f"the generation failed ({type(e).__name__}); see the server log", None, "generation_failed",
                    "server_error")
