"""CLIP tokenizers load under both RobertaProcessing signatures (tokenizers < 0.23: `cls`; >= 0.23: `cls_token`)."""
from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path

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


def check_keyword_path_with_stand_in(path) -> None:
    """The old keyword call under a stand-in for the new signature: fails alone, loads through the loader's shim."""
    import unittest.mock as mock

    reference = _ids(load_tokenizer(path, "CLIPTokenizer"))
    logger = logging.getLogger("component_loaders.tokenizer")
    handler = _Records()
    logger.addHandler(handler)
    with mock.patch.object(tokenizers.processors, "RobertaProcessing", new_signature), \
            mock.patch.object(transformers, "CLIPTokenizer", KeywordCLIPTokenizer):
        try:
            KeywordCLIPTokenizer.from_pretrained(str(path))
            raise AssertionError("the keyword build path should fail without the shim")
        except TypeError as e:
            assert "'cls'" in str(e)
        tok = load_tokenizer(path, "CLIPTokenizer")
        assert tokenizers.processors.RobertaProcessing is new_signature  # shim restored afterwards
    logger.removeHandler(handler)
    assert _ids(tok) == reference  # the post-processor really is in place: same special tokens
    warnings = [r for r in handler.records if r.levelno == logging.WARNING and "RobertaProcessing" in r.getMessage()]
    assert len(warnings) == 1, [r.getMessage() for r in handler.records]


def test_new_signature_stand_in_with_keyword_build_path(flux_dev_path):
    """Run in a fresh interpreter: the check patches module globals of transformers and tokenizers."""
    code = ("import test_tokenizer_compat as t, pathlib; "
            f"t.check_keyword_path_with_stand_in(pathlib.Path({str(flux_dev_path / 'tokenizer')!r}))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).parent, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]


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
