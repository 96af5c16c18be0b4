"""PostgreSQL for tests: a fresh schema per test, dropped afterwards.

The contract suites (tests/contract) call :func:`postgres_ledger` and
:func:`postgres_table` through their ``BACKENDS`` dicts; the PostgreSQL
tests use :func:`fresh_schema` and :func:`pg_url` directly. Each test gets
its own schema (``sluiceway_test_<random>``), so tests can run in parallel
against one database and leave nothing behind.
"""

from __future__ import annotations

import contextlib
import random
import uuid
from pathlib import Path
from typing import Any

import pytest

from sluiceway.ledger import Ledger
from sluiceway.tables.base import Table

from .services import POSTGRES_URL, require_url

_SCHEMA = pytest.StashKey[str]()


def require_postgres() -> None:
    """Skip (fail in CI) unless the test PostgreSQL listens."""
    require_url(
        "PostgreSQL",
        POSTGRES_URL,
        5432,
        "Set SLUICEWAY_TEST_POSTGRES to a database URL (trust or password in the URL).",
    )


def pg_url(schema: str, url: str = POSTGRES_URL) -> str:
    """The test database URL with ``?schema=``."""
    return f"{url}{'&' if '?' in url else '?'}schema={schema}"


def connect() -> Any:
    """A plain autocommit psycopg connection to the test database (for assertions)."""
    import psycopg

    return psycopg.connect(POSTGRES_URL, autocommit=True)


def drop_schema(schema: str) -> None:
    with connect() as conn:
        # Other tests' connections may hold nothing here; a short lock wait is enough.
        conn.execute("SET lock_timeout = '10s'")
        conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')


def fresh_schema(request: pytest.FixtureRequest) -> str:
    """This test's own schema (one per test, shared by its ledgers and tables), dropped after."""
    require_postgres()
    node = request.node
    schema = node.stash.get(_SCHEMA, None)
    if schema is None:
        schema = f"sluiceway_test_{uuid.uuid4().hex[:12]}"
        node.stash[_SCHEMA] = schema
        request.addfinalizer(lambda: drop_schema(schema))
    return schema


def postgres_ledger(request: pytest.FixtureRequest, tmp_path: Path) -> Ledger:
    """Contract-suite factory: an empty PostgresLedger in a fresh schema."""
    from sluiceway.ledgers.postgres import PostgresLedger

    return PostgresLedger.from_url(pg_url(fresh_schema(request)), "contract")


def postgres_table(
    request: pytest.FixtureRequest, tmp_path: Path, name: str, key: list[str]
) -> Table:
    """Contract-suite factory: an empty PostgresTable in this test's fresh schema."""
    from sluiceway.tables.postgres import PostgresTable

    return PostgresTable.from_url(pg_url(fresh_schema(request)), name, key, "contract")


@contextlib.contextmanager
def schema_for_test() -> Any:
    """A fresh schema outside pytest's request machinery (for subprocesses' tests)."""
    require_postgres()
    schema = f"sluiceway_test_{uuid.uuid4().hex[:12]}"
    try:
        yield schema
    finally:
        drop_schema(schema)


def claim_race_worker(url: str, keys: list[str], owner: str, barrier: Any, results: Any) -> None:
    """In a separate process: claim every key (in its own order) once all are ready.

    The ledger's tables are created lazily, so the processes also race to create them.
    """
    from sluiceway.ledger import Claim
    from sluiceway.ledgers.postgres import PostgresLedger

    ledger = PostgresLedger.from_url(url, "race")
    order = list(keys)
    random.Random(owner).shuffle(order)
    barrier.wait(60)
    try:
        got = [
            k
            for k in order
            if ledger.claim(k, function="fn", owner=owner, ttl=60) is Claim.ACQUIRED
        ]
    finally:
        ledger.close()
    results.put((owner, got))
