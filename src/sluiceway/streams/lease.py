"""Leases with expiry in the state database: one holder at a time, taken over after death.

A stream function must have exactly one live consumer, or two processes
would flush the same records. The holder renews its lease while it works and
re-checks it inside every commit transaction, so a holder that stalled past
its expiry and was replaced cannot commit anything afterwards. A holder that
died on this host (its pid is gone) is replaced at once instead of after the
expiry; on another host, the expiry is the only evidence.
"""

from __future__ import annotations

import os
import socket
import sqlite3
import time
import uuid
import weakref

from ..errors import SluicewayError
from ..state import StateDB

HOST = socket.gethostname()

# Owners alive in this process: a lease row naming this pid but an owner not in
# here belongs to an object that was closed or collected, i.e. is dead.
_LIVE: set[str] = set()


class LeaseLost(SluicewayError):
    """Another process holds (or took over) the lease: stop and forget buffered work."""


def _pid_dead(host: str, pid: int, owner: str) -> bool:
    if host != HOST:
        return False
    if pid == os.getpid():
        return owner not in _LIVE
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    try:  # a zombie (killed, not yet reaped) holds nothing
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
            return f.read().rsplit(")", 1)[-1].split()[0] == "Z"
    except (OSError, IndexError):
        return False


class Lease:
    """A named lease held by this object (its owner id is unique per object)."""

    def __init__(self, db: StateDB, name: str, *, ttl: float, owner: str | None = None) -> None:
        self.db = db
        self.name = name
        self.ttl = ttl
        base = owner or f"{HOST}:{os.getpid()}"
        self.owner = f"{base}/{uuid.uuid4().hex[:8]}"
        self.expires_at = 0.0  # our own view; the database is the truth
        _LIVE.add(self.owner)
        weakref.finalize(self, _LIVE.discard, self.owner)

    def acquire(self) -> bool:
        """Hold or renew the lease; False while someone else holds it.

        Cheap when held: the database is touched only once a third of the
        ttl has passed since the last renewal.
        """
        now = time.time()
        if self.expires_at - now > self.ttl * 2 / 3:
            return True
        _LIVE.add(self.owner)  # again, after a release
        row = self.db.conn.execute(
            "SELECT owner, host, pid, expires_at FROM leases WHERE name = ?", (self.name,)
        ).fetchone()
        dead_owner = ""
        if row is not None and row["owner"] != self.owner and row["expires_at"] > now:
            if not _pid_dead(row["host"], row["pid"], row["owner"]):
                self.expires_at = 0.0
                return False
            dead_owner = row["owner"]
        with self.db.transaction() as conn:
            got = conn.execute(
                "INSERT INTO leases (name, owner, host, pid, expires_at) VALUES (?, ?, ?, ?, ?)"
                " ON CONFLICT (name) DO UPDATE SET owner = excluded.owner, host = excluded.host,"
                " pid = excluded.pid, expires_at = excluded.expires_at"
                " WHERE leases.owner = excluded.owner OR leases.expires_at <= ?"
                " OR leases.owner = ? RETURNING owner",
                (self.name, self.owner, HOST, os.getpid(), now + self.ttl, now, dead_owner),
            ).fetchone()
        self.expires_at = now + self.ttl if got is not None else 0.0
        return got is not None

    def confirm(self, conn: sqlite3.Connection) -> None:
        """Inside a write transaction: renew, or raise LeaseLost (a fence for commits)."""
        now = time.time()
        cur = conn.execute(
            "UPDATE leases SET expires_at = ? WHERE name = ? AND owner = ?",
            (now + self.ttl, self.name, self.owner),
        )
        if cur.rowcount != 1:
            self.expires_at = 0.0
            raise LeaseLost(f"lease {self.name!r} is no longer held by {self.owner}")
        self.expires_at = now + self.ttl

    def release(self) -> None:
        """Give the lease up now so a successor need not wait for the expiry."""
        _LIVE.discard(self.owner)
        if self.expires_at:
            with self.db.transaction() as conn:
                conn.execute(
                    "DELETE FROM leases WHERE name = ? AND owner = ?", (self.name, self.owner)
                )
        self.expires_at = 0.0

    @staticmethod
    def holder(db: StateDB, name: str) -> dict[str, object] | None:
        row = db.conn.execute("SELECT * FROM leases WHERE name = ?", (name,)).fetchone()
        return None if row is None else dict(row)
