"""The stream interface: ordered records under sequence numbers, as Kinesis has them.

A queue forgets a message once it is acked; a stream keeps every record in
append order and lets each consumer remember how far it got (a checkpoint).
That is what makes exactly-once flushes possible: a consumer can re-read the
very same range after a crash and produce the very same output.

Kept small on purpose: every backend (the SQLite table in the state
database, later Kinesis, Redis Streams, NATS JetStream) implements these few
calls and passes ``tests/contract/test_streams.py``.
"""

from __future__ import annotations

import abc
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..errors import SluicewayError

if TYPE_CHECKING:
    import pyarrow as pa

    from .events import EventChunk


class CheckpointConflict(SluicewayError):
    """A checkpoint moved under us: another consumer committed, or a replay went wrong."""


@dataclass(frozen=True)
class Record:
    """One record as stored: its sequence number, arrival time and JSON object."""

    seq: int
    appended_at: float
    data: dict[str, Any]


class Stream(abc.ABC):
    """An append-only, totally ordered log of JSON objects, with consumer checkpoints.

    Sequence numbers start at 1, increase by one per record and are never
    reused (not even after a trim). A record is visible to ``read`` only once
    every record before it is: a reader that got seq N never later finds an
    N-1 it skipped. ``appended_at`` never goes backwards along the seqs, so
    time windows measured in it (dedup) give the same answer on every replay.
    """

    name: str

    @abc.abstractmethod
    def append(self, records: Sequence[Mapping[str, Any]]) -> list[int]:
        """Append records in order; returns their seqs once they are durable.

        All or nothing: when this raises, none of the records was appended.
        """

    def append_events(self, batch: pa.RecordBatch) -> range:
        """Append checked events (a batch of ``STORED_SCHEMA``, as ``events_batch``
        makes it); returns their seqs once they are durable. All or nothing.

        A backend may store the batch as it is; reading it back must give what
        appending its events as JSON objects would.
        """
        from .events import batch_events

        seqs = self.append(batch_events(batch))
        return range(seqs[0], seqs[-1] + 1) if seqs else range(0)

    @abc.abstractmethod
    def read(self, from_seq: int, max_records: int = 1000) -> list[Record]:
        """Up to ``max_records`` records with ``seq >= from_seq``, in seq order."""

    def read_events(self, from_seq: int, max_records: int = 1000) -> EventChunk | None:
        """What ``read`` returns, as one Arrow batch of events (None when there is nothing).

        A backend may override it to build the batch without a Python object
        per record; the result must be the one this gives.
        """
        from .events import EventChunk

        return EventChunk.of(self.read(from_seq, max_records))

    @abc.abstractmethod
    def last_seq(self) -> int:
        """The seq of the newest record ever appended (0 for a new stream)."""

    @abc.abstractmethod
    def length(self) -> int:
        """How many records the stream holds now (appended minus trimmed)."""

    @abc.abstractmethod
    def checkpoint(self, consumer: str) -> int:
        """The last seq ``consumer`` committed (0 if it never did)."""

    @abc.abstractmethod
    def set_checkpoint(self, consumer: str, seq: int, *, expect: int | None = None) -> None:
        """Record that ``consumer`` is done with every record up to ``seq``.

        With ``expect``, raise CheckpointConflict unless the checkpoint is
        ``expect`` now (a compare-and-set that fences a stale consumer).
        Backends keep checkpoints in the state database so this joins the
        caller's transaction: a flush commits its checkpoint, its dedup keys
        and its bookkeeping together or not at all.
        """

    @abc.abstractmethod
    def trim(self, upto_seq: int, *, older_than: float | None = None, limit: int = 10_000) -> int:
        """Delete at most ``limit`` records with ``seq <= upto_seq`` (and, if
        given, appended before the time ``older_than``); returns how many."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release what the backend holds (connections are per thread here)."""
