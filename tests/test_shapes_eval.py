"""The shapes-world evaluator (training/shapes/evaluate.py) and the model evaluation around it (eval_model.py)."""
from __future__ import annotations

import json
import math
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFilter

from training.shapes import eval_model, evaluate, world
from training.shapes.evaluate import analyze, score

ROWS = world.eval_prompts(100, 100, 100, seed=99)  # 300 one-object scenes over all three splits


def degrade(image: np.ndarray, rng: np.random.Generator, radius: float, noise: float) -> np.ndarray:
    """What a model output might look like: gaussian blur of `radius` px plus gaussian pixel noise."""
    blurred = np.asarray(Image.fromarray(image).filter(ImageFilter.GaussianBlur(radius)), dtype=np.float64)
    return np.clip(np.round(blurred + rng.normal(0.0, noise, image.shape)), 0, 255).astype(np.uint8)


def accuracy(radius: float = 0.0, noise: float = 0.0, seed: int = 0) -> tuple[dict[str, float], list[tuple]]:
    """Per-attribute accuracy over ROWS rendered with jitter (then degraded), and the (true, read) shapes missed."""
    rng = np.random.default_rng(seed)
    totals = dict.fromkeys(evaluate.ATTRIBUTES + ("all",), 0)
    misses = []
    for _, scene, _ in ROWS:
        image = world.render(scene, rng)
        if radius or noise:
            image = degrade(image, rng, radius, noise)
        det = analyze(image)
        for k, ok in evaluate.score_detection(scene, det).items():
            totals[k] += ok
        if det.shape != scene.objects[0].shape:
            misses.append((scene.objects[0].size, scene.objects[0].shape, det.shape))
    return {k: v / len(ROWS) for k, v in totals.items()}, misses


def test_exact_on_jittered_renders():
    acc, _ = accuracy()
    assert acc == dict.fromkeys(evaluate.ATTRIBUTES + ("all",), 1.0)


@pytest.mark.parametrize("radius, noise, seed", [(1.5, 4.0, 1), (1.5, 10.0, 3), (2.0, 6.0, 2)])
def test_robust_to_blur_and_noise(radius, noise, seed):
    # observed: 100% on every attribute, but shape 99.7% at blur 2 px (one small square read as a circle)
    acc, misses = accuracy(radius, noise, seed)
    assert {k: acc[k] for k in ("background", "color", "position", "size")} == dict.fromkeys(
        ("background", "color", "position", "size"), 1.0)
    assert acc["shape"] >= 0.99 and all(size == "small" for size, *_ in misses), (acc, misses)


def test_heavy_blur_turns_small_stars_into_circles():
    # blur 2.5 px: observed shape 93.3%, every miss a small star read as a circle; the rest still 100%
    acc, misses = accuracy(2.5, 6.0, 4)
    assert 0.91 <= acc["shape"] <= 0.95 and set(misses) == {("small", "star", "circle")}, (acc, misses)
    assert acc["position"] == acc["size"] == acc["background"] == 1.0 and acc["color"] >= 0.99


@pytest.mark.parametrize("shape, feature, expected", [
    ("square", "rect_fill", 1.0), ("circle", "rect_fill", math.pi / 4), ("triangle", "rect_fill", 0.5),
    ("star", "solidity", 0.60), ("triangle", "cy_rel", 2 / 3), ("circle", "cy_rel", 0.5),
])  # the star's polygon has solidity 0.556; the 3 x 3 smoothing of the mask rounds its inner corners to 0.60
def test_shape_geometry_matches_theory(shape, feature, expected):
    det = analyze(world.render(world.Scene("black", (world.Obj(shape, "white", "large", "center"),))))
    assert det.shape == shape and det.position == "center" and det.size == "large"
    assert getattr(det, feature) == pytest.approx(expected, abs=0.03)


def test_features_of_exact_render():
    det = analyze(world.render(world.Scene("green", (world.Obj("square", "orange", "medium", "top right"),))))
    assert (det.background, det.color, det.shape, det.position, det.size) == (
        "green", "orange", "square", "top right", "medium")
    assert det.area == pytest.approx(36 * 36, abs=4) and det.center == (96.0, 32.0)
    assert det.half_extent == pytest.approx(18.0, abs=0.05)


@pytest.mark.parametrize("angle", [0, 20, 45])
def test_rotated_square_is_still_a_square(angle):
    im = Image.new("RGB", (512, 512), world.COLORS["blue"])
    ImageDraw.Draw(im).regular_polygon((256, 256, 90), 4, rotation=angle, fill=world.COLORS["yellow"])
    det = analyze(np.asarray(im.resize((128, 128), Image.BOX)))
    assert (det.shape, det.color, det.position, det.size) == ("square", "yellow", "center", "medium")


def test_every_color_name_is_its_own_nearest():
    assert [evaluate.nearest_color(np.array(rgb) + 8) for rgb in world.COLORS.values()] == list(world.COLORS)


def test_largest_component_keeps_the_biggest_blob_and_fills_holes():
    mask = np.zeros((20, 20), dtype=bool)
    mask[2:10, 2:10] = True  # 64 px with a hole
    mask[5:7, 5:7] = False
    mask[12:15, 12:19] = True  # 21 px
    mask[0, 19] = True  # a speck
    out = evaluate.largest_component(mask)
    expected = np.zeros_like(mask)
    expected[2:10, 2:10] = True
    assert (out == expected).all()
    diag = np.eye(5, dtype=bool)  # diagonal neighbours are not 4-connected
    assert evaluate.largest_component(diag).sum() == 1


def test_hull_and_rectangle_geometry():
    pts = np.array([[0, 0], [4, 0], [4, 4], [0, 4], [2, 2], [1, 3]])
    hull = evaluate.convex_hull(pts)
    assert len(hull) == 4 and evaluate.polygon_area(hull) == 16.0
    diamond = np.array([[0.0, -1.0], [1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])  # a square turned 45 degrees
    assert evaluate.min_rect_area(diamond) == pytest.approx(2.0)


def test_blank_image_finds_no_object():
    scene = world.Scene("pink", (world.Obj("circle", "blue", "small", "left"),))
    image = np.broadcast_to(np.array(world.COLORS["pink"], dtype=np.uint8), (128, 128, 3)).copy()
    det = analyze(image)
    assert not det.found and det.background == "pink" and det.shape is None
    assert score(scene, image) == {"background": True, "color": False, "shape": False, "position": False,
                                   "size": False, "all": False}


def test_wrong_attributes_are_scored_wrong():
    scene = world.Scene("white", (world.Obj("star", "red", "small", "bottom"),))
    wrong = world.Scene("black", (world.Obj("circle", "red", "large", "bottom"),))
    assert score(scene, world.render(wrong)) == {"background": False, "color": True, "shape": False,
                                                 "position": True, "size": False, "all": False}


def test_bad_inputs_are_named():
    with pytest.raises(ValueError, match=r"\(64, 64, 3\)"):
        analyze(np.zeros((64, 64, 3), dtype=np.uint8))
    two = world.Scene("white", (world.Obj("star", "red", "small", "left"), world.Obj("star", "red", "small", "right")))
    with pytest.raises(ValueError, match="2 objects"):
        score(two, world.render(two))


# ---- eval_model ------------------------------------------------------------------------------------

class FakeGenerator:
    """Stands in for gen.Generator: renders the scene its prompt describes (so every check must pass)."""

    def __init__(self, rows):
        self.scenes = {prompt: scene for _, scene, prompt in rows}
        self.calls = []

    def generate(self, prompt, *, seed, num_inference_steps, height, width, **kwargs):
        self.calls.append((prompt, seed, num_inference_steps, height, width, kwargs))
        image = world.render(self.scenes[prompt], np.random.default_rng(seed))
        return SimpleNamespace(images=[Image.fromarray(image)])


SMALL_ROWS = world.eval_prompts(8, 8, 8, seed=5)


def test_evaluate_model_with_a_perfect_generator():
    gen = FakeGenerator(SMALL_ROWS)
    results = eval_model.evaluate_model(gen, SMALL_ROWS, steps=3, cfg=2.5, log_every=0)
    assert [c[1:] for c in gen.calls] == [(i, 3, 128, 128, {"true_cfg_scale": 2.5}) for i in range(24)]
    assert all(r.scores["all"] for r in results)
    assert [r.split for r in results] == ["in-distribution"] * 8 + ["held-out"] * 8 + ["paraphrase"] * 8
    row = json.loads(json.dumps(results[3].to_json()))
    assert row["index"] == 3 and row["prompt"] == SMALL_ROWS[3][2] and row["scores"]["all"] is True
    assert row["scene"]["shape"] == row["detected"]["shape"] == SMALL_ROWS[3][1].objects[0].shape


def test_table_formatting():
    gen = FakeGenerator(SMALL_ROWS)
    results = eval_model.evaluate_model(gen, SMALL_ROWS, steps=1, log_every=0)
    results[0].scores.update(shape=False, all=False)  # one in-distribution miss: 7 / 8
    assert eval_model.table(results).splitlines() == [
        "| split | background | color | shape | position | size | all | n |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
        "| in-distribution | 100.0 | 100.0 | 87.5 | 100.0 | 100.0 | 87.5 | 8 |",
        "| held-out | 100.0 | 100.0 | 100.0 | 100.0 | 100.0 | 100.0 | 8 |",
        "| paraphrase | 100.0 | 100.0 | 100.0 | 100.0 | 100.0 | 100.0 | 8 |",
    ]
    doc = eval_model.markdown_doc(results, {"model": "m", "steps": 1, "cfg": 4.0, "device": "cpu", "dtype": "fp32",
                                            "prompt_seed": 5}, "g.png")
    assert "in-distribution color >= 90%, shape >= 80%, position >= 80%: met" in doc and "![samples](g.png)" in doc
    assert "in-distribution all >= 95%: missed (87.5%)" in doc and "paraphrase all >= 70%: met (100.0%)" in doc
    results[1].scores.update(color=False)
    results[2].scores.update(color=False)
    assert "missed: color 75.0%" in eval_model.markdown_doc(results, {"model": "m", "steps": 1, "cfg": 4.0,
                                                                      "device": "cpu", "dtype": "fp32",
                                                                      "prompt_seed": 5}, "g.png")


def test_grid_size_and_samples():
    images = [world.render(scene) for _, scene, _ in SMALL_ROWS]
    prompts = [p for *_, p in SMALL_ROWS]
    sheet = eval_model.grid(images, prompts, columns=8, scale=2)
    assert sheet.width == 8 * 256 + 7 * 4 and 3 * 256 < sheet.height < 3 * (256 + 100)
    cell = np.asarray(sheet)[:256, :256]
    assert (cell[::2, ::2] == images[0]).all()  # nearest-neighbour upscaled, untouched
    with pytest.raises(ValueError, match="24 images, 23 prompts"):
        eval_model.grid(images, prompts[:-1])
    gen = FakeGenerator(SMALL_ROWS)
    picked = eval_model.grid_samples(eval_model.evaluate_model(gen, SMALL_ROWS, 1, log_every=0), count=6)
    assert [r.index for r in picked] == [0, 1, 8, 9, 16, 17]


def test_cli_writes_results_table_grid_and_doc(tmp_path, monkeypatch, capsys):
    from gen.generator import Generator

    rows = world.eval_prompts(4, 4, 2, seed=1234)
    fake = FakeGenerator(rows)
    loaded = []
    monkeypatch.setattr(Generator, "from_pretrained", lambda path, **kw: loaded.append((path, kw)) or fake)
    md = tmp_path / "docs" / "SHAPES-EVAL.md"
    assert eval_model.main(["--model", "some/model", "--n-in", "4", "--n-heldout", "4", "--n-paraphrase", "2",
                            "--n-synonyms", "0", "--n-two", "0", "--steps", "7", "--out", str(tmp_path / "run"), "--markdown", str(md)]) == 0
    assert loaded == [("some/model", {"device": None, "dtype": None})]
    assert {c[2] for c in fake.calls} == {7} and len(fake.calls) == 10
    data = json.loads((tmp_path / "run" / "results.json").read_text())
    assert data["summary"]["held-out"] == {c: 1.0 for c in eval_model.COLUMNS} | {"n": 4}
    assert len(data["rows"]) == 10 and data["settings"]["steps"] == 7
    assert (tmp_path / "run" / "table.md").read_text() in md.read_text()
    assert Image.open(tmp_path / "run" / "grid.png").size == Image.open(md.parent / "shapes-eval-grid.png").size
    assert "| paraphrase | 100.0" in capsys.readouterr().out


# ---- two objects, and the enhancer's rows ----------------------------------------------------------

TWO = world.eval_prompts(0, 0, 0, n_two=150, seed=21)


@pytest.mark.parametrize("radius, noise", [(0.0, 0.0), (1.5, 6.0)])
def test_two_objects_read_right_on_renders(radius, noise):
    rng = np.random.default_rng(5)
    for _, scene, _ in TWO:
        image = world.render(scene, rng)
        if radius:
            image = degrade(image, rng, radius, noise)
        background, found = evaluate.analyze_objects(image, 2)
        assert evaluate.score_objects(scene, background, found)["all"] == 1.0, (scene, found)


def test_two_object_scores_count_each_object():
    scene = TWO[0][1]
    one = world.Scene(scene.background, scene.objects[:1])
    background, found = evaluate.analyze_objects(world.render(one), 2)  # the second object is missing
    scores = evaluate.score_objects(scene, background, found)
    assert len(found) == 1 and scores["all"] == 0.0 and scores["background"] == 1.0
    assert scores["color"] == scores["shape"] == 0.5
    background, found = evaluate.analyze_objects(world.render(scene), 1)  # one detection asked for
    assert len(found) == 1


class EnhancingGenerator(FakeGenerator):
    """A FakeGenerator whose enhancer rewrites one prompt in three (and draws what the rewrite says)."""

    def enhance(self, prompt, seed=0):
        if seed % 3:
            return prompt
        scene = self.scenes[prompt]
        rewrite = f"rewritten {prompt}"
        self.scenes[rewrite] = scene
        return rewrite


def test_evaluate_with_and_without_the_enhancer():
    rows = world.eval_prompts(3, 0, 3, n_two=3, seed=2)
    gen = EnhancingGenerator(rows)
    results = eval_model.evaluate_model(gen, rows, steps=1, log_every=0, enhance="both")
    assert [r.split for r in results[:2]] == ["in-distribution", "in-distribution +enhance"]
    assert len(results) == 18 and all(r.scores["all"] for r in results)
    assert len(gen.calls) == 9 + 3  # a rewrite equal to its prompt reuses the image: rows 0, 3, 6 rewritten
    assert results[1].original == rows[0][2] and results[1].prompt == "rewritten " + rows[0][2]
    assert list(eval_model.summary(results)) == ["in-distribution", "in-distribution +enhance", "paraphrase",
                                                 "paraphrase +enhance", "two objects", "two objects +enhance"]
    assert json.loads(json.dumps(results[-1].to_json()))["scene"]["objects"][1]["shape"] == rows[-1][1].objects[1].shape
    only = eval_model.evaluate_model(EnhancingGenerator(rows), rows, steps=1, log_every=0, enhance="on")
    assert {r.split for r in only} == {"in-distribution +enhance", "paraphrase +enhance", "two objects +enhance"}
    with pytest.raises(ValueError, match="'sometimes'"):
        eval_model.evaluate_model(gen, rows, steps=1, enhance="sometimes")


def test_marks_counts_spots_away_from_the_object_only():
    """training/shapes/marks.py (the blot check): a clean render has no marks, with its object's own edge pixels
    ignored; a planted 2 x 2 spot in the top-right 4 x 4 cell is counted there, a fainter one (under 12 levels) not."""
    from training.shapes.marks import marks, summarize

    rng = np.random.default_rng(3)
    scene = world.sample_scene(rng, "train", two_object_rate=0.0)
    image = world.render(scene, rng)
    assert marks(image) == (0, [])
    spotted = image.copy()
    bg = np.median(np.concatenate([image[0], image[-1]]), axis=0)
    spotted[10:12, 120:122] = np.clip(bg + 40, 0, 255)
    faint = image.copy()
    faint[10:12, 120:122] = np.clip(bg + 8, 0, 255)
    assert marks(spotted) == (4, [(0, 3)])
    assert marks(faint) == (0, [])
    summary = summarize([marks(image), marks(spotted)])
    assert summary["with_marks"] == 1 and summary["with_4px_marks"] == 1 and summary["images_per_cell"] == {"0,3": 1}
