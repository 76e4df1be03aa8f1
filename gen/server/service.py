"""What every door (REST, the web UI) shares: the served models, admission (the model asked for, its LoRAs,
Generator.validate, the server's limits) onto the one request queue, and how a job that ended without a result is
answered.

Not routing (app.py, web/ui.py).
"""
from __future__ import annotations

from dataclasses import dataclass

from gen.server.jobs import JobStore
from gen.server.limits import Budget
from gen.server.outputs import Outputs
from gen.server.queue import SHUTDOWN, Job, QueueClosed, QueueFull, RequestQueue
from gen.server.schemas import ApiError
from gen.server.videos import VideoJobs
from gen.server.webhooks import WebhookPolicy
from gen.types import Cancelled, GenError, GenerationRequest


@dataclass
class Served:
    """One model this server serves: its name (the `model` of requests), its Generator and its limits."""

    name: str
    generator: object  # gen.Generator
    budget: Budget

    @property
    def modality(self) -> str:
        return self.generator.modality

    @property
    def loras(self):
        """The LoraLibrary requests may name (gen serve --lora-dir), or None."""
        return getattr(self.generator, "lora_library", None)

    def lora_specs(self, items) -> tuple:
        """A request's `loras` field ([{"name", "scale", "target"}]) as LoraSpecs, each file read (cached) so that a
        bad one is refused now; ApiError 400 with `param` like `loras[0].name`."""
        library, adapters = self.loras, getattr(self.generator.pipeline, "loras", None)
        if isinstance(items, (list, tuple)) and not items:
            return ()  # none: always possible
        if library is None or adapters is None:
            raise ApiError(400, f"model {self.name!r} offers no LoRAs (the server was started without --lora-dir)",
                           "loras", "loras_not_available")
        try:
            return library.specs(items, family=adapters.family, max_loras=adapters.max_loras, slots=adapters.slots)
        except GenError as e:
            unknown = (e.param or "").endswith(".name") and str(e).startswith("unknown LoRA")
            raise ApiError(400, str(e), e.param, "lora_not_found" if unknown else "invalid_value") from None


class Service:
    """What every door shares: the served models (`models`, by name, the first the default), admission, the queue,
    output files, video jobs and webhooks; `opts` is the server's gen.server.app.ServeOptions."""

    def __init__(self, models: dict[str, Served], queue: RequestQueue, outputs: Outputs, videos: VideoJobs,
                 store: JobStore, webhooks: WebhookPolicy, opts):
        assert models
        self.models, self.queue = models, queue
        self.outputs, self.videos, self.store, self.webhooks, self.opts = outputs, videos, store, webhooks, opts
        self.views: dict[str, dict] = {}  # model -> the cluster as the job store saw it last (the upkeep thread)

    @property
    def default(self) -> Served:
        return next(iter(self.models.values()))

    def model(self, name: str | None, modality: str) -> Served:
        """The model a request names (None: the first served model of `modality`, else the first), or ApiError 400
        (`model_not_found`, `wrong_modality`)."""
        if name is None:
            return next((m for m in self.models.values() if m.modality == modality), self.default)
        served = self.models.get(name)
        if served is None:
            raise ApiError(400, f"model {name!r} is not served here; this server serves "
                                f"{', '.join(repr(n) for n in self.models)}", "model", "model_not_found")
        return served

    def admit(self, req: GenerationRequest, modality: str, model: str | None = None,
              renames: dict[str, str] | None = None, loras=None) -> tuple[Served, GenerationRequest]:
        """The model asked for and `req` checked and filled in (`loras`: the request's LoRA field, None for the
        model's default set), or ApiError 400 naming the field as the client sent it (`renames`)."""
        served = self.model(model, modality)
        if served.modality != modality:
            raise ApiError(400, f"model {served.name!r} makes {served.modality}s, not {modality}s; "
                                f"use the {served.modality} endpoints", "model", "wrong_modality")
        if loras is not None:
            req = req.replace(loras=served.lora_specs(loras))
        renames = renames or {}
        try:
            served.budget.check_prompts(req)
            full = served.generator.validate(req)
            served.budget.check(full)
        except GenError as e:
            raise ApiError(400, str(e), renames.get(e.param, e.param), getattr(e, "code", "invalid_value")) from None
        return served, full

    def submit(self, served: Served, req: GenerationRequest, finish=None, **kwargs) -> Job:
        """Onto this replica's queue: 429 when it is full, or when the cluster's queues are (as the job store last
        saw them: every replica's waiting requests and the queued video jobs, against --max-queue per replica).
        `kwargs`: RequestQueue.submit's (on_preview, ...)."""
        cluster = self.cluster(served.name)
        waiting = cluster["waiting"] - cluster.get("own", 0) + self.queue.depth_of(served.name)  # ours: as it is now
        if waiting >= self.opts.max_queue * cluster["replicas"]:
            raise queue_error(QueueFull(self.queue.retry_after(waiting, cluster["replicas"])))
        try:
            return self.queue.submit(req, model=served.name, finish=finish, **kwargs)
        except (QueueFull, QueueClosed) as e:
            raise queue_error(e) from None

    def cluster(self, model: str | None = None) -> dict:
        """{replicas, waiting, running} of `model`'s replicas (None: the first model) as the job store saw them
        last (about every second; this replica alone until then)."""
        name = model or self.default.name
        if name in self.views:
            return self.views[name]
        depth = self.queue.depth_of(name)
        return {"replicas": 1, "waiting": depth, "running": self.queue.running_of(name), "own": depth}

    def cluster_total(self) -> dict:
        """Every served model's cluster view together: waiting summed, replicas the most of any model."""
        views = [self.cluster(name) for name in self.models]
        return {"replicas": max(v["replicas"] for v in views), "waiting": sum(v["waiting"] for v in views),
                "running": sum(v["running"] for v in views)}

    def check_video_room(self, served: Served) -> None:
        """429 when the video jobs queued in the store fill the cluster's queues (--max-queue per live replica)."""
        waiting = self.store.queued(served.name)
        replicas = self.cluster(served.name)["replicas"]
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
