"""Train gen-shapes' prompt reader (gen/models/prompt_reader.py) on the CPU and write it beside the text encoder.

The reader reads SmolLM2's layer-12 states of "Picture: " + prompt (the states the DiT reads) into the scene's
attributes and the number of objects. It is trained on the augmented training captions only (world.AUGMENT_*: the
vocabulary the DiT was fine-tuned on; one- and two-object scenes, the attributes taken from one-object captions),
with cross-entropy; a position's row and column have heads of their own too (POSITION_FACTORS), and 20% of the
captions have random vocabulary words in some attributes' places, those attributes unlabelled (slot noise).
Configurations are chosen on the enhancer's development set (training/shapes/enhancer_dev.py), split into its words
the augmentation also uses ("dev seen") and the rest ("dev unseen": other words for size, shape and position, plain
color names, the development sentence forms: built like the evaluation's paraphrase split, with none of its words;
"dev synonyms": training sentences with its color words). The evaluation's own prompts are read only with
`--measure-eval`, once the reader is final.

    python -m training.shapes.reader --cache /tmp/reader.pt --json docs/shapes/reader.json \
        --out assets/gen-shapes/text_encoder        # ~17 min on 2 cores (8,000 captions encoded, 10 members)
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from gen.models.prompt_reader import COUNT, SAID, PromptReader, PromptReaderConfig, pack_state
from training.shapes import world
from training.shapes.configs import ENCODER_LAYER, PROMPT_TEMPLATE

VALUES = {"size": list(world.SIZES), "color": list(world.COLORS), "shape": list(world.SHAPES),
          "position": list(world.POSITIONS), "background": list(world.COLORS)}
SENTENCE = "a {size} {color} {shape} {position} on a {background} background"  # the guide's one-object answer


# a position's row and column, read apart as well (unless `--no-factors`): "up and to the left" is "top" and "left"
POSITION_FACTORS = {
    "row": {p: p.split()[0] if p.split()[0] in ("top", "bottom") else "middle" for p in world.POSITIONS},
    "column": {p: p.split()[-1] if p.split()[-1] in ("left", "right") else "center" for p in world.POSITIONS},
}


def reader_config(members: int, width: int = 128, heads: int = 4, factors: bool = False) -> PromptReaderConfig:
    from training.shapes.guide import CANONICAL_POSITIONS

    phrases = {k: {v: v for v in vs} for k, vs in VALUES.items()}
    phrases["position"] = dict(CANONICAL_POSITIONS)
    return PromptReaderConfig(hidden_size=576, hidden_layer=ENCODER_LAYER, width=width, num_attention_heads=heads,
                              members=members, heads={**VALUES, COUNT: ["1", "2"]}, phrases=phrases,
                              sentence=SENTENCE, optional=dict(OPTIONAL),
                              factors={"position": POSITION_FACTORS} if factors else {})


# what a prompt that does not name them reads as: the enhancer's defaults (a white shape goes on black)
OPTIONAL = {"size": ["medium"], "position": ["center"], "background": ["white", "black"]}


@dataclasses.dataclass(frozen=True)
class Partial(world.Scene):
    """A scene of a caption that leaves `unsaid` attributes out (their values are the scene's, unnamed)."""

    unsaid: frozenset = frozenset()
    unknown: frozenset = frozenset()  # attributes named by a word that is not theirs (slot noise): no value label


def noise_words() -> list[str]:
    """Whole-word lowercase tokens of the text encoder's vocabulary (4-10 letters), without the world's words and
    the development and evaluation words: the words slot noise puts where an attribute's word was."""
    from component_loaders.gguf_encoder import gguf_path
    from gen.llm.gguf import gguf_field, open_gguf
    from training.shapes import enhancer_dev
    from training.shapes.configs import TEXT_ENCODER

    _, r = open_gguf(Path(gguf_path(TEXT_ENCODER["package"], TEXT_ENCODER["file"])))
    known = {w for table in (world.AUGMENT_WORDS, world.EVAL_WORDS, enhancer_dev.DEV_WORDS)
             for t in table.values() for ws in t.values() for phrase in ws for w in enhancer_dev.words(phrase)}
    known |= {w for t in world.TRAIN_WORDS.values() for ws in t.values() for phrase in ws for w in phrase.split()}
    known |= set(world.COLORS) | set(world.SHAPES) | set(world.SIZES)
    words = [t[1:] for t in gguf_field(r, "tokenizer.ggml.tokens")
             if t.startswith("\u0120") and t[1:].isalpha() and t[1:].islower() and 4 <= len(t) - 1 <= 10]
    return sorted({w for w in words if w not in known})


def partial_caption(scene: world.Scene, rng: np.random.Generator) -> tuple[str, world.Scene]:
    """A short caption that leaves out some of size, position and background ("a red circle", "a small red circle
    on a blue background", ...; training and augmentation words), and its scene with those marked unsaid."""
    omit = {k for k in OPTIONAL if rng.random() < 0.5} or set(OPTIONAL)
    if len(scene.objects) > 1:
        omit.discard("background")

    def phrase(o: world.Obj) -> str:
        words = [world._word(k, getattr(o, k), "augmented", rng, True) for k in ("size", "color", "shape", "position")]
        return " ".join(w for k, w in zip(("size", "color", "shape", "position"), words) if k not in omit)

    text = "a " + " and a ".join(phrase(o) for o in scene.objects)
    if "background" not in omit:
        text += f" on a {world._word('color', scene.background, 'augmented', rng, True)} background"
    return world._articles(text), Partial(scene.background, scene.objects, frozenset(omit))


def noisy_caption(scene: world.Scene, rng: np.random.Generator, words: list[str],
                  rate: float) -> tuple[str, world.Scene]:
    """A one-object caption in the augmented templates and words, each attribute's word replaced by a random
    vocabulary word with probability `rate` (at least one), and its scene with those marked unknown."""
    o = scene.objects[0]
    slots = ("size", "color", "shape", "position", "background")
    noisy = {k for k in slots if rng.random() < rate} or {slots[rng.integers(len(slots))]}

    def word(k: str) -> str:
        if k in noisy:
            return words[rng.integers(len(words))]
        if k == "background":
            return world._word("color", scene.background, "augmented", rng, True)
        return world._word(k, getattr(o, k), "augmented", rng, True)

    fields = {k: word(k) for k in slots}
    templates = world.TRAIN_TEMPLATES + world.AUGMENT_TEMPLATES
    text = world._articles(templates[rng.integers(len(templates))].format(**fields))
    return text, Partial(scene.background, scene.objects, unknown=frozenset(noisy))


def training_rows(n: int, seed: int, two_object_rate: float = 0.25, partial_rate: float = 0.15,
                  noise_rate: float = 0.0, noise_slot: float = 0.2,
                  words: list[str] | None = None) -> list[tuple[str, world.Scene]]:
    """Augmented captions of train-split scenes (AUGMENT_RATE raised so most use the augmentation vocabulary),
    `partial_rate` of short ones that leave attributes out (partial_caption) and `noise_rate` of one-object ones with
    random words in some attributes' places (noisy_caption, each attribute with probability `noise_slot`). The rows
    without noise are the same for every `noise_rate` (the noisy ones come from a second generator)."""
    rng = np.random.default_rng(seed)
    noise_rng = np.random.default_rng(seed + 10_000)
    rate = world.AUGMENT_RATE
    world.AUGMENT_RATE = 0.8
    try:
        rows = []
        while len(rows) < n:
            if noise_rate and noise_rng.random() < noise_rate:
                scene = world.sample_scene(noise_rng, "train", two_object_rate=0.0)
                rows.append(noisy_caption(scene, noise_rng, words, noise_slot))
                continue
            scene = world.sample_scene(rng, "train", two_object_rate=two_object_rate)
            if rng.random() < partial_rate:
                rows.append(partial_caption(scene, rng))
            else:
                rows.append((world.caption(scene, rng, "augmented"), scene))
        return rows
    finally:
        world.AUGMENT_RATE = rate


def dev_rows(n: int = 300, seed: int = 7) -> dict[str, list[tuple[str, world.Scene]]]:
    """The development set, split by whether the augmentation vocabulary holds its words."""
    from training.shapes import enhancer_dev

    seen = {w for table in world.AUGMENT_WORDS.values() for ps in table.values() for w in ps}
    unseen_words = {k: {v: [w for w in ws if w not in seen] for v, ws in t.items()}
                    for k, t in enhancer_dev.DEV_WORDS.items()}
    rng = np.random.default_rng(seed)
    rows = {"dev seen": [], "dev unseen": []}
    for scene, prompt in enhancer_dev.dev_prompts(n, seed):
        rows["dev seen"].append((prompt, scene))
    while len(rows["dev unseen"]) < n:
        scene = world.sample_scene(rng, "train", two_object_rate=0.0)
        o = scene.objects[0]
        fields = {k: getattr(o, k) if k == "color" else
                  unseen_words[k][getattr(o, k)][rng.integers(len(unseen_words[k][getattr(o, k)]))]
                  for k in ("size", "color", "shape", "position")}
        template = enhancer_dev.DEV_TEMPLATES[rng.integers(len(enhancer_dev.DEV_TEMPLATES))]
        rows["dev unseen"].append((world._articles(template.format(background=scene.background, **fields)), scene))
    # the synonym split's kind: training sentences and words, color words that neither training nor the
    # augmentation uses (the development set's)
    colors = {v: [w for w in ws if w not in seen] for v, ws in enhancer_dev.DEV_WORDS["color"].items()}
    rows["dev synonyms"] = []
    while len(rows["dev synonyms"]) < n // 3:
        scene = world.sample_scene(rng, "train", two_object_rate=0.0)
        o = scene.objects[0]
        fields = {k: world._word(k, getattr(o, k), "train", rng, False) for k in ("size", "shape", "position")}
        color, background = (colors[c][rng.integers(len(colors[c]))] for c in (o.color, scene.background))
        template = world.TRAIN_TEMPLATES[rng.integers(len(world.TRAIN_TEMPLATES))]
        rows["dev synonyms"].append((world._articles(template.format(background=background, color=color, **fields)),
                                     scene))
    rows["dev two objects"] = []
    while len(rows["dev two objects"]) < n // 3:
        scene = world.sample_scene(rng, "train", two_object_rate=1.0)
        if len(scene.objects) == 2:
            rows["dev two objects"].append((world.caption(scene, rng, "augmented"), scene))
    return rows


def labels(scenes: list[world.Scene], factors: bool = False) -> dict[str, torch.Tensor]:
    """Per output head (in PromptReaderConfig.outputs order) the value index per scene; -100 (ignored) for the
    attributes of two-object scenes and for the values a partial caption leaves unsaid or names by a noise word."""
    out = {}
    unsaid = [getattr(s, "unsaid", frozenset()) | getattr(s, "unknown", frozenset()) for s in scenes]
    for k, values in VALUES.items():
        out[k] = torch.tensor([-100 if len(s.objects) != 1 or k in u else values.index(
            s.background if k == "background" else getattr(s.objects[0], k)) for s, u in zip(scenes, unsaid)])
    out[COUNT] = torch.tensor([len(s.objects) - 1 for s in scenes])
    unsaid = [getattr(s, "unsaid", frozenset()) for s in scenes]
    for k in OPTIONAL:
        out[k + SAID] = torch.tensor([-100 if len(s.objects) != 1 else int(k not in u) for s, u in zip(scenes, unsaid)])
    if factors:
        for f, m in POSITION_FACTORS.items():
            values = list(dict.fromkeys(m.values()))
            out[f"position {f}"] = torch.tensor([-100 if y < 0 else values.index(m[VALUES["position"][y]])
                                                 for y in out["position"].tolist()])
    return out


def pad_cat(parts: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """(hidden (B, ..., T, D), mask (B, T)) parts padded to the longest T and concatenated; the mask as bool."""
    t = max(h.shape[-2] for h, _ in parts)
    return (torch.cat([F.pad(h, (0, 0, 0, t - h.shape[-2])) for h, _ in parts]),
            torch.cat([F.pad(m, (0, t - m.shape[1])) for _, m in parts]).bool())


def encode(llm, texts: list[str], layer: int | list[int] = ENCODER_LAYER) -> tuple[torch.Tensor, torch.Tensor]:
    """The encoder's states of "Picture: " + each text at `layer` (several: training/shapes/probe.py), 64 a batch."""
    parts = []
    for i in range(0, len(texts), 64):
        out = llm.encode([PROMPT_TEMPLATE.format(t) for t in texts[i:i + 64]], hidden_layer=layer)
        parts.append((out.hidden, out.mask))
    return pad_cat(parts)


def train_member(member, data, seed: int, steps: int, lr: float = 1e-3, batch: int = 128,
                 token_drop: float = 0.0) -> None:
    """AdamW with a one-cycle schedule on random batches; `token_drop`: share of a one-object caption's tokens
    (after the template's first three) hidden from the reader in each step, so that it reads more than one cue."""
    torch.manual_seed(seed)
    hidden, mask, y = data
    member.train()
    opt = torch.optim.AdamW(member.parameters(), lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, lr, total_steps=steps, pct_start=0.1)
    names = list(y)
    for _ in range(steps):
        idx = torch.randint(0, len(hidden), (batch,))
        m = mask[idx]
        drop = (torch.rand(m.shape) < token_drop) & m & (y[COUNT][idx] == 0)[:, None]
        drop[:, :3] = False
        outs = member(hidden[idx], m & ~drop)
        loss = sum(F.cross_entropy(o, y[k][idx], ignore_index=-100) for o, k in zip(outs, names))
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    member.eval()


def accuracy(reader: PromptReader, hidden, mask, scenes) -> dict:
    """Percent right per attribute and all at once (one-object scenes), and read as one object."""
    rows = reader.read(hidden, mask)
    if all(len(s.objects) == 2 for s in scenes):
        return {"read as two objects": round(100 * float(np.mean([r[COUNT][0] == "2" for r in rows])), 1)}
    right = {k: [] for k in VALUES}
    ones = []
    if reader.config.factors:  # the position head alone and its factors alone, beside the product read
        probs = reader.probabilities(hidden, mask)
        names = list(reader.config.outputs)
        alone = [VALUES["position"][j] for j in probs[names.index("position")].argmax(-1).tolist()]
        fs = {f: [list(dict.fromkeys(m.values()))[j] for j in probs[names.index(f"position {f}")].argmax(-1).tolist()]
              for f, m in POSITION_FACTORS.items()}
        by_factors = [next(p for p in VALUES["position"] if all(POSITION_FACTORS[f][p] == fs[f][i] for f in fs))
                      for i in range(len(rows))]
        right["position alone"] = [a == s.objects[0].position for a, s in zip(alone, scenes)]
        right["position factors"] = [a == s.objects[0].position for a, s in zip(by_factors, scenes)]
    for r, s in zip(rows, scenes):
        o = s.objects[0]
        ones.append(r[COUNT][0] == "1")
        for k in VALUES:
            right[k].append(r[k][0] == (s.background if k == "background" else getattr(o, k)))
    res = {k: round(100 * float(np.mean(v)), 1) for k, v in right.items()}
    res["all"] = round(100 * float(np.mean([all(x) for x in zip(*(right[k] for k in VALUES))])), 1)
    res["one object"] = round(100 * float(np.mean(ones)), 1)
    return res


def vote_sizes(reader: PromptReader, sizes: list[int], cache: dict, rows: dict) -> dict:
    """Per k in `sizes`, "all" on each development split for 8 random k-member subsets of `reader` (one for k =
    all of them): mean, min and max."""
    rng, n, out = np.random.default_rng(0), len(reader.members), {}
    for k in sizes:
        subsets = [list(range(n))] if k == n else [sorted(rng.choice(n, k, replace=False)) for _ in range(8)]
        per = {split: [] for split in rows if split not in ("train", "dev two objects")}
        for sub in subsets:
            part = PromptReader(PromptReaderConfig(**{**reader.config.to_dict(), "members": k}))
            part.members = torch.nn.ModuleList([reader.members[i] for i in sub])
            part.eval()
            for split in per:
                per[split].append(accuracy(part, *cache[split]["states"], [s for _, s in rows[split]])["all"])
        out[k] = {split: {"mean": round(float(np.mean(v)), 1), "min": min(v), "max": max(v)} for split, v in per.items()}
        print(f"vote of {k} (of {n}): " + "; ".join(f"{s} {v['mean']} ({v['min']}-{v['max']})" for s, v in out[k].items()),
              flush=True)
    return out


def save(reader: PromptReader, folder: Path) -> None:
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    save_file(pack_state(reader.state_dict()), str(folder / "reader.safetensors"))  # int8 matrices: small
    (folder / "reader_config.json").write_text(json.dumps(reader.config.to_dict(), indent=1) + "\n")


def main() -> None:
    from component_loaders.gguf_encoder import gguf_path
    from gen.llm import registry
    from training.shapes.configs import TEXT_ENCODER

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--train", type=int, default=8000, help="augmented training captions")
    ap.add_argument("--members", type=int, default=10, help="independently trained members that vote")
    ap.add_argument("--vote-sizes", default="",
                    help="also the vote of k of the members (comma-separated k; 8 random subsets each, seeded): how "
                         "much more members gain")
    ap.add_argument("--steps", type=int, default=1200, help="optimizer steps per member")
    ap.add_argument("--width", type=int, default=128)
    ap.add_argument("--token-drop", type=float, default=0.0)
    ap.add_argument("--no-factors", dest="factors", action="store_false",
                    help="no heads for a position's row and column")
    ap.add_argument("--noise", type=float, default=0.2,
                    help="share of training captions with random words in some attributes' places (slot noise)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--cache", help="a .pt file keeping the encoded captions between runs")
    ap.add_argument("--out", help="the text_encoder folder to write reader.safetensors and reader_config.json into")
    ap.add_argument("--measure-eval", action="store_true",
                    help="also read the evaluation's paraphrase and synonym prompts (only once the reader is final)")
    ap.add_argument("--json", help="write the accuracies here")
    args = ap.parse_args()
    torch.set_num_threads(2)
    start = time.time()
    rows = {"train": training_rows(args.train, 1, noise_rate=args.noise,
                                   words=noise_words() if args.noise else None), **dev_rows()}
    if args.measure_eval:
        for split, scene, prompt in world.eval_prompts(200, 200, 100, seed=1234, n_synonyms=100):
            if split in ("paraphrase", "synonyms"):
                rows.setdefault(f"eval {split}", []).append((prompt, scene))
    cache = torch.load(args.cache) if args.cache and Path(args.cache).is_file() else {}
    missing = [k for k in rows if k not in cache or cache[k]["texts"] != [t for t, _ in rows[k]]]
    if missing:
        llm = registry.get_llm(gguf_path(TEXT_ENCODER["package"], TEXT_ENCODER["file"]), torch.device("cpu"),
                               torch.float32)
        for k in missing:
            texts = [t for t, _ in rows[k]]
            have = cache.get(k, {"texts": []})
            n = len(have["texts"])
            if 0 < n < len(texts) and texts[:n] == have["texts"]:  # more of the same rows: encode the rest only
                states = pad_cat([have["states"], encode(llm, texts[n:])])
            else:
                states = encode(llm, texts)
            cache[k] = {"texts": texts, "states": states}
        if args.cache:
            torch.save(cache, args.cache)
    print(f"encoded in {time.time() - start:.0f} s", flush=True)
    cfg = reader_config(args.members, args.width, factors=args.factors)
    reader = PromptReader(cfg)
    data = (*cache["train"]["states"], labels([s for _, s in rows["train"]], factors=args.factors))
    results = {}
    for i, member in enumerate(reader.members):
        t = time.time()
        train_member(member, data, args.seed * 1000 + i, args.steps, token_drop=args.token_drop)
        one = PromptReader(PromptReaderConfig(**{**cfg.to_dict(), "members": 1}))
        one.members[0] = member
        per = {k: accuracy(one, *cache[k]["states"], [s for _, s in rows[k]]) for k in rows if k != "train"}
        results[f"member {i}"] = per
        print(f"member {i} ({time.time() - t:.0f} s): " + "; ".join(f"{k} {v.get('all', v)}" for k, v in per.items()),
              flush=True)
    reader.eval()
    results["vote"] = {k: accuracy(reader, *cache[k]["states"], [s for _, s in rows[k]]) for k in rows if k != "train"}
    for k, v in results["vote"].items():
        print(f"vote of {args.members}, {k}: {v}")
    results["vote sizes"] = vote_sizes(reader, [int(k) for k in args.vote_sizes.split(",") if k], cache, rows)
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "results": results}, indent=1) + "\n")
    if args.out:
        save(reader, Path(args.out))
        print(f"wrote {args.out}/reader.safetensors")


if __name__ == "__main__":
    main()
