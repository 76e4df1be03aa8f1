"""Tokenizer loader, with the RobertaProcessing compatibility CLIP tokenizers need under tokenizers >= 0.23.

tokenizers 0.23 renamed RobertaProcessing's second parameter (`cls` -> `cls_token`); transformers up to 5.15.1
builds CLIP fast tokenizers with `RobertaProcessing(sep=..., cls=..., ...)` and fails with a TypeError. On that
error we retry once with a scoped shim that passes `sep` and `cls` positionally, restored afterwards.
"""
from __future__ import annotations

import contextlib
import logging
from pathlib import Path

import tokenizers.processors
import transformers

from gen.types import GenError

log = logging.getLogger(__name__)


def _is_roberta_cls_error(err: TypeError) -> bool:
    return "RobertaProcessing" in str(err) and "'cls'" in str(err)


@contextlib.contextmanager
def roberta_processing_compat():
    """Within the block, `tokenizers.processors.RobertaProcessing(sep=..., cls=...)` works on either signature."""
    original = tokenizers.processors.RobertaProcessing

    def compat(sep, cls, *args, **kwargs):
        return original(sep, cls, *args, **kwargs)

    tokenizers.processors.RobertaProcessing = compat
    try:
        yield
    finally:
        tokenizers.processors.RobertaProcessing = original


def load_tokenizer(folder: Path, class_name: str, **_):
    cls = getattr(transformers, class_name, None)
    if cls is None or not hasattr(cls, "from_pretrained"):
        raise GenError(f"unknown tokenizer class {class_name!r} in {folder}", param="model_path")
    if not Path(folder).is_dir():
        raise GenError(f"tokenizer folder {str(folder)!r} is missing", param="model_path")
    try:
        return cls.from_pretrained(str(folder))
    except TypeError as err:
        if not _is_roberta_cls_error(err):
            raise
        log.warning("%s: this transformers version builds RobertaProcessing with `cls=`, which this tokenizers "
                    "version rejects (%s); retrying with a positional-argument shim", folder, err)
    with roberta_processing_compat():
        return cls.from_pretrained(str(folder))
