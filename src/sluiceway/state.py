"""The embedded state database: one SQLite file (WAL) for queues, ledger and stats.

One file means one transaction can cover "this object was seen" and "its
messages were queued", which is what makes event raising exactly-once on the
embedded default without any coordinator. Every process opens its own
connection; SQLite's WAL lets readers run beside the single writer, and the
busy timeout turns lock contention into a bounded wait instead of an error.
"""

from __future__ import annotations

import os
import sqlite3
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from .errors import SluicewayError

SCHEMA = """
CREATE TABLE IF NOT EXISTS messages (
    seq            INTEGER PRIMARY KEY AUTOINCREMENT,
    id             TEXT NOT NULL,
    queue          TEXT NOT NULL,
    body           TEXT NOT NULL,
    attributes     TEXT NOT NULL DEFAULT '{}',
    sent_at        REAL NOT NULL,
    visible_at     REAL NOT NULL,
    receive_count  INTEGER NOT NULL DEFAULT 0,
    receipt        TEXT,
    failure        TEXT,
    UNIQUE (queue, id)
);
CREATE INDEX IF NOT EXISTS messages_ready ON messages (queue, visible_at);

CREATE TABLE IF NOT EXISTS ledger (
    key         TEXT PRIMARY KEY,
    function    TEXT NOT NULL,
    status      TEXT NOT NULL,
    owner       TEXT,
    expires_at  REAL,
    attempts    INTEGER NOT NULL DEFAULT 0,
    created_at  REAL NOT NULL,
    updated_at  REAL NOT NULL,
    info        TEXT NOT NULL DEFAULT '{}'
);
CREATE INDEX IF NOT EXISTS ledger_function ON ledger (function, status);

CREATE TABLE IF NOT EXISTS objects (
    bucket   TEXT NOT NULL,
    key      TEXT NOT NULL,
    etag     TEXT NOT NULL,
    size     INTEGER NOT NULL,
    seen_at  REAL NOT NULL,
    event_id TEXT NOT NULL,
    PRIMARY KEY (bucket, key, etag)
);

-- What each worker process is doing now: lets the supervisor blame the right
-- message when a worker dies or overruns its function's timeout.
CREATE TABLE IF NOT EXISTS activity (
    worker      TEXT PRIMARY KEY,
    pid         INTEGER NOT NULL,
    function    TEXT,
    queue       TEXT,
    message_id  TEXT,
    receipt     TEXT,
    ledger_key  TEXT,
    started_at  REAL,
    deadline    REAL,
    updated_at  REAL NOT NULL
);

-- Connections a worker lost and how they came back (health.py), for `status`.
CREATE TABLE IF NOT EXISTS connections (
    owner         TEXT NOT NULL,
    backend       TEXT NOT NULL,
    url           TEXT NOT NULL,
    state         TEXT NOT NULL,
    lost_at       REAL,
    attempts      INTEGER NOT NULL,
    last_error    TEXT,
    recovered_at  REAL,
    reconnects    INTEGER NOT NULL,
    updated_at    REAL NOT NULL,
    PRIMARY KEY (owner, backend, url)
);

-- Table items (the embedded default's DynamoDB): JSON by table and key.
CREATE TABLE IF NOT EXISTS items (
    table_name  TEXT NOT NULL,
    pk          TEXT NOT NULL,
    item        TEXT NOT NULL,
    updated_at  REAL NOT NULL,
    PRIMARY KEY (table_name, pk)
);

-- Ids of messages a function has published, so a re-run publishes none twice.
CREATE TABLE IF NOT EXISTS sent (
    id       TEXT PRIMARY KEY,
    sent_at  REAL NOT NULL
);

-- ETags of local files by (path, size, mtime, inode): hashed once, not per start.
-- (Entries from before ETags were xxh3 hold MD5s: the identity their files
-- were recorded under, kept while the file is unchanged.)
CREATE TABLE IF NOT EXISTS etags (
    path      TEXT PRIMARY KEY,
    size      INTEGER NOT NULL,
    mtime_ns  INTEGER NOT NULL,
    ino       INTEGER NOT NULL,
    etag      TEXT NOT NULL
);

-- Streams (the embedded Kinesis): records in append order under per-stream
-- sequence numbers. The head keeps the last seq, so a trim never reuses one,
-- and the last append time, so arrival times never go backwards.
CREATE TABLE IF NOT EXISTS stream_heads (
    stream            TEXT PRIMARY KEY,
    last_seq          INTEGER NOT NULL,
    last_appended_at  REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS stream_records (
    stream       TEXT NOT NULL,
    seq          INTEGER NOT NULL,
    appended_at  REAL NOT NULL,
    data         TEXT NOT NULL,
    PRIMARY KEY (stream, seq)
) WITHOUT ROWID;
-- Checked events, one Arrow IPC segment per append (streams/sqlite.py): seqs
-- first_seq..last_seq, in the columns of streams.events.STORED_SCHEMA. Records
-- appended as JSON (and streams written before segments) stay in stream_records;
-- a read merges both by seq.
CREATE TABLE IF NOT EXISTS stream_segments (
    stream       TEXT NOT NULL,
    first_seq    INTEGER NOT NULL,
    last_seq     INTEGER NOT NULL,
    appended_at  REAL NOT NULL,
    data         BLOB NOT NULL
);
CREATE UNIQUE INDEX IF NOT EXISTS stream_segments_last ON stream_segments (stream, last_seq);
-- The last seq each consumer (a stream function) has committed.
CREATE TABLE IF NOT EXISTS stream_checkpoints (
    stream      TEXT NOT NULL,
    consumer    TEXT NOT NULL,
    seq         INTEGER NOT NULL,
    updated_at  REAL NOT NULL,
    PRIMARY KEY (stream, consumer)
);
-- Leases with expiry: one live consumer per stream function, one compaction per dataset.
CREATE TABLE IF NOT EXISTS leases (
    name        TEXT PRIMARY KEY,
    owner       TEXT NOT NULL,
    host        TEXT NOT NULL,
    pid         INTEGER NOT NULL,
    expires_at  REAL NOT NULL
);
-- A stream flush's intent (seq range, files), written before its first file and
-- deleted by the commit; one left behind by a crash is replayed exactly.
CREATE TABLE IF NOT EXISTS stream_flushes (
    consumer    TEXT PRIMARY KEY,
    stream      TEXT NOT NULL,
    from_seq    INTEGER NOT NULL,
    to_seq      INTEGER NOT NULL,
    files       TEXT NOT NULL,
    created_at  REAL NOT NULL
);
-- Dedup keys in arrival order (steps/dedup.py): appended at the end, expired
-- ones purged from the front, looked up through an in-memory index. The ids
-- never repeat (AUTOINCREMENT), so a reader can follow the table by id.
CREATE TABLE IF NOT EXISTS dedup_log (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    scope       TEXT NOT NULL,
    key         TEXT NOT NULL,
    expires_at  REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS dedup_log_scope ON dedup_log (scope, id);
-- Running counts per stream function and event name (totals under '*').
CREATE TABLE IF NOT EXISTS stream_stats (
    consumer    TEXT NOT NULL,
    event_name  TEXT NOT NULL,
    records     INTEGER NOT NULL DEFAULT 0,
    duplicates  INTEGER NOT NULL DEFAULT 0,
    written     INTEGER NOT NULL DEFAULT 0,
    rejected    INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (consumer, event_name)
);
"""


def _statements(script: str) -> list[str]:
    """Split a SQL script into statements (``;`` inside comments is not an end)."""
    out, buf = [], ""
    for line in script.splitlines(keepends=True):
        buf += line
        if sqlite3.complete_statement(buf):
            out.append(buf)
            buf = ""
    return out


def _migrate(conn: sqlite3.Connection) -> None:
    """Bring a state database written by an earlier version up to this schema."""
    old = conn.execute(
        "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'dedup_keys'"
    ).fetchone()
    if old is not None:  # dedup keys by key → in arrival (expiry) order
        conn.execute(
            "INSERT INTO dedup_log (scope, key, expires_at)"
            " SELECT scope, key, expires_at FROM dedup_keys ORDER BY scope, expires_at"
        )
        conn.execute("DROP TABLE dedup_keys")


# Deferred ETag cache entries that force a transaction of their own.
ETAG_BATCH = 256


class StateLocked(SluicewayError):
    """The state database stayed locked by another process past the deadline."""


class StateDB:
    """A connection to the state database, safe to share between threads."""

    def __init__(self, path: str | os.PathLike[str], *, busy_timeout: float = 30.0) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.busy_timeout = busy_timeout
        self._local = threading.local()
        with self.transaction() as conn:
            for statement in _statements(SCHEMA):
                conn.execute(statement)
            _migrate(conn)

    @property
    def conn(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = sqlite3.connect(
                self.path,
                timeout=self.busy_timeout,
                isolation_level=None,
                check_same_thread=True,
            )
            conn.row_factory = sqlite3.Row
            self._wal(conn)
            conn.execute("PRAGMA synchronous=NORMAL")
            # Checkpoints fsync the database: fewer, larger ones (a WAL of up to
            # ~40 MB) keep commits cheap under a high message rate.
            conn.execute("PRAGMA wal_autocheckpoint=10000")
            # 64 MiB of page cache (default 2 MiB): indexes keyed by random ids
            # (dedup keys, message ids) stay in memory as they grow.
            conn.execute("PRAGMA cache_size=-65536")
            conn.execute(f"PRAGMA busy_timeout={int(self.busy_timeout * 1000)}")
            self._local.conn = conn
            self._local.depth = 0
        return conn

    def _wal(self, conn: sqlite3.Connection) -> None:
        self._while_locked(conn, "PRAGMA journal_mode=WAL")

    def _while_locked(
        self, conn: sqlite3.Connection, statement: str, params: Sequence[Any] = ()
    ) -> sqlite3.Cursor:
        """Run ``statement``, retrying while another process holds the database.

        SQLite's busy handler covers most waits; this bounded loop covers the
        statements it gives up on at once, and ends in a clear StateLocked.
        A statement that failed on the lock changed nothing, so it can run again.
        """
        deadline = time.monotonic() + self.busy_timeout
        while True:
            try:
                return conn.execute(statement, params)
            except sqlite3.OperationalError as e:
                if "locked" not in str(e) and "busy" not in str(e):
                    raise
                if time.monotonic() >= deadline:
                    raise StateLocked(
                        f"state database {self.path} is locked by another process "
                        f"(waited {self.busy_timeout:g}s)"
                    ) from e
                time.sleep(0.05)

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """A write transaction; nested calls join the outer one.

        ``BEGIN IMMEDIATE`` takes the write lock up front so two processes
        never both read-then-write the same rows (no lost updates).
        """
        conn = self.conn
        if self._local.depth:
            self._local.depth += 1
            try:
                self._write_pending(conn)
                yield conn
            finally:
                self._local.depth -= 1
            return
        self._while_locked(conn, "BEGIN IMMEDIATE")
        self._local.depth = 1
        try:
            self._write_pending(conn)
            yield conn
        except BaseException:
            self._local.depth = 0
            conn.execute("ROLLBACK")
            raise
        self._local.depth = 0
        conn.execute("COMMIT")

    def write(self, statement: str, params: Sequence[Any] = ()) -> int:
        """One write statement as a transaction of its own; its rowcount.

        SQLite makes every statement atomic: one that is the whole write needs
        no BEGIN IMMEDIATE and COMMIT around it, two round trips fewer for an
        ack or a heartbeat, under the same write lock (taken as the statement
        starts). Inside a transaction it is part of that one; with cache
        entries pending it takes a transaction, which writes them too.
        """
        conn = self.conn
        if self._local.depth or getattr(self._local, "etags", None):
            with self.transaction() as conn:
                return conn.execute(statement, params).rowcount
        return self._while_locked(conn, statement, params).rowcount

    def cached_etag(self, path: str, size: int, mtime_ns: int, ino: int) -> str | None:
        pending = self._pending_etags().get(path)
        if pending is not None and pending[:4] == (path, size, mtime_ns, ino):
            return pending[4]
        row = self.conn.execute(
            "SELECT etag FROM etags WHERE path = ? AND size = ? AND mtime_ns = ? AND ino = ?",
            (path, size, mtime_ns, ino),
        ).fetchone()
        return None if row is None else str(row[0])

    def store_etag(self, path: str, size: int, mtime_ns: int, ino: int, etag: str) -> None:
        """Remember an ETag, written with this thread's next transaction.

        A cache entry is not worth a transaction of its own (a write lock, a
        commit) per object: ``put`` and a worker's output are followed at once
        by the transaction that raises or records them, which carries it. A
        crash before that loses only the entry; the file is hashed again.
        """
        pending = self._pending_etags()
        pending[path] = (path, size, mtime_ns, ino, etag)
        if getattr(self._local, "depth", 0) or len(pending) >= ETAG_BATCH:
            self.flush()

    def _pending_etags(self) -> dict[str, tuple[str, int, int, int, str]]:
        pending = getattr(self._local, "etags", None)
        if pending is None:
            pending = self._local.etags = {}
        return pending

    def _write_pending(self, conn: sqlite3.Connection) -> None:
        pending = getattr(self._local, "etags", None)
        if pending:
            conn.executemany(
                "INSERT OR REPLACE INTO etags (path, size, mtime_ns, ino, etag)"
                " VALUES (?, ?, ?, ?, ?)",
                list(pending.values()),
            )
            pending.clear()

    def integrity_check(self) -> str:
        return str(self.conn.execute("PRAGMA integrity_check").fetchone()[0])

    def flush(self) -> None:
        """Write this thread's deferred cache entries now (before a long idle or exit)."""
        if getattr(self._local, "etags", None):
            with self.transaction():
                pass  # the transaction writes what is pending

    def close(self) -> None:
        self.flush()
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None
