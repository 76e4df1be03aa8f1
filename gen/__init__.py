"""gen: a diffusion-generation service (FLUX, Wan, Qwen-Image) with a CLI, a Python API and a REST server."""
from gen.generator import Generator
from gen.types import Cancelled, GenError, GenerationRequest, GenerationResult

__all__ = ["Generator", "GenerationRequest", "GenerationResult", "GenError", "Cancelled"]
__version__ = "0.1.0"
