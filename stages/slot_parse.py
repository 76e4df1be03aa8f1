"""Reads a prompt into a model's attribute slots (objects with size, color, shape, position; a background), from the
vocabulary the model declares (stages/enhance_prompt.PromptGuide `slots`), and writes it back in the model's words.

Words the model knows are matched as whole phrases (longest first); a word that belongs to phrases of one value only
is a cue for it ("round" of "round dot": circle), positions are put together from their parts ("upper" + "left");
a hyphenated word is split only where one of its parts is known. Words it does not know go to an LLM of the
in-process runtime, with few-shot lines of the guide's example words:
- which slot a word names at all ("word = kind": size, color, shape or other; a word with the ending of the known
  words of one kind, "-sized", is of that kind), so that the sentence's other words ("please", "make") are never
  read as a size, and an unknown color word away from any background marker can still be the background;
- which value of that slot: the guide's frame per slot ("{word} means {value}."), scored over the closed list of
  values and calibrated against the answers to the model's own sentence words (small LLMs prefer some values
  whatever the word). A shape may be a phrase of up to 3 words after a color ("... shape": its head word).
Which color is the background comes from the words around it that the model knows ("... background", "the
backdrop is ..."), else from the distance to the shapes. Not the LLM itself nor the image model. Each word's answers
are kept (a few LLM calls for a new word, none for a word seen before).
"""
from __future__ import annotations

import re
import threading
from dataclasses import dataclass

import torch

KINDS = ("size", "color", "shape")  # object slots named by words; "position" is put together from its parts
_PUNCT = {",", ".", ";", ":", "!", "?"}


def tokens(text: str) -> list[str]:
    """Lower-case words (hyphens kept) and punctuation marks; "an" read as "a"."""
    words = re.findall(r"[a-z0-9'-]+|[^\sa-z0-9'-]", text.lower())
    return ["a" if w == "an" else w for w in words]


@dataclass
class Mention:
    start: int
    end: int  # token span [start, end)
    kind: str  # size, color, shape, position
    value: str  # a slot value; for position, a value or a part ("top", "bottom", "left", "right", "center")
    known: bool = True  # False: mapped by the LLM


class SlotReader:
    """A model's slot vocabulary (the guide's `slots` data) and, optionally, an LLM for the words it does not know."""

    def __init__(self, spec: dict, llm=None):
        self.spec, self.llm = spec, llm
        self.lexicon = spec["lexicon"]  # kind -> value -> phrases
        self.parts = {v: tuple(p) for v, p in spec["position_parts"].items()}  # position value -> its parts
        self.phrases = []  # (tokens, kind, value), longest first
        for kind, table in self.lexicon.items():
            for value, phrases in table.items():
                self.phrases += [(tuple(tokens(p)), kind, value) for p in phrases]
        self.phrases.sort(key=lambda p: -len(p[0]))
        self.cues = self._cues()
        self.suffixes = self._suffixes()
        # words of the known phrases of a kind that name none of its values ("shape" of "star shape"): a phrase's head
        self.heads = {w for toks, kind, _ in self.phrases if kind == "shape" for w in toks
                      if w not in self.cues and all(w != p for p2, k2, _ in self.phrases if k2 != "shape" for p in p2)}
        markers = spec.get("background_markers", {})
        self.after = [tuple(tokens(m)) for m in markers.get("after", [])]
        self.before = [tuple(tokens(m)) for m in markers.get("before", [])]
        # words the model knows that name no value (its sentences' other words, and those inside its phrases)
        self.known = set(spec.get("fillers", [])) | {w for p, _, _ in self.phrases for w in p}
        # a dictionary's words for the slot values (the guide's optional `thesaurus`), consulted before the LLM
        self.thesaurus = {p: (kind, value) for kind, table in spec.get("thesaurus", {}).items()
                          for value, phrases in table.items() for p in phrases}
        self._scores: dict = {}
        self._baseline: dict = {}
        self._scorers: dict = {}
        self._lock = threading.Lock()

    def _cues(self) -> dict[str, tuple[str, str]]:
        """word -> (kind, value) for words of the known phrases that belong to one value only; position words to
        the part (top, bottom, left, right, center) that at least two thirds of the position phrases holding them
        share."""
        seen: dict[str, set] = {}
        for toks, kind, value in self.phrases:
            for w in set(toks):
                seen.setdefault(w, set()).add((kind, value))
        cues = {}
        for w, owners in seen.items():
            kinds = {k for k, _ in owners}
            if len(kinds) != 1:
                continue
            kind = kinds.pop()
            values = [v for _, v in owners]
            if kind != "position":
                if len(values) == 1:
                    cues[w] = (kind, values[0])
                continue
            counts: dict[str, int] = {}
            for v in values:
                for part in self.parts[v] or ("center",):
                    counts[part] = counts.get(part, 0) + 1
            top = max(counts, key=counts.get)
            if counts[top] >= 2 * len(values) / 3 and list(counts.values()).count(counts[top]) == 1:
                cues[w] = ("position", top)  # e.g. "right": right in most of the position phrases holding it
        return cues

    def _suffixes(self) -> dict[str, str]:
        """"-sized" -> "size": the last parts of the known hyphenated words of one kind (an unknown word "x-sized"
        names a size; which one, the LLM says)."""
        seen: dict[str, set] = {}
        for toks, kind, _ in self.phrases:
            for w in toks:
                if "-" in w.strip("-") and kind != "position":
                    seen.setdefault("-" + w.rsplit("-", 1)[1], set()).add(kind)
        return {suf: kinds.pop() for suf, kinds in seen.items() if len(kinds) == 1}

    # ---- reading

    def mentions(self, toks: list[str]) -> tuple[list[Mention], list[int]]:
        """Known phrases and cue words, and the indices of the words left unknown (punctuation and fillers aside)."""
        found, unknown = [], []
        i = 0
        while i < len(toks):
            match = next(((len(p), k, v) for p, k, v in self.phrases if tuple(toks[i:i + len(p)]) == p), None)
            if match is not None:
                n, kind, value = match
                found.append(Mention(i, i + n, kind, value))
                i += n
                continue
            w = toks[i]
            if "-" in w.strip("-") and w not in self.cues and "-" + w.rsplit("-", 1)[1] not in self.suffixes and \
                    any(p in self.known or p in self.cues for p in w.split("-")):  # "upper-left": its parts
                toks[i:i + 1] = [p for p in w.split("-") if p]
                continue
            cue = self.cues.get(w)
            if cue is None:  # a word made from a cue ("moderate" + "ly")
                cue = next((kv for c, kv in self.cues.items() if len(c) >= 5 and w.startswith(c)
                            and kv[0] != "position"), None)
            if cue is not None:
                found.append(Mention(i, i + 1, *cue))
            elif w not in _PUNCT and w not in self.known:
                unknown.append(i)
            i += 1
        return found, unknown

    def read(self, prompt: str) -> dict | None:
        """{"objects": [{size, color, shape, position}], "background": color} read off the prompt (None: no shape)."""
        toks = tokens(prompt)
        found, unknown = self.mentions(toks)
        used = set()

        def take_unknown(near: int, kind: str, window) -> Mention | None:
            """The unknown word in `window` that the LLM maps onto `kind` (None without an LLM or a word). For a size,
            only words the LLM takes for a size word at all (not "please" or "make"), the likeliest one."""
            cands = [j for j in window if j in unknown and j not in used and 0 <= j < len(toks)]
            if not cands or self.llm is None:
                return None
            if kind == "size":  # a word likelier a size word than one of the sentence's other words
                cands = [j for j in cands if self._is_size(toks, j, [], unknown)]
                if not cands:
                    return None
            j = max(cands, key=lambda j: (self.kind_of(toks[j])[1].get(kind, 0.0), -abs(j - near)))
            used.add(j)
            return Mention(j, j + 1, kind, self.map_word(toks[j], kind)[0], known=False)

        shapes = [m for m in found if m.kind == "shape"][:2]
        colors = [m for m in found if m.kind == "color"]
        background = self._background(toks, colors, shapes, take_unknown)
        if not shapes:  # the words after a color (sizes aside), else any unknown word: the likeliest shape phrase
            if self.llm is None:
                return None
            spans, sized = [], set()
            for c in colors:
                j = self._next_word(toks, c.end, found) if c is not background else None
                k = j
                while k is not None and k < len(toks) and k - j < 3 and (k in unknown or toks[k] in self.heads):
                    k += 1
                if j is not None and any(i in unknown for i in range(j, k)):
                    spans.append((j, k))
                    if self._is_size(toks, c.start - 1, found, unknown):
                        sized.add((j, k))  # "a huge red ...": a size before the color, so an object's color
            spans = spans or [(j, j + 1) for j in unknown if j not in used]
            if not spans:
                return None
            # a phrase ending in a shape phrase's head word ("... shape") first, then one whose color has a size,
            # then the likeliest shape phrase
            j, k = max(spans, key=lambda sp: (toks[sp[1] - 1] in self.heads, sp in sized,
                                              self.kind_of(" ".join(toks[sp[0]:sp[1]]))[1]["shape"]))
            used.update(range(j, k))
            m = Mention(j, k, "shape", self.map_word(" ".join(toks[j:k]), "shape")[0], known=False)
            shapes = [m]
            if background is None:
                background = self._background(toks, colors, shapes, take_unknown)
        objects, near_colors = [], []
        for k, shape in enumerate(shapes):
            def near(kind: str) -> list[Mention]:
                return [m for m in found if m.kind == kind and m is not background
                        and min(range(len(shapes)), key=lambda s: _distance(m, shapes[s])) == k]

            obj = {"shape": shape.value}
            color = min(near("color"), key=lambda m: _distance(m, shape), default=None)
            near_colors.append(color)
            if color is None:  # the word before the shape (a size word aside)
                j = shape.start - 1
                while j >= 0 and any(m.kind == "size" and m.start <= j < m.end for m in found):
                    j -= 1
                color = take_unknown(shape.start, "color", range(j, j + 1))
            size = min(near("size"), key=lambda m: _distance(m, shape), default=None)
            if size is None:
                size = take_unknown(shape.start, "size", range(shape.start - 4, shape.end + 5))
            obj["color"] = color.value if color else None
            obj["size"] = size.value if size else None
            obj["position"] = self._position([m.value for m in near("position")])
            objects.append(obj)
        if background is None and len(shapes) == 1 and not [c for c in colors if c not in near_colors]:
            # no color left that the model knows: an unknown word the LLM takes for a color, farthest from the shape
            cands = [j for j in unknown if j not in used and self.kind_of(toks[j])[0] == "color"]
            j = max(cands, key=lambda j: abs(j - shapes[0].start), default=None)
            background = take_unknown(j, "color", [j]) if j is not None else None
        return {"objects": objects, "background": background.value if background else None}

    def _is_size(self, toks, j, found, unknown) -> bool:
        """Whether token j is a size word (known, or an unknown word the LLM takes for one)."""
        if any(m.kind == "size" and m.start <= j < m.end for m in found):
            return True
        return j in unknown and self.llm is not None and \
            self.kind_of(toks[j])[1]["size"] > self.kind_of(toks[j])[1]["other"]

    def _next_word(self, toks: list[str], j: int, found: list[Mention]) -> int | None:
        while j < len(toks) and any(m.kind == "size" and m.start <= j < m.end for m in found):
            j += 1
        return j if j < len(toks) and toks[j] not in _PUNCT else None

    def _background(self, toks, colors, shapes, take_unknown) -> Mention | None:
        """The background color: a color (known, or an unknown word the LLM maps) next to a background marker, else
        the known color farthest from every shape word when there are more colors than objects need."""
        for m in colors:
            if any(tuple(toks[m.end:m.end + len(a)]) == a for a in self.after) or \
                    any(tuple(toks[max(0, m.start - len(b)):m.start]) == b for b in self.before):
                return m
        for a in self.after:
            for j in range(len(toks)):
                if tuple(toks[j + 1:j + 1 + len(a)]) == a:
                    if (m := take_unknown(j, "color", range(j, j + 1))) is not None:
                        return m
        for b in self.before:
            for j in range(len(b), len(toks)):
                if tuple(toks[j - len(b):j]) == b:
                    if (m := take_unknown(j, "color", range(j, j + 1))) is not None:
                        return m
        if not shapes or len(colors) <= len(shapes):
            return None
        return max(colors, key=lambda m: min(_distance(m, s) for s in shapes))

    def _position(self, values: list[str]) -> str | None:
        """A position value from the position phrases and parts near an object (None: none named)."""
        if not values:
            return None
        parts = [p for v in values for p in (self.parts.get(v, (v,)) if v != "center" else ())]
        vertical = next((p for p in parts if p in ("top", "bottom")), None)
        horizontal = next((p for p in parts if p in ("left", "right")), None)
        name = " ".join(p for p in (vertical, horizontal) if p) or "center"
        return name if name in self.parts else "center"

    # ---- the LLM, one word or phrase at a time

    def looked_up(self, phrase: str) -> tuple[str, str] | None:
        """(kind, value) of a phrase in the guide's thesaurus: the whole phrase, else its longest first words that are
        there ("delta toward": "delta"; "circular shape": "circular")."""
        words = phrase.split()
        for n in range(len(words), 0, -1):
            if (found := self.thesaurus.get(" ".join(words[:n]))) is not None:
                return found
        return None

    def kind_of(self, phrase: str) -> tuple[str, dict[str, float]]:
        """(kind, {kind: log-probability}): which slot an unknown phrase names (size, color, shape) or "other": the
        thesaurus's kind, else a word with the ending of the known words of one kind ("-sized") is of that kind, else
        by few-shot "word = kind" lines (uncalibrated: the examples are balanced)."""
        key = (phrase, "kind")
        with self._lock:
            if key not in self._scores:
                suffix = self.suffixes.get("-" + phrase.rsplit("-", 1)[1]) if "-" in phrase else None
                kinds = sorted({k for _, k in self.spec["kind_examples"]} | set(KINDS))
                if (found := self.looked_up(phrase)) is not None:
                    suffix = found[0]
                if suffix is not None:
                    self._scores[key] = (suffix, {k: 0.0 if k == suffix else float("-inf") for k in kinds})
                else:
                    if "kind" not in self._scorers:
                        shots = "".join(f"{w} = {k}\n" for w, k in self.spec["kind_examples"])
                        self._scorers["kind"] = PrefixScorer(self.llm, shots)
                    s = torch.log_softmax(self._scorers["kind"].score(f"{phrase} =", kinds), 0)
                    self._scores[key] = (kinds[int(s.argmax())], dict(zip(kinds, s.tolist())))
            return self._scores[key]

    def map_word(self, word: str, kind: str) -> tuple[str, float]:
        """(value, calibrated log-probability) of `word` read as a `kind` value: the thesaurus's value (log-probability
        0), else by the LLM."""
        key = (word, kind)
        found = self.looked_up(word)
        if found is not None and found[0] == kind:
            return found[1], 0.0
        with self._lock:
            if key not in self._scores:
                values = list(self.lexicon[kind])
                frames = self.spec.get("word_frames", {}).get(kind, ["{word} = {value}"])
                s = 0
                for n, frame in enumerate([frames] if isinstance(frames, str) else frames):
                    query = frame[:frame.index("{value}")].rstrip()
                    if (kind, n) not in self._scorers:  # the few-shot lines run once per frame, the baseline too
                        shots = "".join(frame.format(word=w, value=v) + "\n"
                                        for w, v in self.spec["word_examples"][kind])
                        scorer = self._scorers[kind, n] = PrefixScorer(self.llm, shots)
                        # the answers to words that name no value (the model's sentence words), averaged
                        neutral = [w for w in self.spec.get("fillers", []) if len(w) > 2] or ["it"]
                        self._baseline[kind, n] = torch.stack([torch.log_softmax(scorer.score(
                            query.format(word=w), values), 0) for w in neutral]).mean(0)
                    s = s + torch.log_softmax(self._scorers[kind, n].score(query.format(word=word), values), 0) \
                        - self._baseline[kind, n]
                best = int(s.argmax())
                self._scores[key] = (values[best], float(s[best]))
            return self._scores[key]

    # ---- writing

    def write(self, read: dict) -> str:
        """The model's own sentence for what was read; unnamed slots take the declared defaults."""
        answer = self.spec["answer"]
        defaults = self.spec["defaults"]
        objects = read["objects"]
        colors = [o["color"] for o in objects]
        background = read["background"]
        if background is None or background in colors:
            background = next(c for c in defaults["background"] if c not in colors)
        fields = {"background": answer.get("phrases", {}).get("background", {}).get(background, background)}
        for k, obj in enumerate(objects, 1):
            for slot in ("size", "color", "shape", "position"):
                value = obj.get(slot) or defaults.get(slot)
                if value is None:  # an object color named nowhere: one that is not the background
                    value = next(c for c in defaults["background"][::-1] if c != background)
                fields[f"{slot}{k}"] = answer.get("phrases", {}).get(slot, {}).get(value, value)
        return answer["one" if len(objects) == 1 else "two"].format(**fields)


def _distance(a: Mention, b: Mention) -> int:
    return b.start - a.end + 1 if a.end <= b.start else a.start - b.end + 1 if b.end <= a.start else 0


class PrefixScorer:
    """Scores closed lists of continuations after a fixed prefix (the few-shot lines) with a gen.llm.LLM's model: the
    prefix runs once into a KV cache of our own; each call runs its own text and then every option from a copy."""

    def __init__(self, llm, prefix: str):
        self.llm = llm
        self.n = len(self.ids(prefix))
        self.head = self._run(self.ids(prefix), None, 0)[1] if self.n else None
        self.prefix = prefix

    def ids(self, text: str) -> list[int]:
        return self.llm.tokenizer(text, add_special_tokens=False)["input_ids"]

    def _run(self, ids: list[list[int]] | list[int], cache, offset: int, room: int = 0):
        """Log-probs (B, T, V) after each token of `ids` (one row, or equal-length rows), and the cache holding them."""
        model, dev = self.llm.model, self.llm.device
        rows = ids if ids and isinstance(ids[0], list) else [ids]
        b, t = len(rows), len(rows[0])
        new = model.new_cache(b, offset + t + room, dev, self.llm.dtype)
        if cache is not None:
            new.k[:, :, :, :offset] = cache.k[:, :1, :, :offset]
            new.v[:, :, :, :offset] = cache.v[:, :1, :, :offset]
        pos = (offset + torch.arange(t, device=dev))[None].expand(b, t)
        h, _ = model(torch.tensor(rows, device=dev), pos, torch.ones(b, offset + t, dtype=torch.bool, device=dev),
                     new, offset)
        return torch.log_softmax(model.compute_logits(h), dim=-1).cpu(), new

    @torch.inference_mode()
    def score(self, text: str, options: list[str]) -> torch.Tensor:
        """log P(" " + option | prefix + text), summed over each option's tokens."""
        ids = self.ids(self.prefix + text)[self.n:]  # the text's tokens as they fall after the prefix
        lp, cache = self._run(ids, self.head, self.n)
        first = lp[0, -1]
        opts = [self.ids(" " + o) for o in options]
        width = max(map(len, opts))
        rows = [o + [o[-1]] * (width - len(o)) for o in opts]  # padding after an option is never read
        lp, _ = self._run(rows, cache, self.n + len(ids))
        return torch.stack([first[o[0]] + sum(lp[i, j - 1, o[j]] for j in range(1, len(o)))
                            for i, o in enumerate(opts)])
