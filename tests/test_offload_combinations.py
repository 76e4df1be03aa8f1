"""Offload with the rest of gen: a GGUF-quantized DiT streamed as its raw blocks, the step cache (skipped blocks' copies
dropped), regionally compiled blocks, sequence-parallel ranks, and `gen generate --offload / --max-gpu-memory`."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

from checkpoint_writers import flux_to_bfl, write_gguf
from gen import Generator
from gen.cli import main
from gen.distributed.ranks import run_on_ranks
from gen.transforms.compile import compile_blocks
from helpers import psnr

ASSETS = Path(__file__).resolve().parents[1] / "assets"
FLUX = ASSETS / "flux-tiny"
REQUEST = dict(prompt="a red circle", negative_prompt="blue", true_cfg_scale=2.0, seed=3, height=32, width=48,
               num_inference_steps=3)


def pictures(gen: Generator, request: dict = REQUEST) -> np.ndarray:
    result = gen.generate(**request)
    return np.stack([np.asarray(p) for p in result.images])


def test_quantized_dit_streams_its_raw_blocks(tmp_path):
    """A GGUF Q8_0 transformer under layer offload moves its quantized bytes and gives the resident result."""
    sd = load_file(str(FLUX / "transformer" / "diffusion_pytorch_model.safetensors"))
    file = write_gguf(tmp_path / "t.gguf", "flux", flux_to_bfl(sd), "Q8_0", min_numel=0)
    resident = pictures(Generator.from_pretrained(FLUX, device="cpu", transformer=file))
    gen = Generator.from_pretrained(FLUX, device="cpu", transformer=file, offload="layer")
    layer = gen.pipeline.transformer.transformer_blocks[0].attn.to_q
    assert type(layer).__name__ == "GGUFLinear" and layer.weight.dtype == torch.uint8
    assert np.array_equal(pictures(gen), resident)
    gen.pipeline.transforms.undo()


def test_with_step_cache_and_compiled_blocks():
    cached = pictures(Generator.from_pretrained(FLUX, device="cpu", step_cache=0.5))
    gen = Generator.from_pretrained(FLUX, device="cpu", step_cache=0.5, offload="layer")
    assert np.array_equal(pictures(gen), cached)  # skipped blocks: their prefetched copies are dropped
    stream = gen.pipeline.transforms.get("offload").detail.streams["transformer"]
    assert stream.ahead <= {0}  # at most the next call's first block waits on the device
    # regional compile (eager backend on the CPU) over the offload hooks: they run outside the compiled region
    gen.pipeline.transforms.get("step_cache").undo()
    gen.pipeline.transforms.remove(gen.pipeline.transforms.get("step_cache"))
    plain = pictures(Generator.from_pretrained(FLUX, device="cpu"))
    compile_blocks(gen.pipeline.transformer, ("transformer_blocks", "single_transformer_blocks"), backend="eager")
    assert np.array_equal(pictures(gen), plain)
    gen.pipeline.transforms.undo()


def _parallel_offload(rank: int, device: torch.device):
    from gen.distributed.apply import parallelize
    from gen.distributed.groups import ParallelConfig, ParallelContext

    torch.set_num_threads(1)
    request = dict(REQUEST, num_inference_steps=2)
    ref = pictures(Generator.from_pretrained(FLUX, device="cpu"), request) if rank == 0 else None
    gen = Generator.from_pretrained(FLUX, device="cpu", offload="layer")
    parallel = parallelize(gen.pipeline, ParallelContext.build(ParallelConfig(2, 1, 1), device, timeout_s=120))
    out = pictures(gen, request)
    parallel.remove()
    return None if rank else (ref, out)


def test_layer_offload_on_sequence_parallel_ranks():
    ref, out = run_on_ranks(_parallel_offload, 2, timeout_s=300)[0]
    assert psnr(out, ref) >= 50  # the tolerance of sequence parallel alone (tests/test_distributed_pipelines.py)


def test_offload_flags_on_the_cli(tmp_path, capsys):
    out = tmp_path / "o.png"
    base = ["generate", "--model-path", str(FLUX), "--prompt", "x", "--height", "32", "--width", "32",
            "--num-inference-steps", "1", "--device", "cpu", "--output", str(out)]
    assert main(base + ["--max-gpu-memory", "4"]) == 0
    assert "offload: none (max_gpu_memory 4 GiB): every component stays on the device" in capsys.readouterr().err
    assert main(base + ["--offload", "layer"]) == 0
    assert "offload: layer: DiT blocks stream from pinned host memory, 1 ahead" in capsys.readouterr().err
    assert out.is_file()
    out.unlink()
    assert main(base + ["--offload", "layer", "--max-gpu-memory", "1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()  # (after the loaders' progress bars: the plan needs sizes)
    assert err[-1].startswith("error: offload=layer needs at least 3.0 GiB on the device, more than "
                              "max_gpu_memory=1 GiB"), err
    assert [line for line in err if line.startswith("error")] == [err[-1]] and not out.exists()
