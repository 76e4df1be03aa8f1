"""LoRAs through the server (issue 15): `gen serve --lora-dir DIR` offers DIR's files by name (`GET /v1/loras`), a
request's `loras: [{"name", "scale"}]` on /v1/images/generations (JSON, the official client's extra_body),
/v1/images/edits (a form field) and /v1/videos (stored by name, resolved by the worker); concurrent requests with
different LoRAs each get what Generator.generate gives with that set and seed; bad sets are 400s naming
`loras[i].name` / `loras[i].scale`; a request never reaches a filesystem path."""
from __future__ import annotations

import base64
import concurrent.futures
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
from gen.types import write_mp4  # noqa: E402
from helpers import psnr  # noqa: E402

ASSETS = Path(__file__).resolve().parents[1] / "assets"
FLUX_LORAS = ASSETS / "loras" / "flux-tiny"
KW = dict(height=32, width=32, num_inference_steps=3)
BODY = {"size": "32x32", "num_inference_steps": 3}


@pytest.fixture(scope="module")
def reference():
    return Generator.from_pretrained(ASSETS / "flux-tiny", device="cpu")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    flux = Generator.from_pretrained(ASSETS / "flux-tiny", device="cpu", lora_dir=FLUX_LORAS, max_batch=2)
    app = create_app(flux, output_dir=tmp_path_factory.mktemp("out"), ui=False)
    with serve_in_thread(app) as url:
        yield url


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0, timeout=120)


def image_of(b64: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))).convert("RGB"))


def test_loras_are_listed_by_name(server):
    listed = httpx.get(f"{server}/v1/loras").json()
    names = [e["id"] for e in listed["data"]]
    assert names == ["bfl", "comfyui", "diffusers", "diffusers_patterns", "kohya", "peft_folder", "xlabs"]
    assert all(e["object"] == "lora" and e["models"] == ["flux-tiny"] and e["size_mb"] > 0 for e in listed["data"])
    assert str(FLUX_LORAS) not in json.dumps(listed)  # names only, never where they are
    assert httpx.get(f"{server}/v1/models").json()["data"][0]["loras"] is True


def test_openai_client_request_with_a_lora_equals_generate(client, reference):
    res = client.images.generate(prompt="a red fox", size="32x32",
                                 extra_body={"num_inference_steps": 3, "seed": 4,
                                             "loras": [{"name": "kohya", "scale": 0.8}]})
    want = reference.generate("a red fox", seed=4, **KW, loras=[(str(FLUX_LORAS / "kohya.safetensors"), 0.8)])
    assert psnr(image_of(res.data[0].b64_json), want.images[0]) >= 50
    plain = client.images.generate(prompt="a red fox", size="32x32", extra_body={"num_inference_steps": 3, "seed": 4})
    assert psnr(image_of(plain.data[0].b64_json), want.images[0]) < 40  # the LoRA changed the picture


def test_concurrent_requests_with_different_loras_get_their_own(server, reference):
    sets = [[{"name": "kohya", "scale": 1.2}], [{"name": "diffusers", "scale": -0.5}, {"name": "xlabs"}], []]
    bodies = [{"prompt": "a lighthouse", "seed": 9, "loras": s, **BODY} for s in sets]
    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        answers = list(pool.map(lambda b: httpx.post(f"{server}/v1/images/generations", json=b, timeout=120), bodies))
    for s, answer in zip(sets, answers):
        assert answer.status_code == 200, answer.text
        loras = [(str(FLUX_LORAS / f"{item['name']}.safetensors"), item.get("scale", 1.0)) for item in s]
        want = reference.generate("a lighthouse", seed=9, **KW, loras=loras)
        assert psnr(image_of(answer.json()["data"][0]["b64_json"]), want.images[0]) >= 50, s


@pytest.mark.parametrize("loras, param, code", [
    ([{"name": "nope"}], "loras[0].name", "lora_not_found"),
    ([{"name": "kohya"}, {"name": "../kohya"}], "loras[1].name", "lora_not_found"),
    ([{"name": str(FLUX_LORAS / "kohya.safetensors")}], "loras[0].name", "lora_not_found"),  # a path is no name
    ([{"name": "kohya", "scale": 11}], "loras[0].scale", "invalid_value"),
    ([{"name": "kohya", "scale": "inf"}], "loras[0].scale", "invalid_value"),
    ([{"name": "kohya", "scale": True}], "loras[0].scale", "invalid_value"),
    ([{"name": "kohya", "weight": 1}], "loras[0].weight", "invalid_value"),
    ([{"name": "kohya"}] * 5, "loras", "invalid_value"),
    ({"name": "kohya"}, "loras", "invalid_value"),
    (["kohya"], "loras[0]", "invalid_value"),
])
def test_bad_lora_sets_are_400s_naming_the_field(client, loras, param, code):
    with pytest.raises(openai.BadRequestError) as e:
        client.images.generate(prompt="x", size="32x32", extra_body={"num_inference_steps": 1, "loras": loras})
    assert e.value.body["param"] == param and e.value.body["code"] == code, e.value.body


def test_non_finite_scale_is_refused_before_parsing(server):
    body = b'{"prompt": "x", "loras": [{"name": "kohya", "scale": NaN}]}'  # NaN is not JSON
    r = httpx.post(f"{server}/v1/images/generations", content=body, headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json"


def test_a_server_without_lora_dir_refuses_loras(reference, tmp_path):
    with serve_in_thread(create_app(reference, output_dir=tmp_path, ui=False)) as url:
        r = httpx.post(f"{url}/v1/images/generations", json={"prompt": "x", "loras": [{"name": "kohya"}], **BODY},
                       timeout=60)
        assert r.status_code == 400 and r.json()["error"]["code"] == "loras_not_available", r.text
        assert r.json()["error"]["param"] == "loras"
        r = httpx.post(f"{url}/v1/images/generations", json={"prompt": "x", "loras": [], **BODY}, timeout=60)
        assert r.status_code == 200  # none is always possible
        assert httpx.get(f"{url}/v1/loras").json() == {"object": "list", "data": []}


def test_edit_takes_loras_as_a_form_field(tmp_path):
    kontext = Generator.from_pretrained(ASSETS / "flux-kontext-tiny", device="cpu", lora_dir=FLUX_LORAS)
    source = Image.new("RGB", (48, 48), (200, 30, 30))
    buf = io.BytesIO()
    source.save(buf, format="PNG")
    with serve_in_thread(create_app(kontext, output_dir=tmp_path, ui=False)) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120)
        res = client.images.edit(image=("in.png", buf.getvalue(), "image/png"), prompt="make it blue", size="32x32",
                                 extra_body={"num_inference_steps": 3, "seed": 2,
                                             "loras": json.dumps([{"name": "kohya", "scale": 0.7}])})
        bad = httpx.post(f"{url}/v1/images/edits", files={"image": ("in.png", buf.getvalue(), "image/png")},
                         data={"prompt": "x", "loras": "[{name: kohya}]"}, timeout=60)
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "loras"
    want = Generator.from_pretrained(ASSETS / "flux-kontext-tiny", device="cpu").generate(
        "make it blue", images=[source], seed=2, **KW, loras=[(str(FLUX_LORAS / "kohya.safetensors"), 0.7)])
    assert psnr(image_of(res.data[0].b64_json), want.images[0]) >= 50


def test_video_job_keeps_its_loras_by_name(tmp_path):
    folder = ASSETS / "loras" / "wan-t2v-tiny"
    wan = Generator.from_pretrained(ASSETS / "wan-t2v-tiny", device="cpu", lora_dir=folder)
    body = {"prompt": "waves", "seed": 3, "size": "32x32", "num_frames": 5, "num_inference_steps": 2,
            "loras": [{"name": "diffusers", "scale": 0.9}]}
    app = create_app(wan, output_dir=tmp_path, ui=False)
    with serve_in_thread(app) as url, httpx.Client(base_url=url, timeout=60) as http:
        vid = http.post("/v1/videos", json=body).json()["id"]
        deadline = time.monotonic() + 60
        while (video := http.get(f"/v1/videos/{vid}").json())["status"] not in ("completed", "failed"):
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert video["status"] == "completed", video
        content = http.get(f"/v1/videos/{vid}/content").content
        params = json.loads(app.state.store.row(vid)["params"])
        assert params["loras"] == [{"name": "diffusers", "scale": 0.9, "target": None}]  # a name, not a path
        r = http.post("/v1/videos", json={**body, "loras": [{"name": "diffusers", "target": "transformer_9"}]})
        assert r.status_code == 400 and r.json()["error"]["param"] == "loras[0].target"
    import imageio.v2 as imageio

    ref = Generator.from_pretrained(ASSETS / "wan-t2v-tiny", device="cpu").generate(
        "waves", seed=3, height=32, width=32, num_frames=5, num_inference_steps=2,
        loras=[(str(folder / "diffusers.safetensors"), 0.9)])
    write_mp4(str(tmp_path / "ref.mp4"), ref.frames, ref.fps)
    (tmp_path / "served.mp4").write_bytes(content)
    got, want = (np.stack(imageio.mimread(str(tmp_path / n), format="FFMPEG")) for n in ("served.mp4", "ref.mp4"))
    assert psnr(got, want) >= 40
