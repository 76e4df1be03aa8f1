"""CLIP tokenizers load under both RobertaProcessing signatures (tokenizers < 0.23: `cls`; >= 0.23: `cls_token`)."""
from __future__ import annotations

import logging

import pytest
import tokenizers.processors
import transformers

from component_loaders.tokenizer import load_tokenizer, roberta_processing_compat

REAL = tokenizers.processors.RobertaProcessing


def new_signature(*args, **kwargs):
    """Faithful stand-in for tokenizers >= 0.23: rejects the old `cls=` keyword with the same TypeError."""
    if "cls" in kwargs:
        raise TypeError("RobertaProcessing.__new__() got an unexpected keyword argument 'cls'")
    return REAL(*args, **kwargs)


class KeywordCLIPTokenizer(transformers.CLIPTokenizer):
    """The CLIP build path of transformers <= 5.15.1, which passes `sep=` and `cls=` as keywords."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._tokenizer.post_processor = tokenizers.processors.RobertaProcessing(
            sep=(str(self.eos_token), self.eos_token_id),
            cls=(str(self.bos_token), self.bos_token_id),
            add_prefix_space=False,
            trim_offsets=False,
        )


def _ids(tok):
    return tok("a red circle").input_ids


def test_ordinary_path(flux_dev_path):
    tok = load_tokenizer(flux_dev_path / "tokenizer", "CLIPTokenizer")
    ids = _ids(tok)
    assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id and len(ids) > 2


class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.records = []

    def emit(self, record):
        self.records.append(record)


def test_new_signature_stand_in_with_keyword_build_path(flux_dev_path, monkeypatch):
    reference = _ids(load_tokenizer(flux_dev_path / "tokenizer", "CLIPTokenizer"))
    monkeypatch.setattr(tokenizers.processors, "RobertaProcessing", new_signature)
    monkeypatch.setattr(transformers, "CLIPTokenizer", KeywordCLIPTokenizer)
    with pytest.raises(TypeError, match="'cls'"):  # the failure users see without the loader's shim
        KeywordCLIPTokenizer.from_pretrained(str(flux_dev_path / "tokenizer"))
    logger = logging.getLogger("component_loaders.tokenizer")
    handler = _Records()
    logger.addHandler(handler)
    monkeypatch.setattr(logger, "disabled", False)
    try:
        tok = load_tokenizer(flux_dev_path / "tokenizer", "CLIPTokenizer")
    finally:
        logger.removeHandler(handler)
    assert _ids(tok) == reference  # the post-processor really is in place: same special tokens
    warnings = [r for r in handler.records if r.levelno == logging.WARNING and "RobertaProcessing" in r.getMessage()]
    assert len(warnings) == 1
    assert tokenizers.processors.RobertaProcessing is new_signature  # shim restored afterwards


def test_real_tokenizers_with_keyword_build_path(flux_dev_path, monkeypatch):
    """Without any stand-in: the installed tokenizers (>= 0.23) and the old keyword call."""
    monkeypatch.setattr(transformers, "CLIPTokenizer", KeywordCLIPTokenizer)
    tok = load_tokenizer(flux_dev_path / "tokenizer", "CLIPTokenizer")
    assert _ids(tok)[0] == tok.bos_token_id
    assert tokenizers.processors.RobertaProcessing is REAL


def test_shim_restored_on_error():
    with pytest.raises(RuntimeError):
        with roberta_processing_compat():
            assert tokenizers.processors.RobertaProcessing is not REAL
            raise RuntimeError("boom")
    assert tokenizers.processors.RobertaProcessing is REAL


def test_other_type_errors_propagate(flux_dev_path, monkeypatch):
    def broken(*args, **kwargs):
        raise TypeError("something else entirely")

    monkeypatch.setattr(tokenizers.processors, "RobertaProcessing", broken)
    with pytest.raises(TypeError, match="something else"):
        load_tokenizer(flux_dev_path / "tokenizer", "CLIPTokenizer")
