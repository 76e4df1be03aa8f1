"""LLM runtime speed vs transformers in the same run: batch-1 decode tok/s, 8 x 512 prefill ms, share of the HBM floor.

Two architectures (`--arch`), each with random bf16 weights made on the GPU (no download):
  llama     a Qwen2.5-7B-sized Qwen2ForCausalLM (the default);
  deepseek  a DeepSeek-V3-style MoE at DeepSeek-V2-Lite size (15.7B parameters, 2.4B active: hidden 2048, 27 layers,
            the first dense, 64 routed experts top-6 + 2 shared, MLA with kv_lora_rank 512, YaRN) with V3 routing
            (sigmoid scores, e_score_correction_bias, group-limited top-k over 8 groups, 4 kept); built as
            transformers' DeepseekV3ForCausalLM, ours is DeepseekV3ForCausalLM;
  both      each of the two in its own process (GPU memory freed in between), then one table.
transformers' model is built first and ours is given the very same weight tensors (transformers' stacked experts
are cut into per-expert views; our engine then stacks its own copy of the routed experts, ~29 GB for deepseek).

Decode speed is (time for 1 + N new tokens - time for 1 new token) / N, which leaves prefill out, for our engine
(compiled static-shape decode step with CUDA graphs, mode max-autotune by default) and for transformers' eager
`generate` (and, with --hf-compile, its static cache + torch.compile path). The HBM floor is the weight bytes one
batch-1 decode step reads / the measured copy bandwidth (a large device-to-device copy, bytes read + written): every
weight except the embedding table (one row is read) and, for the MoE, the routed experts (top-k of them per layer);
`hbm_floor_all_weights_tok_s` also counts the whole embedding table and every expert, as earlier runs did.
With --compile-prefill (llama only) our prefill is also timed through Engine(compile_prefill=True) in each mode of
--prefill-modes.

  python benchmarks/llm_decode.py --arch both --compile-prefill --out llm_decode.json   # GPU machine (H200)
  python benchmarks/llm_decode.py --tiny --arch deepseek                               # CPU smoke check, seconds
  python benchmarks/llm_decode.py --table llm_decode_llama.json llm_decode_deepseek.json  # table of earlier runs
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import time_ms, write_json  # noqa: E402
from gen.llm.engine import Engine  # noqa: E402
from gen.llm.loader import build_model, load_state  # noqa: E402
from gen.llm.sampling import SamplingParams  # noqa: E402

QWEN25_7B = dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                 num_key_value_heads=4, max_position_embeddings=32768, rope_parameters={"rope_type": "default", "rope_theta": 1e6},
                 rms_norm_eps=1e-6, tie_word_embeddings=False)
TINY = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=2048, tie_word_embeddings=False)
# DeepSeek-V2-Lite's dimensions with DeepSeek-V3's routing (transformers' DeepseekV3Config field names)
DEEPSEEK_V2_LITE_V3 = dict(
    vocab_size=102400, hidden_size=2048, intermediate_size=10944, moe_intermediate_size=1408, num_hidden_layers=27,
    num_attention_heads=16, num_key_value_heads=16, q_lora_rank=None, kv_lora_rank=512, qk_nope_head_dim=128,
    qk_rope_head_dim=64, v_head_dim=128, n_routed_experts=64, n_shared_experts=2, num_experts_per_tok=6, n_group=8,
    topk_group=4, norm_topk_prob=True, routed_scaling_factor=2.5, first_k_dense_replace=1, rms_norm_eps=1e-6,
    max_position_embeddings=163840, tie_word_embeddings=False, num_nextn_predict_layers=0,
    rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 40.0, "original_max_position_embeddings": 4096,
                     "beta_fast": 32.0, "beta_slow": 1.0, "mscale": 0.707, "mscale_all_dim": 0.707})
TINY_DEEPSEEK = dict(
    vocab_size=256, hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_hidden_layers=3,
    num_attention_heads=4, num_key_value_heads=4, q_lora_rank=None, kv_lora_rank=32, qk_nope_head_dim=16,
    qk_rope_head_dim=8, v_head_dim=16, n_routed_experts=16, n_shared_experts=2, num_experts_per_tok=4, n_group=4,
    topk_group=2, norm_topk_prob=True, routed_scaling_factor=2.5, first_k_dense_replace=1, max_position_embeddings=2048,
    tie_word_embeddings=False, num_nextn_predict_layers=0,
    rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 512,
                     "beta_fast": 32.0, "beta_slow": 1.0, "mscale": 0.707, "mscale_all_dim": 0.707})
ARCHS = {  # arch -> (transformers family, full config, tiny config, model description, default decode tokens)
    "llama": ("Qwen2", QWEN25_7B, TINY, "Qwen2.5-7B-sized Qwen2 (random weights)", 256),
    "deepseek": ("DeepseekV3", DEEPSEEK_V2_LITE_V3, TINY_DEEPSEEK,
                 "DeepSeek-V2-Lite-sized MoE with V3 routing (random weights)", 128),
}


def sync():
    if torch.accelerator.is_available():
        torch.accelerator.synchronize()


def wall_s(fn) -> float:
    sync()
    t = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - t


def hf_state_to_ours(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers 5 keeps each MoE layer's experts stacked (`experts.gate_up_proj` (E, 2I, D) = gate|up,
    `experts.down_proj` (E, D, I)); checkpoints and our model name them per expert: cut them into views."""
    out = {}
    for name, t in state.items():
        if name.endswith(".experts.gate_up_proj"):
            prefix, inter = name[: -len("gate_up_proj")], t.shape[1] // 2
            for e in range(t.shape[0]):
                out[f"{prefix}{e}.gate_proj.weight"], out[f"{prefix}{e}.up_proj.weight"] = t[e, :inter], t[e, inter:]
        elif name.endswith(".experts.down_proj"):
            prefix = name[: -len("down_proj")]
            for e in range(t.shape[0]):
                out[f"{prefix}{e}.down_proj.weight"] = t[e]
        else:
            out[name] = t
    return out


def build(arch: str, cfg: dict, device, dtype):
    """transformers' model with random weights made on the device, and ours sharing its tensors."""
    import transformers

    family = ARCHS[arch][0]
    hf_cfg = getattr(transformers, family + "Config")(**cfg, eos_token_id=None, bos_token_id=None, pad_token_id=0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # built in place on the device in dtype (not meta: its RoPE buffers must be real)
    try:
        with torch.device(device):
            ref = getattr(transformers, family + "ForCausalLM")(hf_cfg).eval()
    finally:
        torch.set_default_dtype(default)
    g = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02, generator=g)
        for name, b in ref.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.normal_(0.0, 0.01, generator=g)
    d = hf_cfg.to_dict()
    d["architectures"] = [family + "ForCausalLM"]
    ours = load_state(build_model(d, device, dtype), hf_state_to_ours(dict(ref.state_dict())), tie_word_embeddings=False)
    return ref, ours


def bytes_read_per_token(model) -> dict[str, int]:
    """Weight bytes of one batch-1 decode step, by part: the embedding table gives one row, the routed experts of
    each MoE layer give num_experts_per_tok of their n_routed_experts (all experts have the same size); lm_head and
    every other weight are read whole. Also `all_weights`: every weight once (the earlier floor)."""
    cfg = model.config
    embed = model.model.embed_tokens.weight
    tied = model.lm_head.weight is embed
    parts = {"embedding_row": embed.shape[1] * embed.element_size(), "lm_head": 0, "routed_experts": 0, "other": 0,
             "all_weights": 0}
    share = getattr(cfg, "num_experts_per_tok", 1) / getattr(cfg, "n_routed_experts", 1)
    for name, t in model.state_dict(keep_vars=True).items():
        n = t.numel() * t.element_size()
        if name == "lm_head.weight" and tied:
            parts["lm_head"] = n  # the embedding table, read whole by lm_head; state_dict lists it under both names
            continue
        parts["all_weights"] += n
        if name == "model.embed_tokens.weight":
            continue
        if name == "lm_head.weight":
            parts["lm_head"] = n
        elif ".mlp.experts." in name:
            parts["routed_experts"] += round(n * share)
        else:
            parts["other"] += n
    parts["per_token"] = parts["embedding_row"] + parts["lm_head"] + parts["routed_experts"] + parts["other"]
    return parts


def environment() -> dict:
    import transformers

    name = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    return {"date": time.strftime("%Y-%m-%d"), "device": name, "torch": torch.__version__, "transformers": transformers.__version__}


def same_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def checks(eng: Engine, ref, ours, device, dtype, prompt: list[int]) -> dict:
    """Greedy agreement: engine vs transformers (batch 1), and engine vs eager dynamic engine for batch 1 and 3.

    Informative only: random weights give nearly flat logits, so bf16 rounding differences flip argmax ties early.
    Correctness is proven by the fp32 CPU parity tests (tests/test_llm_*.py).
    """
    p = SamplingParams(max_new_tokens=32)
    eager = Engine(ours, device, dtype, eng.max_context, stop_ids=[], pad_id=0, compile_decode=False)
    with torch.inference_mode():
        hf = ref.generate(torch.tensor([prompt], device=device), max_new_tokens=32, min_new_tokens=32, do_sample=False)
    hf = hf[0, len(prompt):].tolist()
    prompts = [prompt, prompt[: len(prompt) // 2], prompt[:5]]
    batch_c, batch_e = eng.generate(prompts, p), eager.generate(prompts, p)
    return {"greedy32_same_prefix_ours_vs_hf": same_prefix(eng.generate([prompt], p)[0], hf),
            "greedy32_same_prefix_ours_eager_vs_hf": same_prefix(eager.generate([prompt], p)[0], hf),
            "batch3_same_prefix_ours_vs_eager": [same_prefix(a, b) for a, b in zip(batch_c, batch_e)]}


def copy_bandwidth(device, nbytes: int) -> float:
    """Bytes/s of a device-to-device copy, counting bytes read and written."""
    a = torch.empty(nbytes // 2, dtype=torch.bfloat16, device=device)
    b = torch.empty_like(a)
    ms = time_ms(lambda: b.copy_(a), warmup=3, iters=20)
    return 2 * nbytes / (ms / 1e3)


def ours_decode(eng: Engine, prompt: list[int], n: int, reps: int) -> float:
    """Median tokens/s of our batch-1 decode (prefill excluded)."""
    run = lambda k: eng.generate([prompt], SamplingParams(max_new_tokens=k))  # noqa: E731
    run(n + 1), run(1)  # warm-up: compile and CUDA-graph capture
    rates = []
    for _ in range(reps):
        rates.append(n / (wall_s(lambda: run(n + 1)) - wall_s(lambda: run(1))))
    return sorted(rates)[len(rates) // 2]


def hf_decode(ref, prompt: list[int], n: int, reps: int, **kw) -> float:
    ids = torch.tensor([prompt], device=ref.device)
    run = lambda k: ref.generate(ids, max_new_tokens=k, min_new_tokens=k, do_sample=False, **kw)  # noqa: E731
    with torch.inference_mode():
        run(n + 1), run(1)
        rates = [n / (wall_s(lambda: run(n + 1)) - wall_s(lambda: run(1))) for _ in range(reps)]
    return sorted(rates)[len(rates) // 2]


def profile_decode(eng: Engine, prompt: list[int], n: int) -> None:
    """Device time by kernel over one generate call, to tell device-bound from host-bound decoding."""
    from torch.profiler import ProfilerActivity, profile

    run = lambda: eng.generate([prompt], SamplingParams(max_new_tokens=n))  # noqa: E731
    run(), run()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        wall = wall_s(run)
    print(f"generate({n} tokens): {wall * 1e3:.1f} ms wall, {wall * 1e3 / n:.2f} ms/token")
    print(prof.key_averages().table(sort_by="device_time_total", row_limit=25, max_name_column_width=70))


def prefill(args, res: dict, eng: Engine, ref, ours, device, dtype) -> None:
    """8 prompts x 512 tokens into a KV cache, logits of the last position: ours eager (and compiled), transformers."""
    b, n = args.prefill_batch, args.prefill_len
    ids = torch.randint(1, ours.config.vocab_size, (b, n), device=device)
    mask = torch.ones(b, n, dtype=torch.bool, device=device)
    pos = torch.arange(n, device=device)[None].expand(b, -1)
    cache = ours.new_cache(b, n, device, dtype)
    iters = 3 if args.tiny else 10

    @torch.inference_mode()
    def ours_prefill():
        h, _ = ours(ids, pos, mask, cache, 0)
        return ours.compute_logits(h[:, -1:])

    @torch.inference_mode()
    def hf_prefill():
        return ref(ids, attention_mask=mask.long(), use_cache=True, logits_to_keep=1).logits

    res["ours_prefill_ms"] = time_ms(ours_prefill, warmup=2, iters=iters)
    res["hf_prefill_ms"] = time_ms(hf_prefill, warmup=2, iters=iters)
    res["prefill_shape"] = [b, n]
    with torch.inference_mode():
        want = ours_prefill()
        res["prefill_logits_rel_err_vs_hf"] = ((want - hf_prefill().float()).norm() / hf_prefill().float().norm()).item()
    if not args.compile_prefill:
        return
    if args.arch != "llama":
        res["compiled_prefill"] = "skipped: the MoE's loop over experts runs eagerly (graph breaks), llama only"
        return
    res["compiled_prefill"] = {}
    for mode in args.prefill_modes.split(","):
        pe = Engine(ours, device, dtype, eng.max_context, stop_ids=[], pad_id=0, compile_decode=False,
                    compile_prefill=True, prefill_mode=mode)

        @torch.inference_mode()
        def compiled_prefill():
            h, _ = pe.prefill(ids, pos, mask, cache)
            return ours.compute_logits(h[:, -1:])

        compile_s = wall_s(compiled_prefill)
        with torch.inference_mode():
            got = compiled_prefill()
        res["compiled_prefill"][mode] = {
            "ms": time_ms(compiled_prefill, warmup=2, iters=iters), "first_call_s": compile_s,
            "logits_rel_err_vs_eager": ((got - want).norm() / want.norm()).item()}


def run_arch(args) -> dict:
    """Build one architecture, measure it, write args.out and return the results."""
    family, full_cfg, tiny_cfg, description, default_tokens = ARCHS[args.arch]
    device = torch.device("cpu") if args.tiny else torch.accelerator.current_accelerator()
    dtype = torch.float32 if args.tiny else torch.bfloat16
    decode_tokens = args.decode_tokens or default_tokens
    prompt_len, reps = args.prompt_len, args.reps
    if args.tiny:
        decode_tokens, prompt_len, args.prefill_len, reps = 8, 8, 16, 1
    torch.manual_seed(0)
    ref, ours = build(args.arch, tiny_cfg if args.tiny else full_cfg, device, dtype)
    bw = copy_bandwidth(device, 64 * 2**20 if args.tiny else 4 * 2**30)

    # tiny: eager, but through the static-shape decode path (stacked experts, tensor offset) that compiling uses
    compile_decode = False if (args.tiny or args.no_compile) else None  # None: compiled on an accelerator
    eng = Engine(ours, device, dtype, ours.config.max_position_embeddings, stop_ids=[], pad_id=0, compile_decode=compile_decode,
                 static_decode=True if args.tiny else None, compile_mode=args.compile_mode)
    weights = bytes_read_per_token(ours)  # after the engine stacked / fused its weights (views: the same bytes)
    floor_ms = weights["per_token"] / bw * 1e3
    prompt = torch.randint(1, ours.config.vocab_size, (prompt_len,)).tolist()
    res = {"env": environment(), "arch": args.arch, "model": "tiny " + family if args.tiny else description,
           "weight_bytes": weights["all_weights"], "weight_bytes_read_per_token": weights, "copy_bandwidth_GBps": bw / 1e9,
           "hbm_floor_ms_per_token": floor_ms, "hbm_floor_tok_s": 1e3 / floor_ms,
           "hbm_floor_all_weights_tok_s": bw / weights["all_weights"], "decode_tokens": decode_tokens,
           "hf_implementations": {"attention": getattr(ref.config, "_attn_implementation", None),
                                  "experts": getattr(ref.config, "_experts_implementation", None)},
           "ours_compiled": eng.compile, "ours_static_decode": eng.static,
           "compile_mode": args.compile_mode if eng.compile else None}

    if args.profile:
        profile_decode(eng, prompt, decode_tokens)
        return res
    t = time.perf_counter()
    res["ours_decode_tok_s"] = ours_decode(eng, prompt, decode_tokens, reps)
    res["ours_decode_bench_s"] = time.perf_counter() - t
    res["ours_share_of_floor"] = res["ours_decode_tok_s"] * floor_ms / 1e3
    res["hf_eager_decode_tok_s"] = hf_decode(ref, prompt, decode_tokens, reps)
    res["hf_eager_share_of_floor"] = res["hf_eager_decode_tok_s"] * floor_ms / 1e3
    if args.hf_compile:
        try:  # recorded, not hidden: the issue saw this path crash on transformers 5.17
            res["hf_static_compile_decode_tok_s"] = hf_decode(ref, prompt, decode_tokens, reps, cache_implementation="static")
        except Exception as e:  # noqa: BLE001 - any failure of the reference path is a result to report
            res["hf_static_compile_error"] = f"{type(e).__name__}: {e}"[:500]

    res["checks"] = checks(eng, ref, ours, device, dtype, prompt)
    prefill(args, res, eng, ref, ours, device, dtype)
    if torch.accelerator.is_available():
        res["peak_memory_GB"] = torch.cuda.max_memory_allocated() / 1e9
    write_json(args.out, res)
    return res


def table(results: dict[str, dict]) -> str:
    """A short markdown table of the runs (one row per architecture)."""
    lines = ["| arch | HBM floor tok/s (all weights) | ours decode tok/s (share) | transformers eager tok/s (share) "
             "| ours prefill ms eager | compiled (mode: ms) | transformers prefill ms |", "|---|---|---|---|---|---|---|"]
    for arch, r in results.items():
        if "ours_decode_tok_s" not in r:
            lines.append(f"| {arch} | run failed or profiled only | | | | | |")
            continue
        comp = r.get("compiled_prefill")
        comp = ", ".join(f"{m}: {v['ms']:.1f}" for m, v in comp.items()) if isinstance(comp, dict) else "-"
        b, n = r["prefill_shape"]
        lines.append(f"| {arch} | {r['hbm_floor_tok_s']:.0f} ({r['hbm_floor_all_weights_tok_s']:.0f}) "
                     f"| {r['ours_decode_tok_s']:.1f} ({100 * r['ours_share_of_floor']:.0f}%) "
                     f"| {r['hf_eager_decode_tok_s']:.1f} ({100 * r['hf_eager_share_of_floor']:.0f}%) "
                     f"| {r['ours_prefill_ms']:.1f} ({b}x{n}) | {comp} | {r['hf_prefill_ms']:.1f} |")
    first = next((r for r in results.values() if "env" in r), None)
    if first is not None:
        lines.append(f"{first['env']['device']}, torch {first['env']['torch']}, transformers {first['env']['transformers']}; "
                     f"copy bandwidth {first['copy_bandwidth_GBps'] / 1e3:.2f} TB/s")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", choices=["llama", "deepseek", "both"], default="llama")
    ap.add_argument("--tiny", action="store_true", help="tiny model on the CPU (fp32, eager static decode): a smoke check")
    ap.add_argument("--decode-tokens", type=int, default=None, help="default: 256 (llama), 128 (deepseek)")
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--prefill-batch", type=int, default=8)
    ap.add_argument("--prefill-len", type=int, default=512)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--no-compile", action="store_true", help="our decode step eager (no torch.compile / CUDA graphs)")
    ap.add_argument("--compile-mode", default="max-autotune", help="torch.compile mode of our decode step")
    ap.add_argument("--compile-prefill", action="store_true", help="also time our compiled prefill (llama)")
    ap.add_argument("--prefill-modes", default="default,max-autotune-no-cudagraphs",
                    help="comma-separated torch.compile modes for --compile-prefill")
    ap.add_argument("--hf-compile", action="store_true", help="also time transformers' static cache + compile path")
    ap.add_argument("--profile", action="store_true", help="print a torch.profiler table of our decode and stop")
    ap.add_argument("--out", default="llm_decode.json")
    ap.add_argument("--table", nargs="+", metavar="JSON", help="only print the table of earlier single-arch results")
    args = ap.parse_args()

    if args.table:
        results = [json.loads(Path(f).read_text()) for f in args.table]
        print(table({r.get("arch", f): r for f, r in zip(args.table, results)}))
        return

    if args.arch != "both":
        res = run_arch(args)
        if not args.profile:
            print(table({args.arch: res}) + f"\nwrote {args.out}")
        return
    results = {}
    for arch in ("llama", "deepseek"):  # one process each: the first model's memory and compiled graphs are gone
        out = str(Path(args.out).with_suffix("")) + f"_{arch}.json"
        cmd = [sys.executable, __file__, "--arch", arch, "--out", out, "--prompt-len", str(args.prompt_len),
               "--prefill-batch", str(args.prefill_batch), "--prefill-len", str(args.prefill_len), "--reps", str(args.reps),
               "--compile-mode", args.compile_mode, "--prefill-modes", args.prefill_modes]
        cmd += ["--decode-tokens", str(args.decode_tokens)] if args.decode_tokens else []
        cmd += [flag for flag, on in [("--tiny", args.tiny), ("--no-compile", args.no_compile),
                                      ("--compile-prefill", args.compile_prefill), ("--hf-compile", args.hf_compile)] if on]
        t = time.perf_counter()
        done = subprocess.run(cmd)
        print(f"[{arch}] exit {done.returncode} after {time.perf_counter() - t:.0f} s", flush=True)
        results[arch] = json.loads(Path(out).read_text()) if done.returncode == 0 else {"error": done.returncode}
    write_json(args.out, results)
    print(table(results) + f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
