"""gen: a diffusion-generation service (FLUX, Wan, Qwen-Image) with a CLI, a Python API and a REST server."""
from gen.types import Cancelled, GenError, GenerationRequest, GenerationResult

__all__ = ["Generator", "GenerationRequest", "GenerationResult", "GenError", "Cancelled"]
__version__ = "0.1.0"


def __getattr__(name):
    # Generator pulls in the loaders and pipelines, which import gen.* themselves: import it on first use.
    if name == "Generator":
        from gen.generator import Generator

        return Generator
    raise AttributeError(f"module 'gen' has no attribute {name!r}")
