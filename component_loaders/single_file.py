"""Single-file transformer checkpoints: one .safetensors or .gguf file in place of a model folder's transformer weights.

The folder's transformer/config.json still says the architecture; the file brings the weights, in any of the key
layouts people publish, each a declared key map (`FORMATS`, per DiT checkpoint class) recognised from its keys:

| layout    | FLUX.1                                  | Wan2.1 / 2.2                       | Qwen-Image        |
|-----------|-----------------------------------------|------------------------------------|-------------------|
| diffusers | our keys                                | our keys                           | our keys          |
| original  | BFL (`double_blocks.N.img_attn.qkv`...) | Wan (`blocks.N.self_attn.q`...)    | = diffusers       |

ComfyUI checkpoints are the original layouts under `model.diffusion_model.` (other keys of an all-in-one file are
left out). Fused projections (BFL's qkv, linear1) are split by rows into our layers by the sizes our model expects;
BFL's final modulation has its (shift, scale) halves swapped into ours (scale, shift).

Values may stay quantized: float8 weights (with a `.scale_weight` / `.weight_scale` per tensor or per output channel,
ComfyUI's `fp8_scaled` files included; none: scale 1) and GGUF blocks (the layout of city96's FLUX / Wan / Qwen-Image
files: the original keys, `general.architecture` flux / wan / qwen_image). Row splits and swaps work on them
without decoding (each row is whole blocks). A quantized Linear weight inside the repeated blocks (the family's
`DiT.blocks`, nearly all the bytes) becomes a quantized layer (gen/models/quantized.py, or gen/transforms/fp8.py's
Fp8Linear where FP8 tensor cores run it); every other quantized tensor (embedders, final layers) is dequantized at
load, so the model files see plain layers there. A file of another family, of another layout, with missing,
unexpected or mis-shaped tensors, or truncated is refused by a GenError naming the file and the first such keys.
"""
from __future__ import annotations

import json
import logging
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Union

import torch
from torch import nn

from gen.config import config_from_dict, read_json
from gen.types import GenError

log = logging.getLogger(__name__)

COMFY_PREFIX = "model.diffusion_model."
FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)
SCALE_SUFFIXES = ("scale_weight", "weight_scale")  # the weight's scale (ComfyUI old / new names)
SIDE_SUFFIXES = ("scale_input", "input_scale", "comfy_quant")  # read with the weight, or not needed
MARKER = "scaled_fp8"  # ComfyUI's fp8_scaled marker tensor
SHOW = 8  # keys named in an error


def _names(keys) -> str:
    keys = sorted(keys)
    more = f" ... and {len(keys) - SHOW} more" if len(keys) > SHOW else ""
    return ", ".join(keys[:SHOW]) + more


# ---------------------------------------------------------------- quantized values (rows are whole)


@dataclass
class QTensor:
    """A GGUF-quantized tensor: raw blocks (rows, row bytes) uint8 and its logical shape (rows, columns)."""

    data: torch.Tensor
    qtype: str
    shape: tuple[int, ...]

    def dequantize(self, dtype: torch.dtype) -> torch.Tensor:
        from gen.models.quantized import dequantize

        return dequantize(self.data, self.qtype, self.shape, dtype)


@dataclass
class Fp8Tensor:
    """A float8 tensor times `scale` (fp32: a scalar, or one per row)."""

    data: torch.Tensor
    scale: torch.Tensor

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.data.shape)

    def row_scale(self) -> torch.Tensor:
        """The scale as one fp32 value per row."""
        return self.scale.float().reshape(-1).expand(self.data.shape[0]) if self.scale.numel() == 1 \
            else self.scale.float().reshape(-1)

    def dequantize(self, dtype: torch.dtype) -> torch.Tensor:
        scale = self.row_scale().reshape(-1, *([1] * (self.data.ndim - 1)))
        return (self.data.float() * scale).to(dtype)


Value = Union[torch.Tensor, QTensor, Fp8Tensor]


def shape_of(v: Value) -> tuple[int, ...]:
    return tuple(v.shape)


def take_rows(v: Value, start: int, end: int) -> Value:
    if isinstance(v, QTensor):
        return QTensor(v.data[start:end], v.qtype, (end - start, *v.shape[1:]))
    if isinstance(v, Fp8Tensor):
        scale = v.scale if v.scale.numel() == 1 else v.scale.reshape(-1)[start:end]
        return Fp8Tensor(v.data[start:end], scale)
    return v[start:end]


def cat_rows(parts: list[Value]) -> Value:
    first = parts[0]
    if isinstance(first, QTensor):
        assert all(isinstance(p, QTensor) and p.qtype == first.qtype for p in parts)
        return QTensor(torch.cat([p.data for p in parts]), first.qtype,
                       (sum(p.shape[0] for p in parts), *first.shape[1:]))
    if isinstance(first, Fp8Tensor):
        return Fp8Tensor(torch.cat([p.data for p in parts]), torch.cat([p.row_scale() for p in parts]))
    return torch.cat(parts)


# ---------------------------------------------------------------- key maps


@dataclass(frozen=True)
class Rule:
    """One checkpoint key pattern and our key(s) for it; `{}` stands for one name component (a block index,
    weight / bias). `op`: "rename"; "split": rows split into the targets, sized as our model expects them; "swap":
    the two row halves exchanged."""

    src: str
    dst: tuple[str, ...]
    op: str = "rename"

    def __post_init__(self):
        assert self.op in ("rename", "split", "swap"), self.op
        assert (len(self.dst) > 1) == (self.op == "split"), self


def R(src: str, *dst: str, op: str = "rename") -> Rule:  # noqa: N802 (a table of rules reads better short)
    return Rule(src, dst, op)


@dataclass(frozen=True)
class Format:
    """A key layout of one DiT class: its name, the keys that identify it, and its rules (none: our own keys)."""

    name: str
    checkpoint_class: str
    markers: tuple[str, ...]
    rules: tuple[Rule, ...] = ()
    patterns: list = field(default_factory=list, compare=False, repr=False)

    def __post_init__(self):
        for rule in self.rules:
            regex = re.compile("^" + re.escape(rule.src).replace(r"\{\}", r"([^.]+)") + "$")
            self.patterns.append((regex, rule))

    def matches(self, keys: set[str]) -> bool:
        return all(m in keys for m in self.markers)

    def targets(self, key: str) -> tuple[Rule, list[str]] | None:
        """(rule, our keys) for a checkpoint key; None when no rule takes it."""
        if not self.rules:
            return Rule(key, (key,)), [key]
        for regex, rule in self.patterns:
            m = regex.match(key)
            if m:
                return rule, [d.format(*m.groups()) for d in rule.dst]
        return None


def _bfl_flux_rules() -> tuple[Rule, ...]:
    d, s = "double_blocks.{}.", "single_blocks.{}."
    t, u = "transformer_blocks.{}.", "single_transformer_blocks.{}."
    return (
        R("img_in.{}", "x_embedder.{}"),
        R("txt_in.{}", "context_embedder.{}"),
        R("time_in.in_layer.{}", "time_text_embed.timestep_embedder.linear_1.{}"),
        R("time_in.out_layer.{}", "time_text_embed.timestep_embedder.linear_2.{}"),
        R("vector_in.in_layer.{}", "time_text_embed.text_embedder.linear_1.{}"),
        R("vector_in.out_layer.{}", "time_text_embed.text_embedder.linear_2.{}"),
        R("guidance_in.in_layer.{}", "time_text_embed.guidance_embedder.linear_1.{}"),
        R("guidance_in.out_layer.{}", "time_text_embed.guidance_embedder.linear_2.{}"),
        R(d + "img_mod.lin.{}", t + "norm1.linear.{}"),
        R(d + "txt_mod.lin.{}", t + "norm1_context.linear.{}"),
        R(d + "img_attn.qkv.{}", t + "attn.to_q.{}", t + "attn.to_k.{}", t + "attn.to_v.{}", op="split"),
        R(d + "txt_attn.qkv.{}", t + "attn.add_q_proj.{}", t + "attn.add_k_proj.{}", t + "attn.add_v_proj.{}",
          op="split"),
        R(d + "img_attn.norm.query_norm.scale", t + "attn.norm_q.weight"),
        R(d + "img_attn.norm.key_norm.scale", t + "attn.norm_k.weight"),
        R(d + "txt_attn.norm.query_norm.scale", t + "attn.norm_added_q.weight"),
        R(d + "txt_attn.norm.key_norm.scale", t + "attn.norm_added_k.weight"),
        R(d + "img_attn.proj.{}", t + "attn.to_out.0.{}"),
        R(d + "txt_attn.proj.{}", t + "attn.to_add_out.{}"),
        R(d + "img_mlp.0.{}", t + "ff.net.0.proj.{}"),
        R(d + "img_mlp.2.{}", t + "ff.net.2.{}"),
        R(d + "txt_mlp.0.{}", t + "ff_context.net.0.proj.{}"),
        R(d + "txt_mlp.2.{}", t + "ff_context.net.2.{}"),
        R(s + "modulation.lin.{}", u + "norm.linear.{}"),
        R(s + "linear1.{}", u + "attn.to_q.{}", u + "attn.to_k.{}", u + "attn.to_v.{}", u + "proj_mlp.{}",
          op="split"),
        R(s + "norm.query_norm.scale", u + "attn.norm_q.weight"),
        R(s + "norm.key_norm.scale", u + "attn.norm_k.weight"),
        R(s + "linear2.{}", u + "proj_out.{}"),
        R("final_layer.linear.{}", "proj_out.{}"),
        R("final_layer.adaLN_modulation.1.{}", "norm_out.linear.{}", op="swap"),  # BFL: (shift, scale)
    )


def _wan_rules() -> tuple[Rule, ...]:
    b = "blocks.{}."
    attn = []
    for theirs, ours in (("self_attn", "attn1"), ("cross_attn", "attn2")):
        for p, q in (("q", "to_q"), ("k", "to_k"), ("v", "to_v"), ("o", "to_out.0"), ("k_img", "add_k_proj"),
                     ("v_img", "add_v_proj")):
            attn.append(R(f"{b}{theirs}.{p}.{{}}", f"{b}{ours}.{q}.{{}}"))
        for p, q in (("norm_q", "norm_q"), ("norm_k", "norm_k"), ("norm_k_img", "norm_added_k")):
            attn.append(R(f"{b}{theirs}.{p}.weight", f"{b}{ours}.{q}.weight"))
    return (
        R("patch_embedding.{}", "patch_embedding.{}"),
        R("text_embedding.0.{}", "condition_embedder.text_embedder.linear_1.{}"),
        R("text_embedding.2.{}", "condition_embedder.text_embedder.linear_2.{}"),
        R("time_embedding.0.{}", "condition_embedder.time_embedder.linear_1.{}"),
        R("time_embedding.2.{}", "condition_embedder.time_embedder.linear_2.{}"),
        R("time_projection.1.{}", "condition_embedder.time_proj.{}"),
        R("img_emb.proj.0.{}", "condition_embedder.image_embedder.norm1.{}"),
        R("img_emb.proj.1.{}", "condition_embedder.image_embedder.ff.net.0.proj.{}"),
        R("img_emb.proj.3.{}", "condition_embedder.image_embedder.ff.net.2.{}"),
        R("img_emb.proj.4.{}", "condition_embedder.image_embedder.norm2.{}"),
        R("img_emb.emb_pos", "condition_embedder.image_embedder.pos_embed"),
        *attn,
        R(b + "norm3.{}", b + "norm2.{}"),  # Wan's cross-attention norm is its norm3 (ours: norm2)
        R(b + "ffn.0.{}", b + "ffn.net.0.proj.{}"),
        R(b + "ffn.2.{}", b + "ffn.net.2.{}"),
        R(b + "modulation", b + "scale_shift_table"),
        R("head.head.{}", "proj_out.{}"),
        R("head.modulation", "scale_shift_table"),
    )


FLUX, WAN, QWEN = "FluxTransformer2DModel", "WanTransformer3DModel", "QwenImageTransformer2DModel"
FORMATS: dict[str, tuple[Format, ...]] = {
    FLUX: (Format("diffusers", FLUX, ("x_embedder.weight", "context_embedder.weight")),
           Format("BFL (original FLUX)", FLUX,
                  ("img_in.weight", "time_in.in_layer.weight", "final_layer.linear.weight"), _bfl_flux_rules())),
    WAN: (Format("diffusers", WAN, ("patch_embedding.weight", "condition_embedder.time_proj.weight")),
          Format("Wan (original)", WAN, ("patch_embedding.weight", "time_projection.1.weight", "head.head.weight"),
                 _wan_rules())),
    QWEN: (Format("diffusers / original", QWEN, ("img_in.weight", "txt_norm.weight", "txt_in.weight")),),
}
GGUF_ARCH = {FLUX: "flux", WAN: "wan", QWEN: "qwen_image"}  # general.architecture of city96's files


# ---------------------------------------------------------------- reading files


class Checkpoint:
    """Keys and values of one file (prefix stripped; a float8 weight comes with its scale)."""

    def __init__(self, path: Path, kind: str, names: dict[str, str]):
        self.path, self.kind = path, kind
        self.names = names  # our view of a key (prefix stripped) -> its name in the file
        self.arch: str | None = None

    def keys(self) -> list[str]:
        return list(self.names)

    def get(self, key: str) -> Value:
        raise NotImplementedError


def _strip_prefix(raw: list[str], path: Path) -> dict[str, str]:
    """ComfyUI's `model.diffusion_model.` prefix taken off (and the other parts of an all-in-one file left out)."""
    if not any(k.startswith(COMFY_PREFIX) for k in raw):
        return {k: k for k in raw}
    others = [k for k in raw if not k.startswith(COMFY_PREFIX)]
    if others:
        log.info("%s: %d keys outside %s left out (other components)", path, len(others), COMFY_PREFIX)
    return {k[len(COMFY_PREFIX):]: k for k in raw if k.startswith(COMFY_PREFIX)}


def _safetensors_header(path: Path) -> tuple[dict, int]:
    """(header dict, data start) read directly, to tell which tensors a truncated file lacks."""
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise GenError(f"{path} is not a safetensors file (only {len(head)} bytes)", param="transformer")
        n = struct.unpack("<Q", head)[0]
        raw = f.read(n)
    if len(raw) < n:
        raise GenError(f"{path} is truncated inside its header ({len(raw)} of {n} header bytes)", param="transformer")
    try:
        return json.loads(raw), 8 + n
    except ValueError as e:
        raise GenError(f"{path} has an unreadable safetensors header ({e})", param="transformer") from None


class SafetensorsCheckpoint(Checkpoint):
    def __init__(self, path: Path):
        from safetensors import safe_open

        try:
            self.file = safe_open(str(path), framework="pt", device="cpu")
        except Exception as e:  # safetensors raises its own error type for every bad file
            header, start = _safetensors_header(path)
            size = path.stat().st_size
            short = [k for k, v in header.items() if k != "__metadata__" and start + v["data_offsets"][1] > size]
            if short:
                raise GenError(f"{path} is truncated ({size} bytes): tensors {_names(short)} lie past its end",
                               param="transformer") from None
            raise GenError(f"{path} is not a readable safetensors file ({e})", param="transformer") from None
        raw = list(self.file.keys())
        metadata = self.file.metadata() or {}
        quant = json.loads(metadata["_quantization_metadata"]).get("layers", {}) \
            if "_quantization_metadata" in metadata else {}
        for layer, conf in quant.items():
            fmt = conf.get("format") if isinstance(conf, dict) else conf
            if fmt not in ("float8_e4m3fn", "float8_e5m2"):
                raise GenError(f"{path}: layer {layer} is quantized as {fmt!r}; supported: float8_e4m3fn, float8_e5m2",
                               param="transformer")
        names = _strip_prefix(raw, path)
        side = {k for k in names if k == MARKER or k.rsplit(".", 1)[-1] in SCALE_SUFFIXES + SIDE_SUFFIXES}
        super().__init__(path, "safetensors", {k: v for k, v in names.items() if k not in side})
        self.scales = {k.rsplit(".", 1)[0]: names[k] for k in side if k.rsplit(".", 1)[-1] in SCALE_SUFFIXES}

    def get(self, key: str) -> Value:
        t = self.file.get_tensor(self.names[key])
        if t.dtype not in FP8_DTYPES:
            return t
        scale_key = self.scales.get(key.rsplit(".", 1)[0]) if key.endswith(".weight") else None
        scale = self.file.get_tensor(scale_key).float() if scale_key else torch.ones((), dtype=torch.float32)
        if scale.numel() not in (1, t.shape[0]):
            raise GenError(f"{self.path}: the scale of {key} has {scale.numel()} values; expected 1 (per tensor) or "
                           f"{t.shape[0]} (per output channel)", param="transformer")
        return Fp8Tensor(t, scale)


class GGUFCheckpoint(Checkpoint):
    def __init__(self, path: Path):
        from gen.llm.gguf import gguf_field, open_gguf

        try:
            gguf, reader = open_gguf(path)
        except (ValueError, IndexError, OSError, struct.error) as e:
            raise GenError(f"{path} is not a readable GGUF file (truncated or corrupt: {e})", param="transformer") \
                from None
        self.gguf, self.reader = gguf, reader
        self.tensors = {t.name: t for t in reader.tensors}
        super().__init__(path, "gguf", _strip_prefix(list(self.tensors), path))
        self.arch = gguf_field(reader, "general.architecture")
        self.field = lambda key: gguf_field(reader, key)

    def _shape(self, t) -> tuple[int, ...]:
        orig = self.field(f"comfy.gguf.orig_shape.{t.name}")
        return tuple(int(n) for n in orig) if orig is not None else tuple(int(n) for n in reversed(t.shape.tolist()))

    def get(self, key: str) -> Value:
        import numpy as np

        from gen.models.quantized import BLOCKS

        t = self.tensors[self.names[key]]
        kind = t.tensor_type.name
        shape = self._shape(t)
        data = torch.from_numpy(np.array(t.data, copy=True))
        if kind in ("F32", "F16"):
            return data.reshape(shape)
        if kind == "BF16":
            return data.reshape(-1).view(torch.bfloat16).reshape(shape)
        if kind not in BLOCKS:
            raise GenError(f"{self.path}: tensor {t.name} is {kind}, a GGUF type we do not decode (supported: F32, "
                           f"F16, BF16, {', '.join(sorted(BLOCKS))})", param="transformer")
        if len(shape) != 2:  # quantized with its original shape kept aside: decode it now
            return QTensor(data.reshape(-1, BLOCKS[kind][1]), kind, (-1, BLOCKS[kind][0])).dequantize(
                torch.float32).reshape(shape)
        return QTensor(data.reshape(shape[0], -1), kind, shape)


def open_checkpoint(path: str | Path) -> Checkpoint:
    path = Path(path)
    if not path.is_file():
        raise GenError(f"transformer file {str(path)!r} does not exist", param="transformer")
    with open(path, "rb") as f:
        magic = f.read(4)
    return GGUFCheckpoint(path) if magic == b"GGUF" else SafetensorsCheckpoint(path)


# ---------------------------------------------------------------- detecting and mapping


def detect_format(ckpt: Checkpoint, checkpoint_class: str) -> Format:
    """The layout of `ckpt` among `checkpoint_class`'s; GenError naming what the file holds instead."""
    keys = set(ckpt.keys())
    if ckpt.kind == "gguf" and ckpt.arch not in (None, GGUF_ARCH.get(checkpoint_class)):
        raise GenError(f"{ckpt.path} is a GGUF file of architecture {ckpt.arch!r}; the model folder's transformer is "
                       f"{checkpoint_class} ({GGUF_ARCH.get(checkpoint_class)!r})", param="transformer")
    for fmt in FORMATS.get(checkpoint_class, ()):
        if fmt.matches(keys):
            return fmt
    for cls, formats in FORMATS.items():
        for fmt in formats:
            if cls != checkpoint_class and fmt.matches(keys):
                raise GenError(f"{ckpt.path} holds a {cls} ({fmt.name} keys), but the model folder's transformer is "
                               f"{checkpoint_class}", param="transformer")
    expected = "; ".join(f"{f.name}: {', '.join(f.markers)}" for f in FORMATS.get(checkpoint_class, ()))
    raise GenError(f"{ckpt.path} is not a {checkpoint_class} checkpoint in a known layout: its keys begin "
                   f"{_names(list(keys)[:SHOW])}; expected ({expected})", param="transformer")


def map_keys(ckpt: Checkpoint, fmt: Format, expected: dict[str, tuple[int, ...]]
             ) -> list[tuple[str, Rule, list[str]]]:
    """(file key, rule, our keys) for every key; GenError naming the unexpected and missing keys."""
    plan, unexpected, covered = [], [], set()
    for key in ckpt.keys():
        found = fmt.targets(key)
        if found is None or any(k not in expected for k in found[1]):
            unexpected.append(key)
            continue
        plan.append((key, *found))
        covered.update(found[1])
    missing = [k for k in expected if k not in covered]
    if missing or unexpected:
        parts = ([f"missing {_names(missing)}"] if missing else []) + \
                ([f"unexpected {_names(unexpected)}"] if unexpected else [])
        raise GenError(f"{ckpt.path} ({fmt.name} keys) does not fit the model folder's {fmt.checkpoint_class}: "
                       + "; ".join(parts), param="transformer")
    return plan


def convert(value: Value, rule: Rule, targets: list[str], expected: dict[str, tuple[int, ...]],
            key: str, path: Path) -> Iterator[tuple[str, Value]]:
    """The values of our keys `targets` from the file's `value` under `rule`."""
    rows = shape_of(value)[0] if shape_of(value) else 0
    if rule.op == "rename":
        yield targets[0], value
    elif rule.op == "swap":
        half = rows // 2
        yield targets[0], cat_rows([take_rows(value, half, rows), take_rows(value, 0, half)])
    else:
        sizes = [expected[t][0] for t in targets]
        if sum(sizes) != rows:
            raise GenError(f"{path}: {key} has {rows} rows; our {', '.join(targets)} take {sum(sizes)} "
                           f"({'+'.join(map(str, sizes))})", param="transformer")
        start = 0
        for target, n in zip(targets, sizes):
            yield target, take_rows(value, start, start + n)
            start += n


# ---------------------------------------------------------------- building the model


def fp8_matmul_ok(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether FP8 weights can run through FP8 tensor cores (gen/transforms/fp8.py) on `device` in `dtype`."""
    from gen.transforms.fp8 import check_fp8

    try:
        check_fp8(device, dtype)
        return True
    except GenError:
        return False


def _quantized_layer(linear: nn.Linear, value: Value, bias: torch.Tensor | None, device, dtype,
                     fp8_matmul: bool) -> nn.Module:
    from gen.models.quantized import Fp8WeightLinear, GGUFLinear

    n_in, n_out, has_bias = linear.in_features, linear.out_features, linear.bias is not None
    if isinstance(value, QTensor):
        layer = GGUFLinear(n_in, n_out, value.qtype, has_bias, dtype, device)
        layer.weight = value.data.to(device)
    elif fp8_matmul and value.data.dtype == torch.float8_e4m3fn and n_in % 16 == 0 and n_out % 16 == 0:
        from gen.transforms.fp8 import Fp8Linear

        layer = Fp8Linear(n_in, n_out, has_bias, dtype, device)
        layer.weight.data = value.data.to(device)
        layer.weight_scale = value.row_scale().to(device)
    else:
        layer = Fp8WeightLinear(n_in, n_out, has_bias, value.data.dtype, dtype, device)
        layer.weight = value.data.to(device)
        layer.weight_scale = value.row_scale().to(device)
    if has_bias:
        layer.bias = nn.Parameter(bias, requires_grad=False)
    return layer


def load_single_file(file: str | Path, config_folder: str | Path, dit, device: torch.device, dtype: torch.dtype,
                     fp8_matmul: bool = False) -> nn.Module:
    """Our DiT `dit` (a family's declaration) built from `config_folder`/config.json, its weights read from `file`
    (any layout of FORMATS, safetensors or GGUF, quantized values kept per layer); loaded on `device` in `dtype`.
    `fp8_matmul`: float8 e4m3 Linear weights become Fp8Linear (FP8 tensor cores) instead of dequantizing layers."""
    file, config_folder = Path(file), Path(config_folder)
    try:
        config = config_from_dict(dit.config, read_json(config_folder / "config.json"))
    except (FileNotFoundError, TypeError, ValueError, AssertionError) as e:
        raise GenError(f"{config_folder}/config.json does not describe a valid {dit.model.__name__}: {e}",
                       param="model_path") from None
    with torch.device("meta"):
        model = dit.model(config)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    ckpt = open_checkpoint(file)
    fmt = detect_format(ckpt, dit.checkpoint_class)
    plan = map_keys(ckpt, fmt, expected)
    state: dict[str, torch.Tensor] = {}
    quantized: dict[str, Value] = {}  # Linear module path -> its quantized weight
    in_blocks = tuple(f"{attr}." for attr in dit.blocks)  # the repeated blocks: where almost all weights are
    bad_shapes, kinds = [], {}
    for key, rule, targets in plan:
        for target, value in convert(ckpt.get(key), rule, targets, expected, key, file):
            if shape_of(value) != expected[target]:
                bad_shapes.append(f"{target} (file {shape_of(value)}, model {expected[target]})")
                continue
            module_path, _, leaf = target.rpartition(".")
            if not isinstance(value, torch.Tensor):
                kind = value.qtype if isinstance(value, QTensor) else str(value.data.dtype).removeprefix("torch.")
                kinds[kind] = kinds.get(kind, 0) + 1
                if leaf == "weight" and module_path.startswith(in_blocks) and \
                        type(model.get_submodule(module_path)) is nn.Linear:
                    quantized[module_path] = value
                    continue
                value = value.dequantize(dtype)
            state[target] = value.to(device=device, dtype=dtype if value.is_floating_point() else value.dtype)
    if bad_shapes:
        raise GenError(f"{file}: weights of the wrong shape for the model folder's {dit.checkpoint_class}: "
                       f"{_names(bad_shapes)}", param="transformer")
    for path, value in quantized.items():
        parent, _, name = path.rpartition(".")
        linear = model.get_submodule(path)
        layer = _quantized_layer(linear, value, state.pop(f"{path}.bias", None), device, dtype, fp8_matmul)
        setattr(model.get_submodule(parent) if parent else model, name, layer)
    result = model.load_state_dict(state, strict=False, assign=True)
    assert not result.unexpected_keys, result.unexpected_keys
    still_meta = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    assert not still_meta, f"tensors left on meta after load: {still_meta}"
    log.info("%s: %s keys (%s), %d quantized linears %s", file, fmt.name, ckpt.kind, len(quantized), kinds)
    return model.eval()
