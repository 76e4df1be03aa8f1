"""The attention of a CFG-batched Qwen-Image step (two rows whose prompts differ in length), each way it can be run
exactly: the rows one by one over their real keys (gen.transforms.batch.RealKeysByRow, today's path; cuDNN or FA4 per
row), and both rows in one FlashAttention-4 call that is told each row's number of real keys (`seqused_k`). That call
needs each row's real keys first: the keys are laid out image first, then the padded text. Also, as a bound, one
dense batched call that attends to the padding (not exact), and a split over image keys and text keys merged by
their log-sum-exp.

Every variant's output is compared with the masked attention in fp32 math on the same inputs (relative error).

  python benchmarks/attention_used_keys.py [--out used_keys.json]   # GPU, flash-attn-4 installed (~1 minute)
  python benchmarks/attention_used_keys.py --tiny                   # CPU: the script's logic, no FA4 rows
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import gpu_ms, write_json  # noqa: E402
from gen.models import attention as A  # noqa: E402
from gen.transforms.batch import RealKeysByRow  # noqa: E402

# name -> (image tokens, text lengths of the rows (the first is the padded length), heads, head dim)
SHAPES = {
    "Qwen-Image 1024^2, CFG rows of 60 and 6 text tokens": (4096, (60, 6), 24, 128),
    "Qwen-Image 1024^2, CFG rows of 220 and 6 text tokens": (4096, (220, 6), 24, 128),
    "Qwen-Image 1328^2, CFG rows of 60 and 6 text tokens": (6889, (60, 6), 24, 128),
}
TINY = {"tiny": (64, (9, 3), 2, 32)}


def inputs(shape, device, dtype):
    img, lengths, h, d = shape
    padded = lengths[0]
    g = torch.Generator("cpu").manual_seed(0)
    q, k, v = (torch.randn(len(lengths), padded + img, h, d, generator=g).to(device, dtype) for _ in range(3))
    mask = torch.ones(len(lengths), padded + img, dtype=torch.bool, device=device)
    for b, n in enumerate(lengths):
        mask[b, n:padded] = False
    return q, k, v, mask, padded


def variants(padded: int, lengths, fa4) -> dict:
    """name -> fn(q, k, v, mask) over keys laid out [padded text, image] (the model's layout)."""
    out = {"rows, cuDNN": lambda q, k, v, m: RealKeysByRow(list(lengths), padded)(q, k, v, m, A.cudnn_attention)}
    if fa4 is None:
        return out
    used = torch.tensor([n + 0 for n in lengths], dtype=torch.int32)

    def image_first(t):  # the keys a row attends first: image, then its text (padding last)
        return torch.cat([t[:, padded:], t[:, :padded]], dim=1)

    def used_keys(q, k, v, m):
        n_img = k.shape[1] - padded
        u = (used + n_img).to(q.device)
        return fa4.flash_attn_varlen_func(q, image_first(k), image_first(v), seqused_k=u)[0]

    def used_keys_laid_out(kf, vf):  # the same call on keys already laid out image first (no copy)
        def fn(q, k, v, m):
            u = (used + kf.shape[1] - padded).to(q.device)
            return fa4.flash_attn_varlen_func(q, kf, vf, seqused_k=u)[0]
        return fn

    def split_merge(q, k, v, m):
        u = used.to(q.device)
        o1, l1 = fa4.flash_attn_func(q, k[:, padded:], v[:, padded:], return_lse=True)
        o2, l2 = fa4.flash_attn_varlen_func(q, k[:, :padded], v[:, :padded], seqused_k=u, return_lse=True)
        l1, l2 = l1.transpose(1, 2).unsqueeze(-1), l2.transpose(1, 2).unsqueeze(-1)  # (B, L, H, 1)
        top = torch.maximum(l1, l2)
        w1, w2 = torch.exp(l1 - top), torch.exp(l2 - top)
        return ((o1.float() * w1 + o2.float() * w2) / (w1 + w2)).to(q.dtype)

    out["rows, FA4"] = lambda q, k, v, m: RealKeysByRow(list(lengths), padded)(q, k, v, m, A.fa4_attention)
    out["one FA4 call, seqused_k (keys re-laid out)"] = used_keys
    out["_laid_out"] = used_keys_laid_out
    out["FA4 image keys + text keys, merged by LSE"] = split_merge
    out["one FA4 call, dense (attends to padding: bound, not exact)"] = lambda q, k, v, m: A.fa4_attention(q, k, v)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--out")
    args = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() and not args.tiny else "cpu")
    dtype = torch.bfloat16 if device.type != "cpu" else torch.float32
    try:
        import flash_attn.cute as fa4
    except ImportError:
        fa4 = None
    if device.type == "cpu":
        fa4 = None
    rows = []
    for name, shape in (TINY if args.tiny else SHAPES).items():
        q, k, v, mask, padded = inputs(shape, device, dtype)
        ref = A.math_attention(q.float(), k.float(), v.float(), mask)
        fns = variants(padded, shape[1], fa4)
        laid = fns.pop("_laid_out", None)
        if laid is not None:
            kf, vf = (torch.cat([t[:, padded:], t[:, :padded]], dim=1) for t in (k, v))
            fns["one FA4 call, seqused_k (keys laid out image first upstream)"] = laid(kf, vf)
        flops = sum(4 * shape[2] * (padded + shape[0]) * (n + shape[0]) * shape[3] for n in shape[1])
        for vname, fn in fns.items():
            out = fn(q, k, v, mask)
            err = ((out.float() - ref).norm() / ref.norm()).item() if "dense" not in vname else None
            ms = gpu_ms(lambda: fn(q, k, v, mask)) if device.type == "cuda" else None
            rows.append({"shape": name, "variant": vname, "ms": ms, "rel_err": err,
                         "tflops": flops / ms / 1e9 if ms else None})
            print(rows[-1], flush=True)
    if args.out:
        write_json(args.out, {"rows": rows})
    print("\n| shape | variant | ms | TFLOP/s (real keys) | rel. err. vs fp32 masked |\n|---|---|---:|---:|---:|")
    for r in rows:
        ms = f"{r['ms']:.3f}" if r["ms"] else "-"
        tf = f"{r['tflops']:.0f}" if r["tflops"] else "-"
        err = f"{r['rel_err']:.2e}" if r["rel_err"] is not None else "-"
        print(f"| {r['shape']} | {r['variant']} | {ms} | {tf} | {err} |")


if __name__ == "__main__":
    main()
