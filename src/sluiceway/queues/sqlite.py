"""Queues and topics in the embedded SQLite state database.

A message row is never removed on receive, only hidden (``visible_at`` in the
future) with a fresh receipt; ack deletes it by id *and* receipt, so a worker
whose message timed out and went to someone else cannot delete it from under
them. Long polling is a bounded poll of an indexed query: SQLite has no
notification, and a ready-check costs microseconds.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Mapping, Sequence
from contextlib import nullcontext
from typing import Any

from ..state import StateDB
from .base import Broker, Message, OutgoingMessage, Queue, QueueCounts, QueueSpec

# Between empty polls; grows to the maximum while a queue stays idle.
POLL_MIN = 0.005
POLL_MAX = 0.05
# The ready messages of a queue, first visible first: (queue, now, limit).
_READY = (
    "SELECT seq FROM messages WHERE queue = ? AND visible_at <= ? ORDER BY visible_at, seq LIMIT ?"
)
# Ids per DELETE in an ack: well under SQLite's limit of bound parameters.
ACK_CHUNK = 512


def _padded(values: list[str]) -> list[str]:
    """``values``, the last one repeated up to a power of two long.

    An ``IN (?, ...)`` list of every length would be a statement of its own
    for SQLite's statement cache (kept by text), prepared again and again;
    padded, ten lengths cover every batch up to ACK_CHUNK. A repeated value
    matches nothing more.
    """
    return values + values[-1:] * ((1 << (len(values) - 1).bit_length()) - len(values))


def _random_hex() -> str:
    """128 random bits, as uuid4().hex but without building a UUID (a few µs per call)."""
    return os.urandom(16).hex()


def _loads(text: str) -> dict[str, Any]:
    # Most messages carry no attributes: skip the decoder for the common case.
    return {} if text == "{}" else json.loads(text)


def _row_to_message(row: Any) -> Message:
    return Message(
        id=row["id"],
        queue=row["queue"],
        body=row["body"],
        attributes=_loads(row["attributes"]),
        receive_count=row["receive_count"],
        receipt=row["receipt"] or "",
        sent_at=row["sent_at"],
        failure=json.loads(row["failure"]) if row["failure"] else None,
    )


class SqliteQueue(Queue):
    def __init__(self, db: StateDB, spec: QueueSpec, broker: SqliteBroker) -> None:
        self.db = db
        self.spec = spec
        self._broker = broker
        self._full = False  # the last receive filled its batch

    def __repr__(self) -> str:
        return f"SqliteQueue({self.name!r})"

    def send_batch(self, messages: Sequence[OutgoingMessage]) -> list[str]:
        now = time.time()
        # One random prefix per call, then a counter: as unique as a UUID per
        # message (the prefix is 128 random bits), at a fraction of the cost.
        prefix = f"{_random_hex()}-"
        name = self.name
        visible = now + self.spec.delay
        rows = [
            (
                m.id or prefix + str(i),
                name,
                m.body,
                # Most messages carry no attributes: skip the encoder for them.
                json.dumps(m.attributes) if m.attributes else "{}",
                now,
                visible if m.delay is None else now + m.delay,
            )
            for i, m in enumerate(messages)
        ]
        with self.db.transaction() as conn:
            conn.executemany(
                "INSERT OR IGNORE INTO messages (id, queue, body, attributes, sent_at, visible_at)"
                " VALUES (?, ?, ?, ?, ?, ?)",
                rows,
            )
        return [row[0] for row in rows]

    def _receive_once(self, max_messages: int) -> list[Message]:
        now = time.time()
        name = self.name
        # A cheap read first: most empty polls never take the write lock. Not
        # after a full batch, though: more are likely waiting, and the
        # transaction below finds out as well.
        if not self._full and self.db.conn.execute(_READY, (name, now, 1)).fetchone() is None:
            return []
        limit = self.spec.max_receive_count
        # One receipt per receive call: with the message id it still names
        # exactly this delivery, and the batch is hidden in one statement.
        receipt = _random_hex()
        with self.db.transaction() as conn:
            rows = conn.execute(
                "SELECT id, body, attributes, receive_count, sent_at, failure FROM messages"
                " WHERE queue = ? AND visible_at <= ? ORDER BY visible_at, seq LIMIT ?",
                (name, now, max_messages),
            ).fetchall()
            self._full = len(rows) == max_messages
            # The same rows again (the write lock is held since the SELECT), by
            # a statement whose text does not change with the batch, so it
            # stays prepared. OR IGNORE: no row can fail a constraint here, and
            # saying so spares SQLite the statement journal it keeps for a
            # multi-row write that might abort halfway (spilled to a temp file
            # past 64 KiB: a quarter of the time a batch of 100 took).
            conn.execute(
                "UPDATE OR IGNORE messages SET visible_at = ?, receive_count = receive_count + 1,"
                f" receipt = ? WHERE seq IN ({_READY}) AND receive_count < ?",
                (now + self.spec.visibility_timeout, receipt, name, now, max_messages, limit),
            )
            out: list[Message] = []
            for mid, body, attributes, count, sent_at, failure in rows:
                failed = json.loads(failure) if failure else None
                if count >= limit:
                    # Received that often without an ack or a recorded failure:
                    # the worker died each time. Stop the crash loop here.
                    msg = Message(mid, name, body, _loads(attributes), count, "", sent_at)
                    self.dead_letter(
                        msg,
                        failed
                        or {
                            "error_type": "MaxReceiveCountExceeded",
                            "message": (
                                f"received {count} times without being acked "
                                "(the worker died or timed out each time)"
                            ),
                        },
                    )
                    continue
                out.append(
                    Message(
                        mid, name, body, _loads(attributes), count + 1, receipt, sent_at, failed
                    )
                )
        return out

    def receive(self, max_messages: int = 1, *, wait: float = 0.0) -> list[Message]:
        deadline = time.monotonic() + wait
        pause = POLL_MIN
        while True:
            got = self._receive_once(max_messages)
            remaining = deadline - time.monotonic()
            if got or remaining <= 0:
                return got
            time.sleep(min(pause, remaining))
            pause = min(pause * 2, POLL_MAX)

    def ack(self, messages: Sequence[Message]) -> int:
        # Messages of one receive share a receipt: one statement per receipt
        # (and per ACK_CHUNK ids), as a transaction of its own when it is the
        # only one.
        by_receipt: dict[str, list[str]] = {}
        for m in messages:
            by_receipt.setdefault(m.receipt, []).append(m.id)
        chunks = [
            (receipt, _padded(ids[start : start + ACK_CHUNK]))
            for receipt, ids in by_receipt.items()
            for start in range(0, len(ids), ACK_CHUNK)
        ]
        with self.db.transaction() if len(chunks) > 1 else nullcontext():
            return sum(
                self.db.write(
                    "DELETE FROM messages WHERE queue = ? AND receipt = ?"
                    f" AND id IN ({','.join('?' * len(ids))})",
                    (self.name, receipt, *ids),
                )
                for receipt, ids in chunks
            )

    def change_visibility(self, message: Message, seconds: float) -> bool:
        changed = self.db.write(
            "UPDATE messages SET visible_at = ? WHERE queue = ? AND id = ? AND receipt = ?",
            (time.time() + seconds, self.name, message.id, message.receipt),
        )
        return changed == 1

    def record_failure(self, message: Message, failure: dict[str, Any], retry_in: float) -> bool:
        changed = self.db.write(
            "UPDATE messages SET visible_at = ?, failure = ? WHERE queue = ? AND id = ?"
            " AND receipt = ?",
            (time.time() + retry_in, json.dumps(failure), self.name, message.id, message.receipt),
        )
        return changed == 1

    def dead_letter(self, message: Message, failure: dict[str, Any]) -> None:
        dlq = self.spec.dead_letter_queue
        with self.db.transaction() as conn:
            if dlq is None:
                # No DLQ configured: keep the message, parked far in the future,
                # rather than drop it; `dlq list` cannot see it, `status` can.
                conn.execute(
                    "UPDATE messages SET visible_at = 1e18, failure = ? WHERE queue = ? AND id = ?",
                    (json.dumps(failure), self.name, message.id),
                )
                return
            attributes = dict(message.attributes)
            attributes["source_queue"] = self.name
            attributes["dead_lettered_at"] = time.time()
            conn.execute("DELETE FROM messages WHERE queue = ? AND id = ?", (self.name, message.id))
            conn.execute(
                "INSERT OR REPLACE INTO messages"
                " (id, queue, body, attributes, sent_at, visible_at, receive_count, failure)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    message.id,
                    dlq,
                    message.body,
                    json.dumps(attributes),
                    message.sent_at,
                    time.time(),
                    message.receive_count,
                    json.dumps(failure),
                ),
            )

    def counts(self) -> QueueCounts:
        now = time.time()
        row = self.db.conn.execute(
            "SELECT"
            " SUM(CASE WHEN visible_at <= ? THEN 1 ELSE 0 END),"
            " SUM(CASE WHEN visible_at > ? AND receipt IS NOT NULL THEN 1 ELSE 0 END),"
            " SUM(CASE WHEN visible_at > ? AND receipt IS NULL THEN 1 ELSE 0 END)"
            " FROM messages WHERE queue = ?",
            (now, now, now, self.name),
        ).fetchone()
        return QueueCounts(visible=row[0] or 0, in_flight=row[1] or 0, delayed=row[2] or 0)

    def peek(self, limit: int = 100) -> list[Message]:
        rows = self.db.conn.execute(
            "SELECT * FROM messages WHERE queue = ? ORDER BY seq LIMIT ?", (self.name, limit)
        ).fetchall()
        return [_row_to_message(r) for r in rows]

    def redrive(self, to: Queue, ids: Sequence[str] | None = None) -> int:
        if not isinstance(to, SqliteQueue):
            return self._redrive_across(to, ids)
        now = time.time()
        with self.db.transaction() as conn:
            if ids is None:
                cur = conn.execute(
                    "UPDATE OR REPLACE messages SET queue = ?, visible_at = ?, receive_count = 0,"
                    " receipt = NULL WHERE queue = ?",
                    (to.name, now, self.name),
                )
            else:
                cur = conn.executemany(
                    "UPDATE OR REPLACE messages SET queue = ?, visible_at = ?, receive_count = 0,"
                    " receipt = NULL WHERE queue = ? AND id = ?",
                    [(to.name, now, self.name, i) for i in ids],
                )
            return cur.rowcount

    def _redrive_across(self, to: Queue, ids: Sequence[str] | None) -> int:
        wanted = set(ids) if ids is not None else None
        moved = 0
        for msg in self.peek(limit=1_000_000):
            if wanted is not None and msg.id not in wanted:
                continue
            to.send(msg.body, attributes=msg.attributes, id=msg.id)
            with self.db.transaction() as conn:
                conn.execute("DELETE FROM messages WHERE queue = ? AND id = ?", (self.name, msg.id))
            moved += 1
        return moved

    def purge(self) -> int:
        with self.db.transaction() as conn:
            return conn.execute("DELETE FROM messages WHERE queue = ?", (self.name,)).rowcount


class SqliteBroker(Broker):
    """Queues and topics in one SQLite database; topics are config, not rows."""

    def __init__(
        self,
        db: StateDB,
        specs: Mapping[str, QueueSpec],
        subscriptions: Mapping[str, Sequence[str]] | None = None,
    ) -> None:
        self.db = db
        self.specs = dict(specs)
        self.subscriptions = {t: list(qs) for t, qs in (subscriptions or {}).items()}
        self._queues: dict[str, SqliteQueue] = {}

    def queue(self, name: str) -> SqliteQueue:
        q = self._queues.get(name)
        if q is None:
            spec = self.specs.get(name)
            if spec is None:
                raise KeyError(f"unknown queue {name!r}")
            q = self._queues[name] = SqliteQueue(self.db, spec, self)
        return q

    def publish(self, topic: str, messages: Sequence[OutgoingMessage]) -> None:
        queues = self.subscriptions.get(topic)
        if queues is None:
            raise KeyError(f"unknown topic {topic!r}")
        with self.db.transaction():
            for name in queues:
                self.queue(name).send_batch(messages)
