"""``dedup``: drop events whose key was seen within a window, across flushes and restarts.

``- dedup: {key: event_uuid, window: 24h}`` in a stream function. A row is a
duplicate when an earlier row with the same key arrived less than ``window``
before it. Time is the stream's arrival time (``received_at``), never the
clock at processing time: a flush replayed after a crash, an hour later,
takes exactly the same decisions, which the exactly-once flush relies on.
The window runs from the *first* arrival; duplicates do not extend it.

Keys live in ``dedup_log`` (state database) in arrival order: a flush appends
its new keys at the end of the table and purges expired ones from its front
(at most ``purge_batch``, at least twice the keys added, inside the flush's
commit), so writes touch the same few pages however many keys the table
holds. A table keyed by the random keys themselves would dirty a page per
key once it outgrows the page cache, and get slower as it fills.

Lookups go through ``KeyIndex``, an in-memory hash index of the log (12
bytes a slot, under 35 bytes a key) that each process builds from the table
and then follows by reading only rows newer than it has seen. The table is
the truth: the index holds nothing the table does not, and every hit is
confirmed by comparing the stored key, so a hash collision can never drop
an event.
"""

from __future__ import annotations

import json
import sqlite3
import weakref
from collections.abc import Iterable, Mapping, Sequence
from itertools import groupby
from operator import itemgetter
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import Field

from ..config import Duration
from ..errors import InputError
from ..state import StateDB
from .base import Batches, StepContext, StepFn, StepOptions, StepType, register

if TYPE_CHECKING:
    from ..config import PipelineConfig

LOOKUP_CHUNK = 500  # ids per IN (...) query: well under SQLite's variable limit
LOAD_CHUNK = 100_000  # log rows read at a time while building an index
TIME_COLUMN = "received_at"


class KeyIndex:
    """An in-memory multimap from a key's 64-bit hash to the log ids it was stored under.

    Open addressing with linear probing over two parallel numpy arrays (the
    hash, 0 meaning empty, and the id as an offset from ``base``). Inserting
    or probing a whole batch is a few vectorised rounds, one per probe step,
    so it costs the same with a thousand keys as with ten million. A hit is
    only a candidate: the caller compares the stored key. Entries are never
    removed one by one; ``rebuilt`` drops purged ones whenever the table grows.
    """

    MAX_LOAD = 0.7

    def __init__(self, capacity: int = 1 << 12, base: int = 0) -> None:
        self.hash = np.zeros(capacity, np.uint64)
        self.off = np.zeros(capacity, np.uint32)
        self.mask = capacity - 1
        self.base = base
        self.size = 0

    @staticmethod
    def hashes(keys: Sequence[str]) -> np.ndarray:
        """Non-zero 64-bit hashes (this process's ``hash``: the index is never stored)."""
        h = np.fromiter(map(hash, keys), np.int64, len(keys)).view(np.uint64)
        h[h == 0] = 1
        return h

    def fits(self, n: int, top_id: int) -> bool:
        """Room for ``n`` more entries, ids up to ``top_id``, without growing."""
        return self.size + n <= self.MAX_LOAD * len(self.hash) and top_id - self.base < 2**32

    def entries(self) -> tuple[np.ndarray, np.ndarray]:
        used = self.hash != 0
        return self.hash[used], self.off[used].astype(np.int64) + self.base

    def rebuilt(self, extra: int, floor: int, top_id: int) -> KeyIndex:
        """A copy without entries below ``floor`` (purged), with room for ``extra`` more."""
        h, ids = self.entries()
        live = ids >= floor
        h, ids = h[live], ids[live]
        capacity = len(self.hash)
        while len(h) + extra > self.MAX_LOAD * capacity:
            capacity *= 2
        out = KeyIndex(capacity, base=min(floor, top_id))
        out.insert(h, ids)
        return out

    def insert(self, h: np.ndarray, ids: np.ndarray) -> None:
        slot = (h & np.uint64(self.mask)).astype(np.int64)
        off = (ids - self.base).astype(np.uint32)
        pending = np.arange(len(h))
        placed = np.zeros(len(h), bool)
        while pending.size:
            s = slot[pending]
            free = self.hash[s] == 0
            taken, first = np.unique(s[free], return_index=True)  # one winner per slot
            winners = pending[free][first]
            self.hash[taken] = h[winners]
            self.off[taken] = off[winners]
            placed[winners] = True
            pending = pending[~placed[pending]]
            slot[pending] = (slot[pending] + 1) & self.mask
        self.size += len(h)

    def lookup(self, h: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(position in ``h``, log id) of every entry stored under the same hash."""
        slot = (h & np.uint64(self.mask)).astype(np.int64)
        where, ids = [np.zeros(0, np.int64)], [np.zeros(0, np.int64)]
        pending = np.arange(len(h))
        while pending.size:
            s = slot[pending]
            stored = self.hash[s]
            hit = stored == h[pending]
            where.append(pending[hit])
            ids.append(self.off[s[hit]].astype(np.int64) + self.base)
            pending = pending[stored != 0]
            slot[pending] = (slot[pending] + 1) & self.mask
        return np.concatenate(where), np.concatenate(ids)


# One index per (state database, scope) in this process, shared by every flush.
_INDEXES: weakref.WeakKeyDictionary[StateDB, dict[str, tuple[KeyIndex, int]]] = (
    weakref.WeakKeyDictionary()
)


class DedupStore:
    """Dedup keys of one scope (a function and key column) in the state database."""

    def __init__(self, db: StateDB, scope: str) -> None:
        self.db = db
        self.scope = scope
        self._pending: tuple[int, list[str]] | None = None  # (first id, keys) of commit

    def _index(self) -> KeyIndex:
        """This process's index, brought up to date with the committed log."""
        per_db = _INDEXES.setdefault(self.db, {})
        index, seen = per_db.get(self.scope, (KeyIndex(), 0))
        cur = self.db.conn.execute(
            "SELECT id, key FROM dedup_log WHERE scope = ? AND id > ? ORDER BY id",
            (self.scope, seen),
        )
        while rows := cur.fetchmany(LOAD_CHUNK):
            ids = np.fromiter((r[0] for r in rows), np.int64, len(rows))
            index = self._absorb(index, ids, [r[1] for r in rows])
            seen = int(ids[-1])
        per_db[self.scope] = (index, seen)
        return index

    def _absorb(self, index: KeyIndex, ids: np.ndarray, keys: list[str]) -> KeyIndex:
        """``index`` with these log rows added (grown, without purged rows, if full)."""
        top = int(ids[-1])
        if not index.fits(len(keys), top):
            row = self.db.conn.execute(
                "SELECT min(id) FROM dedup_log WHERE scope = ?", (self.scope,)
            ).fetchone()
            floor = int(ids[0]) if row[0] is None else int(row[0])
            index = index.rebuilt(len(keys), floor, top)
        index.insert(KeyIndex.hashes(keys), ids)
        return index

    def committed(self) -> None:
        """After the transaction of ``commit`` committed: add its keys to the index
        without reading them back. Only an optimisation: without it, the next
        lookup reads them from the table."""
        pending, self._pending = self._pending, None
        per_db = _INDEXES.get(self.db, {})
        if pending is None or self.scope not in per_db:
            return
        first, keys = pending
        index, seen = per_db[self.scope]
        if seen != first - 1 or not keys:  # someone else's rows came in between: read them
            return
        ids = np.arange(first, first + len(keys), dtype=np.int64)
        per_db[self.scope] = (self._absorb(index, ids, keys), first + len(keys) - 1)

    def expiries(self, keys: Iterable[str]) -> dict[str, float]:
        """The stored expiry of each key that has one (expired ones included).

        A key stored more than once (seen again after it expired) gives its
        newest expiry.
        """
        wanted = list(dict.fromkeys(keys))
        if not wanted:
            return {}
        _, ids = self._index().lookup(KeyIndex.hashes(wanted))
        wanted_set = set(wanted)
        out: dict[str, float] = {}
        conn = self.db.conn
        id_list = sorted(set(ids.tolist()))
        for i in range(0, len(id_list), LOOKUP_CHUNK):
            chunk = id_list[i : i + LOOKUP_CHUNK]
            marks = ",".join("?" * len(chunk))
            for key, expires_at in conn.execute(
                f"SELECT key, expires_at FROM dedup_log WHERE id IN ({marks})", chunk
            ):
                # The stored key decides, not its hash.
                if key in wanted_set and expires_at > out.get(key, -np.inf):
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
        """Store keys (inside the flush's transaction) and purge expired ones; returns purged.

        Call ``committed`` once the transaction has committed.
        """
        # The write lock is ours: the rows get the ids after the last one ever given.
        row = conn.execute("SELECT seq FROM sqlite_sequence WHERE name = 'dedup_log'").fetchone()
        items = sorted(keys.items(), key=itemgetter(1))  # expiry order, as the purge reads
        self._pending = ((0 if row is None else int(row[0])) + 1, [k for k, _ in items])
        # Keys that share an expiry (one append's arrival time) go in as one JSON
        # array, unpacked in SQLite's C code: a third of the cost of a row each.
        runs = [
            (at, json.dumps([k for k, _ in run], ensure_ascii=False))
            for at, run in groupby(items, itemgetter(1))
        ]
        if len(runs) * 8 > len(items) or any("\\u0000" in text for _, text in runs):
            conn.executemany(  # a NUL would end the key inside SQLite's JSON
                "INSERT INTO dedup_log (scope, key, expires_at) VALUES (?, ?, ?)",
                [(self.scope, k, v) for k, v in items],
            )
        else:
            for at, text in runs:
                conn.execute(
                    "INSERT INTO dedup_log (scope, key, expires_at)"
                    " SELECT ?, value, ? FROM json_each(?) ORDER BY key",
                    (self.scope, at, text),
                )
        return self.purge(conn, watermark, max(purge_batch, 2 * len(keys)))

    def purge(self, conn: sqlite3.Connection, before: float, limit: int) -> int:
        """Delete keys that expired at or before ``before``, from the oldest on.

        Only the ``limit`` oldest keys are looked at, so a purge with nothing
        to do costs the same in any table. Expiry follows arrival order (one
        window per scope), so the oldest keys are the expired ones; after a
        change of window a few may wait for the front to reach them, which
        is harmless: a lookup compares expiries, it never assumes a purge.
        The same holds for the shortcut: while the oldest key has not expired,
        nothing is looked at (a flush would otherwise read ``limit`` rows for
        nothing, most of the time).
        """
        oldest = conn.execute(
            "SELECT expires_at FROM dedup_log WHERE scope = ? ORDER BY id LIMIT 1", (self.scope,)
        ).fetchone()
        if oldest is None or oldest[0] > before:
            return 0
        return conn.execute(
            "DELETE FROM dedup_log WHERE id IN (SELECT id FROM dedup_log WHERE scope = ?"
            " ORDER BY id LIMIT ?) AND expires_at <= ?",
            (self.scope, limit, before),
        ).rowcount

    def count(self) -> int:
        row = self.db.conn.execute(
            "SELECT COUNT(*) FROM dedup_log WHERE scope = ?", (self.scope,)
        ).fetchone()
        return int(row[0])


class DedupOptions(StepOptions):
    key: str = "event_uuid"
    window: Duration = 86_400.0
    purge_batch: int = Field(10_000, ge=1)


def _seconds(column: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """A timestamp column → POSIX seconds (float64), whatever its unit: the values
    ``micros / 1_000_000`` gives in Python (exact while micros fit in 53 bits)."""
    micros = pc.cast(pc.cast(column, pa.timestamp("us", tz="UTC")), pa.int64())
    values = micros.to_numpy(zero_copy_only=False)
    if len(values) and np.abs(values).max() >= 2**53:  # after the year 2255: as Python does
        return np.array([v / 1_000_000 for v in values.tolist()], np.float64)
    return values.astype(np.float64) / 1_000_000


def decide_exact(
    keys: Sequence[str | None],
    times: Sequence[float],
    kept: dict[str, float],
    stored: Mapping[str, float],
    window: float,
) -> list[bool]:
    """The rule, row by row: keep a row unless its key has an expiry after its time;
    a kept row starts its key's window (``kept``: key → expiry, updated)."""
    mask: list[bool] = []
    keep = mask.append
    for k, at in zip(keys, times, strict=True):
        if k is None:  # nothing to compare: never a duplicate
            keep(True)
            continue
        expires = kept.get(k, stored.get(k))
        if expires is not None and expires > at:
            keep(False)
        else:
            kept[k] = at + window
            keep(True)
    return mask


def decide(
    column: pa.Array | pa.ChunkedArray,
    keys: list[str | None],
    times: np.ndarray,
    kept: dict[str, float],
    stored: Mapping[str, float],
    window: float,
) -> np.ndarray:
    """``decide_exact`` over a batch, vectorised: keys are independent of each other,
    so a row whose key appears once in the batch and is neither in ``kept`` nor in
    ``stored`` is kept without looking further; only the other rows (repeats, keys
    seen before) go through the exact rule, in their order."""
    mask = np.ones(len(keys), bool)
    encoded = pc.dictionary_encode(column)
    if isinstance(encoded, pa.ChunkedArray):
        encoded = encoded.combine_chunks()
    valid = np.asarray(pc.is_valid(encoded).to_numpy(zero_copy_only=False), bool)
    indices = pc.fill_null(encoded.indices, 0).to_numpy(zero_copy_only=False)
    size = len(encoded.dictionary) + 1  # one spare: nulls point at 0 even with no values
    counts = np.bincount(indices[valid], minlength=size)
    seen = kept.keys() | stored.keys()
    known = np.zeros(size, bool)
    known[: size - 1] = np.fromiter(
        (k in seen for k in encoded.dictionary.to_pylist()), bool, size - 1
    )
    hard = valid & ((counts[indices] > 1) | known[indices])
    simple = np.flatnonzero(valid & ~hard)
    expiry = (times[simple] + window).tolist()
    kept.update(zip([keys[i] for i in simple.tolist()], expiry, strict=True))
    rows = np.flatnonzero(hard).tolist()
    if rows:
        exact = decide_exact([keys[i] for i in rows], times[rows].tolist(), kept, stored, window)
        mask[rows] = exact
    return mask


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
                column = batch.column(opts.key)
                if not pa.types.is_string(column.type):  # keys compare as text
                    column = pa.array(
                        [None if k is None else str(k) for k in column.to_pylist()], pa.string()
                    )
                keys = column.to_pylist()
                times = _seconds(batch.column(TIME_COLUMN))
                if len(times):
                    newest = max(newest, float(times.max()))
                fresh = set(keys) - kept.keys()
                fresh.discard(None)
                stored = store.expiries(fresh)
                mask = decide(column, keys, times, kept, stored, opts.window)
                dropped = len(mask) - int(mask.sum())
                if dropped:
                    ctx.count("duplicates", dropped)
                    dups = batch.filter(pa.array(~mask))
                    ctx.count_by(dups, "duplicates")
                    batch = batch.filter(pa.array(mask))
                yield batch

            def commit(conn: sqlite3.Connection) -> None:
                store.commit(conn, kept, watermark=newest, purge_batch=opts.purge_batch)

            ctx.on_commit.append(commit)
            ctx.after_commit.append(store.committed)

        return dedup
