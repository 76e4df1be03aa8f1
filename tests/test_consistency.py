"""Unit tests of consistency/: metrics, cases and thresholds files (errors name key and line), judging, CLIP."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from helpers import psnr as helper_psnr

from consistency import metrics
from consistency.cases import Case, load_cases, safe_name
from consistency.check import compared_indices, evaluate
from consistency.thresholds import load_thresholds
from gen.types import GenError

ROOT = Path(__file__).resolve().parents[1]
FLUX = ROOT / "assets" / "flux-tiny"


def rand_image(seed: int, h: int = 24, w: int = 20) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def naive_ssim(a: np.ndarray, b: np.ndarray, n: int = 11, sigma: float = 1.5) -> float:
    """SSIM straight from the definition: weighted statistics of every n x n window, per channel."""
    x0 = np.arange(n) - (n - 1) / 2
    g = np.exp(-(x0[:, None] ** 2 + x0[None, :] ** 2) / (2 * sigma**2))
    g /= g.sum()
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    a, b = a.astype(np.float64), b.astype(np.float64)
    vals = []
    for c in range(a.shape[2]):
        for i in range(a.shape[0] - n + 1):
            for j in range(a.shape[1] - n + 1):
                x, y = a[i:i + n, j:j + n, c], b[i:i + n, j:j + n, c]
                mx, my = (g * x).sum(), (g * y).sum()
                vx, vy = (g * (x - mx) ** 2).sum(), (g * (y - my) ** 2).sum()
                cxy = (g * (x - mx) * (y - my)).sum()
                vals.append((2 * mx * my + c1) * (2 * cxy + c2) / ((mx**2 + my**2 + c1) * (vx + vy + c2)))
    return float(np.mean(vals))


def test_metrics_against_definitions():
    a, b = rand_image(0), rand_image(1)
    blurred = ((a.astype(int) + np.roll(a, 1, axis=1)) // 2).astype(np.uint8)
    assert metrics.psnr(a, a) == float("inf")
    assert metrics.psnr(a, b) == pytest.approx(helper_psnr(a, b), rel=1e-12)
    assert metrics.mad(a, b) == pytest.approx(np.abs(a.astype(float) - b).mean())
    assert metrics.ssim(a, a) == pytest.approx(1.0)
    for other in (b, blurred):
        assert metrics.ssim(a, other) == pytest.approx(naive_ssim(a, other), rel=1e-9)
    assert metrics.ssim(a, blurred) > metrics.ssim(a, b)
    tiny = rand_image(2, 6, 9)  # smaller than the window: the window shrinks instead of failing
    assert metrics.ssim(tiny, tiny) == pytest.approx(1.0)


def test_safe_name():
    assert safe_name("flux-dev") == "flux-dev"
    odd = safe_name("../etc/passwd flux:dev?")
    assert "/" not in odd and ":" not in odd and not odd.startswith(".")
    assert safe_name("a/b") != safe_name("a_b")  # replaced characters add a hash, so no collisions


def test_compared_frames():
    assert compared_indices(1, False) == [0]
    assert compared_indices(5, False) == [0, 2, 4]
    assert compared_indices(5, True) == [0, 1, 2, 3, 4]


def _case(**kw) -> Case:
    base = dict(id="c", model=FLUX, modality="video", prompt="p", seed=0)
    return Case(**{**base, **kw})


def test_video_fails_when_one_compared_frame_fails():
    frames = [rand_image(i) for i in range(5)]
    out = [f.copy() for f in frames]
    out[2] = 255 - out[2]  # the middle frame only
    bars = {"psnr": 40.0, "ssim": 0.99, "mad": 1.0}
    r = evaluate(_case(), frames, out, bars, all_frames=False, clip=None)
    assert r.status == "fail" and [f["index"] for f in r.frames] == [0, 2, 4]
    by = {m.name: m for m in r.metrics}
    assert by["psnr"].status == "fail" and by["psnr"].worst_frame == 2
    assert by["clip"].status == "not configured" and by["clip"].value is None
    out[2] = frames[2]
    out[1] = 255 - out[1]  # not compared by default, compared with --all-frames
    assert evaluate(_case(), frames, out, bars, all_frames=False, clip=None).status == "pass"
    assert evaluate(_case(), frames, out, bars, all_frames=True, clip=None).status == "fail"
    r = evaluate(_case(), frames, [f[:-2] for f in out], bars, all_frames=False, clip=None)
    assert r.status == "error" and "20x24" in r.error and "20x22" in r.error


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


CASE_JSON = """{
  "cases": [
    {
      "id": "a",
      "model": "%s",
      "modality": "image",
      "prompt": "p",
      "seed": 1%s
    }
  ]
}
"""


@pytest.mark.parametrize("extra, message", [
    (',\n      "seeed": 3', "line 9, key 'cases.0.seeed': unknown case field"),
    (',\n      "height": "64"', "line 9, key 'cases.0.height': must be an integer, got '64'"),
    (',\n      "modality2": 1', "line 9, key 'cases.0.modality2'"),
    (',\n      "num_frames": 5', "line 9, key 'cases.0.num_frames': only valid for video cases"),
    (',\n      "ranks": 3,\n      "ulysses_degree": 2', "key 'cases.0.ranks': ranks 3 must equal"),
    (',\n      "images": ["missing.png"]', "line 9, key 'cases.0.images.0': input image"),
])
def test_cases_errors_name_key_and_line(tmp_path, extra, message):
    path = write(tmp_path / "cases.json", CASE_JSON % (FLUX, extra))
    with pytest.raises(GenError) as e:
        load_cases(path)
    assert message in str(e.value) and str(path) in str(e.value)


def test_cases_malformed_json_and_yaml(tmp_path):
    bad = write(tmp_path / "cases.json", CASE_JSON % (FLUX, ","))
    with pytest.raises(GenError, match=r"cases.json line 9 column 5: malformed JSON"):
        load_cases(bad)
    yml = write(tmp_path / "cases.yaml", f"cases:\n  - id: a\n    model: {FLUX}\n    modality: image\n"
                                          "    prompt: p\n    seed: 1\n")
    assert load_cases(yml).cases[0].model == FLUX
    write(yml, f"cases:\n  - id: a\n    model: {FLUX}\n    modality: image\n    prompt: p\n    seed: x\n")
    with pytest.raises(GenError, match=r"line 6, key 'cases.0.seed': must be an integer"):
        load_cases(yml)
    write(yml, "cases:\n  - id: a\n   model: [\n")
    with pytest.raises(GenError, match=r"cases.yaml line \d+ column \d+: malformed YAML"):
        load_cases(yml)
    with pytest.raises(GenError, match="duplicate case id 'a'"):
        load_cases(write(tmp_path / "dup.json", json.dumps({"cases": [
            {"id": "a", "model": str(FLUX), "modality": "image", "prompt": "p", "seed": 1}] * 2})))


def test_thresholds_merge_and_errors(tmp_path):
    base = write(tmp_path / "consistency_threshold.json", json.dumps({
        "defaults": {"image": {"psnr": 30, "ssim": 0.9}, "video": {"psnr": 25}},
        "cases": {"a": {"ssim": 0.5}}}, indent=2))
    write(tmp_path / "consistency_threshold.h100.json", '{"defaults": {"image": {"psnr": 20}}}')
    t = load_thresholds(base, "h100")
    assert t.for_case("a", "image") == {"psnr": 20.0, "ssim": 0.5}
    assert t.for_case("b", "video") == {"psnr": 25.0}
    assert len(t.files) == 2
    with pytest.raises(GenError, match=r"platform 'a100'.*present: \['consistency_threshold.h100.json'\]"):
        load_thresholds(base, "a100")
    t.check_case_ids({"a"})
    with pytest.raises(GenError, match=r"unknown case\(s\) \['a'\]"):
        t.check_case_ids({"b"})
    write(base, '{\n  "defaults": {\n    "image": {\n      "psnr": 30,\n      "lpips": 0.1\n    }\n  }\n}\n')
    with pytest.raises(GenError, match=r"line 5, key 'defaults.image.lpips': unknown metric"):
        load_thresholds(base, "h100")
    write(base, '{\n  "defaults": {\n    "image": {"psnr": "high"}\n  }\n}\n')
    with pytest.raises(GenError, match=r"line 3, key 'defaults.image.psnr': threshold must be a number"):
        load_thresholds(base, "h100")
    write(base, '{"defaults": {"image": {"psnr": 30,}}}')
    with pytest.raises(GenError, match=r"line 1 column \d+: malformed JSON in thresholds file"):
        load_thresholds(base, "h100")


def test_clip_metric(tmp_path):
    import torch
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(0)
    cfg = CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                           image_size=32, patch_size=8, projection_dim=8)
    CLIPVisionModelWithProjection(cfg).save_pretrained(tmp_path / "clip")
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(
        tmp_path / "clip")
    clip = metrics.ClipScorer(tmp_path / "clip", torch.device("cpu"))
    a, b = rand_image(0, 40, 40), rand_image(1, 40, 40)
    assert clip.cosine(a, a) == pytest.approx(1.0, abs=1e-9)
    assert clip.cosine(a, b) < 1 - 1e-6
    r = evaluate(_case(modality="image"), [a], [b], {"clip": 0.999999}, all_frames=False, clip=clip)
    by = {m.name: m for m in r.metrics}
    assert by["clip"].status == "fail" and by["psnr"].status == "no threshold"
    with pytest.raises(GenError, match="CLIP model folder"):
        metrics.ClipScorer(tmp_path / "nope", torch.device("cpu"))
