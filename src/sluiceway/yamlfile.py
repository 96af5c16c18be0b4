"""YAML files people edit by hand, read so that every problem names its line.

The pipeline file, ``profiles.yaml`` and schema files all go through here:
ruamel.yaml keeps the line of every key (PyYAML drops them), and
``Problems`` collects all mistakes before raising one ConfigError with each
as ``file:line: key.path: message``.
"""

from __future__ import annotations

from typing import Any

from ruamel.yaml import YAML
from ruamel.yaml.comments import CommentedMap, CommentedSeq
from ruamel.yaml.error import MarkedYAMLError

from .errors import ConfigError


def load_yaml(text: str, source: str) -> Any:
    """The document with line information; a syntax error names its line."""
    try:
        return YAML(typ="rt").load(text)
    except MarkedYAMLError as e:
        mark = e.problem_mark
        line = mark.line + 1 if mark is not None else 1
        raise ConfigError([f"{source}:{line}: not valid YAML: {e.problem}"]) from None


def plain(node: Any) -> Any:
    """ruamel's commented containers → plain dicts and lists (string keys)."""
    if isinstance(node, dict):
        return {str(k): plain(v) for k, v in node.items()}
    if isinstance(node, list):
        return [plain(v) for v in node]
    return node


def line_of(root: Any, path: tuple[Any, ...]) -> int:
    """The 1-based line of the deepest node along ``path`` that exists."""
    node, line = root, None
    for part in path:
        if isinstance(node, CommentedMap) and part in node:
            line = node.lc.key(part)[0] + 1
            node = node[part]
        elif isinstance(node, CommentedSeq) and isinstance(part, int) and part < len(node):
            line = node.lc.item(part)[0] + 1
            node = node[part]
        else:
            break
    if line is None:
        line = root.lc.line + 1 if hasattr(root, "lc") else 1
    return line


class Problems:
    """Every mistake in one file, each placed at its line; raised together."""

    def __init__(self, source: str, doc: Any) -> None:
        self.source = source
        self.doc = doc
        self.items: list[tuple[int, str]] = []

    def add(self, path: tuple[Any, ...], message: str) -> None:
        line = line_of(self.doc, path)
        where = ".".join(str(p) for p in path) or "(top level)"
        self.items.append((line, f"{self.source}:{line}: {where}: {message}"))

    def raise_if_any(self) -> None:
        if self.items:
            raise ConfigError([msg for _, msg in sorted(self.items)])
