"""The web UI at /ui: through gradio_client, and in a real browser (Playwright driving Debian's chromium). It is a
door like REST: the same queue, limits, API key and cancellation; outputs by opaque URL, no server paths."""
from __future__ import annotations

import base64
import io
import os
import re
from pathlib import Path
from urllib.parse import urljoin

import httpx
import pytest
from PIL import Image

gradio_client = pytest.importorskip("gradio_client")

from gen.generator import Generator  # noqa: E402
from gen.server.app import create_app, serve_in_thread  # noqa: E402
from helpers import slow_steps, wait_for  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = "/usr/bin/chromium"
pytestmark = [pytest.mark.filterwarnings("ignore:.*no_silent_downcasting"),  # gradio's own use of pandas
              pytest.mark.filterwarnings("ignore:The copy keyword")]
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    default = Generator.from_pretrained()  # the embedded default, gen-shapes: it draws the prompt
    app = create_app(default, output_dir=tmp_path_factory.mktemp("out"), max_queue=1)
    with serve_in_thread(app) as url:
        yield url, app


@pytest.fixture
def slow(server, monkeypatch):
    """Every denoising step of the served model takes at least 0.2 s (50 steps: 10 s for a cancel to land, also on a
    busy CI); returns the list of steps run."""
    return slow_steps(server[1].state.service.default.generator.pipeline.transformer, monkeypatch, 0.2)


def outcomes(app) -> dict[str, float]:
    text = app.state.metrics.render().decode()
    return {m[1]: float(m[2]) for m in re.finditer(r'gen_generations_total\{outcome="(\w+)"\} ([\d.]+)', text)}


def sources(html: str) -> list[str]:
    return re.findall(r'(?:src|href)="([^"]+)"', html)


# prompt, negative, seed, randomize, width, height, steps, guidance, frames, fps, image, enhance, loras, lora scale
def args(prompt="a red circle on the left on a blue background", width=64, height=48, steps=2, seed=42):
    return (prompt, "", seed, False, width, height, steps, 3.5, 5, 16, None, False, [], 1.0)


def test_gradio_client_generates(server):
    url, app = server
    before = outcomes(app).get("completed", 0)
    client = gradio_client.Client(f"{url}/ui/", verbose=False)
    html, seed, revised = client.predict(*args(), api_name="/generate")
    # no size said: the model's prompt reader writes its own sentence, with the default size
    assert seed == 42 and revised == "a medium red circle on the left on a blue background"
    links = sources(html)
    assert len(links) == 2 and links[0] == links[1] and re.fullmatch(r"\.\./outputs/[0-9a-f]{32}\.png", links[0])
    assert "/tmp" not in html and str(app.state.service.outputs.dir) not in html  # no server paths
    image = httpx.get(urljoin(f"{url}/ui/", links[0]))
    assert image.status_code == 200 and Image.open(io.BytesIO(image.content)).size == (64, 48)
    assert outcomes(app)["completed"] == before + 1  # the UI runs on the REST API's queue


def test_ui_is_held_to_the_server_limits(server):
    url, _ = server
    client = gradio_client.Client(f"{url}/ui/", verbose=False)
    with pytest.raises(Exception, match="--max-pixels"):  # gen-shapes: at most 256 x 256
        client.predict(*args(width=512, height=512), api_name="/generate")
    with pytest.raises(Exception, match="--max-work"):  # 4 x the default pixels x 2.5 x the default steps
        client.predict(*args(width=256, height=256, steps=50), api_name="/generate")


def test_ui_shares_the_queue_and_its_cancel_stops_the_generation(server, slow):
    url, app = server
    queue = app.state.queue
    client = gradio_client.Client(f"{url}/ui/", verbose=False)
    before = outcomes(app).get("cancelled", 0)
    job = client.submit(*args(steps=50), api_name="/generate")
    wait_for(lambda: queue.running)
    # the one queue slot (max_queue=1) taken by a REST request: the UI and REST are refused alike
    with httpx.Client(base_url=url, timeout=60) as http:
        import concurrent.futures

        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            waiting = pool.submit(http.post, "/v1/images/generations",
                                  json={"prompt": "x", "size": "32x32", "num_inference_steps": 1})
            wait_for(lambda: queue.queue_depth == 1)
            with pytest.raises(Exception, match="queue is full"):
                client.predict(*args(), api_name="/generate")
            assert http.post("/v1/images/generations", json={"prompt": "x"}).status_code == 429
            job.cancel()  # what the page does when the run is stopped or the tab closes
            assert waiting.result(timeout=30).status_code == 200
    wait_for(lambda: not queue.running)
    assert len(slow) < 50 and outcomes(app)["cancelled"] == before + 1


@pytest.mark.skipif(not Path(CHROMIUM).exists(),
                    reason=f"{CHROMIUM} is absent (CI installs it: apt-get install chromium)")
def test_browser_generates_and_screenshots(server, tmp_path):
    """Fills the form, generates, waits for the image, saves a screenshot (to docs/ with GEN_UPDATE_SCREENSHOT=1)."""
    sync_api = pytest.importorskip("playwright.sync_api")
    shot = ROOT / "docs" / "ui-screenshot.png" if os.environ.get("GEN_UPDATE_SCREENSHOT") else tmp_path / "ui.png"
    url, _ = server
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 860})
            page.goto(f"{url}/ui/", timeout=60_000)
            page.locator("#prompt textarea").fill("a large yellow star in the center on a purple background")
            for slider, value in (("width", "128"), ("height", "128"), ("steps", "20")):
                box = page.locator(f"#{slider} input[type=number]")
                box.fill(value)
                box.press("Enter")
            page.locator("#randomize input").uncheck()
            page.locator("#seed input").fill("1")
            page.locator("#generate").click()
            final = page.locator("#result img[alt^=output]")  # previews (alt "preview") come before it
            final.first.wait_for(state="visible", timeout=90_000)
            assert page.locator("#result img").count() == 1
            final.first.evaluate("img => img.decode()")  # its pixels: shown (alt text) may come before they load
            assert final.first.evaluate("img => img.naturalWidth") == 128
            page.screenshot(path=str(shot), full_page=True)
        finally:
            browser.close()


@pytest.mark.skipif(not Path(CHROMIUM).exists(),
                    reason=f"{CHROMIUM} is absent (CI installs it: apt-get install chromium)")
def test_closing_the_tab_cancels_the_generation(server, slow):
    sync_api = pytest.importorskip("playwright.sync_api")
    url, app = server
    before = outcomes(app).get("cancelled", 0)
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page()
            page.goto(f"{url}/ui/", timeout=60_000)
            page.locator("#prompt textarea").fill("a blue square")
            box = page.locator("#steps input[type=number]")
            box.fill("50")
            box.press("Enter")
            page.locator("#generate").click()
            wait_for(lambda: len(slow) >= 2)
            page.close()
        finally:
            browser.close()
    wait_for(lambda: not app.state.queue.running, timeout=15)
    assert len(slow) < 50 and outcomes(app)["cancelled"] == before + 1


def test_ui_asks_for_the_api_key_when_one_is_set(server, tmp_path):
    _, app = server
    keyed = create_app(app.state.service.default.generator, output_dir=tmp_path, api_key="s3cret")
    with serve_in_thread(keyed) as url:
        assert httpx.get(f"{url}/ui/config").status_code == 401
        with pytest.raises(Exception):
            gradio_client.Client(f"{url}/ui/", auth=("anyone", "wrong"), verbose=False)
        client = gradio_client.Client(f"{url}/ui/", auth=("anyone", "s3cret"), verbose=False)
        _, seed, _ = client.predict(*args("x", 32, 32, 1, seed=1), api_name="/generate")
        assert seed == 1


@pytest.mark.skipif(not (ROOT / "assets" / "wan-t2v-tiny").is_dir(), reason="assets/wan-t2v-tiny not built")
def test_gradio_client_video(tmp_path):
    wan = Generator.from_pretrained(ROOT / "assets" / "wan-t2v-tiny")
    with serve_in_thread(create_app(wan, output_dir=tmp_path)) as url:
        client = gradio_client.Client(f"{url}/ui/", verbose=False)
        html, seed, _ = client.predict("waves", "", 5, False, 64, 64, 2, 5.0, 5, 8, None, False, [], 1.0,
                                       api_name="/generate")
        link = sources(html)[0]
        assert seed == 5 and "<video" in html and re.fullmatch(r"\.\./outputs/[0-9a-f]{32}\.mp4", link)
        assert httpx.get(urljoin(f"{url}/ui/", link)).content[4:8] == b"ftyp"


def test_ui_shows_previews_while_it_runs(server, slow):
    url, _ = server
    client = gradio_client.Client(f"{url}/ui/", verbose=False)
    job = client.submit(*args(steps=12), api_name="/generate")
    final = job.result(timeout=60)[0]
    shown = [out[0] for out in job.outputs()[:-1] if isinstance(out[0], str) and "gen-preview" in out[0]]
    assert shown, "no preview was shown"  # 12 steps of 0.2 s, polled every 0.25 s
    for html in shown:
        assert re.search(r'<img src="data:image/png;base64,[A-Za-z0-9+/=]+" width="64" height="48"', html)
        assert "/tmp" not in html
    assert "gen-preview" not in final and "outputs/" in final


def test_ui_tabs_per_model_and_lora_picker(server, tmp_path):
    _, app = server
    flux = Generator.from_pretrained(ROOT / "assets" / "flux-tiny", device="cpu",
                                     lora_dir=ROOT / "assets" / "loras" / "flux-tiny")
    both = create_app({"flux": flux, "shapes": app.state.service.default.generator}, output_dir=tmp_path)
    with serve_in_thread(both) as url:
        client = gradio_client.Client(f"{url}/ui/", verbose=False)
        kw = dict(prompt="a fox", width=32, height=32, steps=2, seed=6)
        html, _, _ = client.predict(*args(**kw)[:-2], ["kohya"], 0.8, api_name="/generate")
        ui_image = httpx.get(urljoin(f"{url}/ui/", sources(html)[0])).content
        rest = httpx.post(f"{url}/v1/images/generations", timeout=60,
                          json={"prompt": "a fox", "size": "32x32", "num_inference_steps": 2, "seed": 6,
                                "loras": [{"name": "kohya", "scale": 0.8}]}).json()
        assert ui_image == base64.b64decode(rest["data"][0]["b64_json"])  # the same LoRA, seed and PNG
        plain, _, _ = client.predict(*args(**kw), api_name="/generate")
        assert httpx.get(urljoin(f"{url}/ui/", sources(plain)[0])).content != ui_image
        with pytest.raises(Exception):  # not one of the offered names
            client.predict(*args(**kw)[:-2], ["nope"], 1.0, api_name="/generate")
        html, seed, _ = client.predict(*args(seed=3), api_name="/generate_shapes")  # the second model's tab
        assert seed == 3 and len(sources(html)) == 2
