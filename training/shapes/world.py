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

# unseen paraphrases: words and templates that never occur in training captions
PARAPHRASE_WORDS = {
    "size": {"small": ["tiny", "little"], "medium": ["mid-sized", "moderate"], "large": ["huge", "giant"]},
    "shape": {"circle": ["disk", "round dot"], "square": ["box", "block"], "triangle": ["pyramid shape", "wedge"],
              "star": ["five-pointed star", "starburst"]},
    "position": {
        "top left": ["in the upper left corner"], "top": ["near the upper edge"], "top right": ["in the upper right corner"],
        "left": ["at the left edge"], "center": ["right in the middle of the picture"], "right": ["at the right edge"],
        "bottom left": ["in the lower left corner"], "bottom": ["near the lower edge"],
        "bottom right": ["in the lower right corner"],
    },
}
PARAPHRASE_TEMPLATES = (
    "{background} backdrop, {size} {color} {shape} {position}",
    "picture of a {size} {color} {shape} {position} against a {background} backdrop",
    "there is a {color} {shape}, {size}, {position}; everything else is {background}",
)


def _pick(options: list[str], rng: np.random.Generator) -> str:
    return options[rng.integers(len(options))]


def _articles(text: str) -> str:
    """"a orange" -> "an orange"."""
    return re.sub(r"\ba (?=[aeiou])", "an ", text)


def caption(scene: Scene, rng: np.random.Generator, style: str = "train") -> str:
    """A caption of the scene: style "train" (training templates and words) or "paraphrase" (unseen ones)."""
    if style not in ("train", "paraphrase"):
        raise ValueError(f"style must be 'train' or 'paraphrase', got {style!r}")
    words = TRAIN_WORDS if style == "train" else PARAPHRASE_WORDS

    def fields(o: Obj) -> dict:
        return {"size": _pick(words["size"][o.size], rng), "color": o.color,
                "shape": _pick(words["shape"][o.shape], rng), "position": _pick(words["position"][o.position], rng)}

    if len(scene.objects) == 1:
        templates = TRAIN_TEMPLATES if style == "train" else PARAPHRASE_TEMPLATES
        return _articles(_pick(list(templates), rng).format(background=scene.background, **fields(scene.objects[0])))
    if style != "train":
        raise ValueError("paraphrase captions describe one-object scenes only")
    o1, o2 = (OBJECT_PHRASE.format(**fields(o)) for o in scene.objects)
    return _articles(_pick(list(TWO_OBJECT_TEMPLATES), rng).format(background=scene.background, o1=o1, o2=o2))


def training_sample(rng: np.random.Generator) -> tuple[np.ndarray, str, Scene]:
    """(image, caption, scene) for training: a train-split scene, jittered, with a training caption."""
    scene = sample_scene(rng, "train")
    return render(scene, rng), caption(scene, rng, "train"), scene


def eval_prompts(n_in: int = 200, n_heldout: int = 200, n_paraphrase: int = 100, seed: int = 1234
                 ) -> list[tuple[str, Scene, str]]:
    """(split, scene, prompt) rows for evaluation; all one-object scenes. Splits: "in-distribution" (train
    combinations, train templates), "held-out" (held-out combinations, train templates) and "paraphrase" (train
    combinations, unseen templates and words)."""
    rng = np.random.default_rng(seed)
    rows = []
    for split, n, scene_split, style in (("in-distribution", n_in, "train", "train"),
                                          ("held-out", n_heldout, "heldout", "train"),
                                          ("paraphrase", n_paraphrase, "train", "paraphrase")):
        for _ in range(n):
            scene = sample_scene(rng, scene_split, two_object_rate=0.0)
            rows.append((split, scene, caption(scene, rng, style)))
    return rows
