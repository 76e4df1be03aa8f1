"""Admission limits on real servers (uvicorn in a thread, tiny FLUX and Wan; gen-shapes for an LLM encoder): the
defaults follow the loaded model, each limit refuses with 400 naming the field and the limit, prompts are counted in
the model's tokens, a video whose decode would not fit in memory is refused, and the deadline reaches into the
server's own output encoding."""
from __future__ import annotations

import time
from pathlib import Path

import httpx
import pytest

pytest.importorskip("fastapi")

import gen.server.app as app_module  # noqa: E402
from gen.generator import Generator  # noqa: E402
from gen.server.app import create_app, serve_in_thread  # noqa: E402
from gen.server.limits import Budget, Limits, decode_bytes  # noqa: E402
from gen.types import GenerationRequest  # noqa: E402

ASSETS = Path(__file__).resolve().parents[1] / "assets"
IMG = "/v1/images/generations"


@pytest.fixture(scope="module")
def flux():
    return Generator.from_pretrained(ASSETS / "flux-tiny")


@pytest.fixture(scope="module")
def wan():
    return Generator.from_pretrained(ASSETS / "wan-t2v-tiny")


def refused(r: httpx.Response, param: str, code: str = "limit_exceeded") -> str:
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == param and error["code"] == code, error
    return error["message"]


def test_defaults_follow_the_model(flux, wan):
    f = Limits.for_model(flux)  # flux-tiny: 128 x 128, 28 steps, T5 (512 tokens) and CLIP (77)
    assert (f.max_pixels, f.max_steps, f.max_n, f.max_prompt_tokens, f.max_frames) == (256 * 256, 56, 10, 512, None)
    w = Limits.for_model(wan)  # Wan's defaults (the tiny folder may declare smaller ones), UMT5 (512)
    d = wan.defaults
    assert (w.max_pixels, w.max_steps, w.max_frames, w.max_prompt_tokens) == (
        max(4 * d.width * d.height, 256 * 256), max(2 * d.num_inference_steps, 50), 2 * (d.num_frames - 1) + 1, 512)
    assert w.max_decode_bytes > 0
    over = Limits.for_model(wan, max_pixels=100, max_frames=9, max_decode_gb=1.5)
    assert (over.max_pixels, over.max_frames, over.max_decode_bytes) == (100, 9, int(1.5 * 2**30))


def test_llm_encoder_prompts_are_counted_in_bytes():
    shapes = Generator.from_pretrained()  # gen-shapes: an LLM encoder, no tokenizer component
    budget = Budget(shapes, Limits.for_model(shapes))
    assert budget.limits.max_prompt_tokens == 1024 and budget.counter.count("été") == 5
    budget.check_prompt("a red circle " * 78, "prompt")  # 1014 bytes
    with pytest.raises(Exception, match="1027 tokens"):
        budget.check_prompt("a red circle " * 79, "prompt")  # under the LLM's context, but over the limit


def test_each_limit_names_its_field(flux, tmp_path):
    limits = Limits.for_model(flux, max_pixels=64 * 64, max_steps=8, max_n=3, max_prompt_tokens=20, max_work=0.2)
    app = create_app(flux, output_dir=tmp_path, limits=limits, ui=False)
    counter = app.state.service.default.budget.counter
    words = "fox " * 5
    assert counter.count(words) == 20 and counter.count(words + "fox") > 20
    base = {"prompt": "a fox", "size": "64x64", "num_inference_steps": 2}
    with serve_in_thread(app) as url, httpx.Client(base_url=url, timeout=60) as http:
        assert "--max-pixels" in refused(http.post(IMG, json={**base, "size": "80x64"}), "size")
        assert "8" in refused(http.post(IMG, json={**base, "num_inference_steps": 9}), "num_inference_steps")
        assert "--max-n" in refused(http.post(IMG, json={**base, "n": 4}), "n")
        assert "--max-prompt-tokens" in refused(http.post(IMG, json={**base, "prompt": words + "fox"}), "prompt",
                                                "prompt_too_long")
        # 3 x 64 x 64 x 8 steps over 128 x 128 x 28 = 0.21 default generations > 0.2
        message = refused(http.post(IMG, json={**base, "n": 3, "num_inference_steps": 8}), "n")
        assert "--max-work" in message and "0.2" in message
        assert http.post(IMG, json={**base, "prompt": words}).status_code == 200  # exactly at the limits
        assert http.post(IMG, json={**base, "n": 3, "num_inference_steps": 7}).status_code == 200
        assert http.get("/v1/models").json()["data"][0]["limits"]["max_work"] == 0.2


def test_video_decode_memory_admission(wan, tmp_path):
    small = GenerationRequest(prompt="x", height=32, width=32, num_frames=5)
    large = small.replace(height=64, width=64)
    budget = (decode_bytes(wan, small) + decode_bytes(wan, large)) / 2 / 2**30
    limits = Limits.for_model(wan, max_decode_gb=budget)
    app = create_app(wan, output_dir=tmp_path, limits=limits, ui=False)
    with serve_in_thread(app) as url, httpx.Client(base_url=url, timeout=60) as http:
        body = {"prompt": "waves", "num_frames": 5, "num_inference_steps": 2}
        message = refused(http.post("/v1/videos", json={**body, "size": "64x64"}), "size", "too_large_to_decode")
        assert "--vae-tiling" in message and "GiB" in message
        vid = http.post("/v1/videos", json={**body, "size": "32x32"}).json()["id"]
        deadline = time.monotonic() + 60
        while (status := http.get(f"/v1/videos/{vid}").json()["status"]) not in ("completed", "failed"):
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert status == "completed"


def test_deadline_reaches_into_image_encoding(flux, tmp_path, monkeypatch):
    encoded = []
    real = app_module.encode_image

    def slow_encode(*args):
        encoded.append(time.monotonic())
        time.sleep(1.0)  # 6 images: 6 s uncut
        return real(*args)

    monkeypatch.setattr(app_module, "encode_image", slow_encode)
    app = create_app(flux, output_dir=tmp_path, timeout=1.0, ui=False)
    with serve_in_thread(app) as url:
        start = time.monotonic()
        r = httpx.post(f"{url}{IMG}", json={"prompt": "x", "size": "32x32", "n": 6, "num_inference_steps": 1},
                       timeout=30)
        assert r.status_code == 504 and r.json()["error"]["code"] == "timeout"
        assert time.monotonic() - start < 1.0 + 1.5  # at the deadline (slack for a busy machine), not after 6 s
        deadline = time.monotonic() + 5
        while app.state.queue.running:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        assert len(encoded) < 6  # the worker stopped between images
