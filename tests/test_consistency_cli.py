"""`gen consistency run|update` end to end on the tiny assets: the committed goldens pass, a perturbed golden fails
with every artifact written, bad input exits 2 with a clear message, update refuses to overwrite."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from gen.cli import main

ROOT = Path(__file__).resolve().parents[1]
CASES = ROOT / "assets" / "consistency" / "cases.json"
GOLDENS = ROOT / "assets" / "consistency" / "goldens"


def gen(capsys, *argv) -> tuple[int, str, str]:
    code = main(["consistency", *map(str, argv)])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def goldens(tmp_path) -> Path:
    """A private copy of the committed goldens, free to perturb."""
    return Path(shutil.copytree(GOLDENS, tmp_path / "goldens"))


def test_committed_goldens_pass(capsys, tmp_path):
    code, out, err = gen(capsys, "run", "--artifact-dir", tmp_path / "art")
    assert code == 0, out + err
    case_ids = [c["id"] for c in json.loads(CASES.read_text())["cases"]]
    for case_id in case_ids:
        assert f"\n{case_id} " in out
    assert "clip: not configured" in out and f"{len(case_ids)} passed, 0 failed, 0 errors" in out
    summary = json.loads((tmp_path / "art" / "summary.json").read_text())
    assert summary["counts"] == {"pass": len(case_ids), "fail": 0, "error": 0}
    assert summary["clip_model"] == "not configured"


def _perturb(path: Path, box=(4, 4, 20, 16)) -> None:
    a = np.asarray(Image.open(path).convert("RGB")).copy()
    x0, y0, x1, y1 = box
    a[y0:y1, x0:x1] = 255 - a[y0:y1, x0:x1]
    Image.fromarray(a).save(path)


def _crop_equals(side: Image.Image, box: list[int], image: Image.Image, scale: int) -> bool:
    expected = image.convert("RGB").resize((image.width * scale, image.height * scale), Image.NEAREST)
    return np.array_equal(np.asarray(side.crop(tuple(box))), np.asarray(expected))


def test_perturbed_golden_fails_and_writes_artifacts(capsys, tmp_path, goldens):
    golden_png = goldens / "flux-dev" / "ranks-1" / "image.png"
    _perturb(golden_png)
    art = tmp_path / "art"
    code, out, err = gen(capsys, "run", "--case", "flux-dev", "--goldens", goldens, "--artifact-dir", art)
    assert code == 1, out + err
    assert "fail" in out and "0 passed, 1 failed" in out
    assert sorted(p.name for p in art.iterdir()) == ["flux-dev.ranks-1.json", "flux-dev.ranks-1.png",
                                                     "index.html", "summary.json"]
    case = json.loads((art / "flux-dev.ranks-1.json").read_text())
    assert case["status"] == "fail" and case["metrics"]["psnr"]["status"] == "fail"
    assert case["metrics"]["clip"]["status"] == "not configured"
    assert case["golden"]["source"] == "reference-diffusers"
    side = Image.open(art / "flux-dev.ranks-1.png").convert("RGB")
    layout, (panel,) = case["layout"], case["layout"]["panels"]
    scale = layout["scale"]
    w, h = 64, 48  # the case's size
    assert scale * min(w, h) >= 256
    assert side.width >= 3 * w * scale and side.height > h * scale + 60  # three panels and a header
    for name in ("golden", "output", "diff"):
        x0, y0, x1, y1 = panel[name]
        assert (x1 - x0, y1 - y0) == (w * scale, h * scale) and x1 <= side.width and y1 <= side.height
    assert _crop_equals(side, panel["golden"], Image.open(golden_png), scale)
    # gen reproduces the reference exactly on fp32 CPU, so the output panel is the committed golden
    assert _crop_equals(side, panel["output"], Image.open(GOLDENS / "flux-dev" / "ranks-1" / "image.png"), scale)
    heat = np.asarray(side.crop(tuple(panel["diff"])))
    inside, outside = heat[4 * scale:16 * scale, 4 * scale:20 * scale], heat[16 * scale:, 20 * scale:]
    assert inside.astype(int).sum(-1).mean() > 150 and (outside.astype(int).sum(-1) <= 4).all()  # lit where changed
    header = np.asarray(side.crop((0, 0, side.width, panel["golden"][1] - 20)))
    assert ((header[..., 0] > 150) & (header[..., 1] < 60)).any()  # failing metrics drawn in red
    page = (art / "index.html").read_text()
    assert 'src="flux-dev.ranks-1.png"' in page and "0 passed, 1 failed" in page
    summary = json.loads((art / "summary.json").read_text())
    assert summary["counts"]["fail"] == 1 and summary["results"][0]["artifacts"]["side_by_side"]


def test_video_fails_on_middle_frame(capsys, tmp_path, goldens):
    _perturb(goldens / "wan-t2v" / "ranks-1" / "frame-0002.png", box=(0, 0, 48, 32))
    art = tmp_path / "art"
    code, out, err = gen(capsys, "run", "--case", "wan-t2v", "--goldens", goldens, "--artifact-dir", art)
    assert code == 1, out + err
    case = json.loads((art / "wan-t2v.ranks-1.json").read_text())
    assert [f["index"] for f in case["frames"]] == [0, 2, 4]
    assert case["metrics"]["psnr"]["worst_frame"] == 2
    assert [p["frame"] for p in case["layout"]["panels"]] == [0, 2, 4]
    side = Image.open(art / "wan-t2v.ranks-1.png")
    assert side.height > 3 * 32 * case["layout"]["scale"]


def _bad_cases(tmp_path: Path) -> Path:
    text = CASES.read_text().replace('"seed": 42,', '"seed": 42,\n      "sed": 1,', 1)
    path = tmp_path / "cases.json"
    path.write_text(text.replace('"../', f'"{ROOT}/assets/').replace('"inputs/', f'"{ROOT}/assets/consistency/inputs/'))
    return path


def _line_of(path: Path, needle: str) -> int:
    return next(i for i, line in enumerate(path.read_text().splitlines(), 1) if needle in line)


def test_bad_input_exits_2(capsys, tmp_path, goldens):
    # unknown case id
    code, _, err = gen(capsys, "run", "--case", "nope", "--artifact-dir", tmp_path / "a")
    assert code == 2 and "unknown case id(s) ['nope']" in err and "flux-dev" in err
    # malformed cases file: the key and the line are named
    bad = _bad_cases(tmp_path)
    code, _, err = gen(capsys, "run", "--cases", bad, "--goldens", GOLDENS, "--artifact-dir", tmp_path / "a")
    line = _line_of(bad, '"sed"')
    assert code == 2 and f"line {line}, key 'cases.0.sed': unknown case field" in err
    # malformed thresholds file
    thr = tmp_path / "thr.json"
    thr.write_text('{"defaults": {"image": {"psnr": 40}}}')
    code, _, err = gen(capsys, "run", "--thresholds", thr, "--platform", "cpu", "--artifact-dir", tmp_path / "a")
    assert code == 2 and "no thresholds file for platform 'cpu'" in err
    thr.write_text('{\n  "defaults": {\n    "image": {\n      "psnr": "40"\n    }\n  }\n}\n')
    code, _, err = gen(capsys, "run", "--thresholds", thr, "--artifact-dir", tmp_path / "a")
    assert code == 2 and "line 4, key 'defaults.image.psnr': threshold must be a number" in err
    # missing golden: the exact command to create it
    shutil.rmtree(goldens / "flux-schnell")
    code, _, err = gen(capsys, "run", "--goldens", goldens, "--artifact-dir", tmp_path / "a")
    assert code == 2 and f"create it with: gen consistency update --goldens {goldens} --case flux-schnell" in err
    # unwritable artifact dir (a path below a regular file: unwritable even for root)
    blocker = tmp_path / "file"
    blocker.write_text("x")
    code, _, err = gen(capsys, "run", "--case", "flux-dev", "--artifact-dir", blocker / "art")
    assert code == 2 and "artifact dir" in err and "is not writable" in err
    # a multi-rank case, while Generator.from_pretrained has no num_gpus
    import inspect

    from gen.generator import Generator

    if "num_gpus" not in inspect.signature(Generator.from_pretrained).parameters:
        multi = tmp_path / "multi.yaml"
        multi.write_text(f"cases:\n  - id: m\n    model: {ROOT}/assets/flux-tiny\n    modality: image\n"
                         "    prompt: p\n    seed: 1\n    ranks: 2\n    ulysses_degree: 2\n")
        (tmp_path / "consistency_threshold.json").write_text('{"defaults": {"image": {"psnr": 30}}}')
        code, _, err = gen(capsys, "run", "--cases", multi, "--artifact-dir", tmp_path / "a")
        assert code == 2 and "ranks=2: multi-rank runs are not available yet" in err


def test_golden_of_another_size_exits_2(capsys, tmp_path, goldens):
    path = goldens / "flux-schnell" / "ranks-1" / "image.png"
    Image.open(path).resize((32, 32)).save(path)
    code, out, err = gen(capsys, "run", "--case", "flux-schnell", "--goldens", goldens, "--artifact-dir",
                         tmp_path / "a")
    assert code == 2, out + err
    assert "golden is 32x32 but the output is 48x64" in out
    assert json.loads((tmp_path / "a" / "summary.json").read_text())["counts"]["error"] == 1


def test_update_refuses_without_force(capsys, tmp_path, goldens):
    before = (goldens / "flux-schnell" / "ranks-1" / "metadata.json").read_text()
    code, _, err = gen(capsys, "update", "--case", "flux-schnell", "--goldens", goldens)
    assert code == 2 and "goldens already exist for ['flux-schnell']" in err and "--force" in err
    assert (goldens / "flux-schnell" / "ranks-1" / "metadata.json").read_text() == before
    code, out, err = gen(capsys, "update", "--case", "flux-schnell", "--goldens", goldens, "--force")
    assert code == 0, out + err
    meta = json.loads((goldens / "flux-schnell" / "ranks-1" / "metadata.json").read_text())
    assert meta["source"] == "gen" and meta["seed"] == 1234 and meta["dtype"] == "float32"
    assert set(meta["versions"]) >= {"torch", "diffusers", "gen"}
    new = np.asarray(Image.open(goldens / "flux-schnell" / "ranks-1" / "image.png"))
    assert np.array_equal(new, np.asarray(Image.open(GOLDENS / "flux-schnell" / "ranks-1" / "image.png")))


def test_real_subprocess(tmp_path):
    exe = Path(sys.executable).parent / "gen"
    proc = subprocess.run([str(exe), "consistency", "run", "--case", "flux-schnell", "--artifact-dir",
                           str(tmp_path / "art")], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "flux-schnell" in proc.stdout and "1 passed, 0 failed, 0 errors" in proc.stdout
    proc = subprocess.run([str(exe), "consistency", "run", "--case", "nope"], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 2 and proc.stderr.startswith("error: unknown case id")
