"""Stream functions: buffer records, flush them through the steps, exactly once.

A stream function (``functions: {f: {stream: events, steps: [...]}}``) reads
its stream from its checkpoint, buffers records until ``flush_records`` or
``flush_seconds`` (or, when draining, until it has caught up), and then runs
its steps once over the buffered range. The last step is a dataset writer.

The flush is exactly once under crashes because of its order:

1. **Intent.** Before the first file is written, the seq range
   ``from..to`` and the file keys are recorded in ``stream_flushes``.
2. **Files.** Each file is written aside and published atomically
   (``bucket.open_write``); its key is derived from (consumer, from, to), so
   writing it again replaces it with the same bytes.
3. **Commit**, in ONE state-database transaction: the lease is re-checked
   (a fence against a stalled ex-holder), the checkpoint moves from
   ``from - 1`` to ``to`` (compare-and-set), the dedup keys of the range are
   stored, the counters move, a ledger entry records the flush, and the
   intent is deleted.

A crash before 1 loses only buffered memory: the records are re-read. A crash
between 1 and 3 leaves the intent; the next holder of the lease replays
*exactly that range* before reading anything new, and because the steps see
the same records and the same dedup state (dedup windows are measured in the
stream's own arrival times, not the clock), the replay writes the same keys
with the same content. A crash after 3 is a finished flush.
"""

from __future__ import annotations

import json
import logging
import sqlite3
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import pyarrow.compute as pc

from .. import faults
from ..errors import SluicewayError
from ..events import Event
from ..ledger import Claim, SqliteLedger
from ..steps import STEPS, parse_step
from ..steps.base import StepContext, StepFn
from .base import CheckpointConflict
from .events import EventChunk
from .lease import Lease, LeaseLost

if TYPE_CHECKING:
    from ..pipeline import Pipeline
    from ..state import StateDB

log = logging.getLogger("sluiceway.streams")

READ_CHUNK = 5_000  # records read at a time (a poll reads up to one flush)
TRIM_BATCH = 10_000  # records trimmed per flush, so a trim never holds the lock for long
RETRY_MAX = 60.0


def lease_name(stream: str, function: str) -> str:
    return f"stream:{stream}/{function}"


def flush_ledger_key(function: str, stream: str, from_seq: int, to_seq: int) -> str:
    return f"{function}|stream:{stream}@{from_seq}-{to_seq}"


@dataclass
class FlushContext(StepContext):
    """The StepContext of one flush: a seq range of one stream, for one function.

    Steps that take part in the exactly-once commit use the extra fields:
    ``on_commit`` hooks run inside the commit transaction (dedup keys),
    ``after_commit`` ones once it has committed (caches of what it wrote), and
    ``plan_outputs`` must be called with every object key *before* the first
    one is written (the dataset writer), so a crash can be replayed.
    """

    db: StateDB | None = None
    stream: str = ""
    from_seq: int = 0
    to_seq: int = 0
    replay: bool = False
    on_commit: list[Callable[[sqlite3.Connection], None]] = field(default_factory=list)
    after_commit: list[Callable[[], None]] = field(default_factory=list)
    plan_outputs: Callable[[list[dict[str, str]]], None] | None = None
    by_event_name: dict[str, dict[str, int]] = field(default_factory=dict)

    def count_event(self, event_name: str, what: str, n: int = 1) -> None:
        """Per event name counters (records, duplicates, written)."""
        counts = self.by_event_name.setdefault(event_name, {})
        counts[what] = counts.get(what, 0) + n

    def count_by(
        self, table: pa.Table | pa.RecordBatch, what: str, column: str = "event_name"
    ) -> None:
        if column not in table.schema.names or table.num_rows == 0:
            return
        for item in pc.value_counts(table.column(column)).to_pylist():
            self.count_event(str(item["values"]), what, int(item["counts"]))


@dataclass
class FlushResult:
    """What one poll did: ``done`` (a flush committed) or ``retry`` (it failed)."""

    status: str
    function: str
    stream: str
    from_seq: int
    to_seq: int
    info: dict[str, Any]

    @property
    def id(self) -> str:
        return f"{self.stream}:{self.from_seq}-{self.to_seq}"


def flush_info(
    ctx: FlushContext,
    rejected: list[dict[str, Any]],
    *,
    from_seq: int | str,
    to_seq: int | str,
    worker: str,
    started_at: float,
    shard: str | None = None,
) -> dict[str, Any]:
    """What a flush reports in its ledger entry (``run`` summaries, status): one shape
    for the worker's consumer and for Lambda, which names the Kinesis shard and its
    sequence numbers."""
    where = {} if shard is None else {"shard": shard}
    return {
        "input": " ".join(["stream", ctx.stream, *where.values(), f"seqs {from_seq}..{to_seq}"]),
        "stream": ctx.stream,
        **where,
        "from_seq": from_seq,
        "to_seq": to_seq,
        "outputs": ctx.outputs,
        "stats": ctx.stats,
        "by_event_name": ctx.by_event_name,
        "rejected": rejected[:100],
        "replay": ctx.replay,
        "worker": worker,
        "started_at": started_at,
    }


def _counted(ctx: StepContext, name: str, batches: Iterator[Any]) -> Iterator[Any]:
    ctx.stats.setdefault(name, 0)
    for batch in batches:
        ctx.count(name, batch.num_rows)
        yield batch


class StreamConsumer:
    """The consumer side of one stream function, in one worker process."""

    def __init__(self, pipeline: Pipeline, function: str, *, worker_id: str) -> None:
        cfg = pipeline.config
        self.pipeline = pipeline
        self.function = function
        self.config = cfg.functions[function]
        assert self.config.stream is not None, f"{function} is not a stream function"
        self.stream_name = self.config.stream
        self.stream = pipeline.stream(self.stream_name)
        self.stream_config = cfg.stream_config(self.stream_name)
        self.worker_id = worker_id
        self.steps: list[StepFn] = []
        sink_options: Any = None
        for raw in self.config.steps:
            step_name, options = parse_step(raw)
            step_type = STEPS[step_name]
            self.steps.append(step_type.build(options, cfg))
            sink_options = step_type.options(options)
        # The sink (validated by config: a dataset writer) says when to flush.
        self.flush_records = int(getattr(sink_options, "flush_records", 10_000))
        self.flush_seconds = float(getattr(sink_options, "flush_seconds", 60.0))
        self.lease = Lease(
            pipeline.db,
            lease_name(self.stream_name, function),
            ttl=self.stream_config.lease_timeout,
            owner=worker_id,
        )
        self.buffer: list[EventChunk] = []
        self.buffered = 0  # records in the buffer
        self.buffered_since = 0.0
        self.next_seq: int | None = None
        self.failures = 0
        self.retry_at = 0.0
        self.last_error: str | None = None
        # The last poll read records: the stream is busy, the next poll is due soon.
        self.read_any = False

    # -- the loop --------------------------------------------------------------

    def poll(self, *, flush_idle: bool = False) -> list[FlushResult]:
        """One step of work: replay an unfinished flush, read, and flush if due.

        ``flush_idle`` (set while draining) flushes as soon as the stream is
        caught up instead of waiting for ``flush_seconds``.
        """
        if time.monotonic() < self.retry_at:
            return []
        if not self.lease.acquire():
            self._forget()
            return []
        try:
            return self._poll(flush_idle)
        except (LeaseLost, CheckpointConflict) as e:
            log.warning("%s: %s; dropping buffered records", self.function, e)
            self._forget()
            return []
        except Exception as e:
            self.failures += 1
            delay = min(RETRY_MAX, 0.25 * 2 ** (self.failures - 1))
            self.retry_at = time.monotonic() + delay
            self.last_error = f"{type(e).__name__}: {e}"
            log.exception(
                "%s: flush failed (attempt %d); retrying in %.2fs",
                self.function,
                self.failures,
                delay,
            )
            self._forget()
            return [
                FlushResult(
                    "retry",
                    self.function,
                    self.stream_name,
                    0,
                    0,
                    {
                        "error_type": type(e).__name__,
                        "message": str(e),
                        "attempt": self.failures,
                        "retry_in": delay,
                    },
                )
            ]

    def _poll(self, flush_idle: bool) -> list[FlushResult]:
        results: list[FlushResult] = []
        intent = self.pending_intent()
        if intent is not None:
            self._forget()
            results.append(self._replay(intent))
        if self.next_seq is None:
            self.next_seq = self.stream.checkpoint(self.function) + 1
        # Read until the flush is full or the stream caught up: a poll that
        # leaves records behind would make the worker idle with work waiting.
        caught_up = False
        self.read_any = False
        while not caught_up and self.buffered < self.flush_records:
            want = min(self.flush_records - self.buffered, READ_CHUNK)
            got = self.stream.read_events(self.next_seq, want)
            caught_up = got is None or got.count < want
            if got is not None:
                self.read_any = True
                if not self.buffer:
                    self.buffered_since = time.monotonic()
                self.buffer.append(got)
                self.buffered += got.count
                self.next_seq = got.last_seq + 1
        if self.buffer and (
            self.buffered >= self.flush_records
            or time.monotonic() - self.buffered_since >= self.flush_seconds
            or (flush_idle and caught_up)
        ):
            chunks, self.buffer, self.buffered = self.buffer, [], 0
            results.append(self._flush(chunks, prior_files=None))
        return results

    def _forget(self) -> None:
        """Drop what is buffered: it is re-read from the checkpoint."""
        self.buffer = []
        self.buffered = 0
        self.next_seq = None

    def close(self) -> None:
        self._forget()
        try:
            self.lease.release()
        except Exception:  # closing must not fail a shutdown
            log.exception("%s: could not release the lease", self.function)

    # -- the flush -------------------------------------------------------------

    def pending_intent(self) -> dict[str, Any] | None:
        row = self.pipeline.db.conn.execute(
            "SELECT * FROM stream_flushes WHERE consumer = ?", (self.function,)
        ).fetchone()
        if row is None:
            return None
        out = dict(row)
        out["files"] = json.loads(out["files"])
        return out

    def _replay(self, intent: dict[str, Any]) -> FlushResult:
        lo, hi = int(intent["from_seq"]), int(intent["to_seq"])
        log.warning("%s: replaying the unfinished flush of seqs %d..%d", self.function, lo, hi)
        chunks: list[EventChunk] = []
        at = lo
        while at <= hi:
            chunk = self.stream.read_events(at, min(READ_CHUNK, hi - at + 1))
            # Seqs are never reused: a chunk without gaps starts where asked.
            if chunk is None or chunk.first_seq != at or chunk.last_seq - at + 1 != chunk.count:
                raise SluicewayError(
                    f"stream {self.stream_name!r} no longer holds seqs {lo}..{hi} of "
                    f"{self.function}'s unfinished flush"
                )
            chunks.append(chunk)
            at = chunk.last_seq + 1
        return self._flush(chunks, prior_files=intent["files"])

    def _flush(
        self, chunks: list[EventChunk], prior_files: list[dict[str, str]] | None
    ) -> FlushResult:
        started = time.time()
        lo, hi = chunks[0].first_seq, chunks[-1].last_seq
        batches = [c.batch for c in chunks if c.batch.num_rows]
        rejected = [r for c in chunks for r in c.rejected]
        ctx = FlushContext(
            event=Event(
                source="sluiceway.stream",
                detail_type="Stream Flush",
                detail={
                    "stream": self.stream_name,
                    "function": self.function,
                    "from_seq": lo,
                    "to_seq": hi,
                },
                id=f"{self.stream_name}:{lo}-{hi}",
            ),
            function=self.function,
            buckets=self.pipeline.buckets,
            tables=self.pipeline.tables,
            publish=self.pipeline.publish_once,
            db=self.pipeline.db,
            stream=self.stream_name,
            from_seq=lo,
            to_seq=hi,
            replay=prior_files is not None,
        )
        planned: list[list[dict[str, str]]] = []

        def plan(files: list[dict[str, str]]) -> None:
            self._record_intent(lo, hi, files, prior_files or [])
            planned.append(files)

        ctx.plan_outputs = plan
        ctx.count("rows_in", sum(c.count for c in chunks))
        for batch in batches:
            ctx.count_by(batch, "records")
        if rejected:
            ctx.count("rejected", len(rejected))
            log.warning(
                "%s: %d records of seqs %d..%d are not events; first: %s",
                self.function,
                len(rejected),
                lo,
                hi,
                rejected[0],
            )
        stream: Iterator[pa.RecordBatch] = iter(batches)
        last = len(self.steps) - 1
        for i, step in enumerate(self.steps):
            if i == last:
                stream = _counted(ctx, "rows_out", stream)
            stream = step(ctx, stream)
        for _ in stream:  # drive the chain; the sink consumes everything
            pass
        if not planned:
            raise SluicewayError(
                f"function {self.function!r}: the last step wrote nothing and planned no "
                "outputs; a stream function must end with write_dataset"
            )
        faults.point("after_commit")  # files published, checkpoint not committed
        info = flush_info(
            ctx, rejected, from_seq=lo, to_seq=hi, worker=self.worker_id, started_at=started
        )
        self._commit(ctx, info)
        faults.point("after_done")
        self.failures = 0
        self.last_error = None
        self._trim()
        return FlushResult("done", self.function, self.stream_name, lo, hi, info)

    def _record_intent(
        self, lo: int, hi: int, files: list[dict[str, str]], prior: list[dict[str, str]]
    ) -> None:
        """Step 1: the range and every key, durable before the first file is written.

        On a replay, keys the first attempt wrote and this one does not are
        deleted (only possible if a user step is not deterministic); they
        stay listed until the commit so a crash in between deletes them again.
        """
        keys = {(f["bucket"], f["key"]) for f in files}
        stale = [f for f in prior if (f["bucket"], f["key"]) not in keys]
        with self.pipeline.db.transaction() as conn:
            self.lease.confirm(conn)
            conn.execute(
                "INSERT OR REPLACE INTO stream_flushes"
                " (consumer, stream, from_seq, to_seq, files, created_at)"
                " VALUES (?, ?, ?, ?, ?, ?)",
                (
                    self.function,
                    self.stream_name,
                    lo,
                    hi,
                    json.dumps([*files, *stale]),
                    time.time(),
                ),
            )
        for f in stale:
            log.warning(
                "%s: replay of %d..%d no longer writes %s/%s; deleting it",
                self.function,
                lo,
                hi,
                f["bucket"],
                f["key"],
            )
            self.pipeline.bucket(f["bucket"]).delete(f["key"])

    def _commit(self, ctx: FlushContext, info: dict[str, Any]) -> None:
        """Step 3: checkpoint, dedup keys, counters, intent (and ledger entry); all or nothing."""
        lo, hi = ctx.from_seq, ctx.to_seq
        ledger = self.pipeline.ledger
        same_db = isinstance(ledger, SqliteLedger) and ledger.db is self.pipeline.db
        key = flush_ledger_key(self.function, self.stream_name, lo, hi)
        finished = time.time()
        info["finished_at"] = finished
        info["seconds"] = round(finished - info["started_at"], 6)
        with self.pipeline.db.transaction() as conn:
            self.lease.confirm(conn)
            self.stream.set_checkpoint(self.function, hi, expect=lo - 1)
            for hook in ctx.on_commit:
                hook(conn)
            conn.execute("DELETE FROM stream_flushes WHERE consumer = ?", (self.function,))
            totals = {
                "records": ctx.stats.get("rows_in", 0),
                "duplicates": ctx.stats.get("duplicates", 0),
                "written": ctx.stats.get("rows_written", 0),
                "rejected": ctx.stats.get("rejected", 0),
            }
            rows = [("*", totals), *sorted(ctx.by_event_name.items())]
            conn.executemany(
                "INSERT INTO stream_stats (consumer, event_name, records, duplicates, written,"
                " rejected) VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (consumer, event_name)"
                " DO UPDATE SET records = records + excluded.records,"
                " duplicates = duplicates + excluded.duplicates,"
                " written = written + excluded.written, rejected = rejected + excluded.rejected",
                [
                    (
                        self.function,
                        name,
                        c.get("records", 0),
                        c.get("duplicates", 0),
                        c.get("written", 0),
                        c.get("rejected", 0),
                    )
                    for name, c in rows
                ],
            )
            if same_db:
                self._record_in_ledger(key, info)
        for after in ctx.after_commit:
            after()
        if not same_db:  # a remote ledger cannot join; it only keeps the record for summaries
            self._record_in_ledger(key, info)

    def _record_in_ledger(self, key: str, info: dict[str, Any]) -> None:
        """The flush as a finished ledger entry, so `run` summaries and status count it."""
        ledger = self.pipeline.ledger
        if ledger.claim(key, function=self.function, owner=self.lease.owner, ttl=60.0) is (
            Claim.ACQUIRED
        ):
            ledger.complete(key, owner=self.lease.owner, info=info)

    def _trim(self) -> None:
        """Retention: drop records every consumer of the stream has committed."""
        retention = self.stream_config.retention
        if retention is None:
            return
        consumers = [
            name
            for name, fn in self.pipeline.config.functions.items()
            if fn.stream == self.stream_name
        ]
        upto = min(self.stream.checkpoint(name) for name in consumers)
        if upto > 0:
            self.stream.trim(upto, older_than=time.time() - retention, limit=TRIM_BATCH)
