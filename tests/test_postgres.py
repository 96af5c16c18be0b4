"""PostgreSQL ledger and tables beyond the contract: concurrency, reconnects, SQL shape."""

from __future__ import annotations

import math
import multiprocessing as mp
import threading
import time
from typing import Any

import pytest

from sluiceway.errors import ConfigError
from sluiceway.ledger import Claim
from sluiceway.pg import PgClient, PostgresUnavailable, ident, split_url

from .postgres_backend import (
    claim_race_worker,
    connect,
    drop_schema,
    fresh_schema,
    pg_url,
    require_postgres,
)
from .services import free_port


@pytest.fixture
def schema(request: pytest.FixtureRequest) -> str:
    return fresh_schema(request)


@pytest.fixture
def ledger(schema: str) -> Any:
    from sluiceway.ledgers.postgres import PostgresLedger

    led = PostgresLedger.from_url(pg_url(schema), "test")
    yield led
    led.close()


def table(schema: str, name: str, key: list[str]) -> Any:
    from sluiceway.tables.postgres import PostgresTable

    return PostgresTable.from_url(pg_url(schema), name, key, "test")


def backend_pid(conn: Any) -> int:
    return int(conn.execute("SELECT pg_backend_pid()").fetchone()[0])


def terminate(pid: int) -> None:
    with connect() as admin:
        admin.execute("SELECT pg_terminate_backend(%s)", (pid,))
    time.sleep(0.05)


# -- start-up and URLs ------------------------------------------------------------


def test_unreachable_server_is_one_clear_error() -> None:
    from sluiceway.ledgers.postgres import PostgresLedger
    from sluiceway.tables.postgres import PostgresTable

    port = free_port()  # nothing listens there
    url = f"postgresql://app:s3cret@127.0.0.1:{port}/test?schema=x"
    started = time.monotonic()
    with pytest.raises(PostgresUnavailable) as e:
        PostgresLedger.from_url(url, "p")
    assert time.monotonic() - started < 10
    text = str(e.value)
    assert f"postgresql://app:***@127.0.0.1:{port}/test" in text
    assert "tried 3 times" in text and "s3cret" not in text
    assert "\n" not in text and e.value.__cause__ is None  # one error, not a chain
    with pytest.raises(PostgresUnavailable, match="app:\\*\\*\\*@"):
        PostgresTable.from_url(url, "t", ["id"], "p")


def test_url_keeps_libpq_parameters_and_takes_schema() -> None:
    conninfo, ours, theirs = split_url(
        "postgresql://u@h:5/db?sslmode=disable&schema=My%20Schema&options=-c%20a%3Db+c"
    )
    assert conninfo == "postgresql://u@h:5/db?sslmode=disable&options=-c%20a%3Db+c"
    assert ours == {"schema": "My Schema"} and theirs == {"sslmode", "options"}
    assert split_url("postgres://h/db")[0] == "postgres://h/db"


def test_long_identifiers_stay_distinct() -> None:
    a, b = "x" * 70 + "a", "x" * 70 + "b"
    assert ident("short") == "short"
    assert len(ident(a).encode()) <= 63 and ident(a) != ident(b)


def test_default_schema_is_per_namespace() -> None:
    require_postgres()
    from sluiceway.ledgers.postgres import PostgresLedger

    from .services import POSTGRES_URL

    namespace = f"Test-ns.{time.time_ns()}"
    try:
        led = PostgresLedger.from_url(POSTGRES_URL, namespace)
        led.mark_sent(["a"])
        led.close()
        with connect() as conn:
            found = conn.execute(
                "SELECT count(*) FROM pg_tables WHERE schemaname = %s", (f"sluiceway_{namespace}",)
            ).fetchone()[0]
        assert found == 3  # entries, objects, sent
    finally:
        drop_schema(f"sluiceway_{namespace}")


# -- the ledger -------------------------------------------------------------------


def test_claims_across_processes_never_overlap(schema: str) -> None:
    """Four processes race for the same keys (and to create the schema): each key once."""
    keys = [f"fn|b/k{i}@e" for i in range(300)]
    ctx = mp.get_context("spawn")
    barrier, queue = ctx.Barrier(4), ctx.Queue()
    procs = [
        ctx.Process(target=claim_race_worker, args=(pg_url(schema), keys, f"w{i}", barrier, queue))
        for i in range(4)
    ]
    for p in procs:
        p.start()
    results = [queue.get(timeout=60)[1] for _ in procs]
    for p in procs:
        p.join(10)
        assert p.exitcode == 0
    won = [k for got in results for k in got]
    assert sorted(won) == sorted(keys), "every key claimed exactly once"
    assert sum(1 for got in results if got) >= 2, "the processes really raced"
    with connect() as conn:
        attempts = conn.execute(
            f'SELECT DISTINCT attempts FROM "{schema}"._ledger_entries'
        ).fetchall()
    assert attempts == [(1,)]


def test_heartbeat_thread_has_its_own_connection(ledger: Any) -> None:
    key = "fn|b/k@e"
    assert ledger.claim(key, function="fn", owner="w", ttl=1) is Claim.ACQUIRED
    main_pid = backend_pid(ledger.client.connection())
    seen: list[int] = []
    errors: list[BaseException] = []

    def beat() -> None:
        try:
            for _ in range(20):
                assert ledger.extend(key, owner="w", ttl=1)
                time.sleep(0.01)
            seen.append(backend_pid(ledger.client.connection()))
        except BaseException as e:
            errors.append(e)

    thread = threading.Thread(target=beat)
    thread.start()
    for _ in range(20):  # the main thread keeps using the ledger meanwhile
        assert ledger.get(key).status == "in_progress"
    thread.join()
    assert not errors and seen and seen[0] != main_pid
    # The ended thread's connection is closed when the next thread connects.
    other = threading.Thread(target=lambda: ledger.has_seen("b", "k", "e"))
    other.start()
    other.join()
    with connect() as conn:
        alive = conn.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE pid = %s", (seen[0],)
        ).fetchone()[0]
    assert alive == 0


def test_reconnects_after_the_connection_is_lost(ledger: Any, schema: str) -> None:
    ledger.first_seen("b", "k", "e1", 1, "ev1")
    terminate(backend_pid(ledger.client.connection()))
    assert ledger.claim("fn|x", function="fn", owner="w", ttl=60) is Claim.ACQUIRED
    assert ledger.has_seen("b", "k", "e1")
    t = table(schema, "items", ["id"])
    t.upsert([{"id": 1}])
    terminate(backend_pid(t.client.connection()))
    assert t.upsert([{"id": 2}]) == 1 and t.count() == 2


def test_a_lost_reply_is_recognised_as_our_own_write(ledger: Any) -> None:
    """The statement committed, the reply was lost: the retry must not say BUSY / not first."""
    real_run = PgClient.run

    def run_committed_then_lost(self: PgClient, op: Any) -> Any:
        real_run(self, op)  # commits
        self.connection().close()  # the "reply" never arrives; reconnect and retry
        return real_run(self, lambda conn, _: op(conn, True))

    ledger.get("warm up")  # tables exist before the patch
    ledger.client.run = run_committed_then_lost.__get__(ledger.client)
    assert ledger.claim("fn|k", function="fn", owner="w", ttl=60) is Claim.ACQUIRED
    assert ledger.first_seen("b", "k", "e", 1, "ev")
    assert not ledger.first_seen("b", "k", "e", 1, "ev-other")
    del ledger.client.run
    assert ledger.claim("fn|k", function="fn", owner="w2", ttl=60) is Claim.BUSY


def test_info_with_nan_and_nul_is_still_recorded(ledger: Any) -> None:
    ledger.claim("fn|k", function="fn", owner="w", ttl=60)
    ledger.fail("fn|k", owner="w", info={"message": "bad byte \x00 here", "ratio": math.nan})
    info = ledger.get("fn|k").info
    assert info == {"message": "bad byte \ufffd here", "ratio": "nan"}


def test_keys_with_separators_and_wildcards(ledger: Any) -> None:
    for function in ("to_x", "toAx"):  # "_" must not match "A"
        key = f"{function}|b/a|b%@e1"
        ledger.claim(key, function=function, owner="w", ttl=60)
        ledger.complete(key, owner="w", info={})
    assert [e.key for e in ledger.other_versions("to_x", "b/a|b%@", "to_x|b/a|b%@e2")] == [
        "to_x|b/a|b%@e1"
    ]
    assert sorted(e.function for e in ledger.entries_for("b/a|b%@e1")) == ["toAx", "to_x"]
    assert ledger.entries_for("b%@e1") == []  # a suffix of the identity is not the identity


def test_done_infos_pages(ledger: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    import sluiceway.ledgers.postgres as mod

    monkeypatch.setattr(mod, "DONE_PAGE", 3)
    for i in range(8):
        ledger.claim(f"fn|{i}", function="fn", owner="w", ttl=60)
        ledger.complete(f"fn|{i}", owner="w", info={"i": i})
    assert sorted(info["i"] for _, info in ledger.done_infos()) == list(range(8))


# -- tables -----------------------------------------------------------------------


def test_a_real_sql_table_with_jsonb_key_columns(schema: str) -> None:
    t = table(schema, "customers", ["id"])
    t.upsert([{"id": 7, "name": "Ana", "tags": ["a"]}, {"id": "7", "name": "text key"}])
    assert t.get(7)["name"] == "Ana" and t.get("7")["name"] == "text key"  # types kept
    with connect() as conn:
        cols = conn.execute(
            "SELECT column_name, data_type FROM information_schema.columns"
            " WHERE table_schema = %s AND table_name = 'customers' ORDER BY ordinal_position",
            (schema,),
        ).fetchall()
        name = conn.execute(
            f"SELECT item->>'name' FROM \"{schema}\".customers WHERE id = '7'"
        ).fetchone()[0]
    assert cols == [("id", "jsonb"), ("item", "jsonb"), ("updated_at", "timestamp with time zone")]
    assert name == "Ana"


@pytest.mark.parametrize("rows", [50, 1500])  # pipelined statements, and COPY + merge
def test_upsert_batches_last_wins_and_reruns_change_nothing(schema: str, rows: int) -> None:
    t = table(schema, "t", ["a", "b"])
    items = [{"a": i % 7, "b": str(i), "v": i} for i in range(rows)]
    items.append({"a": 3, "b": "3", "v": "last"})  # a duplicate key in the same batch
    assert t.upsert(items) == rows + 1
    assert t.count() == rows and t.get(3, "3")["v"] == "last"

    def stamps() -> list[Any]:
        with connect() as conn:
            return conn.execute(f'SELECT updated_at FROM "{schema}".t ORDER BY a, b').fetchall()

    before = stamps()
    t.upsert(items)  # the same input again
    assert stamps() == before
    t.upsert([{"a": 0, "b": "0", "v": "changed"}])
    assert stamps() != before and t.count() == rows


def test_scan_pages_in_key_order(schema: str, monkeypatch: pytest.MonkeyPatch) -> None:
    import sluiceway.tables.postgres as mod

    monkeypatch.setattr(mod, "SCAN_PAGE", 4)
    t = table(schema, "t", ["k"])
    t.upsert([{"k": i, "big": 12345678901234567890} for i in range(10)])
    assert [i["k"] for i in t.scan()] == list(range(10))
    assert [i["k"] for i in t.scan(limit=6)] == list(range(6))
    assert t.get(3)["big"] == 12345678901234567890


def test_unstorable_values_and_bad_keys_are_refused(schema: str) -> None:
    from sluiceway.tables.postgres import UnstorableItem

    t = table(schema, "t", ["id"])
    with pytest.raises(UnstorableItem, match=r"'t'.*NaN"):
        t.upsert([{"id": 1, "x": math.nan}])
    with pytest.raises(UnstorableItem):
        t.upsert([{"id": 2, "x": "nul \x00"}])
    t.upsert([{"id": 3, "x": "a backslash-u0000 written out: \\u0000"}])
    assert t.get(3)["x"].endswith("\\u0000") and t.count() == 1
    with pytest.raises(TypeError, match="give 1 value"):
        t.get(1, 2)
    with pytest.raises(ConfigError, match="reserved"):
        table(schema, "u", ["item"])


def test_an_existing_table_with_another_key_is_refused(schema: str) -> None:
    table(schema, "orders", ["id"]).upsert([{"id": 1}])
    other = table(schema, "orders", ["customer", "id"])
    with pytest.raises(ConfigError, match=r"exists with key \['id'\].*\['customer', 'id'\]"):
        other.count()


def test_long_names(schema: str) -> None:
    long_field = "a_very_long_key_field_name_" * 4
    t = table(schema, "t" * 80, [long_field])
    t.upsert([{long_field: 1, "v": 1}])
    assert t.get(1) == {long_field: 1, "v": 1}
