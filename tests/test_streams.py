"""Stream functions: config checks, buffering, dedup windows, leases and exact replays."""

from __future__ import annotations

import gc
import tempfile
import textwrap
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any
from unittest import mock

import pyarrow.dataset as ds
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sluiceway import ConfigError, Pipeline, Runtime, Worker, faults, loads
from sluiceway.steps.dedup import DedupStore
from sluiceway.streams.consumer import StreamConsumer
from sluiceway.streams.sqlite import SqliteStream

HOUR = 3600.0

PIPELINE = """
pipeline: streams
buckets:
  lake: ./lake
streams:
  events: {{lease_timeout: {lease}}}
functions:
  to-lake:
    stream: events
    steps:
      - dedup: {{key: event_uuid, window: {window}}}
      - write_dataset:
          bucket: lake
          format: {fmt}
          partition_by: [event_name, {{date: created_at}}]
          flush_records: {flush_records}
          flush_seconds: {flush_seconds}
"""


def make_pipeline(
    root: Path,
    *,
    window: str = "24h",
    flush_records: int = 10,
    flush_seconds: str = "60s",
    fmt: str = "parquet",
    lease: str = "30s",
) -> Pipeline:
    text = PIPELINE.format(
        window=window,
        flush_records=flush_records,
        flush_seconds=flush_seconds,
        fmt=fmt,
        lease=lease,
    )
    (root / "sluiceway.yaml").write_text(textwrap.dedent(text))
    return Pipeline.from_file(root / "sluiceway.yaml")


def event(uuid: str, name: str = "signup", day: int = 24, **payload: Any) -> dict[str, Any]:
    return {
        "event_uuid": uuid,
        "event_name": name,
        "created_at": f"2026-11-{day:02d}T10:00:00Z",
        "payload": payload or {"n": 1},
    }


class Crash(BaseException):
    """Stands in for SIGKILL: nothing after it runs."""


class Clock:
    def __init__(self, t: float = 1_700_000_000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def with_clock(p: Pipeline, clock: Clock) -> SqliteStream:
    stream = SqliteStream(p.db, "events", clock=clock)
    p.streams["events"] = stream  # consumers built after this read through it too
    return stream


def lake_rows(root: Path, fmt: str = "parquet") -> list[dict[str, Any]]:
    lake = root / "lake"
    if not lake.exists():
        return []
    fmt = "json" if fmt == "jsonl" else fmt
    table = ds.dataset(lake, format=fmt, partitioning="hive").to_table()
    return table.to_pylist()


def consume(c: StreamConsumer, rounds: int = 200) -> list[str]:
    statuses: list[str] = []
    for _ in range(rounds):
        statuses += [r.status for r in c.poll(flush_idle=True)]
        if c.pipeline.pending() == 0:
            return statuses
    raise AssertionError(f"{c.pipeline.pending()} records still pending")


# -- the pipeline file ---------------------------------------------------------


BAD_STREAM_FUNCTIONS = {
    "stream: nope\n    steps: [{write_dataset: {bucket: lake}}]": "unknown stream 'nope'",
    "stream: events\n    queue: q\n    steps: [{write_dataset: {bucket: lake}}]": (
        "give 'queue' or 'stream', not both"
    ),
    "steps: [{write_dataset: {bucket: lake}}]": "give 'queue' (messages) or 'stream'",
    "stream: events\n    handler: mod:fn": "stream functions take 'steps', not a 'handler'",
    "stream: events\n    steps: [dedup]": "last step of a stream function must be write_dataset",
    "stream: events\n    steps: [read_csv, {write_dataset: {bucket: lake}}]": "read_csv reads",
    "stream: events\n    steps: [{write_dataset: {bucket: lake}}, dedup]": "must be the last step",
    "stream: events\n    steps: [{write_dataset: {bucket: nope}}]": "unknown bucket 'nope'",
    "stream: events\n    steps: [{write_dataset: {bucket: lake, partition_by: [{week: x}]}}]": (
        "derived partition"
    ),
    "queue: q\n    steps: [read_csv, dedup, {write_parquet: {bucket: lake}}]": (
        "dedup works in stream functions only"
    ),
    "stream: events\n    on_success: {queue: q}\n    steps: [{write_dataset: {bucket: lake}}]": (
        "not supported for stream functions"
    ),
}


@pytest.mark.parametrize("body", sorted(BAD_STREAM_FUNCTIONS))
def test_stream_function_mistakes_are_reported_with_their_line(body: str) -> None:
    text = (
        "pipeline: x\nbuckets: {lake: ./lake}\nqueues: {q: {}}\nstreams: {events: {}}\n"
        f"functions:\n  f:\n    {body}\n"
    )
    with pytest.raises(ConfigError) as info:
        loads(text, source="p.yaml")
    problems = "\n".join(info.value.problems)
    assert BAD_STREAM_FUNCTIONS[body] in problems, problems
    assert "p.yaml:" in problems


def test_stream_settings_are_parsed() -> None:
    cfg = loads(
        "pipeline: x\nbuckets: {lake: ./l}\nstreams:\n  events: {retention: null, "
        "lease_timeout: 2s}\n  other:\n"
        "functions:\n  f: {stream: events, steps: [{write_dataset: {bucket: lake}}]}\n"
    )
    assert cfg.stream_config("events").retention is None
    assert cfg.stream_config("events").lease_timeout == 2.0
    assert cfg.stream_config("other").retention == 7 * 86_400
    assert cfg.functions["f"].queue is None


# -- buffering and flushing ----------------------------------------------------


def test_flushes_by_size_then_by_time_and_drains_when_idle(tmp_path: Path) -> None:
    p = make_pipeline(tmp_path, flush_records=10, flush_seconds="0.3s")
    p.append_events("events", [event(f"u{i}") for i in range(25)])
    c = StreamConsumer(p, "to-lake", worker_id="w")
    done = [r for _ in range(3) for r in c.poll()]
    assert [(r.from_seq, r.to_seq) for r in done] == [(1, 10), (11, 20)]
    assert c.poll() == []  # 5 buffered, not yet due
    assert p.pending() == 5
    time.sleep(0.35)
    [last] = c.poll()
    assert (last.from_seq, last.to_seq) == (21, 25)
    assert p.pending() == 0
    assert sorted(r["event_uuid"] for r in lake_rows(tmp_path)) == sorted(
        f"u{i}" for i in range(25)
    )
    # The ledger has one entry per flush, with its counts, as `run` summaries expect.
    assert p.function_status()["to-lake"] == {"done": 3}


def test_drain_flushes_a_partial_buffer_at_once(tmp_path: Path) -> None:
    p = make_pipeline(tmp_path, flush_records=1000, flush_seconds="1h")
    p.append_events("events", [event(f"u{i}") for i in range(7)])
    summary = Runtime(tmp_path / "sluiceway.yaml", workers=0, watch=False).drain(timeout=30)
    assert summary.done == 1 and summary.rows_in == 7 and summary.rows_out == 7
    assert len(lake_rows(tmp_path)) == 7


def test_hive_layout_and_deterministic_names(tmp_path: Path) -> None:
    p = make_pipeline(tmp_path, flush_records=4)
    p.append_events(
        "events",
        [
            event("a", "signup", 24),
            event("b", "login", 24),
            event("c", "signup", 25),
            event("d", "sign up/x=1", 24),
        ],
    )
    consume(StreamConsumer(p, "to-lake", worker_id="w"))
    keys = sorted(o.key for o in p.buckets["lake"].list())
    name = "part-0000000000000001-0000000000000004-to-lake.parquet"
    assert keys == [
        f"event_name=login/date=2026-11-24/{name}",
        f"event_name=sign%20up%2Fx%3D1/date=2026-11-24/{name}",
        f"event_name=signup/date=2026-11-24/{name}",
        f"event_name=signup/date=2026-11-25/{name}",
    ]
    rows = {r["event_uuid"]: r for r in lake_rows(tmp_path)}
    assert rows["d"]["event_name"] == "sign up/x=1"  # decoded again by the reader
    assert rows["a"]["date"] == "2026-11-24" and rows["a"]["payload"] == '{"n":1}'


# -- dedup -----------------------------------------------------------------------


def test_dedup_window_runs_from_first_arrival_and_expires(tmp_path: Path) -> None:
    p = make_pipeline(tmp_path, window="24h", flush_records=2)
    clock = Clock()
    stream = with_clock(p, clock)
    c = StreamConsumer(p, "to-lake", worker_id="w")

    def send(uuid: str, at_hours: float, **payload: Any) -> None:
        clock.t = 1_700_000_000.0 + at_hours * HOUR
        stream.append([event(uuid, **payload)])

    send("x", 0, v=1)
    send("y", 0.5, v=1)
    send("x", 1, v=2)  # duplicate, 1h after the first
    consume(c)
    send("x", 23.9, v=3)  # still within 24h of the first arrival: duplicate
    send("x", 24.5, v=4)  # the window ran out: a new first arrival
    consume(c)
    del c  # "restart": a new consumer, keys come from the state database
    gc.collect()
    send("x", 30, v=5)  # within 24h of the arrival at 24.5: duplicate
    send("y", 25, v=2)  # 24.5h after y's first arrival: kept
    consume(StreamConsumer(p, "to-lake", worker_id="w2"))
    got = sorted((r["event_uuid"], r["payload"]) for r in lake_rows(tmp_path))
    assert got == [("x", '{"v":1}'), ("x", '{"v":4}'), ("y", '{"v":1}'), ("y", '{"v":2}')]
    totals = p.stream_status()["events"]["consumers"]["to-lake"]["totals"]
    assert totals == {"records": 7, "duplicates": 3, "written": 4, "rejected": 0}


def test_expired_keys_are_purged_in_bounded_batches(tmp_path: Path) -> None:
    p = make_pipeline(tmp_path)
    store = DedupStore(p.db, "f:event_uuid")
    with p.db.transaction() as conn:
        store.commit(conn, {f"k{i}": float(i) for i in range(5_000)}, watermark=-1, purge_batch=1)
    with p.db.transaction() as conn:
        purged = store.commit(conn, {"new": 10_000.0}, watermark=4_000.0, purge_batch=300)
    assert purged == 300 and store.count() == 5_000 - 300 + 1
    assert store.expiries(["k299", "k300"]) == {"k300": 300.0}  # oldest went first
    with p.db.transaction() as conn:  # only what expired at or before the given time
        assert store.purge(conn, 1_000.0, 10_000) == 701
    assert store.expiries(["k4999", "new", "missing"]) == {"k4999": 4999.0, "new": 10_000.0}


def test_dedup_lookups_and_purges_use_indexes(tmp_path: Path) -> None:
    p = make_pipeline(tmp_path)
    plans = [
        " ".join(
            str(r[-1])
            for r in p.db.conn.execute(
                "EXPLAIN QUERY PLAN " + sql, ("s", *([1] * (sql.count("?") - 1)))
            )
        )
        for sql in (
            "SELECT id, key FROM dedup_log WHERE scope = ? AND id > ? ORDER BY id",
            "DELETE FROM dedup_log WHERE id IN (SELECT id FROM dedup_log WHERE scope = ?"
            " ORDER BY id LIMIT ?) AND expires_at <= ?",
        )
    ]
    assert all("dedup_log_scope" in plan and "TEMP B-TREE" not in plan for plan in plans), plans


def test_dedup_store_is_exact_across_processes_and_hash_collisions(tmp_path: Path) -> None:
    """Every hit of the in-memory index is confirmed against the stored key, keys
    committed by another connection are found, and a key stored again after it
    expired gives its newest expiry."""
    p = make_pipeline(tmp_path)
    store = DedupStore(p.db, "f:event_uuid")
    with p.db.transaction() as conn:
        store.commit(conn, {f"k{i}": 100.0 + i for i in range(3_000)}, watermark=0, purge_batch=1)
    assert store.expiries(["k0", "k2999", "nope"]) == {"k0": 100.0, "k2999": 3099.0}
    other = Pipeline.from_file(tmp_path / "sluiceway.yaml")  # another process's view
    theirs = DedupStore(other.db, store.scope)
    assert theirs.expiries(["k1"]) == {"k1": 101.0}
    with other.db.transaction() as conn:
        theirs.commit(conn, {"k1": 9_000.0, "late": 5.0}, watermark=0, purge_batch=1)
    assert store.expiries(["k1", "late"]) == {"k1": 9_000.0, "late": 5.0}
    # A flush tells its store once the commit went through; the index takes the
    # keys as they are, unless other rows came in between: then it reads them.
    with other.db.transaction() as conn:
        theirs.commit(conn, {"theirs": 7.0}, watermark=0, purge_batch=1)
    with p.db.transaction() as conn:
        store.commit(conn, {"mine": 8.0}, watermark=0, purge_batch=1)
    store.committed()
    assert store.expiries(["theirs", "mine"]) == {"theirs": 7.0, "mine": 8.0}
    with p.db.transaction() as conn:
        store.commit(conn, {"next": 9.0}, watermark=0, purge_batch=1)
    store.committed()
    assert store.expiries(["next", "mine"]) == {"next": 9.0, "mine": 8.0}
    assert DedupStore(p.db, "g:event_uuid").expiries(["k1"]) == {}  # scopes are apart
    # Every key hashing alike: the index offers every entry, the stored key decides.
    with mock.patch("sluiceway.steps.dedup.hash", lambda k: 42, create=True):
        from sluiceway.steps import dedup as module

        module._INDEXES.clear()
        assert store.expiries(["k7", "k8", "nope"]) == {"k7": 107.0, "k8": 108.0}


def test_dedup_index_keeps_up_as_the_log_grows_and_is_purged(tmp_path: Path) -> None:
    p = make_pipeline(tmp_path)
    store = DedupStore(p.db, "f:event_uuid")
    for b in range(12):  # grows the index several times, purging the oldest on the way
        with p.db.transaction() as conn:
            keys = {f"b{b}k{i}": float(b) for i in range(2_000)}
            store.commit(conn, keys, watermark=b - 3.0, purge_batch=4_000)
        assert len(store.expiries(keys)) == 2_000
    assert store.count() == 3 * 2_000  # batches 9..11 are left
    assert store.expiries(["b0k0", "b8k1", "b9k1"]) == {"b9k1": 9.0}


def test_old_dedup_keys_move_into_the_log(tmp_path: Path) -> None:
    import sqlite3

    db = tmp_path / "state.db"
    conn = sqlite3.connect(db)
    conn.execute("CREATE TABLE dedup_keys (scope TEXT, key TEXT, expires_at REAL)")
    conn.executemany("INSERT INTO dedup_keys VALUES ('s', ?, ?)", [("b", 2.0), ("a", 1.0)])
    conn.commit()
    conn.close()
    from sluiceway.state import StateDB

    state = StateDB(db)
    assert DedupStore(state, "s").expiries(["a", "b"]) == {"a": 1.0, "b": 2.0}
    assert [r[0] for r in state.conn.execute("SELECT key FROM dedup_log ORDER BY id")] == ["a", "b"]


def reference(events: list[tuple[str, float]], window: float) -> list[tuple[str, int]]:
    """The dedup rule, stated plainly: (key, position) of every row that survives."""
    expires: dict[str, float] = {}
    out = []
    for i, (key, at) in enumerate(events):
        if key in expires and expires[key] > at:
            continue
        expires[key] = at + window
        out.append((key, i))
    return out


@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(
    keys=st.lists(st.sampled_from("abcdefgh"), min_size=1, max_size=40),
    gaps=st.lists(st.sampled_from([0.0, 0.2, 0.6, 1.5]), min_size=40, max_size=40),
    flush_records=st.integers(1, 12),
    restart_every=st.integers(1, 5),
    crash_at=st.sets(st.integers(1, 12), max_size=3),
)
def test_dedup_output_is_exactly_the_unique_events(
    keys: list[str], gaps: list[float], flush_records: int, restart_every: int, crash_at: set[int]
) -> None:
    """Random streams with duplicates, random flush sizes, restarts and crashes between
    a flush's files and its commit: the dataset holds exactly the events the rule
    keeps (window 1h, gaps in hours), each once."""
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        p = make_pipeline(root, window="1h", flush_records=flush_records, fmt="jsonl")
        clock = Clock()
        stream = with_clock(p, clock)
        timeline: list[tuple[str, float]] = []
        for i, key in enumerate(keys):
            clock.t += gaps[i] * HOUR
            timeline.append((key, clock.t))
            stream.append([event(key, n=i)])
        flushes = crashed = 0

        def point(name: str) -> None:
            nonlocal flushes
            if name == "after_commit":
                flushes += 1
                if flushes in crash_at:
                    raise Crash()

        c: StreamConsumer | None = None
        with mock.patch.object(faults, "point", point):
            for round_ in range(500):
                if c is None or round_ % restart_every == 0:
                    if c is not None:
                        c.close()
                    c = StreamConsumer(p, "to-lake", worker_id=f"w{round_}")
                try:
                    c.poll(flush_idle=True)
                except Crash:
                    c = None  # "killed": no close, its lease dies with it
                    gc.collect()
                    crashed += 1
                if p.pending() == 0:
                    break
        assert p.pending() == 0
        rows = lake_rows(root, "jsonl")
        got = sorted((r["event_uuid"], r["payload"]["n"]) for r in rows)
        assert got == sorted(reference(timeline, HOUR))
        replays = p.db.conn.execute(
            "SELECT COUNT(*) FROM ledger WHERE json_extract(info, '$.replay')"
        ).fetchone()[0]
        assert (replays > 0) == (crashed > 0)
        p.close()


# -- leases and crash replays ------------------------------------------------------


def test_one_consumer_at_a_time_and_takeover(tmp_path: Path) -> None:
    p = make_pipeline(tmp_path, flush_records=5, lease="0.5s")
    p.append_events("events", [event(f"u{i}") for i in range(12)])
    first = StreamConsumer(p, "to-lake", worker_id="a")
    second = StreamConsumer(p, "to-lake", worker_id="b")
    assert [r.to_seq for r in first.poll()] == [5]
    assert second.poll() == []  # the lease is first's
    first.close()  # a clean stop hands over at once
    assert [r.to_seq for r in second.poll()] == [10]
    # second stalls past its lease; first takes over and commits the rest...
    time.sleep(0.6)
    assert [r.to_seq for r in first.poll(flush_idle=True)] == [12]
    # ...and second, waking up sure of its lease with records in hand, is fenced
    # off by the check inside the flush's own transaction: nothing is written twice.
    chunk = second.stream.read_events(11, 2)
    assert chunk is not None
    second.buffer, second.buffered = [chunk], chunk.count
    second.next_seq = 13
    second.lease.expires_at = time.time() + 100
    assert second.poll(flush_idle=True) == []
    assert p.stream("events").checkpoint("to-lake") == 12
    assert sorted(r["event_uuid"] for r in lake_rows(tmp_path)) == sorted(
        f"u{i}" for i in range(12)
    )


def test_a_crash_between_files_and_commit_is_replayed_exactly(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    p = make_pipeline(tmp_path, flush_records=6)
    p.append_events(
        "events", [event(f"u{i % 5}", "signup" if i % 2 else "login") for i in range(6)]
    )

    def crash(name: str) -> None:
        if name == "after_commit":
            raise Crash()

    monkeypatch.setattr(faults, "point", crash)
    c = StreamConsumer(p, "to-lake", worker_id="doomed")
    with pytest.raises(Crash):
        c.poll()
    monkeypatch.undo()
    written = {o.key: p.buckets["lake"].read_bytes(o.key) for o in p.buckets["lake"].list()}
    assert written, "files were published before the crash"
    assert p.stream("events").checkpoint("to-lake") == 0
    assert p.stream_status()["events"]["consumers"]["to-lake"]["unfinished_flush"] == [1, 6]
    del c  # the process is gone: its lease is dead
    gc.collect()
    p.append_events("events", [event("u0"), event("late", "login")])  # more arrive meanwhile
    results = consume(StreamConsumer(p, "to-lake", worker_id="next"))
    assert results == ["done", "done"]
    after = {o.key: p.buckets["lake"].read_bytes(o.key) for o in p.buckets["lake"].list()}
    for key, data in written.items():  # the replay rewrote the same objects, same bytes
        assert after[key] == data
    ids = sorted(r["event_uuid"] for r in lake_rows(tmp_path))
    assert ids == ["late", "u0", "u1", "u2", "u3", "u4"]
    replayed = p.ledger.get("to-lake|stream:events@1-6")
    assert replayed is not None and replayed.info["replay"] is True


def test_worker_runs_queue_and_stream_functions_side_by_side(
    tmp_path: Path, write_pipeline: Callable[..., Path]
) -> None:
    from .conftest import BRONZE_TO_STAGING
    from .helpers import make_csv

    text = BRONZE_TO_STAGING.replace("topics:", "streams:\n  events: {}\ntopics:") + (
        "  to-lake:\n    stream: events\n    steps:\n"
        "      - write_dataset: {bucket: staging, prefix: events, flush_records: 3}\n"
    )
    path = write_pipeline(text)
    p = Pipeline.from_file(path)
    make_csv(tmp_path / "a.csv", 5)
    p.put(tmp_path / "a.csv", "bronze", "a.csv")
    p.append_events("events", [event(f"u{i}") for i in range(4)])
    draining = threading.Event()
    draining.set()
    worker = Worker(p, drain=draining)
    statuses: list[str] = []
    for _ in range(50):
        statuses += [o.status for o in worker.poll(wait=0.01)]
        if p.pending() == 0:
            break
    worker.close()
    assert statuses.count("done") == 3  # one CSV, two flushes (3 + 1 events)
    assert (tmp_path / "staging" / "a.parquet").exists()
    assert len(list((tmp_path / "staging" / "events").glob("part-*.parquet"))) == 2


def test_retention_trims_only_what_every_consumer_committed(tmp_path: Path) -> None:
    (tmp_path / "sluiceway.yaml").write_text(
        textwrap.dedent(
            """
            pipeline: retention
            buckets: {lake: ./lake}
            streams:
              events: {retention: 0s}
            functions:
              fast:
                stream: events
                steps: [{write_dataset: {bucket: lake, prefix: fast, flush_records: 4}}]
              slow:
                stream: events
                steps: [{write_dataset: {bucket: lake, prefix: slow, flush_records: 100}}]
            """
        )
    )
    p = Pipeline.from_file(tmp_path / "sluiceway.yaml")
    p.append_events("events", [event(f"u{i}") for i in range(10)])
    fast = StreamConsumer(p, "fast", worker_id="f")
    slow = StreamConsumer(p, "slow", worker_id="s")
    for _ in range(3):
        fast.poll()
    assert p.stream("events").checkpoint("fast") == 8
    assert p.stream("events").length() == 10  # slow has committed nothing yet
    slow.poll(flush_idle=True)
    fast.poll(flush_idle=True)
    assert p.stream("events").length() == 0 and p.stream("events").last_seq() == 10
    assert p.pending() == 0


@settings(max_examples=300, deadline=None)
@given(
    rows=st.lists(
        st.tuples(st.sampled_from(["a", "b", "c", "d", "e", None]), st.floats(0, 10)),
        max_size=30,
    ),
    kept=st.dictionaries(st.sampled_from(["a", "b", "c"]), st.floats(0, 12), max_size=3),
    stored=st.dictionaries(st.sampled_from(["b", "c", "d"]), st.floats(0, 12), max_size=3),
    window=st.sampled_from([0.5, 3.0, 100.0]),
)
def test_vectorised_dedup_decides_as_the_exact_rule(
    rows: list[tuple[str | None, float]],
    kept: dict[str, float],
    stored: dict[str, float],
    window: float,
) -> None:
    """Rows kept without looking at them one by one (keys seen once, never before) and
    the rest through the rule: the same mask and the same windows as the rule alone."""
    import numpy as np
    import pyarrow as pa

    from sluiceway.steps.dedup import decide, decide_exact

    rows.sort(key=lambda r: r[1])  # arrival times grow along the stream
    keys = [k for k, _ in rows]
    times = np.array([t for _, t in rows], np.float64)
    exact_kept, fast_kept = dict(kept), dict(kept)
    want = decide_exact(keys, times.tolist(), exact_kept, stored, window)
    got = decide(pa.array(keys, pa.string()), keys, times, fast_kept, stored, window)
    assert got.tolist() == want and fast_kept == exact_kept


@settings(max_examples=100, deadline=None)
@given(
    keys=st.lists(
        st.text(st.characters(codec="utf-8", exclude_categories=["Cs"]), max_size=8)
        | st.sampled_from(['q"uote', "back\\slash", "nul\x00x", "\\u0000", "é\n\t"]),
        unique=True,
        max_size=40,
    ),
    spread=st.integers(1, 3),
)
def test_dedup_keys_are_stored_exactly(keys: list[str], spread: int) -> None:
    """Keys go into the log as JSON arrays (one per expiry) or row by row: either way
    each key comes back exactly, with its expiry, under the ids committed() assumed."""
    from sluiceway.state import StateDB

    with tempfile.TemporaryDirectory() as tmp:
        db = StateDB(Path(tmp) / "state.db")
        store = DedupStore(db, "f:k")
        wanted = {k: 100.0 + i % spread for i, k in enumerate(keys)}
        with db.transaction() as conn:
            store.commit(conn, wanted, watermark=0.0, purge_batch=10)
        store.committed()
        assert store.expiries(keys) == wanted
        rows = db.conn.execute("SELECT id, key FROM dedup_log ORDER BY id").fetchall()
        fresh = DedupStore(db, "f:k")  # reads the log back by id, as another process would
        assert fresh.expiries(keys) == wanted and [r[1] for r in rows] == sorted(
            keys, key=lambda k: wanted[k]
        )
        db.close()
