"""Webhooks of video jobs against a local receiver (a real HTTP server in a thread): signed as OpenAI signs them
(verified with the official client's `webhooks.unwrap`), retried with backoff after a failure without holding up the
queue, sent for failed jobs too, and refused for hosts the operator did not allow."""
from __future__ import annotations

import http.server
import json
import threading
import time
from pathlib import Path

import httpx
import pytest

openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")

import gen.server.videos as videos_module  # noqa: E402
from gen.generator import Generator  # noqa: E402
from gen.server.app import create_app, serve_in_thread  # noqa: E402
from gen.server.webhooks import sign  # noqa: E402

ASSETS = Path(__file__).resolve().parents[1] / "assets"
SECRET = "whsec_" + "c2VjcmV0LWtleS1mb3ItdGVzdHM="  # base64 of "secret-key-for-tests"
pytestmark = pytest.mark.filterwarnings("ignore:The Sora API:DeprecationWarning")  # the SDK's notice on videos.*
V = {"prompt": "waves", "size": "32x32", "num_frames": 5, "num_inference_steps": 2, "seed": 1}


class Receiver:
    """Records every POST; answers the first `fail_first` with 500."""

    def __init__(self, fail_first: int = 0):
        self.calls: list[tuple[float, dict, bytes]] = []
        self.fail_first = fail_first
        receiver = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers["content-length"]))
                receiver.calls.append((time.monotonic(), dict(self.headers), body))
                self.send_response(500 if len(receiver.calls) <= receiver.fail_first else 204)
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def wait(self, n: int, timeout: float = 30.0):
        deadline = time.monotonic() + timeout
        while len(self.calls) < n:
            assert time.monotonic() < deadline, f"{len(self.calls)} webhook calls, expected {n}"
            time.sleep(0.05)
        return self.calls

    def close(self):
        self.server.shutdown()


@pytest.fixture(scope="module")
def wan():
    return Generator.from_pretrained(ASSETS / "wan-t2v-tiny")


@pytest.fixture
def receiver():
    r = Receiver(fail_first=2)
    yield r
    r.close()


def test_signature_matches_standard_webhooks():
    # the example of the Standard Webhooks specification
    assert sign("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw", "msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265330,
                '{"test": 2432232314}') == "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="


def test_webhook_signed_retried_and_verified(wan, tmp_path, receiver):
    hook = f"http://127.0.0.1:{receiver.port}/hooks/gen"
    app = create_app(wan, output_dir=tmp_path, ui=False, webhook_hosts=[f"127.0.0.1:{receiver.port}"],
                     webhook_secret=SECRET, webhook_backoff=0.2)
    with serve_in_thread(app) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        job = client.videos.create(prompt="waves", size="32x32", extra_body={**V, "webhook_url": hook})
        second = httpx.post(f"{url}/v1/videos", json={**V, "seed": 2}).json()["id"]  # no webhook
        calls = receiver.wait(3)  # two failures, then delivered
        assert client.videos.poll(second, poll_interval_ms=50).status == "completed"
        times = [t for t, _, _ in calls]
        assert times[1] - times[0] >= 0.15 and times[2] - times[1] >= 0.35  # backoff 0.2 s, then 0.4 s
        _, headers, body = calls[2]
        event = client.webhooks.unwrap(body, headers, secret=SECRET)
        assert event.type == "video.completed" and event.data.id == job.id
        assert len({h["webhook-id"] for _, h, _ in calls}) == 1  # the same event each time
        with pytest.raises(openai.InvalidWebhookSignatureError):
            client.webhooks.unwrap(body, headers, secret="whsec_" + "d3Jvbmcta2V5")
        tampered = body.replace(job.id.encode(), b"video_" + b"0" * 32)
        with pytest.raises(openai.InvalidWebhookSignatureError):
            client.webhooks.unwrap(tampered, headers, secret=SECRET)
        time.sleep(0.5)
        assert len(receiver.calls) == 3  # delivered once, not again
        assert 'gen_webhook_deliveries_total{outcome="retried"} 2.0' in httpx.get(f"{url}/metrics").text


def test_webhook_for_a_failed_job(wan, tmp_path, monkeypatch):
    receiver = Receiver()

    def broken(path, frames, fps, check):
        raise OSError("disk gone")

    monkeypatch.setattr(videos_module, "write_mp4", broken)
    app = create_app(wan, output_dir=tmp_path, ui=False, webhook_hosts=["127.0.0.1"], webhook_secret="plain secret")
    try:
        with serve_in_thread(app) as url:
            vid = httpx.post(f"{url}/v1/videos", json={**V, "webhook_url": f"http://127.0.0.1:{receiver.port}/h"}
                             ).json()["id"]
            _, headers, body = receiver.wait(1)[0]
            client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused")
            event = client.webhooks.unwrap(body, headers, secret="plain secret")
            assert event.type == "video.failed" and event.data.id == vid
            assert json.loads(body)["object"] == "event"
    finally:
        receiver.close()


def test_disallowed_hosts_and_disabled_webhooks(wan, tmp_path):
    with serve_in_thread(create_app(wan, output_dir=tmp_path, ui=False)) as url:  # no allowed host: off
        r = httpx.post(f"{url}/v1/videos", json={**V, "webhook_url": "http://127.0.0.1:9/h"})
        assert r.status_code == 400 and r.json()["error"]["code"] == "webhooks_disabled"
    app = create_app(wan, output_dir=tmp_path / "b", ui=False, webhook_hosts=["hooks.example"], webhook_secret="k")
    with serve_in_thread(app) as url:
        for target in ("http://169.254.169.254/latest/meta-data", "http://localhost:30000/v1/videos",
                       "http://hooks.example.evil.com/", "http://hooks.example@evil.com/"):
            r = httpx.post(f"{url}/v1/videos", json={**V, "webhook_url": target})
            assert r.status_code == 400 and r.json()["error"]["param"] == "webhook_url", (target, r.text)
        assert httpx.get(f"{url}/v1/videos").json()["data"] == []  # nothing was queued


def test_allow_host_needs_a_secret(wan, tmp_path):
    from gen.types import GenError

    with pytest.raises(GenError, match="webhook-secret"):
        create_app(wan, output_dir=tmp_path, ui=False, webhook_hosts=["hooks.example"])
