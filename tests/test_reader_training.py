"""The prompt reader's training data (training/shapes/reader.py): slot noise puts vocabulary words that are none of
the world's, the development set's or the evaluation's in some attributes' places and leaves those attributes
unlabelled; a position's row and column are labelled apart."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from training.shapes import enhancer_dev, reader, world

try:
    from gen.llm.gguf import smollm2_path

    smollm2_path()
except FileNotFoundError as e:
    pytest.skip(str(e), allow_module_level=True)


@pytest.fixture(scope="module")
def words():
    return reader.noise_words()


def test_noise_words_are_none_of_the_known_words(words):
    assert len(words) > 5000 and words == sorted(set(words))
    known = {w for table in (world.AUGMENT_WORDS, world.EVAL_WORDS, enhancer_dev.DEV_WORDS)
             for t in table.values() for ws in t.values() for phrase in ws for w in enhancer_dev.words(phrase)}
    assert not known & set(words)
    assert not (set(world.COLORS) | set(world.SHAPES) | set(world.SIZES) | {"top", "left", "center"}) & set(words)


def test_noisy_captions_leave_the_replaced_attributes_unlabelled(words):
    plain = reader.training_rows(300, 1)
    noisy = reader.training_rows(300, 1, noise_rate=0.3, words=words)
    replaced = [(t, s) for t, s in noisy if getattr(s, "unknown", None)]
    assert 50 < len(replaced) < 150
    kept = [row for row in noisy if not getattr(row[1], "unknown", None)]
    assert kept == plain[:len(kept)]  # the rows without noise do not depend on the noise rate
    y = reader.labels([s for _, s in noisy], factors=True)
    for i, (text, scene) in enumerate(noisy):
        for k in getattr(scene, "unknown", ()):
            assert y[k][i] == -100, (text, k)
            if k in reader.OPTIONAL:
                assert y[k + " said"][i] == 1  # named, by a word the reader does not know
        if getattr(scene, "unknown", None) and "position" in scene.unknown:
            assert y["position row"][i] == -100 and y["position column"][i] == -100
    text, scene = replaced[0]
    assert any(w in text.split() for w in words)


def test_position_row_and_column_labels():
    scenes = [world.Scene("white", (world.Obj("circle", "red", "small", p),)) for p in world.POSITIONS]
    y = reader.labels(scenes, factors=True)
    rows = [reader.reader_config(1, factors=True).outputs["position row"][j] for j in y["position row"].tolist()]
    cols = [reader.reader_config(1, factors=True).outputs["position column"][j] for j in y["position column"].tolist()]
    assert list(zip(world.POSITIONS, rows, cols)) == [
        ("top left", "top", "left"), ("top", "top", "center"), ("top right", "top", "right"),
        ("left", "middle", "left"), ("center", "middle", "center"), ("right", "middle", "right"),
        ("bottom left", "bottom", "left"), ("bottom", "bottom", "center"), ("bottom right", "bottom", "right")]



def test_vote_sizes_reads_subsets_of_the_members():
    """vote_sizes: for each k, 8 seeded k-member subsets (all members once when k is their number), "all" per
    development split as mean / min / max; two-object splits and training rows are left out."""
    from gen.models.prompt_reader import PromptReader
    from training.shapes.reader import reader_config, vote_sizes

    torch.manual_seed(0)
    reader = PromptReader(reader_config(3, width=16, heads=2, factors=True)).eval()
    rng = np.random.default_rng(1)
    scenes = [world.sample_scene(rng, "train", two_object_rate=0.0) for _ in range(6)]
    rows = {"train": [], "dev a": [("x", s) for s in scenes], "dev two objects": []}
    cache = {"dev a": {"states": (torch.randn(6, 5, 576), torch.ones(6, 5, dtype=torch.bool))}}
    out = vote_sizes(reader, [1, 3], cache, rows)
    assert set(out) == {1, 3} and set(out[1]) == {"dev a"}
    assert out[3]["dev a"]["min"] == out[3]["dev a"]["max"] == out[3]["dev a"]["mean"]
    assert out[1]["dev a"]["min"] <= out[1]["dev a"]["mean"] <= out[1]["dev a"]["max"]
