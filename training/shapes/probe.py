"""How much of an unseen paraphrase can be read from the text encoder's states at all? A supervised probe.

gen-shapes' DiT reads SmolLM2's layer-12 states of "Picture: " + prompt. Without the enhancer it gets 37% of the
evaluation's paraphrase split all right (docs/SHAPES-EVAL.md), against a 70% target. This measures the ceiling any
reader of those states could reach when trained only on the training and augmentation vocabulary: a small
attention readout (LayerNorm, a linear to 192, one transformer layer, one learned query per attribute) trained with
cross-entropy on the attributes of augmented training captions (one object), then tested on the evaluation's
paraphrase and synonym captions (words and sentence forms it never saw) and on training-style captions.

It runs on the CPU in about two minutes a configuration (the captions are encoded through gen.llm, the same states
the model reads). `--layers` compares other hidden layers; `--more-words` adds a second, larger augmentation
vocabulary (MORE_WORDS below, 12 more words per size and shape, 5 per position and color, 8 sentence forms; none
is, or holds, an evaluation word: tests/test_shapes_world.py) to see whether more synonyms would teach a reader to
generalize.

    python -m training.shapes.probe --layers 12 --train 1500 --seeds 0 1
"""
from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from training.shapes import world
from training.shapes.reader import encode

ATTRIBUTES = {"size": list(world.SIZES), "shape": list(world.SHAPES), "position": list(world.POSITIONS),
              "color": list(world.COLORS), "background": list(world.COLORS)}

MORE_WORDS = {
    "size": {
        "small": ["teeny", "itty-bitty", "mini", "miniature", "pint-sized", "pocket-sized", "slight", "bite-sized",
                  "dainty", "microscopic", "very small", "smaller"],
        "medium": ["middle-sized", "ordinary-sized", "standard-sized", "typical-sized", "fair-sized", "medium-scale",
                   "moderate-sized", "in-between sized", "usual-sized", "reasonably sized", "not too big",
                   "modest-sized"],
        "large": ["immense", "vast", "mammoth", "hulking", "king-sized", "towering", "giant-sized", "sizable",
                  "bulky", "whopping", "tremendous", "humongous"]},
    "shape": {
        "circle": ["round blob", "circular disk", "bead", "coin", "coin shape", "globe", "spot", "polka dot",
                   "roundel", "button", "full moon", "marble"],
        "square": ["quadrate", "square block", "box shape", "plaque", "square card", "square sticker", "brick",
                   "square box", "square plate", "square stamp", "squared shape", "checkerboard square"],
        "triangle": ["trigon", "triangular block", "pyramid", "spike", "tent shape", "pennant", "arrow tip",
                     "wedge shape", "yield sign", "peak", "mountain shape", "triangular sign"],
        "star": ["sheriff star", "star badge", "star sticker", "shooting star", "spiked star", "pointy star",
                 "stellar shape", "sparkle", "twinkling star", "star emblem", "star sign", "star stamp"]},
    "position": {
        "top left": ["toward the top left", "up in the left corner", "at the northwest", "in the top left quadrant",
                     "at the top left spot"],
        "top": ["toward the top", "up at the top", "at the upper edge", "at the north side", "in the top middle"],
        "top right": ["toward the top right", "up in the right corner", "at the northeast",
                      "in the top right quadrant", "at the top right spot"],
        "left": ["toward the left", "over on the left", "at the west side", "in the left middle",
                 "along the left edge"],
        "center": ["at the center", "in the centre of the image", "at the midpoint", "in the middle of the frame",
                   "centrally"],
        "right": ["toward the right", "over on the right", "at the east side", "in the right middle",
                  "along the right edge"],
        "bottom left": ["toward the bottom left", "down in the left corner", "at the southwest",
                        "in the bottom left quadrant", "at the bottom left spot"],
        "bottom": ["toward the bottom", "down at the bottom", "at the lower edge", "at the south side",
                   "in the bottom middle"],
        "bottom right": ["toward the bottom right", "down in the right corner", "at the southeast",
                         "in the bottom right quadrant", "at the bottom right spot"]},
    "color": {
        "red": ["blood-red", "fire-engine red", "strawberry", "rust-red", "cardinal"],
        "orange": ["tangerine-orange", "orange-colored", "marigold", "persimmon", "burnt orange"],
        "yellow": ["lemon-yellow", "daffodil", "saffron", "yolk-yellow", "sunshine"],
        "green": ["forest green", "emerald green", "clover", "pea-green", "moss"],
        "cyan": ["sky-cyan", "aqua-blue", "ice blue", "robin's egg", "glacier"],
        "blue": ["navy blue", "indigo", "cornflower", "midnight blue", "cerulean"],
        "purple": ["violet-purple", "lavender", "mauve", "grape-purple", "eggplant"],
        "pink": ["rosy", "salmon", "baby pink", "magenta", "peony"],
        "white": ["snowy", "cream-white", "paper-white", "frost-white", "cotton"],
        "black": ["jet", "soot-black", "midnight", "raven", "obsidian"]},
}
MORE_TEMPLATES = (
    "please make a {size} {color} {shape} {position}; {background} background",
    "{color} {shape}, {size}, {position}, {background} backdrop",
    "a picture with a {size} {color} {shape} {position} and a {background} background",
    "{background} all around, with a {size} {color} {shape} {position}",
    "i want a {size} {color} {shape} {position} on a {background} background",
    "one {size} {color} {shape} {position}, {background} behind",
    "a {size} {color} {shape} is {position}; the background is {background}",
    "{position}, a {size} {color} {shape} over a {background} background",
)


def captions(n: int, style: str, seed: int) -> list[tuple[str, world.Scene]]:
    rng = np.random.default_rng(seed)
    out = []
    while len(out) < n:
        scene = world.sample_scene(rng, "train", two_object_rate=0.0)
        out.append((world.caption(scene, rng, style), scene))
    return out


def labels(scenes: list[world.Scene]) -> dict[str, torch.Tensor]:
    return {k: torch.tensor([ATTRIBUTES[k].index(s.background if k == "background" else getattr(s.objects[0], k))
                             for s in scenes]) for k in ATTRIBUTES}


class Probe(nn.Module):
    def __init__(self, dim: int, width: int = 192):
        super().__init__()
        self.norm = nn.LayerNorm(dim, elementwise_affine=False)
        self.proj = nn.Linear(dim, width)
        self.layer = nn.TransformerEncoderLayer(width, 4, 2 * width, dropout=0.1, batch_first=True)
        self.queries = nn.Parameter(torch.randn(len(ATTRIBUTES), width) * 0.02)
        self.read = nn.MultiheadAttention(width, 4, batch_first=True)
        self.heads = nn.ModuleList([nn.Linear(width, len(v)) for v in ATTRIBUTES.values()])

    def forward(self, hidden: torch.Tensor, mask: torch.Tensor) -> list[torch.Tensor]:
        x = self.layer(self.proj(self.norm(hidden)), src_key_padding_mask=~mask)
        read, _ = self.read(self.queries.expand(len(hidden), -1, -1), x, x, key_padding_mask=~mask)
        return [head(read[:, i]) for i, head in enumerate(self.heads)]


def train_and_test(train, tests, seed: int, steps: int = 1500) -> dict:
    torch.manual_seed(seed)
    hidden, mask, y = train
    probe = Probe(hidden.shape[-1])
    opt = torch.optim.AdamW(probe.parameters(), 1e-3, weight_decay=0.01)
    for _ in range(steps):
        idx = torch.randint(0, len(hidden), (128,))
        loss = sum(F.cross_entropy(o, y[k][idx]) for o, k in zip(probe(hidden[idx], mask[idx]), ATTRIBUTES))
        opt.zero_grad()
        loss.backward()
        opt.step()
    probe.eval()
    result = {}
    with torch.no_grad():
        for name, (h, m, yt) in tests.items():
            right = {k: o.argmax(-1) == yt[k] for o, k in zip(probe(h, m), ATTRIBUTES)}
            row = {k: round(v.float().mean().item() * 100, 1) for k, v in right.items()}
            row["all"] = round(torch.stack(list(right.values())).all(0).float().mean().item() * 100, 1)
            result[name] = row
    return result


def main() -> None:
    from component_loaders.gguf_encoder import gguf_path
    from gen.llm import registry
    from training.shapes.configs import TEXT_ENCODER

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, nargs="+", default=[12], help="hidden layers read (several: concatenated)")
    ap.add_argument("--train", type=int, default=1500, help="augmented training captions")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="one probe trained per seed")
    ap.add_argument("--more-words", action="store_true", help="add MORE_WORDS / MORE_TEMPLATES to the augmentation")
    ap.add_argument("--out", help="JSON results")
    args = ap.parse_args()
    llm = registry.get_llm(gguf_path(TEXT_ENCODER["package"], TEXT_ENCODER["file"]), torch.device("cpu"),
                           torch.float32)
    if args.more_words:
        for kind, table in MORE_WORDS.items():
            for value, words in table.items():
                world.AUGMENT_WORDS[kind][value] = world.AUGMENT_WORDS[kind][value] + words
        world.AUGMENT_TEMPLATES = world.AUGMENT_TEMPLATES + MORE_TEMPLATES
    start = time.time()
    world.AUGMENT_RATE = 0.8
    train_rows = captions(args.train, "augmented", 1)
    test_rows = {"paraphrase": captions(400, "paraphrase", 99), "synonyms": captions(300, "synonyms", 98),
                 "training style": captions(300, "train", 97)}
    layer = args.layers if len(args.layers) > 1 else args.layers[0]
    train = (*encode(llm, [t for t, _ in train_rows], layer), labels([s for _, s in train_rows]))
    tests = {k: (*encode(llm, [t for t, _ in v], layer), labels([s for _, s in v])) for k, v in test_rows.items()}
    print(f"encoded {args.train + 1000} captions in {time.time() - start:.0f} s", flush=True)
    results = {seed: train_and_test(train, tests, seed) for seed in args.seeds}
    for seed, res in results.items():
        print(f"layers {args.layers} more words {args.more_words} seed {seed}: " +
              "; ".join(f"{name} all {r['all']} (size {r['size']}, shape {r['shape']}, position {r['position']}, "
                        f"color {r['color']})" for name, r in res.items()))
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"args": vars(args), "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
