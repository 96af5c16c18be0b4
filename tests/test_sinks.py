"""Table upserts, JSON messages, JSON Lines and CSV objects; none duplicated on re-runs."""

from __future__ import annotations

import csv
import json
from collections.abc import Callable
from pathlib import Path

import pytest

from sluiceway import Pipeline
from sluiceway.tables.sqlite import SqliteTable

from .helpers import make_csv
from .test_pipeline_e2e import drain_inline

PIPELINE = """
pipeline: sinks
buckets:
  bronze: ./bronze
  out: ./out
tables:
  customers: {key: [id]}
queues:
  work: {max_receive_count: 2, backoff_base: 0.01s, backoff_max: 0.02s}
  rows: {}
  summaries: {}
  errors: {}
rules:
  - name: csv
    pattern: {detail: {bucket: {name: [bronze]}, object: {key: [{suffix: .csv}]}}}
    targets: [work]
functions:
  load:
    queue: work
    on_success: {queue: summaries}
    on_error: {queue: errors}
    steps:
      - read_csv: {columns: {id: int}}
      - write_table: {table: customers}
      - publish_json: {queue: rows}
      - write_jsonl: {bucket: out}
"""


@pytest.fixture
def p(write_pipeline: Callable[..., Path]) -> Pipeline:
    return Pipeline.from_file(write_pipeline(PIPELINE))


def bodies(p: Pipeline, queue: str) -> list[dict]:
    return [json.loads(m.body) for m in p.broker.queue(queue).peek(10_000)]


def test_rows_go_to_table_messages_and_jsonl(p: Pipeline, tmp_path: Path) -> None:
    records = make_csv(tmp_path / "a.csv", 50)
    p.put(tmp_path / "a.csv", "bronze", "a.csv")
    assert drain_inline(p) == ["done"]
    table = p.tables["customers"]
    assert table.count() == 50
    assert table.get(7)["name"] == records[7]["name"]
    msgs = bodies(p, "rows")
    assert [m["row"] for m in msgs] == list(range(1, 51))
    assert [m["data"]["id"] for m in msgs] == list(range(50))
    assert msgs[0]["source"] == "bronze/a.csv"
    lines = (tmp_path / "out" / "a.jsonl").read_text().splitlines()
    assert [json.loads(line)["id"] for line in lines] == list(range(50))
    [summary] = bodies(p, "summaries")
    assert summary["status"] == "done" and summary["input"] == "bronze/a.csv"
    assert summary["stats"]["rows_in"] == 50 and summary["stats"]["rows_out"] == 50
    assert summary["stats"]["messages_published"] == 50


def test_rerun_publishes_nothing_twice_even_after_consumption(p: Pipeline, tmp_path: Path) -> None:
    make_csv(tmp_path / "a.csv", 20)
    event = p.put(tmp_path / "a.csv", "bronze", "a.csv")
    assert event is not None
    drain_inline(p)
    rows = p.broker.queue("rows")
    consumed = rows.receive(20)
    assert rows.ack(consumed) == 20  # downstream consumed them all
    # The same input again (as after a crash before the ledger said done).
    p.db.conn.execute("DELETE FROM ledger")
    p.broker.queue("work").send(event.to_json(), id="again")
    drain_inline(p)
    assert rows.peek() == []
    assert p.tables["customers"].count() == 20  # upserts, not inserts
    assert len(bodies(p, "summaries")) == 1


def test_upsert_replaces_by_key(tmp_path: Path) -> None:
    from sluiceway.state import StateDB

    t = SqliteTable(StateDB(tmp_path / "s.db"), "t", ["a", "b"])
    t.upsert([{"a": 1, "b": "x", "v": 1}, {"a": 1, "b": "y", "v": 2}])
    t.upsert([{"a": 1, "b": "x", "v": 3}])
    assert t.count() == 2
    assert t.get(1, "x") == {"a": 1, "b": "x", "v": 3}
    assert [r["v"] for r in t.scan()] == [3, 2]
    assert t.delete(1, "y") and t.count() == 1


def test_missing_key_fails_the_file_into_the_error_queue(p: Pipeline, tmp_path: Path) -> None:
    (tmp_path / "b.csv").write_text("name\nAna\n")
    p.put(tmp_path / "b.csv", "bronze", "b.csv")
    drain_inline(p)
    [error] = bodies(p, "errors")
    assert error["status"] == "dead-lettered"
    assert error["input"].startswith("bronze/b.csv@")
    assert "no key field 'id'" in error["message"]
    assert p.broker.queue("work-dlq").counts().visible == 1


def test_write_csv(write_pipeline: Callable[..., Path], tmp_path: Path) -> None:
    text = PIPELINE.replace(
        "      - write_table: {table: customers}\n      - publish_json: {queue: rows}\n"
        "      - write_jsonl: {bucket: out}",
        "      - write_csv: {bucket: out, delimiter: ';'}",
    )
    p = Pipeline.from_file(write_pipeline(text))
    records = make_csv(tmp_path / "a.csv", 30)
    p.put(tmp_path / "a.csv", "bronze", "a.csv")
    drain_inline(p)
    with open(tmp_path / "out" / "a.csv", newline="") as f:
        got = list(csv.DictReader(f, delimiter=";"))
    assert [r["name"] for r in got] == [r["name"] for r in records]


def test_sink_config_errors(write_pipeline: Callable[..., Path]) -> None:
    from sluiceway.config import ConfigError, loads

    bad = (
        PIPELINE.replace("{table: customers}", "{table: clients}")
        .replace("{queue: rows}", "{queue: rows, topic: t}")
        .replace("on_error: {queue: errors}", "on_error: {queue: nowhere}")
    )
    with pytest.raises(ConfigError) as e:
        loads(bad, source="s.yaml")
    text = "\n".join(e.value.problems)
    assert "write_table.table: unknown table 'clients'" in text
    assert "give exactly one of 'queue' or 'topic'" in text
    assert "functions.load.on_error.queue: unknown queue 'nowhere'" in text
