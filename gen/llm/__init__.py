"""The in-process LLM runtime's API: `LLM(path).encode / .generate / .chat`; the models, engine and loaders live beside it."""
from gen.llm.api import LLM, Encoded, load_tokenizer, smollm2_path
from gen.llm.registry import get_llm

__all__ = ["LLM", "Encoded", "get_llm", "load_tokenizer", "smollm2_path"]
