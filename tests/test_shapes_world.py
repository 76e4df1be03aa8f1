"""The synthetic shapes world (training/shapes/world.py): determinism, splits, layouts and captions."""
from __future__ import annotations

import itertools
import re

import numpy as np
import pytest

from training.shapes import world
from training.shapes.world import Obj, Scene

ISSUE_PROMPT = "a large yellow star in the center on a purple background"


def _template_regex(template: str, words: dict) -> re.Pattern:
    """A template as a regex with one named group per field; two-object templates get fields color1 ... position2."""
    for k in "12":
        fields = {f: "{" + f + k + "}" for f in ("size", "color", "shape", "position")}
        template = template.replace("{o" + k + "}", world.OBJECT_PHRASE.format(**fields))
    groups = {"background": "|".join(world.COLORS), "color": "|".join(world.COLORS)}
    for kind in ("size", "shape", "position"):
        phrases = sorted({p for options in words[kind].values() for p in options}, key=len, reverse=True)
        groups[kind] = "|".join(re.escape(p) for p in phrases)
    parts = []
    for piece in re.split(r"(\{\w+\})", template):
        if m := re.fullmatch(r"\{(\w+?)([12]?)\}", piece):
            parts.append(f"(?P<{m[1]}{m[2]}>{groups[m[1]]})")
        else:
            parts.append(re.escape(piece))
    return re.compile("".join(parts))


def _name(words: dict, kind: str, phrase: str) -> str:
    (name,) = [n for n, options in words[kind].items() if phrase in options]
    return name


def parse(text: str, style: str = "train") -> set[Scene]:
    """Every scene that `text` can be read as under the templates and words of `style` (articles normalized)."""
    words = world.TRAIN_WORDS if style == "train" else world.PARAPHRASE_WORDS
    one = world.TRAIN_TEMPLATES if style == "train" else world.PARAPHRASE_TEMPLATES
    text = re.sub(r"\ban\b", "a", text)
    found = set()
    for template in one:
        if m := _template_regex(template, words).fullmatch(text):
            obj = Obj(_name(words, "shape", m["shape"]), m["color"], _name(words, "size", m["size"]),
                      _name(words, "position", m["position"]))
            found.add(Scene(m["background"], (obj,)))
    if style == "train":
        for template in world.TWO_OBJECT_TEMPLATES:
            if m := _template_regex(template, words).fullmatch(text):
                objs = tuple(Obj(_name(words, "shape", m[f"shape{k}"]), m[f"color{k}"],
                                 _name(words, "size", m[f"size{k}"]), _name(words, "position", m[f"position{k}"]))
                             for k in "12")
                found.add(Scene(m["background"], objs))
    return found


# ---- determinism ---------------------------------------------------------------------------------

def test_training_samples_are_deterministic_by_seed():
    for seed in range(5):
        img_a, cap_a, scene_a = world.training_sample(np.random.default_rng(seed))
        img_b, cap_b, scene_b = world.training_sample(np.random.default_rng(seed))
        assert cap_a == cap_b and scene_a == scene_b and np.array_equal(img_a, img_b)
        assert img_a.shape == (128, 128, 3) and img_a.dtype == np.uint8
    samples = [world.training_sample(np.random.default_rng(s)) for s in range(5)]
    assert len({cap for _, cap, _ in samples}) == 5


def test_render_without_rng_is_exact_and_jitter_changes_pixels():
    scene = Scene("blue", (Obj("circle", "white", "medium", "center"),))
    exact = world.render(scene)
    assert np.array_equal(exact, world.render(scene))
    assert tuple(exact[0, 0]) == world.COLORS["blue"] and tuple(exact[64, 64]) == world.COLORS["white"]
    assert not np.array_equal(exact, world.render(scene, np.random.default_rng(0)))


# ---- splits --------------------------------------------------------------------------------------

def test_train_split_never_holds_a_held_out_combination():
    rng = np.random.default_rng(0)
    scenes = [world.sample_scene(rng, "train") for _ in range(3000)]
    assert not any(world.is_held_out(s) for s in scenes)
    pairs = {(o.color, o.shape) for s in scenes for o in s.objects}
    assert pairs == set(itertools.product(world.COLORS, world.SHAPES)) - world.HELD_OUT_PAIRS  # all other 30 seen
    n_two = sum(len(s.objects) == 2 for s in scenes)
    # two_object_rate 0.3 is the rate before rejection; two-object draws are rejected more often (either object
    # may hit the background color or a held-out pair), so about 22% of train scenes hold two objects
    assert 0.19 < n_two / len(scenes) < 0.25


def test_heldout_split_always_holds_one_held_out_object():
    rng = np.random.default_rng(1)
    scenes = [world.sample_scene(rng, "heldout") for _ in range(1000)]
    assert all(len(s.objects) == 1 and world.is_held_out(s) for s in scenes)
    assert {(s.objects[0].color, s.objects[0].shape) for s in scenes} == world.HELD_OUT_PAIRS


def test_object_colors_differ_from_the_background():
    rng = np.random.default_rng(2)
    scenes = [world.sample_scene(rng, split) for split in ("train", "heldout") for _ in range(1500)]
    scenes += [scene for _, scene, _ in world.eval_prompts()]
    assert all(o.color != s.background for s in scenes for o in s.objects)


def test_unknown_split_and_style_are_named():
    with pytest.raises(ValueError, match="'test'"):
        world.sample_scene(np.random.default_rng(0), "test")
    scene = Scene("blue", (Obj("circle", "white", "medium", "center"),))
    with pytest.raises(ValueError, match="'fancy'"):
        world.caption(scene, np.random.default_rng(0), "fancy")


# ---- two-object layouts --------------------------------------------------------------------------

class ExtremeRng:
    """Stands in for the render rng: no color jitter, and the given position / size jitters in order."""

    def __init__(self, uniforms: list[float]):
        self.uniforms = list(uniforms)

    def integers(self, low: int, high: int) -> int:
        return 0

    def uniform(self, low: float, high: float) -> float:
        value = self.uniforms.pop(0)
        assert low <= value <= high, (low, value, high)
        return value


def _object_mask(background: str, obj: Obj, dx: float, dy: float) -> np.ndarray:
    image = world.render(Scene(background, (obj,)), ExtremeRng([dx, dy, world.JITTER_SIZE]))
    return (image != np.array(world.COLORS[background], dtype=np.uint8)).any(axis=2)


def test_two_object_layouts_never_overlap_even_at_worst_jitter():
    """Every pair layout, every shape pair, largest two-object size, both objects pushed toward each other."""
    assert all(len(s.objects) == 1 or ((s.objects[0].position, s.objects[1].position) in world.PAIRS
                                       or (s.objects[1].position, s.objects[0].position) in world.PAIRS)
               and {o.size for o in s.objects} <= set(world.TWO_OBJECT_SIZES)
               for s in (world.sample_scene(np.random.default_rng(k)) for k in range(500)))
    size = max(world.TWO_OBJECT_SIZES, key=world.SIZES.get)
    j = world.JITTER_PX
    for p1, p2 in world.PAIRS:
        (x1, y1), (x2, y2) = world.POSITIONS[p1], world.POSITIONS[p2]
        dx, dy = j * np.sign(x2 - x1), j * np.sign(y2 - y1)
        for s1, s2 in itertools.product(world.SHAPES, repeat=2):
            m1 = _object_mask("black", Obj(s1, "white", size, p1), dx, dy)
            m2 = _object_mask("black", Obj(s2, "white", size, p2), -dx, -dy)
            assert m1.sum() > 300 and m2.sum() > 300
            assert not (m1 & m2).any(), (p1, p2, s1, s2)


# ---- captions ------------------------------------------------------------------------------------

def _captions(n: int = 600) -> list[tuple[str, str, Scene]]:
    rng = np.random.default_rng(3)
    out = []
    for _ in range(n):
        scene = world.sample_scene(rng, "train")
        out.append(("train", world.caption(scene, rng, "train"), scene))
        one = world.sample_scene(rng, "heldout")
        out.append(("paraphrase", world.caption(one, rng, "paraphrase"), one))
    return out


def test_every_caption_parses_back_to_its_scene_and_only_to_it():
    for style, text, scene in _captions():
        assert parse(text, style) == {scene}, (style, text)
        assert not parse(text, "paraphrase" if style == "train" else "train"), text  # templates never mix


def test_articles_are_right():
    for _, text, _ in _captions():
        assert not re.search(r"\ba [aeiou]", text) and not re.search(r"\ban [^aeiou]", text), text
    scene = Scene("blue", (Obj("star", "orange", "small", "top"),))
    texts = [world.caption(scene, np.random.default_rng(s)) for s in range(40)]
    assert any("an orange star" in t for t in texts) and not any("a orange" in t for t in texts)


def _trained(kind: str) -> set[str]:
    base = world.COLOR_WORDS if kind == "color" else world.TRAIN_WORDS[kind]
    return {p for table in (base, world.AUGMENT_WORDS[kind]) for options in table.values() for p in options}


def test_evaluation_words_are_neither_training_nor_augmentation_words():
    for kind in ("size", "shape", "position", "color"):
        held = {p for options in world.EVAL_WORDS[kind].values() for p in options}
        assert not _trained(kind) & held, kind
        assert set(world.EVAL_WORDS[kind]) == set(world.AUGMENT_WORDS[kind])  # same names covered
    literal = [re.sub(r"\{\w+\}", "", t) for t in world.EVAL_TEMPLATES]
    trained = world.TRAIN_TEMPLATES + world.AUGMENT_TEMPLATES
    assert not set(world.EVAL_TEMPLATES) & set(trained)
    assert all(w not in t for t in trained for w in ("canvas", "scene", "the rest is", "i would like"))
    assert any("canvas" in t for t in literal)


def test_held_out_phrases_containing_a_trained_phrase_are_the_known_ones():
    """Known leaks: these held-out phrases hold a whole training phrase ("high up on the left" holds "on the left"),
    so they are only partly unseen."""
    leaks = set()
    for kind in ("size", "shape", "position", "color"):
        for options in world.EVAL_WORDS[kind].values():
            leaks |= {(p, t) for p in options for t in _trained(kind) if re.search(rf"\b{re.escape(t)}\b", p)}
    assert leaks == {("low down in the middle", "in the middle"), ("high up in the middle", "in the middle"),
                     ("grass-green", "green"), ("milk-white", "white"), ("pitch-black", "black"),
                     ("low down on the right", "on the right"), ("high up on the right", "on the right"),
                     ("on the right-hand side", "on the right"), ("on the left-hand side", "on the left"),
                     ("low down on the left", "on the left"), ("high up on the left", "on the left")}


def test_augmented_captions_mix_training_and_augmentation_words_only():
    rng = np.random.default_rng(8)
    captions = [world.training_caption(rng, augment=True) for _ in range(3000)]
    plain = sum(bool(parse(text)) for text, _ in captions)
    assert 0.3 < plain / len(captions) < 0.6  # about 1 - AUGMENT_RATE (+ augmented ones drawing only base words)
    held = {p for kind in ("size", "shape", "position", "color") for o in world.EVAL_WORDS[kind].values() for p in o}
    held -= {"in the very middle", "dead center"} | {p for p in held if p.startswith(("high up", "low down", "on the"))}
    for text, _ in captions:
        assert not any(re.search(rf"\b{re.escape(p)}\b", text) for p in held), text
    assert any("crimson" in t or "scarlet" in t for t, _ in captions) and any("backdrop" in t for t, _ in captions)
    rng = np.random.default_rng(8)
    assert [world.training_caption(rng, augment=True) for _ in range(50)] == captions[:50]  # deterministic by seed


def test_issue_example_prompt_is_an_in_distribution_caption():
    scene = Scene("purple", (Obj("star", "yellow", "large", "center"),))
    assert parse(ISSUE_PROMPT) == {scene}
    assert not world.is_held_out(scene) and ("yellow", "star") not in world.HELD_OUT_PAIRS
    assert ISSUE_PROMPT in {world.caption(scene, np.random.default_rng(s)) for s in range(200)}


# ---- eval prompts --------------------------------------------------------------------------------

def test_synonym_and_two_object_splits():
    rows = world.eval_prompts(0, 0, 0, n_synonyms=60, n_two=60, seed=4)
    assert [r[0] for r in rows] == ["synonyms"] * 60 + ["two objects"] * 60
    assert rows[:3] == world.eval_prompts(0, 0, 0, n_synonyms=60, seed=4)[:3]
    held = {p for options in world.EVAL_WORDS["color"].values() for p in options}
    for split, scene, prompt in rows:
        assert not world.is_held_out(scene)
        if split == "synonyms":
            assert len(scene.objects) == 1 and not parse(prompt)
            named = [p for p in held if re.search(rf"\b{re.escape(p)}\b", prompt)]
            assert len(named) >= 2 and not any(re.search(rf"\b{c}\b", prompt) for c in world.COLORS
                                                if c not in " ".join(named)), prompt
        else:
            assert len(scene.objects) == 2 and parse(prompt) == {scene}, prompt
    assert world.eval_prompts(200, 200, 100) == world.eval_prompts(200, 200, 100, n_synonyms=5, n_two=5)[:500]


def test_eval_prompts_sizes_splits_and_determinism():
    rows = world.eval_prompts(200, 200, 100)
    assert [split for split, _, _ in rows] == ["in-distribution"] * 200 + ["held-out"] * 200 + ["paraphrase"] * 100
    assert rows == world.eval_prompts(200, 200, 100) and rows != world.eval_prompts(200, 200, 100, seed=1)
    assert [len(r) for r in (world.eval_prompts(3, 0, 2), world.eval_prompts(0, 5, 0))] == [5, 5]
    for split, scene, prompt in rows:
        assert len(scene.objects) == 1 and world.is_held_out(scene) == (split == "held-out")
        assert parse(prompt, "paraphrase" if split == "paraphrase" else "train") == {scene}, prompt
    assert len({prompt for _, _, prompt in rows}) >= 490  # nearly all distinct


def test_the_probes_extra_vocabulary_holds_no_evaluation_word():
    """training/shapes/probe.py --more-words: its words are neither evaluation words nor hold one, nor sit inside
    one, and are new; its sentence forms use none of the evaluation's template words."""
    from training.shapes.probe import MORE_TEMPLATES, MORE_WORDS

    for kind, table in MORE_WORDS.items():
        assert set(table) == set(world.EVAL_WORDS[kind])
        held = {p for options in world.EVAL_WORDS[kind].values() for p in options}
        for words in table.values():
            for w in words:
                assert w not in _trained(kind), w
                assert not any(re.search(rf"\b{re.escape(w)}\b", h) or re.search(rf"\b{re.escape(h)}\b", w)
                               for h in held), w
    assert all(w not in t for t in MORE_TEMPLATES for w in ("canvas", "scene", "the rest is", "i would like"))
