"""LoRAs on FLUX.1's text encoders (gen/lora/formats.py TEXT_FORMATS, gen/transforms/lora.py): parity with diffusers'
FluxPipeline.load_lora_weights + set_adapters for files with transformer and CLIP keys (diffusers / PEFT and kohya
`lora_te1_`), one and two LoRAs at different scales, PSNR >= 40 dB; the CLIP and T5 outputs equal PEFT's on
transformers' models (rel err <= 1e-5; T5 LoRAs, which diffusers' FLUX loader drops, against PEFT alone and a
reference pipeline whose T5 carries the PEFT adapter); fused == unfused, unfusing bit-exact; unknown text-encoder
keys refused by name; no stale embeddings between requests with and without a text-encoder LoRA, one after the
other or at once."""
from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from diffusers import FluxPipeline
from safetensors.torch import load_file, save_file

from gen import GenError, Generator
from gen.lora import read_lora
from gen.lora.formats import FLUX
from helpers import psnr, rel_err, run_together
from lora_reference import ASSETS, LORAS, Parity, Reference, first
from stages.text_encode import encode_clip_pooled, encode_t5

TE = LORAS / "flux-tiny-te"
DIFFUSERS, KOHYA, T5 = (TE / f"{n}.safetensors" for n in ("diffusers", "kohya", "t5"))
KW = dict(prompt="a red circle on a blue background", seed=3, num_inference_steps=2, height=32, width=32,
          guidance_scale=3.5)
PROMPTS = ["a red circle on a blue background", "two small green squares"]
T5_TARGETS = ["q", "k", "v", "o", "wi_0", "wi_1", "wo"]


@pytest.fixture(scope="module")
def ours():
    return Generator.from_pretrained(ASSETS / "flux-tiny", device="cpu")


@pytest.fixture(scope="module")
def ref():
    return Reference(FluxPipeline, ASSETS / "flux-tiny")


@pytest.fixture(scope="module")
def parity(ours, ref):
    return Parity(ours, ref, KW)


def encodings(pipeline, prompts=PROMPTS):
    """(CLIP pooled, T5 hidden states) of `prompts` through the pipeline's own encoders."""
    c = pipeline.components
    pooled = encode_clip_pooled(c["tokenizer"], c["text_encoder"], prompts, torch.device("cpu"), torch.float32)
    seq, _ = encode_t5(c["tokenizer_2"], c["text_encoder_2"], prompts, 32, torch.device("cpu"), torch.float32,
                       masked=False)
    return pooled, seq


def t5_peft(t5, file=T5, name="t5"):
    """PEFT's adapter on transformers' T5 with `file`'s `lora_te2_` matrices (kohya names: the PEFT module path with
    dots as underscores; alpha 8 on rank 4 in the file, the same in the config)."""
    from peft import LoraConfig, set_peft_model_state_dict

    t5.add_adapter(LoraConfig(r=4, lora_alpha=8, target_modules=T5_TARGETS), adapter_name=name)
    tensors = load_file(file)
    state = {}
    for module, m in t5.named_modules():
        key = "lora_te2_" + module.replace(".", "_")
        if hasattr(m, "lora_A") and f"{key}.lora_down.weight" in tensors:
            assert float(tensors[f"{key}.alpha"]) == 8.0
            state[f"{module}.lora_A.weight"] = tensors[f"{key}.lora_down.weight"]
            state[f"{module}.lora_B.weight"] = tensors[f"{key}.lora_up.weight"]
    assert len(state) == 2 * 7 * t5.config.num_layers
    result = set_peft_model_state_dict(t5, state, adapter_name=name)
    assert not result.unexpected_keys
    t5.set_adapter(name)


def test_files_are_read_into_both_parts():
    d = read_lora(DIFFUSERS, FLUX)
    assert d.format == "diffusers / PEFT + diffusers / PEFT (CLIP)" and set(d.encoders) == {"text_encoder"}
    assert len(d.encoders["text_encoder"]) == 12 and d.pairs  # 2 layers x 6 linears, and the transformer's
    pair = d.encoders["text_encoder"]["encoder.layers.0.self_attn.q_proj"]
    raw = load_file(DIFFUSERS)["text_encoder.encoder.layers.0.self_attn.q_proj.lora_A.weight"]
    assert torch.allclose(pair.down, raw * 6 / 4)  # the metadata's text_encoder lora_alpha 6 over rank 4
    k = read_lora(KOHYA, FLUX)
    assert k.format == "kohya / sd-scripts + kohya / sd-scripts (CLIP)"
    assert "encoder.layers.1.mlp.fc2" in k.encoders["text_encoder"]
    t = read_lora(T5, FLUX)
    assert set(t.encoders) == {"text_encoder", "text_encoder_2"} and not t.pairs and not t.deltas
    assert "encoder.block.1.layer.1.DenseReluDense.wi_0" in t.encoders["text_encoder_2"]


def _clip_dotted(flat: str) -> str:
    """sd-scripts' flat CLIP module name back to transformers' dotted one (for writing the other forms)."""
    m = re.fullmatch(r"text_model_encoder_layers_(\d+)_(self_attn|mlp)_(\w+)", flat)
    return f"text_model.encoder.layers.{m[1]}.{m[2]}.{m[3]}"


def _t5_dotted(flat: str) -> str:
    m = re.fullmatch(r"encoder_block_(\d+)_layer_(\d)_(SelfAttention|DenseReluDense)_(\w+)", flat)
    return f"encoder.block.{m[1]}.layer.{m[2]}.{m[3]}.{m[4]}"


@pytest.mark.parametrize("form", ["lora_te_", "comfyui", "peft-flattened", "peft-text_model"])
def test_every_clip_and_t5_key_form_reads_the_same_pairs(tmp_path, form):
    """The T5 file's CLIP and T5 halves rewritten in the other declared forms read as the same pairs: kohya's
    `lora_te_`, ComfyUI's `text_encoders.clip_l.transformer.` / `.t5xxl.transformer.` (lora_down/up + alpha), PEFT's
    `text_encoder.` / `text_encoder_2.` (lora_A/B + alpha) with and without CLIP's `text_model.` level."""
    want = read_lora(T5, FLUX)
    out = {}
    for key, value in load_file(T5).items():
        module, _, suffix = key.partition(".")
        clip = module.startswith("lora_te1_")
        name = module[len("lora_te1_" if clip else "lora_te2_"):]
        if form == "lora_te_":
            key = ("lora_te_" if clip else "lora_te2_") + name + "." + suffix
        else:
            dotted = _clip_dotted(name) if clip else _t5_dotted(name)
            if form == "comfyui":
                key = f"text_encoders.{'clip_l' if clip else 't5xxl'}.transformer.{dotted}.{suffix}"
            else:
                if form == "peft-flattened":
                    dotted = dotted.removeprefix("text_model.")
                suffix = suffix.replace("lora_down", "lora_A").replace("lora_up", "lora_B")
                key = f"{'text_encoder' if clip else 'text_encoder_2'}.{dotted}.{suffix}"
        out[key] = value
    save_file(out, tmp_path / "form.safetensors")
    got = read_lora(tmp_path / "form.safetensors", FLUX)
    assert got.encoders.keys() == want.encoders.keys()
    for slot, pairs in want.encoders.items():
        assert got.encoders[slot].keys() == pairs.keys()
        for path, pair in pairs.items():
            assert torch.equal(got.encoders[slot][path].down, pair.down) and torch.equal(got.encoders[slot][path].up,
                                                                                        pair.up)


@pytest.mark.parametrize("loras", [
    [(DIFFUSERS, 1.0)],
    [(KOHYA, 1.3)],
    [(DIFFUSERS, 0.8), (KOHYA, -0.6)],
    [(KOHYA, 1.5), (LORAS / "flux-tiny" / "diffusers.safetensors", 0.7)],  # one with text-encoder keys, one without
], ids=["diffusers", "kohya", "two", "with-transformer-only"])
def test_flux_with_text_encoder_loras_matches_diffusers(parity, loras):
    parity.check(loras, changed_below=38)


def test_text_encoder_outputs_match_peft(ours, ref):
    """CLIP (diffusers' load_lora_weights puts PEFT on it) and T5 (PEFT on transformers' T5) outputs with the LoRAs
    set, two at different scales: rel err <= 1e-5 against the reference's encoders."""
    with ours.pipeline.loras.use([]):  # (a set stays in until another is asked for)
        plain = encodings(ours.pipeline)
    ref.pipe.load_lora_weights(str(DIFFUSERS), adapter_name="a")
    ref.pipe.load_lora_weights(str(KOHYA), adapter_name="b")
    ref.pipe.set_adapters(["a", "b"], [0.8, -0.6])
    try:
        with ours.pipeline.loras.use([(DIFFUSERS, 0.8), (KOHYA, -0.6)]):
            got = encodings(ours.pipeline)
        want = encodings(ref.pipe)
    finally:
        ref.pipe.unload_lora_weights()
    assert rel_err(got[0], want[0]) <= 1e-5 and rel_err(got[0], plain[0]) > 1e-2  # the CLIP LoRA does something
    assert torch.equal(got[1], plain[1])  # no T5 keys in these files: T5 untouched
    t5 = ref.pipe.text_encoder_2
    t5_peft(t5)
    try:
        with ours.pipeline.loras.use([(T5, 1.0)]):
            got = encodings(ours.pipeline)
        want = encodings(ref.pipe)[1]
    finally:
        t5.delete_adapter("t5")
    assert rel_err(got[1], want) <= 1e-5 and rel_err(got[1], plain[1]) > 1e-2


def test_flux_with_a_t5_lora_matches_a_reference_whose_t5_carries_it(parity, ref):
    """diffusers' FLUX loader reads the file's CLIP half and drops its T5 keys (sd-scripts' `lora_te2_`); the
    reference pipeline gets the T5 half through PEFT on its text_encoder_2."""
    ref.pipe.load_lora_weights(str(T5), adapter_name="t")
    ref.pipe.set_adapters(["t"], [1.4])
    t5_peft(ref.pipe.text_encoder_2)
    ref.pipe.text_encoder_2.set_adapter("t5")
    from peft.tuners.lora import LoraLayer

    for m in ref.pipe.text_encoder_2.modules():  # PEFT's scale for the request's 1.4
        if isinstance(m, LoraLayer):
            m.set_scale("t5", 1.4)
    try:
        kw = dict(KW)
        want = ref.pipe(generator=torch.Generator("cpu").manual_seed(kw.pop("seed")), **kw).images[0]
    finally:
        ref.pipe.unload_lora_weights()
        ref.pipe.text_encoder_2.delete_adapter("t5")
    got = first(parity.ours.generate(**KW, loras=[(T5, 1.4)]))
    assert psnr(got, want) >= 40 and psnr(got, parity.base) < 38


def test_fused_equals_unfused_and_unfusing_restores_the_encoders_bit_for_bit(ours):
    fused = Generator.from_pretrained(ASSETS / "flux-tiny", device="cpu", fuse_lora=True)
    encoders = {s: fused.pipeline.components[s] for s in ("text_encoder", "text_encoder_2")}
    before = {s: {k: v.clone() for k, v in m.state_dict().items()} for s, m in encoders.items()}
    loras = [(KOHYA, 0.9), (T5, -1.1)]
    with fused.pipeline.loras.use(loras):
        f_enc = encodings(fused.pipeline)
        assert not any(torch.equal(v, before["text_encoder"][k]) for k, v in encoders["text_encoder"].state_dict()
                       .items() if k.endswith("q_proj.weight"))  # merged into the weights
    with ours.pipeline.loras.use(loras):
        u_enc = encodings(ours.pipeline)
    assert rel_err(f_enc[0], u_enc[0]) <= 1e-5 and rel_err(f_enc[1], u_enc[1]) <= 1e-5
    got, want = fused.generate(**KW, loras=loras).images[0], ours.generate(**KW, loras=loras).images[0]
    assert psnr(got, want) >= 40
    assert [d["targets"] for d in fused.pipeline.loras.describe()] == [["transformer", "text_encoder"],
                                                                        ["text_encoder", "text_encoder_2"]]
    fused.pipeline.loras.set([])
    for s, m in encoders.items():
        assert all(torch.equal(v, before[s][k]) for k, v in m.state_dict().items()), s


def test_no_stale_embeddings_after_a_text_encoder_lora(ours, tmp_path):
    """A LoRA on the text encoder only changes the picture through the embeddings; the request after it, without
    LoRAs, gives the plain picture bit for bit, and concurrent requests with and without it get their own."""
    te_only = tmp_path / "te_only.safetensors"
    save_file({k: v for k, v in load_file(DIFFUSERS).items() if k.startswith("text_encoder.")}, te_only)
    base = np.asarray(ours.generate(**KW, loras=[]).images[0])
    with_te = np.asarray(ours.generate(**KW, loras=[(te_only, 1.5)]).images[0])
    after = np.asarray(ours.generate(**KW, loras=[]).images[0])
    assert psnr(with_te, base) < 38 and np.array_equal(after, base)
    batched = Generator.from_pretrained(ASSETS / "flux-tiny", device="cpu", max_batch=2, batch_wait_ms=50)
    sets = [[(te_only, 1.5)], [], [(T5, 1.0)], []]
    alone = [np.asarray(batched.generate(**KW, loras=s).images[0]) for s in sets]
    assert np.array_equal(alone[1], base)
    results = run_together(lambda s: np.asarray(batched.generate(**KW, loras=s).images[0]), sets)
    for got, want in zip(results, alone):
        assert psnr(got, want) >= 40


def test_text_encoder_keys_matching_no_module_are_refused_by_name(ours, tmp_path):
    base = np.asarray(ours.generate(**KW, loras=[]).images[0])
    t = dict(load_file(KOHYA))
    bad = ["text_encoder.encoder.layers.0.self_attn.qq_proj.lora_A.weight",
           "lora_te1_text_model_encoder_layers_0_mlp_fc3.lora_down.weight", "text_encoders.t5xxl.shared.lora_A.weight",
           "te1.text_model.encoder.layers.0.mlp.fc1.lora_A.weight"]
    for key in bad:
        save_file({**t, key: torch.zeros(4, 32)}, tmp_path / "bad.safetensors")
        with pytest.raises(GenError, match=rf"1 text-encoder keys match no FLUX.1 text-encoder module we know \({re.escape(key)};"):
            read_lora(tmp_path / "bad.safetensors", FLUX)
    # a layer the tiny CLIP lacks (it has 2): read, then refused when applied, naming the layer
    deep = {k.replace("layers_1_", "layers_7_"): v for k, v in t.items()}
    save_file(deep, tmp_path / "deep.safetensors")
    with pytest.raises(GenError, match="adapts encoder.layers.7.mlp.fc1, which this text_encoder lacks"):
        ours.generate(**KW, loras=[(tmp_path / "deep.safetensors", 1.0)])
    # CLIP matrices of another width: the shapes named
    wide = {k: (torch.zeros(v.shape[0], 64) if "lora_te1_" in k and k.endswith("lora_down.weight") else v)
            for k, v in t.items()}
    save_file(wide, tmp_path / "wide.safetensors")
    with pytest.raises(GenError, match=r"is 32 -> \d+ in this text_encoder, the LoRA's is 64 -> \d+"):
        ours.generate(**KW, loras=[(tmp_path / "wide.safetensors", 1.0)])
    assert np.array_equal(np.asarray(ours.generate(**KW, loras=[]).images[0]), base)  # refused sets left nothing on
