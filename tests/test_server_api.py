"""The REST API against real servers (uvicorn in a thread) on the tiny assets, with the official `openai` client.
Malformed requests: tests/test_server_malformed.py; limits: tests/test_server_limits.py; video job faults:
tests/test_server_jobs.py."""
from __future__ import annotations

import base64
import io
import sqlite3
import time
from pathlib import Path

import httpx
import pytest
from PIL import Image

openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")

from gen.generator import Generator  # noqa: E402
from gen.server.app import create_app, serve_in_thread  # noqa: E402

ASSETS = Path(__file__).resolve().parents[1] / "assets"
TINY = {"num_inference_steps": 2}  # extension fields, sent through the client's extra_body
pytestmark = pytest.mark.filterwarnings("ignore:The Sora API:DeprecationWarning")  # the SDK's notice on videos.*


def png_bytes(size=(64, 64), color=(200, 30, 30), mode="RGB") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size, color).save(buf, format="PNG")
    return buf.getvalue()



@pytest.fixture(scope="module")
def flux():
    return Generator.from_pretrained(ASSETS / "flux-tiny")


@pytest.fixture(scope="module")
def server(flux, tmp_path_factory):
    app = create_app(flux, output_dir=tmp_path_factory.mktemp("out"), max_queue=4, ui=False)
    with serve_in_thread(app) as url:
        yield url


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server, timeout=120) as c:
        yield c


# --- images


def test_openai_images_generate(client):
    kw = dict(prompt="a red fox", size="64x64", extra_body={**TINY, "seed": 7})
    first = client.images.generate(**kw)
    again = client.images.generate(**kw)
    assert len(first.data) == 1 and first.data[0].revised_prompt == "a red fox"
    image = Image.open(io.BytesIO(base64.b64decode(first.data[0].b64_json)))
    assert image.format == "PNG" and image.size == (64, 64)
    assert first.data[0].b64_json == again.data[0].b64_json  # same seed, same image


def test_images_n_url_and_format(client, http):
    res = client.images.generate(prompt="two cats", size="64x32", n=2, response_format="url", output_format="webp",
                                 extra_body=TINY)
    assert len(res.data) == 2
    for item in res.data:
        got = http.get(item.url)
        assert got.status_code == 200 and got.headers["content-type"] == "image/webp"
        assert Image.open(io.BytesIO(got.content)).size == (64, 32)
    # outputs are served by opaque name only: no other files, no traversal
    for name in ("jobs.sqlite3", "..%2Fjobs.sqlite3", "0" * 32 + ".png", "%2Fetc%2Fpasswd"):
        r = http.get(f"/outputs/{name}")
        assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"


def test_enhance_prompt_returns_revised_prompt(client):
    res = client.images.generate(prompt="a cat", size="32x32", extra_body={**TINY, "enhance_prompt": True})
    assert res.data[0].revised_prompt and res.data[0].revised_prompt != "a cat"


def test_openai_images_edit_rejected_by_text_to_image_model(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.images.edit(image=("in.png", png_bytes(), "image/png"), prompt="make it blue", extra_body=TINY)
    assert e.value.status_code == 400 and e.value.body["param"] == "image"


def test_health_ready_models_metrics(http):
    assert http.get("/health").json() == {"status": "ok"}
    ready = http.get("/ready")
    assert ready.status_code == 200 and ready.json()["model"] == "flux-tiny"
    models = http.get("/v1/models").json()
    assert models["data"][0]["id"] == "flux-tiny" and models["data"][0]["modality"] == "image"
    http.post("/v1/images/generations", json={"prompt": "x", "size": "32x32", **TINY})
    text = http.get("/metrics").text
    assert 'gen_http_requests_total{endpoint="/v1/images/generations",method="POST",status="200"}' in text
    for name in ("gen_http_request_seconds_bucket", "gen_queue_depth", "gen_denoise_step_seconds_count",
                 'gen_stage_seconds_count{stage="denoise"}', 'gen_generations_total{outcome="completed"}'):
        assert name in text, name


# --- auth and upload limits


def test_api_key_and_upload_limit(flux, tmp_path):
    app = create_app(flux, output_dir=tmp_path, api_key="s3cret", max_upload_mb=0.05, ui=False)
    with serve_in_thread(app) as url:
        assert httpx.get(f"{url}/health").status_code == 200  # liveness needs no key
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}):
            r = httpx.get(f"{url}/v1/models", headers=headers)
            assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        good = openai.OpenAI(base_url=f"{url}/v1", api_key="s3cret", max_retries=0)
        assert good.models.list().data[0].id == "flux-tiny"
        assert httpx.get(f"{url}/metrics").status_code == 401  # metrics need the key too
        assert httpx.get(f"{url}/metrics", headers={"Authorization": "Bearer s3cret"}).status_code == 200
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=f"{url}/v1", api_key="nope", max_retries=0).models.list()
        with pytest.raises(openai.APIStatusError) as e:
            good.images.edit(image=("big.png", b"\0" * 60_000, "image/png"), prompt="x")
        assert e.value.status_code == 413


# --- edits (Qwen-Image-Edit)


@pytest.mark.skipif(not (ASSETS / "qwen-image-edit-tiny").is_dir(), reason="assets/qwen-image-edit-tiny not built")
def test_openai_images_edit(tmp_path):
    gen = Generator.from_pretrained(ASSETS / "qwen-image-edit-tiny")
    app = create_app(gen, output_dir=tmp_path, ui=False)
    with serve_in_thread(app) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120)
        res = client.images.edit(image=("in.png", png_bytes((64, 48)), "image/png"), prompt="make it blue",
                                 size="64x48", extra_body={**TINY, "seed": 3})
        assert Image.open(io.BytesIO(base64.b64decode(res.data[0].b64_json))).size == (64, 48)
        with pytest.raises(openai.BadRequestError) as e:  # this model takes one image
            client.images.edit(image=[("a.png", png_bytes(), "image/png"), ("b.png", png_bytes(), "image/png")],
                               prompt="x", size="64x64", extra_body=TINY)
        assert e.value.body["param"] == "image"
        with pytest.raises(openai.BadRequestError) as e:
            client.images.generate(prompt="x", size="64x64", extra_body=TINY)  # needs an image
        assert e.value.body["param"] == "image"


# --- videos (Wan): create / retrieve / download, list, delete, and a restart keeps completed jobs

VIDEO = {"num_frames": 5, "num_inference_steps": 2, "seed": 1}


@pytest.fixture(scope="module")
def wan():
    if not (ASSETS / "wan-t2v-tiny").is_dir():
        pytest.skip("assets/wan-t2v-tiny not built")
    return Generator.from_pretrained(ASSETS / "wan-t2v-tiny")


def wait_done(client, video_id: str, timeout: float = 120):
    deadline = time.monotonic() + timeout
    while True:
        video = client.videos.retrieve(video_id)
        if video.status in ("completed", "failed") or time.monotonic() > deadline:
            return video
        time.sleep(0.1)


def test_openai_videos_and_restart(wan, tmp_path):
    app = create_app(wan, output_dir=tmp_path, ui=False)
    with serve_in_thread(app) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120)
        job = client.videos.create(prompt="a wave", size="64x64", extra_body=VIDEO)
        assert job.status in ("queued", "in_progress") and job.id.startswith("video_") and job.size == "64x64"
        seen = [job.progress]
        while (video := client.videos.retrieve(job.id)).status not in ("completed", "failed"):
            seen.append(video.progress)
            time.sleep(0.05)
        assert seen == sorted(seen) and set(seen) <= {0, 50, 99}  # 2 steps; 100 once the file is written
        assert video.status == "completed", video.error
        assert video.progress == 100 and video.completed_at >= video.created_at
        content = client.videos.download_content(job.id).content
        assert content[4:8] == b"ftyp"
        assert client.videos.retrieve(job.id).seconds == "0.31"  # 5 frames at 16 fps

        second = wait_done(client, client.videos.create(prompt="rain", size="64x64", seconds="1",  # 4 fps: 5 frames
                                                        extra_body={"fps": 4, "num_inference_steps": 2}).id)
        assert second.status == "completed" and second.seconds == "1"
        page = client.videos.list(limit=1)
        assert [v.id for v in page.data] == [second.id] and page.has_more
        assert [v.id for v in client.videos.list(order="asc")] == [job.id, second.id]
        assert client.videos.delete(second.id).deleted
        with pytest.raises(openai.NotFoundError):
            client.videos.retrieve(second.id)
        with pytest.raises(openai.BadRequestError) as e:
            client.videos.create(prompt="x", size="64x64", extra_body={**VIDEO, "num_frames": 6})
        assert e.value.body["param"] == "num_frames"
        with pytest.raises(openai.BadRequestError) as e:  # text-to-video takes no image
            client.videos.create(prompt="x", input_reference=("r.png", png_bytes(), "image/png"), size="64x64",
                                 extra_body=VIDEO)
        assert e.value.body["param"] == "input_reference"

    # a job an older version of the server left unfinished (no stored request to re-run), then a restart
    with sqlite3.connect(tmp_path / "jobs.sqlite3") as db:
        db.execute("INSERT INTO videos (id, model, prompt, status, created_at, size, seconds) "
                   "VALUES ('video_" + "a" * 32 + "', 'wan-t2v-tiny', 'lost', 'in_progress', 0, '64x64', '1')")
    with serve_in_thread(create_app(wan, output_dir=tmp_path, ui=False)) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        assert client.videos.retrieve(job.id).status == "completed"
        assert client.videos.download_content(job.id).content == content
        lost = client.videos.retrieve("video_" + "a" * 32)
        assert lost.status == "failed" and lost.error.code == "server_restarted"


@pytest.mark.skipif(not (ASSETS / "wan-i2v-tiny").is_dir(), reason="assets/wan-i2v-tiny not built")
def test_openai_image_to_video(tmp_path):
    gen = Generator.from_pretrained(ASSETS / "wan-i2v-tiny")
    with serve_in_thread(create_app(gen, output_dir=tmp_path, ui=False)) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120)
        job = client.videos.create(prompt="it moves", input_reference=("r.png", png_bytes(), "image/png"),
                                   size="64x64", extra_body=VIDEO)
        video = wait_done(client, job.id)
        assert video.status == "completed", video.error
        assert client.videos.download_content(job.id).content[4:8] == b"ftyp"
        with pytest.raises(openai.BadRequestError) as e:  # image-to-video needs the image
            client.videos.create(prompt="x", size="64x64", extra_body=VIDEO)
        assert e.value.body["param"] == "input_reference"
