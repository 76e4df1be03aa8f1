"""The FastAPI app: OpenAI-shaped image and video endpoints, health, readiness, metrics and the web UI, every door
admitted by one Service (validation and limits) onto one RequestQueue.

Not the queue (queue.py), the job store (jobs.py), video jobs (videos.py), files and retention (outputs.py), the
HTTP edge (http.py) nor the process and its signals (cli.py).
"""
from __future__ import annotations

import asyncio
import base64
import contextlib
import hmac
import logging
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException

from gen.server.http import BodyLimits, ShapeUiErrors, serve_in_thread  # noqa: F401 (serve_in_thread: re-exported)
from gen.server.jobs import JobStore, SQLiteJobStore, StoreUnavailable
from gen.server.stores import open_store
from gen.server.limits import Budget, Limits, OverLimit
from gen.server.metrics import CONTENT_TYPE, Metrics, MetricsMiddleware
from gen.server.outputs import MEDIA, Outputs, Retention, atomic_write
from gen.server.queue import SHUTDOWN, Job, QueueClosed, RequestQueue
from gen.server.schemas import (ApiError, ImageBody, VideoBody, decode_image, encode_image, parse_json,
                                validation_error)
from gen.server.service import Served, Service, job_api_error, queue_error
from gen.server.stream import ImageStream
from gen.server.videos import VideoJobs
from gen.server.webhooks import WebhookPolicy, WebhookSender
from gen.types import GenError, GenerationRequest

log = logging.getLogger(__name__)
MAX_JSON_BYTES = 2**20  # a JSON body (prompts are limited far below this)
CLIENT_GONE = "client disconnected"


@dataclass
class ServeOptions:
    """Everything `gen serve`'s flags set (docs/SERVING.md); tests build it through create_app's keywords."""

    output_dir: str | Path
    model_id: str | None = None
    api_key: str | None = None
    max_queue: int = 8
    timeout: float = 600.0
    max_upload_mb: float = 20.0
    shutdown_timeout: float = 30.0
    read_timeout: float = 30.0
    cors_origins: list[str] = field(default_factory=list)
    ui: bool = True
    limits: Limits | dict | None = None  # None: Limits.for_model(generator); a dict: per model name
    max_running: int | None = None  # generations running at once, all models together (None: their slots summed)
    public_url: str | None = None
    output_ttl: float | None = 86400.0  # None: outputs and finished jobs are kept
    max_output_gb: float | None = None
    sweep_interval: float | None = None  # None: min(60, ttl / 4)
    job_store: JobStore | str | None = None  # a store, a postgresql:// URL, or None: SQLite in output_dir
    job_lease: float = 30.0
    job_retries: int = 1
    webhook_hosts: list[str] = field(default_factory=list)
    webhook_secret: str | None = None
    webhook_backoff: float = 1.0

    def __post_init__(self):
        checks = {"max_queue": self.max_queue >= 1, "timeout": self.timeout > 0,
                  "max_upload_mb": self.max_upload_mb > 0,
                  "shutdown_timeout": self.shutdown_timeout >= 0, "read_timeout": self.read_timeout > 0,
                  "output_ttl": self.output_ttl is None or self.output_ttl > 0,
                  "max_output_gb": self.max_output_gb is None or self.max_output_gb > 0,
                  "job_lease": self.job_lease > 0, "job_retries": self.job_retries >= 0,
                  "max_running": self.max_running is None or self.max_running >= 1}
        for name, ok in checks.items():
            if not ok:
                raise GenError(f"--{name.replace('_', '-')} got {getattr(self, name)!r}, which is out of range",
                               param=name)
        if self.public_url is not None and not self.public_url.startswith(("http://", "https://")):
            raise GenError(f"--public-url must start with http:// or https://, got {self.public_url!r}",
                           param="public_url")


def create_app(models, **options) -> FastAPI:
    """An app serving `models`: a loaded gen.Generator, or {name: Generator} (several models on one queue; the first
    is the default); `options` are ServeOptions' fields."""
    opts = ServeOptions(**options)
    output_dir = Path(opts.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    if not isinstance(models, dict):
        models = {opts.model_id or Path(models.model_path).name: models}
    elif opts.model_id is not None:
        raise GenError("model_id names the one model of a single-model server; name several models by their keys",
                       param="model_id")
    if not models:
        raise GenError("a server needs at least one model", param="model_path")
    metrics = Metrics()
    served = {name: Served(name, g, Budget(g, _limits_of(opts.limits, name, g))) for name, g in models.items()}
    policy = WebhookPolicy(opts.webhook_hosts, opts.webhook_secret)
    store = opts.job_store if isinstance(opts.job_store, JobStore) else open_store(opts.job_store, output_dir)
    try:
        check_volume(store, output_dir)
    except GenError:
        store.close()
        raise
    ttl = opts.output_ttl
    video_models = {name: g for name, g in models.items() if g.modality == "video"}
    videos = VideoJobs(store, output_dir, video_models, timeout=opts.timeout, lease=opts.job_lease,
                       retries=opts.job_retries, ttl=ttl, metrics=metrics)
    videos.recover()
    videos.reconcile()
    queue = RequestQueue(models, max_queue=opts.max_queue, timeout=opts.timeout, metrics=metrics,
                         claim=videos.claim if video_models else None, max_running=opts.max_running)
    outputs = Outputs(output_dir)
    service = Service(served, queue, outputs, videos, store, policy, opts)
    retention = Retention(output_dir, ttl, int(opts.max_output_gb * 2**30) if opts.max_output_gb else None,
                          videos.expire, videos.drop_file, metrics)
    upkeep = Upkeep(service, retention, opts)
    metrics.track_queue(queue, service.cluster_total)
    sender = WebhookSender(store, policy, backoff=opts.webhook_backoff, metrics=metrics) if policy.hosts else None

    def drain() -> None:
        """What SIGTERM does first: refuse new work (503), end the waiting requests, let the running one finish
        for --shutdown-timeout seconds, then cancel it (a running video job goes back to the queue)."""
        queue.drain(opts.shutdown_timeout)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        await asyncio.to_thread(queue.shutdown, opts.shutdown_timeout)
        upkeep.close()
        if sender is not None:
            sender.close()
        videos.close()
        store.close()

    app = FastAPI(title="gen", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.queue, app.state.store, app.state.metrics, app.state.service = queue, store, metrics, service
    app.state.retention, app.state.upkeep, app.state.drain = retention, upkeep, drain
    app.state.read_timeout = opts.read_timeout
    key_check = [Depends(_key_checker(opts.api_key))] if opts.api_key else []
    app.include_router(Api(service).router(key_check))
    _add_error_handlers(app)
    app.add_middleware(MetricsMiddleware, metrics=metrics)
    if opts.cors_origins:
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=opts.cors_origins, allow_methods=["*"], allow_headers=["*"])
    if opts.ui:
        import gradio as gr

        from web.ui import CSS, build_ui

        blocks = build_ui(service, delete_cache=(max(60, int(ttl / 4)), int(ttl)) if ttl else None)
        auth = None
        if opts.api_key:
            expected = opts.api_key.encode()
            auth = lambda user, password: hmac.compare_digest(password.encode(), expected)  # noqa: E731
        gr.mount_gradio_app(app, blocks, path="/ui", auth=auth, max_file_size=int(opts.max_upload_mb * 2**20),
                            auth_message="Password: the server's API key." if opts.api_key else None, css=CSS)
        app.add_middleware(ShapeUiErrors)
    app.add_middleware(BodyLimits, max_json=MAX_JSON_BYTES, max_upload=int(opts.max_upload_mb * 2**20),
                       read_timeout=opts.read_timeout)
    return app


VOLUME_MARKER = ".gen-volume"
MARKER_WAIT_S = 5.0  # how long a replica waits for another one to write the marker of a store it just created


def _limits_of(limits, name: str, generator) -> Limits:
    """ServeOptions.limits for model `name`: one Limits for every model, {name: Limits}, or None (sized to it)."""
    if isinstance(limits, dict):
        limits = limits.get(name)
    return limits or Limits.for_model(generator)


def check_volume(store: JobStore, output_dir: Path) -> None:
    """The output directory must be the volume the job store's files are on (one id, in the store and in the
    directory's marker file): a replica with a directory of its own would find every file missing."""
    marker = output_dir / VOLUME_MARKER

    def read_marker() -> str | None:  # None also while another writer has created the file but not yet written it
        return (marker.read_text().strip() or None) if marker.is_file() else None

    mine = read_marker()
    stored, new = store.volume(mine or uuid.uuid4().hex)
    deadline = time.monotonic() + MARKER_WAIT_S
    while mine is None and not new and time.monotonic() < deadline:
        # replicas started together on a new store: the one whose id went in may be writing the marker right now
        time.sleep(0.1)
        mine = read_marker()
    if mine is None:
        holds = any((output_dir / d).is_dir() and any((output_dir / d).iterdir()) for d in ("videos", "outputs"))
        if not isinstance(store, SQLiteJobStore) and (not new or holds):
            raise GenError(f"--output-dir {output_dir} has no {VOLUME_MARKER} marker: it is not the volume this job "
                           f"store's files are on (mount the one the other replicas use); if it is, write the "
                           f"store's volume id {stored} into {marker} (gen jobs migrate does this)",
                           param="output_dir")
        atomic_write(marker, lambda tmp: tmp.write_text(stored + "\n"))
    elif mine != stored:
        raise GenError(f"--output-dir {output_dir} is not the volume this job store's files are on (its "
                       f"{VOLUME_MARKER} says {mine}, the store {stored}); mount the volume the other replicas use",
                       param="output_dir")


class Upkeep:
    """A thread: this replica's heartbeat in the job store and the cluster's view (every second), leases that ran
    out (every lease / 2 s), retention (every sweep interval)."""

    ALIVE = 10.0  # a replica silent this long no longer counts

    def __init__(self, service: Service, retention: Retention, opts: ServeOptions):
        self.service, self.retention = service, retention
        self.sweep_every = opts.sweep_interval or (min(60.0, opts.output_ttl / 4) if opts.output_ttl else 60.0)
        self.recover_every = opts.job_lease / 2
        self.replica = service.videos.worker
        self._logged: dict[str, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="gen-upkeep", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        due: dict[str, float] = {}
        while True:
            now = time.monotonic()
            for name, every, fn in (("heartbeat", 1.0, self._beat), ("recover", self.recover_every,
                                    self.service.videos.recover), ("sweep", self.sweep_every, self.retention.sweep)):
                if now >= due.get(name, 0.0):
                    due[name] = now + every
                    try:
                        fn()
                    except Exception as e:  # the store may be down; the next pass tries again
                        if time.monotonic() - self._logged.get(name, -1e9) > 30:
                            log.warning("upkeep step %s failed: %s", name, e)
                            self._logged[name] = time.monotonic()
            if self._stop.wait(min(1.0, self.recover_every, self.sweep_every)):
                return

    def _beat(self) -> None:
        """One row per served model (`<replica>/<model>`): its waiting and running generations here."""
        s = self.service
        views = {}
        for name in s.models:
            own = s.queue.depth_of(name)
            s.store.beat(f"{self.replica}/{name}", name, own, s.queue.running_of(name))
            views[name] = {**s.store.cluster(name, self.ALIVE), "own": own}
        s.views = views

    def close(self) -> None:
        self._stop.set()
        self._thread.join(10)
        try:
            for name in self.service.models:
                self.service.store.leave(f"{self.replica}/{name}")
        except StoreUnavailable as e:
            log.warning("could not remove this replica from the job store: %s", e)


class Api:
    """The route handlers."""

    def __init__(self, service: Service):
        self.s = service
        self.created = int(time.time())

    def router(self, key_check: list) -> APIRouter:
        r = APIRouter()
        r.get("/health")(self.health)
        r.get("/ready")(self.ready)
        r.get("/metrics", dependencies=key_check)(self.metrics)
        r.get("/outputs/{name}")(self.output)
        v1 = APIRouter(prefix="/v1", dependencies=key_check)
        v1.get("/models")(self.models)
        v1.get("/loras")(self.loras)
        v1.post("/images/generations")(self.images_generations)
        v1.post("/images/edits")(self.images_edits)
        v1.post("/videos")(self.create_video)
        v1.get("/videos")(self.list_videos)
        v1.get("/videos/{video_id}")(self.get_video)
        v1.get("/videos/{video_id}/content")(self.video_content)
        v1.delete("/videos/{video_id}")(self.delete_video)
        r.include_router(v1)
        return r

    # --- health, metrics, models

    async def health(self):
        return {"status": "ok"}

    async def ready(self):
        q = self.s.queue
        if not q.ready:
            reason = "shutting down" if not q.accepting else "not ready (a rank or the worker has stopped)"
            raise ApiError(503, f"the server is {reason}", None, "not_ready", "server_error")
        try:
            await asyncio.to_thread(self.s.store.ping)
        except StoreUnavailable as e:
            raise ApiError(503, f"the job store is unreachable: {e}", None, "store_unavailable",
                           "server_error") from None
        return {"status": "ready", "model": self.s.default.name, "models": list(self.s.models),
                "queue_depth": q.queue_depth}

    async def metrics(self, request: Request):
        return Response(request.app.state.metrics.render(), media_type=CONTENT_TYPE)

    async def models(self):
        return {"object": "list", "data": [{"id": m.name, "object": "model", "created": self.created,
                                            "owned_by": "gen", "family": m.generator.family,
                                            "modality": m.modality, "loras": m.loras is not None,
                                            "limits": m.budget.limits.describe()}
                                           for m in self.s.models.values()]}

    async def loras(self, model: str | None = None):
        """The LoRAs requests may name (the files of --lora-dir, by stem), with the models that offer them."""
        served = [self.s.model(model, "image")] if model is not None else list(self.s.models.values())
        offered: dict[str, dict] = {}
        for m in served:
            if m.loras is None:
                continue
            for item in await asyncio.to_thread(m.loras.list):
                entry = offered.setdefault(item["name"], {"id": item["name"], "object": "lora", **item,
                                                          "models": []})
                entry["models"].append(m.name)
        return {"object": "list", "data": sorted(offered.values(), key=lambda e: e["id"])}

    # --- images

    async def images_generations(self, request: Request):
        body = ImageBody.parse(parse_json(await request.body()))
        return await self._images(request, body, body.to_request(), "image_generation")

    async def images_edits(self, request: Request):
        fields, files = await self._form(request)
        uploads = files.pop("image", []) + files.pop("image[]", [])
        masks = files.pop("mask", [])
        if files:
            raise ApiError(400, f"unknown file field {next(iter(files))!r}", next(iter(files)), "unknown_parameter")
        body = ImageBody.parse(fields)
        if not uploads:
            raise ApiError(400, "missing required parameter 'image'", "image", "missing_required_parameter")
        if masks:
            name = self.s.model(body.model, "image").name
            raise ApiError(400, f"model {name!r} does not support masks; send the image alone", "mask",
                           "unsupported_parameter")
        images = tuple([await asyncio.to_thread(decode_image, data, "image") for data in uploads])
        return await self._images(request, body, body.to_request(images), "image_edit")

    async def _images(self, request: Request, body: ImageBody, req: GenerationRequest, event: str):
        renames = {"height": "size", "width": "size"} if body.size not in (None, "auto") else {}
        served, full = self.s.admit(req, "image", body.model, renames, body.loras)
        fmt, compression, as_url = body.output_format, body.output_compression, body.response_format == "url"
        outputs = self.s.outputs

        def finish(job: Job) -> list[tuple[str, str]]:  # in the worker, under the deadline
            data = []
            for image in job.result.images:
                job.check()
                encoded = encode_image(image, fmt, compression)
                data.append(("url", outputs.save(encoded, fmt)) if as_url
                            else ("b64_json", base64.b64encode(encoded).decode()))
            return data

        if body.stream:
            return ImageStream(self.s, served, full, body, event).response(request, finish)
        job = self.s.submit(served, full, finish)
        if not await self._wait(request, job):
            return Response(status_code=499)  # the client went away; nobody reads this
        if job.error is not None:
            raise job_api_error(job)
        revised = job.result.revised_prompt or full.prompt
        base = self._base_url(request)
        data = [{kind: f"{base}/outputs/{value}" if kind == "url" else value, "revised_prompt": revised}
                for kind, value in job.output]
        image = job.result.images[0]
        return {"created": int(time.time()), "data": data, "output_format": fmt,
                "size": f"{image.width}x{image.height}"}

    async def output(self, name: str):
        """A generated file, by the opaque name it was returned under (never a path from the request)."""
        path = self.s.outputs.path(name)
        if path is None:
            raise ApiError(404, f"no output named {name!r}", "name", "not_found")
        return FileResponse(path, media_type=MEDIA[name.rsplit(".", 1)[1]])

    # --- videos

    async def create_video(self, request: Request):
        if request.headers.get("content-type", "").startswith("multipart/form-data"):
            fields, files = await self._form(request)
            refs = files.pop("input_reference", [])
            if files:
                raise ApiError(400, f"unknown file field {next(iter(files))!r}", next(iter(files)), "unknown_parameter")
            images = tuple([await asyncio.to_thread(decode_image, data, "input_reference") for data in refs])
        else:
            fields, images = parse_json(await request.body()), ()
        body = VideoBody.parse(fields)
        req = body.to_request(self.s.model(body.model, "video").generator.defaults.fps or 16, images)
        renames = {"image": "input_reference"}
        if body.size not in (None, "auto"):
            renames.update(height="size", width="size")
        if body.seconds is not None and body.num_frames is None:
            renames["num_frames"] = "seconds"
        served, full = self.s.admit(req, "video", body.model, renames, body.loras)
        webhook = None
        if body.webhook_url is not None:
            try:
                webhook = self.s.webhooks.check(body.webhook_url)
            except OverLimit as e:
                raise ApiError(400, str(e), e.param, e.code) from None
        if not self.s.queue.accepting:
            raise queue_error(QueueClosed(SHUTDOWN))
        await asyncio.to_thread(self.s.check_video_room, served)
        size = f"{full.width}x{full.height}"
        seconds = _fmt_seconds(body.seconds if body.seconds is not None else full.num_frames / full.fps)
        loras = None
        if body.loras is not None:  # stored by name, resolved again by the worker that runs the job
            loras = [{"name": item["name"], "scale": spec.scale, "target": spec.target}
                     for item, spec in zip(body.loras, full.loras)]
        video = await asyncio.to_thread(self.s.videos.create, full, model=served.name, size=size, seconds=seconds,
                                        webhook_url=webhook, loras=loras)
        self.s.queue.wake()
        return JSONResponse(video, headers={"openai-poll-after-ms": "250"})

    async def list_videos(self, limit: int = 20, after: str | None = None, order: str = "desc"):
        if not 1 <= limit <= 100:
            raise ApiError(400, f"limit must be between 1 and 100, got {limit}", "limit", "invalid_value")
        if order not in ("asc", "desc"):
            raise ApiError(400, f"order must be 'asc' or 'desc', got {order!r}", "order", "invalid_value")
        data, has_more = await asyncio.to_thread(self.s.store.list, limit, after, order)
        return {"object": "list", "data": data, "has_more": has_more,
                "first_id": data[0]["id"] if data else None, "last_id": data[-1]["id"] if data else None}

    async def get_video(self, video_id: str):
        return JSONResponse(await self._video(video_id), headers={"openai-poll-after-ms": "250"})

    async def video_content(self, video_id: str, variant: str = "video"):
        video = await self._video(video_id)
        if variant not in ("video", "thumbnail"):
            raise ApiError(400, f"variant {variant!r} is not available; 'video' or 'thumbnail'", "variant",
                           "invalid_value")
        if variant == "thumbnail":  # the latest preview while it runs, the first frame once completed
            path = self.s.videos.thumbnail_path(video_id)
            try:  # read whole: a running job replaces the file (atomically) as it goes
                data = await asyncio.to_thread(path.read_bytes) if video["status"] in ("in_progress", "completed") \
                    else None
            except FileNotFoundError:
                data = None
            if data is not None:
                return Response(data, media_type="image/webp", headers={"Cache-Control": "no-store"})
            if video["status"] == "completed":
                raise ApiError(404, f"the thumbnail of video {video_id!r} has been removed", "video_id", "not_found")
            raise ApiError(409, f"video {video_id!r} is {video['status']} and has no preview yet", "video_id",
                           "video_not_ready")
        if video["status"] != "completed":
            raise ApiError(409, f"video {video_id!r} is {video['status']}, not completed", "video_id",
                           "video_not_ready")
        path = self.s.videos.content(video)
        if not path.is_file():
            raise ApiError(404, f"the content of video {video_id!r} has been removed", "video_id", "not_found")
        return FileResponse(path, media_type="video/mp4", filename=f"{video_id}.mp4")

    async def delete_video(self, video_id: str):
        if not await asyncio.to_thread(self.s.videos.delete, video_id):
            raise ApiError(404, f"no video with id {video_id!r}", "video_id", "not_found")
        return {"id": video_id, "object": "video.deleted", "deleted": True}

    async def _video(self, video_id: str) -> dict:
        video = await asyncio.to_thread(self.s.store.get, video_id)
        if video is None:
            raise ApiError(404, f"no video with id {video_id!r}", "video_id", "not_found")
        return video

    # --- shared

    async def _wait(self, request: Request, job: Job) -> bool:
        """Wait for `job`; False if the client disconnected (the job is cancelled: a waiting one frees its queue slot
        at once). Past the deadline, answer 504 at once; the worker stops the job at its next check."""
        while not job.done.is_set():
            if await request.is_disconnected():
                self.s.queue.cancel(job, CLIENT_GONE)
                return False
            if time.monotonic() > job.deadline:
                self.s.queue.cancel(job, "timeout")
                raise job_api_error(job)
            await asyncio.sleep(0.02)
        return True

    def _base_url(self, request: Request) -> str:
        """--public-url, else the address this server was reached on (never the client's Host header)."""
        if self.s.opts.public_url:
            return self.s.opts.public_url.rstrip("/")
        host, port = request.scope["server"]
        host = f"[{host}]" if ":" in host else host
        return f"{request.scope.get('scheme', 'http')}://{host}:{port}"

    async def _form(self, request: Request) -> tuple[dict[str, str], dict[str, list[bytes]]]:
        """Multipart form -> (text fields, file fields -> contents), uploads limited in size (413)."""
        if not request.headers.get("content-type", "").startswith("multipart/form-data"):
            raise ApiError(400, "expected a multipart/form-data body", None, "invalid_content_type")
        max_upload = self.s.opts.max_upload_mb * 2**20
        form = await request.form(max_files=16, max_fields=64)
        fields: dict[str, str] = {}
        files: dict[str, list[bytes]] = {}
        for key, value in form.multi_items():
            if isinstance(value, UploadFile):
                if value.size is not None and value.size > max_upload:
                    raise ApiError(413, f"{key} is larger than {max_upload / 2**20:g} MiB", key, "too_large")
                files.setdefault(key, []).append(await value.read())
            elif key in fields:
                raise ApiError(400, f"parameter {key!r} given twice", key, "invalid_value")
            else:
                fields[key] = value
        return fields, files


def _key_checker(api_key: str):
    expected = f"Bearer {api_key}".encode()

    async def check(request: Request) -> None:
        given = request.headers.get("authorization", "").encode()
        if not hmac.compare_digest(given, expected):  # constant time
            raise ApiError(401, "missing or incorrect API key (send 'Authorization: Bearer <key>')", None,
                           "invalid_api_key")
    return check


def _fmt_seconds(seconds: float) -> str:
    return f"{seconds:g}" if seconds == int(seconds) else f"{seconds:.2f}".rstrip("0")


_HTTP_CODES = {400: "invalid_request", 401: "invalid_api_key", 403: "forbidden", 404: "not_found",
               405: "method_not_allowed", 408: "request_timeout", 413: "too_large", 415: "unsupported_media_type"}


def _add_error_handlers(app: FastAPI) -> None:
    """Every error answers {"error": {message, type, param, code}}; FastAPI's 422 body never leaves the server."""

    def answer(e: ApiError) -> JSONResponse:
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

    @app.exception_handler(ApiError)
    async def api_error(request, e: ApiError):
        return answer(e)

    @app.exception_handler(GenError)
    async def gen_error(request, e: GenError):
        return answer(ApiError(400, str(e), e.param, getattr(e, "code", "invalid_value")))

    @app.exception_handler(StoreUnavailable)
    async def store_down(request, e: StoreUnavailable):
        return answer(ApiError(503, f"the job store is unreachable ({e}); try again shortly", None,
                               "store_unavailable", "server_error", {"Retry-After": "5"}))

    @app.exception_handler(RequestValidationError)
    async def request_validation(request, e: RequestValidationError):
        return answer(validation_error(e.errors()))

    @app.exception_handler(HTTPException)
    async def http_error(request, e: HTTPException):
        kind = "invalid_request_error" if e.status_code < 500 else "server_error"
        code = _HTTP_CODES.get(e.status_code, f"http_{e.status_code}")
        return answer(ApiError(e.status_code, str(e.detail), None, code, kind))

    @app.exception_handler(Exception)
    async def internal(request, e: Exception):
        log.exception("unhandled error on %s", request.url.path)
        return answer(ApiError(500, f"internal server error ({type(e).__name__})", None, "internal_error",
                               "server_error"))

