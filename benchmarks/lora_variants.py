"""Unfused LoRA on one linear (or one joined group of linears): ways of adding `scale * (x A^T) B^T` to the base
output, timed against the base alone. FLUX.1-dev shapes at 1024^2 (4608 tokens, bf16, compiled); each case ends in
the consumer its output has in the block (so inductor may fuse the LoRA's add into it, as it does in the model):

| case          | layer(s)                                        | consumer                            |
|---------------|-------------------------------------------------|-------------------------------------|
| 3072->3072    | attn.to_out.0                                   | residual + gate * y                 |
| 3072->12288   | ff.net.0.proj                                   | GELU                                |
| 12288->3072   | ff.net.2                                        | residual + gate * y                 |
| qkv           | joined to_q/to_k/to_v: 3072 -> 3 x 3072         | RMSNorm per head on q, k; v as is   |
| qkv+mlp       | the single block's joined 3072 -> 3 x 3072 + 12288 | as qkv, GELU on mlp              |

Variants (gen/transforms/lora.py runs `fold`; eager, `inplace`):
- `mul`: h = (x A^T) * scale per row; y + h B^T (the path before the scale was folded into the banks)
- `fold`: the scale folded into A's rows at fill time; y + (x A^T) B^T (one matmul less kernel per layer)
- `addmm`: torch.addmm(y, h, B^T) on 2-D views (inductor keeps bf16 addmm fused; cuBLAS reads y as C)
- `inplace`: y.addmm_(h, B^T) (eager only: compiled, it is functionalized into the addmm graph)
- `inplace_op`: the same as a custom op that mutates y (inductor re-inplaces it: one GEMM with beta = 1)
- `bmm` (joined groups): the members' ups as one batched product (members with equal out sizes), one add on the
  joined output viewed (T, n, out)
- `catk` (docs/LORA.md, "Not built"): the weight held in a wider buffer [W | ups in spare columns], one GEMM over
  [x | x A^T]: the input copied once instead of the up product written and read
- `wide_base`: no LoRA, the base with its weight read as the view W = buffer[:, :in] of that wider buffer (what
  `catk` would cost plain requests; should equal the base)

  python benchmarks/lora_variants.py --ranks 64     # GPU, < 1 minute (compiles 27 small graphs)
  python benchmarks/lora_variants.py                # GPU, rank 16 and 64, ~1.5 minutes (49 graphs)
  python benchmarks/lora_variants.py --eager        # also the eager rows
  python benchmarks/lora_variants.py --tiny         # CPU smoke check (tiny shapes, eager backend)
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import environment, save_result, time_ms  # noqa: E402

VARIANTS = ("mul", "fold", "addmm", "inplace", "inplace_op", "catk", "wide_base")
JOINED_VARIANTS = VARIANTS + ("bmm",)


@torch.library.custom_op("genbench::lora_addmm_", mutates_args=("y",))
def lora_addmm_(y: torch.Tensor, h: torch.Tensor, up: torch.Tensor) -> None:
    """y (rows, out) += h (rows, R) @ up (out, R)^T, in place."""
    y.addmm_(h, up.t())


@lora_addmm_.register_fake
def _(y, h, up):
    return None


# ---------------------------------------------------------------- the cases


def cases(tiny: bool) -> dict[str, dict]:
    """name -> in features, the group's out sizes, consumer kind."""
    d, m = (32, 128) if tiny else (3072, 12288)
    return {
        f"{d}->{d}": dict(din=d, outs=(d,), consumer="gate"),
        f"{d}->{m}": dict(din=d, outs=(m,), consumer="gelu"),
        f"{m}->{d}": dict(din=m, outs=(d,), consumer="gate"),
        "qkv": dict(din=d, outs=(d, d, d), consumer="qkv"),
        "qkv+mlp": dict(din=d, outs=(d, d, d, m), consumer="qkv"),
    }


def make_tensors(case: dict, tokens: int, rank: int, device, dtype, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    r = lambda *s, std=1.0: (torch.randn(*s, generator=g) * std).to(device, dtype)
    din, outs, n = case["din"], case["outs"], len(case["outs"])
    t = dict(x=r(tokens, din), w=r(sum(outs), din, std=din ** -0.5), b=r(sum(outs), std=0.1),
             down=r(n * rank, din, std=din ** -0.5), up=[r(o, rank, std=0.1) for o in outs],
             scale=r(n * rank).abs() + 0.5, res=r(tokens, outs[0]), gate=r(outs[0]))
    t["down_folded"] = t["down"] * t["scale"][:, None]
    # catk: [W | each member's up in its own rows and its own rank's columns], the rest of the spare columns zero
    wide = torch.zeros(sum(outs), din + n * rank, device=device, dtype=dtype)
    wide[:, :din] = t["w"]
    row = 0
    for i, (o, up) in enumerate(zip(outs, t["up"])):
        wide[row:row + o, din + i * rank:din + (i + 1) * rank] = up
        row += o
    t["wide"] = wide
    same = outs[:3] if len(set(outs[:3])) == 1 and len(outs) >= 3 else ()
    if same:  # the q/k/v ups stacked for the batched variant: (3, out, R)
        t["up3"] = torch.stack(t["up"][:3])
    return t


def consume(outs: list[torch.Tensor], kind: str, t: dict, head: int) -> list[torch.Tensor]:
    if kind == "gate":
        return [t["res"] + t["gate"] * outs[0]]
    if kind == "gelu":
        return [F.gelu(outs[0], approximate="tanh")]
    q, k, v, *mlp = outs
    norm = lambda z: F.rms_norm(z.unflatten(-1, (-1, head)), (head,), eps=1e-6)
    return [norm(q), norm(k), v] + [F.gelu(z, approximate="tanh") for z in mlp]


def run(variant: str, case: dict, t: dict, rank: int, head: int) -> list[torch.Tensor]:
    """The case's layer(s) with the LoRA added the `variant` way (None: base alone), then the consumer."""
    outs_sizes, x = case["outs"], t["x"]
    y = F.linear(x, t["w"], t["b"])  # (T, sum(outs))
    if variant is None:
        return consume(list(y.split(outs_sizes, dim=-1)), case["consumer"], t, head)
    if variant == "wide_base":
        y = F.linear(x, t["wide"][:, :case["din"]], t["b"])
        return consume(list(y.split(outs_sizes, dim=-1)), case["consumer"], t, head)
    if variant == "catk":
        y = F.linear(torch.cat([x, F.linear(x, t["down_folded"])], dim=-1), t["wide"], t["b"])
        return consume(list(y.split(outs_sizes, dim=-1)), case["consumer"], t, head)
    if variant == "mul":
        h = F.linear(x, t["down"]) * t["scale"]
    else:
        h = F.linear(x, t["down_folded"])  # (T, n R)
    if variant == "bmm":
        n = len(outs_sizes)
        hb = h.unflatten(-1, (n, rank)).transpose(0, 1)  # (n, T, R)
        three = torch.bmm(hb[:3], t["up3"].transpose(1, 2))  # (3, T, out)
        qkv = y[:, :3 * outs_sizes[0]].unflatten(-1, (3, -1)) + three.transpose(0, 1)  # (T, 3, out)
        outs = list(qkv.unbind(1))
        if n > 3:
            outs += [y[:, 3 * outs_sizes[0]:] + F.linear(hb[3], t["up"][3])]
        return consume(outs, case["consumer"], t, head)
    outs = []
    for o, hi, up in zip(y.split(outs_sizes, dim=-1), h.split(rank, dim=-1), t["up"]):
        if variant in ("mul", "fold"):
            outs.append(o + F.linear(hi, up))
        elif variant == "addmm":
            outs.append(torch.addmm(o, hi, up.t()))
        elif variant == "inplace":
            outs.append(o.addmm_(hi, up.t()))
        elif variant == "inplace_op":
            lora_addmm_(o, hi, up)
            outs.append(o)
        else:
            raise ValueError(f"unknown variant {variant!r}")
    return consume(outs, case["consumer"], t, head)


# ---------------------------------------------------------------- timing


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser()
    p.add_argument("--tiny", action="store_true", help="tiny shapes on the CPU, eager backend (smoke check)")
    p.add_argument("--ranks", default="16,64")
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--eager", action="store_true", help="also time each variant uncompiled")
    p.add_argument("--out", help="JSON output (default: $OUT/lora_variants.json when OUT is set)")
    args = p.parse_args(argv)
    device = torch.device("cpu") if args.tiny or not torch.accelerator.is_available() \
        else torch.accelerator.current_accelerator()
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    tokens, head = (64, 16) if args.tiny else (4608, 128)
    iters, warmup = (2, 1) if args.tiny else (args.iters, 3)
    backend = "eager" if args.tiny else "inductor"
    torch._dynamo.config.cache_size_limit = 256  # one graph per (case, rank, variant)
    if hasattr(torch._dynamo.config, "recompile_limit"):
        torch._dynamo.config.recompile_limit = 256
    modes = ["compiled"] + (["eager"] if args.eager or args.tiny else [])
    rows, base_ms, result = [], {}, {"env": environment(), "tokens": tokens, "device": str(device), "dtype": str(dtype),
                        "rows": []}
    with torch.no_grad():
        for name, case in cases(args.tiny).items():
            variants = JOINED_VARIANTS if len(case["outs"]) >= 3 else VARIANTS
            for rank in [int(r) for r in args.ranks.split(",")]:
                t = make_tensors(case, tokens, rank, device, dtype)
                want = run("mul", case, t, rank, head)
                plain = run(None, case, t, rank, head)  # what wide_base must equal
                for mode in modes:
                    wrap = (lambda f: torch.compile(f, backend=backend, fullgraph=True, dynamic=False)) \
                        if mode == "compiled" else (lambda f: f)
                    if (name, mode) not in base_ms:  # the base does not depend on the rank: one graph per case
                        base_ms[name, mode] = time_ms(wrap(lambda: run(None, case, t, rank, head)), warmup, iters)
                    row = {"case": name, "rank": rank, "mode": mode, "base_ms": base_ms[name, mode]}
                    for v in variants:
                        if v == "inplace" and mode == "compiled":
                            continue  # functionalized: the same graph as addmm
                        fn = wrap(lambda v=v: run(v, case, t, rank, head))
                        got = fn()
                        err = max(((a.float() - b.float()).abs().max() / b.float().abs().max()).item()
                                  for a, b in zip(got, plain if v == "wide_base" else want))
                        row[v] = {"ms": time_ms(fn, warmup, iters), "rel_err": err}
                    rows.append(row)
    result["rows"] = rows
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    result["all_agree"] = all(r[v]["rel_err"] <= tol for r in rows for v in JOINED_VARIANTS if v in r)
    print(f"\nUnfused LoRA variants, {tokens} tokens, {device} {dtype}" + (" (tiny)" if args.tiny else "")
          + ": ms (overhead over the base)")
    header = "| case | rank | mode | base ms | " + " | ".join(JOINED_VARIANTS) + " |"
    print(header + "\n" + "|---" * (4 + len(JOINED_VARIANTS)) + "|")
    for r in rows:
        cells = [f"{r[v]['ms']:.3f} ({100 * (r[v]['ms'] / r['base_ms'] - 1):+.0f}%)" if v in r else ""
                 for v in JOINED_VARIANTS]
        print(f"| {r['case']} | {r['rank']} | {r['mode']} | {r['base_ms']:.3f} | " + " | ".join(cells) + " |")
    print("variants agree with `mul` (wide_base with the base)" if result["all_agree"]
          else "SOME VARIANT DISAGREES with `mul` (rel_err in the JSON)")
    save_result(args.out, "lora_variants.json", result)
    return result


if __name__ == "__main__":
    main()
