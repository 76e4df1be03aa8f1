"""FLUX.2 [dev]'s text-encoding stage: the Mistral-Small-3.1-24B text model on a 512-token padded prompt batch, our
LLM runtime vs transformers' forward, same weights, same run.

transformers' Mistral3ForConditionalGeneration is built with the 24B text config (40 layers, width 5120, 32 heads /
8 KV heads of 128, MLP 32768, vocab 131072; a one-layer Pixtral tower: FLUX.2 shows the encoder text only) with random
bf16 weights made on the GPU; ours (gen/llm Mistral3ForConditionalGeneration) is given the very same tensors. Each side
does what its pipeline does per prompt batch: ours `LLM.encode(ids, hidden_layer=[10, 20, 30], pad_to=512)` (it runs
the first 30 layers only), transformers the reference's `_get_mistral_3_small_prompt_embeds` forward (all 40 layers,
logits and every hidden state, then layers 10 / 20 / 30 stacked per token). Prompts: `--real-tokens` real tokens
(system message + prompt) then pads to 512. Batch 1 (one prompt) and 2 (a CFG-style pair). Reports ms per batch,
prompt tokens/s, our TFLOP/s, relative error of ours vs transformers' embeddings, peak memory; with
--compile-prefill also ours through Engine(compile_prefill=True) (one compiled graph per exact batch shape; the engine
then fuses our q|k|v and gate|up projections into new tensors, for both of our variants: the same results, ~29 GB more
than the 48 GB of shared weights).

  python benchmarks/flux2_encoder.py --compile-prefill --out flux2_encoder.json   # GPU (one H200, ~2 min)
  python benchmarks/flux2_encoder.py --tiny                                       # CPU smoke check, seconds
"""
from __future__ import annotations

import argparse
import sys
import types
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import cold_start_s, save_result, time_ms  # noqa: E402

LAYERS = [10, 20, 30]  # FLUX.2 [dev]'s text_encoder_out_layers
PAD_TO = 512  # its max_sequence_length: every prompt padded to this
PAD_ID = 11  # Mistral's <pad>
MISTRAL_SMALL_31_TEXT = dict(model_type="mistral", vocab_size=131072, hidden_size=5120, intermediate_size=32768,
                             num_hidden_layers=40, num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                             max_position_embeddings=131072, rms_norm_eps=1e-5, sliding_window=None,
                             rope_parameters={"rope_type": "default", "rope_theta": 1000000000.0})
TINY_TEXT = dict(model_type="mistral", vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=32,
                 num_attention_heads=2, num_key_value_heads=1, head_dim=16, max_position_embeddings=1024,
                 rms_norm_eps=1e-5, sliding_window=None, rope_parameters={"rope_type": "default", "rope_theta": 1e9})
VISION = dict(model_type="pixtral", hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
              head_dim=16, image_size=56, patch_size=14)


def build(text_cfg: dict, device, dtype):
    """transformers' model with random weights made on the device, and our LLM sharing its tensors."""
    import transformers

    from gen.llm import LLM
    from gen.llm.loader import build_model, load_state

    ids = dict(bos_token_id=1, eos_token_id=2, pad_token_id=PAD_ID)
    config = transformers.Mistral3Config(text_config={**text_cfg, **ids, "tie_word_embeddings": False},
                                         vision_config=VISION, image_token_index=10, tie_word_embeddings=False, **ids)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # built in place on the device in dtype (its RoPE buffers must be real)
    try:
        with torch.device(device):
            ref = transformers.Mistral3ForConditionalGeneration(config).eval()
    finally:
        torch.set_default_dtype(default)
    g = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02, generator=g)
    hf_config = config.to_dict() | {"architectures": ["Mistral3ForConditionalGeneration"]}
    ours = load_state(build_model(hf_config, device, dtype), dict(ref.state_dict()), tie_word_embeddings=False)
    tokenizer = types.SimpleNamespace(pad_token_id=PAD_ID, eos_token_id=2)  # ids are given: only the pad id is read
    return ref, ours, tokenizer, hf_config


def reference_embeds(ref, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """What diffusers' Flux2Pipeline._get_mistral_3_small_prompt_embeds computes: (B, 512, 3 x hidden)."""
    out = ref(input_ids=ids, attention_mask=mask, output_hidden_states=True, use_cache=False)
    stacked = torch.stack([out.hidden_states[k] for k in LAYERS], dim=1)  # (B, 3, L, D)
    b, n, length, d = stacked.shape
    return stacked.permute(0, 2, 1, 3).reshape(b, length, n * d)


def decoder_flops(hf_config: dict, batch: int, layers: int | None) -> int:
    """Matmul FLOPs of `layers` decoder layers (None: all) on batch x PAD_TO tokens: projections, MLP, attention."""
    c = hf_config["text_config"]
    d, f, h, kv = c["hidden_size"], c["intermediate_size"], c["num_attention_heads"], c["num_key_value_heads"]
    hd = c.get("head_dim") or d // h
    n = layers or c["num_hidden_layers"]
    tokens = batch * PAD_TO
    per_token = 2 * (d * h * hd + 2 * d * kv * hd + h * hd * d + 3 * d * f)
    attention = 2 * 2 * batch * PAD_TO * PAD_TO * h * hd
    return n * (tokens * per_token + attention)


def run(args) -> dict:
    from gen.llm import LLM

    device = torch.device("cpu") if args.tiny else torch.accelerator.current_accelerator()
    dtype = torch.float32 if args.tiny else torch.bfloat16
    ref, ours, tokenizer, hf_config = build(TINY_TEXT if args.tiny else MISTRAL_SMALL_31_TEXT, device, dtype)
    llm = LLM.from_parts(ours, tokenizer, hf_config, device=device, dtype=dtype, compile_decode=False, name="mistral3")
    compiled = None
    if args.compile_prefill:
        compiled = LLM.from_parts(ours, tokenizer, hf_config, device=device, dtype=dtype, compile_decode=False,
                                  name="mistral3-compiled", compile_prefill=True)
    iters, warm = (2, 1) if args.tiny else (args.iters, 3)
    vocab = hf_config["text_config"]["vocab_size"]
    rows = []
    for batch in args.batches:
        g = torch.Generator().manual_seed(batch)
        seqs = [torch.randint(100, vocab, (args.real_tokens,), generator=g).tolist() for _ in range(batch)]
        ids = torch.full((batch, PAD_TO), PAD_ID, dtype=torch.long)
        ids[:, : args.real_tokens] = torch.tensor(seqs)
        mask = (torch.arange(PAD_TO) < args.real_tokens).long().expand(batch, -1)
        ids, mask = ids.to(device), mask.to(device)

        def ours_encode(model=llm):
            return model.encode(seqs, hidden_layer=LAYERS, pad_to=PAD_TO).hidden

        def hf_forward():
            with torch.inference_mode():
                return reference_embeds(ref, ids, mask)

        row = {"batch": batch, "real_tokens": args.real_tokens, "padded_to": PAD_TO}
        want, got = hf_forward().float(), ours_encode().float()
        row["rel_err_ours_vs_transformers"] = ((got - want).norm() / want.norm()).item()
        row["flop_ours"] = decoder_flops(hf_config, batch, max(LAYERS))  # analytic: torch's flop counter
        row["flop_transformers"] = decoder_flops(hf_config, batch, None)  # cannot count GQA attention (2.11)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        row["transformers_ms"] = time_ms(hf_forward, warm, iters)
        row["ours_ms"] = time_ms(ours_encode, warm, iters)
        if compiled is not None:
            run_compiled = lambda: ours_encode(compiled)  # noqa: E731
            row["ours_compiled_cold_s"] = cold_start_s(run_compiled)
            row["ours_compiled_ms"] = time_ms(run_compiled, warm, iters)
            got_c = run_compiled().float()
            row["rel_err_ours_compiled_vs_transformers"] = ((got_c - want).norm() / want.norm()).item()
        best = min(row.get("ours_compiled_ms", float("inf")), row["ours_ms"])
        row["ratio_ours_vs_transformers"] = best / row["transformers_ms"]
        row["ours_tflops"] = row["flop_ours"] / best / 1e9
        row["ours_prompt_tokens_per_s"] = batch * PAD_TO / (best / 1e3)
        if device.type == "cuda":
            row["peak_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30
        rows.append(row)
        print(f"done batch {batch}", flush=True)
    return {"env": environment(), "model": "tiny Mistral 3" if args.tiny else "Mistral-Small-3.1-24B text (random bf16)",
            "layers": LAYERS, "rows": rows}


def environment() -> dict:
    import transformers

    name = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    return {"device": name, "torch": torch.__version__, "transformers": transformers.__version__}


def table(result: dict) -> str:
    cols = ["batch", "real_tokens", "padded_to", "transformers_ms", "ours_ms", "ours_compiled_ms",
            "ratio_ours_vs_transformers", "ours_tflops", "ours_prompt_tokens_per_s", "rel_err_ours_vs_transformers",
            "ours_compiled_cold_s", "peak_mem_gib"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in result["rows"]:
        lines.append("| " + " | ".join(f"{r[c]:.4g}" if isinstance(r.get(c), float) else str(r.get(c, ""))
                                       for c in cols) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tiny", action="store_true", help="a tiny Mistral 3 on the CPU (smoke check)")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 2])
    p.add_argument("--real-tokens", type=int, default=128, help="real prompt tokens before the padding (<= 512)")
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--compile-prefill", action="store_true", help="also time ours with the compiled prefill")
    p.add_argument("--out", default=None, help="JSON path (default: $OUT/flux2_encoder.json when $OUT is set)")
    args = p.parse_args(argv)
    if not 0 < args.real_tokens <= PAD_TO:
        p.error(f"--real-tokens must be in 1..{PAD_TO}, got {args.real_tokens}")
    torch.manual_seed(0)
    result = run(args)
    save_result(args.out, "flux2_encoder.json", result)
    print(result["env"], result["model"])
    print(table(result))
    return result


if __name__ == "__main__":
    main()
