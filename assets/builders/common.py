"""Deterministic tiny tokenizers and text encoders shared by the family builders (no training: fixed vocabularies)."""
from __future__ import annotations

import string

from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer, T5Config, T5EncoderModel, T5Tokenizer

WORDS = ("a an the of on in at with and small large big tiny red green blue yellow purple orange white black "
         "circle square triangle star cat dog photo painting left right top bottom center corner background "
         "astronaut riding horse mountain sky sunset city street").split()


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable unicode table, which byte-level BPE vocabularies (CLIP, Qwen) are written in."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def tiny_clip_tokenizer(max_length: int = 77) -> CLIPTokenizer:
    """Byte-level BPE over characters plus a few whole words (merges spelled out), CLIP's special tokens."""
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for ch in bytes_to_unicode().values():
        vocab.setdefault(ch, len(vocab))
        vocab.setdefault(ch + "</w>", len(vocab))
    merges = []
    for word in WORDS:  # merge left to right: c0 c1 -> c0c1, c0c1 c2 -> c0c1c2, ..., last piece ends in </w>
        pieces = list(word[:-1]) + [word[-1] + "</w>"]
        while len(pieces) > 1:
            merges.append((pieces[0], pieces[1]))
            pieces = [pieces[0] + pieces[1]] + pieces[2:]
            vocab.setdefault(pieces[0], len(vocab))
    merges = list(dict.fromkeys(merges))
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=max_length)


def tiny_t5_tokenizer(max_length: int = 512) -> T5Tokenizer:
    """Unigram vocabulary of characters and a few words with fixed scores."""
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    pieces += [("▁" + w, -3.0) for w in WORDS]
    pieces += [(c, -5.0) for c in string.ascii_letters + string.digits + string.punctuation]
    return T5Tokenizer(vocab=pieces, extra_ids=0, model_max_length=max_length)


def tiny_clip_text_model(vocab_size: int, hidden: int = 32) -> CLIPTextModel:
    cfg = CLIPTextConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=77, projection_dim=hidden,
                         bos_token_id=0, eos_token_id=1, pad_token_id=1)
    return CLIPTextModel(cfg).eval()


def tiny_t5_encoder(vocab_size: int, d_model: int = 32) -> T5EncoderModel:
    cfg = T5Config(vocab_size=vocab_size, d_model=d_model, d_kv=8, d_ff=2 * d_model, num_layers=2, num_heads=4,
                   relative_attention_num_buckets=8, feed_forward_proj="gated-gelu", is_encoder_decoder=False,
                   pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
    return T5EncoderModel(cfg).eval()
