"""VAE decode at the issue's sizes: eager vs channels_last vs compiled vs tiled, ms, peak memory, agreement.

Random weights of the real architectures built on the GPU (diffusers' classes, as our pipelines use them):
FLUX's AutoencoderKL at 1024^2, Qwen-Image's 3D VAE at 1328^2, the Wan2.1 VAE at 480x832x81 frames. Each variant
decodes the same latents; `rel_err` is against the eager decode and against an fp32 decode (the exact reference).

  python benchmarks/vae_decode.py --out vae.json          # on the GPU machine
  python benchmarks/vae_decode.py --tiny                  # CPU smoke check
"""
from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import cold_start_s, environment, time_ms, write_json  # noqa: E402
from benchmarks.dit_step import _markdown  # noqa: E402
from benchmarks.e2e_flux import REAL as FLUX_REAL  # noqa: E402
from gen.transforms.vae import tune_vae  # noqa: E402

TINY_2D = {**FLUX_REAL["vae"], "block_out_channels": (8, 16, 16, 16), "layers_per_block": 1, "norm_num_groups": 4}
TINY_3D = dict(base_dim=8, z_dim=16)


def build(name: str, tiny: bool, device, dtype):
    """(vae, latents) at the benchmark size."""
    import diffusers

    g = torch.Generator(device).manual_seed(0)
    with torch.device(device):
        if name == "flux":
            vae = diffusers.AutoencoderKL(**(TINY_2D if tiny else FLUX_REAL["vae"]))
            shape = (1, 16, 8, 8) if tiny else (1, 16, 128, 128)
        elif name == "qwen":
            vae = diffusers.AutoencoderKLQwenImage(**(TINY_3D if tiny else {}))
            shape = (1, 16, 1, 8, 8) if tiny else (1, 16, 1, 166, 166)
        else:
            vae = diffusers.AutoencoderKLWan(**(TINY_3D if tiny else {}))
            shape = (1, 16, 3, 8, 8) if tiny else (1, 16, 21, 60, 104)
    vae = vae.to(dtype).eval()
    return vae, torch.randn(*shape, generator=g, device=device, dtype=dtype)


def bench(name: str, args, device, dtype) -> list[dict]:
    vae, z = build(name, args.tiny, device, dtype)
    iters, warm = (1, 1) if args.tiny else (args.iters, 1)
    rows = []

    def decode():
        with torch.no_grad():
            return vae.decode(z, return_dict=False)[0]

    ref = decode().float()
    exact = copy.deepcopy(vae).float()
    with torch.no_grad():
        ref32 = exact.decode(z.float(), return_dict=False)[0]
    del exact
    variants = [("eager", {}), ("channels_last", dict(channels_last=True))]
    if name == "flux":
        variants += [("compiled", dict(compile=True)),
                     ("channels_last + compiled", dict(channels_last=True, compile=True))]
    else:
        variants += [("tiled", dict(tiling=True))]
    for label, kw in variants:
        restore = tune_vae(vae, **kw)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        row = {"vae": name, "latents": list(z.shape), "variant": label, "cold_s": cold_start_s(decode)}
        row["ms"] = time_ms(decode, warm, iters)
        out = decode().float()
        row["rel_err_vs_eager"] = ((out - ref).norm() / ref.norm()).item()
        row["rel_err_vs_fp32"] = ((out - ref32).norm() / ref32.norm()).item()
        if device.type == "cuda":
            row["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
        rows.append(row)
        restore()
        torch._dynamo.reset()  # a later variant compiles afresh, not against this one's weight layout
        print(row, flush=True)
    del vae
    torch._dynamo.reset()
    return rows


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--models", default="flux,qwen,wan")
    p.add_argument("--tiny", action="store_true")
    p.add_argument("--iters", type=int, default=3)
    p.add_argument("--out", default="vae_decode.json")
    args = p.parse_args()
    device = torch.accelerator.current_accelerator() if torch.accelerator.is_available() else torch.device("cpu")
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    rows = []
    for name in args.models.split(","):
        rows += bench(name, args, device, dtype)
        write_json(args.out, {"env": environment(), "rows": rows})
    print(environment())
    cols = ["vae", "latents", "variant", "ms", "peak_gib", "cold_s", "rel_err_vs_eager", "rel_err_vs_fp32"]
    print(_markdown(rows, cols))


if __name__ == "__main__":
    main()
