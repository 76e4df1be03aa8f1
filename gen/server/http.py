"""The HTTP edge: body size and read-time limits (ASGI middleware), OpenAI-shaped errors for what the mounted web UI
answers itself, a uvicorn protocol that closes connections whose request headers do not arrive in time, and the
uvicorn server both `gen serve` and the tests run.

Not the routes (app.py).
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import threading
import time

from uvicorn.protocols.http.h11_impl import H11Protocol

from gen.server.schemas import ApiError

DRAIN_CAP = 16 * 2**20  # an over-large body is read (and dropped) up to this much so the client sees the 413


def error_response(e: ApiError) -> tuple[dict, bytes]:
    body = json.dumps(e.body()).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    headers += [(k.lower().encode(), v.encode()) for k, v in (e.headers or {}).items()]
    return {"type": "http.response.start", "status": e.status, "headers": headers}, body


async def send_error(send, e: ApiError, close: bool = False) -> None:
    start, body = error_response(e)
    if close:
        start["headers"].append((b"connection", b"close"))
    await send(start)
    await send({"type": "http.response.body", "body": body})


class _BodyError(Exception):
    def __init__(self, error: ApiError):
        self.error = error


class BodyLimits:
    """A request body may hold at most `max_upload` bytes when it is multipart (or under /ui, the web UI's uploads),
    else `max_json`; it must arrive whole within `read_timeout` seconds. Over the size: 413 (without reading more
    than DRAIN_CAP); too slow: 408, connection closed."""

    def __init__(self, app, *, max_json: int, max_upload: int, read_timeout: float):
        self.app, self.max_json, self.max_upload, self.read_timeout = app, max_json, max_upload, read_timeout

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        multipart = headers.get(b"content-type", b"").startswith(b"multipart/") or scope["path"].startswith("/ui")
        limit = self.max_upload + 65536 if multipart else self.max_json
        too_large = ApiError(413, f"the request body is larger than {limit} bytes", None, "too_large")
        length = headers.get(b"content-length")
        if length is not None:
            try:
                declared = int(length)
            except ValueError:
                return await send_error(send, ApiError(400, "bad content-length header", None, "invalid_request"),
                                        close=True)
            if declared > limit:
                await self._drain(receive, declared)
                return await send_error(send, too_large, close=True)
        deadline = time.monotonic() + self.read_timeout
        state = {"read": 0, "more": True, "started": False}

        async def limited_receive():
            if not state["more"]:
                return await receive()  # the body is in: later receives wait for a disconnect, without a limit
            try:
                message = await asyncio.wait_for(receive(), max(0.0, deadline - time.monotonic()))
            except asyncio.TimeoutError:
                raise _BodyError(ApiError(408, f"the request body did not arrive within {self.read_timeout:g} s",
                                          None, "request_timeout")) from None
            if message["type"] == "http.request":
                state["read"] += len(message.get("body", b""))
                state["more"] = message.get("more_body", False)
                if state["read"] > limit:
                    raise _BodyError(too_large)
            return message

        async def tracking_send(message):
            if message["type"] == "http.response.start":
                state["started"] = True
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except _BodyError as e:
            if not state["started"]:
                await send_error(send, e.error, close=True)

    async def _drain(self, receive, declared: int) -> None:
        """Read and drop up to DRAIN_CAP bytes (a client still sending would otherwise not read our answer)."""
        if declared > DRAIN_CAP:
            return
        read, more = 0, True
        while more and read <= DRAIN_CAP:
            try:
                message = await asyncio.wait_for(receive(), 5)
            except asyncio.TimeoutError:
                return
            if message["type"] != "http.request":
                return
            read += len(message.get("body", b""))
            more = message.get("more_body", False)


class ShapeUiErrors:
    """Answers the mounted web UI gives itself for refused files, unknown paths, methods and over-large uploads
    (403, 404, 405, 413)
    become OpenAI-shaped JSON errors, like every other answer of the server."""

    CODES = {403: "forbidden", 404: "not_found", 405: "method_not_allowed", 413: "too_large"}

    def __init__(self, app, prefix: str = "/ui"):
        self.app, self.prefix = app, prefix

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or not scope["path"].startswith(self.prefix):
            return await self.app(scope, receive, send)
        state = {"replace": None}

        async def shaping_send(message):
            if message["type"] == "http.response.start" and message["status"] in self.CODES:
                status = message["status"]
                state["replace"] = ApiError(status, f"{scope['method']} {scope['path']}: "
                                                    f"{'not found' if status == 404 else 'refused'} ({status})", None,
                                            self.CODES[status])
                return
            if state["replace"] is not None:
                if message["type"] == "http.response.body" and not message.get("more_body", False):
                    start, body = error_response(state["replace"])
                    await send(start)
                    await send({"type": "http.response.body", "body": body})
                return
            await send(message)

        await self.app(scope, receive, shaping_send)


class TimedH11Protocol(H11Protocol):
    """uvicorn's HTTP/1.1 protocol, plus: a connection whose request headers have not all arrived `header_timeout`
    seconds after it opened (or after its previous response) is closed. uvicorn itself only times out idle
    keep-alive connections."""

    header_timeout = 30.0

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self._requests_seen = 0
        self._header_timer = None
        self._arm_header_timer()

    def _arm_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
        seen = self._requests_seen
        self._header_timer = self.loop.call_later(self.header_timeout, self._header_timeout, seen)

    def _header_timeout(self, seen: int) -> None:
        in_flight = self.cycle is not None and not self.cycle.response_complete
        if self._requests_seen == seen and not in_flight and not self.transport.is_closing():
            self.transport.close()

    def handle_events(self) -> None:
        before = self.cycle
        super().handle_events()
        if self.cycle is not before:
            self._requests_seen += 1

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing():
            self._arm_header_timer()

    def connection_lost(self, exc) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
        super().connection_lost(exc)


def make_server(app, host: str = "127.0.0.1", port: int = 0, *, keep_alive: int = 5, log_level: str = "warning"):
    """A uvicorn Server for `app` whose connections time out: request headers within the app's read timeout
    (`app.state.read_timeout`, --read-timeout), idle keep-alive connections after `keep_alive` seconds."""
    import uvicorn

    read_timeout = app.state.read_timeout
    protocol = type("Protocol", (TimedH11Protocol,), {"header_timeout": read_timeout})
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, http=protocol,
                            timeout_keep_alive=keep_alive, timeout_graceful_shutdown=5, lifespan="on")
    return uvicorn.Server(config)


@contextlib.contextmanager
def serve_in_thread(app, host: str = "127.0.0.1", port: int = 0):
    """Run `app` with uvicorn in a background thread (tests, notebooks); yields the base URL. Port 0: a free one."""
    server = make_server(app, host, port)
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
