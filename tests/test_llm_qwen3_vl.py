"""Parity of gen/llm/models/qwen3_vl.py with transformers' Qwen3VLForConditionalGeneration (text, vision tower with
DeepStack, text + images) and with Qwen-Image 2.1's prompt encoder in diffusers; tiny random configs, fp32 CPU."""
from __future__ import annotations

import pytest
import torch
import transformers
from helpers import rel_err

from gen.llm import LLM
from gen.llm.engine import Engine
from gen.llm.loader import load_model
from gen.llm.models import model_class
from gen.llm.sampling import SamplingParams

IMG, VID, VSTART, VEND = 150, 151, 152, 153
PATCH = 3 * 2 * 16 * 16  # channels * temporal patch * patch * patch


def tiny_config():
    return transformers.Qwen3VLConfig(
        text_config=dict(vocab_size=160, hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
                         num_key_value_heads=2, head_dim=16, max_position_embeddings=512, eos_token_id=None,
                         pad_token_id=0, bos_token_id=None,
                         rope_parameters={"rope_type": "default", "rope_theta": 5000.0, "mrope_section": [2, 3, 3],
                                          "mrope_interleaved": True}),
        vision_config=dict(depth=3, hidden_size=32, intermediate_size=48, num_heads=2, out_hidden_size=64, patch_size=16,
                           spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=16,
                           deepstack_visual_indexes=[0, 2]),
        image_token_id=IMG, video_token_id=VID, vision_start_token_id=VSTART, vision_end_token_id=VEND,
        tie_word_embeddings=False)


def ours_from_ref(ref):
    cls = model_class("Qwen3VLForConditionalGeneration")
    ours = cls(cls.Config.from_hf(ref.config.to_dict())).eval()
    state = {k.replace("model.language_model.", "model.").replace("model.visual.", "visual."): v
             for k, v in ref.state_dict().items()}  # transformers' names -> ours
    ours.load_state_dict(state, strict=True)
    return ours


@pytest.fixture(scope="module")
def pair():
    torch.manual_seed(0)
    ref = transformers.Qwen3VLForConditionalGeneration(tiny_config()).eval()
    with torch.no_grad():  # the init's tiny vision weights would hide mistakes in the vision tower
        for name, p in ref.model.visual.named_parameters():
            p.copy_(1 + 0.1 * torch.randn_like(p) if "norm" in name else 0.1 * torch.randn_like(p))
    return ours_from_ref(ref), ref


def forward_ref(ref, ids, **images):
    kw = {}
    if images:
        kw = dict(images, mm_token_type_ids=(ids == IMG).int())
    with torch.no_grad():
        return ref(ids, output_hidden_states=True, **kw)


def test_text_only(pair):
    ours, ref = pair
    ids = torch.randint(1, 140, (2, 13), generator=torch.Generator().manual_seed(1))
    want = forward_ref(ref, ids)
    with torch.no_grad():
        last, hidden = ours(ids, torch.arange(13)[None].expand(2, -1), torch.ones_like(ids, dtype=torch.bool),
                            output_hidden_states=True)
    assert len(hidden) == len(want.hidden_states) == 5
    for a, b in zip(hidden, want.hidden_states):
        assert rel_err(a, b) <= 1e-5
    assert rel_err(ours.compute_logits(last), want.logits) <= 1e-5


def test_greedy_text(pair):
    ours, ref = pair
    prompt = torch.randint(1, 140, (1, 6), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want = ref.generate(prompt, max_new_tokens=32, min_new_tokens=32, do_sample=False)[0, 6:].tolist()
    eng = Engine(ours, torch.device("cpu"), torch.float32, 512, stop_ids=[], pad_id=0)
    assert eng.generate([prompt[0].tolist()], SamplingParams(max_new_tokens=32))[0] == want


def test_vision_tower_and_deepstack(pair):
    """Merged tokens and DeepStack features; grids above, equal to and below the 4x4 learned position grid, 2 frames."""
    ours, ref = pair
    grid = torch.tensor([[1, 8, 12], [2, 4, 4], [1, 2, 2], [1, 6, 4]])
    pixels = torch.randn(int(grid.prod(-1).sum()), PATCH, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want = ref.model.get_image_features(pixels, grid)
        got, deep = ours.visual(pixels, grid)
    assert rel_err(got, torch.cat(want.pooler_output)) <= 1e-5
    assert len(deep) == len(want.deepstack_features) == 2
    for a, b in zip(deep, want.deepstack_features):
        assert rel_err(a, torch.cat(b)) <= 1e-5


def image_prompt(grids, g, text_before=3, text_after=4):
    """Token ids with one <vision_start> image-pad* <vision_end> per image, and random pixel patches for them."""
    ids, pixels = [], []
    for t, h, w in grids:
        ids += torch.randint(1, 140, (text_before,), generator=g).tolist() + [VSTART] + [IMG] * (t * h * w // 4) + [VEND]
        pixels.append(torch.randn(t * h * w, PATCH, generator=g))
    ids += torch.randint(1, 140, (text_after,), generator=g).tolist()
    return ids, torch.cat(pixels)


def test_text_and_images(pair):
    """Hidden states of every layer (DeepStack adds after layers 0 and 1, reported before the add) and logits."""
    ours, ref = pair
    g = torch.Generator().manual_seed(4)
    grids = [[1, 8, 12], [1, 4, 6]]
    ids, pixels = image_prompt(grids, g)
    ids_t = torch.tensor([ids])
    want = forward_ref(ref, ids_t, pixel_values=pixels, image_grid_thw=torch.tensor(grids))
    with torch.no_grad():
        last, hidden = ours(ids_t, torch.arange(len(ids))[None], torch.ones_like(ids_t, dtype=torch.bool),
                            output_hidden_states=True, pixel_values=pixels, image_grid_thw=torch.tensor(grids))
    for a, b in zip(hidden, want.hidden_states):
        assert rel_err(a, b) <= 1e-5
    assert rel_err(ours.compute_logits(last), want.logits) <= 1e-5


def test_loads_save_pretrained(pair, tmp_path):
    _, ref = pair
    ref.save_pretrained(tmp_path)
    model, _ = load_model(tmp_path, torch.device("cpu"), torch.float32)
    want = ours_from_ref(ref).state_dict()
    got = model.state_dict()
    assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in got)


def test_llm_encode_images_batch(pair):
    """LLM.encode of a left-padded batch of two image prompts, layers [2, -1] before the final norm, equals
    transformers run on each prompt alone (Qwen-Image 2.1 reads the last layer before the norm)."""
    ours, ref = pair
    g = torch.Generator().manual_seed(6)
    (a, pa), (b, pb) = image_prompt([[1, 4, 4]], g, 2, 2), image_prompt([[1, 4, 8]], g, 5, 6)

    class Tok:  # encode takes pre-tokenized ids: the tokenizer is only asked for its pad id
        pad_token_id, eos_token_id = 0, None

    llm = LLM.from_parts(ours, Tok(), ref.config.to_dict(), device="cpu")
    enc = llm.encode([a, b], hidden_layer=[2, -1], final_norm=False, pixel_values=torch.cat([pa, pb]),
                     image_grid_thw=torch.tensor([[1, 4, 4], [1, 4, 8]]))
    handle = ref.model.language_model.norm.register_forward_hook(lambda module, args, output: args[0])
    try:
        for ids, px, grid, h in [(a, pa, [[1, 4, 4]], enc.per_prompt()[0]), (b, pb, [[1, 4, 8]], enc.per_prompt()[1])]:
            hs = forward_ref(ref, torch.tensor([ids]), pixel_values=px, image_grid_thw=torch.tensor(grid)).hidden_states
            assert rel_err(h, torch.cat([hs[2][0], hs[-1][0]], -1)) <= 1e-5
    finally:
        handle.remove()


def test_config_refuses_plain_mrope():
    d = tiny_config().to_dict()
    d["text_config"]["rope_parameters"]["mrope_interleaved"] = False
    with pytest.raises(ValueError, match="mrope_interleaved"):
        model_class("Qwen3VLForConditionalGeneration").Config.from_hf(d)


WORDS = "system user assistant Comprehend and analyze the provided prompt. a red star make it blue big cat <image1> <image2>"


class Processor:
    """What diffusers' get_qwenimage21_prompt_embeds asks of a Qwen3VLProcessor (the real class needs torchvision for its
    video half): the system-message template, the tokenizer, and image-pad expansion by grid as Qwen3VLProcessor does."""

    def __init__(self):
        from tokenizers import Tokenizer, models, pre_tokenizers

        vocab = {t: i for i, t in enumerate(["<pad>", "<unk>", "<|im_start|>", "<|im_end|>"] + WORDS.split())}
        vocab.update({"<|image_pad|>": IMG, "<|video_pad|>": VID, "<|vision_start|>": VSTART, "<|vision_end|>": VEND})
        tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
        tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
        specials = ["<|im_start|>", "<|im_end|>", "<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>"]
        self.tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", unk_token="<unk>",
                                                              additional_special_tokens=specials)
        self.image_processor = transformers.Qwen2VLImageProcessorPil(
            patch_size=16, merge_size=2, temporal_patch_size=2, size={"shortest_edge": 32 * 32, "longest_edge": 96 * 96})

    def apply_chat_template(self, messages, tokenize=True, return_dict=False):
        text = "".join(f"<|im_start|>{m['role']}\n" + "".join(c["text"] for c in m["content"]) + "<|im_end|>\n"
                       for m in messages)
        return [self.tokenizer(text)["input_ids"]]

    def __call__(self, text, images=None, padding=True, padding_side="left", return_tensors="pt"):
        feats = dict(self.image_processor(images=images, return_tensors="pt")) if images else {}
        grids = iter(feats["image_grid_thw"].tolist() if images else [])
        expanded = []
        for t in text:
            first, *rest = t.split("<|image_pad|>")
            expanded.append(first + "".join("<|image_pad|>" * (g[0] * g[1] * g[2] // 4) + r
                                            for r, g in zip(rest, grids)))  # rest first: zip stops before a grid
        enc = self.tokenizer(expanded, padding=padding, padding_side=padding_side, return_tensors=return_tensors)
        return transformers.BatchFeature({**enc, **feats, "mm_token_type_ids": (enc["input_ids"] == IMG).int()})


@pytest.mark.parametrize("with_images", [False, True])
def test_qwen_image_21_prompt_embeds(pair, with_images):
    """LLM.encode(final_norm=False) of the processor's ids, less the system prefix, equals diffusers' Qwen-Image 2.1
    prompt encoder (left-padded batch, last layer before the norm; edit: two condition images per prompt)."""
    import numpy as np
    from diffusers.modular_pipelines.qwenimage21.encoders import get_qwenimage21_prompt_embeds
    from PIL import Image

    ours, ref = pair
    proc = Processor()
    rng = np.random.default_rng(7)
    images = [Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)) for h, w in ((50, 70), (90, 40))]
    prompts = ["make it blue", "a big red star and a cat"]
    images = images if with_images else None
    want, want_mask, _ = get_qwenimage21_prompt_embeds(ref, proc, prompts, image=images, device="cpu")
    template = ("<|im_start|>system\nComprehend and analyze the provided prompt.<|im_end|>\n<|im_start|>user\n"
                + ("<image1><|vision_start|><|image_pad|><|vision_end|> <image2><|vision_start|><|image_pad|><|vision_end|>"
                   if images else "") + "{}<|im_end|>\n<|im_start|>assistant\n")
    inputs = proc(text=[template.format(p) for p in prompts], images=images * len(prompts) if images else None)
    ids = [row[m.bool()].tolist() for row, m in zip(inputs["input_ids"], inputs["attention_mask"])]
    llm = LLM.from_parts(ours, proc.tokenizer, ref.config.to_dict(), device="cpu")
    vision = {"pixel_values": inputs["pixel_values"], "image_grid_thw": inputs["image_grid_thw"]} if images else {}
    enc = llm.encode(ids, hidden_layer=-1, final_norm=False, **vision)
    drop = len(proc.apply_chat_template([{"role": "system", "content": [
        {"type": "text", "text": "Comprehend and analyze the provided prompt."}]}])[0])
    for i, h in enumerate(enc.per_prompt()):
        n = int(want_mask[i].sum())
        assert h.shape[0] - drop == n
        assert rel_err(h[drop:], want[i, :n]) <= 1e-5
