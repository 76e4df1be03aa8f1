"""The text encoder, cut down to what training needs, in pieces small enough to travel to the GPU machine.

Training reads SmolLM2 hidden states of layer ENCODER_LAYER for the training captions only. The pack keeps the first
ENCODER_LAYER decoder layers as their raw GGUF blocks (Q4_1, dequantized here by `dequantize`, bit for bit what the
gguf package computes, so the states are those of the full file) and only the embedding rows of tokens the training
captions use (augmented captions included). The layers weigh 26.5 MB, more than one device call can carry beside the
repository, so the pack is written in `parts` pieces (the layers split between them; the config, embedding rows and
tokenizer in the last): `python -m training.shapes.encoder_pack OUT_DIR` writes OUT_DIR/part-0, part-1, ...;
`load_pack([part folders], device)` rebuilds an `gen.llm.LLM` whose hidden state ENCODER_LAYER equals the full
model's. Needs the gguf package to write, not to load.
"""
from __future__ import annotations

import argparse
import lzma
import re
import tempfile
from pathlib import Path

import numpy as np
import torch

from training.shapes.configs import ENCODER_LAYER, PROMPT_TEMPLATE
from training.shapes.world import training_caption

PACK_FILE = "encoder.pt"
Q4_1, Q8_0, F32 = 3, 8, 0  # gguf GGMLQuantizationType values


def caption_vocabulary(tokenizer, n_samples: int = 200_000, seed: int = 0) -> list[int]:
    """Token ids of sampled training captions, plain and augmented, plus the unconditional prompt."""
    rng = np.random.default_rng(seed)
    ids = set(tokenizer(PROMPT_TEMPLATE.format(""), add_special_tokens=False)["input_ids"])
    texts = {PROMPT_TEMPLATE.format(training_caption(rng, augment=k % 2 == 1)[0]) for k in range(n_samples)}
    for row in tokenizer(sorted(texts), add_special_tokens=False)["input_ids"]:
        ids.update(row)
    return sorted(ids)


def dequantize(qtype: int, blob: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """float32 weights of raw GGUF blocks (Q4_1, Q8_0 or F32), the arithmetic of gguf.quants."""
    raw = np.ascontiguousarray(blob).view(np.uint8)
    if qtype == F32:
        return raw.view(np.float32).reshape(shape).copy()
    if qtype == Q4_1:  # 32 weights: f16 scale d, f16 minimum m, 16 bytes of nibbles (low: 0-15, high: 16-31)
        b = raw.reshape(-1, 20)
        d = b[:, 0:2].copy().view(np.float16).astype(np.float32)
        m = b[:, 2:4].copy().view(np.float16).astype(np.float32)
        qs = b[:, 4:]
        q = np.concatenate([qs & np.uint8(0x0F), qs >> np.uint8(4)], axis=1).astype(np.float32)
        return ((d * q) + m).reshape(shape)
    if qtype == Q8_0:  # 32 weights: f16 scale d, 32 int8
        b = raw.reshape(-1, 34)
        d = b[:, 0:2].copy().view(np.float16).astype(np.float32)
        return (b[:, 2:].copy().view(np.int8).astype(np.float32) * d).reshape(shape)
    raise ValueError(f"GGUF tensor type {qtype} is not one the pack handles (Q4_1, Q8_0, F32)")


def pack(out_dir: Path, layers: int = ENCODER_LAYER, parts: int = 3) -> dict:
    import gguf

    from gen.llm.gguf import NAMES, hf_config, smollm2_path, tokenizer_from_gguf

    reader = gguf.GGUFReader(str(smollm2_path()))
    cfg = hf_config(reader)
    tokenizer = tokenizer_from_gguf(reader)
    vocab = caption_vocabulary(tokenizer)
    patterns = [(re.compile("^" + re.escape(g).replace(r"\{\}", r"(\d+)") + "$"), h) for g, h in NAMES.items()]
    pieces: list[dict] = [{} for _ in range(parts)]
    embed = None
    for t in reader.tensors:
        hf = next((h.format(*m.groups()) for p, h in patterns if (m := p.match(t.name))), None)
        layer = re.match(r"model\.layers\.(\d+)\.", hf or "")
        if layer and int(layer.group(1)) >= layers:
            continue
        shape = tuple(int(n) for n in reversed(t.shape))  # GGUF lists the fastest axis first
        if hf == "model.embed_tokens.weight":
            rows = dequantize(int(t.tensor_type), np.array(t.data), shape)[vocab]
            embed = torch.from_numpy(np.array(rows, copy=True))
            continue
        if layer is None:
            continue  # the final norm and the output head: training stops at layer `layers`
        part = int(layer.group(1)) * parts // layers
        pieces[part][hf] = (int(t.tensor_type), shape, torch.from_numpy(np.array(t.data, copy=True)))
    cfg = dict(cfg, num_hidden_layers=layers, tie_word_embeddings=True)
    sizes = []
    for k, raw in enumerate(pieces):
        folder = out_dir / f"part-{k}"
        folder.mkdir(parents=True, exist_ok=True)
        data = {"raw": raw, "part": k, "parts": parts}
        if k == parts - 1:
            with tempfile.TemporaryDirectory() as tmp:  # the tokenizer's files, xz-compressed (3.5 MB -> ~1 MB)
                tokenizer.save_pretrained(tmp)
                files = {f.name: lzma.compress(f.read_bytes()) for f in Path(tmp).iterdir() if f.is_file()}
            data |= {"config": cfg, "vocab": torch.tensor(vocab), "embed_rows": embed, "tokenizer": files}
        torch.save(data, folder / PACK_FILE)
        sizes.append(sum(f.stat().st_size for f in folder.iterdir()))
    return {"layers": layers, "vocab": len(vocab), "part_bytes": sizes}


def load_pack(folders: list[Path], device, dtype=torch.float32):
    """An LLM of the first `layers` SmolLM2 layers from every part of a pack (in any order); embedding rows outside
    the caption vocabulary are zero."""
    from transformers import AutoTokenizer

    from gen.llm import LLM
    from gen.llm.gguf import unpermute
    from gen.llm.loader import build_model, load_state

    datas = [torch.load(Path(f) / PACK_FILE, weights_only=False) for f in folders]
    parts = {d["parts"] for d in datas}
    have = sorted(d["part"] for d in datas)
    if len(parts) != 1 or have != list(range(parts.pop())):
        raise ValueError(f"an encoder pack needs all its parts, got parts {have} of {[d['parts'] for d in datas]}")
    last = next(d for d in datas if "config" in d)
    cfg = last["config"]
    state = {}
    for d in datas:
        for hf, (qtype, shape, blob) in d["raw"].items():
            w = dequantize(qtype, blob.numpy(), shape)
            if ".q_proj." in hf:
                w = unpermute(w, cfg["num_attention_heads"])
            elif ".k_proj." in hf:
                w = unpermute(w, cfg["num_key_value_heads"])
            state[hf] = torch.from_numpy(np.array(w, copy=True))
    embed = torch.zeros(cfg["vocab_size"], cfg["hidden_size"])
    embed[last["vocab"]] = last["embed_rows"]
    state["model.embed_tokens.weight"] = embed
    state["model.norm.weight"] = torch.ones(cfg["hidden_size"])  # unused: the model is cut after layer `layers`
    model = build_model(cfg, device, dtype)
    load_state(model, {k: v.to(device=device, dtype=dtype) for k, v in state.items()}, True)
    model.model.norm = torch.nn.Identity()  # the full model's hidden state `layers` is the raw, un-normed output
    with tempfile.TemporaryDirectory() as tmp:
        for name, blob in last["tokenizer"].items():
            (Path(tmp) / name).write_bytes(lzma.decompress(blob))
        tokenizer = AutoTokenizer.from_pretrained(tmp)
    llm = LLM.from_parts(model, tokenizer, cfg, {"eos_token_id": cfg["eos_token_id"]}, device, dtype, compile_decode=False)
    llm.vocab = set(last["vocab"].tolist())
    return llm


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--layers", type=int, default=ENCODER_LAYER)
    ap.add_argument("--parts", type=int, default=3)
    args = ap.parse_args()
    print(pack(args.out, args.layers, args.parts))


if __name__ == "__main__":
    main()
