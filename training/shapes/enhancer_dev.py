"""The prompt enhancer's own development set, and a text-level measurement of the slot reader (stages/slot_parse.py).

The evaluation's held-out words and sentence forms (world.EVAL_*) measure how the enhancer generalizes, so they are
never used to choose its mechanisms or examples: this set of other synonyms and sentence forms that people use is
(tests/test_enhancer_dev.py checks that it shares no word with the evaluation's held-out ones, nor with the guide's
few-shot examples). `measure` reads prompts with the enhancer and compares the sentence it writes with the scene.

    python -m training.shapes.enhancer_dev [--show-errors]          # the development set: what tuning looks at
    python -m training.shapes.enhancer_dev --splits dev paraphrase synonyms in-distribution   # the evaluation's
        # prompts at text level: measured once a change is final, never while choosing it
"""
from __future__ import annotations

import argparse
import re
import time
from collections import Counter

import numpy as np

from training.shapes import world

DEV_WORDS = {
    "size": {"small": ["wee", "teeny", "miniature", "diminutive", "undersized", "pint-sized", "mini", "compact",
                       "itty-bitty", "pocket-sized"],
             "medium": ["mid-size", "normal-sized", "regular-sized", "middle-sized", "ordinary-sized", "midsize",
                        "standard-sized", "intermediate", "middling", "typical-sized"],
             "large": ["gigantic", "colossal", "immense", "oversized", "jumbo", "vast", "mammoth", "hefty", "titanic",
                       "king-size"]},
    "shape": {"circle": ["ball", "ring", "sphere", "circular shape", "round shape", "bubble", "coin", "wheel", "globe",
                         "loop"],
              "square": ["rectangle", "quadrilateral", "squarish shape", "crate", "brick", "slab", "rectangular shape",
                         "panel", "checker", "boxy shape"],
              "triangle": ["pyramid", "arrowhead", "triangular shape", "delta", "cone", "tent", "spike",
                           "triangular thing", "pennant", "arrow tip"],
              "star": ["starfish", "sparkle", "starlike shape", "star-shaped thing", "asterisk", "twinkle",
                       "sheriff badge", "spiky shape", "starry shape", "stellar shape"]},
    "position": {
        "top left": ["in the upper corner on the left", "toward the top left", "up and to the left",
                     "in the northwest corner"],
        "top": ["along the top", "up at the top", "near the top edge", "at the upper middle"],
        "top right": ["in the upper corner on the right", "toward the top right", "up and to the right",
                      "in the northeast corner"],
        "left": ["toward the left", "at the far left", "by the left edge", "off to the left"],
        "center": ["in the middle of the image", "smack in the middle", "at the center", "in the exact center"],
        "right": ["toward the right", "at the far right", "by the right edge", "off to the right"],
        "bottom left": ["in the lower corner on the left", "toward the bottom left", "down and to the left",
                        "in the southwest corner"],
        "bottom": ["along the bottom", "down at the bottom", "near the bottom edge", "at the lower middle"],
        "bottom right": ["in the lower corner on the right", "toward the bottom right", "down and to the right",
                         "in the southeast corner"],
    },
    "color": {"red": ["tomato", "strawberry", "blood-red", "brick-red", "firetruck"],
              "orange": ["carrot", "marmalade", "clementine", "rust", "orange-colored"],
              "yellow": ["banana", "butter", "sunflower", "lemon-yellow", "dandelion"],
              "green": ["mint", "forest-green", "moss", "olive", "leaf-green"],
              "cyan": ["seafoam", "cyan-colored", "lagoon", "sky-cyan", "ice-blue"],
              "blue": ["royal-blue", "denim", "ultramarine", "indigo", "blueberry"],
              "purple": ["lavender", "lilac", "eggplant", "mauve", "orchid"],
              "pink": ["salmon", "flamingo", "hot-pink", "magenta", "peach-pink"],
              "white": ["snow", "chalk", "alabaster", "cream", "paper-white"],
              "black": ["coal", "ink", "onyx", "soot", "midnight-black"]},
}
DEV_TEMPLATES = (
    "please make a {size} {color} {shape} {position}, {background} backdrop",
    "a {size} {color} {shape} sits {position} on a {background} surface",
    "{position} there's a {size} {color} {shape}; the backdrop is {background}",
    "show me a {color} {shape} that is {size}, placed {position}, all on {background}",
    "a {background} wall with a {size} {color} {shape} {position}",
    "{size} {color} {shape}, {position}, everything around it {background}",
    "create a {size} {color} {shape} {position} set against {background}",
    "on {background} paper, a {size} {color} {shape} {position}",
    "paint a {size} {color} {shape} {position} over {background}",
    "the background should be {background}, with a {size} {color} {shape} {position}",
    "generate a {size} {color} {shape}. put it {position}. use {background} for the background",
    "my picture needs a {color} {shape} {position}; make it {size} and the background {background}",
)
SLOTS = ("size", "color", "shape", "position")


def dev_prompts(n: int = 200, seed: int = 7) -> list[tuple[world.Scene, str]]:
    """(scene, prompt) pairs: one-object train-split scenes described with the dev words and sentence forms (half of
    the prompts keep the plain color names, so that colors and sentence forms are measured apart too)."""
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(n):
        scene = world.sample_scene(rng, "train", two_object_rate=0.0)
        o = scene.objects[0]
        plain_colors = rng.random() < 0.5

        def word(kind: str, value: str) -> str:
            if kind == "color" and plain_colors:
                return value
            options = DEV_WORDS[kind][value]
            return options[rng.integers(len(options))]

        fields = {k: word(k, getattr(o, k)) for k in SLOTS}
        template = DEV_TEMPLATES[rng.integers(len(DEV_TEMPLATES))]
        rows.append((scene, world._articles(template.format(background=word("color", scene.background), **fields))))
    return rows


def words(text: str) -> set[str]:
    """The words of a text and the parts of its hyphenated words (template fields left out)."""
    found = set(re.findall(r"[a-z0-9'-]+", re.sub(r"\{\w+\}", " ", text.lower())))
    return found | {p for w in found for p in w.split("-") if p}


def held_out_words() -> set[str]:
    """Words of the evaluation's held-out phrases and sentence forms that the training and augmentation captions
    never use: what the enhancer must not be shown."""
    def of(tables, templates) -> set[str]:
        out = set()
        for table in tables:
            for phrases in table.values():
                for ps in phrases.values():
                    out |= set().union(*map(words, ps))
        return out.union(*map(words, templates))

    held = of([world.EVAL_WORDS], world.EVAL_TEMPLATES)
    known = of([world.TRAIN_WORDS, world.AUGMENT_WORDS], world.TRAIN_TEMPLATES + world.AUGMENT_TEMPLATES
               + world.TWO_OBJECT_TEMPLATES + world.AUGMENT_TWO_OBJECT_TEMPLATES) | set(world.COLORS)
    return {w for w in held - known if not all(p in known for p in w.split("-"))}


def parse_answer(text: str) -> world.Scene | None:
    """The scene of a sentence in the guide's answer form (None: another sentence)."""
    from training.shapes.guide import CANONICAL_POSITIONS

    position_of = {v: k for k, v in CANONICAL_POSITIONS.items()}
    obj = r"(small|medium|large) (\w+) (circle|square|triangle|star) (" + "|".join(position_of) + ")"
    m = re.fullmatch(rf"a {obj}(?: and a {obj})? on an? (\w+) background", text)
    if m is None:
        return None
    g = m.groups()
    objs = [world.Obj(g[2], g[1], g[0], position_of[g[3]])]
    if g[4]:
        objs.append(world.Obj(g[6], g[5], g[4], position_of[g[7]]))
    return world.Scene(g[8], tuple(objs))


def measure(reader, rows, show_errors: bool = False) -> Counter:
    """Counts of prompts whose written sentence gets each slot (and all of them) right."""
    c = Counter()
    for scene, prompt in rows:
        c["n"] += 1
        read = reader.read(prompt)
        got = None if read is None else parse_answer(reader.write(read))
        want = scene.objects[0]
        if got is None or len(got.objects) != 1:
            if show_errors:
                print(f"  unread: {prompt!r}")
            continue
        ok = True
        for slot in SLOTS:
            if getattr(got.objects[0], slot) == getattr(want, slot):
                c[slot] += 1
            else:
                ok = False
                if show_errors:
                    print(f"  {slot}: {prompt!r} -> {getattr(got.objects[0], slot)}, want {getattr(want, slot)}")
        if got.background == scene.background:
            c["background"] += 1
        else:
            ok = False
            if show_errors:
                print(f"  background: {prompt!r} -> {got.background}, want {scene.background}")
        c["all"] += ok
    return c


def main() -> None:
    from stages.enhance_prompt import PromptGuide, load_enhancer, slot_reader
    from training.shapes.configs import MODEL_DIR
    from training.shapes.export import ASSETS

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--splits", nargs="+", default=["dev"],
                    choices=["dev", "paraphrase", "synonyms", "in-distribution"],
                    help="dev (default): the development set; the others: the evaluation's splits, measured only")
    ap.add_argument("--show-errors", action="store_true")
    args = ap.parse_args()
    guide = PromptGuide.load(ASSETS / MODEL_DIR)
    reader = slot_reader(load_enhancer(None, "cpu", None), guide)
    rows = {"dev": dev_prompts()}
    for split, scene, prompt in world.eval_prompts(200, 200, 100, seed=1234, n_synonyms=100):
        rows.setdefault(split, []).append((scene, prompt))
    print(f"{'split':16} {'n':>4} {'all':>5} " + " ".join(f"{s:>10}" for s in SLOTS + ("background",)) + "  ms/prompt")
    for split in args.splits:
        if split == "in-distribution":  # the enhancer keeps these as they are
            kept = sum(guide.read_as_is(p) for _, p in rows[split])
            print(f"{split:16} {len(rows[split]):4} kept unchanged: {kept}/{len(rows[split])}")
            continue
        if args.show_errors:
            print(split)
        t = time.perf_counter()
        c = measure(reader, rows[split], args.show_errors)
        ms = (time.perf_counter() - t) * 1e3 / c["n"]
        print(f"{split:16} {c['n']:4} {100 * c['all'] / c['n']:4.0f}% "
              + " ".join(f"{100 * c[s] / c['n']:9.0f}%" for s in SLOTS + ("background",)) + f"  {ms:9.1f}")


if __name__ == "__main__":
    main()
