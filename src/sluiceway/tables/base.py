"""The table interface: items by key, upserted in batches, as DynamoDB has them.

Items are JSON objects; the key is one or more of their fields. A re-run of
the same input upserts the same items again, which leaves the table as it
was: upsert is what makes table outputs idempotent.
"""

from __future__ import annotations

import abc
from collections.abc import Iterator, Sequence
from typing import Any

from ..errors import SluicewayError


class MissingKey(SluicewayError):
    """An item lacks a key field (or has it null): it cannot be stored."""


class Table(abc.ABC):
    name: str
    key: tuple[str, ...]

    def key_of(self, item: dict[str, Any]) -> tuple[Any, ...]:
        try:
            values = tuple(item[k] for k in self.key)
        except KeyError as e:
            raise MissingKey(f"table {self.name!r}: item has no key field {e}") from None
        if any(v is None for v in values):
            raise MissingKey(f"table {self.name!r}: key field is null in {item!r}"[:300])
        return values

    @abc.abstractmethod
    def upsert(self, items: Sequence[dict[str, Any]]) -> int:
        """Insert or replace each item by its key, all in one transaction."""

    @abc.abstractmethod
    def get(self, *key: Any) -> dict[str, Any] | None: ...

    @abc.abstractmethod
    def scan(self, limit: int | None = None) -> Iterator[dict[str, Any]]: ...

    @abc.abstractmethod
    def count(self) -> int: ...

    @abc.abstractmethod
    def delete(self, *key: Any) -> bool: ...
