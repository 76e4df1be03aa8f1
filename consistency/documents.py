"""Reads a JSON or YAML file together with the line of every key, so errors can point at the bad key and line."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import yaml

from gen.types import GenError


@dataclass
class Document:
    """A parsed file: `data`, plus `lines[(key, index, ...)] -> 1-based line` for every mapping key and list item."""

    path: Path
    data: object
    lines: dict[tuple, int]

    def where(self, *keys) -> str:
        """'FILE line N, key a.b.c' for the deepest of `keys` whose line is known."""
        dotted = ".".join(str(k) for k in keys)
        for n in range(len(keys), -1, -1):
            line = self.lines.get(tuple(keys[:n]))
            if line is not None:
                break
        at = f"{self.path} line {line}" if line is not None else str(self.path)
        return f"{at}, key {dotted!r}" if keys else at

    def error(self, keys: tuple, message: str) -> GenError:
        return GenError(f"{self.where(*keys)}: {message}")


def load_document(path: str | Path, what: str) -> Document:
    """Parse `path` (.json, .yaml or .yml); a syntax error names the file, line and column."""
    path = Path(path)
    if not path.is_file():
        raise GenError(f"{what} file {str(path)!r} does not exist")
    text = path.read_text(encoding="utf-8")
    suffix = path.suffix.lower()
    if suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise GenError(f"{path} line {e.lineno} column {e.colno}: malformed JSON in {what} file: {e.msg}") from None
    elif suffix in {".yaml", ".yml"}:
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            at = f" line {mark.line + 1} column {mark.column + 1}" if mark is not None else ""
            problem = getattr(e, "problem", None) or str(e)
            raise GenError(f"{path}{at}: malformed YAML in {what} file: {problem}") from None
    else:
        raise GenError(f"{what} file {str(path)!r} must end in .json, .yaml or .yml")
    return Document(path, data, _key_lines(text))


def _key_lines(text: str) -> dict[tuple, int]:
    """Line numbers from YAML's node tree (JSON is YAML too); empty when the text does not compose as YAML."""
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError:  # valid JSON that YAML rejects (e.g. tab indentation): errors then name no line
        return {}
    lines: dict[tuple, int] = {}

    def walk(node, keys: tuple) -> None:
        if isinstance(node, yaml.MappingNode):
            for k, v in node.value:
                lines[keys + (k.value,)] = k.start_mark.line + 1
                walk(v, keys + (k.value,))
        elif isinstance(node, yaml.SequenceNode):
            for i, v in enumerate(node.value):
                lines[keys + (i,)] = v.start_mark.line + 1
                walk(v, keys + (i,))

    if root is not None:
        lines[()] = root.start_mark.line + 1
        walk(root, ())
    return lines
