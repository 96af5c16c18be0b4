"""examples/events-to-lake end to end: events in, a deduplicated Hive dataset out,
exactly once through SIGKILLs, and compaction that keeps every row exactly once."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from collections import Counter
from pathlib import Path
from typing import Any

import duckdb
import pyarrow.dataset as ds
import pytest

from sluiceway import Pipeline, Runtime
from sluiceway.compact import compact, live_files, read_dataset
from sluiceway.faults import read_log
from sluiceway.steps.dataset import parse_part_name

from .helpers import wait_until

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "events-to-lake"
SLUICEWAY = [sys.executable, "-m", "sluiceway"]


def sw(*args: str, cwd: Path, env: dict[str, str] | None = None) -> str:
    proc = subprocess.run(
        [*SLUICEWAY, *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "COLUMNS": "200", **(env or {})},
    )
    assert proc.returncode == 0, f"sluiceway {' '.join(args)}:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


def sample_events() -> list[dict[str, Any]]:
    lines = (EXAMPLE / "samples" / "events.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def example_copy(tmp_path: Path, **changes: str) -> Path:
    """The example's pipeline in a temporary folder, with some settings changed."""
    text = (EXAMPLE / "sluiceway.yaml").read_text()
    for old, new in changes.items():
        assert old in text, old
        text = text.replace(old, new)
    (tmp_path / "sluiceway.yaml").write_text(text)
    return tmp_path / "sluiceway.yaml"


def dataset_table(tmp_path: Path) -> Any:
    return ds.dataset(
        tmp_path / "data" / "lake" / "events", format="parquet", partitioning="hive"
    ).to_table()


def test_example_demo_end_to_end_read_with_pyarrow_and_duckdb(tmp_path: Path) -> None:
    """The demo as a user runs it (stream put, run --drain, status, compact), on a copy."""
    events = sample_events()
    unique = {e["event_uuid"]: e for e in reversed(events)}  # first occurrence wins
    assert 0.05 < 1 - len(unique) / len(events) < 0.15, "about 10% duplicates"
    copy = tmp_path / "events-to-lake"
    shutil.copytree(EXAMPLE, copy, ignore=shutil.ignore_patterns("data", ".sluiceway"))
    proc = subprocess.run(
        ["bash", str(copy / "demo.sh")],
        capture_output=True,
        text=True,
        timeout=180,
        env={**os.environ, "SLUICEWAY_BIN": str(Path(sys.executable).parent), "COLUMNS": "200"},
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"appended {len(events)} events" in proc.stdout and "unique_ids" in proc.stdout

    table = dataset_table(copy)
    assert {"event_name", "date"} <= set(table.schema.names)  # partitions as columns
    rows = table.to_pylist()
    assert sorted(r["event_uuid"] for r in rows) == sorted(unique)
    for r in rows:
        e = unique[r["event_uuid"]]
        assert r["event_name"] == e["event_name"]
        assert r["date"] == e["created_at"][:10]
        assert json.loads(r["payload"]) == e["payload"]

    glob = str(copy / "data" / "lake" / "events" / "**" / "*.parquet")
    con = duckdb.connect()
    by_duckdb = dict(
        con.execute(
            f"SELECT event_name, count(DISTINCT event_uuid) FROM read_parquet('{glob}',"
            " hive_partitioning = true) GROUP BY event_name"
        ).fetchall()
    )
    assert by_duckdb == dict(Counter(e["event_name"] for e in unique.values()))
    (total, distinct, days) = con.execute(
        f"SELECT count(*), count(DISTINCT event_uuid), count(DISTINCT date) FROM read_parquet("
        f"'{glob}', hive_partitioning = true) WHERE date >= DATE '2026-11-23'"
    ).fetchone()
    assert total == distinct == len(unique) and days == 4

    status = Pipeline.from_file(copy / "sluiceway.yaml").status()
    c = status["streams"]["events"]["consumers"]["to-lake"]
    assert c["lag"] == 0 and c["unfinished_flush"] is None
    assert c["totals"]["records"] == len(events)
    assert c["totals"]["duplicates"] == len(events) - len(unique)
    assert c["by_event_name"]["signup"]["written"] == sum(
        1 for e in unique.values() if e["event_name"] == "signup"
    )


def test_jsonl_format_reads_back_with_duckdb(tmp_path: Path) -> None:
    path = example_copy(tmp_path, **{"format: parquet": "format: jsonl"})
    p = Pipeline.from_file(path)
    p.append_events("events", sample_events()[:100])
    Runtime(path, workers=0, watch=False).drain(timeout=60)
    glob = str(tmp_path / "data" / "lake" / "events" / "**" / "*.jsonl")
    rows = duckdb.sql(
        f"SELECT event_uuid, event_name, date, payload FROM read_json('{glob}',"
        " hive_partitioning = true, format = 'newline_delimited')"
    ).fetchall()
    unique = {e["event_uuid"]: e for e in reversed(sample_events()[:100])}
    assert sorted(str(r[0]) for r in rows) == sorted(unique)
    assert all(isinstance(r[3], dict) or str(r[3]).startswith("{") for r in rows)


WORKER_SCRIPT = """
import sys, threading
from sluiceway import Pipeline, Worker
p = Pipeline.from_file(sys.argv[1])
draining = threading.Event(); draining.set()
w = Worker(p, worker_id="doomed", drain=draining)
for _ in range(1000):
    w.poll(wait=0.01)
"""


def test_kill_between_files_and_checkpoint_then_exactly_once(tmp_path: Path) -> None:
    """SIGKILL a worker after its files are published, before the commit; restart."""
    path = example_copy(tmp_path, **{"flush_records: 10000": "flush_records: 300"})
    events = sample_events()
    p = Pipeline.from_file(path)
    p.append_events("events", events[:500])
    proc = subprocess.run(
        [sys.executable, "-c", WORKER_SCRIPT, str(path)],
        env={**os.environ, "SLUICEWAY_FAULTS": "after_commit:1.0,procs=MainProcess"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == -9, proc.stderr
    lake = p.buckets["lake"]
    crashed = {o.key: lake.read_bytes(o.key) for o in lake.list()}
    assert crashed and all("-0000000000000300-to-lake" in k for k in crashed)
    assert p.stream("events").checkpoint("to-lake") == 0
    state = p.stream_status()["events"]["consumers"]["to-lake"]
    assert state["unfinished_flush"] == [1, 300]

    p.append_events("events", events[500:])  # traffic goes on meanwhile
    summary = Runtime(path, workers=0, watch=False).drain(timeout=60)
    assert summary.done >= 2
    for key, data in crashed.items():  # replayed: same keys, same bytes
        assert lake.read_bytes(key) == data
    ids = [r["event_uuid"] for r in dataset_table(tmp_path).to_pylist()]
    assert sorted(ids) == sorted({e["event_uuid"] for e in events})  # each exactly once


@pytest.mark.parametrize("point", ["after_commit", "after_done"])
def test_runtime_restarts_a_killed_worker_and_loses_nothing(tmp_path: Path, point: str) -> None:
    """`run --drain` whose worker is SIGKILLed mid-flush (files out, no commit) or
    just after the commit; the supervisor restarts it and the drain completes."""
    path = example_copy(tmp_path, **{"flush_records: 10000": "flush_records: 200"})
    events = sample_events()
    Pipeline.from_file(path).append_events("events", events)
    log = tmp_path / "kills.jsonl"
    env = {"SLUICEWAY_FAULTS": f"{point}:1.0,max=1,log={log}"}
    args = ["run", "--drain", "--json", "--workers", "1", "--timeout", "90"]
    summary = json.loads(sw(*args, cwd=tmp_path, env=env))
    assert [k["point"] for k in read_log(log)] == [point]
    assert summary["rows_out"] == len({e["event_uuid"] for e in events})
    ids = [r["event_uuid"] for r in dataset_table(tmp_path).to_pylist()]
    assert sorted(ids) == sorted({e["event_uuid"] for e in events})


def test_second_runtime_does_not_double_consume(tmp_path: Path) -> None:
    path = example_copy(
        tmp_path,
        **{
            "flush_records: 10000": "flush_records: 50",
            "flush_seconds: 60s": "flush_seconds: 0.2s",
        },
    )
    events = sample_events()
    Pipeline.from_file(path).append_events("events", events)
    a = Runtime(path, workers=1, watch=False)
    b = Runtime(path, workers=1, watch=False)
    a.start()
    b.start()
    p = Pipeline.from_file(path)
    try:
        wait_until(lambda: p.pending() == 0, 60, "two runtimes to drain the stream")
    finally:
        a.stop()
        b.stop()
    ids = [r["event_uuid"] for r in dataset_table(tmp_path).to_pylist()]
    assert sorted(ids) == sorted({e["event_uuid"] for e in events})


# -- compaction --------------------------------------------------------------------

SMALL_FLUSHES = """
pipeline: compacting
buckets:
  lake: ./lake
streams:
  events: {}
functions:
  to-lake:
    stream: events
    steps:
      - dedup
      - write_dataset:
          bucket: lake
          prefix: events
          partition_by: [event_name]
          flush_records: 7
"""


@pytest.fixture
def small_files(tmp_path: Path) -> Pipeline:
    (tmp_path / "sluiceway.yaml").write_text(textwrap.dedent(SMALL_FLUSHES))
    p = Pipeline.from_file(tmp_path / "sluiceway.yaml")
    p.append_events("events", sample_events()[:150])
    Runtime(tmp_path / "sluiceway.yaml", workers=0, watch=False).drain(timeout=60)
    return p


def all_ids(p: Pipeline) -> list[str]:
    table = read_dataset(p.buckets["lake"], "events").to_table()
    return sorted(table.column("event_uuid").to_pylist())


def test_compact_merges_small_files_keeping_every_row_once(small_files: Pipeline) -> None:
    p = small_files
    before = all_ids(p)
    assert len(before) == len(set(before))
    n_before = len(list(p.buckets["lake"].list("events/")))
    report = compact(p, "lake", "events")
    assert report.merged and not report.skipped
    files = [o.key for o in p.buckets["lake"].list("events/")]
    assert len(files) == len({k.rsplit("/", 1)[0] for k in files}) < n_before  # one per partition
    assert all_ids(p) == before
    root = p.buckets["lake"].root  # type: ignore[attr-defined]
    raw = ds.dataset(root / "events", partitioning="hive").to_table()
    assert sorted(raw.column("event_uuid").to_pylist()) == before  # plain readers too
    assert compact(p, "lake", "events").merged == []  # nothing left to do


def test_a_crash_mid_compaction_never_shows_a_row_twice_to_live_readers(
    small_files: Pipeline, monkeypatch: pytest.MonkeyPatch
) -> None:
    p = small_files
    before = all_ids(p)
    bucket = p.buckets["lake"]

    def crash(key: str) -> None:
        raise KeyboardInterrupt("killed before the inputs were deleted")

    monkeypatch.setattr(bucket, "delete", crash)
    with pytest.raises(KeyboardInterrupt):
        compact(p, "lake", "events")
    monkeypatch.undo()
    # Merged file and its inputs are both there: a plain glob sees rows twice …
    root = bucket.root  # type: ignore[attr-defined]
    raw = ds.dataset(root / "events", partitioning="hive").to_table()
    assert raw.num_rows > len(before)
    # … the live-file rule does not, and the next compaction cleans up.
    assert all_ids(p) == before
    assert len(live_files(bucket, "events")) < len(list(bucket.list("events/")))
    report = compact(p, "lake", "events")
    assert report.removed_superseded
    assert sorted(o.key for o in bucket.list("events/")) == sorted(live_files(bucket, "events"))
    assert all_ids(p) == before


def test_compact_leaves_unfinished_flushes_alone(small_files: Pipeline, tmp_path: Path) -> None:
    p = small_files
    # Pretend the last flush has not committed: its files must not be merged.
    names = [parse_part_name(k.rsplit("/", 1)[1]) for k in live_files(p.buckets["lake"], "events")]
    last = max(n[1] for n in names if n is not None)
    with p.db.transaction() as conn:
        conn.execute(
            "UPDATE stream_checkpoints SET seq = ? WHERE consumer = 'to-lake'", (last - 7,)
        )
    report = compact(p, "lake", "events")
    merged_inputs = [k for m in report.merged for k in m["inputs"]]
    assert merged_inputs and not any(f"-{last:016d}-" in k for k in merged_inputs)
    out = sw("compact", "lake/events", "--dry-run", "--json", cwd=tmp_path)
    assert json.loads(out)["merged"] == []
