"""gen-shapes' prompt guide (`prompt_guide.json` in the model folder): how the prompt enhancer rewrites prompts for it,
which prompts it reads as they are, and which prompts are outside what it makes. Built from the world's vocabulary
(world.py).

The enhancer's instructions and examples use only the training words and the first augmentation words
(world.READER_AUGMENT_*, see `slots`), never the evaluation's held-out ones (world.EVAL_*), so the evaluation's
paraphrase and synonym splits stay unseen by the enhancer too. `augmented` says whether the model was trained with
the augmentation captions (world.AUGMENT_*): the prompts it reads as they are then include them.

    python -m training.shapes.guide assets/gen-shapes [--augmented]
"""
from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

from training.shapes import thesaurus, world

GUIDE_FILE = "prompt_guide.json"
CANONICAL_POSITIONS = {  # the one training phrase of each position the enhancer answers with
    "top left": "at the top left", "top": "at the top", "top right": "at the top right", "left": "on the left",
    "center": "in the center", "right": "on the right", "bottom left": "at the bottom left", "bottom": "at the bottom",
    "bottom right": "at the bottom right",
}
WARNING = ("gen-shapes, the default model, draws colored shapes only (a circle, square, triangle or star on a flat "
           "background) and this prompt names none of them")


WORD_FRAMES = {  # chosen on the enhancer's own development set (training/shapes/enhancer_dev.py); a list: the frames'
    # calibrated scores summed (dev words read right, one frame -> two: size 87 -> 90%, shape 85 -> 90%)
    "size": ["{word} means {value}.", "something {word} is {value}."],
    "color": "the color {word} is a shade of {value}.",
    "shape": ["{word} = {value}", "{word} means {value}."],
}


def _interleave(lists: list[list]) -> list:
    """The items of several lists taken in turn (few-shot examples of several answers mixed, not grouped)."""
    out = []
    for k in range(max(map(len, lists))):
        out += [items[k] for items in lists if k < len(items)]
    return out


def _balanced(lists: list[list]) -> list[list]:
    """As many items of each list as the shortest has, spread over each list (one answer no likelier a priori)."""
    n = min(map(len, lists))
    return [[items[round(k * len(items) / n)] for k in range(n)] for items in lists]


def _phrases(*tables: dict) -> list[str]:
    return sorted({p for table in tables for options in table.values() for p in options})


def _table(kind: str, augmented: bool = True, augment_words: dict | None = None) -> dict[str, list[str]]:
    """value -> phrases of a kind: the training words, and the augmentation words (`augment_words`, default
    world.AUGMENT_WORDS) when `augmented`."""
    base = world.COLOR_WORDS if kind == "color" else world.TRAIN_WORDS[kind]
    extra = (augment_words or world.AUGMENT_WORDS)[kind]
    return {v: list(base[v]) + (list(extra[v]) if augmented else []) for v in base}


def _template_words(templates) -> set[str]:
    return {w for t in templates for w in re.findall(r"[a-z'-]+", re.sub(r"\{\w+\}", " ", t))}


def slots() -> dict:
    """The enhancer's slot vocabulary (stages/slot_parse.py): training words and the first augmentation vocabulary
    (world.READER_AUGMENT_*), which the reader's cues and few-shot lines were built on. The model was later fine-tuned
    on a wider one (world.AUGMENT_*); given to the reader, its extra phrases made cues that misread unseen words (of
    positions, sizes and colors), so the reader keeps the first. It writes the training words anyway."""
    templates = (world.TRAIN_TEMPLATES + world.READER_AUGMENT_TEMPLATES + world.TWO_OBJECT_TEMPLATES
                 + world.READER_AUGMENT_TWO_OBJECT_TEMPLATES)
    lexicon = {kind: _table(kind, augment_words=world.READER_AUGMENT_WORDS)
               for kind in ("size", "color", "shape", "position")}
    lexicon_words = {w for table in lexicon.values() for ps in table.values() for p in ps for w in p.split()}
    after, before = set(), set()
    for t in templates:  # the words next to {background} in the sentences the model was trained on
        if m := re.search(r"\{background\} ([a-z]+)", t):
            after.add(m.group(1))
        if m := re.search(r"([a-z]+ [a-z]+) \{background\}", t):
            before.add(m.group(1))
    before -= {"on a", "against a", "over a"}  # these come before words such as "background", kept by `after`
    before |= {f"{a} is" for a in after}  # "the backdrop is ...", as "the background is ..."
    fillers = sorted(_template_words(templates) - lexicon_words)
    known = set(fillers) | {p for table in lexicon.values() for ps in table.values() for p in ps}
    word_examples = {kind: [[w, v] for v, ws in world.READER_AUGMENT_WORDS[kind].items() for w in ws if " " not in w]
                     for kind in ("size", "color", "shape")}
    return {
        "lexicon": lexicon,
        "position_parts": {p: p.split() if p != "center" else [] for p in world.POSITIONS},
        "background_markers": {"after": sorted(after), "before": sorted(before)},
        "fillers": fillers,
        "word_examples": word_examples,
        # words a dictionary (WordNet) gives for the values, by a fixed rule from the lexicon (thesaurus.py)
        "thesaurus": thesaurus.build(lexicon, known),
        # how the LLM is asked for a word's value ("{word}" and "{value}" filled; the text before "{value}" is scored)
        "word_frames": WORD_FRAMES,
        # which slot a word names at all: the example words of each slot, and the model's sentence words as "other"
        "kind_examples": _interleave(_balanced([[[w, kind] for w, _ in word_examples[kind]] for kind in word_examples]
                                               + [[[w, "other"] for w in fillers if len(w) > 2]])),
        "defaults": {"size": "medium", "position": "center", "background": ["white", "black"]},
        "answer": {"one": "a {size1} {color1} {shape1} {position1} on {background} background",
                   "two": "a {size1} {color1} {shape1} {position1} and a {size2} {color2} {shape2} {position2} on "
                          "{background} background",
                   "phrases": {"position": CANONICAL_POSITIONS,
                               "background": {c: world._articles(f"a {c}") for c in world.COLORS}}},
    }


def prompt_guide(augmented: bool) -> dict:
    """The guide as JSON-ready data (stages/enhance_prompt.py reads it)."""
    words = {kind: _phrases(_table(kind, augmented)) for kind in ("size", "shape", "position", "color")}
    words["background"] = words["color"]
    one = list(world.TRAIN_TEMPLATES) + (list(world.AUGMENT_TEMPLATES) if augmented else [])
    two = list(world.TWO_OBJECT_TEMPLATES) + (list(world.AUGMENT_TWO_OBJECT_TEMPLATES) if augmented else [])
    obj = world.OBJECT_PHRASE
    return {
        "slots": slots(),
        "reads": {"templates": one + [t.replace("{o1}", obj).replace("{o2}", obj) for t in two], "words": words},
        "domain": {"words": words["shape"], "warning": WARNING},
    }


def write(model_dir: Path, augmented: bool) -> Path:
    path = Path(model_dir) / GUIDE_FILE
    path.write_text(json.dumps(prompt_guide(augmented), indent=1) + "\n")
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model_dir", type=Path)
    ap.add_argument("--augmented", action="store_true", help="the model was trained with the augmentation captions")
    args = ap.parse_args()
    print(f"wrote {write(args.model_dir, args.augmented)}")


if __name__ == "__main__":
    main()
