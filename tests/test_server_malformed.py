"""Malformed requests against real servers (uvicorn in a thread; the tiny FLUX with the web UI, the tiny Wan): every
answer is a 4xx with the OpenAI error shape and a non-null `code` (and the bad field in `param` where there is one),
never a 5xx, and the server stays healthy after each."""
from __future__ import annotations

import io
import json

import httpx
import pytest
from PIL import Image

pytest.importorskip("fastapi")

from gen.generator import Generator  # noqa: E402
from gen.server.app import create_app, serve_in_thread  # noqa: E402
from pathlib import Path  # noqa: E402

ASSETS = Path(__file__).resolve().parents[1] / "assets"

pytestmark = [pytest.mark.filterwarnings("ignore:.*no_silent_downcasting"),
              pytest.mark.filterwarnings("ignore:The copy keyword")]


def png_bytes(size=(64, 64), mode="RGB", color=(200, 30, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size, color).save(buf, format="PNG")
    return buf.getvalue()


PNG = png_bytes()
BOMB = png_bytes((5000, 4000), mode="1", color=0)  # a few kB that would decode to 20 M pixels
NOISE = bytes(range(256)) * 5000  # 1.28 MB: over the servers' 1 MiB upload limit


def raw(text: str | bytes) -> dict:
    return {"content": text.encode() if isinstance(text, str) else text,
            "headers": {"content-type": "application/json"}}


def nested(depth: int) -> str:
    return '{"prompt": ' + "[" * depth + '"x"' + "]" * depth + "}"


IMG = "/v1/images/generations"
EDIT = "/v1/images/edits"
P = {"prompt": "a fox", "size": "64x64", "num_inference_steps": 2}

# (method, path, request kwargs, status, code, param); ... : not checked
IMAGE_CASES = [
    # JSON bodies: fields
    ("post", IMG, {"json": {}}, 400, "missing_required_parameter", "prompt"),
    ("post", IMG, {"json": {"prompt": ""}}, 400, "invalid_value", "prompt"),
    ("post", IMG, {"json": {"prompt": "   "}}, 400, "invalid_value", "prompt"),
    ("post", IMG, {"json": {"prompt": 3}}, 400, "invalid_value", "prompt"),
    ("post", IMG, {"json": {"prompt": None}}, 400, "invalid_value", "prompt"),
    ("post", IMG, {"json": {"prompt": ["a"]}}, 400, "invalid_value", "prompt"),
    ("post", IMG, {"json": {"prompt": {"a": 1}}}, 400, "invalid_value", "prompt"),
    ("post", IMG, {"json": {**P, "n": 0}}, 400, "invalid_value", "n"),
    ("post", IMG, {"json": {**P, "n": 11}}, 400, "invalid_value", "n"),
    ("post", IMG, {"json": {**P, "n": "many"}}, 400, "invalid_value", "n"),
    ("post", IMG, {"json": {**P, "n": 1.5}}, 400, "invalid_value", "n"),
    ("post", IMG, {"json": {**P, "n": 10**30}}, 400, "invalid_value", "n"),
    ("post", IMG, raw('{"prompt": "x", "n": ' + "9" * 50 + "}"), 400, "invalid_json", None),
    ("post", IMG, {"json": {**P, "size": "big"}}, 400, "invalid_value", "size"),
    ("post", IMG, {"json": {**P, "size": "65x64"}}, 400, "invalid_value", "size"),
    ("post", IMG, {"json": {**P, "size": "99999x64"}}, 400, "invalid_value", "size"),
    ("post", IMG, {"json": {**P, "size": "64x64x64"}}, 400, "invalid_value", "size"),
    ("post", IMG, {"json": {**P, "size": "-64x64"}}, 400, "invalid_value", "size"),
    ("post", IMG, {"json": {**P, "size": 64}}, 400, "invalid_value", "size"),
    ("post", IMG, {"json": {**P, "size": "1024x1024"}}, 400, "limit_exceeded", "size"),  # over --max-pixels
    ("post", IMG, {"json": {**P, "num_inference_steps": 0}}, 400, "invalid_value", "num_inference_steps"),
    ("post", IMG, {"json": {**P, "num_inference_steps": 5000}}, 400, "invalid_value", "num_inference_steps"),
    ("post", IMG, {"json": {**P, "num_inference_steps": 57}}, 400, "limit_exceeded", "num_inference_steps"),
    ("post", IMG, {"json": {**P, "num_inference_steps": "ten"}}, 400, "invalid_value", "num_inference_steps"),
    ("post", IMG, {"json": {**P, "num_inference_steps": [2]}}, 400, "invalid_value", "num_inference_steps"),
    ("post", IMG, {"json": {**P, "guidance_scale": -1}}, 400, "invalid_value", "guidance_scale"),
    ("post", IMG, {"json": {**P, "guidance_scale": "high"}}, 400, "invalid_value", "guidance_scale"),
    ("post", IMG, raw('{"prompt": "x", "guidance_scale": 1e999}'), 400, "invalid_json", None),
    ("post", IMG, raw('{"prompt": "x", "guidance_scale": NaN}'), 400, "invalid_json", None),
    ("post", IMG, raw('{"prompt": "x", "guidance_scale": -Infinity}'), 400, "invalid_json", None),
    ("post", IMG, {"json": {**P, "true_cfg_scale": 1000}}, 400, "invalid_value", "true_cfg_scale"),
    ("post", IMG, {"json": {**P, "seed": -1}}, 400, "invalid_value", "seed"),
    ("post", IMG, {"json": {**P, "seed": 2**64}}, 400, "invalid_value", "seed"),
    ("post", IMG, {"json": {**P, "seed": 1.5}}, 400, "invalid_value", "seed"),
    ("post", IMG, {"json": {**P, "response_format": "gif"}}, 400, "invalid_value", "response_format"),
    ("post", IMG, {"json": {**P, "output_format": "bmp"}}, 400, "invalid_value", "output_format"),
    ("post", IMG, {"json": {**P, "output_compression": 101}}, 400, "invalid_value", "output_compression"),
    ("post", IMG, {"json": {**P, "output_compression": -1}}, 400, "invalid_value", "output_compression"),
    ("post", IMG, {"json": {**P, "model": "dall-e-3"}}, 400, "model_not_found", "model"),
    ("post", IMG, {"json": {**P, "model_path": "/etc"}}, 400, "unknown_parameter", "model_path"),
    ("post", IMG, {"json": {**P, "foo": 1}}, 400, "unknown_parameter", "foo"),
    ("post", IMG, {"json": {**P, "enhance_prompt": "maybe"}}, 400, "invalid_value", "enhance_prompt"),
    ("post", IMG, {"json": {**P, "negative_prompt": 5}}, 400, "invalid_value", "negative_prompt"),
    ("post", IMG, {"json": {**P, "user": 5}}, 400, "invalid_value", "user"),
    ("post", IMG, {"json": {**P, "stream": "maybe"}}, 400, "invalid_value", "stream"),
    ("post", IMG, {"json": {**P, "stream": True, "partial_images": 4}}, 400, "invalid_value", "partial_images"),
    ("post", IMG, {"json": {**P, "partial_images": 1.5}}, 400, "invalid_value", "partial_images"),
    ("post", IMG, {"json": {**P, "stream": True, "response_format": "url"}}, 400, "invalid_value", "response_format"),
    ("post", IMG, {"json": {**P, "loras": [{"name": "x"}]}}, 400, "loras_not_available", "loras"),  # no --lora-dir
    ("post", IMG, {"json": {**P, "loras": [{"name": "/etc/passwd"}]}}, 400, "loras_not_available", "loras"),
    # prompts the encoders cannot take
    ("post", IMG, {"json": {**P, "prompt": "word " * 600}}, 400, "prompt_too_long", "prompt"),  # > 512 T5 tokens
    ("post", IMG, {"json": {**P, "prompt": "x" * 10000}}, 400, "prompt_too_long", "prompt"),
    ("post", IMG, {"json": {**P, "negative_prompt": "word " * 600}}, 400, "prompt_too_long", "negative_prompt"),
    ("post", IMG, raw('{"prompt": "a \\ud800 fox"}'), 400, "invalid_characters", "prompt"),
    ("post", IMG, raw('{"prompt": "a \\udfff"}'), 400, "invalid_characters", "prompt"),
    ("post", IMG, {"json": {**P, "negative_prompt": "a \x00 fox"}}, 400, "invalid_characters", "negative_prompt"),
    # the work budget: 10 x (256x256 = 4 x the default pixels) x 28 steps = 40 default generations > 8
    ("post", IMG, {"json": {"prompt": "x", "n": 10, "size": "256x256"}}, 400, "limit_exceeded", "n"),
    # JSON bodies: the body itself
    ("post", IMG, raw("{not json"), 400, "invalid_json", None),
    ("post", IMG, raw('["prompt"]'), 400, "invalid_json", None),
    ("post", IMG, raw('"x"'), 400, "invalid_json", None),
    ("post", IMG, raw(""), 400, "invalid_json", None),
    ("post", IMG, raw(b'{"prompt": "\xff\xfe"}'), 400, "invalid_json", None),
    ("post", IMG, raw(nested(20)), 400, "invalid_json", None),
    ("post", IMG, raw(nested(100_000)), 400, "invalid_json", None),
    ("post", IMG, raw('{"prompt": "' + "x" * (2**20 + 10) + '"}'), 413, "too_large", None),
    ("post", IMG, {"data": {"prompt": "x"}, "files": {"f": ("a", b"b")}}, 400, "invalid_json", None),
    # edits (multipart)
    ("post", EDIT, {"json": {"prompt": "x"}}, 400, "invalid_content_type", None),
    ("post", EDIT, {"data": {"prompt": "x"}}, 400, "invalid_content_type", None),  # urlencoded, not multipart
    ("post", EDIT, {"data": {"prompt": "x"}, "files": {"other": ("a.txt", b"hi")}}, 400, "unknown_parameter", "other"),
    ("post", EDIT, {"data": {"prompt": "x"}, "files": {"image": ("a.png", b"not an image")}}, 400, "invalid_image",
     "image"),
    ("post", EDIT, {"data": {"prompt": "x"}, "files": {"image": ("a.png", BOMB)}}, 400, "image_too_large", "image"),
    ("post", EDIT, {"data": {"prompt": "x"}, "files": {"image": ("a.png", PNG), "mask": ("m.png", PNG)}}, 400,
     "unsupported_parameter", "mask"),
    ("post", EDIT, {"data": {"prompt": "x", "n": "x"}, "files": {"image": ("a.png", PNG)}}, 400, "invalid_value", "n"),
    ("post", EDIT, {"data": {"n": "1"}, "files": {"image": ("a.png", PNG)}}, 400, "missing_required_parameter",
     "prompt"),
    ("post", EDIT, {"data": {"prompt": "x"}, "files": {"unused": ("a", b"")}}, 400, "unknown_parameter", "unused"),
    ("post", EDIT, {"data": {"prompt": "x", "loras": "[oops"}, "files": {"image": ("a.png", PNG)}}, 400,
     "invalid_value", "loras"),  # a form's loras is a JSON list
    ("post", EDIT, {"data": {"prompt": "x", "size": "64x64"}, "files": {"image": ("a.png", PNG)}}, 400,
     "invalid_value", "image"),  # a text-to-image model takes no image
    ("post", EDIT, {"data": {"prompt": ["a", "b"]}, "files": {"image": ("a.png", PNG)}}, 400, "invalid_value",
     "prompt"),  # given twice
    ("post", EDIT, {"data": {"prompt": "x"}, "files": [("image", (f"{i}.png", PNG)) for i in range(17)]}, 400,
     "invalid_request", None),  # more files than the form takes
    ("post", EDIT, {"data": {f"f{i}": "x" for i in range(70)}, "files": {"image": ("a.png", PNG)}}, 400,
     "invalid_request", None),  # more fields than the form takes
    ("post", EDIT, {"data": {"prompt": "x"}, "files": {"image": ("a.png", NOISE)}}, 413, "too_large", None),
    ("post", EDIT, {"content": b"--xyz\r\ngarbage", "headers": {"content-type": "multipart/form-data; boundary=xyz"}},
     400, ..., ...),  # parsed as an empty form: the prompt is missing
    ("post", EDIT, {"content": b"abc", "headers": {"content-type": "multipart/form-data"}}, 400, ..., ...),
    # the other modality, routes, ids, query parameters
    ("post", "/v1/videos", {"json": {"prompt": "x"}}, 400, "wrong_modality", "model"),
    ("get", "/v1/videos/video_0123", {}, 404, "not_found", "video_id"),
    ("get", "/v1/videos/../../jobs.sqlite3/content", {}, 404, "not_found", None),
    ("delete", "/v1/videos/nope", {}, 404, "not_found", "video_id"),
    ("get", "/v1/videos", {"params": {"limit": "x"}}, 400, "invalid_value", "limit"),
    ("get", "/v1/videos", {"params": {"limit": 0}}, 400, "invalid_value", "limit"),
    ("get", "/v1/videos", {"params": {"limit": 101}}, 400, "invalid_value", "limit"),
    ("get", "/v1/videos", {"params": {"order": "up"}}, 400, "invalid_value", "order"),
    ("get", "/v1/nothing", {}, 404, "not_found", None),
    ("put", IMG, {}, 405, "method_not_allowed", None),
    ("get", "/outputs/..%2Fjobs.sqlite3", {}, 404, "not_found", ...),
    ("get", "/outputs/" + "0" * 32 + ".png", {}, 404, "not_found", "name"),
    ("get", "/outputs/" + "0" * 32 + ".sqlite3", {}, 404, "not_found", "name"),
    ("get", "/ui/nothing/here", {}, 404, "not_found", None),
    ("post", "/ui/gradio_api/upload", {"files": {"files": ("big.png", NOISE)}}, 413, "too_large", None),
]

VID = "/v1/videos"
V = {"prompt": "waves", "size": "64x64", "num_frames": 5, "num_inference_steps": 2}
VIDEO_CASES = [
    ("post", VID, {"json": {**V, "num_frames": 6}}, 400, "invalid_value", "num_frames"),
    ("post", VID, {"json": {**V, "num_frames": 165}}, 400, "limit_exceeded", "num_frames"),  # over --max-frames
    ("post", VID, {"json": {**V, "num_frames": 0}}, 400, "invalid_value", "num_frames"),
    ("post", VID, {"json": {"prompt": "x", "seconds": 0}}, 400, "invalid_value", "seconds"),
    ("post", VID, {"json": {"prompt": "x", "seconds": 61}}, 400, "invalid_value", "seconds"),
    ("post", VID, {"json": {"prompt": "x", "seconds": "long"}}, 400, "invalid_value", "seconds"),
    ("post", VID, {"json": {"prompt": "x", "size": "64x64", "seconds": 20, "fps": 16}}, 400, "limit_exceeded",
     "seconds"),  # 321 frames
    ("post", VID, {"json": {**V, "fps": 0}}, 400, "invalid_value", "fps"),
    ("post", VID, {"json": {**V, "fps": 500}}, 400, "invalid_value", "fps"),
    ("post", VID, {"json": {**V, "size": "64x65"}}, 400, "invalid_value", "size"),
    ("post", VID, {"json": {**V, "prompt": "word " * 600}}, 400, "prompt_too_long", "prompt"),
    ("post", VID, raw('{"prompt": "\\ud83d"}'), 400, "invalid_characters", "prompt"),
    ("post", VID, {"json": {**V, "size": "1264x1264", "num_inference_steps": 100}}, 400, "limit_exceeded", "size"),
    ("post", VID, {"json": {**V, "webhook_url": "http://evil.example/hook"}}, 400, "webhook_host_not_allowed",
     "webhook_url"),
    ("post", VID, {"json": {**V, "webhook_url": "http://127.0.0.1:9/hook"}}, 400, "webhook_host_not_allowed",
     "webhook_url"),
    ("post", VID, {"json": {**V, "webhook_url": "ftp://hooks.example/x"}}, 400, "invalid_value", "webhook_url"),
    ("post", VID, {"json": {**V, "webhook_url": "http://u:p@hooks.example/x"}}, 400, "invalid_value", "webhook_url"),
    ("post", VID, {"json": {**V, "webhook_url": "http://hooks.example:99999/x"}}, 400, "invalid_value",
     "webhook_url"),
    ("post", VID, {"json": {**V, "webhook_url": 7}}, 400, "invalid_value", "webhook_url"),
    ("post", VID, {"data": {"prompt": "x"}, "files": {"input_reference": ("r.png", PNG)}}, 400, "invalid_value",
     "input_reference"),  # text-to-video takes no image
    ("post", VID, {"data": {"prompt": "x"}, "files": {"input_reference": ("r.png", b"GIF89a...")}}, 400,
     "invalid_image", "input_reference"),
    ("post", VID, {"data": {"prompt": "x"}, "files": {"poster": ("r.png", PNG)}}, 400, "unknown_parameter", "poster"),
    ("post", VID, raw("[]"), 400, "invalid_json", None),
    ("post", IMG, {"json": {"prompt": "x"}}, 400, "wrong_modality", "model"),
    ("get", f"{VID}/video_{'0' * 32}/content", {}, 404, "not_found", "video_id"),
]


@pytest.fixture(scope="module")
def image_server(tmp_path_factory):
    app = create_app(Generator.from_pretrained(ASSETS / "flux-tiny"), output_dir=tmp_path_factory.mktemp("img"),
                     max_upload_mb=1.0)
    with serve_in_thread(app) as url, httpx.Client(base_url=url, timeout=60) as http:
        yield http


@pytest.fixture(scope="module")
def video_server(tmp_path_factory):
    app = create_app(Generator.from_pretrained(ASSETS / "wan-t2v-tiny"), output_dir=tmp_path_factory.mktemp("vid"),
                     ui=False, webhook_hosts=["hooks.example"], webhook_secret="s3cret")
    with serve_in_thread(app) as url, httpx.Client(base_url=url, timeout=60) as http:
        yield http


def check(http, method, path, kwargs, status, code, param):
    r = http.request(method.upper(), path, **kwargs)
    assert r.status_code == status, r.text[:500]
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"], error
    assert error["code"] is not None, error
    if code is not ...:
        assert error["code"] == code, error
    if param is not ...:
        assert error["param"] == param, error
    assert http.get("/health").status_code == 200 and http.get("/ready").status_code == 200


def test_enough_cases():
    assert len(IMAGE_CASES) + len(VIDEO_CASES) >= 100


@pytest.mark.parametrize("method,path,kwargs,status,code,param", IMAGE_CASES,
                         ids=[f"{i}-{m} {p} {s} {c}" for i, (m, p, _, s, c, _) in enumerate(IMAGE_CASES)])
def test_malformed_image_requests(image_server, method, path, kwargs, status, code, param):
    check(image_server, method, path, kwargs, status, code, param)


@pytest.mark.parametrize("method,path,kwargs,status,code,param", VIDEO_CASES,
                         ids=[f"{i}-{m} {p} {s} {c}" for i, (m, p, _, s, c, _) in enumerate(VIDEO_CASES)])
def test_malformed_video_requests(video_server, method, path, kwargs, status, code, param):
    check(video_server, method, path, kwargs, status, code, param)


def test_server_still_generates_after_the_table(image_server, video_server):
    r = image_server.post(IMG, json=P)
    assert r.status_code == 200 and len(r.json()["data"]) == 1
    assert video_server.post(VID, json={**V, "webhook_url": "http://hooks.example/done"}).status_code == 200
    metrics = image_server.get("/metrics").text
    assert 'status="5' not in metrics, [line for line in metrics.splitlines() if 'status="5' in line]
    assert json.loads(image_server.get("/v1/models").text)["data"][0]["limits"]["max_pixels"] == 256 * 256
