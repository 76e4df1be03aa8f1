"""Linear layers whose weights stay quantized as a checkpoint stores them, dequantized per call on the weight's device.

`GGUFLinear`: a GGUF (llama.cpp / ggml) quantized matrix kept as its raw blocks (out, row bytes); `dequantize`
decodes Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q2_K, Q3_K, Q4_K, Q5_K and Q6_K with torch ops (the block layouts of ggml's
ggml-quants.c, as gguf-py's numpy reference decodes them; tests compare the two). `Fp8WeightLinear`: a float8 weight
with a per-tensor or per-output-channel fp32 scale, dequantized per call (where FP8 tensor cores run it, the
loader builds gen/transforms/fp8.py's `Fp8Linear` instead). Only one layer's weight is ever dequantized at a time.
Not the reading of files (component_loaders/single_file.py) nor which layers are quantized.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

QK_K = 256
# name -> (values per block, bytes per block), as ggml's type traits
BLOCKS = {
    "Q4_0": (32, 18), "Q4_1": (32, 20), "Q5_0": (32, 22), "Q5_1": (32, 24), "Q8_0": (32, 34),
    "Q2_K": (256, 84), "Q3_K": (256, 110), "Q4_K": (256, 144), "Q5_K": (256, 176), "Q6_K": (256, 210),
}


def _f16(b: torch.Tensor) -> torch.Tensor:
    """(n, 2k) uint8 little-endian halves -> (n, k) float32."""
    return b.contiguous().view(torch.float16).float()


def _shifts(*values: int, device) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.uint8, device=device)


def _nibbles(qs: torch.Tensor, groups: int) -> torch.Tensor:
    """(n, groups * g) bytes -> (n, groups, 2, g): per group, the low nibbles, then the high nibbles."""
    n = qs.shape[0]
    q = qs.reshape(n, groups, 1, -1) >> _shifts(0, 4, device=qs.device).view(1, 1, 2, 1)
    return q & 0x0F


def _bits(b: torch.Tensor, count: int) -> torch.Tensor:
    """(n, count / 8) bytes -> (n, count) bits, little-endian (bit j of the block is bit j % 8 of byte j // 8)."""
    n = b.shape[0]
    return ((b.reshape(n, -1, 1) >> torch.arange(8, dtype=torch.uint8, device=b.device)) & 1).reshape(n, count)


def _scale_min_k4(s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_K / Q5_K: 12 bytes -> eight 6-bit scales and eight 6-bit mins, (n, 8) each."""
    n = s.shape[0]
    s = s.reshape(n, 3, 4)
    d, m, md = s[:, 0], s[:, 1], s[:, 2]
    sc = torch.cat([d & 63, (md & 0x0F) | ((d >> 2) & 0x30)], dim=1)
    mn = torch.cat([m & 63, (md >> 4) | ((m >> 2) & 0x30)], dim=1)
    return sc, mn


def _q8_0(b):
    return b[:, 2:].contiguous().view(torch.int8).float() * _f16(b[:, :2])


def _q4_0(b):
    q = _nibbles(b[:, 2:], 1).reshape(b.shape[0], 32).float() - 8
    return q * _f16(b[:, :2])


def _q4_1(b):
    q = _nibbles(b[:, 4:], 1).reshape(b.shape[0], 32).float()
    return q * _f16(b[:, :2]) + _f16(b[:, 2:4])


def _q5_0(b):
    n = b.shape[0]
    q = _nibbles(b[:, 6:], 1).reshape(n, 32) | (_bits(b[:, 2:6], 32) << 4)
    return (q.float() - 16) * _f16(b[:, :2])


def _q5_1(b):
    n = b.shape[0]
    q = _nibbles(b[:, 8:], 1).reshape(n, 32) | (_bits(b[:, 4:8], 32) << 4)
    return q.float() * _f16(b[:, :2]) + _f16(b[:, 2:4])


def _q2_k(b):
    n = b.shape[0]
    scales, qs, d, dmin = b[:, :16], b[:, 16:80], _f16(b[:, 80:82]), _f16(b[:, 82:84])
    dl = (d * (scales & 0x0F).float()).reshape(n, 16, 1)
    ml = (dmin * (scales >> 4).float()).reshape(n, 16, 1)
    q = (qs.reshape(n, 2, 1, 32) >> _shifts(0, 2, 4, 6, device=b.device).view(1, 1, 4, 1)) & 3  # (n, 2, 4, 32)
    return (dl * q.reshape(n, 16, 16).float() - ml).reshape(n, QK_K)


def _q3_k(b):
    n = b.shape[0]
    hmask, qs, scales, d = b[:, :32], b[:, 32:96], b[:, 96:108], _f16(b[:, 108:110])
    low = (scales[:, :8].reshape(n, 1, 8) >> _shifts(0, 4, device=b.device).view(1, 2, 1)).reshape(n, 16) & 0x0F
    high = (scales[:, 8:].reshape(n, 1, 4) >> _shifts(0, 2, 4, 6, device=b.device).view(1, 4, 1)).reshape(n, 16) & 3
    sc = (low | (high << 4)).to(torch.int16) - 32  # 6-bit signed scales
    dl = (d * sc.float()).reshape(n, 16, 1)
    ql = (qs.reshape(n, 2, 1, 32) >> _shifts(0, 2, 4, 6, device=b.device).view(1, 1, 4, 1)).reshape(n, 16, 16) & 3
    qh = (hmask.reshape(n, 1, 1, 32) >> torch.arange(8, dtype=torch.uint8, device=b.device).view(1, 1, 8, 1))
    qh = (qh.reshape(n, 16, 16) & 1) ^ 1  # the 4 is subtracted where the high bit is clear
    q = ql.to(torch.int16) - (qh.to(torch.int16) << 2)
    return (dl * q.float()).reshape(n, QK_K)


def _q4_k(b):
    n = b.shape[0]
    d, dmin = _f16(b[:, :2]), _f16(b[:, 2:4])
    sc, mn = _scale_min_k4(b[:, 4:16])
    q = _nibbles(b[:, 16:], 4).reshape(n, 8, 32).float()
    return ((d * sc.float()).reshape(n, 8, 1) * q - (dmin * mn.float()).reshape(n, 8, 1)).reshape(n, QK_K)


def _q5_k(b):
    n = b.shape[0]
    d, dmin = _f16(b[:, :2]), _f16(b[:, 2:4])
    sc, mn = _scale_min_k4(b[:, 4:16])
    qh = (b[:, 16:48].reshape(n, 1, 1, 32) >> torch.arange(8, dtype=torch.uint8, device=b.device).view(1, 1, 8, 1)) & 1
    q = (_nibbles(b[:, 48:], 4).reshape(n, 8, 32) | (qh.reshape(n, 8, 32) << 4)).float()
    return ((d * sc.float()).reshape(n, 8, 1) * q - (dmin * mn.float()).reshape(n, 8, 1)).reshape(n, QK_K)


def _q6_k(b):
    n = b.shape[0]
    ql, qh, scales, d = b[:, :128], b[:, 128:192], b[:, 192:208], _f16(b[:, 208:210])
    dl = (d * scales.contiguous().view(torch.int8).float()).reshape(n, 16, 1)
    low = _nibbles(ql, 2).reshape(n, 8, 32)  # (n, 2 halves, 2 nibbles, 64) -> 8 runs of 32
    high = ((qh.reshape(n, 2, 1, 32) >> _shifts(0, 2, 4, 6, device=b.device).view(1, 1, 4, 1)) & 3).reshape(n, 8, 32)
    q = (low | (high << 4)).to(torch.int16) - 32
    return (dl * q.reshape(n, 16, 16).float()).reshape(n, QK_K)


DECODERS = {"Q4_0": _q4_0, "Q4_1": _q4_1, "Q5_0": _q5_0, "Q5_1": _q5_1, "Q8_0": _q8_0,
            "Q2_K": _q2_k, "Q3_K": _q3_k, "Q4_K": _q4_k, "Q5_K": _q5_k, "Q6_K": _q6_k}


def row_bytes(qtype: str, columns: int) -> int:
    """Bytes of one row of `columns` values in `qtype`."""
    size, nbytes = BLOCKS[qtype]
    if columns % size:
        raise ValueError(f"{qtype} rows hold whole blocks of {size} values; {columns} columns is not a multiple")
    return columns // size * nbytes


def dequantize(raw: torch.Tensor, qtype: str, shape: tuple[int, ...],
               dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """GGUF blocks `raw` (..., row bytes) uint8 -> the `shape` tensor in `dtype` (computed in fp32 on raw's device)."""
    if qtype not in DECODERS:
        raise ValueError(f"GGUF type {qtype!r} is not supported (supported: {sorted(DECODERS)})")
    size, nbytes = BLOCKS[qtype]
    blocks = raw.reshape(-1, nbytes)
    return DECODERS[qtype](blocks).reshape(shape).to(dtype)


class GGUFLinear(nn.Module):
    """nn.Linear whose weight is GGUF-quantized blocks (`weight`: (out, row bytes) uint8), dequantized each call."""

    def __init__(self, in_features: int, out_features: int, qtype: str, bias: bool = True,
                 dtype: torch.dtype = torch.float32, device=None):
        super().__init__()
        self.in_features, self.out_features, self.qtype = in_features, out_features, qtype
        self.register_buffer("weight", torch.empty(out_features, row_bytes(qtype, in_features), dtype=torch.uint8,
                                                   device=device))
        self.bias = nn.Parameter(torch.empty(out_features, dtype=dtype, device=device), requires_grad=False) \
            if bias else None

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return dequantize(self.weight, self.qtype, (self.out_features, self.in_features), dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.dequantized_weight(x.dtype), self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, qtype={self.qtype}, " \
               f"bias={self.bias is not None}"


class Fp8WeightLinear(nn.Module):
    """nn.Linear whose weight is float8 (e4m3fn or e5m2) times an fp32 scale (`weight_scale`: one per output channel;
    a per-tensor scale is repeated), dequantized to the activations' dtype each call."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, fp8_dtype=torch.float8_e4m3fn,
                 dtype: torch.dtype = torch.float32, device=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("weight", torch.empty(out_features, in_features, dtype=fp8_dtype, device=device))
        self.register_buffer("weight_scale", torch.ones(out_features, dtype=torch.float32, device=device))
        self.bias = nn.Parameter(torch.empty(out_features, dtype=dtype, device=device), requires_grad=False) \
            if bias else None

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return (self.weight.float() * self.weight_scale[:, None]).to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.dequantized_weight(x.dtype), self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, fp8={self.weight.dtype}, " \
               f"bias={self.bias is not None}"
