"""Parity of gen/llm/models/qwen2_5_vl.py with transformers' Qwen2_5_VLForConditionalGeneration (text, text + images)."""
from __future__ import annotations

import pytest
import torch
import transformers
from helpers import rel_err

from gen.llm.engine import Engine
from gen.llm.loader import load_model
from gen.llm.models import model_class
from gen.llm.sampling import SamplingParams

IMG, VSTART, VEND = 150, 152, 153


def tiny_config():
    return transformers.Qwen2_5_VLConfig(
        text_config=dict(vocab_size=160, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, max_position_embeddings=512, eos_token_id=None, pad_token_id=0,
                         bos_token_id=None, rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]}),
        vision_config=dict(depth=3, hidden_size=32, intermediate_size=48, num_heads=2, out_hidden_size=64, patch_size=14,
                           spatial_merge_size=2, temporal_patch_size=2, window_size=56, fullatt_block_indexes=[1]),
        image_token_id=IMG, video_token_id=151, vision_start_token_id=VSTART, vision_end_token_id=VEND)


def ours_from_ref(ref):
    cls = model_class("Qwen2_5_VLForConditionalGeneration")
    ours = cls(cls.Config.from_hf(ref.config.to_dict())).eval()
    state = {}
    for k, v in ref.state_dict().items():  # transformers' in-memory names -> checkpoint names
        k = k.replace("model.language_model.", "model.").replace("model.visual.", "visual.")
        state[k] = v
    ours.load_state_dict(state, strict=True)
    return ours


@pytest.fixture(scope="module")
def pair():
    torch.manual_seed(0)
    ref = transformers.Qwen2_5_VLForConditionalGeneration(tiny_config()).eval()
    return ours_from_ref(ref), ref


def test_text_only(pair):
    ours, ref = pair
    ids = torch.randint(1, 140, (2, 13), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = ref(ids, output_hidden_states=True)
        last, hidden = ours(ids, torch.arange(13)[None].expand(2, -1), torch.ones_like(ids, dtype=torch.bool), output_hidden_states=True)
    for a, b in zip(hidden, want.hidden_states):
        assert rel_err(a, b) <= 1e-5
    assert rel_err(ours.compute_logits(last), want.logits) <= 1e-5


def test_greedy_text(pair):
    ours, ref = pair
    prompt = torch.randint(1, 140, (1, 6), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want = ref.generate(prompt, max_new_tokens=32, do_sample=False)[0, 6:].tolist()
    eng = Engine(ours, torch.device("cpu"), torch.float32, 512, stop_ids=[], pad_id=0)
    assert eng.generate([prompt[0].tolist()], SamplingParams(max_new_tokens=32))[0] == want


def image_prompt(grids, g, text_before=3, text_after=4):
    """Token ids with one <vision_start> image-pad* <vision_end> per image, and random pixel patches for them."""
    ids, pixels = [], []
    for t, h, w in grids:
        ids += torch.randint(1, 140, (text_before,), generator=g).tolist() + [VSTART] + [IMG] * (t * h * w // 4) + [VEND]
        pixels.append(torch.randn(t * h * w, 3 * 2 * 14 * 14, generator=g))
    ids += torch.randint(1, 140, (text_after,), generator=g).tolist()
    return ids, torch.cat(pixels)


def test_vision_tower(pair):
    ours, ref = pair
    g = torch.Generator().manual_seed(3)
    grid = torch.tensor([[1, 8, 12], [2, 4, 4]])  # a 2x3-window image (window 56px = 2 merged units) and a 2-frame one
    pixels = torch.randn(int(grid.prod(-1).sum()), 3 * 2 * 14 * 14, generator=g)
    with torch.no_grad():
        want = torch.cat(ref.model.get_image_features(pixels, grid).pooler_output)
        got = ours.visual(pixels, grid)
    assert rel_err(got, want) <= 1e-5


def test_text_and_images(pair):
    ours, ref = pair
    g = torch.Generator().manual_seed(4)
    grids = [[1, 8, 12], [1, 4, 6]]
    ids, pixels = image_prompt(grids, g)
    ids_t = torch.tensor([ids])
    with torch.no_grad():
        want = ref(ids_t, pixel_values=pixels, image_grid_thw=torch.tensor(grids), mm_token_type_ids=(ids_t == IMG).int(),
                   output_hidden_states=True)
        last, hidden = ours(ids_t, torch.arange(len(ids))[None], torch.ones_like(ids_t, dtype=torch.bool),
                            output_hidden_states=True, pixel_values=pixels, image_grid_thw=torch.tensor(grids))
    for a, b in zip(hidden, want.hidden_states):
        assert rel_err(a, b) <= 1e-5
    assert rel_err(ours.compute_logits(last), want.logits) <= 1e-5


def test_images_left_padded_batch(pair):
    """A left-padded batch of two image prompts gives each prompt's hidden states as when run alone."""
    ours, _ = pair
    g = torch.Generator().manual_seed(5)
    (a, pa), (b, pb) = image_prompt([[1, 4, 4]], g, 2, 2), image_prompt([[1, 4, 8]], g, 5, 6)
    t = max(len(a), len(b))
    ids = torch.tensor([[0] * (t - len(a)) + a, [0] * (t - len(b)) + b])
    mask = ids != 0
    grid = torch.tensor([[1, 4, 4], [1, 4, 8]])
    with torch.no_grad():
        batch, _ = ours(ids, torch.zeros_like(ids), mask, pixel_values=torch.cat([pa, pb]), image_grid_thw=grid)
        for i, (p, px) in enumerate([(a, pa), (b, pb)]):
            alone, _ = ours(torch.tensor([p]), torch.zeros(1, len(p), dtype=torch.long), torch.ones(1, len(p), dtype=torch.bool),
                            pixel_values=px, image_grid_thw=grid[i:i + 1])
            assert rel_err(batch[i, t - len(p):], alone[0]) <= 1e-5


def test_loads_save_pretrained(pair, tmp_path):
    _, ref = pair
    ref.save_pretrained(tmp_path)
    model, _ = load_model(tmp_path, torch.device("cpu"), torch.float32)
    want = ours_from_ref(ref).state_dict()
    got = model.state_dict()
    assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in got)


def test_llm_encode_with_images(pair):
    """LLM.encode(ids, pixel_values=..., image_grid_thw=...) equals transformers' hidden states (batch of two)."""
    from gen.llm import LLM

    ours, ref = pair
    g = torch.Generator().manual_seed(6)
    (a, pa), (b, pb) = image_prompt([[1, 4, 4]], g, 2, 2), image_prompt([[1, 4, 8]], g, 5, 6)

    class Tok:  # encode takes pre-tokenized ids: the tokenizer is only asked for its pad id
        pad_token_id, eos_token_id = 0, None

    llm = LLM.from_parts(ours, Tok(), ref.config.to_dict(), device="cpu")
    enc = llm.encode([a, b], hidden_layer=-2, pixel_values=torch.cat([pa, pb]), image_grid_thw=torch.tensor([[1, 4, 4], [1, 4, 8]]))
    for ids, px, grid, h in [(a, pa, [[1, 4, 4]], enc.per_prompt()[0]), (b, pb, [[1, 4, 8]], enc.per_prompt()[1])]:
        ids_t = torch.tensor([ids])
        with torch.no_grad():
            want = ref(ids_t, pixel_values=px, image_grid_thw=torch.tensor(grid), mm_token_type_ids=(ids_t == IMG).int(),
                       output_hidden_states=True).hidden_states[-2][0]
        assert rel_err(h, want) <= 1e-5
    with pytest.raises(ValueError, match="together"):
        llm.encode([a], pixel_values=pa)
