"""The FastAPI app: OpenAI-shaped image and video endpoints, health, metrics and the web UI, all on one Engine.

Not the queue (engine.py), the job store (jobs.py) nor the process / signal handling (cli.py).
"""
from __future__ import annotations

import asyncio
import base64
import contextlib
import hmac
import json
import logging
import re
import threading
import time
import uuid
from pathlib import Path

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException

from gen.server.engine import Engine, EngineClosed, Job, QueueFull
from gen.server.jobs import JobStore
from gen.server.metrics import CONTENT_TYPE, Metrics, MetricsMiddleware
from gen.server.schemas import ApiError, ImageBody, VideoBody, decode_image, encode_image, validation_error
from gen.types import Cancelled, GenError, GenerationRequest

log = logging.getLogger(__name__)
_OUTPUT_NAME = re.compile(r"[0-9a-f]{32}\.(png|jpeg|webp)")
_MEDIA = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}


def create_app(generator, *, output_dir: str | Path, model_id: str | None = None, api_key: str | None = None,
               max_queue: int = 8, timeout: float = 600.0, max_upload_mb: float = 20.0, shutdown_timeout: float = 30.0,
               cors_origins: list[str] | None = None, ui: bool = True) -> FastAPI:
    """An app serving `generator` (a loaded gen.Generator); outputs and the job database go under `output_dir`."""
    output_dir = Path(output_dir)
    (output_dir / "images").mkdir(parents=True, exist_ok=True)
    model_id = model_id or Path(generator.model_path).name
    metrics = Metrics()
    engine = Engine(generator, max_queue=max_queue, timeout=timeout, metrics=metrics)
    metrics.track_engine(engine)
    store = JobStore(output_dir)
    lost = store.fail_unfinished("the server stopped before this job finished; submit it again")
    if lost:
        log.warning("marked %d unfinished video jobs from a previous run as failed", lost)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        await asyncio.to_thread(engine.shutdown, shutdown_timeout)
        store.close()

    app = FastAPI(title="gen", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.engine, app.state.store, app.state.metrics = engine, store, metrics
    api = Api(generator, engine, store, output_dir, model_id, max_upload_mb * 2**20)
    app.include_router(api.router(api_key))
    _add_error_handlers(app)
    app.add_middleware(MetricsMiddleware, metrics=metrics)
    if cors_origins:
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=cors_origins, allow_methods=["*"], allow_headers=["*"])
    if ui:
        import gradio as gr

        from web.ui import build_ui

        ui_dir = output_dir / "ui"
        blocks = build_ui(engine, model_id, ui_dir)
        auth = (lambda user, password: hmac.compare_digest(password.encode(), api_key.encode())) if api_key else None
        gr.mount_gradio_app(app, blocks, path="/ui", allowed_paths=[str(ui_dir)], auth=auth,
                            auth_message="Password: the server's API key." if api_key else None)
    return app


class Api:
    """The route handlers, sharing one engine, job store and output folder."""

    def __init__(self, generator, engine: Engine, store: JobStore, output_dir: Path, model_id: str, max_upload: float):
        self.generator, self.engine, self.store = generator, engine, store
        self.output_dir, self.model_id, self.max_upload = output_dir, model_id, max_upload
        self.video_jobs: dict[str, Job] = {}  # video id -> its engine job, while queued or running
        self.created = int(time.time())

    def router(self, api_key: str | None) -> APIRouter:
        r = APIRouter()
        r.get("/health")(self.health)
        r.get("/ready")(self.ready)
        r.get("/metrics")(self.metrics)
        r.get("/outputs/{name}")(self.output)
        v1 = APIRouter(prefix="/v1", dependencies=[Depends(_key_checker(api_key))] if api_key else [])
        v1.get("/models")(self.models)
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
        if not self.engine.ready:
            reason = "shutting down" if not self.engine.accepting else "not ready (a rank or the worker has stopped)"
            raise ApiError(503, f"the server is {reason}", code="not_ready", type="server_error")
        return {"status": "ready", "model": self.model_id, "queue_depth": self.engine.queue_depth}

    async def metrics(self, request: Request):
        return Response(request.app.state.metrics.render(), media_type=CONTENT_TYPE)

    async def models(self):
        return {"object": "list", "data": [{"id": self.model_id, "object": "model", "created": self.created,
                                            "owned_by": "gen", "family": self.generator.family,
                                            "modality": self.generator.modality}]}

    # --- images

    async def images_generations(self, request: Request):
        body = ImageBody.parse(await _json_object(request))
        return await self._images(request, body, body.to_request())

    async def images_edits(self, request: Request):
        fields, files = await self._form(request)
        uploads = files.pop("image", []) + files.pop("image[]", [])
        masks = files.pop("mask", [])
        if files:
            raise ApiError(400, f"unknown file field {next(iter(files))!r}", next(iter(files)), "unknown_parameter")
        body = ImageBody.parse(fields)
        if not uploads:
            raise ApiError(400, "missing required parameter 'image'", "image", "missing_required_parameter")
        images = tuple([await asyncio.to_thread(decode_image, data, "image") for data in uploads])
        if masks:
            raise ApiError(400, f"model {self.model_id!r} does not support masks; send the image alone", "mask",
                           "unsupported_parameter")
        return await self._images(request, body, body.to_request(images))

    async def _images(self, request: Request, body: ImageBody, req: GenerationRequest):
        self._check(body.model, req, "image")
        job = await self._run(request, req)
        if job is None:  # the client went away; nobody reads this
            return Response(status_code=499)
        result = job.result
        revised = result.revised_prompt or req.prompt
        data = []
        for image in result.images:
            encoded = await asyncio.to_thread(encode_image, image, body.output_format, body.output_compression)
            if body.response_format == "b64_json":
                data.append({"b64_json": base64.b64encode(encoded).decode(), "revised_prompt": revised})
            else:
                name = f"{uuid.uuid4().hex}.{body.output_format}"
                await asyncio.to_thread(_write_atomic, self.output_dir / "images" / name, encoded)
                data.append({"url": str(request.url_for("output", name=name)), "revised_prompt": revised})
        return {"created": int(time.time()), "data": data, "output_format": body.output_format,
                "size": f"{result.images[0].width}x{result.images[0].height}"}

    async def output(self, name: str):
        """A generated image, by the opaque name returned in its `url` (never a path from the request)."""
        if not _OUTPUT_NAME.fullmatch(name) or not (self.output_dir / "images" / name).is_file():
            raise ApiError(404, f"no output named {name!r}", "name", "not_found")
        return FileResponse(self.output_dir / "images" / name, media_type=_MEDIA[name.rsplit(".", 1)[1]])

    # --- videos

    async def create_video(self, request: Request):
        if request.headers.get("content-type", "").startswith("multipart/form-data"):
            fields, files = await self._form(request)
            refs = files.pop("input_reference", [])
            if files:
                raise ApiError(400, f"unknown file field {next(iter(files))!r}", next(iter(files)), "unknown_parameter")
            images = tuple([await asyncio.to_thread(decode_image, data, "input_reference") for data in refs])
        else:
            fields, images = await _json_object(request), ()
        body = VideoBody.parse(fields)
        req = body.to_request(self.generator.defaults.fps or 16, images)
        full = self._check(body.model, req, "video")
        size = f"{full.width}x{full.height}"
        seconds = _fmt_seconds(body.seconds if body.seconds is not None else full.num_frames / full.fps)
        video = self.store.create(self.model_id, req.prompt, size, seconds)
        vid, store = video["id"], self.store

        def on_progress(job: Job) -> None:  # 100 only once the MP4 is written
            store.update(vid, status="in_progress", progress=min(job.progress, 99))

        def on_done(job: Job) -> None:  # in the worker: write the MP4 atomically, then mark the job completed
            self.video_jobs.pop(vid, None)
            if job.result is not None and store.get(vid) is not None:
                job.result.save(store.video_path(vid))
                store.update(vid, status="completed", progress=100)
            else:
                store.update(vid, status="failed", error=_job_error(job).body()["error"])

        try:
            self.video_jobs[vid] = self.engine.submit(req, on_progress=on_progress, on_done=on_done)
        except (QueueFull, EngineClosed) as e:
            store.delete(vid)
            raise _engine_error(e) from None
        return JSONResponse(video, headers={"openai-poll-after-ms": "250"})

    async def list_videos(self, limit: int = 20, after: str | None = None, order: str = "desc"):
        if not 1 <= limit <= 100:
            raise ApiError(400, f"limit must be between 1 and 100, got {limit}", "limit", "invalid_value")
        if order not in ("asc", "desc"):
            raise ApiError(400, f"order must be 'asc' or 'desc', got {order!r}", "order", "invalid_value")
        data, has_more = self.store.list(limit, after, order)
        return {"object": "list", "data": data, "has_more": has_more,
                "first_id": data[0]["id"] if data else None, "last_id": data[-1]["id"] if data else None}

    async def get_video(self, video_id: str):
        return JSONResponse(self._video(video_id), headers={"openai-poll-after-ms": "250"})

    async def video_content(self, video_id: str, variant: str = "video"):
        video = self._video(video_id)
        if variant != "video":
            raise ApiError(400, f"variant {variant!r} is not available; only 'video'", "variant", "invalid_value")
        if video["status"] != "completed":
            raise ApiError(409, f"video {video_id!r} is {video['status']}, not completed", "video_id",
                           "video_not_ready")
        return FileResponse(self.store.video_path(video_id), media_type="video/mp4", filename=f"{video_id}.mp4")

    async def delete_video(self, video_id: str):
        self._video(video_id)
        job = self.video_jobs.pop(video_id, None)
        if job is not None:
            job.cancel("deleted")
        self.store.delete(video_id)
        return {"id": video_id, "object": "video.deleted", "deleted": True}

    def _video(self, video_id: str) -> dict:
        video = self.store.get(video_id)
        if video is None:
            raise ApiError(404, f"no video with id {video_id!r}", "video_id", "not_found")
        return video

    # --- shared

    def _check(self, model: str | None, req: GenerationRequest, modality: str) -> GenerationRequest:
        """Reject before queueing: another model's name, the wrong endpoint, bad fields. Returns `req` filled in."""
        if model is not None and model != self.model_id:
            raise ApiError(400, f"model {model!r} is not served here; this server serves {self.model_id!r}",
                           "model", "model_not_found")
        if self.generator.modality != modality:
            raise ApiError(400, f"model {self.model_id!r} makes {self.generator.modality}s, not {modality}s; "
                                f"use the {self.generator.modality} endpoints", "model", "wrong_modality")
        try:
            full = self.generator.validate(req)
        except GenError as e:
            param = e.param
            if param in ("height", "width") and req.height is not None:
                param = "size"  # the client sent `size`, not height / width
            if param == "image" and modality == "video":
                param = "input_reference"
            raise ApiError(400, str(e), param, "invalid_value") from None
        return full

    async def _run(self, request: Request, req: GenerationRequest) -> Job | None:
        """Queue `req`, wait for it, and cancel it if the client disconnects. None: the client is gone."""
        try:
            job = self.engine.submit(req)
        except (QueueFull, EngineClosed) as e:
            raise _engine_error(e) from None
        while not job.done.is_set():
            if await request.is_disconnected():
                job.cancel("client disconnected")
                return None
            await asyncio.sleep(0.02)
        if job.error is not None:
            raise _job_error(job)
        return job

    async def _form(self, request: Request) -> tuple[dict[str, str], dict[str, list[bytes]]]:
        """Multipart form -> (text fields, file fields -> contents), uploads limited in size (413)."""
        if not request.headers.get("content-type", "").startswith("multipart/form-data"):
            raise ApiError(400, "expected a multipart/form-data body", None, "invalid_content_type")
        if int(request.headers.get("content-length") or 0) > self.max_upload * 1.01 + 65536:
            raise ApiError(413, f"the upload is larger than {self.max_upload / 2**20:g} MiB", None, "too_large")
        form = await request.form(max_files=16, max_fields=64)
        fields: dict[str, str] = {}
        files: dict[str, list[bytes]] = {}
        for key, value in form.multi_items():
            if isinstance(value, UploadFile):
                if value.size is not None and value.size > self.max_upload:
                    raise ApiError(413, f"{key} is larger than {self.max_upload / 2**20:g} MiB", key, "too_large")
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


async def _json_object(request: Request) -> dict:
    try:
        data = json.loads(await request.body())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise ApiError(400, "the body is not valid JSON", None, "invalid_json") from None
    if not isinstance(data, dict):
        raise ApiError(400, "the body must be a JSON object", None, "invalid_json")
    return data


def _engine_error(e: Exception) -> ApiError:
    if isinstance(e, QueueFull):
        return ApiError(429, str(e), None, "queue_full", "rate_limit_error", {"Retry-After": str(e.retry_after)})
    return ApiError(503, str(e), None, "shutting_down", "server_error")


def _job_error(job: Job) -> ApiError:
    """Why a job has no result, as the ApiError its request answers with."""
    e = job.error
    if isinstance(e, GenError):
        return ApiError(400, str(e), e.param, "invalid_value")
    if isinstance(e, Cancelled) or job.cancel_reason:
        if job.cancel_reason == "timeout":
            return ApiError(504, "the generation took longer than the server's request timeout", None, "timeout",
                            "server_error")
        if job.cancel_reason == "the server is shutting down":
            return ApiError(503, job.cancel_reason, None, "shutting_down", "server_error")
        return ApiError(499, f"cancelled: {job.cancel_reason}", None, "cancelled", "server_error")
    return ApiError(500, f"the generation failed ({type(e).__name__}); see the server log", None, "generation_failed",
                    "server_error")


def _fmt_seconds(seconds: float) -> str:
    return f"{seconds:g}" if seconds == int(seconds) else f"{seconds:.2f}".rstrip("0")


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{threading.get_ident()}.tmp")
    tmp.write_bytes(data)
    tmp.replace(path)


def _add_error_handlers(app: FastAPI) -> None:
    """Every error answers {"error": {message, type, param, code}}; FastAPI's 422 body never leaves the server."""

    def answer(e: ApiError) -> JSONResponse:
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

    @app.exception_handler(ApiError)
    async def api_error(request, e: ApiError):
        return answer(e)

    @app.exception_handler(GenError)
    async def gen_error(request, e: GenError):
        return answer(ApiError(400, str(e), e.param, "invalid_value"))

    @app.exception_handler(RequestValidationError)
    async def request_validation(request, e: RequestValidationError):
        return answer(validation_error(e.errors()))

    @app.exception_handler(HTTPException)
    async def http_error(request, e: HTTPException):
        kind = "invalid_request_error" if e.status_code < 500 else "server_error"
        code = {404: "not_found", 405: "method_not_allowed"}.get(e.status_code)
        return answer(ApiError(e.status_code, str(e.detail), None, code, kind))

    @app.exception_handler(Exception)
    async def internal(request, e: Exception):
        log.exception("unhandled error on %s", request.url.path)
        return answer(ApiError(500, f"internal server error ({type(e).__name__})", None, "internal_error",
                               "server_error"))


@contextlib.contextmanager
def serve_in_thread(app: FastAPI, host: str = "127.0.0.1", port: int = 0):
    """Run `app` with uvicorn in a background thread (tests, notebooks); yields the base URL. Port 0: a free one."""
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, name="uvicorn", daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the server did not start")
        time.sleep(0.02)
    bound = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://{host}:{bound}"
    finally:
        server.should_exit = True
        thread.join(60)
