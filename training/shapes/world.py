"""A synthetic world of colored shapes on flat backgrounds, with captions: deterministic by seed, checkable by pixels.

A scene is one or two objects (shape, color, size, position) on a background color. `render` draws it at 128 x 128,
`caption` describes it with a training template or an unseen paraphrase, `is_held_out` says whether it holds an
attribute combination kept out of training. Everything here is plain data so the evaluator can check images directly.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

SIZE = 128  # image side in pixels
SUPERSAMPLE = 4  # drawn at 4x, box-filtered down: smooth edges

COLORS = {  # name -> RGB
    "red": (220, 40, 40), "orange": (245, 140, 30), "yellow": (240, 215, 40), "green": (40, 170, 70),
    "cyan": (40, 200, 215), "blue": (40, 80, 220), "purple": (140, 60, 185), "pink": (245, 135, 195),
    "white": (245, 245, 245), "black": (25, 25, 25),
}
SHAPES = ("circle", "square", "triangle", "star")
SIZES = {"small": 11.0, "medium": 18.0, "large": 28.0}  # half-extent of the shape in pixels
POSITIONS = {  # name -> (x, y) center in pixels
    "top left": (32, 32), "top": (64, 32), "top right": (96, 32),
    "left": (32, 64), "center": (64, 64), "right": (96, 64),
    "bottom left": (32, 96), "bottom": (64, 96), "bottom right": (96, 96),
}
# two-object layouts: positions far enough apart that small / medium objects never touch
PAIRS = (("left", "right"), ("top", "bottom"), ("top left", "bottom right"), ("top right", "bottom left"),
         ("top left", "top right"), ("bottom left", "bottom right"), ("top left", "bottom left"),
         ("top right", "bottom right"))
TWO_OBJECT_SIZES = ("small", "medium")
JITTER_PX, JITTER_SIZE, JITTER_COLOR = 3, 0.06, 10

# (color, shape) pairs that never appear in training, and backgrounds they never appear on either
HELD_OUT_PAIRS = frozenset({
    ("red", "star"), ("blue", "triangle"), ("green", "circle"), ("orange", "square"), ("purple", "circle"),
    ("pink", "triangle"), ("cyan", "star"), ("white", "square"), ("black", "triangle"), ("yellow", "circle"),
})


@dataclass(frozen=True)
class Obj:
    shape: str
    color: str
    size: str
    position: str


@dataclass(frozen=True)
class Scene:
    background: str
    objects: tuple[Obj, ...]


def is_held_out(scene: Scene) -> bool:
    """True when any object is a held-out (color, shape) combination."""
    return any((o.color, o.shape) in HELD_OUT_PAIRS for o in scene.objects)


def sample_scene(rng: np.random.Generator, split: str = "train", two_object_rate: float = 0.3) -> Scene:
    """A random scene; split "train" never holds a held-out combination, "heldout" always does (one object)."""
    if split not in ("train", "heldout"):
        raise ValueError(f"split must be 'train' or 'heldout', got {split!r}")
    colors = list(COLORS)
    while True:
        background = colors[rng.integers(len(colors))]
        if split == "train" and rng.random() < two_object_rate:
            pair = PAIRS[rng.integers(len(PAIRS))]
            if rng.random() < 0.5:
                pair = pair[::-1]
            objs = tuple(Obj(SHAPES[rng.integers(len(SHAPES))], colors[rng.integers(len(colors))],
                             TWO_OBJECT_SIZES[rng.integers(2)], p) for p in pair)
        else:
            objs = (Obj(SHAPES[rng.integers(len(SHAPES))], colors[rng.integers(len(colors))],
                        list(SIZES)[rng.integers(len(SIZES))], list(POSITIONS)[rng.integers(len(POSITIONS))]),)
        if any(o.color == background for o in objs):
            continue
        if (split == "heldout") != is_held_out(scene := Scene(background, objs)):
            continue
        return scene


# ---- rendering -----------------------------------------------------------------------------------

def shape_polygon(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]] | None:
    """Vertices of the shape centered at (cx, cy) with half-extent r; None for a circle."""
    if shape == "circle":
        return None
    if shape == "square":
        return [(cx - r, cy - r), (cx + r, cy - r), (cx + r, cy + r), (cx - r, cy + r)]
    if shape == "triangle":  # equilateral, pointing up, spanning 2r in height, centered on its box
        h = 2 * r
        half = h / math.sqrt(3)
        return [(cx, cy - r), (cx + half, cy + r), (cx - half, cy + r)]
    if shape == "star":  # five points, outer radius r * 1.1, inner 0.45 of it, one point up
        outer, inner = r * 1.1, r * 1.1 * 0.45
        pts = []
        for k in range(10):
            rad = outer if k % 2 == 0 else inner
            a = -math.pi / 2 + k * math.pi / 5
            pts.append((cx + rad * math.cos(a), cy + rad * math.sin(a) + r * 0.08))
        return pts
    raise ValueError(f"unknown shape {shape!r}; known: {SHAPES}")


def _jitter_color(rgb, rng, amount):
    if rng is None:
        return tuple(rgb)
    return tuple(int(np.clip(c + rng.integers(-amount, amount + 1), 0, 255)) for c in rgb)


def render(scene: Scene, rng: np.random.Generator | None = None) -> np.ndarray:
    """(128, 128, 3) uint8 RGB image of the scene; `rng` adds small jitter of position, size and color (None: exact)."""
    s = SUPERSAMPLE
    img = Image.new("RGB", (SIZE * s, SIZE * s), _jitter_color(COLORS[scene.background], rng, JITTER_COLOR))
    draw = ImageDraw.Draw(img)
    for o in scene.objects:
        cx, cy = POSITIONS[o.position]
        r = SIZES[o.size]
        if rng is not None:
            cx += rng.uniform(-JITTER_PX, JITTER_PX)
            cy += rng.uniform(-JITTER_PX, JITTER_PX)
            r *= 1 + rng.uniform(-JITTER_SIZE, JITTER_SIZE)
        fill = _jitter_color(COLORS[o.color], rng, JITTER_COLOR)
        poly = shape_polygon(o.shape, cx * s, cy * s, r * s)
        if poly is None:
            draw.ellipse([(cx - r) * s, (cy - r) * s, (cx + r) * s, (cy + r) * s], fill=fill)
        else:
            draw.polygon(poly, fill=fill)
    return np.asarray(img.resize((SIZE, SIZE), Image.BOX))


# ---- captions ------------------------------------------------------------------------------------

TRAIN_WORDS = {
    "size": {"small": ["small"], "medium": ["medium", "medium-sized"], "large": ["large", "big"]},
    "shape": {"circle": ["circle"], "square": ["square"], "triangle": ["triangle"], "star": ["star"]},
    "position": {
        "top left": ["at the top left", "in the top left corner"], "top": ["at the top", "at the top center"],
        "top right": ["at the top right", "in the top right corner"], "left": ["on the left", "at the left"],
        "center": ["in the center", "in the middle"], "right": ["on the right", "at the right"],
        "bottom left": ["at the bottom left", "in the bottom left corner"],
        "bottom": ["at the bottom", "at the bottom center"],
        "bottom right": ["at the bottom right", "in the bottom right corner"],
    },
}
TRAIN_TEMPLATES = (
    "a {size} {color} {shape} {position} on a {background} background",
    "{background} background, a {size} {color} {shape} {position}",
    "a {color} {shape} {position}, {size}, on a {background} background",
    "on a {background} background, a {size} {color} {shape} {position}",
    "a {size} {color} {shape} {position}. the background is {background}",
)
TWO_OBJECT_TEMPLATES = (
    "a {o1} and a {o2} on a {background} background",
    "{background} background, a {o1} and a {o2}",
)
OBJECT_PHRASE = "{size} {color} {shape} {position}"

COLOR_WORDS = {c: [c] for c in COLORS}  # training captions name colors (and backgrounds) by these words

# augmentation (training with --augment): synonyms and sentence forms that the augmented model was trained on, and
# that the prompt enhancer's instructions and examples may use; each caption mixes them with the words above
# the first augmentation vocabulary; the prompt enhancer's slot reader still reads with these (training/shapes/guide.py)
READER_AUGMENT_WORDS = {
    "size": {"small": ["tiny", "little", "small-sized"], "medium": ["mid-sized", "moderate", "medium-size"],
             "large": ["huge", "giant", "large-sized"]},
    "shape": {"circle": ["disk", "round dot", "dot"], "square": ["box", "block", "square shape"],
              "triangle": ["pyramid shape", "wedge", "triangle shape"],
              "star": ["five-pointed star", "starburst", "star shape"]},
    "position": {
        "top left": ["in the upper left corner", "top-left", "at the upper left"],
        "top": ["near the upper edge", "at the top edge", "up top"],
        "top right": ["in the upper right corner", "top-right", "at the upper right"],
        "left": ["at the left edge", "on the left side"],
        "center": ["right in the middle of the picture", "in the centre", "centered"],
        "right": ["at the right edge", "on the right side"],
        "bottom left": ["in the lower left corner", "bottom-left", "at the lower left"],
        "bottom": ["near the lower edge", "at the bottom edge", "down below"],
        "bottom right": ["in the lower right corner", "bottom-right", "at the lower right"],
    },
    "color": {"red": ["crimson", "scarlet"], "orange": ["tangerine", "amber"], "yellow": ["golden", "lemon"],
              "green": ["lime", "emerald"], "cyan": ["turquoise", "aqua"], "blue": ["navy", "azure"],
              "purple": ["violet", "grape"], "pink": ["rose", "fuchsia"], "white": ["snow-white", "ivory"],
              "black": ["jet-black", "charcoal"]},
}
READER_AUGMENT_TEMPLATES = (
    "{background} backdrop, {size} {color} {shape} {position}",
    "picture of a {size} {color} {shape} {position} against a {background} backdrop",
    "there is a {color} {shape}, {size}, {position}; everything else is {background}",
    "an image of a {size} {color} {shape} {position}, {background} background",
    "{size} {color} {shape} {position} over a {background} field",
)
READER_AUGMENT_TWO_OBJECT_TEMPLATES = (
    "{background} backdrop with a {o1} and a {o2}",
    "picture of a {o1} and a {o2} against a {background} backdrop",
)
# the wider vocabulary the shipped model was fine-tuned on (2026-11-28): more words for every value, more sentence
# forms; still disjoint from the evaluation's (EVAL_WORDS, EVAL_TEMPLATES)
_MORE_WORDS = {
    "size": {"small": ["wee", "diminutive", "smallish", "undersized", "compact"],
             "medium": ["middling", "mid-size", "regular-sized", "normal-sized", "intermediate-sized"],
             "large": ["gigantic", "oversized", "jumbo", "colossal", "hefty"]},
    "shape": {"circle": ["ball", "round shape", "circular shape", "bubble", "sphere"],
              "square": ["boxy shape", "square patch", "square panel", "square slab", "square tablet"],
              "triangle": ["triangular shape", "delta", "arrowhead", "triangular patch", "cone shape"],
              "star": ["starfish shape", "star symbol", "star icon", "spiky star", "twinkle"]},
    "position": {
        "top left": ["in the northwest corner", "up and to the left", "near the top left"],
        "top": ["top-center", "along the top", "at the top middle"],
        "top right": ["in the northeast corner", "up and to the right", "near the top right"],
        "left": ["at the middle left", "on the west side", "hugging the left edge", "left of center"],
        "center": ["smack in the middle", "at the center point", "in the central spot"],
        "right": ["at the middle right", "on the east side", "hugging the right edge", "right of center"],
        "bottom left": ["in the southwest corner", "down and to the left", "near the bottom left"],
        "bottom": ["bottom-center", "along the bottom", "at the bottom middle"],
        "bottom right": ["in the southeast corner", "down and to the right", "near the bottom right"],
    },
    "color": {"red": ["vermilion", "tomato-red", "brick-red"], "orange": ["carrot-orange", "mandarin", "bright orange"],
              "yellow": ["sunflower", "banana-yellow", "buttercup"], "green": ["leaf-green", "kelly green", "shamrock"],
              "cyan": ["bright cyan", "electric cyan", "caribbean"], "blue": ["royal blue", "ultramarine", "denim"],
              "purple": ["lilac", "orchid", "royal purple"], "pink": ["hot pink", "flamingo", "carnation"],
              "white": ["chalk-white", "alabaster", "bright white"], "black": ["onyx", "coal-black", "inky"]},
}
AUGMENT_WORDS = {kind: {v: READER_AUGMENT_WORDS[kind][v] + _MORE_WORDS[kind][v] for v in table}
                 for kind, table in READER_AUGMENT_WORDS.items()}
AUGMENT_TEMPLATES = READER_AUGMENT_TEMPLATES + (
    "show me a {size} {color} {shape} {position} on {background}",
    "render a {color} {shape} ({size}) {position} with {background} behind it",
    "a {background}-colored background with a {size} {color} {shape} {position}",
    "make a {size} {color} {shape} {position}. background: {background}",
    "{position} sits a {size} {color} {shape} on {background}",
    "paint a {size} {color} {shape} {position}, the background {background}",
    "a {size} {color} {shape}, placed {position}, on a solid {background} background",
    "create an image: {background} backdrop, {color} {shape}, {size}, {position}",
    "generate a {color} {shape} that is {size}, {position}, over {background}",
)
AUGMENT_TWO_OBJECT_TEMPLATES = READER_AUGMENT_TWO_OBJECT_TEMPLATES + (
    "show me a {o1} and a {o2} on {background}",
)
AUGMENT_RATE = 0.6  # share of augmented captions that use the augmentation templates and words at all

# held out of training AND of the prompt enhancer's instructions and examples: the evaluation's paraphrase split
# (other sentence forms, other words for size, shape and position) and synonym split (other color words)
EVAL_WORDS = {
    "size": {"small": ["minuscule", "petite"], "medium": ["average-sized", "moderately sized"],
             "large": ["enormous", "massive"]},
    "shape": {"circle": ["orb", "round disc"], "square": ["tile", "cube"],
              "triangle": ["three-sided shape", "three-cornered shape"], "star": ["pentagram", "five-pointed figure"]},
    "position": {
        "top left": ["in the upper-left area", "high up on the left"],
        "top": ["high up in the middle", "near the upper border"],
        "top right": ["in the upper-right area", "high up on the right"],
        "left": ["against the left border", "on the left-hand side"],
        "center": ["dead center", "in the very middle"],
        "right": ["against the right border", "on the right-hand side"],
        "bottom left": ["in the lower-left area", "low down on the left"],
        "bottom": ["low down in the middle", "near the lower border"],
        "bottom right": ["in the lower-right area", "low down on the right"],
    },
    "color": {"red": ["ruby", "cherry"], "orange": ["apricot", "pumpkin"], "yellow": ["canary", "mustard"],
              "green": ["jade", "grass-green"], "cyan": ["teal", "aquamarine"], "blue": ["cobalt", "sapphire"],
              "purple": ["plum", "amethyst"], "pink": ["bubblegum", "blush"], "white": ["pearl", "milk-white"],
              "black": ["ebony", "pitch-black"]},
}
EVAL_TEMPLATES = (
    "draw a {size} {color} {shape} {position} on a plain {background} canvas",
    "a {background} scene with one {size} {color} {shape} {position}",
    "{position}: a {size} {color} {shape}. the rest is {background}",
    "i would like a {color} {shape}, {size}, {position}, with a {background} background",
)
# what the old names meant: the paraphrase split's words and templates
PARAPHRASE_WORDS = {k: EVAL_WORDS[k] for k in ("size", "shape", "position")}
PARAPHRASE_TEMPLATES = EVAL_TEMPLATES
STYLES = ("train", "augmented", "paraphrase", "synonyms")


def _pick(options: list[str], rng: np.random.Generator) -> str:
    return options[rng.integers(len(options))]


def _articles(text: str) -> str:
    """"a orange" -> "an orange"."""
    return re.sub(r"\ba (?=[aeiou])", "an ", text)


def _word(kind: str, name: str, style: str, rng: np.random.Generator, augment: bool) -> str:
    """A phrase for attribute `name` of `kind` (size, shape, position, color) in a caption of `style`."""
    if style == "paraphrase" and kind != "color":
        return _pick(EVAL_WORDS[kind][name], rng)
    if style == "synonyms" and kind == "color":
        return _pick(EVAL_WORDS[kind][name], rng)
    if augment and rng.random() < 0.5:
        return _pick(AUGMENT_WORDS[kind][name], rng)
    if kind == "color":
        return name  # drawing no number: captions of the same seed stay as before colors had synonyms
    return _pick(TRAIN_WORDS[kind][name], rng)


def caption(scene: Scene, rng: np.random.Generator, style: str = "train") -> str:
    """A caption of the scene in one of STYLES: "train" (the training templates and words), "augmented" (training
    with augmentation: AUGMENT_RATE of captions mix in the augmentation templates and words), "paraphrase" (held-out
    templates and words for size, shape and position) or "synonyms" (training templates, held-out color words)."""
    if style not in STYLES:
        raise ValueError(f"style must be one of {STYLES}, got {style!r}")
    augment = style == "augmented" and rng.random() < AUGMENT_RATE

    def fields(o: Obj) -> dict:
        return {k: _word(k, getattr(o, k), style, rng, augment) for k in ("size", "color", "shape", "position")}

    background = _word("color", scene.background, style, rng, augment)
    if len(scene.objects) == 1:
        templates = {"paraphrase": EVAL_TEMPLATES}.get(style, TRAIN_TEMPLATES)
        if augment:
            templates = TRAIN_TEMPLATES + AUGMENT_TEMPLATES
        return _articles(_pick(list(templates), rng).format(background=background, **fields(scene.objects[0])))
    if style == "paraphrase":
        raise ValueError("paraphrase captions describe one-object scenes only")
    templates = TWO_OBJECT_TEMPLATES + (AUGMENT_TWO_OBJECT_TEMPLATES if augment else ())
    o1, o2 = (OBJECT_PHRASE.format(**fields(o)) for o in scene.objects)
    return _articles(_pick(list(templates), rng).format(background=background, o1=o1, o2=o2))


def training_caption(rng: np.random.Generator, augment: bool = False) -> tuple[str, Scene]:
    """(caption, scene) of a train-split scene, without rendering it (training_sample draws the same)."""
    scene = sample_scene(rng, "train")
    return caption(scene, rng, "augmented" if augment else "train"), scene


def training_sample(rng: np.random.Generator, augment: bool = False) -> tuple[np.ndarray, str, Scene]:
    """(image, caption, scene) for training: a train-split scene, jittered, with a training caption (`augment`:
    the augmented captions)."""
    scene = sample_scene(rng, "train")
    return render(scene, rng), caption(scene, rng, "augmented" if augment else "train"), scene


def eval_prompts(n_in: int = 200, n_heldout: int = 200, n_paraphrase: int = 100, seed: int = 1234,
                 n_synonyms: int = 0, n_two: int = 0) -> list[tuple[str, Scene, str]]:
    """(split, scene, prompt) rows for evaluation. Splits, in this order: "in-distribution" (train combinations, train
    templates), "held-out" (held-out combinations, train templates), "paraphrase" (train combinations, held-out
    templates and words), "synonyms" (train combinations, train templates, held-out color words) and "two objects"
    (two-object train scenes, train templates). Rows of the first three do not depend on the counts of the last two."""
    rng = np.random.default_rng(seed)
    rows = []
    for split, n, scene_split, style in (("in-distribution", n_in, "train", "train"),
                                          ("held-out", n_heldout, "heldout", "train"),
                                          ("paraphrase", n_paraphrase, "train", "paraphrase"),
                                          ("synonyms", n_synonyms, "train", "synonyms")):
        for _ in range(n):
            scene = sample_scene(rng, scene_split, two_object_rate=0.0)
            rows.append((split, scene, caption(scene, rng, style)))
    for _ in range(n_two):
        scene = sample_scene(rng, "train", two_object_rate=1.0)
        while len(scene.objects) != 2:
            scene = sample_scene(rng, "train", two_object_rate=1.0)
        rows.append(("two objects", scene, caption(scene, rng, "train")))
    return rows
