"""The web UI at /ui: through gradio_client, and in a real browser (Playwright driving Debian's chromium)."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
from PIL import Image

gradio_client = pytest.importorskip("gradio_client")

from gen.generator import Generator  # noqa: E402
from gen.server.app import create_app, serve_in_thread  # noqa: E402

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
    app = create_app(default, output_dir=tmp_path_factory.mktemp("out"), max_queue=4)
    with serve_in_thread(app) as url:
        yield url, app


def test_gradio_client_generates(server):
    url, app = server
    client = gradio_client.Client(f"{url}/ui/", verbose=False)
    # prompt, negative, seed, randomize, width, height, steps, guidance, frames, fps, image, enhance
    gallery, video, seed, revised = client.predict("a red circle on the left on a blue background", "", 42, False, 64, 48, 2, 3.5,
                                                   5, 16, None, False, api_name="/generate")
    assert video is None and seed == 42 and revised == "a red circle on the left on a blue background"
    assert len(gallery) == 1
    assert Image.open(gallery[0]["image"]["path"] if isinstance(gallery[0]["image"], dict)
                      else gallery[0]["image"]).size == (64, 48)
    metrics = app.state.metrics.render().decode()
    assert 'gen_generations_total{outcome="completed"} 1.0' in metrics  # the UI runs on the REST API's engine


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
            page.locator("#gallery img").first.wait_for(state="visible", timeout=90_000)
            assert page.locator("#gallery img").count() >= 1
            page.screenshot(path=str(shot), full_page=True)
        finally:
            browser.close()


def test_ui_asks_for_the_api_key_when_one_is_set(server, tmp_path):
    _, app = server
    keyed = create_app(app.state.engine.generator, output_dir=tmp_path, api_key="s3cret")
    with serve_in_thread(keyed) as url:
        import httpx

        assert httpx.get(f"{url}/ui/config").status_code == 401
        with pytest.raises(Exception):
            gradio_client.Client(f"{url}/ui/", auth=("anyone", "wrong"), verbose=False)
        client = gradio_client.Client(f"{url}/ui/", auth=("anyone", "s3cret"), verbose=False)
        _, _, seed, _ = client.predict("x", "", 1, False, 32, 32, 1, 3.5, 5, 16, None, False, api_name="/generate")
        assert seed == 1


@pytest.mark.skipif(not (ROOT / "assets" / "wan-t2v-tiny").is_dir(), reason="assets/wan-t2v-tiny not built")
def test_gradio_client_video(tmp_path):
    wan = Generator.from_pretrained(ROOT / "assets" / "wan-t2v-tiny")
    with serve_in_thread(create_app(wan, output_dir=tmp_path)) as url:
        client = gradio_client.Client(f"{url}/ui/", verbose=False)
        gallery, video, seed, _ = client.predict("waves", "", 5, False, 64, 64, 2, 5.0, 5, 8, None, False,
                                                 api_name="/generate")
        path = video["video"] if isinstance(video, dict) else video
        assert seed == 5 and Path(path).read_bytes()[4:8] == b"ftyp"
