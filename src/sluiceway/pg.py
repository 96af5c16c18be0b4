"""PostgreSQL plumbing shared by the ledger and the table backends.

What both need, in one place:

* **Connections.** There is no pool in the dependencies, and none is needed:
  a worker process does one thing at a time, plus a heartbeat thread that
  extends its claim. So each client keeps one connection *per thread*
  (psycopg connections must not be used by two threads at once), opened on
  first use, in autocommit mode so a single statement needs no BEGIN/COMMIT
  round trips; code that needs more than one statement to be atomic opens an
  explicit transaction. A connection inherited over ``fork`` is never used or
  closed by the child (closing it would end the parent's session).
* **Reconnects.** A lost connection (server restart, failover, idle timeout
  of a proxy) is retried with exponential backoff for ``retry_for`` seconds;
  the operation gets ``retried=True`` so it can tell "my first attempt may have
  committed before the reply was lost" from a genuine conflict. Deadlocks and
  serialization failures (SQLSTATE class 40) are retried the same way.
* **Start-up.** :meth:`PgClient.check` connects at once, so a wrong URL or a
  server that is down is one clear error naming the (redacted) URL and what
  was tried, not a retry loop deep inside a worker.
* **Schema.** Objects are created idempotently at first use under an advisory
  lock per schema, so many workers starting together do not race on
  ``CREATE SCHEMA``/``CREATE TABLE``; when everything exists already no DDL
  runs (and no privileges beyond reading and writing the tables are needed).
* **Names.** A schema per namespace (``sluiceway_<pipeline>``, or
  ``?schema=NAME`` in the URL, a parameter libpq never sees); identifiers are
  used exactly as written, double-quoted, and only names longer than
  PostgreSQL's 63 bytes are shortened (with a hash, so they stay distinct).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import psycopg
from psycopg import sql

from . import health
from .connections import Backoff, redact, split_query
from .errors import SluicewayError

log = logging.getLogger("sluiceway.pg")

T = TypeVar("T")

MAX_IDENTIFIER = 63  # bytes; PostgreSQL silently truncates longer names
SCHEMA_PREFIX = "sluiceway_"
DEFAULT_CONNECT_TIMEOUT = 5  # seconds per connection attempt (libpq's connect_timeout)
DEFAULT_RETRY_FOR = 30.0  # seconds of reconnecting before an operation gives up
START_ATTEMPTS = 3  # connection attempts before check() reports the server unreachable
# The first key of every advisory lock Sluiceway takes: keeps them apart from
# the application's own advisory locks on a shared database.
LOCK_CLASS = 0x51C3  # "SLuiCEway"
KEEPALIVES = {
    "keepalives": 1,
    "keepalives_idle": 30,
    "keepalives_interval": 10,
    "keepalives_count": 3,
}
OWN_PARAMETERS = ("schema",)  # URL query parameters Sluiceway reads and libpq must not see


class PostgresUnavailable(SluicewayError):
    """The PostgreSQL server cannot be reached (at start, or for longer than retry_for)."""


def ident(name: str) -> str:
    """``name`` as a PostgreSQL identifier: unchanged unless it is too long.

    PostgreSQL truncates identifiers to 63 bytes without a word, which would
    make two long names one; a too-long name is cut and given a hash of the
    whole name instead. NUL cannot appear in an identifier at all.
    """
    clean = name.replace("\x00", "\ufffd")
    raw = clean.encode()
    if len(raw) <= MAX_IDENTIFIER and clean == name:
        return name
    digest = hashlib.sha256(name.encode()).hexdigest()[:10]
    head = raw[: MAX_IDENTIFIER - len(digest) - 1].decode(errors="ignore")
    return f"{head}_{digest}"


def schema_for(namespace: str) -> str:
    """The default schema of a namespace (the pipeline's name): ``sluiceway_<name>``.

    Kept exactly as written (case, ``-`` and ``.`` included) so two pipelines
    never share a schema by accident; such names need double quotes in SQL.
    """
    return ident(SCHEMA_PREFIX + namespace)


def split_url(url: str) -> tuple[str, dict[str, str], set[str]]:
    """The libpq connection URL without Sluiceway's own query parameters.

    Returns ``(conninfo, ours, theirs)``: ``ours`` maps our parameters
    (``schema``) to their decoded values, ``theirs`` names the parameters
    left for libpq. The remaining query is kept byte for byte: libpq decodes
    ``%XX`` but not ``+``, so re-encoding it could change a value.
    """
    return split_query(url, OWN_PARAMETERS)


def one_line(exc: BaseException) -> str:
    """An exception's message on one line (libpq's span several, with tabs)."""
    return " ".join(str(exc).split()) or type(exc).__name__


def _clean(value: Any) -> Any:
    """``value`` made storable as JSONB: no NaN/Infinity, no NUL characters."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, str):
        return value.replace("\x00", "\ufffd")
    if isinstance(value, dict):
        return {_clean(str(k)): _clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_clean(v) for v in value]
    if value is None or isinstance(value, bool | int | float):
        return value
    return _clean(str(value))


def dumps_lenient(obj: Any) -> str:
    """JSON for a JSONB column, for records *about* data (ledger info).

    JSONB refuses NaN, Infinity and ``\\u0000``; a failure record must never
    fail to be written because the error message quoted such a value, so
    those are replaced (NaN → ``"nan"``, NUL → U+FFFD) instead of refused.
    """
    try:
        text = json.dumps(obj, default=str, allow_nan=False, ensure_ascii=False)
    except ValueError:
        return json.dumps(_clean(obj), allow_nan=False, ensure_ascii=False)
    if "\\u0000" in text:
        return json.dumps(_clean(obj), allow_nan=False, ensure_ascii=False)
    return text


def has_nul(value: Any) -> bool:
    """Whether a JSON-like value holds a NUL character anywhere (JSONB cannot store it)."""
    if isinstance(value, str):
        return "\x00" in value
    if isinstance(value, dict):
        return any(has_nul(k) or has_nul(v) for k, v in value.items())
    if isinstance(value, list | tuple):
        return any(has_nul(v) for v in value)
    return False


# Connections a forked child inherited: kept referenced, never closed (closing
# would send Terminate over the parent's socket and end the parent's session).
_INHERITED: list[psycopg.Connection[Any]] = []


class PgClient:
    """Per-thread connections to one server, with reconnects; see the module docstring."""

    _shared: dict[str, PgClient] = {}  # noqa: RUF012 - a process-wide cache by design
    _shared_lock = threading.Lock()

    def __init__(self, url: str, *, retry_for: float = DEFAULT_RETRY_FOR) -> None:
        self.url = url
        self.safe_url = redact(url)
        self.conninfo, self.params, given = split_url(url)
        self.connect_kwargs: dict[str, Any] = {"autocommit": True}
        if "connect_timeout" not in given:
            self.connect_kwargs["connect_timeout"] = DEFAULT_CONNECT_TIMEOUT
        if "application_name" not in given:
            self.connect_kwargs["application_name"] = "sluiceway"
        if not given & set(KEEPALIVES):
            # A peer that vanished without a FIN (a partition, a dead NAT entry) is
            # noticed in about a minute instead of TCP's quarter of an hour.
            self.connect_kwargs.update(KEEPALIVES)
        self.retry_for = retry_for
        self._local = threading.local()
        self._lock = threading.Lock()
        self._conns: list[tuple[threading.Thread, psycopg.Connection[Any]]] = []
        self._pid = os.getpid()
        self._ready: set[str] = set()  # schema objects known to exist (per process)

    @classmethod
    def shared(cls, url: str) -> PgClient:
        """One client per URL and process, for objects without a close() (tables).

        A pipeline with ten tables then holds one connection per thread, not ten.
        """
        conninfo = split_url(url)[0]
        with cls._shared_lock:
            client = cls._shared.get(conninfo)
            if client is None:
                client = cls._shared[conninfo] = cls(url)
            return client

    @property
    def schema_param(self) -> str | None:
        """``?schema=`` from the URL, if given."""
        return self.params.get("schema") or None

    # -- connections -----------------------------------------------------------

    def _forked(self) -> None:
        if os.getpid() == self._pid:
            return
        with self._lock:
            if os.getpid() == self._pid:
                return
            _INHERITED.extend(conn for _, conn in self._conns)
            self._conns = []
            self._local = threading.local()
            self._ready = set()
            self._pid = os.getpid()

    def connection(self) -> psycopg.Connection[Any]:
        """This thread's connection, opened (or re-opened) if needed."""
        self._forked()
        conn: psycopg.Connection[Any] | None = getattr(self._local, "conn", None)
        if conn is not None and not conn.closed and not conn.broken:
            return conn
        if conn is not None:
            self._discard(conn)
        conn = psycopg.connect(self.conninfo, **self.connect_kwargs)
        self._local.conn = conn
        with self._lock:
            # Close what threads that have ended left behind (heartbeat threads).
            alive = []
            for thread, old in self._conns:
                if thread.is_alive():
                    alive.append((thread, old))
                else:
                    with contextlib.suppress(Exception):
                        old.close()
            alive.append((threading.current_thread(), conn))
            self._conns = alive
        return conn

    def _discard(self, conn: psycopg.Connection[Any]) -> None:
        if getattr(self._local, "conn", None) is conn:
            self._local.conn = None
        with self._lock:
            self._conns = [(t, c) for t, c in self._conns if c is not conn]
        with contextlib.suppress(Exception):
            conn.close()

    def check(self) -> None:
        """Connect now; an unreachable server is one clear error, raised here.

        Tries a few times with a short backoff (a server that is just
        restarting gets a moment), then names the URL, the attempts and the
        last error, and what to check.
        """
        started = time.monotonic()
        delay = 0.2
        last: Exception | None = None
        for attempt in range(1, START_ATTEMPTS + 1):
            try:
                self.connection()
                return
            except psycopg.OperationalError as e:
                last = e
                if attempt < START_ATTEMPTS:
                    time.sleep(delay)
                    delay *= 2
        timeout = self.connect_kwargs.get("connect_timeout", "libpq's")
        raise PostgresUnavailable(
            f"cannot connect to PostgreSQL at {self.safe_url}: tried {START_ATTEMPTS} times "
            f"over {time.monotonic() - started:.1f}s (connect timeout {timeout}s each); "
            f"last error: {one_line(last) if last else 'unknown'}. Check that the server "
            "is running and that the profile's URL (host, port, database, user; the password "
            "from an environment variable) is right."
        ) from None

    def run(self, op: Callable[[psycopg.Connection[Any], bool], T]) -> T:
        """``op(conn, retried)`` on this thread's connection, retried if the connection drops.

        Only failures that leave nothing half-done are retried: a lost
        connection (its transaction, if any, is rolled back by the server,
        but an autocommit statement may have committed: hence ``retried``)
        and deadlocks or serialization failures (rolled back).
        """
        deadline: float | None = None
        backoff = Backoff()
        retried = False
        while True:
            conn: psycopg.Connection[Any] | None = None
            try:
                conn = self.connection()
                result = op(conn, retried)
            except psycopg.OperationalError as e:
                lost = conn is None or conn.closed or conn.broken
                rolled_back = (e.sqlstate or "").startswith("40")
                if not (lost or rolled_back):
                    raise
                if lost:
                    health.lost("postgresql", self.safe_url, one_line(e))
                now = time.monotonic()
                deadline = deadline if deadline is not None else now + self.retry_for
                if now >= deadline:
                    raise PostgresUnavailable(
                        f"PostgreSQL at {self.safe_url}: gave up after {self.retry_for:g}s of "
                        f"retries; last error: {one_line(e)}"
                    ) from e
                if lost and conn is not None:
                    self._discard(conn)
                log.warning(
                    "PostgreSQL at %s: %s; retrying in %.2fs",
                    self.safe_url,
                    one_line(e),
                    backoff.current,
                )
                time.sleep(backoff.next())
                retried = True
            else:
                health.ok("postgresql", self.safe_url)
                return result

    # -- schema ---------------------------------------------------------------

    def ensure(
        self,
        schema: str,
        relations: Sequence[str],
        create: Callable[[psycopg.Connection[Any]], None],
    ) -> None:
        """Create a schema's objects once, race-free, unless they exist already.

        ``relations`` are the (unqualified) tables and indexes ``create``
        makes; if all exist, nothing runs. Otherwise ``create`` runs in a
        transaction holding an advisory lock on the schema name, so of many
        workers starting at once one creates and the others find it done.
        """
        self._forked()
        token = f"{schema}\x00" + "\x00".join(relations)
        if token in self._ready:
            return
        names = [sql.Identifier(schema, r).as_string() for r in relations]

        def op(conn: psycopg.Connection[Any], retried: bool) -> None:
            if self._exist(conn, names):
                return
            with conn.transaction():
                conn.execute("SELECT pg_advisory_xact_lock(%s, hashtext(%s))", (LOCK_CLASS, schema))
                if self._exist(conn, names):
                    return
                found = conn.execute(
                    "SELECT 1 FROM pg_namespace WHERE nspname = %s", (schema,)
                ).fetchone()
                if found is None:
                    conn.execute(
                        sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(sql.Identifier(schema))
                    )
                create(conn)

        self.run(op)
        self._ready.add(token)

    @staticmethod
    def _exist(conn: psycopg.Connection[Any], names: list[str]) -> bool:
        row = conn.execute(
            "SELECT count(*) FROM unnest(%s::text[]) AS n WHERE to_regclass(n) IS NOT NULL",
            (names,),
        ).fetchone()
        return row is not None and row[0] == len(names)

    def close(self) -> None:
        """Close every connection this process opened through this client."""
        self._forked()
        with self._lock:
            conns, self._conns = self._conns, []
        for _, conn in conns:
            with contextlib.suppress(Exception):
                conn.close()
        self._local = threading.local()
