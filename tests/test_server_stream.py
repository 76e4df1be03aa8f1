"""`stream: true` on /v1/images/generations and /v1/images/edits: OpenAI's image streaming events, read by the
official client and parsed by hand from the raw server-sent events; partial images are latent previews at the
output size; errors after the stream started are `error` events; a client that leaves cancels the generation."""
from __future__ import annotations

import base64
import io
import json
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")

from gen.generator import Generator  # noqa: E402
from gen.server.app import create_app, serve_in_thread  # noqa: E402
from gen.server.stream import partial_steps  # noqa: E402
from helpers import slow_steps  # noqa: E402

ASSETS = Path(__file__).resolve().parents[1] / "assets"
STAR = "a large yellow star in the center on a purple background"


@pytest.fixture(scope="module")
def shapes():
    return Generator.from_pretrained(ASSETS / "gen-shapes", device="cpu")


@pytest.fixture(scope="module")
def server(shapes, tmp_path_factory):
    app = create_app(shapes, output_dir=tmp_path_factory.mktemp("out"), ui=False)
    with serve_in_thread(app) as url:
        yield url, app


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server[0]}/v1", api_key="unused", max_retries=0, timeout=120)


def decode(b64: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(b64)))


def sse_events(response: httpx.Response) -> list[tuple[str | None, str]]:
    """(event, data) of each event, and (None, comment) of each comment line, in order."""
    out, event, data = [], None, []
    for line in response.iter_lines():
        if line.startswith(":"):
            out.append((None, line[1:].strip()))
        elif line.startswith("event:"):
            event = line[6:].strip()
        elif line.startswith("data:"):
            data.append(line[5:].strip())
        elif line == "" and data:
            out.append((event, "\n".join(data)))
            event, data = None, []
    return out


def test_partial_steps_are_evenly_spaced():
    assert partial_steps(20, 0) == set()
    assert partial_steps(20, 1) == {10}
    assert partial_steps(20, 3) == {5, 10, 15}
    assert partial_steps(2, 3) == {1, 2}  # fewer steps than partial images: fewer partials


def test_openai_client_streams_partials_then_the_final_image(client):
    kw = dict(prompt=STAR, size="128x128", extra_body={"seed": 3, "num_inference_steps": 12})
    events = list(client.images.generate(stream=True, partial_images=3, **kw))
    assert [e.type for e in events] == ["image_generation.partial_image"] * 3 + ["image_generation.completed"]
    assert [e.partial_image_index for e in events[:3]] == [0, 1, 2]
    final = events[-1]
    plain = client.images.generate(**kw)  # the same request, not streamed
    assert final.b64_json == plain.data[0].b64_json and final.size == "128x128" and final.output_format == "png"
    assert final.usage.input_tokens > 0
    image = np.asarray(decode(final.b64_json).convert("RGB")).astype(float)
    for e in events[:3]:
        partial = decode(e.b64_json)
        assert partial.format == "PNG" and partial.size == (128, 128)  # a preview, scaled to the output size
    last = np.asarray(decode(events[2].b64_json).convert("RGB")).astype(float)
    assert np.abs(last.mean((0, 1)) - image.mean((0, 1))).max() < 40  # roughly the final image's colours


def test_no_partial_images_by_default(client):
    events = list(client.images.generate(prompt=STAR, size="64x64", stream=True,
                                         extra_body={"num_inference_steps": 3}))
    assert [e.type for e in events] == ["image_generation.completed"]
    assert decode(events[0].b64_json).size == (64, 64)


def test_raw_events_carry_progress_and_jpeg_partials(server):
    url, _ = server
    body = {"prompt": STAR, "size": "64x64", "num_inference_steps": 4, "stream": True, "partial_images": 1,
            "output_format": "jpeg", "n": 2, "seed": 1}
    with httpx.stream("POST", f"{url}/v1/images/generations", json=body, timeout=60) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = sse_events(r)
    comments = [data for event, data in events if event is None]
    assert [c for c in comments if c.startswith("progress")] == [f"progress {i}/4" for i in range(1, 5)]
    named = [(event, json.loads(data)) for event, data in events if event is not None]
    assert [e for e, _ in named] == ["image_generation.partial_image"] + ["image_generation.completed"] * 2
    for event, data in named:
        assert data["type"] == event and data["output_format"] == "jpeg" and data["size"] == "64x64"
        assert decode(data["b64_json"]).format == "JPEG"
    assert named[0][1]["partial_image_index"] == 0
    assert named[1][1]["b64_json"] != named[2][1]["b64_json"]  # n = 2: two different images


def test_bad_stream_requests_are_plain_400s(server):
    url, _ = server
    for body, param in (({"partial_images": 4}, "partial_images"), ({"partial_images": -1}, "partial_images"),
                        ({"response_format": "url"}, "response_format"), ({"size": "100x100"}, "size")):
        r = httpx.post(f"{url}/v1/images/generations", json={"prompt": STAR, "stream": True, **body}, timeout=30)
        assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text


def test_edit_streams_image_edit_events(tmp_path):
    kontext = Generator.from_pretrained(ASSETS / "flux-kontext-tiny", device="cpu")
    buf = io.BytesIO()
    Image.new("RGB", (48, 48), (200, 30, 30)).save(buf, format="PNG")
    with serve_in_thread(create_app(kontext, output_dir=tmp_path, ui=False)) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120)
        events = list(client.images.edit(image=("in.png", buf.getvalue(), "image/png"), prompt="make it blue",
                                          stream=True, partial_images=2, size="32x32",
                                          extra_body={"num_inference_steps": 4}))
    assert [e.type for e in events] == ["image_edit.partial_image"] * 2 + ["image_edit.completed"]
    assert decode(events[-1].b64_json).size == (32, 32)


@pytest.fixture
def slow(shapes, monkeypatch):
    return slow_steps(shapes.pipeline.transformer, monkeypatch)


def test_deadline_mid_stream_is_an_error_event(shapes, tmp_path, slow):
    app = create_app(shapes, output_dir=tmp_path, timeout=1.0, ui=False)
    with serve_in_thread(app) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120)
        stream = client.images.generate(prompt=STAR, stream=True, partial_images=1,
                                        extra_body={"num_inference_steps": 40})
        with pytest.raises(openai.APIError) as e:
            list(stream)
        assert e.value.body["code"] == "timeout"
        deadline = time.monotonic() + 5
        while app.state.queue.running:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        assert len(slow) < 40


def test_leaving_the_stream_cancels_the_generation(shapes, tmp_path, slow):
    app = create_app(shapes, output_dir=tmp_path, ui=False)
    with serve_in_thread(app) as url:
        with httpx.stream("POST", f"{url}/v1/images/generations", timeout=60,
                          json={"prompt": STAR, "stream": True, "num_inference_steps": 40}) as r:
            for line in r.iter_lines():
                if line.startswith(": progress 2/"):
                    break  # the client reads two steps' progress, then closes the connection
        deadline = time.monotonic() + 5
        while app.state.queue.running:
            assert time.monotonic() < deadline, "the generation went on without its client"
            time.sleep(0.02)
        assert len(slow) < 40
        text = httpx.get(f"{url}/metrics").text
        assert 'gen_generations_total{outcome="cancelled"} 1.0' in text
