"""What each worker is working on, so a death or a hang is pinned on its message.

A worker that is SIGKILLed, runs out of memory or is ended by ``os._exit`` in
user code cannot report its own failure. Before it starts on a message it
writes a row here (function, message, receipt, deadline); the supervisor that
notices the death reads the row and records the failure on the message, so
the DLQ says "worker died while processing X" instead of a bare receive count,
and the message is retried at once instead of after the visibility timeout.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

from .state import StateDB


@dataclass(frozen=True)
class Doing:
    worker: str
    pid: int
    function: str
    queue: str
    message_id: str
    receipt: str
    ledger_key: str
    started_at: float
    deadline: float


class Activity:
    def __init__(self, db: StateDB) -> None:
        self.db = db

    def start(
        self,
        worker: str,
        *,
        function: str,
        queue: str,
        message_id: str,
        receipt: str,
        ledger_key: str,
        timeout: float,
    ) -> None:
        now = time.time()
        with self.db.transaction() as conn:
            conn.execute(
                "INSERT OR REPLACE INTO activity (worker, pid, function, queue, message_id,"
                " receipt, ledger_key, started_at, deadline, updated_at)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    worker,
                    os.getpid(),
                    function,
                    queue,
                    message_id,
                    receipt,
                    ledger_key,
                    now,
                    now + timeout,
                    now,
                ),
            )

    def finish(self, worker: str) -> None:
        with self.db.transaction() as conn:
            conn.execute("DELETE FROM activity WHERE worker = ?", (worker,))

    def doing(self, worker: str) -> Doing | None:
        row = self.db.conn.execute("SELECT * FROM activity WHERE worker = ?", (worker,)).fetchone()
        if row is None or row["message_id"] is None:
            return None
        return Doing(
            worker=row["worker"],
            pid=row["pid"],
            function=row["function"],
            queue=row["queue"],
            message_id=row["message_id"],
            receipt=row["receipt"],
            ledger_key=row["ledger_key"],
            started_at=row["started_at"],
            deadline=row["deadline"],
        )

    def all(self) -> list[Doing]:
        rows = self.db.conn.execute("SELECT worker FROM activity").fetchall()
        return [d for r in rows if (d := self.doing(r[0])) is not None]
