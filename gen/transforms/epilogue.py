"""GELU in the matmul's epilogue: a feed-forward's first linear and its GELU(tanh) as one cuBLASLt call.

A DiT's feed-forward starts with `GeluProj` (gen/models/layers.py): a Linear whose output goes through GELU with
the tanh approximation (FLUX.1, Qwen-Image, Wan). Run apart, the matmul writes its (tokens x 4 dim) output and an
elementwise kernel reads it back and writes the activation; cuBLASLt's GELU_BIAS epilogue (torch._addmm_activation,
CUDA) applies bias and GELU to the fp32 accumulator before the one write. Same formula (tanh approximation), one
rounding fewer: closer to the fp32 result than the unfused bf16 pair (benchmarks/gelu_epilogue.py: relative error
0.0017 against 0.0024). FLUX.1's single blocks (`FluxSingleBlock.mlp_in_epilogue`) also drop the concatenation
[attention | GELU(mlp)] their output projection read: proj_out runs as two accumulating matmuls.
Measured on an H200 (docs/BENCHMARKS.md): Qwen-Image 1328^2 step -2.4%, FLUX.1-dev 1024^2 step -2.0%.

Marks the modules whose class declares `gelu_epilogue` (GeluProj with tanh GELU, FluxSingleBlock); they take the
fused calls only for CUDA inputs while their linears are plain nn.Linear with biases in the input's dtype (a LoRA or
FP8 layer, gen/transforms/lora.py / fp8.py, falls back to the separate calls). On other devices torch's op means
exact-erf GELU, so nothing changes there.
"""
from __future__ import annotations

from torch import nn


def _eligible(m: nn.Module) -> bool:
    return hasattr(type(m), "gelu_epilogue") and getattr(m, "approximate", "tanh") == "tanh"


def fuse_gelu_epilogues(model: nn.Module) -> int:
    """Mark every module of `model` that can run its tanh GELU in a matmul epilogue; returns the count."""
    n = 0
    for m in model.modules():
        if _eligible(m):
            m.gelu_epilogue = True
            n += 1
    return n


def unfuse_gelu_epilogues(model: nn.Module) -> None:
    """Undo fuse_gelu_epilogues: the separate matmul and GELU again."""
    for m in model.modules():
        m.__dict__.pop("gelu_epilogue", None)
