"""Errors users see. Each names where the problem is, so nobody has to guess."""

from __future__ import annotations


class SluicewayError(Exception):
    """Base class for every error Sluiceway raises on purpose."""


class ConfigError(SluicewayError):
    """The pipeline file is wrong; raised before anything runs.

    ``problems`` holds every mistake found, each already formatted as
    ``file:line: key: message`` so the whole list can be fixed in one go.
    """

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("\n".join(problems))


class PatternError(SluicewayError):
    """An EventBridge event pattern is invalid.

    ``path`` is the list of keys leading to the offending part of the pattern,
    so the config loader can point at the exact line of the pipeline file.
    """

    def __init__(self, message: str, path: tuple[str | int, ...] = ()) -> None:
        self.message = message
        self.path = path
        where = ".".join(str(p) for p in path)
        super().__init__(f"{where}: {message}" if where else message)


class InputError(SluicewayError):
    """An input file cannot be processed as it is: names file, line and field."""

    def __init__(
        self,
        message: str,
        *,
        file: str | None = None,
        line: int | None = None,
        field: str | None = None,
    ) -> None:
        self.message = message
        self.file = file
        self.line = line
        self.field = field
        parts = [p for p in (file, f"line {line}" if line else None) if p]
        where = ":".join(parts) if parts else ""
        if field:
            where = f"{where} (field {field!r})" if where else f"field {field!r}"
        super().__init__(f"{where}: {message}" if where else message)
