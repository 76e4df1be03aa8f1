"""LoRA files: the key maps of every format per family (formats.py), reading, caching and the library of a folder
(files.py). Applying a set to a loaded pipeline is gen/transforms/lora.py; docs/LORA.md says how to use them."""
from gen.lora.files import (DEFAULT_CACHE_MB, DEFAULT_MAX_LORAS, MAX_SCALE, LoraCache, LoraLibrary, check_scale,
                            check_specs, lora_file, parse_lora_arg, read_lora)
from gen.lora.formats import FORMATS, LoraWeights, Pair, parse
from gen.types import LoraSpec

__all__ = ["DEFAULT_CACHE_MB", "DEFAULT_MAX_LORAS", "FORMATS", "MAX_SCALE", "LoraCache", "LoraLibrary", "LoraSpec",
           "LoraWeights", "Pair", "check_scale", "check_specs", "lora_file", "parse", "parse_lora_arg", "read_lora"]
