"""Lost connections reach ``status``: each backend's reconnect path reports, workers persist.

The outages are real: a TCP proxy on loopback (tests/tcp_proxy.py) in front
of the real server is cut (every connection closed, then "connection refused"
on each attempt) and restored, so only the code under test loses its server.
"""

from __future__ import annotations

import getpass
import json
import threading
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
from typer.testing import CliRunner

from sluiceway import Pipeline, Runtime, health
from sluiceway.metrics import prometheus_text
from sluiceway.queues.base import QueueSpec
from sluiceway.state import StateDB

from .helpers import wait_until
from .postgres_backend import connect, fresh_schema, pg_url, require_postgres
from .redis_backend import fresh_prefix as redis_prefix
from .runlog_pipeline import runs, write_runlog_pipeline
from .services import (
    NATS_URL,
    POSTGRES_URL,
    RABBITMQ_URL,
    REDIS_URL,
    fresh_prefix,
    require_url,
    with_prefix,
)
from .tcp_proxy import TcpProxy, tcp_proxy

SPECS = {"q": QueueSpec("q", visibility_timeout=30)}


def record(backend: str, port: int) -> health.Connection | None:
    """This process's record of the connection through the proxy on ``port``."""
    for c in health.snapshot():
        if c.backend == backend and f":{port}" in c.url:
            return c
    return None


# -- the registry and its rows, without a network --------------------------------------


def test_a_loss_and_its_recovery_are_recorded_and_persisted(tmp_path: Path) -> None:
    h = health.Health()
    db = StateDB(tmp_path / "state.db")
    h.ok("redis", "redis://a:6379")  # nothing lost: no record
    assert h.snapshot() == []
    h.persist_to(db, "host:1:w0")
    h.lost("redis", "redis://a:6379", ConnectionError("refused"))
    h.lost("redis", "redis://a:6379", ConnectionError("refused again"))
    assert h.flush()
    (row,) = health.read(db)
    assert row["worker"] == "host:1:w0"
    assert (row["state"], row["attempts"], row["reconnects"]) == ("lost", 2, 0)
    assert row["last_error"] == "ConnectionError: refused again"
    assert row["lost_at"] is not None and row["recovered_at"] is None
    h.ok("redis", "redis://a:6379")
    h.lost("postgresql", "postgresql://u:***@b/db", "server closed the connection")
    assert h.flush()
    rows = {r["backend"]: r for r in health.read(db)}
    assert rows["postgresql"]["state"] == "lost"  # lost ones are listed first
    assert next(iter(rows)) == "postgresql"
    redis_row = rows["redis"]
    assert (redis_row["state"], redis_row["attempts"], redis_row["reconnects"]) == ("ok", 2, 1)
    assert redis_row["recovered_at"] >= redis_row["lost_at"]
    # A second outage starts its own count of attempts; reconnects keep adding up.
    h.lost("redis", "redis://a:6379", "reset")
    h.ok("redis", "redis://a:6379")
    assert h.flush()
    redis_row = {r["backend"]: r for r in health.read(db)}["redis"]
    assert (redis_row["attempts"], redis_row["reconnects"]) == (1, 2)
    db.close()


# -- every backend's reconnect path, through a proxy that is cut and restored ----------


def outage(proxy: TcpProxy, backend: str, call: Callable[[], Any], attempts: int = 2) -> None:
    """``call`` works, is made while the proxy is cut, and returns once it is back."""
    call()
    proxy.cut()
    result: dict[str, Any] = {}

    def during() -> None:
        try:
            result["value"] = call()
        except BaseException as e:  # handed to the test thread below
            result["error"] = e

    t = threading.Thread(target=during, daemon=True)
    t.start()
    wait_until(
        lambda: (
            (r := record(backend, proxy.port)) is not None
            and r.state == "lost"
            and r.attempts >= attempts
        ),
        timeout=20,
        what=f"{backend} to report the lost connection",
    )
    lost = record(backend, proxy.port)
    assert lost is not None and lost.last_error
    proxy.restore()
    t.join(40)
    assert not t.is_alive(), f"the {backend} call did not return after the restore"
    assert "error" not in result, result
    back = record(backend, proxy.port)
    assert back is not None and back.state == "ok" and back.reconnects >= 1
    assert back.recovered_at is not None and back.lost_at is not None
    assert back.recovered_at >= back.lost_at == lost.lost_at


def test_redis_reports_a_lost_connection() -> None:
    from sluiceway.queues.redis import RedisBroker

    require_url("Redis", REDIS_URL, 6379)
    with tcp_proxy(REDIS_URL, 6379) as proxy:
        prefix = fresh_prefix()
        broker = RedisBroker.from_url(with_prefix(proxy.url(REDIS_URL), prefix), SPECS, {})
        try:
            outage(proxy, "redis", lambda: broker.queue("q").counts())
        finally:
            broker.close()


def test_postgres_reports_a_lost_connection(request: pytest.FixtureRequest) -> None:
    from sluiceway.pg import PgClient

    require_postgres()
    with tcp_proxy(POSTGRES_URL, 5432) as proxy:
        client = PgClient(proxy.url(POSTGRES_URL))
        try:
            outage(proxy, "postgresql", lambda: client.run(lambda c, r: c.execute("SELECT 1")))
        finally:
            client.close()


def test_rabbitmq_reports_a_lost_connection() -> None:
    from sluiceway.queues.rabbitmq import RabbitBroker

    require_url("RabbitMQ", RABBITMQ_URL, 5672)
    with tcp_proxy(RABBITMQ_URL, 5672) as proxy:
        url = with_prefix(proxy.url(RABBITMQ_URL), fresh_prefix())
        broker = RabbitBroker.from_url(url, SPECS, {})
        try:
            outage(proxy, "rabbitmq", lambda: broker.queue("q").counts())
            assert "guest:***@" in (record("rabbitmq", proxy.port) or health.Connection("", "")).url
        finally:
            broker.destroy()
            broker.close()


def test_nats_reports_a_lost_connection() -> None:
    from sluiceway.queues.nats import NatsBroker

    require_url("NATS", NATS_URL, 4222)
    with tcp_proxy(NATS_URL, 4222) as proxy:
        broker = NatsBroker.from_url(with_prefix(proxy.url(NATS_URL), fresh_prefix()), SPECS, {})
        try:
            outage(proxy, "nats", lambda: broker.queue("q").counts())
        finally:
            broker.destroy()
            broker.close()


def test_sqs_reports_a_lost_connection(request: pytest.FixtureRequest) -> None:
    from sluiceway.queues.sqs import SqsBroker

    from .aws_backend import fresh_prefix as aws_prefix
    from .aws_backend import moto, sqs_url

    endpoint = moto(request)
    with tcp_proxy(endpoint, 80) as proxy:
        broker = SqsBroker.from_url(sqs_url(proxy.url(endpoint), aws_prefix()), SPECS, {})
        try:
            # botocore retries with its own backoff (up to ~1 s after the first failure).
            outage(proxy, "sqs", lambda: broker.queue("q").counts(), attempts=1)
        finally:
            broker.close()


# -- end to end: worker processes, a broker and a ledger cut while they work -----------

INPUTS = 12
ROWS = 5


@pytest.fixture
def cut_pipeline(
    request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[dict[str, Any]]:
    schema = fresh_schema(request)
    user = urlsplit(POSTGRES_URL).username or getpass.getuser()
    with tcp_proxy(REDIS_URL, 6379) as redis_proxy, tcp_proxy(POSTGRES_URL, 5432) as pg_proxy:
        broker = with_prefix(redis_proxy.url(REDIS_URL), redis_prefix(request))
        # A password the trust-authenticated test server ignores: it must never be shown.
        ledger = pg_url(schema, pg_proxy.url(POSTGRES_URL)).replace(
            "://127.0.0.1", f"://{user}:${{HEALTH_PG_PASSWORD}}@127.0.0.1", 1
        )
        monkeypatch.setenv("HEALTH_PG_PASSWORD", "s3cret-pw")
        path, runlog = write_runlog_pipeline(
            tmp_path,
            monkeypatch,
            name="health-e2e",
            work="visibility_timeout: 60s, max_receive_count: 5, backoff_base: 0.05s, "
            "backoff_max: 0.2s",
            profile="cut",
            backends={"broker": broker, "ledger": ledger, "tables": ledger},
            sleep=0.3,
        )
        monkeypatch.chdir(tmp_path)
        (tmp_path / "bronze").mkdir()
        for i in range(INPUTS):
            lines = "\n".join(str(i * 100 + r) for r in range(ROWS))
            (tmp_path / "bronze" / f"in{i}.csv").write_text(f"id\n{lines}\n")
        yield {
            "path": path,
            "runlog": runlog,
            "schema": schema,
            "proxies": {"redis": redis_proxy, "postgresql": pg_proxy},
        }


def test_workers_report_lost_connections_in_status_and_lose_no_message(
    cut_pipeline: dict[str, Any], tmp_path: Path
) -> None:
    path, runlog, proxies = cut_pipeline["path"], cut_pipeline["runlog"], cut_pipeline["proxies"]
    state = Pipeline.from_file(path, "cut").db
    seen_during: list[dict[str, Any]] = []
    problems: list[BaseException] = []

    def rows(backend: str) -> list[dict[str, Any]]:
        port = f":{proxies[backend].port}"
        return [r for r in health.read(state) if r["backend"] == backend and port in r["url"]]

    def chaos() -> None:
        """Cut each server in turn while inputs remain; restore once a worker recorded it.

        One at a time: a worker stuck retrying PostgreSQL does not touch Redis
        meanwhile, so with both cut at once which loss a worker sees is luck.
        """
        try:
            wait_until(lambda: runlog.read_text().count("\n") >= 1, 60, "the first input")
            for backend in ("redis", "postgresql"):
                proxies[backend].cut()
                try:
                    wait_until(
                        lambda b=backend: any(
                            r["state"] == "lost" and ":w" in r["worker"] for r in rows(b)
                        ),
                        20,
                        f"a worker to record the lost {backend} connection",
                    )
                    seen_during.extend(r for r in rows(backend) if r["state"] == "lost")
                finally:
                    proxies[backend].restore()
        except BaseException as e:
            problems.append(e)
        finally:
            for proxy in proxies.values():
                proxy.restore()

    t = threading.Thread(target=chaos, daemon=True)
    t.start()
    summary = Runtime(path, workers=2, watch=False, profile="cut").drain(timeout=120)
    t.join(10)
    assert not problems, problems
    # During the outage: each backend lost, with attempts and the error, password hidden.
    assert {r["backend"] for r in seen_during} == {"redis", "postgresql"}
    for r in seen_during:
        assert r["attempts"] >= 1 and r["last_error"] and r["lost_at"] is not None
        assert f":{proxies[r['backend']].port}" in r["url"]
    assert all("s3cret-pw" not in json.dumps(r) for r in seen_during)

    # Nothing lost, nothing twice: every input ran once, every row is in the table once.
    assert summary.done == INPUTS, summary
    counted = runs(runlog)
    assert counted == Counter(f"bronze/in{i}.csv" for i in range(INPUTS)), counted
    with connect() as conn:
        table = f'"{cut_pipeline["schema"]}".customers'
        ids = [r[0] for r in conn.execute(f"SELECT id FROM {table}").fetchall()]
    assert sorted(ids) == sorted(i * 100 + r for i in range(INPUTS) for r in range(ROWS))

    # After: status (the API, the CLI's --json and /metrics) shows the loss and the recovery.
    p = Pipeline.from_file(path, "cut")
    try:
        ports = {f":{proxy.port}" for proxy in proxies.values()}
        connections = [
            c for c in p.status()["connections"] if any(port in c["url"] for port in ports)
        ]
        assert any(":w" in c["worker"] for c in connections)
        by_backend: dict[str, list[dict[str, Any]]] = {}
        for c in connections:
            by_backend.setdefault(c["backend"], []).append(c)
        assert set(by_backend) == {"redis", "postgresql"}
        for group in by_backend.values():
            assert all(c["state"] == "ok" for c in group), group
            assert sum(c["reconnects"] for c in group) >= 1
            assert all(c["recovered_at"] >= c["lost_at"] for c in group if c["reconnects"])
        from sluiceway.cli import app

        out = CliRunner().invoke(app, ["status", "--pipeline", str(path), "--json"])
        assert out.exit_code == 0, out.output
        shown = json.loads(out.output)["connections"]
        assert {c["backend"] for c in shown if ":w" in c["worker"]} == {"redis", "postgresql"}
        assert "s3cret-pw" not in out.output
        table = CliRunner().invoke(app, ["status", "--pipeline", str(path)])
        assert table.exit_code == 0 and "Connections lost" in table.output, table.output
        metrics = prometheus_text(p).decode()
        assert 'sluiceway_connection_up{backend="redis"' in metrics
        assert "sluiceway_connection_reconnects_total" in metrics
        assert "s3cret-pw" not in metrics
    finally:
        p.broker.close()
        p.ledger.close()
        p.close()
