"""A model's prompt guide (stages/enhance_prompt.PromptGuide, stages/slot_parse.py): gen-shapes' guide keeps the
prompts it was trained on, reads paraphrases into its own sentence, warns on prompts without a shape; the enhancer
uses it through Generator.enhance and the CLI prints the rewrite."""
from __future__ import annotations

import json
import re
import shutil

import numpy as np
import pytest

from gen import GenError
from stages.enhance_prompt import PromptGuide, enhance_prompt
from stages.slot_parse import SlotReader, tokens
from training.shapes import guide as shapes_guide
from training.shapes import world
from training.shapes.guide import CANONICAL_POSITIONS

POSITION_OF = {v: k for k, v in CANONICAL_POSITIONS.items()}


@pytest.fixture(scope="module")
def guide(tmp_path_factory):
    folder = tmp_path_factory.mktemp("model")
    shapes_guide.write(folder, augmented=False)
    return PromptGuide.load(folder)


def parse_answer(text: str) -> world.Scene:
    """The scene of an answer in the guide's own sentence."""
    obj = r"(small|medium|large) (\w+) (circle|square|triangle|star) (" + "|".join(POSITION_OF) + ")"
    m = re.fullmatch(rf"a {obj}(?: and a {obj})? on an? (\w+) background", text)
    assert m, text
    g = m.groups()
    objs = [world.Obj(g[2], g[1], g[0], POSITION_OF[g[3]])]
    if g[4]:
        objs.append(world.Obj(g[6], g[5], g[4], POSITION_OF[g[7]]))
    return world.Scene(g[8], tuple(objs))


def test_shipped_guide_is_the_one_the_script_writes():
    from gen.generator import default_model_path

    shipped = json.loads((default_model_path() / "prompt_guide.json").read_text())
    # augmented=False until the fine-tuned weights (trained on augmented captions) are exported
    assert shipped in (shapes_guide.prompt_guide(augmented=False), shapes_guide.prompt_guide(augmented=True))


def test_training_prompts_are_read_as_they_are(guide):
    for _, _, prompt in world.eval_prompts(60, 60, 0, n_two=30, seed=3):
        assert guide.read_as_is(prompt), prompt
        assert guide.read_as_is(prompt.upper() + ".")
    for _, _, prompt in world.eval_prompts(0, 0, 30, n_synonyms=30, seed=3):
        assert not guide.read_as_is(prompt), prompt
    assert not guide.read_as_is("a red circle")


def test_every_known_word_is_read_without_an_llm(guide, monkeypatch):
    """Captions in the training and first augmentation vocabulary (which the guide's slots declare) are read exactly;
    the wider vocabulary the model was later trained on is known to the guide's `reads`, not to its reader."""
    monkeypatch.setattr(world, "AUGMENT_WORDS", world.READER_AUGMENT_WORDS)
    monkeypatch.setattr(world, "AUGMENT_TEMPLATES", world.READER_AUGMENT_TEMPLATES)
    monkeypatch.setattr(world, "AUGMENT_TWO_OBJECT_TEMPLATES", world.READER_AUGMENT_TWO_OBJECT_TEMPLATES)
    reader = SlotReader(guide.slots)
    rng = np.random.default_rng(12)
    for _ in range(400):
        scene = world.sample_scene(rng, "train")
        text = world.caption(scene, rng, "augmented")
        read = reader.read(text)
        assert read is not None and parse_answer(reader.write(read)) == scene, text


def test_positions_are_put_together_from_their_parts(guide):
    reader = SlotReader(guide.slots)
    for text, position in [("a small red circle up top on the left, blue backdrop", "top left"),
                           ("a small red circle, lower edge, right side, blue backdrop", "bottom right"),
                           ("a small red circle at the upper-right, blue backdrop", "top right"),
                           ("a small red circle right in the middle of the picture, blue backdrop", "center")]:
        assert reader.read(text)["objects"][0]["position"] == position, text
    assert tokens("An Orange, star.") == ["a", "orange", ",", "star", "."]


def test_unnamed_slots_take_the_defaults(guide):
    reader = SlotReader(guide.slots)
    assert reader.write(reader.read("a red circle")) == "a medium red circle in the center on a white background"
    assert reader.write(reader.read("a white star")) == "a medium white star in the center on a black background"
    assert reader.read("a photo of a cat") is None  # no shape and no LLM to read one


def test_domain_warning(guide):
    assert "draws colored shapes only" in guide.out_of_domain("a photo of a cat")
    assert "draws colored shapes only" in guide.out_of_domain("a beautiful sunset over the ocean")
    for prompt in ("a red circle", "two blue Stars", "a large yellow star in the center on a purple background"):
        assert guide.out_of_domain(prompt) is None, prompt
    # a word only the enhancer's thesaurus maps onto a shape: the warning holds unless the prompt is enhanced
    assert guide.out_of_domain("a red rectangle") is not None
    assert guide.out_of_domain("a red rectangle", enhanced=True) is None
    assert "draws colored shapes only" in guide.out_of_domain("a photo of a cat", enhanced=True)


def test_bad_guides_are_named(tmp_path, guide):
    shutil.copy(guide.path, tmp_path / "prompt_guide.json")
    data = json.loads(guide.path.read_text())
    (tmp_path / "prompt_guide.json").write_text(json.dumps(dict(data, style="fancy")))
    with pytest.raises(GenError, match=r"unknown fields \['style'\]"):
        PromptGuide.load(tmp_path)
    (tmp_path / "prompt_guide.json").write_text(json.dumps({"examples": []}))
    with pytest.raises(GenError, match="system must be a non-empty string"):
        PromptGuide.load(tmp_path)
    (tmp_path / "prompt_guide.json").write_text(json.dumps(dict(data, slots={"lexicon": {}})))
    with pytest.raises(GenError, match="slots must be an object with"):
        PromptGuide.load(tmp_path)
    assert PromptGuide.load(tmp_path / "nowhere") is None


def test_enhancer_with_smollm2_keeps_known_prompts_and_answers_in_the_grammar(guide):
    from gen.llm import registry
    from gen.llm.gguf import smollm2_path

    llm = registry.get_llm(smollm2_path(), "cpu", "fp32")
    known = "a large yellow star in the center on a purple background"
    assert enhance_prompt(llm, known, "image", 0, guide=guide) == known
    for prompt in ("please make a teeny red disk in the upper left corner on blue paper",
                   "a large crimson wedge at the bottom on a moss background", "a photo of a cat"):
        a = enhance_prompt(llm, prompt, "image", 0, guide=guide)
        assert a == enhance_prompt(llm, prompt, "image", 1, guide=guide)  # deterministic
        scene = parse_answer(a)
        if "disk" in prompt:  # known words read; "teeny" left to the LLM, "paper" to the distance rule
            o = scene.objects[0]
            assert (scene.background, o.shape, o.color, o.position) == ("blue", "circle", "red", "top left"), a
        if "wedge" in prompt:
            assert scene.objects[0].shape == "triangle" and scene.objects[0].color == "red", a
