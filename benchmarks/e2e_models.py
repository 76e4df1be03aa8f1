"""The models of benchmarks/e2e.py (issue 21): FLUX.1-dev, Qwen-Image, Wan2.1-I2V-14B 480p, each built once with random
weights and run by diffusers' pipeline and by ours on the same tensors.

Per model (`SPECS`): its components' configs at real size (with --tiny: read from the tiny asset's folder, the same
building code), built directly on the device in the run's dtype with one seed; diffusers' pipeline over them; our
pipeline over the SAME tensors (our DiT built on meta and assigned the diffusers model's tensors; Qwen-Image's text
encoder: our LLM runtime assigned the transformers model's tensors, as our loader would load it; tokenizers, the
other text / image encoders, VAE and scheduler are the same objects); a workload's request and diffusers call; the
DiT FLOPs of one denoising step counted from the config and token counts (`dit_flops`); the issue's published peer
figures and targets. Tokenizers are the tiny assets' (no download); their ids fit the real vocabularies, T5 / umT5
prompts are padded to 512 tokens as in the real pipelines, so every model sees the real shapes.
"""
from __future__ import annotations

import json
import types
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
ASSETS = ROOT / "assets"


@dataclass(frozen=True)
class Workload:
    """One row of the benchmark: a model at one size and step count. `per_step`: seconds per denoising step are
    measured (from `steps` timed steps) rather than a whole generation (Wan I2V)."""

    model: str
    height: int
    width: int
    steps: int
    frames: int | None = None
    per_step: bool = False

    @property
    def label(self) -> str:
        size = f"{self.width}x{self.height}" if self.width != self.height else f"{self.height}^2"
        frames = f" {self.frames}f" if self.frames else ""
        steps = f"{self.steps} steps timed (s/step)" if self.per_step else f"{self.steps} steps"
        return f"{SPECS[self.model].title} {size}{frames}, {steps}"

    @property
    def size(self) -> tuple:
        return (self.height, self.width, self.frames)


# ---------------------------------------------------------------- building


def building_on(device: torch.device, dtype: torch.dtype):
    from benchmarks.e2e_flux import building_on as on

    return on(device, dtype)


def read_config(folder: Path) -> dict:
    """A component folder's config.json (scheduler_config.json / preprocessor_config.json for those)."""
    for name in ("config.json", "scheduler_config.json", "preprocessor_config.json"):
        if (folder / name).is_file():
            return json.loads((folder / name).read_text())
    raise FileNotFoundError(f"{folder} has no config file")


def load_tokenizer(folder: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(folder))


def image_processor_class():
    """transformers' PIL-backed CLIP image processor (no torchvision needed), as the tiny assets name it."""
    import transformers

    return getattr(transformers, "CLIPImageProcessorPil", None) or transformers.CLIPImageProcessor


def make(library: str, class_name: str, config: dict):
    """One component from its config dict (a config.json's content), random weights, on the current default device
    and dtype (see building_on)."""
    if library == "diffusers":
        import diffusers

        return getattr(diffusers, class_name).from_config(config)
    import transformers

    cls = getattr(transformers, class_name)
    return cls(cls.config_class.from_dict(config)).eval()


def check_built(modules: dict, device: torch.device, dtype: torch.dtype) -> None:
    for slot, module in modules.items():
        if isinstance(module, torch.nn.Module):
            dtypes = {p.dtype for p in module.parameters()}
            devices = {p.device.type for p in module.parameters()}
            if dtypes != {dtype} or devices != {device.type}:
                raise RuntimeError(f"{slot} was built with dtypes {dtypes} on {devices}, "
                                   f"expected {dtype} on {device.type}")


def param_counts(modules: dict) -> dict[str, int]:
    return {slot: sum(p.numel() for p in m.parameters()) for slot, m in modules.items()
            if isinstance(m, torch.nn.Module)}


def our_dit(ref: torch.nn.Module) -> torch.nn.Module:
    """Our DiT for diffusers model `ref` (its family's declaration), built on meta and assigned `ref`'s tensors."""
    from gen.config import config_from_dict
    from gen.families import DITS

    dit = DITS[type(ref).__name__]
    with torch.device("meta"):
        ours = dit.model(config_from_dict(dit.config, dict(ref.config)))
    ours.load_state_dict(ref.state_dict(), assign=True)
    return ours.eval()


class Spec:
    """A model of the benchmark; subclasses fill in the parts that differ."""

    name: str
    title: str
    asset: str  # the tiny asset folder under assets/
    pipeline_class: str  # model_index _class_name (ours and diffusers' share it)
    classes: dict[str, tuple[str, str]]  # slot -> (library, class) of model_index.json
    extra: dict = {}  # model_index.json's non-component keys
    parallel: str = "cfg"  # how ours runs on 2 GPUs: "ulysses", "ring" or "cfg"

    # ---- configs and building

    def real_configs(self, tokenizers: dict) -> dict[str, dict]:
        raise NotImplementedError

    def configs(self, tiny: bool, tokenizers: dict) -> dict[str, dict]:
        if not tiny:
            return self.real_configs(tokenizers)
        return {slot: read_config(ASSETS / self.asset / slot) for slot, (lib, _) in self.classes.items()
                if not slot.startswith("tokenizer")}

    def build(self, tiny: bool, device: torch.device, dtype: torch.dtype, seed: int = 0) -> dict[str, Any]:
        """Every component of the model folder: tokenizers from the tiny asset, the rest random, built on `device`
        in `dtype` (schedulers and processors on the host), seeded so every rank builds the same weights."""
        tokenizers = {slot: load_tokenizer(ASSETS / self.asset / slot) for slot in self.classes
                      if slot.startswith("tokenizer")}
        cfgs = self.configs(tiny, tokenizers)
        torch.manual_seed(seed)
        modules: dict[str, Any] = dict(tokenizers)
        with building_on(device, dtype):
            for slot, (library, cls) in self.classes.items():
                if slot in modules or slot == "scheduler" or slot == "image_processor":
                    continue
                modules[slot] = make(library, cls, cfgs[slot]).eval()
        modules["scheduler"] = make(*self.classes["scheduler"], cfgs["scheduler"])
        if "image_processor" in self.classes:
            modules["image_processor"] = image_processor_class()(**{k: v for k, v in cfgs["image_processor"].items()
                                                                    if k != "image_processor_type"})
        check_built(modules, device, dtype)
        for slot in tokenizers:
            vocab = cfgs[slot.replace("tokenizer", "text_encoder")]
            vocab = (vocab.get("text_config") or vocab).get("vocab_size") or vocab.get("vocab_size")
            if len(tokenizers[slot]) > vocab:
                raise ValueError(f"{slot}: the tokenizer has {len(tokenizers[slot])} ids but the text encoder's "
                                 f"vocab_size is {vocab}")
        return modules

    def dit_class_name(self) -> str:
        """Our DiT class for this model's transformer (its family's declaration)."""
        from gen.families import DITS

        return DITS[self.classes["transformer"][1]].model.__name__

    # ---- the two pipelines

    def diffusers_pipeline(self, modules: dict):
        import diffusers

        cls = getattr(diffusers, self.pipeline_class)
        pipe = cls(**{slot: modules[slot] for slot in self.classes}, **self.extra)
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def our_modules(self, modules: dict, device: torch.device, dtype: torch.dtype) -> dict:
        """The components our pipeline runs: the same objects, but our DiT (sharing the diffusers model's tensors) and
        the scheduler our loader loads (our sync-free UniPC where its config is supported)."""
        ours = {**modules, "transformer": our_dit(modules["transformer"])}
        sched = modules.get("scheduler")
        if type(sched).__name__ == "UniPCMultistepScheduler":
            from gen.schedulers.unipc import UniPCScheduler, unsupported

            if not unsupported(dict(sched.config)):
                ours["scheduler"] = UniPCScheduler.from_config(dict(sched.config))
        return ours

    def our_pipeline(self, modules: dict, device: torch.device, dtype: torch.dtype):
        from component_loaders import Components
        from component_loaders.model_index import ModelIndex
        from gen.families import pipeline_class

        index = ModelIndex(path=Path(f"<in-memory {self.title}-sized folder>"), class_name=self.pipeline_class,
                           components=dict(self.classes), extra=dict(self.extra))
        return pipeline_class(self.pipeline_class)(Components(index=index, modules=modules), device, dtype)

    # ---- a workload

    def request(self, work: Workload, prompt: str, seed: int, image: Image.Image | None):
        raise NotImplementedError

    def diffusers_kwargs(self, work: Workload, prompt: str, seed: int, image: Image.Image | None) -> dict:
        raise NotImplementedError

    def input_image(self, work: Workload) -> Image.Image | None:
        return None

    def dit_flops(self, config, work: Workload, modules: dict, prompt: str) -> dict:
        """{"per_step": FLOPs of one denoising step (all its DiT calls), "formula": how they were counted, ...}."""
        raise NotImplementedError

    def workloads(self, args) -> list[Workload]:
        raise NotImplementedError

    peers: dict = {}  # (workload key, gpus) -> published figure (text)
    targets: dict = {}  # (workload key, gpus) -> the target (seconds, or s/step for per_step rows)

    def key(self, work: Workload) -> tuple:
        return (work.height, work.width, work.steps) if not work.per_step else (work.height, work.width, work.frames)


def listed(value: str | None, default: str) -> list[int]:
    """A comma-separated list of positive integers (`default` when not given); ValueError naming a bad item."""
    items = []
    for item in (value or default).split(","):
        if not item.strip().isdigit() or int(item) < 1:
            raise ValueError(f"expected a comma-separated list of positive integers, got {value!r}")
        items.append(int(item))
    return items


def double_stream_flops(d: int, layers: int, img: int, txt: int) -> int:
    """MMDiT double-stream blocks (FLUX double blocks, Qwen-Image blocks) and FLUX single blocks alike: per token
    12 d^2 multiply-adds in linears (q, k, v, out: 4 d^2; MLP ratio 4: 8 d^2; FLUX single: 3 d^2 + 4 d^2 in,
    5 d^2 out), i.e. 24 d^2 L FLOPs, plus 4 L^2 d for attention (QK^T and PV) over the joint sequence L."""
    seq = img + txt
    return layers * (24 * d * d * seq + 4 * seq * seq * d)


# ---------------------------------------------------------------- FLUX.1-dev


class FluxSpec(Spec):
    name, title, asset, pipeline_class = "flux", "FLUX.1-dev", "flux-tiny", "FluxPipeline"
    classes = {"tokenizer": ("transformers", "CLIPTokenizer"), "text_encoder": ("transformers", "CLIPTextModel"),
               "tokenizer_2": ("transformers", "T5Tokenizer"), "text_encoder_2": ("transformers", "T5EncoderModel"),
               "transformer": ("diffusers", "FluxTransformer2DModel"), "vae": ("diffusers", "AutoencoderKL"),
               "scheduler": ("diffusers", "FlowMatchEulerDiscreteScheduler")}
    parallel = "ulysses"
    guidance = 3.5
    peers = {(1024, 1024, 50, 1): "SGLang 6.7-7.4 s", (1024, 1024, 50, 2): "SGLang 4.24 s",
             (1024, 1024, 28, 1): "xDiT 4.30 s (compiled)"}
    targets = {(1024, 1024, 50, 1): 6.5, (1024, 1024, 50, 2): 4.0}

    def real_configs(self, tokenizers):
        from benchmarks.e2e_flux import REAL

        clip, t5 = tokenizers["tokenizer"], tokenizers["tokenizer_2"]
        return {"text_encoder": {**REAL["clip"], "bos_token_id": clip.bos_token_id, "eos_token_id": clip.eos_token_id,
                                 "pad_token_id": clip.pad_token_id},  # CLIP pools at the tokenizer's end-of-text id
                "text_encoder_2": {**REAL["t5"], "pad_token_id": t5.pad_token_id, "eos_token_id": t5.eos_token_id},
                "transformer": dict(REAL["transformer"]), "vae": dict(REAL["vae"]),
                "scheduler": dict(REAL["scheduler"])}

    def request(self, work, prompt, seed, image):
        from gen.types import GenerationRequest

        return GenerationRequest(prompt=prompt, seed=seed, num_inference_steps=work.steps,
                                 guidance_scale=self.guidance, height=work.height, width=work.width)

    def diffusers_kwargs(self, work, prompt, seed, image):
        return dict(prompt=prompt, height=work.height, width=work.width, num_inference_steps=work.steps,
                    guidance_scale=self.guidance, max_sequence_length=512,
                    generator=torch.Generator("cpu").manual_seed(seed), output_type="pil")

    def dit_flops(self, c, work, modules, prompt):
        d = c.num_attention_heads * c.attention_head_dim
        img, txt = (work.height // 16) * (work.width // 16), 512  # 2x2-packed latent tokens; T5 padded to 512
        blocks = double_stream_flops(d, c.num_layers + c.num_single_layers, img, txt)
        embed = 2 * img * c.in_channels * d * 2 + 2 * txt * c.joint_attention_dim * d  # x_embedder, proj_out, context
        return {"per_step": blocks + embed, "calls_per_step": 1, "image_tokens": img, "text_tokens": [txt],
                "formula": f"({c.num_layers} + {c.num_single_layers} blocks) x (24 d^2 L + 4 L^2 d) + embedders, "
                           f"d = {d}, L = image + {txt} text tokens; one call per step (guidance embedded, no CFG)"}

    def workloads(self, args):
        return [Workload(self.name, size, size, steps) for size in listed(args.sizes, "64" if args.tiny else "1024")
                for steps in listed(args.steps, "2,3" if args.tiny else "28,50")]


# ---------------------------------------------------------------- Qwen-Image

# Qwen/Qwen-Image's text_encoder (Qwen2.5-VL-7B-Instruct) in transformers 5's layout. The text-to-image encode runs
# only the language model: the vision tower is built with one block (its real width) to save memory and build time.
QWEN25_VL_7B = {
    "architectures": ["Qwen2_5_VLForConditionalGeneration"], "model_type": "qwen2_5_vl",
    "image_token_id": 151655, "video_token_id": 151656, "vision_start_token_id": 151652,
    "vision_end_token_id": 151653, "vocab_size": 152064, "tie_word_embeddings": False,
    "text_config": {"model_type": "qwen2_5_vl_text", "hidden_size": 3584, "intermediate_size": 18944,
                    "num_hidden_layers": 28, "num_attention_heads": 28, "num_key_value_heads": 4,
                    "hidden_act": "silu", "max_position_embeddings": 128000, "rms_norm_eps": 1e-6,
                    "vocab_size": 152064, "bos_token_id": 151643, "eos_token_id": 151645, "use_sliding_window": False,
                    "sliding_window": None, "max_window_layers": 28, "attention_dropout": 0.0,
                    "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0,
                                        "mrope_section": [16, 24, 24]}},
    "vision_config": {"model_type": "qwen2_5_vl_vision", "depth": 1, "hidden_size": 1280, "intermediate_size": 3420,
                      "num_heads": 16, "out_hidden_size": 3584, "patch_size": 14, "spatial_merge_size": 2,
                      "temporal_patch_size": 2, "window_size": 112, "fullatt_block_indexes": [0],
                      "hidden_act": "silu", "in_channels": 3, "tokens_per_second": 2},
}
QWEN_IMAGE_SCHEDULER = {  # Qwen/Qwen-Image scheduler/scheduler_config.json
    "base_image_seq_len": 256, "base_shift": 0.5, "invert_sigmas": False, "max_image_seq_len": 8192,
    "max_shift": 0.9, "num_train_timesteps": 1000, "shift": 1.0, "shift_terminal": 0.02, "stochastic_sampling": False,
    "time_shift_type": "exponential", "use_beta_sigmas": False, "use_dynamic_shifting": True,
    "use_exponential_sigmas": False, "use_karras_sigmas": False}


class QwenImageSpec(Spec):
    name, title, asset, pipeline_class = "qwen-image", "Qwen-Image", "qwen-image-tiny", "QwenImagePipeline"
    classes = {"tokenizer": ("transformers", "Qwen2Tokenizer"),
               "text_encoder": ("transformers", "Qwen2_5_VLForConditionalGeneration"),
               "transformer": ("diffusers", "QwenImageTransformer2DModel"),
               "vae": ("diffusers", "AutoencoderKLQwenImage"),
               "scheduler": ("diffusers", "FlowMatchEulerDiscreteScheduler")}
    parallel = "cfg"
    true_cfg, negative = 4.0, " "
    peers = {(1024, 1024, 50, 1): "SGLang 12.8 s", (1024, 1024, 50, 2): "SGLang 6.7 s (CFG parallel)"}
    targets = {(1024, 1024, 50, 1): 12.0, (1024, 1024, 50, 2): 6.3}

    def real_configs(self, tokenizers):
        return {"text_encoder": QWEN25_VL_7B,
                "transformer": dict(patch_size=2, in_channels=64, out_channels=16, num_layers=60,
                                    attention_head_dim=128, num_attention_heads=24, joint_attention_dim=3584,
                                    guidance_embeds=False, axes_dims_rope=(16, 56, 56)),
                "vae": dict(base_dim=96, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2, attn_scales=[],
                            temperal_downsample=[False, True, True], dropout=0.0),  # latents mean / std: defaults
                "scheduler": QWEN_IMAGE_SCHEDULER}

    def our_modules(self, modules, device, dtype):
        """Our DiT, and our LLM runtime for the text encoder (what our loader loads for Qwen2.5-VL), both assigned the
        reference models' tensors."""
        from gen.llm import LLM
        from gen.llm.loader import build_model, load_state

        ref = modules["text_encoder"]
        hf_config = ref.config.to_dict() | {"architectures": ["Qwen2_5_VLForConditionalGeneration"]}
        model = load_state(build_model(hf_config, device, dtype), dict(ref.state_dict()), tie_word_embeddings=False)
        llm = LLM.from_parts(model, modules["tokenizer"], hf_config, device=device, dtype=dtype, compile_decode=False,
                             name="qwen2.5-vl (benchmark)")
        return {**super().our_modules(modules, device, dtype), "text_encoder": llm}

    def request(self, work, prompt, seed, image):
        from gen.types import GenerationRequest

        return GenerationRequest(prompt=prompt, negative_prompt=self.negative, seed=seed,
                                 num_inference_steps=work.steps, true_cfg_scale=self.true_cfg, height=work.height,
                                 width=work.width)

    def diffusers_kwargs(self, work, prompt, seed, image):
        return dict(prompt=prompt, negative_prompt=self.negative, true_cfg_scale=self.true_cfg, height=work.height,
                    width=work.width, num_inference_steps=work.steps,
                    generator=torch.Generator("cpu").manual_seed(seed), output_type="pil")

    def text_tokens(self, tokenizer, text: str) -> int:
        """Prompt embedding tokens both pipelines pass the DiT: the templated prompt's tokens minus the template's
        first 34 (at most 512)."""
        from pipelines.qwen_image import T2I_DROP, T2I_MAX_EMBED, T2I_TEMPLATE

        return min(len(tokenizer(T2I_TEMPLATE.format(text))["input_ids"]) - T2I_DROP, T2I_MAX_EMBED)

    def dit_flops(self, c, work, modules, prompt):
        d = c.num_attention_heads * c.attention_head_dim
        img = (work.height // 16) * (work.width // 16)
        txt = [self.text_tokens(modules["tokenizer"], t) for t in (prompt, self.negative)]
        patch = c.patch_size * c.patch_size * c.out_channels
        per_call = [double_stream_flops(d, c.num_layers, img, t) + 2 * img * c.in_channels * d + 2 * img * d * patch
                    + 2 * t * c.joint_attention_dim * d for t in txt]
        return {"per_step": sum(per_call), "calls_per_step": 2, "image_tokens": img, "text_tokens": txt,
                "formula": f"{c.num_layers} blocks x (24 d^2 L + 4 L^2 d) + img_in / txt_in / proj_out, d = {d}, "
                           "L = image + prompt tokens; two calls per step (prompt and negative prompt, each at its "
                           "own length: batch padding not counted)"}

    def workloads(self, args):
        sizes = listed(args.sizes, "64,96" if args.tiny else "1024,1328")
        return [Workload(self.name, size, size, steps) for size in sizes
                for steps in listed(args.steps, "2" if args.tiny else "50")]


# ---------------------------------------------------------------- Wan2.1-I2V-14B 480p

WAN_I2V_14B = dict(patch_size=(1, 2, 2), num_attention_heads=40, attention_head_dim=128, in_channels=36,
                   out_channels=16, text_dim=4096, freq_dim=256, ffn_dim=13824, num_layers=40, cross_attn_norm=True,
                   qk_norm="rms_norm_across_heads", eps=1e-6, image_dim=1280, added_kv_proj_dim=5120,
                   rope_max_seq_len=1024, pos_embed_seq_len=None)
UMT5_XXL = dict(vocab_size=256384, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
                relative_attention_num_buckets=32, relative_attention_max_distance=128, feed_forward_proj="gated-gelu",
                layer_norm_epsilon=1e-6, is_encoder_decoder=False, pad_token_id=0, eos_token_id=1,
                tie_word_embeddings=False)
CLIP_VIT_H = dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=16,
                  patch_size=14, image_size=224, projection_dim=1024, hidden_act="gelu", layer_norm_eps=1e-5)
CLIP_PROCESSOR = dict(do_resize=True, size={"shortest_edge": 224}, resample=3, do_center_crop=True,
                      crop_size={"height": 224, "width": 224}, do_rescale=True, rescale_factor=1 / 255,
                      do_normalize=True, image_mean=[0.48145466, 0.4578275, 0.40821073],
                      image_std=[0.26862954, 0.26130258, 0.27577711], do_convert_rgb=True)
WAN_VAE = dict(base_dim=96, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2, attn_scales=[],
               temperal_downsample=[False, True, True], dropout=0.0)  # latents mean / std: diffusers' defaults (Wan2.1)
WAN_I2V_480P_SCHEDULER = dict(num_train_timesteps=1000, prediction_type="flow_prediction", use_flow_sigmas=True,
                              flow_shift=3.0, solver_order=2, predict_x0=True, solver_type="bh2",
                              lower_order_final=True, final_sigmas_type="zero", timestep_spacing="linspace",
                              beta_start=0.0001, beta_end=0.02, beta_schedule="linear")


class WanI2VSpec(Spec):
    name, title, asset, pipeline_class = "wan-i2v", "Wan2.1-I2V-14B", "wan-i2v-tiny", "WanImageToVideoPipeline"
    classes = {"tokenizer": ("transformers", "T5Tokenizer"), "text_encoder": ("transformers", "UMT5EncoderModel"),
               "image_encoder": ("transformers", "CLIPVisionModel"),
               "image_processor": ("transformers", "CLIPImageProcessorPil"),
               "transformer": ("diffusers", "WanTransformer3DModel"), "vae": ("diffusers", "AutoencoderKLWan"),
               "scheduler": ("diffusers", "UniPCMultistepScheduler")}
    extra = {"boundary_ratio": None, "expand_timesteps": False}
    parallel = "cfg"
    guidance = 5.0
    negative = "blurry, low quality, static"
    peers = {(480, 832, 81, 1): "diffusers 9.77, xDiT 8.93, SGLang 6.13, LightX2V 5.18 s/step"}
    targets = {(480, 832, 81, 1): 6.0}

    def diffusers_pipeline(self, modules):
        import diffusers
        from diffusers.pipelines.wan import pipeline_wan_i2v

        if not hasattr(pipeline_wan_i2v, "ftfy"):
            # its prompt cleaning calls ftfy unconditionally (a NameError without the package, which the GPU machine
            # lacks); ftfy.fix_text leaves an ASCII prompt unchanged
            pipeline_wan_i2v.ftfy = types.SimpleNamespace(fix_text=lambda text: text)
        slots = {s: modules[s] for s in self.classes}
        pipe = diffusers.WanImageToVideoPipeline(**slots, transformer_2=None, **self.extra)
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def real_configs(self, tokenizers):
        return {"text_encoder": UMT5_XXL, "image_encoder": CLIP_VIT_H, "image_processor": CLIP_PROCESSOR,
                "transformer": WAN_I2V_14B, "vae": WAN_VAE, "scheduler": WAN_I2V_480P_SCHEDULER}

    def input_image(self, work):
        """A smooth colour gradient at the output size (both pipelines resize it to the same size: a no-op)."""
        y, x = torch.meshgrid(torch.linspace(0, 1, work.height), torch.linspace(0, 1, work.width), indexing="ij")
        rgb = torch.stack([x, y, (x + y) / 2], -1).mul(255).to(torch.uint8).numpy()
        return Image.fromarray(rgb)

    def request(self, work, prompt, seed, image):
        from gen.types import GenerationRequest

        return GenerationRequest(prompt=prompt, negative_prompt=self.negative, seed=seed,
                                 num_inference_steps=work.steps, guidance_scale=self.guidance, height=work.height,
                                 width=work.width, num_frames=work.frames, images=(image,))

    def diffusers_kwargs(self, work, prompt, seed, image):
        return dict(image=image, prompt=prompt, negative_prompt=self.negative, height=work.height, width=work.width,
                    num_frames=work.frames, num_inference_steps=work.steps, guidance_scale=self.guidance,
                    generator=torch.Generator("cpu").manual_seed(seed), output_type="pil")

    def dit_flops(self, c, work, modules, prompt):
        d, ffn = c.num_attention_heads * c.attention_head_dim, c.ffn_dim
        f = (work.frames - 1) // 4 + 1
        n = f * (work.height // 16) * (work.width // 16)  # 8x VAE, 2x2 patches
        txt = 512  # umT5 padded to 512: the I2V transformer sees all of them
        vision = modules["image_encoder"].config
        img = (vision.image_size // vision.patch_size) ** 2 + 1  # CLIP tokens (with the class token)
        per_block = (8 * d * d * n + 4 * n * n * d  # self-attention: q, k, v, out; QK^T and PV
                     + 4 * d * d * n + 4 * d * d * (txt + img) + 4 * n * (txt + img) * d  # cross-attention
                     + 4 * d * ffn * n)  # FFN
        embed = (2 * n * c.in_channels * 4 * d + 2 * n * d * c.out_channels * 4  # patch embedding, proj_out
                 + 2 * txt * (c.text_dim * d + d * d) + 2 * img * (c.image_dim ** 2 + c.image_dim * d))
        per_call = c.num_layers * per_block + embed
        return {"per_step": 2 * per_call, "calls_per_step": 2, "image_tokens": n, "text_tokens": [txt, txt],
                "clip_tokens": img,
                "formula": f"{c.num_layers} blocks x (8 d^2 N + 4 N^2 d [self] + 4 d^2 N + 4 d^2 (T + I) "
                           f"+ 4 N (T + I) d [cross] + 4 d F N [FFN]) + embedders, d = {d}, F = {ffn}, "
                           f"N = video tokens, T = {txt} text, I = {img} CLIP tokens; two calls per step (CFG)"}

    def workloads(self, args):
        """480x832, 81 frames (--sizes does not apply); --steps: the timed steps of one generation."""
        h, w, frames = (32, 48, 9) if args.tiny else (480, 832, 81)
        return [Workload(self.name, h, w, steps, frames=frames, per_step=True)
                for steps in listed(args.steps, "2" if args.tiny else "3")]


SPECS: dict[str, Spec] = {s.name: s for s in (FluxSpec(), QwenImageSpec(), WanI2VSpec())}
