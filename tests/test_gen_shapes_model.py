"""The trained default model (assets/gen-shapes) draws what it is asked: checked by the shapes-world evaluator, on the
issue's example through `gen generate` with no model path, and on a small fixed sample of the evaluation prompts."""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from training.shapes import world
from training.shapes.eval_model import evaluate_model, summary
from training.shapes.evaluate import score
from gen.generator import Generator, default_model_path

EXAMPLE = "a large yellow star in the center on a purple background"
EXAMPLE_SCENE = world.Scene("purple", (world.Obj("star", "yellow", "large", "center"),))


@pytest.fixture(scope="module")
def generator():
    return Generator.from_pretrained()  # the embedded default


def test_default_model_is_the_trained_shapes_model(generator):
    assert default_model_path().name == "gen-shapes"
    assert type(generator.pipeline).__name__ == "QwenImageLLMPipeline"
    size = sum(f.stat().st_size for f in default_model_path().rglob("*") if f.is_file())
    assert size <= 30e6, size  # the budget for the shipped model
    assert max(f.stat().st_size for f in default_model_path().rglob("*") if f.is_file()) < 10e6  # no file over 10 MB


def test_cli_generate_without_model_path_draws_the_prompt(tmp_path):
    out = tmp_path / "star.png"
    proc = subprocess.run([sys.executable, "-m", "gen.cli", "generate", "--prompt", EXAMPLE, "--output", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    image = np.asarray(Image.open(out).convert("RGB"))
    assert image.shape == (128, 128, 3)
    assert score(EXAMPLE_SCENE, image) == {"background": True, "color": True, "shape": True, "position": True,
                                           "size": True, "all": True}


def test_small_evaluation_sample_meets_the_targets(generator):
    rows = world.eval_prompts(n_in=16, n_heldout=0, n_paraphrase=0, seed=2026)
    results = evaluate_model(generator, rows, steps=20)
    acc = summary(results)["in-distribution"]
    # targets of the issue (color >= 90%, shape >= 80%, position >= 80%) on a deterministic CPU sample
    assert acc["color"] >= 0.9 and acc["shape"] >= 0.8 and acc["position"] >= 0.8, acc
    assert acc["background"] >= 0.9, acc


def test_different_prompts_draw_different_scenes(generator):
    a = np.asarray(generator.generate(prompt="a small red circle at the top left on a blue background", seed=1).images[0])
    b = np.asarray(generator.generate(prompt="a small red circle at the bottom right on a blue background", seed=1).images[0])
    sa = world.Scene("blue", (world.Obj("circle", "red", "small", "top left"),))
    sb = world.Scene("blue", (world.Obj("circle", "red", "small", "bottom right"),))
    assert score(sa, a)["position"] and score(sb, b)["position"]
    assert not score(sa, b)["position"]
