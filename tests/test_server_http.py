"""The HTTP edge of a real server (uvicorn in a thread, tiny FLUX): connections that send nothing or send slowly are
closed, slow bodies get a JSON 408, chunked bodies are held to the size limit, returned URLs never come from the
client's Host header."""
from __future__ import annotations

import socket
import time
from pathlib import Path

import httpx
import pytest

pytest.importorskip("fastapi")

from gen.generator import Generator  # noqa: E402
from gen.server.app import create_app, serve_in_thread  # noqa: E402

ASSETS = Path(__file__).resolve().parents[1] / "assets"
SMALL = {"prompt": "a lighthouse", "size": "32x32", "num_inference_steps": 1}


@pytest.fixture(scope="module")
def flux():
    return Generator.from_pretrained(ASSETS / "flux-tiny")


@pytest.fixture(scope="module")
def server(flux, tmp_path_factory):
    app = create_app(flux, output_dir=tmp_path_factory.mktemp("out"), read_timeout=1.0, ui=False)
    with serve_in_thread(app) as url:
        yield url


def connect(url: str) -> socket.socket:
    host, port = url.removeprefix("http://").split(":")
    s = socket.create_connection((host, int(port)), timeout=10)
    return s


def read_all(s: socket.socket) -> bytes:
    """Everything the server sends until it closes the connection."""
    out = b""
    while chunk := s.recv(65536):
        out += chunk
    return out


def test_silent_connection_is_closed(server):
    s = connect(server)
    start = time.monotonic()
    assert read_all(s) == b""  # closed without an answer
    assert 0.8 < time.monotonic() - start < 5


def test_headers_trickling_in_are_cut_off(server):
    s = connect(server)
    start = time.monotonic()
    closed = False
    for part in (b"POST /v1/images/", b"generations HTTP/1.1\r\n", b"Host: x\r\n", b"X-Slow: 1\r\n", b"X-Slow: 2\r\n"):
        try:
            s.sendall(part)
        except OSError:
            closed = True
            break
        time.sleep(0.4)  # each part well within the read timeout, the whole far past it
    if not closed:
        assert read_all(s) == b""
    assert time.monotonic() - start < 5


def test_slow_body_gets_json_408(server):
    s = connect(server)
    s.sendall(b"POST /v1/images/generations HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
              b"Content-Length: 100\r\n\r\n{\"prompt\":")
    answer = read_all(s).decode()
    assert answer.startswith("HTTP/1.1 408"), answer
    assert '"code": "request_timeout"' in answer or '"code":"request_timeout"' in answer
    assert httpx.get(f"{server}/ready").status_code == 200


def test_chunked_body_over_the_limit_is_413(server):
    def chunks():
        for _ in range(40):
            yield b" " * 65536  # 2.5 MiB of JSON whitespace, no content-length

    r = httpx.post(f"{server}/v1/images/generations", content=chunks(), headers={"content-type": "application/json"},
                   timeout=30)
    assert r.status_code == 413 and r.json()["error"]["code"] == "too_large"


def test_keep_alive_connection_serves_several_requests(server):
    with httpx.Client(base_url=server, timeout=30) as c:
        for _ in range(3):
            assert c.get("/health").status_code == 200
            time.sleep(0.3)


def test_urls_ignore_the_host_header(server):
    r = httpx.post(f"{server}/v1/images/generations", json={**SMALL, "response_format": "url"},
                   headers={"Host": "evil.example"}, timeout=60)
    assert r.status_code == 200
    url = r.json()["data"][0]["url"]
    assert url.startswith(server + "/outputs/") and "evil" not in url
    assert httpx.get(url).status_code == 200


def test_public_url_decides_the_urls(flux, tmp_path):
    app = create_app(flux, output_dir=tmp_path, public_url="https://gen.example.com/api/", ui=False)
    with serve_in_thread(app) as url:
        r = httpx.post(f"{url}/v1/images/generations", json={**SMALL, "response_format": "url"}, timeout=60)
        got = r.json()["data"][0]["url"]
        assert got.startswith("https://gen.example.com/api/outputs/") and got.endswith(".png")
        assert httpx.get(f"{url}/outputs/{got.rsplit('/', 1)[1]}").status_code == 200
