"""Queues and topics in the embedded SQLite state database.

A message row is never removed on receive, only hidden (``visible_at`` in the
future) with a fresh receipt; ack deletes it by id *and* receipt, so a worker
whose message timed out and went to someone else cannot delete it from under
them. Long polling is a bounded poll of an indexed query: SQLite has no
notification, and a ready-check costs microseconds.
"""

from __future__ import annotations

import json
import time
import uuid
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

    def __repr__(self) -> str:
        return f"SqliteQueue({self.name!r})"

    def send_batch(self, messages: Sequence[OutgoingMessage]) -> list[str]:
        now = time.time()
        # One random prefix per call, then a counter: as unique as a UUID per
        # message (the prefix is 128 random bits), at a fraction of the cost.
        prefix = f"{uuid.uuid4().hex}-"
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
        conn = self.db.conn
        # A read first: an empty poll never takes the write lock. Its order,
        # first visible first, is the order of delivery.
        order = [seq for (seq,) in conn.execute(_READY, (name, now, max_messages))]
        if not order:
            return []
        # One receipt per receive call: with the message id it still names
        # exactly this delivery. One statement hides the batch, picking the
        # rows again under the write lock (another process may have taken
        # some since the read); its own commit makes it atomic.
        receipt = uuid.uuid4().hex
        hidden_until = now + self.spec.visibility_timeout
        if not self.db.write(
            "UPDATE messages SET visible_at = ?, receive_count = receive_count + 1, receipt = ?"
            f" WHERE seq IN ({_READY})",
            (hidden_until, receipt, name, now, max_messages),
        )[1]:
            return []
        # Then read back what it hid, found by its receipt. (RETURNING would
        # do both in one statement, but buffers its rows: slower than the two.)
        # A crash in between leaves the rows hidden until the visibility
        # timeout, as does a crash just after a receive.
        rows = conn.execute(
            "SELECT seq, id, body, attributes, receive_count, sent_at, failure FROM messages"
            " WHERE queue = ? AND visible_at = ? AND receipt = ? ORDER BY seq",
            (name, hidden_until, receipt),
        ).fetchall()
        if order != sorted(order):  # delays or redeliveries: visible_at order is not seq order
            rank = {seq: i for i, seq in enumerate(order)}
            rows.sort(key=lambda r: rank.get(r[0], max_messages))
        limit = self.spec.max_receive_count
        out: list[Message] = []
        for _, mid, body, attributes, count, sent_at, failure in rows:
            failed = json.loads(failure) if failure else None
            if count > limit:
                # Received that often without an ack or a recorded failure: the
                # worker died each time. Stop the crash loop here. Hidden under
                # this receipt, the message goes to no worker even if the
                # dead-letter below is cut short: the next receive comes here.
                msg = Message(mid, name, body, _loads(attributes), count - 1, "", sent_at)
                self.dead_letter(
                    msg,
                    failed
                    or {
                        "error_type": "MaxReceiveCountExceeded",
                        "message": (
                            f"received {count - 1} times without being acked "
                            "(the worker died or timed out each time)"
                        ),
                    },
                )
                continue
            out.append(
                Message(mid, name, body, _loads(attributes), count, receipt, sent_at, failed)
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
        # Messages of one receive share a receipt: one statement per receipt,
        # the ids in one JSON parameter. The statement's text never changes
        # (SQLite's statement cache keeps it prepared, where an IN list of
        # each length is a new statement) and has no limit on bound parameters.
        by_receipt: dict[str, list[str]] = {}
        for m in messages:
            by_receipt.setdefault(m.receipt, []).append(m.id)
        with self.db.transaction() if len(by_receipt) > 1 else nullcontext():
            return sum(
                self.db.write(
                    "DELETE FROM messages WHERE queue = ? AND receipt = ?"
                    " AND id IN (SELECT value FROM json_each(?))",
                    (self.name, receipt, json.dumps(ids)),
                )[1]
                for receipt, ids in by_receipt.items()
            )

    def change_visibility(self, message: Message, seconds: float) -> bool:
        with self.db.transaction() as conn:
            cur = conn.execute(
                "UPDATE messages SET visible_at = ? WHERE queue = ? AND id = ? AND receipt = ?",
                (time.time() + seconds, self.name, message.id, message.receipt),
            )
            return cur.rowcount == 1

    def record_failure(self, message: Message, failure: dict[str, Any], retry_in: float) -> bool:
        with self.db.transaction() as conn:
            cur = conn.execute(
                "UPDATE messages SET visible_at = ?, failure = ?"
                " WHERE queue = ? AND id = ? AND receipt = ?",
                (
                    time.time() + retry_in,
                    json.dumps(failure),
                    self.name,
                    message.id,
                    message.receipt,
                ),
            )
            return cur.rowcount == 1

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
