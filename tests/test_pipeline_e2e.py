"""The foundation scenario end to end: CSV in bronze → Parquet in staging."""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from sluiceway import Pipeline, Runtime, Worker
from sluiceway.events import Event
from sluiceway.ledger import Claim
from sluiceway.queues.base import OutgoingMessage

from .conftest import BRONZE_TO_STAGING
from .helpers import make_csv, parquet_rows, wait_until


def drain_inline(p: Pipeline, rounds: int = 200) -> list[str]:
    """Run a worker in this process until the queues are empty (bounded)."""
    worker = Worker(p)
    statuses: list[str] = []
    for _ in range(rounds):
        if p.pending() == 0:
            return statuses
        statuses += [o.status for o in worker.poll(wait=0.05)]
    raise AssertionError(f"still {p.pending()} pending after {rounds} rounds")


def test_put_converts_every_row(pipeline: Pipeline, tmp_path: Path) -> None:
    records = make_csv(tmp_path / "in.csv", 500)
    event = pipeline.put(tmp_path / "in.csv", "bronze", "2026/11/customers.csv")
    assert event is not None
    assert pipeline.router.targets_for(event) == [("new-csv", "landed")]
    assert drain_inline(pipeline) == ["done"]
    out = tmp_path / "staging" / "2026" / "11" / "customers.parquet"
    assert parquet_rows(out) == records
    entry = pipeline.ledger.get(f"csv-to-parquet|{event.input_identity}")
    assert entry is not None and entry.status == "done"
    assert entry.info["stats"] == {"rows_in": 500, "rows_out": 500, "rows_written": 500}
    assert entry.info["outputs"] == [
        {
            "bucket": "staging",
            "key": "2026/11/customers.parquet",
            "rows": 500,
            "bytes": out.stat().st_size,
        }
    ]
    # The output's own "Object Created" event was raised (no rule matches it).
    assert [o.key for o in pipeline.buckets["staging"].list()] == ["2026/11/customers.parquet"]


def test_only_repetitive_columns_are_dictionary_encoded(pipeline: Pipeline, tmp_path: Path) -> None:
    records = make_csv(tmp_path / "in.csv", 2000, seed=4)
    pipeline.put(tmp_path / "in.csv", "bronze", "in.csv")
    assert drain_inline(pipeline) == ["done"]
    out = tmp_path / "staging" / "in.parquet"
    meta = pq.ParquetFile(out).metadata
    encoded = {
        meta.schema.column(i).name: "RLE_DICTIONARY" in meta.row_group(0).column(i).encodings
        for i in range(meta.num_columns)
    }
    # id and amount are (nearly) all distinct: a dictionary would only cost time and bytes.
    assert encoded == {"id": False, "name": True, "country": True, "amount": False}
    assert parquet_rows(out) == records


def test_non_matching_objects_raise_no_messages(pipeline: Pipeline, tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("hello")
    event = pipeline.put(tmp_path / "notes.txt", "bronze", "notes.txt")
    assert event is not None and pipeline.router.targets_for(event) == []
    assert pipeline.pending() == 0


def test_large_file_streams_in_many_batches(
    write_pipeline: Callable[..., Path], tmp_path: Path
) -> None:
    text = BRONZE_TO_STAGING.replace("- read_csv\n", "- read_csv: {block_size: 4096}\n")
    text = text.replace("{bucket: staging}", "{bucket: staging, row_group_size: 1000}")
    p = Pipeline.from_file(write_pipeline(text))
    records = make_csv(tmp_path / "big.csv", 20_000, seed=3)
    p.put(tmp_path / "big.csv", "bronze", "big.csv")
    drain_inline(p)
    out = tmp_path / "staging" / "big.parquet"
    # Read in blocks of a few dozen rows, written in row groups of exactly
    # row_group_size rows (not one per block), the file never held whole.
    meta = pq.ParquetFile(out).metadata
    sizes = [meta.row_group(i).num_rows for i in range(meta.num_row_groups)]
    assert sizes == [1000] * 20
    assert parquet_rows(out) == records


def test_same_version_put_twice_is_processed_once(pipeline: Pipeline, tmp_path: Path) -> None:
    make_csv(tmp_path / "a.csv", 10)
    assert pipeline.put(tmp_path / "a.csv", "bronze", "a.csv") is not None
    assert pipeline.put(tmp_path / "a.csv", "bronze", "a.csv") is None  # same content, same ETag
    assert drain_inline(pipeline) == ["done"]
    # A new version (changed content) is a new input and is processed again.
    records = make_csv(tmp_path / "a.csv", 12, seed=9)
    assert pipeline.put(tmp_path / "a.csv", "bronze", "a.csv") is not None
    assert drain_inline(pipeline) == ["done"]
    assert parquet_rows(tmp_path / "staging" / "a.parquet") == records
    assert pipeline.function_status()["csv-to-parquet"] == {"done": 1, "superseded": 1}


def test_redelivery_after_commit_before_ack_is_only_acked(
    pipeline: Pipeline, tmp_path: Path
) -> None:
    make_csv(tmp_path / "a.csv", 10)
    pipeline.put(tmp_path / "a.csv", "bronze", "a.csv")
    queue = pipeline.broker.queue("to-parquet")
    [msg] = queue.receive(1)
    worker = Worker(pipeline)
    # Do the work as a worker would, then "crash" before the ack.
    real_ack = queue.ack
    queue.ack = lambda messages: 0  # type: ignore[method-assign]
    try:
        assert worker.process("csv-to-parquet", queue, msg).status == "done"
    finally:
        queue.ack = real_ack  # type: ignore[method-assign]
    out = tmp_path / "staging" / "a.parquet"
    first_bytes = out.read_bytes()
    queue.change_visibility(msg, 0)  # the visibility timeout runs out
    assert drain_inline(pipeline) == ["duplicate"]
    assert out.read_bytes() == first_bytes
    assert pipeline.pending() == 0


def test_rerun_rewrites_identical_output(pipeline: Pipeline, tmp_path: Path) -> None:
    make_csv(tmp_path / "a.csv", 100)
    event = pipeline.put(tmp_path / "a.csv", "bronze", "a.csv")
    assert event is not None
    drain_inline(pipeline)
    out = tmp_path / "staging" / "a.parquet"
    first = out.read_bytes()
    # Forget it was done and deliver the same event again: same bytes, one file.
    pipeline.db.conn.execute("DELETE FROM ledger")
    pipeline.broker.queue("to-parquet").send(event.to_json(), id="again")
    drain_inline(pipeline)
    assert out.read_bytes() == first
    assert [o.key for o in pipeline.buckets["staging"].list()] == ["a.parquet"]


def test_busy_claim_is_retried_later_not_failed(pipeline: Pipeline, tmp_path: Path) -> None:
    make_csv(tmp_path / "a.csv", 5)
    event = pipeline.put(tmp_path / "a.csv", "bronze", "a.csv")
    assert event is not None
    key = f"csv-to-parquet|{event.input_identity}"
    assert (
        pipeline.ledger.claim(key, function="csv-to-parquet", owner="other", ttl=60)
        is Claim.ACQUIRED
    )
    [outcome] = Worker(pipeline).poll()
    assert outcome.status == "busy"
    assert pipeline.broker.queue("to-parquet").counts().in_flight == 1


BAD_INPUTS = {
    "not_csv.csv": (b"a,b\n1,2\n3,4,5\n", "line 3"),
    "empty.csv": (b"", "empty"),
    "header_only.csv": (b"a,b,c\n", "header"),
    "latin1.csv": ("name\nJürgen\n".encode("latin-1"), "UTF-8"),
}


def test_bad_inputs_end_in_the_dlq_and_good_ones_flow(pipeline: Pipeline, tmp_path: Path) -> None:
    for name, (data, _) in BAD_INPUTS.items():
        (tmp_path / name).write_bytes(data)
        pipeline.put(tmp_path / name, "bronze", name)
    records = make_csv(tmp_path / "good.csv", 50)
    pipeline.put(tmp_path / "good.csv", "bronze", "good.csv")
    statuses = drain_inline(pipeline, rounds=2000)
    assert statuses.count("done") == 1
    assert statuses.count("dead") == len(BAD_INPUTS)
    assert statuses.count("retry") == 2 * len(BAD_INPUTS)  # 3 receives each
    assert parquet_rows(tmp_path / "staging" / "good.parquet") == records
    dead = pipeline.broker.queue("to-parquet-dlq").peek()
    by_key = {
        m.attributes and __import__("json").loads(m.body)["detail"]["object"]["key"]: m
        for m in dead
    }
    for name, (_, expected) in BAD_INPUTS.items():
        failure = by_key[name].failure
        assert failure is not None
        assert f"bronze/{name}" in failure["message"], failure
        assert expected.lower() in failure["message"].lower(), failure
        assert failure["attempt"] == 3 and failure["traceback"]
        assert by_key[name].receive_count == 3
    status = pipeline.status()
    assert status["queues"]["to-parquet"]["dead_lettered"] == len(BAD_INPUTS)
    assert pipeline.function_status()["csv-to-parquet"] == {"done": 1, "failed": len(BAD_INPUTS)}


def test_error_deep_in_a_large_file_names_its_line_and_leaves_nothing(
    write_pipeline: Callable[..., Path], tmp_path: Path
) -> None:
    """Read fast and written row group by row group in the background, then a bad
    row: the file still fails with its exact line, and no output or aside file stays."""
    text = BRONZE_TO_STAGING.replace("- read_csv\n", "- read_csv: {block_size: 4096}\n")
    text = text.replace("{bucket: staging}", "{bucket: staging, row_group_size: 1000}")
    p = Pipeline.from_file(write_pipeline(text))
    make_csv(tmp_path / "big.csv", 20_000, seed=5)
    data = (tmp_path / "big.csv").read_bytes()
    at = data.index(b"\n15000,") + 1
    (tmp_path / "big.csv").write_bytes(data[:at] + b"oops\n" + data[at:])
    line = data.count(b"\n", 0, at) + 1
    p.put(tmp_path / "big.csv", "bronze", "big.csv")
    assert drain_inline(p, rounds=2000).count("dead") == 1
    [dead] = p.broker.queue("to-parquet-dlq").peek()
    assert dead.failure is not None
    assert f"bronze/big.csv:line {line}: expected 4 fields, got 1" in dead.failure["message"]
    assert list((tmp_path / "staging").rglob("*.parquet")) == []
    assert list((tmp_path / "staging" / ".sluiceway-tmp").glob("*")) == []


def test_deleted_input_is_skipped_not_retried(pipeline: Pipeline, tmp_path: Path) -> None:
    make_csv(tmp_path / "a.csv", 5)
    pipeline.put(tmp_path / "a.csv", "bronze", "a.csv")
    pipeline.buckets["bronze"].delete("a.csv")
    assert drain_inline(pipeline) == ["skipped"]
    assert pipeline.function_status()["csv-to-parquet"] == {"skipped": 1}


def test_files_present_before_start_are_reconciled_once(
    write_pipeline: Callable[..., Path], tmp_path: Path
) -> None:
    path = write_pipeline()
    for i in range(3):
        make_csv(tmp_path / "bronze" / f"early{i}.csv", 10, seed=i)
    summary = Runtime(path, workers=0, watch=False).drain(timeout=60)
    assert summary.done == 3 and summary.rows_out == 30
    # A second start finds nothing new.
    summary = Runtime(path, workers=0, watch=False).drain(timeout=60)
    assert summary.done == 0
    assert sorted(o.key for o in Pipeline.from_file(path).buckets["staging"].list()) == [
        "early0.parquet",
        "early1.parquet",
        "early2.parquet",
    ]


def test_files_recorded_under_md5_etags_are_not_processed_again(
    write_pipeline: Callable[..., Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Local ETags were MD5s before they were xxh3: a state database from then
    still knows its files by their MD5s, so an upgrade reprocesses none of them."""
    import hashlib

    from sluiceway.buckets import local

    path = write_pipeline()
    make_csv(tmp_path / "bronze" / "old.csv", 10, seed=1)
    with monkeypatch.context() as old_version:
        old_version.setattr(
            local, "file_etag", lambda p: hashlib.md5(Path(p).read_bytes()).hexdigest()
        )
        assert Runtime(path, workers=0, watch=False).drain(timeout=60).done == 1
    make_csv(tmp_path / "bronze" / "new.csv", 10, seed=2)
    summary = Runtime(path, workers=0, watch=False).drain(timeout=60)
    assert summary.done == 1  # only the new file
    bronze = Pipeline.from_file(path).buckets["bronze"]
    etags = {o.key: o.etag for o in bronze.list()}
    assert (
        etags["old.csv"] == hashlib.md5((tmp_path / "bronze" / "old.csv").read_bytes()).hexdigest()
    )
    assert etags["new.csv"] == local.file_etag(tmp_path / "bronze" / "new.csv")


def test_watcher_and_worker_processes_pick_up_dropped_files(
    write_pipeline: Callable[..., Path], tmp_path: Path
) -> None:
    path = write_pipeline()
    rt = Runtime(path, workers=2, watch=True, settle=0.1, grace=10)
    thread = threading.Thread(target=rt.run_forever, daemon=True)
    thread.start()
    try:
        wait_until(lambda: len(rt._procs) == 2, 30, "the runtime to start")
        p = Pipeline.from_file(path)
        expected = {}
        for i in range(5):
            expected[i] = make_csv(tmp_path / "drop" / f"f{i}.csv", 200, seed=i)
            target = tmp_path / "bronze" / "incoming" / f"f{i}.csv"
            target.parent.mkdir(parents=True, exist_ok=True)
            data = (tmp_path / "drop" / f"f{i}.csv").read_bytes()
            target.write_bytes(data)
        wait_until(
            lambda: p.function_status()["csv-to-parquet"].get("done", 0) == 5, 60, "5 files done"
        )
        for i, records in expected.items():
            assert parquet_rows(tmp_path / "staging" / "incoming" / f"f{i}.parquet") == records
        # And `put` while running goes through the same path.
        make_csv(tmp_path / "late.csv", 7)
        p.put(tmp_path / "late.csv", "bronze", "late.csv")
        wait_until(lambda: (tmp_path / "staging" / "late.parquet").exists(), 60, "late.parquet")
    finally:
        rt._stop.set()
        thread.join(30)
    assert not thread.is_alive()
    assert all(not proc.is_alive() for proc in rt._procs)
    assert Pipeline.from_file(path).function_status()["csv-to-parquet"] == {"done": 6}


def test_partial_files_and_hidden_files_are_not_inputs(pipeline: Pipeline, tmp_path: Path) -> None:
    root = pipeline.buckets["bronze"].root  # type: ignore[attr-defined]
    (root / "x.csv.part").write_text("a\n1\n")
    (root / ".hidden.csv").write_text("a\n1\n")
    assert pipeline.reconcile() == []


@pytest.mark.parametrize("workers", [0, 2])
def test_drain_with_inline_and_process_workers(
    write_pipeline: Callable[..., Path], tmp_path: Path, workers: int
) -> None:
    path = write_pipeline()
    p = Pipeline.from_file(path)
    for i in range(6):
        make_csv(tmp_path / f"in{i}.csv", 30, seed=i)
        p.put(tmp_path / f"in{i}.csv", "bronze", f"in{i}.csv")
    summary = Runtime(path, workers=workers, watch=False).drain(timeout=120)
    assert summary.done == 6 and summary.rows_in == 180 and summary.rows_out == 180
    assert len(summary.outputs) == 6
    assert p.pending() == 0


def test_objects_created_raises_each_version_once_across_batches(pipeline: Pipeline) -> None:
    """More offers than one batch, each offered twice (the watcher and the
    reconcile racing): one event and one message per version."""
    from sluiceway.pipeline import RAISE_BATCH

    bronze = pipeline.bucket("bronze")
    count = RAISE_BATCH * 2 + 7
    infos = [bronze.put_bytes(f"many/{i}.csv", b"id\n%d\n" % i) for i in range(count)]
    offers = [("bronze", info) for info in infos]
    raised = pipeline.objects_created(offers + offers[::-1])
    assert sorted(e.key for e in raised) == sorted(info.key for info in infos)
    assert pipeline.objects_created(offers) == []
    assert pipeline.reconcile() == []
    assert pipeline.pending() == count


def test_a_batch_that_fails_records_none_of_its_versions(pipeline: Pipeline) -> None:
    """The batch's versions and messages share one transaction: an error while
    queueing (here: a target with no queue) leaves none of them recorded."""
    from dataclasses import replace

    bronze = pipeline.bucket("bronze")
    infos = [bronze.put_bytes(f"fail/{i}.csv", b"id\n%d\n" % i) for i in range(3)]
    prepared = [pipeline.prepare_event("bronze", info) for info in infos]
    assert all(p is not None for p in prepared)
    _, msg = prepared[2].plan[0]  # type: ignore[union-attr]
    broken = replace(prepared[2], plan=[("no-such-queue", msg)])  # type: ignore[type-var]
    with pytest.raises(KeyError):
        pipeline.raise_events([*prepared[:2], broken])  # type: ignore[list-item]
    assert [pipeline.ledger.has_seen("bronze", i.key, i.etag) for i in infos] == [False] * 3
    assert pipeline.pending() == 0
    assert len(pipeline.reconcile()) == 3


def test_objects_in_buckets_no_rule_routes_are_recorded_without_matching(
    pipeline: Pipeline, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A worker announces every output; where no rule can route from its bucket
    (staging here), the version is still recorded once, but no rule is tried."""
    make_csv(tmp_path / "in.csv", 10, seed=1)
    pipeline.put(tmp_path / "in.csv", "bronze", "in.csv")
    matched: list[str] = []
    real_plan = pipeline.router.plan

    def counting_plan(event: Event) -> list[tuple[str, OutgoingMessage]]:
        matched.append(event.bucket)
        return real_plan(event)

    monkeypatch.setattr(pipeline.router, "plan", counting_plan)
    assert [o.status for o in Worker(pipeline).poll()] == ["done"]
    info = pipeline.bucket("staging").head("in.parquet")
    assert pipeline.ledger.has_seen("staging", info.key, info.etag)
    assert matched == []
    assert pipeline.objects_created([("staging", info)]) == []  # recorded: offered again, no event
    assert pipeline.pending() == 0
    raised = pipeline.object_created(
        "bronze", pipeline.bucket("bronze").put_bytes("b.csv", b"a\n1\n")
    )
    assert raised is not None and matched == ["bronze"] and pipeline.pending() == 1
