"""Streams in the embedded SQLite state database: the default, nothing to install.

Seqs are assigned under SQLite's single write lock (``BEGIN IMMEDIATE``), so
the order in which appends commit *is* the seq order and no reader can see a
gap that is filled later. Appends commit with ``synchronous=FULL``: the ingest
endpoint answers 202 only after this returns, and then the events survive a
power cut, not just a crash of the process.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from ..state import StateDB
from .base import CheckpointConflict, Record, Stream
from .events import EventChunk, encode_json, fragments_to_batch

# Each field of the stored JSON as a JSON fragment, parsed in SQLite's C code,
# and whether the record has no other fields: what fragments_to_batch needs.
_FRAGMENTS = (
    "SELECT seq, appended_at, data -> '$.event_uuid', data -> '$.event_name',"
    " data -> '$.created_at', data -> '$.payload',"
    " json_remove(data, '$.event_uuid', '$.event_name', '$.created_at', '$.payload') = '{}'"
    " FROM stream_records WHERE stream = ? AND seq >= ? ORDER BY seq LIMIT ?"
)


class SqliteStream(Stream):
    def __init__(self, db: StateDB, name: str, *, clock: Callable[[], float] = time.time) -> None:
        self.db = db
        self.name = name
        self.clock = clock  # tests move it to exercise time windows

    def __repr__(self) -> str:
        return f"SqliteStream({self.name!r})"

    def append(self, records: Sequence[Mapping[str, Any]]) -> list[int]:
        if not records:
            return []
        rows = [encode_json(r) for r in records]
        conn = self.db.conn
        if not conn.in_transaction:  # SQLite refuses to change it inside one
            # Per connection: commits on this connection wait for the fsync.
            conn.execute("PRAGMA synchronous=FULL")
        with self.db.transaction() as conn:
            head = conn.execute(
                "SELECT last_seq, last_appended_at FROM stream_heads WHERE stream = ?",
                (self.name,),
            ).fetchone()
            last_seq, last_at = (0, 0.0) if head is None else (head[0], head[1])
            at = max(self.clock(), last_at)  # arrival times never go backwards
            first = last_seq + 1
            conn.executemany(
                "INSERT INTO stream_records (stream, seq, appended_at, data) VALUES (?, ?, ?, ?)",
                [(self.name, first + i, at, row) for i, row in enumerate(rows)],
            )
            conn.execute(
                "INSERT INTO stream_heads (stream, last_seq, last_appended_at) VALUES (?, ?, ?)"
                " ON CONFLICT (stream) DO UPDATE SET last_seq = excluded.last_seq,"
                " last_appended_at = excluded.last_appended_at",
                (self.name, first + len(rows) - 1, at),
            )
        return list(range(first, first + len(rows)))

    def read(self, from_seq: int, max_records: int = 1000) -> list[Record]:
        if max_records <= 0:
            return []
        rows = self.db.conn.execute(
            "SELECT seq, appended_at, data FROM stream_records"
            " WHERE stream = ? AND seq >= ? ORDER BY seq LIMIT ?",
            (self.name, from_seq, max_records),
        ).fetchall()
        return [Record(seq=r[0], appended_at=r[1], data=json.loads(r[2])) for r in rows]

    def read_events(self, from_seq: int, max_records: int = 1000) -> EventChunk | None:
        """Events as ingest stored them go to Arrow column by column; a chunk with
        anything else in it (a record appended without the check, a NaN that
        SQLite's JSON parser refuses) takes the exact path, record by record."""
        if max_records <= 0:
            return None
        try:
            rows = self.db.conn.execute(_FRAGMENTS, (self.name, from_seq, max_records)).fetchall()
        except sqlite3.OperationalError as e:
            if "JSON" not in str(e):
                raise
            return super().read_events(from_seq, max_records)
        if not rows:
            return None
        seqs, appended, *fields = zip(*rows, strict=True)
        batch = fragments_to_batch(appended, *fields)
        if batch is None:
            return super().read_events(from_seq, max_records)
        return EventChunk(seqs[0], seqs[-1], len(seqs), batch, [])

    def last_seq(self) -> int:
        row = self.db.conn.execute(
            "SELECT last_seq FROM stream_heads WHERE stream = ?", (self.name,)
        ).fetchone()
        return 0 if row is None else int(row[0])

    def length(self) -> int:
        row = self.db.conn.execute(
            "SELECT COUNT(*) FROM stream_records WHERE stream = ?", (self.name,)
        ).fetchone()
        return int(row[0])

    def checkpoint(self, consumer: str) -> int:
        row = self.db.conn.execute(
            "SELECT seq FROM stream_checkpoints WHERE stream = ? AND consumer = ?",
            (self.name, consumer),
        ).fetchone()
        return 0 if row is None else int(row[0])

    def set_checkpoint(self, consumer: str, seq: int, *, expect: int | None = None) -> None:
        with self.db.transaction() as conn:
            if expect is not None:
                current = self.checkpoint(consumer)
                if current != expect:
                    raise CheckpointConflict(
                        f"stream {self.name!r}, consumer {consumer!r}: checkpoint is "
                        f"{current}, expected {expect}"
                    )
            conn.execute(
                "INSERT INTO stream_checkpoints (stream, consumer, seq, updated_at)"
                " VALUES (?, ?, ?, ?) ON CONFLICT (stream, consumer) DO UPDATE"
                " SET seq = excluded.seq, updated_at = excluded.updated_at",
                (self.name, consumer, seq, time.time()),
            )

    def trim(self, upto_seq: int, *, older_than: float | None = None, limit: int = 10_000) -> int:
        cutoff = float("inf") if older_than is None else older_than
        # Only the `limit` oldest records are looked at: arrival times grow along
        # the seqs, so if they are not old enough no later one is, and a trim
        # with nothing to do costs the same however long the stream is.
        with self.db.transaction() as conn:
            return conn.execute(
                "DELETE FROM stream_records WHERE stream = ? AND seq IN ("
                " SELECT seq FROM stream_records WHERE stream = ? AND seq <= ?"
                " ORDER BY seq LIMIT ?) AND appended_at < ?",
                (self.name, self.name, upto_seq, limit, cutoff),
            ).rowcount
