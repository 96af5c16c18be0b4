"""The ledger: what has been seen, claimed and finished, so nothing is done twice.

Two records live here. *Objects* are the object versions an event was raised
for: the watcher, ``put`` and the start-up reconcile all go through
``first_seen`` so each version raises exactly one event. *Entries* are one
per (function, input): a worker claims an entry before it works and marks it
done after its outputs are committed, so a message re-delivered after a crash
between commit and ack is recognised and only acked. A claim expires, so a
worker that died mid-way does not block the input forever. This is the
idempotency record of Powertools for AWS Lambda, with SQLite behind it.
"""

from __future__ import annotations

import abc
import json
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from enum import Enum
from typing import Any

from .state import StateDB


class Claim(Enum):
    ACQUIRED = "acquired"  # go ahead: nobody finished or holds this input
    DONE = "done"  # finished before (or skipped for good): just ack
    BUSY = "busy"  # another worker holds a live claim: try later


@dataclass(frozen=True)
class Entry:
    key: str
    function: str
    status: str
    owner: str | None
    expires_at: float | None
    attempts: int
    created_at: float
    updated_at: float
    info: dict[str, Any]


class Ledger(abc.ABC):
    @abc.abstractmethod
    def first_seen(self, bucket: str, key: str, etag: str, size: int, event_id: str) -> bool:
        """Record an object version; True only the first time it is offered."""

    @abc.abstractmethod
    def claim(self, key: str, *, function: str, owner: str, ttl: float) -> Claim: ...

    @abc.abstractmethod
    def extend(self, key: str, *, owner: str, ttl: float) -> bool: ...

    @abc.abstractmethod
    def complete(self, key: str, *, owner: str, info: dict[str, Any]) -> None: ...

    @abc.abstractmethod
    def fail(self, key: str, *, owner: str, info: dict[str, Any]) -> None:
        """Release the claim after a failure; a later delivery may claim again."""

    @abc.abstractmethod
    def skip(self, key: str, *, owner: str, info: dict[str, Any]) -> None:
        """Final without output (e.g. the input was deleted before processing)."""

    @abc.abstractmethod
    def get(self, key: str) -> Entry | None: ...

    @abc.abstractmethod
    def function_counts(self) -> dict[str, dict[str, int]]:
        """Per function, how many entries are in each status."""

    @abc.abstractmethod
    def has_seen(self, bucket: str, key: str, etag: str) -> bool:
        """Whether an event was raised for this object version (no side effect)."""

    @abc.abstractmethod
    def versions(self, bucket: str, key: str) -> list[dict[str, Any]]:
        """The versions of an object events were raised for, oldest first."""

    @abc.abstractmethod
    def other_versions(self, function: str, input_prefix: str, current: str) -> list[Entry]:
        """Finished entries of the same function and input, other than ``current``.

        ``input_prefix`` is the identity without its version (``bucket/key@``):
        a new version's outputs replace those of the versions before it.
        """

    @abc.abstractmethod
    def supersede(self, key: str) -> None:
        """A later version of the same input replaced this one's outputs."""

    @abc.abstractmethod
    def entries_for(self, identity: str) -> list[Entry]:
        """Every function's entry for one input identity (for ``trace``)."""

    @abc.abstractmethod
    def entries_since(self, since: float) -> list[Entry]:
        """Entries changed since ``since``: what one run did."""

    @abc.abstractmethod
    def done_infos(self) -> Iterator[tuple[str, dict[str, Any]]]:
        """``(function, info)`` of every finished entry, for metrics."""

    @abc.abstractmethod
    def mark_sent(self, ids: Sequence[str]) -> None:
        """Remember message ids as sent (after the send: a crash re-sends, never loses)."""

    @abc.abstractmethod
    def unsent(self, ids: Sequence[str]) -> list[str]:
        """The ids among ``ids`` not yet marked sent."""

    @abc.abstractmethod
    def forget_sent(self, older_than: float) -> int:
        """Drop sent-id records older than ``older_than`` seconds."""

    def close(self) -> None:  # noqa: B027 - optional hook
        pass


class SqliteLedger(Ledger):
    def __init__(self, db: StateDB) -> None:
        self.db = db

    def first_seen(self, bucket: str, key: str, etag: str, size: int, event_id: str) -> bool:
        with self.db.transaction() as conn:
            cur = conn.execute(
                "INSERT OR IGNORE INTO objects (bucket, key, etag, size, seen_at, event_id)"
                " VALUES (?, ?, ?, ?, ?, ?)",
                (bucket, key, etag, size, time.time(), event_id),
            )
            return cur.rowcount == 1

    def claim(self, key: str, *, function: str, owner: str, ttl: float) -> Claim:
        now = time.time()
        with self.db.transaction() as conn:
            row = conn.execute(
                "INSERT INTO ledger (key, function, status, owner, expires_at, attempts,"
                " created_at, updated_at) VALUES (?, ?, 'in_progress', ?, ?, 1, ?, ?)"
                " ON CONFLICT (key) DO UPDATE SET status = 'in_progress', owner = excluded.owner,"
                " expires_at = excluded.expires_at, attempts = ledger.attempts + 1,"
                " updated_at = excluded.updated_at"
                " WHERE ledger.status = 'failed'"
                " OR (ledger.status = 'in_progress' AND ledger.expires_at < excluded.updated_at)"
                " RETURNING status",
                (key, function, owner, now + ttl, now, now),
            ).fetchone()
            if row is not None:
                return Claim.ACQUIRED
            status = conn.execute("SELECT status FROM ledger WHERE key = ?", (key,)).fetchone()[0]
        return Claim.BUSY if status == "in_progress" else Claim.DONE

    def extend(self, key: str, *, owner: str, ttl: float) -> bool:
        with self.db.transaction() as conn:
            cur = conn.execute(
                "UPDATE ledger SET expires_at = ?, updated_at = ?"
                " WHERE key = ? AND owner = ? AND status = 'in_progress'",
                (time.time() + ttl, time.time(), key, owner),
            )
            return cur.rowcount == 1

    def _finish(self, key: str, owner: str, status: str, info: dict[str, Any]) -> None:
        text = json.dumps(info, default=str)  # before the write lock, not while holding it
        with self.db.transaction() as conn:
            conn.execute(
                "UPDATE ledger SET status = ?, expires_at = NULL, updated_at = ?, info = ?"
                " WHERE key = ? AND owner = ? AND status = 'in_progress'",  # done stays done
                (status, time.time(), text, key, owner),
            )

    def complete(self, key: str, *, owner: str, info: dict[str, Any]) -> None:
        self._finish(key, owner, "done", info)

    def fail(self, key: str, *, owner: str, info: dict[str, Any]) -> None:
        self._finish(key, owner, "failed", info)

    def skip(self, key: str, *, owner: str, info: dict[str, Any]) -> None:
        self._finish(key, owner, "skipped", info)

    def get(self, key: str) -> Entry | None:
        row = self.db.conn.execute("SELECT * FROM ledger WHERE key = ?", (key,)).fetchone()
        if row is None:
            return None
        return Entry(
            key=row["key"],
            function=row["function"],
            status=row["status"],
            owner=row["owner"],
            expires_at=row["expires_at"],
            attempts=row["attempts"],
            created_at=row["created_at"],
            updated_at=row["updated_at"],
            info=json.loads(row["info"]),
        )

    def function_counts(self) -> dict[str, dict[str, int]]:
        out: dict[str, dict[str, int]] = {}
        for fn, status, n in self.db.conn.execute(
            "SELECT function, status, COUNT(*) FROM ledger GROUP BY function, status"
        ):
            out.setdefault(fn, {})[status] = n
        return out

    def has_seen(self, bucket: str, key: str, etag: str) -> bool:
        row = self.db.conn.execute(
            "SELECT 1 FROM objects WHERE bucket = ? AND key = ? AND etag = ?", (bucket, key, etag)
        ).fetchone()
        return row is not None

    def versions(self, bucket: str, key: str) -> list[dict[str, Any]]:
        return [
            {"etag": r[0], "size": r[1], "seen_at": r[2], "event_id": r[3]}
            for r in self.db.conn.execute(
                "SELECT etag, size, seen_at, event_id FROM objects WHERE bucket = ? AND key = ?"
                " ORDER BY seen_at",
                (bucket, key),
            )
        ]

    def other_versions(self, function: str, input_prefix: str, current: str) -> list[Entry]:
        # A range of the primary key, not LIKE on the (function, status) index:
        # that scans every finished entry of the function, once per input.
        start = f"{function}|{input_prefix}"
        rows = self.db.conn.execute(
            "SELECT key FROM ledger WHERE key >= ? AND key < ? AND key != ?"
            " AND +function = ? AND +status = 'done'",
            (start, start + "\U0010ffff", current, function),
        ).fetchall()
        return [e for r in rows if (e := self.get(r[0])) is not None]

    def supersede(self, key: str) -> None:
        with self.db.transaction() as conn:
            conn.execute(
                "UPDATE ledger SET status = 'superseded', updated_at = ? WHERE key = ?",
                (time.time(), key),
            )

    def entries_for(self, identity: str) -> list[Entry]:
        rows = self.db.conn.execute(
            "SELECT key FROM ledger WHERE key LIKE ? ESCAPE '\\' ORDER BY created_at",
            ("%|" + like_escape(identity),),
        ).fetchall()
        return [e for r in rows if (e := self.get(r[0])) is not None]

    def entries_since(self, since: float) -> list[Entry]:
        rows = self.db.conn.execute(
            "SELECT key FROM ledger WHERE updated_at >= ? ORDER BY updated_at", (since,)
        ).fetchall()
        return [e for r in rows if (e := self.get(r[0])) is not None]

    def done_infos(self) -> Iterator[tuple[str, dict[str, Any]]]:
        for function, info in self.db.conn.execute(
            "SELECT function, info FROM ledger WHERE status = 'done'"
        ):
            yield function, json.loads(info)

    def mark_sent(self, ids: Sequence[str]) -> None:
        now = time.time()
        with self.db.transaction() as conn:
            conn.executemany(
                "INSERT OR IGNORE INTO sent (id, sent_at) VALUES (?, ?)", [(i, now) for i in ids]
            )

    def unsent(self, ids: Sequence[str]) -> list[str]:
        conn = self.db.conn
        return [
            i
            for i in ids
            if conn.execute("SELECT 1 FROM sent WHERE id = ?", (i,)).fetchone() is None
        ]

    def forget_sent(self, older_than: float) -> int:
        with self.db.transaction() as conn:
            return conn.execute(
                "DELETE FROM sent WHERE sent_at < ?", (time.time() - older_than,)
            ).rowcount


def like_escape(text: str) -> str:
    """``text`` with LIKE's wildcards escaped (ESCAPE '\\')."""
    return text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
