"""Tables in PostgreSQL: one real SQL table per Sluiceway table.

``profiles: {prod: {tables: postgresql://…}}`` puts every table of the
pipeline in the namespace's schema (``sluiceway_<pipeline>``, or
``?schema=NAME``), under its own name::

    CREATE TABLE "sluiceway_sinks"."customers" (
        "id"        jsonb NOT NULL,          -- one column per key field
        item        jsonb NOT NULL,          -- the whole item, key fields included
        updated_at  timestamptz NOT NULL,    -- when the item last changed
        CONSTRAINT "_pk_customers" PRIMARY KEY ("id")
    )

Why JSONB key columns rather than typed ones: a table has no schema in the
pipeline file (only its key), and the same field may be an int in one file
and a string in the next. JSONB keeps the JSON type, so ``1`` and ``"1"``
stay different keys exactly as on the embedded backend, any item shape fits
without a migration, and the primary key still gives an index per key field.
SQL reads it naturally: ``SELECT item->>'name' FROM "sluiceway_sinks".customers
WHERE id = '7'`` (the literal is cast to JSONB). The columns ``item`` and
``updated_at`` are reserved: a key field may not have those names.

JSONB normalises: the key order of a stored item is not kept, duplicate
keys collapse, ``1.0`` and ``1`` compare equal as keys. It also cannot hold
NaN, Infinity or the NUL character; an item with one of those is refused
with an error naming the table and key, never altered behind your back.

Upserts run in one transaction per call, rows sorted by key (concurrent
writers then lock rows in the same order, so they rarely deadlock; when
they do, PostgreSQL aborts one and it is retried). Small batches are an
``executemany`` of ``INSERT … ON CONFLICT DO UPDATE`` (psycopg pipelines
them: one round trip, not one per row); from ``COPY_AT`` rows on (the
``write_table`` step's default batch is 1000) the rows are ``COPY``-ed into
a temporary table and merged with one ``INSERT … SELECT DISTINCT ON (key) …
ON CONFLICT DO UPDATE`` (of duplicate keys in a batch the last wins, as in
the small path). An item that did not change is not rewritten (``WHERE item
IS DISTINCT FROM``), so re-running an input leaves the table, ``updated_at``
included, as it was.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from typing import Any

import psycopg
from psycopg import sql

from ..errors import ConfigError, SluicewayError
from ..pg import PgClient, has_nul, ident, schema_for, split_url
from .base import Table

RESERVED = ("item", "updated_at")
COPY_AT = 128  # rows per upsert from which COPY + merge beats pipelined statements (measured)
SCAN_PAGE = 1000  # rows per query while scanning


class UnstorableItem(SluicewayError):
    """An item holds a value PostgreSQL's JSONB cannot store (NaN, Infinity, NUL)."""


def _json(value: Any) -> str:
    """Compact JSON; non-JSON values as their string (as on the embedded backend)."""
    return json.dumps(
        value, default=str, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    )


class PostgresTable(Table):
    """:class:`~sluiceway.tables.base.Table` on PostgreSQL (psycopg 3); see the module docstring."""

    def __init__(
        self,
        url: str,
        name: str,
        key: Sequence[str],
        namespace: str,
        *,
        schema: str | None = None,
        client: PgClient | None = None,
    ) -> None:
        self.name = name
        self.key = tuple(key)
        # Shared per server: the schema comes from this URL, not the client's first one.
        self.client = client or PgClient.shared(url)
        self.schema = schema or split_url(url)[1].get("schema") or schema_for(namespace)
        self.relation = ident(name)
        self.columns = [ident(k) for k in self.key]
        problems = [
            f"table {name!r}: key field {k!r} is a reserved column name on PostgreSQL"
            f" ({', '.join(RESERVED)}); rename the field"
            for k in self.key
            if k in RESERVED
        ]
        if not self.key or len(set(self.columns)) != len(self.columns):
            problems.append(f"table {name!r}: the key fields must be given, each once")
        if problems:
            raise ConfigError(problems)
        self._key_checked = False  # the existing table's key compared with ours (once)
        self._build_queries()
        self.client.check()

    @classmethod
    def from_url(cls, url: str, name: str, key: list[str], namespace: str) -> PostgresTable:
        """The backend factory (``postgresql://`` and ``postgres://`` tables)."""
        return cls(url, name, key, namespace)

    def _build_queries(self) -> None:
        table = sql.Identifier(self.schema, self.relation)
        keys = sql.SQL(", ").join(sql.Identifier(c) for c in self.columns)
        marks = sql.SQL(", ").join(sql.SQL("%s::jsonb") for _ in self.columns)
        match = sql.SQL(" AND ").join(
            sql.SQL("{} = %s::jsonb").format(sql.Identifier(c)) for c in self.columns
        )
        stage_cols = [sql.Identifier(f"k{i}") for i in range(len(self.columns))]
        stage_keys = sql.SQL(", ").join(stage_cols)
        # Keys as text when scanning: exact for any number, whatever Python makes of it.
        keys_text = sql.SQL(", ").join(
            sql.SQL("{}::text").format(sql.Identifier(c)) for c in self.columns
        )
        fmt = {
            "t": table,
            "keys": keys,
            "keys_text": keys_text,
            "marks": marks,
            "match": match,
            "skeys": stage_keys,
        }

        def q(text: str) -> str:
            # Rendered once: the same query text every time lets psycopg prepare it.
            return sql.SQL(text).format(**fmt).as_string()

        update = (
            " ON CONFLICT ({keys}) DO UPDATE SET item = excluded.item,"
            " updated_at = excluded.updated_at WHERE {t}.item IS DISTINCT FROM excluded.item"
        )
        self._q_upsert = q(
            "INSERT INTO {t} ({keys}, item, updated_at) VALUES ({marks}, %s::jsonb,"
            " clock_timestamp())" + update
        )
        self._q_stage = (
            sql.SQL(
                "CREATE TEMP TABLE _sluiceway_stage (ord integer NOT NULL, {}, item jsonb)"
                " ON COMMIT DROP"
            )
            .format(sql.SQL(", ").join(sql.SQL("{} jsonb").format(c) for c in stage_cols))
            .as_string()
        )
        self._q_copy = q("COPY _sluiceway_stage (ord, {skeys}, item) FROM STDIN")
        self._q_merge = q(
            "INSERT INTO {t} ({keys}, item, updated_at)"
            " SELECT DISTINCT ON ({skeys}) {skeys}, item, clock_timestamp()"
            " FROM _sluiceway_stage ORDER BY {skeys}, ord DESC" + update
        )
        self._q_get = q("SELECT item FROM {t} WHERE {match}")
        self._q_delete = q("DELETE FROM {t} WHERE {match}")
        self._q_count = q("SELECT count(*) FROM {t}")
        self._q_scan_first = q("SELECT {keys_text}, item FROM {t} ORDER BY {keys} LIMIT %s")
        self._q_scan_next = q(
            "SELECT {keys_text}, item FROM {t} WHERE ({keys}) > ({marks}) ORDER BY {keys} LIMIT %s"
        )
        pk = sql.Identifier(ident(f"_pk_{self.name}"))
        columns = sql.SQL(", ").join(
            sql.SQL("{} jsonb NOT NULL").format(sql.Identifier(c)) for c in self.columns
        )
        self._q_create = (
            sql.SQL(
                "CREATE TABLE IF NOT EXISTS {t} ({columns}, item jsonb NOT NULL,"
                " updated_at timestamptz NOT NULL DEFAULT clock_timestamp(),"
                " CONSTRAINT {pk} PRIMARY KEY ({keys}))"
            )
            .format(t=table, columns=columns, pk=pk, keys=keys)
            .as_string()
        )
        self._q_comment = (
            sql.SQL("COMMENT ON TABLE {t} IS {text}")
            .format(
                t=table,
                text=sql.Literal(
                    f"Sluiceway table {self.name!r}, key {list(self.key)}: one row per item;"
                    " key fields as JSONB columns, the whole item in item."
                ),
            )
            .as_string()
        )
        self._regclass = table.as_string()

    # -- plumbing ---------------------------------------------------------------

    def _create(self, conn: psycopg.Connection[Any]) -> None:
        conn.execute(self._q_create)
        conn.execute(self._q_comment)

    def _ready(self) -> None:
        """Create the table on first use; refuse one that exists with another key."""
        self.client.ensure(self.schema, [self.relation], self._create)
        if self._key_checked:
            return
        rows = self.client.run(
            lambda conn, _: conn.execute(
                "SELECT a.attname FROM pg_index i"
                " JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = ANY(i.indkey)"
                " WHERE i.indrelid = to_regclass(%s) AND i.indisprimary"
                " ORDER BY array_position(i.indkey::int2[], a.attnum)",
                (self._regclass,),
            ).fetchall()
        )
        found = [r[0] for r in rows]
        if found != self.columns:
            raise ConfigError(
                [
                    f"table {self.name!r}: PostgreSQL table {self._regclass} exists with key"
                    f" {found} but the pipeline declares key {list(self.key)}; drop or rename"
                    " that table, or use another schema (?schema=NAME in the tables URL)"
                ]
            )
        self._key_checked = True

    def _key_params(self, key: tuple[Any, ...]) -> list[str]:
        if len(key) != len(self.key):
            raise TypeError(
                f"table {self.name!r} has the key {list(self.key)}: give {len(self.key)}"
                f" value(s), not {len(key)}"
            )
        try:
            return [_json(v) for v in key]
        except ValueError:
            raise UnstorableItem(
                f"table {self.name!r}: key {key!r} holds NaN or Infinity, which PostgreSQL's"
                " JSONB cannot store"
            ) from None

    def _row(self, item: dict[str, Any]) -> tuple[list[str], str]:
        key = self.key_of(item)
        keys = self._key_params(key)
        try:
            text = _json(item)
        except ValueError:
            text = ""
        if not text or ("\\u0000" in text and has_nul(item)):
            raise UnstorableItem(
                f"table {self.name!r}: the item with key {key!r} holds NaN, Infinity or a NUL"
                " character, which PostgreSQL's JSONB cannot store; clean the value in a step"
                " before write_table"[:500]
            )
        return keys, text

    # -- the interface -------------------------------------------------------------

    def upsert(self, items: Sequence[dict[str, Any]]) -> int:
        # Every key is checked before anything is written; of equal keys the last wins.
        last = {tuple(keys): text for keys, text in map(self._row, items)}
        if not last:
            return 0
        rows = sorted(last.items())  # one lock order for every writer
        self._ready()

        def op(conn: psycopg.Connection[Any], retried: bool) -> None:
            with conn.transaction():
                if len(rows) >= COPY_AT:
                    conn.execute(self._q_stage)
                    with conn.cursor().copy(self._q_copy) as copy:
                        for i, (keys, item) in enumerate(rows):
                            copy.write_row((i, *keys, item))
                    conn.execute(self._q_merge)
                else:
                    with conn.cursor() as cur:
                        cur.executemany(self._q_upsert, [(*keys, item) for keys, item in rows])

        self.client.run(op)
        return len(items)

    def get(self, *key: Any) -> dict[str, Any] | None:
        params = self._key_params(key)
        self._ready()
        row = self.client.run(lambda conn, _: conn.execute(self._q_get, params).fetchone())
        return None if row is None else row[0]

    def scan(self, limit: int | None = None) -> Iterator[dict[str, Any]]:
        """Items in key order, fetched in pages (keyset, so memory stays flat)."""
        self._ready()
        left = limit
        after: list[str] | None = None
        n = len(self.columns)
        while left is None or left > 0:
            size = SCAN_PAGE if left is None else min(SCAN_PAGE, left)
            if after is None:
                query, params = self._q_scan_first, [size]
            else:
                query, params = self._q_scan_next, [*after, size]
            page = self.client.run(lambda conn, _, q=query, p=params: conn.execute(q, p).fetchall())
            for row in page:
                yield row[n]
            if len(page) < size:
                return
            after = list(page[-1][:n])
            if left is not None:
                left -= len(page)

    def count(self) -> int:
        self._ready()
        row = self.client.run(lambda conn, _: conn.execute(self._q_count).fetchone())
        return int(row[0]) if row else 0

    def delete(self, *key: Any) -> bool:
        params = self._key_params(key)
        self._ready()
        return self.client.run(lambda conn, _: conn.execute(self._q_delete, params).rowcount) == 1
