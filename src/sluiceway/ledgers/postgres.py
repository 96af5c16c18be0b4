"""The ledger in PostgreSQL: claims that hold across processes and machines.

``profiles: {prod: {ledger: postgresql://user:${PGPASSWORD}@host/db}}`` puts
the ledger of every worker, wherever it runs, in one database. Three tables
in the namespace's schema (``sluiceway_<pipeline>``, or ``?schema=NAME``):

* ``_ledger_entries``: one row per (function, input), the idempotency record.
  A claim is a single ``INSERT … ON CONFLICT DO UPDATE … WHERE status =
  'failed' OR (status = 'in_progress' AND expires_at < now) RETURNING``: the
  row is inserted, or taken over, or left alone, atomically, so two workers
  never both get ``ACQUIRED``. ``info`` is JSONB.
* ``_ledger_objects``: the object versions events were raised for;
  ``first_seen`` is ``INSERT … ON CONFLICT DO NOTHING``.
* ``_ledger_sent``: ids of messages sent, with the time, for ``publish_once``.

Times are the *server's* clock (``clock_timestamp()``): workers on several
machines then agree on when a claim expires, whatever their own clocks say.
They are ``timestamptz`` columns (readable in ``psql``) and epoch seconds in
:class:`~sluiceway.ledger.Entry`, as on every backend. The leading underscore
keeps these tables apart from Sluiceway tables (whose names cannot start
with one) when both share the schema.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator, Sequence
from typing import Any

import psycopg
from psycopg import sql

from ..ledger import Claim, Entry, Ledger, like_escape
from ..pg import PgClient, dumps_lenient, schema_for

ENTRIES = "_ledger_entries"
OBJECTS = "_ledger_objects"
SENT = "_ledger_sent"
# Indexes, each named for the query it serves.
IDX_FUNCTION = "_ledger_entries_function_status_key"  # function_counts, other_versions
IDX_UPDATED = "_ledger_entries_updated_at"  # entries_since
IDX_IDENTITY = "_ledger_entries_identity"  # entries_for
IDX_DONE = "_ledger_entries_done"  # done_infos (keyset pages over finished entries)
IDX_SENT_AT = "_ledger_sent_sent_at"  # forget_sent
RELATIONS = (ENTRIES, OBJECTS, SENT, IDX_FUNCTION, IDX_UPDATED, IDX_IDENTITY, IDX_DONE, IDX_SENT_AT)

# The input identity of an entry key "function|identity" (function names have no "|").
IDENTITY_EXPR = "substr(key, strpos(key, '|') + 1)"
ENTRY_COLUMNS = (
    "key, function, status, owner, extract(epoch FROM expires_at)::float8, attempts,"
    " extract(epoch FROM created_at)::float8, extract(epoch FROM updated_at)::float8, info"
)
DONE_PAGE = 1000  # finished entries per query in done_infos

DDL = (
    """CREATE TABLE IF NOT EXISTS {entries} (
        key         text PRIMARY KEY,
        function    text NOT NULL,
        status      text NOT NULL,
        owner       text,
        token       text,
        expires_at  timestamptz,
        attempts    integer NOT NULL DEFAULT 1,
        created_at  timestamptz NOT NULL DEFAULT clock_timestamp(),
        updated_at  timestamptz NOT NULL DEFAULT clock_timestamp(),
        info        jsonb NOT NULL DEFAULT '{{}}'::jsonb
    )""",
    "CREATE INDEX IF NOT EXISTS {idx_function} ON {entries}"
    " (function, status, key text_pattern_ops)",
    "CREATE INDEX IF NOT EXISTS {idx_updated} ON {entries} (updated_at)",
    f"CREATE INDEX IF NOT EXISTS {{idx_identity}} ON {{entries}} (({IDENTITY_EXPR}))",
    "CREATE INDEX IF NOT EXISTS {idx_done} ON {entries} (key) WHERE status = 'done'",
    """CREATE TABLE IF NOT EXISTS {objects} (
        bucket    text NOT NULL,
        key       text NOT NULL,
        etag      text NOT NULL,
        size      bigint NOT NULL,
        seen_at   timestamptz NOT NULL DEFAULT clock_timestamp(),
        event_id  text NOT NULL,
        PRIMARY KEY (bucket, key, etag)
    )""",
    """CREATE TABLE IF NOT EXISTS {sent} (
        id       text PRIMARY KEY,
        sent_at  timestamptz NOT NULL DEFAULT clock_timestamp()
    )""",
    "CREATE INDEX IF NOT EXISTS {idx_sent_at} ON {sent} (sent_at)",
)


class PostgresLedger(Ledger):
    """:class:`~sluiceway.ledger.Ledger` on PostgreSQL (psycopg 3).

    Safe to share between the threads of a process (each gets its own
    connection: the worker's heartbeat extends claims while the main thread
    works) and between any number of processes and machines.
    """

    def __init__(
        self,
        url: str,
        namespace: str,
        *,
        schema: str | None = None,
        retry_for: float | None = None,
    ) -> None:
        self.client = PgClient(url) if retry_for is None else PgClient(url, retry_for=retry_for)
        self.namespace = namespace
        self.schema = schema or self.client.schema_param or schema_for(namespace)
        names = {
            "entries": sql.Identifier(self.schema, ENTRIES),
            "objects": sql.Identifier(self.schema, OBJECTS),
            "sent": sql.Identifier(self.schema, SENT),
            "idx_function": sql.Identifier(IDX_FUNCTION),
            "idx_updated": sql.Identifier(IDX_UPDATED),
            "idx_identity": sql.Identifier(IDX_IDENTITY),
            "idx_done": sql.Identifier(IDX_DONE),
            "idx_sent_at": sql.Identifier(IDX_SENT_AT),
        }

        def q(text: str) -> str:
            # Rendered once: the same query text every time lets psycopg prepare it.
            return sql.SQL(text).format(**names).as_string()

        self._ddl = [q(s) for s in DDL]
        self._q_seen_insert = q(
            "INSERT INTO {objects} (bucket, key, etag, size, event_id) VALUES (%s, %s, %s, %s, %s)"
            " ON CONFLICT DO NOTHING"
        )
        self._q_seen_event = q(
            "SELECT event_id FROM {objects} WHERE bucket = %s AND key = %s AND etag = %s"
        )
        self._q_claim = q(
            "INSERT INTO {entries} AS e (key, function, status, owner, token, expires_at,"
            " attempts, created_at, updated_at)"
            " VALUES (%s, %s, 'in_progress', %s, %s,"
            " clock_timestamp() + make_interval(secs => %s), 1, clock_timestamp(),"
            " clock_timestamp())"
            " ON CONFLICT (key) DO UPDATE SET status = 'in_progress', owner = excluded.owner,"
            " token = excluded.token, expires_at = excluded.expires_at,"
            " attempts = e.attempts + 1, updated_at = excluded.updated_at"
            " WHERE e.status = 'failed'"
            " OR (e.status = 'in_progress' AND e.expires_at < excluded.updated_at)"
            " RETURNING e.status"
        )
        self._q_claim_state = q("SELECT status, token FROM {entries} WHERE key = %s")
        self._q_extend = q(
            "UPDATE {entries} SET expires_at = clock_timestamp() + make_interval(secs => %s),"
            " updated_at = clock_timestamp()"
            " WHERE key = %s AND owner = %s AND status = 'in_progress'"
        )
        self._q_finish = q(
            "UPDATE {entries} SET status = %s, expires_at = NULL, updated_at = clock_timestamp(),"
            " info = %s::jsonb WHERE key = %s AND owner = %s AND status = 'in_progress'"
        )
        self._q_get = q(f"SELECT {ENTRY_COLUMNS} FROM {{entries}} WHERE key = %s")
        self._q_counts = q(
            "SELECT function, status, count(*) FROM {entries} GROUP BY function, status"
        )
        self._q_has_seen = q("SELECT 1 FROM {objects} WHERE bucket = %s AND key = %s AND etag = %s")
        self._q_versions = q(
            "SELECT etag, size, extract(epoch FROM seen_at)::float8, event_id FROM {objects}"
            " WHERE bucket = %s AND key = %s ORDER BY seen_at, etag"
        )
        self._q_other_versions = q(
            f"SELECT {ENTRY_COLUMNS} FROM {{entries}} WHERE function = %s AND status = 'done'"
            " AND key LIKE %s ESCAPE '\\' AND key <> %s ORDER BY created_at, key"
        )
        self._q_supersede = q(
            "UPDATE {entries} SET status = 'superseded', updated_at = clock_timestamp()"
            " WHERE key = %s"
        )
        self._q_entries_for = q(
            f"SELECT {ENTRY_COLUMNS} FROM {{entries}} WHERE {IDENTITY_EXPR} = %s"
            " ORDER BY created_at, key"
        )
        self._q_entries_since = q(
            f"SELECT {ENTRY_COLUMNS} FROM {{entries}} WHERE updated_at >= to_timestamp(%s)"
            " ORDER BY updated_at, key"
        )
        self._q_done_page = q(
            "SELECT key, function, info FROM {entries} WHERE status = 'done' AND key > %s"
            " ORDER BY key LIMIT %s"
        )
        self._q_mark_sent = q(
            "INSERT INTO {sent} (id) SELECT unnest(%s::text[]) ON CONFLICT DO NOTHING"
        )
        self._q_sent = q("SELECT id FROM {sent} WHERE id = ANY(%s::text[])")
        self._q_forget_sent = q(
            "DELETE FROM {sent} WHERE sent_at < clock_timestamp() - make_interval(secs => %s)"
        )
        self.client.check()

    @classmethod
    def from_url(cls, url: str, namespace: str) -> PostgresLedger:
        """The backend factory (``postgresql://`` and ``postgres://`` ledgers)."""
        return cls(url, namespace)

    # -- plumbing ---------------------------------------------------------------

    def _create(self, conn: psycopg.Connection[Any]) -> None:
        for statement in self._ddl:
            conn.execute(statement)

    def _ready(self) -> None:
        """Create the tables on first use (a no-op once they exist)."""
        self.client.ensure(self.schema, RELATIONS, self._create)

    def _one(self, query: str, params: Sequence[Any]) -> tuple[Any, ...] | None:
        self._ready()
        return self.client.run(lambda conn, _: conn.execute(query, params).fetchone())

    def _all(self, query: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        self._ready()
        return self.client.run(lambda conn, _: conn.execute(query, params).fetchall())

    def _rowcount(self, query: str, params: Sequence[Any]) -> int:
        self._ready()
        return self.client.run(lambda conn, _: conn.execute(query, params).rowcount)

    @staticmethod
    def _entry(row: tuple[Any, ...]) -> Entry:
        key, function, status, owner, expires_at, attempts, created, updated, info = row
        return Entry(
            key=key,
            function=function,
            status=status,
            owner=owner,
            expires_at=expires_at,
            attempts=attempts,
            created_at=created,
            updated_at=updated,
            info=info if info is not None else {},
        )

    # -- object versions ----------------------------------------------------------

    def first_seen(self, bucket: str, key: str, etag: str, size: int, event_id: str) -> bool:
        self._ready()

        def op(conn: psycopg.Connection[Any], retried: bool) -> bool:
            if conn.execute(self._q_seen_insert, (bucket, key, etag, size, event_id)).rowcount:
                return True
            if not retried:
                return False
            # The first attempt may have committed before its reply was lost:
            # then the row is ours, recognisable by our event id.
            row = conn.execute(self._q_seen_event, (bucket, key, etag)).fetchone()
            return row is not None and row[0] == event_id

        return self.client.run(op)

    def has_seen(self, bucket: str, key: str, etag: str) -> bool:
        return self._one(self._q_has_seen, (bucket, key, etag)) is not None

    def versions(self, bucket: str, key: str) -> list[dict[str, Any]]:
        return [
            {"etag": etag, "size": size, "seen_at": seen_at, "event_id": event_id}
            for etag, size, seen_at, event_id in self._all(self._q_versions, (bucket, key))
        ]

    # -- claims -----------------------------------------------------------------

    def claim(self, key: str, *, function: str, owner: str, ttl: float) -> Claim:
        """One atomic statement decides; a second one only says why it was not ours.

        ``token`` is unique to this call: if the connection dropped after the
        claim committed, the retry finds our token on the row and knows the
        claim is ours rather than someone else's live one.
        """
        self._ready()
        token = uuid.uuid4().hex

        def op(conn: psycopg.Connection[Any], retried: bool) -> Claim:
            row = conn.execute(self._q_claim, (key, function, owner, token, float(ttl))).fetchone()
            if row is not None:
                return Claim.ACQUIRED
            state = conn.execute(self._q_claim_state, (key,)).fetchone()
            if state is None:
                return Claim.BUSY  # deleted in between: look again later
            status, held_by = state
            if status == "in_progress" and held_by == token:
                return Claim.ACQUIRED
            # "failed" here means it was released between the two statements.
            return Claim.BUSY if status in ("in_progress", "failed") else Claim.DONE

        return self.client.run(op)

    def extend(self, key: str, *, owner: str, ttl: float) -> bool:
        return self._rowcount(self._q_extend, (float(ttl), key, owner)) == 1

    def _finish(self, key: str, owner: str, status: str, info: dict[str, Any]) -> None:
        # "done stays done": only the owner of a live claim finishes it.
        self._rowcount(self._q_finish, (status, dumps_lenient(info), key, owner))

    def complete(self, key: str, *, owner: str, info: dict[str, Any]) -> None:
        self._finish(key, owner, "done", info)

    def fail(self, key: str, *, owner: str, info: dict[str, Any]) -> None:
        self._finish(key, owner, "failed", info)

    def skip(self, key: str, *, owner: str, info: dict[str, Any]) -> None:
        self._finish(key, owner, "skipped", info)

    # -- looking at entries --------------------------------------------------------

    def get(self, key: str) -> Entry | None:
        row = self._one(self._q_get, (key,))
        return None if row is None else self._entry(row)

    def function_counts(self) -> dict[str, dict[str, int]]:
        out: dict[str, dict[str, int]] = {}
        for function, status, n in self._all(self._q_counts):
            out.setdefault(function, {})[status] = int(n)
        return out

    def other_versions(self, function: str, input_prefix: str, current: str) -> list[Entry]:
        pattern = f"{like_escape(function)}|{like_escape(input_prefix)}%"
        return [
            self._entry(r) for r in self._all(self._q_other_versions, (function, pattern, current))
        ]

    def supersede(self, key: str) -> None:
        self._rowcount(self._q_supersede, (key,))

    def entries_for(self, identity: str) -> list[Entry]:
        return [self._entry(r) for r in self._all(self._q_entries_for, (identity,))]

    def entries_since(self, since: float) -> list[Entry]:
        """Entries changed at or after ``since`` (epoch seconds, compared with the server clock)."""
        return [self._entry(r) for r in self._all(self._q_entries_since, (since,))]

    def done_infos(self) -> Iterator[tuple[str, dict[str, Any]]]:
        """Pages of finished entries by key: bounded memory, no long-open transaction."""
        after = ""
        while True:
            page = self._all(self._q_done_page, (after, DONE_PAGE))
            for _key, function, info in page:
                yield function, info
            if len(page) < DONE_PAGE:
                return
            after = page[-1][0]

    # -- sent message ids -----------------------------------------------------------

    def mark_sent(self, ids: Sequence[str]) -> None:
        if ids:
            self._rowcount(self._q_mark_sent, (list(ids),))

    def unsent(self, ids: Sequence[str]) -> list[str]:
        if not ids:
            return []
        sent = {row[0] for row in self._all(self._q_sent, (list(ids),))}
        return [i for i in ids if i not in sent]

    def forget_sent(self, older_than: float) -> int:
        return self._rowcount(self._q_forget_sent, (float(older_than),))

    def close(self) -> None:
        self.client.close()
