"""Tables in the embedded SQLite state database, one row per item.

Items are stored as JSON under their table name and a JSON-encoded key, so
any item shape fits without a migration; DuckDB or ``sqlite3`` can still read
them with their JSON functions.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator, Sequence
from typing import Any

from ..state import StateDB
from .base import Table


def _pk(values: tuple[Any, ...]) -> str:
    return json.dumps(list(values), separators=(",", ":"), default=str)


class SqliteTable(Table):
    def __init__(self, db: StateDB, name: str, key: Sequence[str]) -> None:
        self.db = db
        self.name = name
        self.key = tuple(key)

    def upsert(self, items: Sequence[dict[str, Any]]) -> int:
        now = time.time()
        rows = [
            (self.name, _pk(self.key_of(item)), json.dumps(item, default=str), now)
            for item in items
        ]
        with self.db.transaction() as conn:
            conn.executemany(
                "INSERT INTO items (table_name, pk, item, updated_at) VALUES (?, ?, ?, ?)"
                " ON CONFLICT (table_name, pk) DO UPDATE SET item = excluded.item,"
                " updated_at = excluded.updated_at",
                rows,
            )
        return len(rows)

    def get(self, *key: Any) -> dict[str, Any] | None:
        row = self.db.conn.execute(
            "SELECT item FROM items WHERE table_name = ? AND pk = ?", (self.name, _pk(key))
        ).fetchone()
        return None if row is None else json.loads(row[0])

    def scan(self, limit: int | None = None) -> Iterator[dict[str, Any]]:
        cur = self.db.conn.execute(
            "SELECT item FROM items WHERE table_name = ? ORDER BY pk LIMIT ?",
            (self.name, -1 if limit is None else limit),
        )
        for (item,) in cur:
            yield json.loads(item)

    def count(self) -> int:
        row = self.db.conn.execute(
            "SELECT COUNT(*) FROM items WHERE table_name = ?", (self.name,)
        ).fetchone()
        return int(row[0])

    def delete(self, *key: Any) -> bool:
        with self.db.transaction() as conn:
            cur = conn.execute(
                "DELETE FROM items WHERE table_name = ? AND pk = ?", (self.name, _pk(key))
            )
            return cur.rowcount == 1
