"""Several models in one server (issue 17): requests pick one by `model`, the queue is shared and bounded, models
whose text encoders are the same (same files, or copies of them) share one LLM runtime instance, and the prompts of
concurrent requests to those models are encoded in one batched prefill. An image model and a video model together:
each endpoint defaults to a model of its modality."""
from __future__ import annotations

import base64
import concurrent.futures
import io
import shutil
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from helpers import psnr

openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")

from gen.generator import Generator  # noqa: E402
from gen.llm import registry  # noqa: E402
from gen.server.app import create_app, serve_in_thread  # noqa: E402
from gen.server.cli import model_paths, shared_encoders  # noqa: E402
from gen.types import GenError  # noqa: E402

ASSETS = Path(__file__).resolve().parents[1] / "assets"
SMALL = {"size": "32x32", "num_inference_steps": 2}


@pytest.fixture(scope="module")
def zimages(tmp_path_factory):
    """Z-Image loaded three times: twice from the same folder, once from a copy of it (as two downloads would be)."""
    copy = tmp_path_factory.mktemp("copy") / "z-image-copy"
    shutil.copytree(ASSETS / "z-image-tiny", copy)
    registry.clear()  # count only the instances these models load
    paths = {"z-image": ASSETS / "z-image-tiny", "z-image-again": ASSETS / "z-image-tiny", "z-image-copy": copy}
    return {name: Generator.from_pretrained(path, device="cpu", max_batch=2) for name, path in paths.items()}


@pytest.fixture(scope="module")
def server(zimages, tmp_path_factory):
    app = create_app(zimages, output_dir=tmp_path_factory.mktemp("out"), max_queue=6, ui=False)
    with serve_in_thread(app) as url:
        yield url, app


def test_models_share_one_encoder_instance(zimages):
    encoders = [g.pipeline.encoder for g in zimages.values()]
    assert encoders[0] is encoders[1] is encoders[2]
    assert registry.instances() == [encoders[0]]  # one LLM loaded for the three models
    [shared] = shared_encoders(zimages)
    size = sum(p.numel() * p.element_size() for p in encoders[0].model.parameters())
    assert shared["models"] == list(zimages) and shared["parameter_bytes"] == size
    assert shared["saved_bytes"] == 2 * size  # two copies not loaded
    print(f"shared encoder: {size} parameter bytes, {shared['saved_bytes']} saved")


def test_each_model_answers_and_unknown_models_are_refused(server):
    url, _ = server
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120)
    assert [m.id for m in client.models.list().data] == ["z-image", "z-image-again", "z-image-copy"]
    images = {}
    for name in ("z-image", "z-image-copy", None):
        kw = {"model": name} if name else {}
        res = client.images.generate(prompt="a red circle", **kw, extra_body={**SMALL, "seed": 5})
        images[name] = res.data[0].b64_json
    assert images["z-image"] == images["z-image-copy"] == images[None]  # same weights, same seed
    with pytest.raises(openai.BadRequestError) as e:
        client.images.generate(prompt="x", model="flux-dev", extra_body=SMALL)
    assert e.value.body["param"] == "model" and e.value.body["code"] == "model_not_found"
    assert "'z-image-copy'" in e.value.body["message"]
    assert httpx.get(f"{url}/ready").json()["models"] == ["z-image", "z-image-again", "z-image-copy"]


def test_concurrent_prompts_of_the_models_are_encoded_in_one_batch(server, zimages, monkeypatch):
    url, app = server
    llm = zimages["z-image"].pipeline.encoder
    engine_call = llm.engine.hidden_states
    first = threading.Event()

    def slow(*args, **kwargs):  # the first prompt holds the encoder until the other two wait for it
        if not first.is_set():
            first.set()
            deadline = time.monotonic() + 30
            while len(llm._encodes.queue) < 2 and time.monotonic() < deadline:
                time.sleep(0.01)
        return engine_call(*args, **kwargs)

    monkeypatch.setattr(llm.engine, "hidden_states", slow)
    before = dict(llm.stats)
    bodies = [{"prompt": p, "model": m, "seed": i, **SMALL} for i, (p, m) in enumerate(
        [("a red circle", "z-image"), ("a small blue square on a yellow background", "z-image-again"),
         ("a green star", "z-image-copy")])]
    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        futures = [pool.submit(httpx.post, f"{url}/v1/images/generations", json=b, timeout=120) for b in bodies]
        answers = [f.result() for f in futures]
    assert [a.status_code for a in answers] == [200, 200, 200], [a.text for a in answers]
    calls = llm.stats["encode_calls"] - before["encode_calls"]
    batches = llm.stats["encode_batches"] - before["encode_batches"]
    assert calls == 3 and batches == 2, llm.stats  # the two that waited for the first ran as one prefill
    # each answer is what its model gives alone (batched encoding changes nothing)
    for body, answer in zip(bodies, answers):
        alone = zimages[body["model"]].generate(body["prompt"], seed=body["seed"], height=32, width=32,
                                                num_inference_steps=2)
        got = base64.b64decode(answer.json()["data"][0]["b64_json"])
        assert psnr(np.asarray(Image.open(io.BytesIO(got)).convert("RGB")), np.asarray(alone.images[0])) >= 40


def test_image_and_video_models_together(tmp_path):
    flux = Generator.from_pretrained(ASSETS / "flux-tiny", device="cpu")
    wan = Generator.from_pretrained(ASSETS / "wan-t2v-tiny", device="cpu")
    app = create_app({"flux": flux, "wan": wan}, output_dir=tmp_path, ui=False)
    with serve_in_thread(app) as url, httpx.Client(base_url=url, timeout=120) as http:
        r = http.post("/v1/images/generations", json={"prompt": "a fox", **SMALL})  # defaults to the image model
        assert r.status_code == 200 and r.json()["size"] == "32x32"
        video = http.post("/v1/videos", json={"prompt": "waves", "num_frames": 5, **SMALL}).json()
        assert video["model"] == "wan"
        deadline = time.monotonic() + 60
        while (got := http.get(f"/v1/videos/{video['id']}").json())["status"] not in ("completed", "failed"):
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert got["status"] == "completed", got
        for path, body in (("/v1/videos", {"prompt": "x", "model": "flux"}),
                           ("/v1/images/generations", {"prompt": "x", "model": "wan"})):
            r = http.post(path, json=body)
            assert r.status_code == 400 and r.json()["error"]["code"] == "wrong_modality", r.text
        models = http.get("/v1/models").json()["data"]
        assert [(m["id"], m["modality"]) for m in models] == [("flux", "image"), ("wan", "video")]


def test_model_path_names(tmp_path):
    folder = tmp_path / "my-model"
    folder.mkdir()
    assert model_paths([]) == {"gen-shapes": None}
    assert model_paths([str(folder)]) == {"my-model": str(folder)}
    assert model_paths([f"fast={folder}", f"slow={folder}"]) == {"fast": str(folder), "slow": str(folder)}
    with pytest.raises(GenError, match="two models named 'my-model'"):
        model_paths([str(folder), str(folder)])
    odd = tmp_path / "a=b"  # a path that exists is taken whole; its folder name is no model name
    odd.mkdir()
    with pytest.raises(GenError, match="model name 'a=b' must be"):
        model_paths([str(odd)])
    assert model_paths([f"odd={odd}"]) == {"odd": str(odd)}
