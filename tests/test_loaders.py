"""Component loaders: model_index parsing, weights (sharded, variants, meta + assign), and their error messages."""
from __future__ import annotations

import json
import shutil

import pytest
import torch
from diffusers import FluxTransformer2DModel
from safetensors.torch import load_file, save_file

from component_loaders import LOADERS, load_components
from component_loaders.model_index import read_model_index
from component_loaders.weights import find_weight_files
from gen.device import resolve_device, resolve_dtype
from gen.families import DITS
from gen.loading import load_dit
from gen.models.flux import FluxTransformer
from gen.types import GenError
from helpers import rel_err

CPU = torch.device("cpu")


@pytest.fixture
def flux_copy(tmp_path, flux_dev_path):
    dst = tmp_path / "flux"
    shutil.copytree(flux_dev_path, dst)
    return dst


def test_model_index(flux_dev_path):
    index = read_model_index(flux_dev_path)
    assert index.class_name == "FluxPipeline"
    assert index.components["transformer"] == ("diffusers", "FluxTransformer2DModel")
    assert index.components["image_encoder"] is None  # [null, null] slots are empty
    assert all(spec in LOADERS or spec[1] in DITS for spec in index.components.values() if spec)


def test_load_components(flux_dev_path):
    comps = load_components(flux_dev_path, CPU, torch.float32, own_models=DITS)
    assert isinstance(comps["transformer"], FluxTransformer)
    assert type(comps["vae"]).__name__ == "AutoencoderKL"
    assert type(comps["scheduler"]).__name__ == "FlowMatchEulerDiscreteScheduler"
    assert not any(p.is_meta for p in comps["transformer"].parameters())


@pytest.mark.parametrize("variant", [None, "fp16"])
def test_sharded_and_variant_weights_from_diffusers_save_pretrained(tmp_path, flux_dev_path, variant):
    ref = FluxTransformer2DModel.from_pretrained(flux_dev_path / "transformer")
    folder = tmp_path / "transformer"
    saved = ref.to(torch.float16) if variant == "fp16" else ref
    saved.save_pretrained(folder, max_shard_size="100KB", variant=variant)
    assert len(list(folder.glob("*.safetensors"))) > 1  # really sharded
    files = find_weight_files(folder)  # variant=None picks the only variant there is
    assert len(files) > 1
    ours = load_dit(folder, device=CPU, dtype=torch.float32)
    for name, p in saved.state_dict().items():
        expected = p.float()
        assert torch.equal(ours.state_dict()[name], expected), name


def test_own_transformer_matches_diffusers_after_load(flux_dev_path):
    ref = FluxTransformer2DModel.from_pretrained(flux_dev_path / "transformer").eval()
    ours = load_dit(flux_dev_path / "transformer", device=CPU, dtype=torch.float32)
    g = torch.Generator().manual_seed(0)
    x, txt = torch.randn(1, 16, 16, generator=g), torch.randn(1, 7, 32, generator=g)
    kw = dict(hidden_states=x, encoder_hidden_states=txt, pooled_projections=torch.randn(1, 32, generator=g),
              timestep=torch.tensor([0.5]), guidance=torch.tensor([3.5]),
              img_ids=torch.rand(16, 3, generator=g) * 4, txt_ids=torch.zeros(7, 3))
    with torch.no_grad():
        assert rel_err(ours(**kw), ref(**kw, return_dict=False)[0]) <= 1e-5


def _expect(match, fn, *args, **kwargs):
    with pytest.raises(GenError, match=match) as info:
        fn(*args, **kwargs)
    return info.value


def test_bad_folders(tmp_path, flux_copy):
    _expect("does not exist", read_model_index, tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    _expect("model_index.json is missing", read_model_index, tmp_path / "empty")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "model_index.json").write_text('{\n "_class_name": "FluxPipeline",\n oops}')
    _expect(r"not valid JSON \(line 3", read_model_index, tmp_path / "bad")
    (tmp_path / "bad" / "model_index.json").write_text('{"vae": ["diffusers", "AutoencoderKL"]}')
    _expect("_class_name", read_model_index, tmp_path / "bad")
    shutil.rmtree(flux_copy / "vae")
    err = _expect("component folder .*vae.* is missing", load_components, flux_copy, CPU, torch.float32, own_models=DITS)
    assert err.param == "model_path"


def test_unknown_component_class(flux_copy):
    index = json.loads((flux_copy / "model_index.json").read_text())
    index["vae"] = ["diffusers", "AutoencoderTiny"]
    (flux_copy / "model_index.json").write_text(json.dumps(index))
    _expect("no loader for component class.*AutoencoderTiny", load_components, flux_copy, CPU, torch.float32, own_models=DITS)


def test_missing_weight_file(flux_copy):
    (flux_copy / "transformer" / "diffusion_pytorch_model.safetensors").unlink()
    _expect(r"no \*\.safetensors weights in .*transformer", load_components, flux_copy, CPU, torch.float32, own_models=DITS)


def _edit_transformer_weights(folder, edit):
    f = folder / "transformer" / "diffusion_pytorch_model.safetensors"
    state = load_file(f)
    edit(state)
    save_file(state, f)


def test_missing_weight_named(flux_copy):
    _edit_transformer_weights(flux_copy, lambda s: s.pop("proj_out.weight"))
    _expect(r"missing weights: proj_out\.weight", load_components, flux_copy, CPU, torch.float32, own_models=DITS)


def test_misshaped_weight_named(flux_copy):
    def edit(s):
        s["proj_out.bias"] = torch.zeros(3)
    _edit_transformer_weights(flux_copy, edit)
    _expect(r"wrong shape: proj_out\.bias \(checkpoint \(3,\), model \(16,\)\)", load_components, flux_copy, CPU,
            torch.float32, own_models=DITS)


def test_unexpected_weight_reported(flux_copy, caplog):
    def edit(s):
        s["extra.weight"] = torch.zeros(2)
    _edit_transformer_weights(flux_copy, edit)
    comps = load_components(flux_copy, CPU, torch.float32, own_models=DITS)
    assert "extra.weight" in caplog.text and comps["transformer"] is not None


def test_missing_text_encoder_weight_named(flux_copy):
    f = flux_copy / "text_encoder" / "model.safetensors"
    state = load_file(f)
    state.pop("final_layer_norm.weight")
    save_file(state, f, metadata={"format": "pt"})
    _expect("missing weights.*final_layer_norm", load_components, flux_copy, CPU, torch.float32, own_models=DITS)


def test_several_variants_need_a_choice(tmp_path, flux_dev_path):
    ref = FluxTransformer2DModel.from_pretrained(flux_dev_path / "transformer")
    ref.save_pretrained(tmp_path, variant="fp16")
    ref.save_pretrained(tmp_path, variant="bf16")
    _expect("several weight variants", find_weight_files, tmp_path)
    assert find_weight_files(tmp_path, "bf16")[0].name == "diffusion_pytorch_model.bf16.safetensors"
    _expect("no 'fp8' variant", find_weight_files, tmp_path, "fp8")


def test_device_and_dtype_resolution():
    assert resolve_device(None).type in {"cpu"} or resolve_device(None).type
    assert resolve_device("cpu") == CPU
    assert resolve_dtype(None, CPU) == torch.float32
    assert resolve_dtype("bf16", CPU) == torch.bfloat16
    _expect("unknown dtype 'float8'", resolve_dtype, "float8", CPU)
    _expect("unknown device 'gpu0'", resolve_device, "gpu0")
