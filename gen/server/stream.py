"""`stream: true` on the image endpoints: server-sent events in OpenAI's image streaming shape.

`partial_images` (0-3, default 0) previews of the first image while it is denoised, as
`image_generation.partial_image` events (`image_edit.partial_image` for edits) with `b64_json` and
`partial_image_index`, then one `image_generation.completed` (`image_edit.completed`) event per image. A preview is
the cheap linear latent -> RGB map of the model's family (stages/preview.py), scaled up to the output size; it is
taken at evenly spaced steps. SSE comment lines (`: progress STEP/TOTAL`, `: keep-alive`) carry progress and keep
idle proxies from closing the connection; clients ignore them. A failure after the stream started is an `error`
event `{"type": "error", "error": {message, type, param, code}}` (the official client raises it as an APIError).
Admission errors (400, 429, 503) come before the stream, as plain JSON responses.

Not the routes (app.py) and not the queue.
"""
from __future__ import annotations

import asyncio
import base64
import json
import logging
import time

from fastapi import Request
from fastapi.responses import StreamingResponse
from PIL import Image

from gen.server.queue import Job
from gen.server.schemas import ApiError, encode_image
from gen.server.service import Served, Service, job_api_error
from gen.types import GenerationRequest

log = logging.getLogger(__name__)
KEEPALIVE_SECONDS = 5.0
CLIENT_GONE = "client disconnected"


def partial_steps(total: int, partials: int) -> set[int]:
    """The steps (1-based) whose previews are sent: `partials` evenly spaced over `total` steps (fewer when there are
    fewer steps, as OpenAI may send fewer than asked)."""
    return {max(1, min(total, round(total * (i + 1) / (partials + 1)))) for i in range(partials)}


def sse(event: str, data: dict) -> str:
    return f"event: {event}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n"


class ImageStream:
    """One streamed image request: `event` is the events' prefix ("image_generation" or "image_edit")."""

    def __init__(self, service: Service, served: Served, req: GenerationRequest, body, event: str):
        self.s, self.served, self.req, self.body, self.event = service, served, req, body, event
        self.wanted = partial_steps(req.num_inference_steps, body.partial_images or 0)

    def response(self, request: Request, finish) -> StreamingResponse:
        """Queue the generation now (a full queue is a plain 429) and stream its events."""
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()

        def put(*item) -> None:  # from the worker thread
            try:
                loop.call_soon_threadsafe(events.put_nowait, item)
            except RuntimeError:  # the event loop is gone (server stopped): nobody listens
                pass

        def on_preview(job: Job, step: int, total: int, image: Image.Image) -> None:
            if step in self.wanted:
                put("partial", image)

        job = self.s.submit(self.served, self.req, finish, on_progress=lambda j: put("progress", j.step, j.total),
                            on_done=lambda j: put("done"), on_preview=on_preview if self.wanted else None)
        return StreamingResponse(self._events(job, events), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"})

    async def _events(self, job: Job, events: asyncio.Queue):
        index = 0
        try:
            while True:
                left = job.deadline - time.monotonic()
                if left <= 0:  # answered at the deadline; the worker stops the job at its next check
                    self.s.queue.cancel(job, "timeout")
                    yield self._error(job_api_error(job))
                    return
                try:
                    item = await asyncio.wait_for(events.get(), min(left, KEEPALIVE_SECONDS))
                except asyncio.TimeoutError:
                    yield ": keep-alive\n\n"
                    continue
                kind = item[0]
                if kind == "progress":
                    yield f": progress {item[1]}/{item[2]}\n\n" if item[2] else ": started\n\n"
                elif kind == "partial":
                    data = await asyncio.to_thread(self._encode, item[1])
                    yield sse(f"{self.event}.partial_image", {**self._common("partial_image"), "b64_json": data,
                                                                "partial_image_index": index})
                    index += 1
                else:  # done
                    break
            if job.error is not None:
                yield self._error(job_api_error(job))
                return
            usage = self._usage()
            for _, b64 in job.output:
                yield sse(f"{self.event}.completed", {**self._common("completed"), "b64_json": b64, "usage": usage,
                                                      "revised_prompt": job.result.revised_prompt or self.req.prompt})
        finally:
            if not job.done.is_set():
                self.s.queue.cancel(job, CLIENT_GONE)

    def _common(self, kind: str) -> dict:
        return {"type": f"{self.event}.{kind}", "created_at": int(time.time()),
                "size": f"{self.req.width}x{self.req.height}", "quality": "auto", "background": "opaque",
                "output_format": self.body.output_format}

    def _encode(self, preview: Image.Image) -> str:
        """A preview (latent resolution) scaled to the output size, in the request's format."""
        image = preview.resize((self.req.width, self.req.height), Image.BILINEAR)
        return base64.b64encode(encode_image(image, self.body.output_format, self.body.output_compression)).decode()

    def _usage(self) -> dict:
        """OpenAI's usage object: the prompt's tokens as the server's limits count them; no image tokens."""
        text = self.served.budget.counter.count(self.req.prompt)
        return {"input_tokens": text, "input_tokens_details": {"image_tokens": 0, "text_tokens": text},
                "output_tokens": 0, "total_tokens": text}

    def _error(self, e: ApiError) -> str:
        return sse("error", {"type": "error", **e.body()})
