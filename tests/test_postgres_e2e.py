"""A pipeline on the PostgreSQL ledger and tables, run by worker processes.

The same pipeline file as on the embedded default; only the profile names
PostgreSQL. Rows land in a real SQL table exactly once, a re-delivery
upserts without duplicates, and four workers given the same inputs at the
same time process each input once.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import pytest

from sluiceway import Pipeline, Runtime

from .postgres_backend import connect, fresh_schema, pg_url
from .runlog_pipeline import runs, write_runlog_pipeline

ROWS = 40  # per input file


@pytest.fixture
def setup(
    request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> dict[str, Any]:
    schema = fresh_schema(request)
    path, runlog = write_runlog_pipeline(
        tmp_path,
        monkeypatch,
        name="pg-e2e",
        work="visibility_timeout: 3s, max_receive_count: 5, backoff_base: 0.01s, "
        "backoff_max: 0.05s",
        profile="pg",
        backends={"ledger": pg_url(schema), "tables": pg_url(schema)},
    )
    pipeline = Pipeline.from_file(path, "pg")
    yield {"schema": schema, "path": path, "pipeline": pipeline, "runlog": runlog}
    pipeline.ledger.close()
    pipeline.close()


def write_input(tmp_path: Path, index: int) -> list[dict[str, Any]]:
    rows = [
        {"id": index * 1000 + j, "name": f"customer {index}-{j}", "country": "DE"}
        for j in range(ROWS)
    ]
    with open(tmp_path / f"in{index}.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["id", "name", "country"])
        writer.writeheader()
        writer.writerows(rows)
    return rows


def table_rows(schema: str) -> list[tuple[Any, ...]]:
    with connect() as conn:
        return conn.execute(
            f'SELECT id, item, updated_at FROM "{schema}".customers ORDER BY id'
        ).fetchall()


def ledger_rows(schema: str) -> list[tuple[Any, ...]]:
    with connect() as conn:
        return conn.execute(
            f'SELECT key, status, attempts FROM "{schema}"._ledger_entries ORDER BY key'
        ).fetchall()


def test_rows_land_once_and_a_redelivery_upserts(setup: dict[str, Any], tmp_path: Path) -> None:
    p, schema = setup["pipeline"], setup["schema"]
    expected = []
    events = []
    for i in range(3):
        expected += write_input(tmp_path, i)
        events.append(p.put(tmp_path / f"in{i}.csv", "bronze", f"in{i}.csv"))
    assert all(e is not None for e in events)

    summary = Runtime(setup["path"], workers=2, watch=False, profile="pg").drain(timeout=60)
    assert summary.done == 3 and summary.rows_in == 3 * ROWS

    rows = table_rows(schema)
    assert [r[0] for r in rows] == [r["id"] for r in expected]  # each id once, none missing
    assert [r[1] for r in rows] == expected
    assert [(status, attempts) for _, status, attempts in ledger_rows(schema)] == [("done", 1)] * 3
    assert runs(setup["runlog"]) == {f"bronze/in{i}.csv": 1 for i in range(3)}

    # A crash after the table write, before the ledger said done: the same
    # input is delivered again and processed again, and only upserts.
    key = f"load|{events[0].input_identity}"
    with connect() as conn:
        conn.execute(f'DELETE FROM "{schema}"._ledger_entries WHERE key = %s', (key,))
    p.broker.queue("work").send(events[0].to_json(), id="again")
    summary = Runtime(setup["path"], workers=2, watch=False, profile="pg").drain(timeout=60)
    assert summary.done == 1
    assert runs(setup["runlog"])["bronze/in0.csv"] == 2  # really processed twice …
    assert table_rows(schema) == rows  # … and the table is as it was, updated_at included
    assert [(status, attempts) for _, status, attempts in ledger_rows(schema)] == [("done", 1)] * 3


def test_four_workers_on_the_same_inputs_process_each_once(
    setup: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    p, schema = setup["pipeline"], setup["schema"]
    monkeypatch.setenv("SLUICEWAY_TEST_RUN_SLEEP", "0.3")  # hold each claim while the copies arrive
    inputs = 6
    work = p.broker.queue("work")
    for i in range(inputs):
        write_input(tmp_path, i)
        event = p.put(tmp_path / f"in{i}.csv", "bronze", f"in{i}.csv")
        assert event is not None
        for copy in range(3):  # three more deliveries of the same event, side by side
            work.send(event.to_json(), id=f"copy-{i}-{copy}")

    summary = Runtime(setup["path"], workers=4, watch=False, profile="pg").drain(timeout=60)

    assert summary.done == inputs
    assert runs(setup["runlog"]) == {f"bronze/in{i}.csv": 1 for i in range(inputs)}
    ledger = ledger_rows(schema)
    assert [(status, attempts) for _, status, attempts in ledger] == [("done", 1)] * inputs
    ids = [r[0] for r in table_rows(schema)]
    assert len(ids) == len(set(ids)) == inputs * ROWS
    assert p.pending() == 0
