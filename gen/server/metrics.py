"""Prometheus metrics for one server: requests, latency, queue depth, denoise step and stage times (not the app)."""
from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

CONTENT_TYPE = CONTENT_TYPE_LATEST
_FAST = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
_SLOW = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)


class Metrics:
    """One registry per app (so several apps in one process do not collide)."""

    def __init__(self):
        self.registry = r = CollectorRegistry()
        self.requests = Counter("gen_http_requests", "HTTP requests by endpoint and status",
                                ["endpoint", "method", "status"], registry=r)
        self.latency = Histogram("gen_http_request_seconds", "HTTP request latency", ["endpoint", "method"],
                                 buckets=_SLOW, registry=r)
        self.queue_depth = Gauge("gen_queue_depth", "generations waiting in this server's queue", registry=r)
        self.cluster_depth = Gauge("gen_cluster_queue_depth", "video jobs of the served models queued in the job "
                                   "store plus the generations waiting in the queues of their live replicas",
                                   registry=r)
        self.cluster_replicas = Gauge("gen_cluster_replicas", "live replicas serving a model on the job store (the "
                                      "most of any served model)", registry=r)
        self.running = Gauge("gen_running", "generations running now (up to the worker slots)", registry=r)
        self.jobs = Counter("gen_generations", "finished generations by outcome", ["outcome"], registry=r)
        self.step = Histogram("gen_denoise_step_seconds", "mean denoising step time of a generation",
                              buckets=_FAST, registry=r)
        self.stage = Histogram("gen_stage_seconds", "pipeline stage time", ["stage"], buckets=_SLOW, registry=r)
        self.webhooks = Counter("gen_webhook_deliveries", "webhook calls by outcome: delivered, retried, dropped",
                                ["outcome"], registry=r)
        self.removed = Counter("gen_outputs_removed", "output files removed by retention, by reason: expired, "
                               "disk_cap, stale_temp", ["reason"], registry=r)

    def track_queue(self, queue, cluster) -> None:
        """Gauges read at each scrape from `queue` and from `cluster()`, the store's view ({replicas, waiting})."""
        self.queue_depth.set_function(lambda: queue.queue_depth)
        self.running.set_function(lambda: len(queue.running))
        self.cluster_depth.set_function(lambda: cluster()["waiting"])
        self.cluster_replicas.set_function(lambda: cluster()["replicas"])

    def observe_job(self, job) -> None:
        """Called by the queue's worker when a job ends, its outputs written (or not)."""
        if job.error is not None:
            outcome = "cancelled" if job.cancel_reason else "failed"
            self.jobs.labels(outcome).inc()
            return
        self.jobs.labels("completed").inc()
        timings = job.result.timings
        for stage, seconds in timings.items():
            self.stage.labels(stage).observe(seconds)
        steps = job.result.request.num_inference_steps if job.result.request else None
        if "denoise" in timings and steps:
            self.step.observe(timings["denoise"] / steps)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class MetricsMiddleware:
    """Pure ASGI middleware (it keeps disconnect detection intact): counts requests and times them by route."""

    def __init__(self, app, metrics: Metrics):
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start = time.perf_counter()
        status = [500]

        async def send_status(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            route = scope.get("route")
            endpoint = getattr(route, "path", None) or "unmatched"  # the template, so ids do not become labels
            method = scope["method"]
            self.metrics.requests.labels(endpoint, method, str(status[0])).inc()
            self.metrics.latency.labels(endpoint, method).observe(time.perf_counter() - start)
