"""The text encoder, cut down to what training needs, small enough to travel to the GPU machine.

Training reads SmolLM2 hidden states of layer ENCODER_LAYER for the training captions only. The pack keeps the first
ENCODER_LAYER decoder layers as their raw GGUF blocks (dequantized there by the `gguf` package, so the weights are
bit-identical to the full file's) and only the embedding rows of tokens the training captions use; everything the
training captions never touch is left out. `python -m training.shapes.encoder_pack OUT_DIR` writes it;
`load_pack(OUT_DIR, device)` rebuilds an `gen.llm.LLM` whose hidden state ENCODER_LAYER equals the full model's.
"""
from __future__ import annotations

import argparse
import re
from pathlib import Path

import numpy as np
import torch

from training.shapes.configs import ENCODER_LAYER, PROMPT_TEMPLATE
from training.shapes.world import (PARAPHRASE_TEMPLATES, PARAPHRASE_WORDS, TRAIN_TEMPLATES, TWO_OBJECT_TEMPLATES,
                                 training_sample)

PACK_FILE = "encoder.pt"


def caption_vocabulary(tokenizer, n_samples: int = 20000, seed: int = 0) -> list[int]:
    """Token ids of the templated training captions (sampled) plus the unconditional prompt."""
    rng = np.random.default_rng(seed)
    ids = set(tokenizer(PROMPT_TEMPLATE.format(""), add_special_tokens=False)["input_ids"])
    for _ in range(n_samples):
        _, text, _ = training_sample(rng)
        ids.update(tokenizer(PROMPT_TEMPLATE.format(text), add_special_tokens=False)["input_ids"])
    return sorted(ids)


def pack(out_dir: Path, layers: int = ENCODER_LAYER) -> dict:
    import gguf

    from gen.llm.gguf import NAMES, hf_config, smollm2_path, tokenizer_from_gguf

    reader = gguf.GGUFReader(str(smollm2_path()))
    cfg = hf_config(reader)
    tokenizer = tokenizer_from_gguf(reader)
    vocab = caption_vocabulary(tokenizer)
    patterns = [(re.compile("^" + re.escape(g).replace(r"\{\}", r"(\d+)") + "$"), h) for g, h in NAMES.items()]
    raw = {}
    for t in reader.tensors:
        hf = next((h.format(*m.groups()) for p, h in patterns if (m := p.match(t.name))), None)
        layer = re.match(r"model\.layers\.(\d+)\.", hf or "")
        if layer and int(layer.group(1)) >= layers:
            continue
        if hf == "model.embed_tokens.weight":
            rows = np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32)[vocab]
            embed = torch.from_numpy(np.array(rows, copy=True))
            continue
        raw[hf] = (int(t.tensor_type), torch.from_numpy(np.array(t.data, copy=True)))
    cfg = dict(cfg, num_hidden_layers=layers, tie_word_embeddings=True)
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.save({"config": cfg, "raw": raw, "vocab": torch.tensor(vocab), "embed_rows": embed}, out_dir / PACK_FILE)
    tokenizer.save_pretrained(str(out_dir))
    return {"layers": layers, "vocab": len(vocab), "bytes": (out_dir / PACK_FILE).stat().st_size}


def load_pack(folder: Path, device, dtype=torch.float32):
    """An LLM of the first `layers` SmolLM2 layers; embedding rows outside the caption vocabulary are zero."""
    import gguf
    from transformers import AutoTokenizer

    from gen.llm import LLM
    from gen.llm.gguf import unpermute
    from gen.llm.loader import build_model, load_state

    data = torch.load(folder / PACK_FILE, weights_only=False)
    cfg = data["config"]
    state = {}
    for hf, (qtype, blob) in data["raw"].items():
        w = np.asarray(gguf.quants.dequantize(blob.numpy(), gguf.GGMLQuantizationType(qtype)), dtype=np.float32)
        if ".q_proj." in hf:
            w = unpermute(w, cfg["num_attention_heads"])
        elif ".k_proj." in hf:
            w = unpermute(w, cfg["num_key_value_heads"])
        state[hf] = torch.from_numpy(np.array(w, copy=True))
    embed = torch.zeros(cfg["vocab_size"], cfg["hidden_size"])
    embed[data["vocab"]] = data["embed_rows"]
    state["model.embed_tokens.weight"] = embed
    model = build_model(cfg, device, dtype)
    load_state(model, {k: v.to(device=device, dtype=dtype) for k, v in state.items()}, True)
    model.model.norm = torch.nn.Identity()  # the full model's hidden state `layers` is the raw, un-normed output
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    llm = LLM.from_parts(model, tokenizer, cfg, {"eos_token_id": cfg["eos_token_id"]}, device, dtype, compile_decode=False)
    llm.vocab = set(data["vocab"].tolist())
    return llm


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--layers", type=int, default=ENCODER_LAYER)
    print(pack(ap.parse_args().out, ap.parse_args().layers))


if __name__ == "__main__":
    main()
