"""``dedup``: drop events whose key was seen within a window, across flushes and restarts.

``- dedup: {key: event_uuid, window: 24h}`` in a stream function. A row is a
duplicate when an earlier row with the same key arrived less than ``window``
before it. Time is the stream's arrival time (``received_at``), never the
clock at processing time: a flush replayed after a crash, an hour later,
takes exactly the same decisions, which the exactly-once flush relies on.
The window runs from the *first* arrival; duplicates do not extend it.

Keys live in ``dedup_keys`` (state database) with their expiry. Lookups go
by primary key and expired keys are purged through an index on the expiry,
at most ``purge_batch`` (at least twice the keys added) per flush, inside
the flush's commit: the table stays as large as one window of traffic and
a lookup costs the same whether it holds a thousand keys or ten million.
Purging only what expired before the newest committed arrival keeps replays
exact: every later record arrives at or after that time.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import pyarrow.compute as pc
from pydantic import Field

from ..config import Duration
from ..errors import InputError
from ..state import StateDB
from .base import Batches, StepContext, StepFn, StepOptions, StepType, register

if TYPE_CHECKING:
    from ..config import PipelineConfig

LOOKUP_CHUNK = 500  # keys per IN (...) query: well under SQLite's variable limit
TIME_COLUMN = "received_at"


class DedupStore:
    """Dedup keys of one scope (a function and key column) in the state database."""

    def __init__(self, db: StateDB, scope: str) -> None:
        self.db = db
        self.scope = scope

    def expiries(self, keys: Iterable[str]) -> dict[str, float]:
        """The stored expiry of each key that has one (expired ones included)."""
        wanted = list(dict.fromkeys(keys))
        out: dict[str, float] = {}
        conn = self.db.conn
        for i in range(0, len(wanted), LOOKUP_CHUNK):
            chunk = wanted[i : i + LOOKUP_CHUNK]
            marks = ",".join("?" * len(chunk))
            for key, expires_at in conn.execute(
                f"SELECT key, expires_at FROM dedup_keys WHERE scope = ? AND key IN ({marks})",
                (self.scope, *chunk),
            ):
                out[key] = expires_at
        return out

    def commit(
        self,
        conn: sqlite3.Connection,
        keys: Mapping[str, float],
        *,
        watermark: float,
        purge_batch: int,
    ) -> int:
        """Store keys (inside the flush's transaction) and purge expired ones; returns purged."""
        conn.executemany(
            "INSERT OR REPLACE INTO dedup_keys (scope, key, expires_at) VALUES (?, ?, ?)",
            [(self.scope, k, v) for k, v in keys.items()],
        )
        return self.purge(conn, watermark, max(purge_batch, 2 * len(keys)))

    def purge(self, conn: sqlite3.Connection, before: float, limit: int) -> int:
        return conn.execute(
            "DELETE FROM dedup_keys WHERE scope = ? AND key IN ("
            " SELECT key FROM dedup_keys WHERE scope = ? AND expires_at <= ? LIMIT ?)",
            (self.scope, self.scope, before, limit),
        ).rowcount

    def count(self) -> int:
        row = self.db.conn.execute(
            "SELECT COUNT(*) FROM dedup_keys WHERE scope = ?", (self.scope,)
        ).fetchone()
        return int(row[0])


class DedupOptions(StepOptions):
    key: str = "event_uuid"
    window: Duration = 86_400.0
    purge_batch: int = Field(10_000, ge=1)


def _seconds(column: pa.ChunkedArray | pa.Array) -> list[float]:
    """A timestamp column → POSIX seconds (float), whatever its unit."""
    micros = pc.cast(pc.cast(column, pa.timestamp("us", tz="UTC")), pa.int64())
    return [v / 1_000_000 for v in micros.to_pylist()]


@register
class Dedup(StepType):
    name = "dedup"
    Options = DedupOptions
    stream_only = True  # needs the flush's commit transaction

    def check(self, raw: Any, cfg: PipelineConfig) -> None:
        self.options(raw)

    def build(self, raw: Any, cfg: PipelineConfig) -> StepFn:
        opts = self.options(raw)
        assert isinstance(opts, DedupOptions)

        def dedup(ctx: StepContext, batches: Batches | None) -> Batches:
            from ..streams.consumer import FlushContext

            if not isinstance(ctx, FlushContext) or ctx.db is None:
                raise InputError("dedup runs in stream functions only", file=ctx.input_name)
            if batches is None:
                raise InputError("dedup needs the stream's records", file=ctx.input_name)
            store = DedupStore(ctx.db, f"{ctx.function}:{opts.key}")
            kept: dict[str, float] = {}  # key → expiry, for keys first seen in this flush
            newest = 0.0
            ctx.stats.setdefault("duplicates", 0)
            for batch in batches:
                for column in (opts.key, TIME_COLUMN):
                    if column not in batch.schema.names:
                        raise InputError(
                            f"dedup needs column {column!r} (columns: "
                            f"{', '.join(batch.schema.names)})",
                            file=ctx.input_name,
                            field=column,
                        )
                keys = batch.column(opts.key).to_pylist()
                times = _seconds(batch.column(TIME_COLUMN))
                stored = store.expiries(
                    str(k) for k in keys if k is not None and str(k) not in kept
                )
                mask: list[bool] = []
                for key, at in zip(keys, times, strict=True):
                    newest = max(newest, at)
                    if key is None:  # nothing to compare: never a duplicate
                        mask.append(True)
                        continue
                    k = str(key)
                    expires = kept.get(k, stored.get(k))
                    if expires is not None and expires > at:
                        mask.append(False)
                    else:
                        kept[k] = at + opts.window
                        mask.append(True)
                dropped = len(mask) - sum(mask)
                if dropped:
                    ctx.count("duplicates", dropped)
                    dups = batch.filter(pa.array([not m for m in mask]))
                    ctx.count_by(dups, "duplicates")
                    batch = batch.filter(pa.array(mask))
                yield batch

            def commit(conn: sqlite3.Connection) -> None:
                store.commit(conn, kept, watermark=newest, purge_batch=opts.purge_batch)

            ctx.on_commit.append(commit)

        return dedup
