"""`from gen.llm import LLM`: encode / generate / chat on a tiny saved checkpoint, bad input, and the shared registry."""
from __future__ import annotations

import threading

import pytest
import torch
from helpers import rel_err
from transformers import PreTrainedTokenizerFast
from test_llm_loader import save_tiny

from gen.llm import LLM, Encoded, get_llm
from gen.llm import registry


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_qwen2")
    ref = save_tiny(path, "qwen2")
    return path, ref


@pytest.fixture(scope="module")
def llm(folder):
    # AutoTokenizer would rebuild a Qwen2Tokenizer (model_type) from our word-level tokenizer.json: pass it explicitly
    return LLM(folder[0], device="cpu", tokenizer=PreTrainedTokenizerFast.from_pretrained(folder[0]))


def test_device_dtype_resolved(llm):
    assert llm.device == torch.device("cpu") and llm.dtype == torch.float32
    assert llm.stop_ids == [1]


def test_encode_matches_transformers(llm, folder):
    _, ref = folder
    texts = ["the cat sat on the mat", "a dog"]
    enc = llm.encode(texts, hidden_layer=-1)
    assert isinstance(enc, Encoded) and enc.hidden.shape[:2] == enc.mask.shape
    assert enc.mask.sum(-1).tolist() == [6, 2]
    for text, h in zip(texts, enc.per_prompt()):
        ids = llm.tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            want = ref(ids, output_hidden_states=True).hidden_states
        assert rel_err(h, want[-1][0]) <= 1e-5
        assert rel_err(llm.encode([text], hidden_layer=1).per_prompt()[0], want[1][0]) <= 1e-5


def test_encode_pretokenized_and_truncation(llm):
    ids = llm.tokenizer("the big red dog", add_special_tokens=False)["input_ids"]
    a, b = llm.encode(["the big red dog"]), llm.encode([ids])
    assert torch.equal(a.hidden, b.hidden)
    assert torch.equal(llm.encode(ids).hidden, b.hidden)  # one id list is one prompt
    short = llm.encode([ids], max_length=2)
    assert short.hidden.shape[1] == 2 and torch.allclose(short.hidden[0], llm.encode([ids[:2]]).hidden[0])


def test_generate_and_chat(llm, folder):
    _, ref = folder
    ids = llm.tokenizer("the cat", add_special_tokens=False, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        want = ref.generate(ids, max_new_tokens=8, do_sample=False)[0, ids.shape[1]:]
    assert llm.generate("the cat", max_new_tokens=8) == [llm.tokenizer.decode(want, skip_special_tokens=True)]
    assert len(llm.generate(["the cat", "a dog is"], max_new_tokens=4)) == 2
    one = llm.chat([{"role": "user", "content": "the cat"}], max_new_tokens=5)
    many = llm.chat([[{"role": "user", "content": "the cat"}], [{"role": "user", "content": "a dog"}]], max_new_tokens=5)
    assert isinstance(one, str) and isinstance(many, list) and many[0] == one


def test_sampling_seeded(llm):
    kw = dict(max_new_tokens=12, temperature=1.0, top_p=0.9, top_k=20)
    a = llm.generate(["the cat", "a"], seed=1, **kw)
    assert a == llm.generate(["the cat", "a"], seed=1, **kw)
    assert a != llm.generate(["the cat", "a"], seed=2, **kw)
    greedy = llm.generate("the cat", max_new_tokens=12)
    assert llm.generate("the cat", max_new_tokens=12, temperature=0.7, top_k=1, seed=3) == greedy
    assert llm.generate("the cat", max_new_tokens=12, temperature=0.7, top_p=1e-6, seed=3) == greedy


@pytest.mark.parametrize("call, match", [
    (lambda m: m.generate([], max_new_tokens=4), "empty"),
    (lambda m: m.encode([]), "empty|non-empty"),
    (lambda m: m.generate("the cat", max_new_tokens=0), "max_new_tokens.*0"),
    (lambda m: m.generate("the cat", max_new_tokens=-3), "max_new_tokens.*-3"),
    (lambda m: m.generate("the " * 60, max_new_tokens=10), "60 tokens \\+ 10 new tokens.*context of 64"),
    (lambda m: m.encode(["the " * 70]), "70 tokens.*context of 64"),
    (lambda m: m.encode(["the"], hidden_layer=7), "hidden_layer 7"),
    (lambda m: m.generate("the", temperature=-1), "temperature.*-1"),
    (lambda m: m.generate("the", top_p=0), "top_p.*0"),
    (lambda m: m.chat([]), "messages"),
])
def test_bad_input(llm, call, match):
    with pytest.raises(ValueError, match=match):
        call(llm)


def test_registry_shares_one_instance(folder):
    path, _ = folder
    registry.clear()
    got = []
    threads = [threading.Thread(target=lambda: got.append(get_llm(path, "cpu", None))) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(got) == 4 and all(g is got[0] for g in got)
    assert get_llm(str(path) + "/.", device="cpu", dtype="fp32") is got[0]  # same resolved key
    assert get_llm(path, device="cpu", dtype="bf16") is not got[0]
    assert len(registry.loaded()) == 2
    registry.clear()


def test_registry_shares_copies_of_the_same_weights(folder, tmp_path):
    """Two folders holding the same checkpoint (two models shipping one text encoder) load it once; a copy with one
    weight changed, or another tokenizer, is another instance."""
    import shutil

    from safetensors.torch import load_file, save_file

    path, _ = folder
    registry.clear()
    copies = [shutil.copytree(path, tmp_path / name) for name in ("model_a", "model_b", "changed", "retokenized")]
    weights = next(p for p in copies[2].iterdir() if p.suffix == ".safetensors")
    state = load_file(weights)
    name = sorted(state)[0]
    state[name] = state[name] + 1
    save_file(state, weights)
    (copies[3] / "tokenizer_config.json").write_text((copies[3] / "tokenizer_config.json").read_text() + " ")
    a, b, changed, retokenized = (get_llm(c, "cpu", "fp32") for c in copies)
    assert a is b and changed is not a and retokenized is not a
    assert len(registry.loaded()) == 4 and len(registry.instances()) == 3
    registry.clear()


def test_diffusers_layout_finds_sibling_tokenizer(tmp_path):
    """text_encoder/ (weights) + tokenizer/ (tokenizer) as in a diffusers pipeline folder."""
    from test_llm_loader import tiny_tokenizer

    save_tiny(tmp_path / "text_encoder", "llama")
    for f in (tmp_path / "text_encoder").glob("tokenizer*"):
        f.unlink()
    (tmp_path / "text_encoder" / "special_tokens_map.json").unlink(missing_ok=True)
    (tmp_path / "text_encoder" / "chat_template.jinja").unlink(missing_ok=True)
    tiny_tokenizer().save_pretrained(tmp_path / "tokenizer")
    from gen.llm import load_tokenizer

    tok = load_tokenizer(tmp_path / "text_encoder")
    assert tok.name_or_path == str(tmp_path / "tokenizer")


def test_concurrent_encodes_share_batched_prefills(llm):
    """encode() from several threads: calls that wait while the engine is busy run together in one prefill, each
    caller gets what it would get alone; different settings are never merged; generate stays correct alongside."""
    texts = [["the cat sat on the mat"], ["a dog"], ["the big red dog", "a cat"], ["mat"]] * 3
    alone = [llm.encode(t, hidden_layer=1) for t in texts]
    greedy = llm.generate(["the cat"], max_new_tokens=4)
    before = dict(llm.stats)
    results, outputs, start = [None] * len(texts), [], threading.Barrier(len(texts) + 1)

    def work(i):
        start.wait()
        results[i] = llm.encode(texts[i], hidden_layer=1)

    def other():
        start.wait()
        outputs.append((llm.encode(["a dog"], hidden_layer=-1), llm.generate(["the cat"], max_new_tokens=4)))

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(texts))] + [threading.Thread(target=other)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    for got, want in zip(results, alone):
        assert got.hidden.shape == want.hidden.shape and torch.equal(got.mask, want.mask)
        assert rel_err(got.hidden, want.hidden) <= 1e-5
    calls = llm.stats["encode_calls"] - before["encode_calls"]
    batches = llm.stats["encode_batches"] - before["encode_batches"]
    assert calls == len(texts) + 1 and batches < calls  # some prefills served several calls
    (enc, gen), = outputs
    assert rel_err(enc.hidden, llm.encode(["a dog"], hidden_layer=-1).hidden) <= 1e-5 and gen == greedy
