"""Connection health: what each backend's reconnect path saw, for ``sluiceway status``.

Every network backend already retries a lost connection with backoff; this
module is the one place they tell about it, so the loss is visible from
another process. A backend calls :func:`lost` on each failed attempt and
:func:`ok` after each success (a dictionary lookup when nothing was lost, so
it costs nothing on the hot path). The process keeps one record per
(backend, redacted URL): when the connection was lost, how many attempts
failed since, the last error, when it came back and how many times it did.

The records are written to the state database (table ``connections``) by a
small writer thread, never by the backend's own thread: a reconnect loop must
not wait on a SQLite lock, and the state file is local, so it can be written
while the network is gone. Workers and the runtime name themselves with
:func:`persist_to`; ``status``, ``status --json`` and ``/metrics`` read the
rows with :func:`read`. Only connections that were lost at least once have a
row: a healthy pipeline has none.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import asdict, dataclass
from typing import Any

from .state import StateDB

log = logging.getLogger("sluiceway.health")

# Rows not updated for this long belong to runs long gone: dropped on the next write.
KEEP_FOR = 7 * 86_400.0
# Longest a last-error text is kept (a driver's message can quote a whole query).
ERROR_CHARS = 500


@dataclass
class Connection:
    """One backend connection of this process, as its reconnect path reported it."""

    backend: str  # redis, postgresql, rabbitmq, nats, sqs, sns, dynamodb, s3
    url: str  # password (and secret-looking options) hidden by the caller
    state: str = "ok"  # "lost" while attempts fail, "ok" once one succeeds again
    lost_at: float | None = None  # when the current (or the last) outage began
    attempts: int = 0  # failed attempts in the current (or the last) outage
    last_error: str | None = None
    recovered_at: float | None = None
    reconnects: int = 0  # outages that ended, since the process started


def _error_text(error: BaseException | str) -> str:
    if isinstance(error, BaseException):
        text = " ".join(str(error).split())
        text = f"{type(error).__name__}: {text}" if text else type(error).__name__
    else:
        text = error
    return text[:ERROR_CHARS]


class Health:
    """The process-wide registry; use the module functions, not an instance of your own."""

    def __init__(self) -> None:
        self._records: dict[tuple[str, str], Connection] = {}
        self._lost: set[tuple[str, str]] = set()  # read without the lock by ok()
        self._dirty: set[tuple[str, str]] = set()
        self._cond = threading.Condition()
        self._sink: tuple[StateDB, str] | None = None
        self._writer: threading.Thread | None = None
        self._writing = False

    # -- reports (any thread) ------------------------------------------------------

    def lost(self, backend: str, url: str, error: BaseException | str) -> None:
        key = (backend, url)
        with self._cond:
            rec = self._records.get(key)
            if rec is None:
                rec = self._records[key] = Connection(backend, url)
            if rec.state != "lost":
                rec.state = "lost"
                rec.lost_at = time.time()
                rec.attempts = 0
                self._lost.add(key)
                log.warning("%s at %s: connection lost (%s)", backend, url, _error_text(error))
            rec.attempts += 1
            rec.last_error = _error_text(error)
            self._changed(key)

    def ok(self, backend: str, url: str) -> None:
        key = (backend, url)
        if key not in self._lost:
            return
        with self._cond:
            rec = self._records.get(key)
            if rec is None or rec.state != "lost":
                return
            rec.state = "ok"
            rec.recovered_at = time.time()
            rec.reconnects += 1
            self._lost.discard(key)
            log.warning(
                "%s at %s: connection back after %d failed attempts over %.1fs",
                backend,
                url,
                rec.attempts,
                rec.recovered_at - (rec.lost_at or rec.recovered_at),
            )
            self._changed(key)

    def snapshot(self) -> list[Connection]:
        with self._cond:
            return [Connection(**asdict(r)) for r in self._records.values()]

    def reset(self) -> None:
        """Forget everything (a forked child starts with no history of its own)."""
        self._cond = threading.Condition()
        self._records, self._lost, self._dirty = {}, set(), set()
        self._sink, self._writer, self._writing = None, None, False

    # -- persistence -----------------------------------------------------------------

    def _changed(self, key: tuple[str, str]) -> None:
        if self._sink is None:
            return
        self._dirty.add(key)
        self._cond.notify_all()

    def persist_to(self, db: StateDB, owner: str) -> None:
        """Write this process's records to ``db`` under ``owner`` (a worker id) from now on."""
        with self._cond:
            self._sink = (db, owner)
            self._dirty.update(self._records)
            if self._writer is None or not self._writer.is_alive():
                self._writer = threading.Thread(
                    target=self._write_loop, name="sluiceway-health", daemon=True
                )
                self._writer.start()
            self._cond.notify_all()

    def flush(self, timeout: float = 5.0) -> bool:
        """Wait until every change so far is written (or ``timeout``); True if it was."""
        with self._cond:
            return self._cond.wait_for(
                lambda: self._sink is None or not (self._dirty or self._writing), timeout
            )

    def _write_loop(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: bool(self._dirty) and self._sink is not None, 60)
                if not self._dirty or self._sink is None:
                    continue
                db, owner = self._sink
                rows = [asdict(self._records[k]) for k in self._dirty]
                self._dirty.clear()
                self._writing = True
            try:
                _write(db, owner, rows)
            except Exception as e:  # the state file is gone or locked: try with the next change
                log.debug("could not record connection health: %s", e)
            finally:
                with self._cond:
                    self._writing = False
                    self._cond.notify_all()


def _write(db: StateDB, owner: str, rows: list[dict[str, Any]]) -> None:
    now = time.time()
    with db.transaction() as conn:
        conn.execute("DELETE FROM connections WHERE updated_at < ?", (now - KEEP_FOR,))
        conn.executemany(
            "INSERT OR REPLACE INTO connections (owner, backend, url, state, lost_at, attempts,"
            " last_error, recovered_at, reconnects, updated_at)"
            " VALUES (:owner, :backend, :url, :state, :lost_at, :attempts, :last_error,"
            " :recovered_at, :reconnects, :updated_at)",
            [{**r, "owner": owner, "updated_at": now} for r in rows],
        )


def read(db: StateDB) -> list[dict[str, Any]]:
    """Every recorded connection of every worker, lost ones first, for ``status``."""
    rows = db.conn.execute(
        "SELECT owner AS worker, backend, url, state, lost_at, attempts, last_error,"
        " recovered_at, reconnects, updated_at FROM connections"
        " ORDER BY state = 'ok', backend, url, owner"
    ).fetchall()
    return [dict(r) for r in rows]


HEALTH = Health()
lost = HEALTH.lost
ok = HEALTH.ok
snapshot = HEALTH.snapshot
persist_to = HEALTH.persist_to
flush = HEALTH.flush

if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=HEALTH.reset)
