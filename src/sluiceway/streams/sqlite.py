"""Streams in the embedded SQLite state database: the default, nothing to install.

Seqs are assigned under SQLite's single write lock (``BEGIN IMMEDIATE``), so
the order in which appends commit *is* the seq order and no reader can see a
gap that is filled later. Appends commit with ``synchronous=FULL``: the ingest
endpoint answers 202 only after this returns, and then the events survive a
power cut, not just a crash of the process.

Checked events (``append_events``, what ingest uses) are stored as one Arrow
IPC segment per append in ``stream_segments``, read back as Arrow with no
Python object per event; other records (``append``) are JSON rows in
``stream_records``. Both share the seqs of ``stream_heads`` and every read
merges them by seq, so a stream written before segments existed (JSON rows
only) reads as it did: there is nothing to migrate.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import pyarrow as pa

from ..state import StateDB
from .base import CheckpointConflict, Record, Stream
from .events import (
    EVENT_RECEIVED,
    STORED_SCHEMA,
    EventChunk,
    batch_events,
    encode_json,
    fragments_to_batch,
)

# Each field of the stored JSON as a JSON fragment, parsed in SQLite's C code,
# and whether the record has no other fields: what fragments_to_batch needs.
_FRAGMENTS = (
    "SELECT seq, appended_at, data -> '$.event_uuid', data -> '$.event_name',"
    " data -> '$.created_at', data -> '$.payload',"
    " json_remove(data, '$.event_uuid', '$.event_name', '$.created_at', '$.payload') = '{}'"
    " FROM stream_records WHERE stream = ? AND seq >= ? AND seq < ? ORDER BY seq LIMIT ?"
)
_SEGMENTS = (
    "SELECT first_seq, last_seq, appended_at, data FROM stream_segments"
    " WHERE stream = ? AND last_seq >= ? AND first_seq <= ? ORDER BY last_seq"
)
_TS = pa.timestamp("us", tz="UTC")


def _encode_segment(batch: pa.RecordBatch) -> bytes:
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, batch.schema) as writer:
        writer.write_batch(batch)
    return sink.getvalue().to_pybytes()


def _decode_segment(data: bytes) -> pa.RecordBatch:
    with pa.ipc.open_stream(pa.py_buffer(data)) as reader:
        return reader.read_next_batch()


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
            first, at = self._advance(conn, len(rows))
            conn.executemany(
                "INSERT INTO stream_records (stream, seq, appended_at, data) VALUES (?, ?, ?, ?)",
                [(self.name, first + i, at, row) for i, row in enumerate(rows)],
            )
        return list(range(first, first + len(rows)))

    def append_events(self, batch: pa.RecordBatch) -> range:
        """One segment for the whole batch: a single row, however many events."""
        if batch.num_rows == 0:
            return range(0)
        if batch.schema != STORED_SCHEMA:
            raise ValueError(f"not a batch of checked events: {batch.schema}")
        data = _encode_segment(batch)
        conn = self.db.conn
        if not conn.in_transaction:
            conn.execute("PRAGMA synchronous=FULL")
        with self.db.transaction() as conn:
            first, at = self._advance(conn, batch.num_rows)
            conn.execute(
                "INSERT INTO stream_segments (stream, first_seq, last_seq, appended_at, data)"
                " VALUES (?, ?, ?, ?, ?)",
                (self.name, first, first + batch.num_rows - 1, at, data),
            )
        return range(first, first + batch.num_rows)

    def _advance(self, conn: sqlite3.Connection, n: int) -> tuple[int, float]:
        """Under the write lock: take ``n`` seqs and the arrival time; (first seq, time)."""
        head = conn.execute(
            "SELECT last_seq, last_appended_at FROM stream_heads WHERE stream = ?",
            (self.name,),
        ).fetchone()
        last_seq, last_at = (0, 0.0) if head is None else (head[0], head[1])
        at = max(self.clock(), last_at)  # arrival times never go backwards
        conn.execute(
            "INSERT INTO stream_heads (stream, last_seq, last_appended_at) VALUES (?, ?, ?)"
            " ON CONFLICT (stream) DO UPDATE SET last_seq = excluded.last_seq,"
            " last_appended_at = excluded.last_appended_at",
            (self.name, last_seq + n, at),
        )
        return last_seq + 1, at

    def _parts(self, from_seq: int, max_records: int) -> Iterator[tuple[str, int, int, Any]]:
        """What holds seqs ``from_seq``.. in order, up to ``max_records`` records:
        ("segment", first, last, (appended_at, batch)) with the batch already
        sliced to first..last, and ("rows", first, before, None) for JSON rows
        with seqs in ``first..before - 1`` (read by the caller).

        The statements below may each see a newer snapshot than the one before
        (autocommit); bounding them all by the head read first keeps the read
        gapless, since every later snapshot holds every seq up to that head.
        """
        conn = self.db.conn
        head = self.last_seq()
        segments = conn.execute(_SEGMENTS, (self.name, from_seq, head))
        try:
            yield from self._walk(segments, from_seq, max_records, head)
        finally:
            segments.close()  # an unfinished statement would pin the reader's snapshot

    def _walk(
        self, segments: sqlite3.Cursor, from_seq: int, max_records: int, head: int
    ) -> Iterator[tuple[str, int, int, Any]]:
        conn = self.db.conn
        at, left = from_seq, max_records
        while left > 0 and at <= head:
            seg = segments.fetchone()
            end = head + 1 if seg is None else max(at, seg[0])
            row = conn.execute(
                "SELECT seq FROM stream_records WHERE stream = ? AND seq >= ? AND seq < ?"
                " ORDER BY seq LIMIT 1",
                (self.name, at, end),
            ).fetchone()
            if row is not None:  # JSON rows come first; the caller counts what it read
                got = yield ("rows", row[0], end, None)
                left -= got
                if left <= 0:
                    return
            if seg is None:
                return
            first, last, appended_at, data = seg
            batch = _decode_segment(data)
            lo = max(at, first)  # a read may start inside a segment (or a trimmed one)
            hi = min(last, lo + left - 1)
            yield ("segment", lo, hi, (appended_at, batch.slice(lo - first, hi - lo + 1)))
            left -= hi - lo + 1
            at = hi + 1

    def read(self, from_seq: int, max_records: int = 1000) -> list[Record]:
        if max_records <= 0:
            return []
        out: list[Record] = []
        parts = self._parts(from_seq, max_records)
        part = next(parts, None)
        while part is not None:
            kind, lo, hi, seg = part
            if kind == "rows":
                got = self._rows(lo, hi, max_records - len(out))
                out += got
                part = _send(parts, len(got))
                continue
            appended_at, batch = seg
            out += [
                Record(seq=lo + i, appended_at=appended_at, data=event)
                for i, event in enumerate(batch_events(batch))
            ]
            part = next(parts, None)
        return out

    def _rows(self, lo: int, before: int, limit: int) -> list[Record]:
        rows = self.db.conn.execute(
            "SELECT seq, appended_at, data FROM stream_records"
            " WHERE stream = ? AND seq >= ? AND seq < ? ORDER BY seq LIMIT ?",
            (self.name, lo, before, limit),
        ).fetchall()
        return [Record(seq=r[0], appended_at=r[1], data=json.loads(r[2])) for r in rows]

    def read_events(self, from_seq: int, max_records: int = 1000) -> EventChunk | None:
        """Segments are already Arrow: sliced, with their arrival time as a column.
        JSON rows go to Arrow column by column when they are events as ingest
        stored them; a run of rows with anything else in it (a record appended
        without the check, a NaN that SQLite's JSON parser refuses) takes the
        exact path, record by record."""
        if max_records <= 0:
            return None
        chunks: list[EventChunk] = []
        parts = self._parts(from_seq, max_records)
        part = next(parts, None)
        while part is not None:
            kind, lo, hi, seg = part
            if kind == "rows":
                chunk = self._rows_chunk(lo, hi, max_records - sum(c.count for c in chunks))
                chunks.append(chunk)
                part = _send(parts, chunk.count)
                continue
            appended_at, batch = seg
            received = pa.repeat(pa.scalar(round(appended_at * 1_000_000), _TS), batch.num_rows)
            events = batch.append_column(EVENT_RECEIVED, received)
            chunks.append(EventChunk(lo, hi, hi - lo + 1, events, []))
            part = next(parts, None)
        if not chunks:
            return None
        if len(chunks) == 1:
            return chunks[0]
        return EventChunk(
            chunks[0].first_seq,
            chunks[-1].last_seq,
            sum(c.count for c in chunks),
            pa.concat_batches([c.batch for c in chunks]),
            [r for c in chunks for r in c.rejected],
        )

    def _rows_chunk(self, lo: int, before: int, limit: int) -> EventChunk:
        try:
            rows = self.db.conn.execute(_FRAGMENTS, (self.name, lo, before, limit)).fetchall()
        except sqlite3.OperationalError as e:
            if "JSON" not in str(e):
                raise
            rows = []
        if rows:
            seqs, appended, *fields = zip(*rows, strict=True)
            batch = fragments_to_batch(appended, *fields)
            if batch is not None:
                return EventChunk(seqs[0], seqs[-1], len(seqs), batch, [])
        chunk = EventChunk.of(self._rows(lo, before, limit))
        assert chunk is not None, "the caller found a row"
        return chunk

    def last_seq(self) -> int:
        row = self.db.conn.execute(
            "SELECT last_seq FROM stream_heads WHERE stream = ?", (self.name,)
        ).fetchone()
        return 0 if row is None else int(row[0])

    def length(self) -> int:
        row = self.db.conn.execute(
            "SELECT (SELECT COUNT(*) FROM stream_records WHERE stream = ?),"
            " (SELECT COALESCE(SUM(last_seq - first_seq + 1), 0) FROM stream_segments"
            " WHERE stream = ?)",
            (self.name, self.name),
        ).fetchone()
        return int(row[0]) + int(row[1])

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
            done = conn.execute(
                "DELETE FROM stream_records WHERE stream = ? AND seq IN ("
                " SELECT seq FROM stream_records WHERE stream = ? AND seq <= ?"
                " ORDER BY seq LIMIT ?) AND appended_at < ?",
                (self.name, self.name, upto_seq, limit, cutoff),
            ).rowcount
            segments = conn.execute(
                "SELECT rowid, first_seq, last_seq FROM stream_segments"
                " WHERE stream = ? AND first_seq <= ? AND appended_at < ?"
                " ORDER BY last_seq LIMIT ?",
                (self.name, upto_seq, cutoff, max(0, limit - done)),
            ).fetchall()
            for rowid, first, last in segments:
                if done >= limit:
                    break
                cut = min(last, upto_seq, first + limit - done - 1)  # the last seq to drop
                if cut == last:
                    conn.execute("DELETE FROM stream_segments WHERE rowid = ?", (rowid,))
                else:  # the front of a segment: it keeps its other records
                    (data,) = conn.execute(
                        "SELECT data FROM stream_segments WHERE rowid = ?", (rowid,)
                    ).fetchone()
                    rest = _decode_segment(data).slice(cut - first + 1)
                    conn.execute(
                        "UPDATE stream_segments SET first_seq = ?, data = ? WHERE rowid = ?",
                        (cut + 1, _encode_segment(rest), rowid),
                    )
                done += cut - first + 1
            return done


def _send(parts: Iterator[Any], n: int) -> Any:
    """Tell ``_parts`` how many JSON rows were read; its next part (None at the end)."""
    try:
        return parts.send(n)  # type: ignore[attr-defined]
    except StopIteration:
        return None
