"""gen-shapes' prompt reader (gen/models/prompt_reader.py; loaded by component_loaders/gguf_encoder.py, used by
QwenImageLLMPipeline.read_prompt): a prompt the model reads as it is goes to the DiT unchanged, any other one-object
prompt is drawn from the sentence the reader writes (shown as revised_prompt), two objects are left as they are; the
reader's config and files are checked with the bad part named; the shipped reader's sentences are ones the model
reads as they are, and it reads its own training vocabulary."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from component_loaders.gguf_encoder import load_gguf_text_encoder
from gen import Generator
from gen.llm.gguf import smollm2_path
from gen.models.prompt_reader import COUNT, SCALE, PromptReader, PromptReaderConfig, pack_state, unpack_state
from gen.types import GenError
from stages.enhance_prompt import PromptGuide
from training.shapes import world

try:
    smollm2_path()
except FileNotFoundError as e:
    pytest.skip(str(e), allow_module_level=True)

MODEL = Path(__file__).resolve().parents[1] / "assets" / "gen-shapes"
SMALL = dict(height=64, width=64, num_inference_steps=2, seed=5)


@pytest.fixture(scope="module")
def generator():
    return Generator.from_pretrained(MODEL, device="cpu", dtype="fp32")


def shipped_config() -> dict:
    return json.loads((MODEL / "text_encoder" / "reader_config.json").read_text())


# ---------------------------------------------------------------- in the pipeline

def test_prompt_the_model_reads_as_is_is_not_read(generator):
    prompt = "a small red circle at the top left on a blue background"
    assert generator.prompt_guide.read_as_is(prompt)
    result = generator.generate(prompt, **SMALL)
    assert result.revised_prompt is None and "read_prompt" not in result.timings
    assert result.request.prompt == prompt


def test_other_prompt_is_drawn_from_the_readers_sentence(generator):
    prompt = "kindly sketch one little crimson round thing, upper left, set on blue"
    pipe = generator.pipeline
    hidden, mask = pipe.encoder.encode([prompt])
    values = {k: v for k, (v, _) in pipe.encoder.reader.read(hidden, mask)[0].items()}
    assert values.pop(COUNT) == "1"
    sentence = pipe.encoder.reader.sentence(values)
    assert generator.prompt_guide.read_as_is(sentence)

    result = generator.generate(prompt, **SMALL)
    assert result.revised_prompt == sentence and result.request.prompt == prompt
    assert result.timings["read_prompt"] > 0
    direct = generator.generate(sentence, **SMALL)
    assert direct.revised_prompt is None
    np.testing.assert_array_equal(np.asarray(result.images[0]), np.asarray(direct.images[0]))


def test_two_objects_go_to_the_dit_as_they_are(generator):
    prompt = "a red triangle on the left and a yellow circle on the right on a blue background"  # no sizes
    assert not generator.prompt_guide.read_as_is(prompt)
    assert generator.pipeline.read_prompt(prompt) is None
    assert generator.generate(prompt, **SMALL).revised_prompt is None


def test_empty_or_unreadable_prompts_are_left_to_validation(generator):
    assert generator.pipeline.read_prompt("") is None and generator.pipeline.read_prompt("   ") is None
    with pytest.raises(GenError, match="prompt"):
        generator.generate("", **SMALL)


# ---------------------------------------------------------------- the shipped reader

def test_shipped_readers_sentences_are_read_as_is():
    reader = PromptReader(PromptReaderConfig.from_dict(shipped_config()))
    guide = PromptGuide.load(MODEL)
    heads = {k: v for k, v in reader.config.heads.items() if k != COUNT}
    rng = np.random.default_rng(0)
    for _ in range(300):
        values = {k: vs[rng.integers(len(vs))] for k, vs in heads.items()}
        assert guide.read_as_is(reader.sentence(values)), reader.sentence(values)


def test_shipped_reader_reads_its_training_vocabulary(generator):
    rng = np.random.default_rng(3)
    rows = []
    while len(rows) < 40:
        scene = world.sample_scene(rng, "train", two_object_rate=0.0)
        rows.append((world.caption(scene, rng, "augmented"), scene))
    pipe = generator.pipeline
    hidden, mask = pipe.encoder.encode([t for t, _ in rows])
    right = 0
    for read, (_, scene) in zip(pipe.encoder.reader.read(hidden, mask), rows):
        o = scene.objects[0]
        want = {"size": o.size, "color": o.color, "shape": o.shape, "position": o.position,
                "background": scene.background, COUNT: "1"}
        right += all(read[k][0] == v for k, v in want.items())
    assert right >= 38, right


def test_short_prompt_reads_with_the_defaults(generator):
    assert generator.pipeline.read_prompt("a red circle") == \
        "a medium red circle in the center on a white background"


def test_factored_head_reads_as_the_product_of_its_own_and_its_factors_probabilities():
    """A head with factors (a position's row and column) is read as the normalized product of its own probability
    and its factors': a head unsure between two values is decided by the factor that tells them apart."""
    cfg = PromptReaderConfig.from_dict({
        **GOOD, "heads": {"size": ["small", "large"], "where": ["top left", "top right", "left"], COUNT: ["1", "2"]},
        "phrases": {"size": {"small": "s", "large": "l"}, "where": {p: p for p in ("top left", "top right", "left")}},
        "sentence": "a {size} thing {where}",
        "factors": {"where": {"row": {"top left": "top", "top right": "top", "left": "middle"},
                              "column": {"top left": "left", "top right": "right", "left": "left"}}}})
    assert list(cfg.outputs) == ["size", "where", COUNT, "where row", "where column"]
    assert cfg.outputs["where row"] == ["top", "middle"] and cfg.outputs["where column"] == ["left", "right"]
    reader = PromptReader(cfg)
    probs = [torch.tensor([[0.9, 0.1]]), torch.tensor([[0.4, 0.1, 0.5]]), torch.tensor([[1.0, 0.0]]),
             torch.tensor([[0.8, 0.2]]), torch.tensor([[0.9, 0.1]])]
    combined = reader.combined(probs)
    want = torch.tensor([0.4 * 0.8 * 0.9, 0.1 * 0.8 * 0.1, 0.5 * 0.2 * 0.9])
    torch.testing.assert_close(combined[1], (want / want.sum())[None])
    assert int(combined[1].argmax()) == 0  # "left" alone was likelier; its row says "top"
    assert all(c is p for i, (c, p) in enumerate(zip(combined, probs)) if i != 1)
    reader.probabilities = lambda hidden, mask: probs  # read() uses the product
    assert reader.read(torch.zeros(1, 3, 8), torch.ones(1, 3, dtype=torch.bool))[0]["where"][0] == "top left"


# ---------------------------------------------------------------- config and files

GOOD = dict(hidden_size=8, hidden_layer=2, width=8, num_attention_heads=2, members=1,
            heads={"size": ["small", "large"], COUNT: ["1", "2"]}, phrases={"size": {"small": "s", "large": "l"}},
            sentence="a {size} thing")


@pytest.mark.parametrize("change, message", [
    (dict(width=7), "not a multiple of num_attention_heads"),
    (dict(members=0), "members must be an integer >= 1"),
    (dict(hidden_layer=True), "hidden_layer must be an integer"),
    (dict(heads={"size": ["small", "large"]}), "'objects'"),
    (dict(heads={"size": ["small"], COUNT: ["1", "2"]}), "at least two values"),
    (dict(sentence="a thing"), "one field per head"),
    (dict(phrases={"size": {"small": "s"}}), "a phrase for every value"),
    (dict(dropout=1.5), "dropout"),
    (dict(optional={"size": "small"}), "optional must map"),
    (dict(optional={"size": ["tiny"]}), "optional must map"),
    (dict(factors={"size": {"row": {"small": "a"}}}), "factors must map"),
    (dict(factors={"size": {"row": {"small": "a", "large": "a"}}}), "factors must map"),  # one factor value
    (dict(factors={"color": {"row": {"small": "a", "large": "b"}}}), "factors must map"),
])
def test_bad_reader_config_is_named(change, message):
    with pytest.raises(ValueError, match=message):
        PromptReaderConfig.from_dict({**GOOD, **change})
    assert PromptReaderConfig.from_dict(GOOD).to_dict()["sentence"] == "a {size} thing"


@pytest.fixture()
def encoder_folder(tmp_path):
    folder = tmp_path / "text_encoder"
    shutil.copytree(MODEL / "text_encoder", folder)
    return folder


def test_reader_loads_with_its_encoder(encoder_folder):
    enc = load_gguf_text_encoder(encoder_folder, "GGUFTextEncoder", torch.device("cpu"), torch.float32)
    assert enc.reader is not None and not enc.reader.training
    (encoder_folder / "reader_config.json").unlink()
    (encoder_folder / "reader.safetensors").unlink()
    assert load_gguf_text_encoder(encoder_folder, "GGUFTextEncoder", torch.device("cpu"), torch.float32).reader is None


def test_reader_file_problems_are_named(encoder_folder):
    def load():
        return load_gguf_text_encoder(encoder_folder, "GGUFTextEncoder", torch.device("cpu"), torch.float32)

    weights = encoder_folder / "reader.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 3])  # truncated
    with pytest.raises(GenError, match="not a readable safetensors"):
        load()
    weights.unlink()
    with pytest.raises(GenError, match="without reader.safetensors"):
        load()
    cfg = shipped_config()
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in PromptReader(PromptReaderConfig.from_dict(
        {**cfg, "width": cfg["width"] // 2})).state_dict().items()}, str(weights))
    with pytest.raises(GenError, match="does not fit reader_config.json"):
        load()
    packed = pack_state(PromptReader(PromptReaderConfig.from_dict(cfg)).state_dict())
    name = next(k for k, v in packed.items() if v.dtype == torch.int8)
    save_file({k: v for k, v in packed.items() if k != name + SCALE}, str(weights))  # an int8 matrix, no scale
    with pytest.raises(GenError, match=f"{name} is int8 without a per-row scale"):
        load()
    (encoder_folder / "reader_config.json").write_text(json.dumps({**cfg, "hidden_layer": cfg["hidden_layer"] + 1}))
    with pytest.raises(GenError, match="hidden_layer .* is not the text encoder's"):
        load()


def test_stored_reader_is_int8_matrices_with_row_scales():
    """reader.safetensors holds each matrix as int8 with a scale per row (half of float16's bytes): unpacked, every
    weight is within 0.6 of a step (its row's scale) of the original (half a step of rounding, the float16 scale's
    own rounding times up to 127), and the small tensors are float16."""
    torch.manual_seed(0)
    state = PromptReader(PromptReaderConfig.from_dict(shipped_config())).state_dict()
    packed = pack_state(state)
    back = unpack_state(packed)
    assert set(back) == set(state)
    for k, v in state.items():
        if v.ndim == 2 and v.shape[1] >= 16:
            assert packed[k].dtype == torch.int8 and packed[k + SCALE].shape == (v.shape[0], 1)
            step = v.abs().amax(1, keepdim=True) / 127
            assert ((back[k] - v).abs() <= step * 0.6 + 1e-6).all()
        else:
            assert packed[k].dtype == torch.float16 and torch.allclose(back[k], v, rtol=1e-3, atol=1e-4)
    from safetensors.torch import load_file

    shipped = load_file(str(MODEL / "text_encoder" / "reader.safetensors"))
    assert any(v.dtype == torch.int8 for v in shipped.values())  # the shipped file is stored this way
