"""The prompt enhancer's development set (training/shapes/enhancer_dev.py) and the honesty of its measurement: the
evaluation's held-out words and sentence forms appear nowhere in the guide, the reader's code or the development set,
and the development words are not the guide's few-shot examples."""
from __future__ import annotations

import json
import re
from pathlib import Path

from training.shapes import enhancer_dev, guide, world

ROOT = Path(__file__).resolve().parents[1]


def dev_words() -> set[str]:
    found = set().union(*map(enhancer_dev.words, enhancer_dev.DEV_TEMPLATES))
    for table in enhancer_dev.DEV_WORDS.values():
        for phrases in table.values():
            found |= set().union(*map(enhancer_dev.words, phrases))
    return found


def test_held_out_words_are_the_evaluations_new_ones():
    held = enhancer_dev.held_out_words()
    assert {"pentagram", "orb", "canvas", "cobalt", "three-sided"} <= held
    assert not held & {"tiny", "disk", "crimson", "backdrop", "upper", "left", "the"}  # trained words are not held out


def test_dev_set_shares_no_word_with_the_evaluation_nor_the_examples():
    held = enhancer_dev.held_out_words()
    assert not dev_words() & held, sorted(dev_words() & held)
    examples = guide.slots()["word_examples"]
    shots = {w for pairs in examples.values() for w, _ in pairs}
    dev_phrases = {p for table in enhancer_dev.DEV_WORDS.values() for ps in table.values() for p in ps}
    assert not shots & dev_phrases, sorted(shots & dev_phrases)


def test_guide_and_reader_code_name_no_held_out_word():
    held = enhancer_dev.held_out_words() - {"i", "one"}  # ordinary words: the guide's answer keys, docstrings
    written = guide.prompt_guide(augmented=True)
    # the thesaurus is a dictionary's words, derived by a fixed rule (tests/test_thesaurus.py): it holds some of them
    del written["slots"]["thesaurus"]
    data = json.dumps(written).lower()
    assert not set(re.findall(r"[a-z0-9'-]+", data)) & held
    for path in ("stages/slot_parse.py", "training/shapes/guide.py", "training/shapes/thesaurus.py"):  # the
        # reader, its guide and the thesaurus's rule
        text = (ROOT / path).read_text().lower()
        found = {w for w in held if re.search(rf"(?<![a-z-]){re.escape(w)}(?![a-z-])", text)}
        assert not found, (path, sorted(found))


def test_dev_prompts_are_deterministic_and_parse_back():
    a, b = enhancer_dev.dev_prompts(30, seed=3), enhancer_dev.dev_prompts(30, seed=3)
    assert a == b and len({p for _, p in a}) == 30
    for scene, _ in a:
        assert len(scene.objects) == 1 and not world.is_held_out(scene)
    scene = world.Scene("blue", (world.Obj("star", "red", "small", "top left"),))
    assert enhancer_dev.parse_answer("a small red star at the top left on a blue background") == scene
    assert enhancer_dev.parse_answer("a red star") is None
