"""A prompt reader: a small trained network on a text encoder's hidden states that reads the scene a prompt
describes into a model's closed vocabulary (one value per attribute, and how many objects), so that a prompt in words
the DiT was not trained on is drawn from the model's own sentence for the same scene.

It ships beside an LLM text encoder (text_encoder/reader.safetensors + reader_config.json; component_loaders/
gguf_encoder.py loads it) and is trained by training/shapes/reader.py. Several independently trained members vote by
averaging their probabilities. One member: LayerNorm (no affine) -> Linear to `width` -> one post-norm transformer
layer (self-attention, ReLU feed-forward) -> one learned query per head reading the sequence by attention -> a linear
per head. No dropout at inference.
"""
from __future__ import annotations

import re
import dataclasses
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

COUNT = "objects"  # the head that reads how many objects the prompt names ("1", "2")
SAID = " said"  # suffix of the head that reads whether an optional attribute is named at all ("no", "yes")


@dataclass(frozen=True)
class PromptReaderConfig:
    """reader_config.json. heads: {head: [values]} in the order of the trained outputs (COUNT among them);
    optional: {head: [defaults]}: attributes a prompt may leave unsaid, each with a second head "<head> said" (after
    `heads`, in this order) reading whether it is named; unsaid, it takes the first default that no other attribute
    was read as (a background that is not the shape's color); factors: {head: {factor: {value: factor value}}}:
    parts of a head's values read apart as well (a position's row and column), each by its own head "<head> <factor>"
    (after the "said" heads), and the head read as the product of its own probability and its factors'; phrases:
    {head: {value: phrase}} for writing the sentence; sentence: the model's own one-object sentence with {head}
    fields; members: independently trained copies that vote; hidden_layer / hidden_size: the encoder states read
    (must be the text encoder's)."""

    hidden_size: int
    hidden_layer: int
    width: int
    num_attention_heads: int
    members: int
    heads: dict
    phrases: dict
    sentence: str
    optional: dict = dataclasses.field(default_factory=dict)
    factors: dict = dataclasses.field(default_factory=dict)
    dropout: float = 0.1

    @classmethod
    def from_dict(cls, d: dict) -> "PromptReaderConfig":
        """The config, every key checked (ValueError naming the bad one)."""
        fields = {f: d.get(f) for f in cls.__dataclass_fields__ if f in d}
        for k in ("hidden_size", "hidden_layer", "width", "num_attention_heads", "members"):
            v, least = fields.get(k), 0 if k == "hidden_layer" else 1
            if not isinstance(v, int) or isinstance(v, bool) or v < least:
                raise ValueError(f"{k} must be an integer >= {least}, got {d.get(k)!r}")
        if fields["width"] % fields["num_attention_heads"]:
            raise ValueError(f"width {fields['width']} is not a multiple of num_attention_heads "
                             f"{fields['num_attention_heads']}")
        heads, phrases, sentence = d.get("heads"), d.get("phrases"), d.get("sentence")
        if not (isinstance(heads, dict) and heads and all(isinstance(v, list) and len(v) >= 2 and all(
                isinstance(x, str) for x in v) for v in heads.values())):
            raise ValueError(f"heads must map each head to a list of at least two values, got {heads!r}")
        if COUNT not in heads or heads[COUNT][0] != "1":
            raise ValueError(f"heads must hold {COUNT!r} with '1' as its first value, got {heads.get(COUNT)!r}")
        if not isinstance(sentence, str):
            raise ValueError(f"sentence must be a string, got {sentence!r}")
        fields_used = set(re.findall(r"\{(\w+)\}", sentence))
        if fields_used != set(heads) - {COUNT}:
            raise ValueError(f"sentence must have one field per head but {COUNT!r} "
                             f"({sorted(set(heads) - {COUNT})}), got {sorted(fields_used)}")
        if not (isinstance(phrases, dict) and all(isinstance(phrases.get(h), dict) and set(phrases[h]) == set(v)
                                                  for h, v in heads.items() if h != COUNT)):
            raise ValueError("phrases must give a phrase for every value of every head but "
                             f"{COUNT!r}, got {phrases!r}")
        optional = d.get("optional", {})
        if not (isinstance(optional, dict) and all(
                h in heads and h != COUNT and isinstance(v, list) and v and all(x in heads[h] for x in v)
                for h, v in optional.items())):
            raise ValueError(f"optional must map attribute heads to a list of their values (the default: the first "
                             f"that no other attribute was read as), got {optional!r}")
        factors = d.get("factors", {})
        if not (isinstance(factors, dict) and all(
                h in heads and h != COUNT and isinstance(fs, dict) and fs and all(
                    isinstance(m, dict) and set(m) == set(heads[h]) and all(isinstance(x, str) for x in m.values())
                    and len(set(m.values())) >= 2 for m in fs.values())
                for h, fs in factors.items())):
            raise ValueError(f"factors must map attribute heads to {{factor: {{value: factor value}}}} covering every "
                             f"value of the head, got {factors!r}")
        if "dropout" in d and not (isinstance(d["dropout"], (int, float)) and 0 <= d["dropout"] < 1):
            raise ValueError(f"dropout must be in [0, 1), got {d['dropout']!r}")
        return cls(**fields)

    def to_dict(self) -> dict:
        return {f: getattr(self, f) for f in self.__dataclass_fields__}

    @property
    def outputs(self) -> dict[str, list[str]]:
        """Every trained output head with its values: `heads`, then a "<head> said" head per optional attribute, then
        a "<head> <factor>" head per factor (its values in first-seen order)."""
        factors = {f"{h} {f}": list(dict.fromkeys(m.values())) for h, fs in self.factors.items() for f, m in fs.items()}
        return {**self.heads, **{h + SAID: ["no", "yes"] for h in self.optional}, **factors}


class SelfAttention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.to_q, self.to_k, self.to_v, self.to_out = (nn.Linear(dim, dim) for _ in range(4))

    def forward(self, q_in: torch.Tensor, kv_in: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        b, lq, d = q_in.shape
        split = lambda x: x.unflatten(-1, (self.heads, -1)).transpose(1, 2)  # noqa: E731
        q, k, v = split(self.to_q(q_in)), split(self.to_k(kv_in)), split(self.to_v(kv_in))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None, None, :])
        return self.to_out(out.transpose(1, 2).reshape(b, lq, d))


class ReaderMember(nn.Module):
    def __init__(self, cfg: PromptReaderConfig):
        super().__init__()
        w = cfg.width
        self.dropout = cfg.dropout
        self.proj = nn.Linear(cfg.hidden_size, w)
        self.attn = SelfAttention(w, cfg.num_attention_heads)
        self.norm1 = nn.LayerNorm(w)
        self.ff1, self.ff2 = nn.Linear(w, 2 * w), nn.Linear(2 * w, w)
        self.norm2 = nn.LayerNorm(w)
        self.queries = nn.Parameter(torch.randn(len(cfg.outputs), w) * 0.02)
        self.read = SelfAttention(w, cfg.num_attention_heads)
        self.out = nn.ModuleList([nn.Linear(w, len(v)) for v in cfg.outputs.values()])

    def forward(self, hidden: torch.Tensor, mask: torch.Tensor) -> list[torch.Tensor]:
        """hidden (B, T, D), mask (B, T) bool -> logits per head [(B, n_values)]."""
        drop = lambda x: F.dropout(x, self.dropout, self.training)  # noqa: E731
        x = self.proj(F.layer_norm(hidden, hidden.shape[-1:]))
        x = self.norm1(x + drop(self.attn(x, x, mask)))
        x = self.norm2(x + drop(self.ff2(drop(F.relu(self.ff1(x))))))
        read = self.read(self.queries.expand(len(x), -1, -1), x, mask)
        return [head(read[:, i]) for i, head in enumerate(self.out)]


class PromptReader(nn.Module):
    """`read(hidden, mask)` -> per prompt {head: (value, probability)} (an optional attribute read as unsaid takes
    its default, with the probability that it is unsaid); `sentence(values)` -> the model's own sentence for a
    one-object reading."""

    def __init__(self, cfg: PromptReaderConfig):
        super().__init__()
        self.config = cfg
        self.members = nn.ModuleList([ReaderMember(cfg) for _ in range(cfg.members)])

    def probabilities(self, hidden: torch.Tensor, mask: torch.Tensor) -> list[torch.Tensor]:
        """Mean over the members of each output's softmax: [(B, n_values)] in config.outputs order."""
        per_member = [[F.softmax(o.float(), -1) for o in m(hidden, mask)] for m in self.members]
        return [torch.stack(ps).mean(0) for ps in zip(*per_member)]

    def combined(self, probs: list[torch.Tensor]) -> list[torch.Tensor]:
        """`probs` with each factored head's replaced by the normalized product of its own probability and its
        factors' (the factor value of each of its values)."""
        names = list(self.config.outputs)
        out = list(probs)
        for h, fs in self.config.factors.items():
            i = names.index(h)
            logp = probs[i].clamp_min(1e-12).log()
            for f, m in fs.items():
                j = names.index(f"{h} {f}")
                values = list(dict.fromkeys(m.values()))
                index = torch.tensor([values.index(m[v]) for v in self.config.heads[h]], device=logp.device)
                logp = logp + probs[j].clamp_min(1e-12).log()[:, index]
            out[i] = F.softmax(logp, -1)
        return out

    @torch.no_grad()
    def read(self, hidden: torch.Tensor, mask: torch.Tensor) -> list[dict[str, tuple[str, float]]]:
        dtype = next(self.parameters()).dtype
        probs = self.combined(self.probabilities(hidden.to(dtype), mask.bool()))
        outputs = self.config.outputs
        out = []
        for i in range(len(hidden)):
            got = {}
            for (name, values), p in zip(outputs.items(), probs):
                j = int(p[i].argmax())
                got[name] = (values[j], float(p[i, j]))
            row = {h: got[h] for h in self.config.heads}
            for h, defaults in self.config.optional.items():
                said, p = got[h + SAID]
                if said == "no":
                    taken = {v for k, (v, _) in row.items() if k != h}
                    row[h] = (next((v for v in defaults if v not in taken), defaults[0]), p)
            out.append(row)
        return out

    def sentence(self, values: dict[str, str]) -> str:
        phrases = {h: self.config.phrases[h][values[h]] for h in self.config.heads if h != COUNT}
        text = self.config.sentence.format(**phrases)
        return re.sub(r"\ba (?=[aeiou])", "an ", text)


# ---------------------------------------------------------------- storage

SCALE = ".int8_scale"  # suffix of the per-row scales of a matrix stored as int8


def pack_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The reader's weights as stored (reader.safetensors): matrices as int8 with a float16 scale per row (symmetric,
    the row's largest magnitude -> 127), everything else as float16. Half the bytes of float16, so that more members
    fit the model's size."""
    out = {}
    for k, v in state.items():
        v = v.detach().float()
        if v.ndim == 2 and v.shape[1] >= 16:
            scale = v.abs().amax(1, keepdim=True).clamp_min(1e-12) / 127
            out[k] = torch.round(v / scale).to(torch.int8).contiguous()
            out[k + SCALE] = scale.half()
        else:
            out[k] = v.half().contiguous()
    return out


def unpack_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """pack_state's tensors (or plain float ones) back to float32 weights; an int8 matrix without its scale, or a
    scale without its matrix, is a ValueError naming it."""
    out = {}
    for k, v in state.items():
        if k.endswith(SCALE):
            if k[:-len(SCALE)] not in state:
                raise ValueError(f"{k} scales a matrix the file lacks")
            continue
        if v.dtype == torch.int8:
            scale = state.get(k + SCALE)
            if scale is None or scale.shape != (v.shape[0], 1):
                raise ValueError(f"{k} is int8 without a per-row scale {k + SCALE} of shape ({v.shape[0]}, 1)")
            out[k] = v.float() * scale.float()
        else:
            out[k] = v.float()
    return out
