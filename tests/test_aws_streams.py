"""Stream functions on Lambda: Kinesis batches → dedup in DynamoDB → a dataset on S3, exactly once.

The example's pipeline file, unchanged, runs in the Lambda handler against
moto (S3, DynamoDB, SQS). Batches are shaped as Lambda's Kinesis event
source mapping delivers them; the tests play its retries: the same batch
again after the invocation died (before or after its files were written),
a bisected half, a duplicate from another shard, and a record that is no
event. The dataset is read back and every event must be there exactly once.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from sluiceway.aws.handler import LambdaApp
from sluiceway.aws.streams import StreamState

from .aws_backend import client, dynamodb_url, fresh_prefix, kinesis_record

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "events-to-lake" / "sluiceway.yaml"
STREAM_ARN = "arn:aws:kinesis:us-east-1:123456789012:stream/lake-events"
BASE_SEQ = 49_590_000_000_000_000_000_000_000_000_000_000_000_000_000_000_000_000_000
T0 = 1_764_000_000.0  # arrival times: the stream's, not the clock


def event(uuid: str, name: str = "signup", day: str = "2026-11-24") -> dict[str, Any]:
    return {
        "event_uuid": uuid,
        "event_name": name,
        "created_at": f"{day}T10:00:00Z",
        "payload": {"u": uuid},
    }


def record(n: int, data: Any, *, shard: int = 0, at: float | None = None) -> dict[str, Any]:
    """Record ``n`` of a shard as the ESM hands it to Lambda."""
    arrival = T0 + n if at is None else at
    return kinesis_record(BASE_SEQ + n, data, shard=shard, arrival=arrival, stream_arn=STREAM_ARN)


def batch(*records: dict[str, Any]) -> dict[str, Any]:
    return {"Records": list(records)}


@pytest.fixture
def lake(aws: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """moto with the lake bucket and a DLQ, and the handler's environment for the example."""
    pytest.importorskip("boto3", reason="boto3 (pip install 'sluiceway[aws]')")
    moto = aws
    monkeypatch.delenv("SLUICEWAY_PROFILE", raising=False)
    monkeypatch.setenv("AWS_ENDPOINT_URL_SQS", moto)  # the handler's own SQS client (the DLQ)
    prefix = fresh_prefix("lk")
    s3, sqs = client("s3", moto), client("sqs", moto)
    bucket = f"{prefix}lake"
    s3.create_bucket(Bucket=bucket)
    dlq = sqs.create_queue(QueueName=f"{prefix}to-lake-failed")["QueueUrl"]
    opts = f"endpoint_url={moto}&region=us-east-1&path_style=true"
    env = {
        "SLUICEWAY_PIPELINE": str(EXAMPLE),
        "SLUICEWAY_FUNCTION": "to-lake",
        "SLUICEWAY_BUCKETS": json.dumps({"lake": f"s3://{bucket}?{opts}"}),
        "SLUICEWAY_LEDGER": dynamodb_url(moto, prefix),
        "SLUICEWAY_QUEUE_PREFIX": "lake-",
        "SLUICEWAY_DLQ_URL": dlq,
        "SLUICEWAY_STATE_DIR": str(tmp_path / "state"),
    }
    apps: list[LambdaApp] = []

    def app() -> LambdaApp:
        """A fresh execution environment (a cold start), as after a crash."""
        a = LambdaApp.from_env(env)
        apps.append(a)
        return a

    yield {
        "env": env,
        "app": app,
        "s3": s3,
        "sqs": sqs,
        "ddb": client("dynamodb", moto),
        "bucket": bucket,
        "dlq": dlq,
    }
    for a in apps:
        a.pipeline.close()


def objects(lake: dict[str, Any]) -> dict[str, str]:
    """Every object of the lake bucket → its ETag."""
    out = {}
    for page in lake["s3"].get_paginator("list_objects_v2").paginate(Bucket=lake["bucket"]):
        out.update({o["Key"]: o["ETag"] for o in page.get("Contents", [])})
    return out


def dataset(lake: dict[str, Any]) -> Counter[str]:
    """event_uuid → how often it is in the dataset (read back with PyArrow)."""
    import pyarrow.parquet as pq

    seen: Counter[str] = Counter()
    for key in objects(lake):
        body = lake["s3"].get_object(Bucket=lake["bucket"], Key=key)["Body"].read()
        seen.update(pq.read_table(io.BytesIO(body)).column("event_uuid").to_pylist())
    return seen


def crash_after_files(lake: dict[str, Any], tmp_path: Path, payload: dict[str, Any]) -> None:
    """An invocation killed (SIGKILL) between writing its files and moving the checkpoint."""
    path = tmp_path / "batch.json"
    path.write_text(json.dumps(payload))
    script = (
        "import json, sys\n"
        "from sluiceway.aws.handler import LambdaApp\n"
        "LambdaApp.from_env().handle(json.load(open(sys.argv[1])))\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", script, str(path)],
        env={**os.environ, **lake["env"], "SLUICEWAY_FAULTS": "after_commit:1.0,procs=MainProcess"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == -9, proc.stderr


def test_a_batch_is_one_flush_with_duplicates_dropped(lake: dict[str, Any]) -> None:
    app = lake["app"]()
    first = batch(
        record(1, event("a")),
        record(2, event("b", "login")),
        record(3, event("a")),  # re-sent: dropped
        record(4, event("c", day="2026-11-25")),
    )
    result = app.handle(first)
    assert result.response() == {"batchItemFailures": []}
    [done] = result.results
    assert done.status == "done" and done.detail["stats"]["duplicates"] == 1
    keys = sorted(objects(lake))
    lo, hi = BASE_SEQ + 1, BASE_SEQ + 4
    assert keys == [
        f"events/event_name=login/date=2026-11-24/part-{lo}-{hi}-to-lake.shardId-000000000000.parquet",
        f"events/event_name=signup/date=2026-11-24/part-{lo}-{hi}-to-lake.shardId-000000000000.parquet",
        f"events/event_name=signup/date=2026-11-25/part-{lo}-{hi}-to-lake.shardId-000000000000.parquet",
    ]
    # The next batch of the shard: a duplicate of an earlier batch's event is dropped too.
    second = app.handle(batch(record(5, event("b", "login")), record(6, event("d"))))
    stats = second.results[0].detail["stats"]
    assert (stats["rows_in"], stats["duplicates"], stats["rows_written"]) == (2, 1, 1)
    assert dataset(lake) == Counter({"a": 1, "b": 1, "c": 1, "d": 1})

    # Lambda died after returning nothing: the ESM delivers the batch again, or a
    # bisected half of it. It is committed: nothing is written again.
    before = objects(lake)
    again = lake["app"]()  # a new execution environment
    assert again.handle(first).statuses() == ["duplicate"]
    assert again.handle(batch(*first["Records"][:2])).statuses() == ["duplicate"]
    assert objects(lake) == before


def test_a_crash_after_the_files_is_replayed_to_the_same_objects(
    lake: dict[str, Any], tmp_path: Path
) -> None:
    records = [record(i, event(f"e{i % 5}")) for i in range(1, 11)]  # e0..e4, each twice
    crash_after_files(lake, tmp_path, batch(*records))
    crashed = objects(lake)
    assert crashed and dataset(lake) == Counter({f"e{i}": 1 for i in range(5)})

    # The ESM retries the same records and more behind them: the unfinished range is
    # flushed again (same keys, same bytes), the rest is a flush of its own.
    app = lake["app"]()
    more = [*records, record(11, event("e1")), record(12, event("f"))]
    result = app.handle(batch(*more))
    assert result.statuses() == ["done", "done"], result.results
    assert [r.detail["to_seq"] for r in result.results] == [str(BASE_SEQ + 10), str(BASE_SEQ + 12)]
    after = objects(lake)
    assert {k: after[k] for k in crashed} == crashed
    assert dataset(lake) == Counter({**{f"e{i}": 1 for i in range(5)}, "f": 1})


def test_a_bisected_retry_replaces_the_unfinished_flush(
    lake: dict[str, Any], tmp_path: Path
) -> None:
    """The ESM halves a batch whose invocation failed: the halves take over its files."""
    records = [record(i, event(f"k{i}", "login" if i % 2 else "signup")) for i in range(1, 9)]
    crash_after_files(lake, tmp_path, batch(*records))
    whole = set(objects(lake))
    assert len(whole) == 2  # one file per event name, named for seqs 1..8

    app = lake["app"]()
    for half in (records[:4], records[4:]):
        assert app.handle(batch(*half)).statuses() == ["done"]
    assert not set(objects(lake)) & whole  # the whole batch's files are gone
    assert dataset(lake) == Counter({f"k{i}": 1 for i in range(1, 9)})


def test_a_replay_decides_as_the_first_attempt_after_the_key_moved_on(
    lake: dict[str, Any], tmp_path: Path
) -> None:
    """A duplicate dropped by a crashed flush stays dropped when it is replayed a day later,
    after a third copy from another shard has become the key's recorded first arrival."""
    day = 86_400.0
    app = lake["app"]()
    assert app.handle(batch(record(1, event("k"), shard=0, at=T0))).statuses() == ["done"]
    dup = batch(record(1, event("k"), shard=1, at=T0 + 3), record(2, event("m"), shard=1))
    crash_after_files(lake, tmp_path, dup)  # "k" dropped, "m" written, not committed
    late = batch(record(1, event("k"), shard=2, at=T0 + day + 5))
    assert app.handle(late).results[0].detail["stats"]["duplicates"] == 0  # a window later
    replay = app.handle(dup)
    assert replay.statuses() == ["done"] and replay.results[0].detail["replay"]
    assert replay.results[0].detail["stats"]["duplicates"] == 1
    assert dataset(lake) == Counter({"k": 2, "m": 1})


def test_duplicates_across_shards_and_the_window(lake: dict[str, Any]) -> None:
    app = lake["app"]()
    day = 86_400.0
    assert app.handle(batch(record(1, event("x"), shard=0))).statuses() == ["done"]
    # The same event on another shard (a producer retried with another partition key).
    other = batch(record(1, event("x"), shard=1, at=T0 + 30), record(2, event("y"), shard=1))
    result = app.handle(other)
    assert result.results[0].detail["stats"]["duplicates"] == 1
    # Delivered again: committed already; the first arrival stays the one recorded.
    assert app.handle(other).statuses() == ["duplicate"]
    state: StreamState = app.stream_runner("to-lake").state
    ddb_scope = "to-lake:event_uuid"
    first = state.first_arrivals(ddb_scope, ["x"])["x"]
    assert (first.shard, first.seq) == ("shardId-000000000000", str(BASE_SEQ + 1))
    # More than a window after the first arrival, the same id is an event again.
    late = batch(record(3, event("x"), shard=0, at=T0 + day + 1))
    assert app.handle(late).results[0].detail["stats"]["duplicates"] == 0
    assert dataset(lake) == Counter({"x": 2, "y": 1})
    key = {"id": {"S": state.key_id(ddb_scope, "x")}}
    got = lake["ddb"].get_item(TableName=state.table, Key=key)
    # TTL: the arrival + window + the stream's retention (the example keeps 7 days).
    assert int(got["Item"]["expires"]["N"]) == int(T0 + day + 1 + day + 7 * day) + 1


def test_a_record_that_is_no_event_goes_to_the_dlq(lake: dict[str, Any]) -> None:
    app = lake["app"]()
    result = app.handle(
        batch(record(1, b"not json"), record(2, {"event_name": "x"}), record(3, event("ok")))
    )
    assert result.response() == {"batchItemFailures": []}
    assert result.results[0].detail["stats"]["rejected"] == 2
    got = lake["sqs"].receive_message(
        QueueUrl=lake["dlq"], MaxNumberOfMessages=10, MessageAttributeNames=["All"]
    )["Messages"]
    reasons = sorted(
        json.loads(m["MessageAttributes"]["sluiceway.failure"]["StringValue"])["message"]
        for m in got
    )
    assert len(reasons) == 2 and any("event_uuid: missing" in r for r in reasons)
    assert dataset(lake) == Counter({"ok": 1})


def test_a_failed_flush_reports_its_first_sequence_number(lake: dict[str, Any]) -> None:
    app = lake["app"]()
    lake["s3"].delete_bucket(Bucket=lake["bucket"])  # S3 refuses: the flush fails
    result = app.handle(batch(record(7, event("a")), record(8, event("b"))))
    assert result.response() == {"batchItemFailures": [{"itemIdentifier": str(BASE_SEQ + 7)}]}
    assert result.statuses() == ["error"]


def test_dedup_after_another_step_is_refused_for_lambda(
    write_pipeline: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Lambda's dedup decides by shard and seq, which only the records themselves carry."""
    from sluiceway import ConfigError, Pipeline
    from sluiceway.aws.terraform import build_plan

    monkeypatch.delenv("SLUICEWAY_PROFILE", raising=False)
    (tmp_path / "shape.py").write_text("def same(batch, ctx):\n    return batch\n")
    path = write_pipeline(
        """
        pipeline: s
        buckets: {lake: ./lake}
        streams: {events: {}}
        functions:
          to-lake:
            stream: events
            steps:
              - call: shape:same
              - dedup: {key: event_uuid}
              - write_dataset: {bucket: lake, prefix: e}
        """
    )
    pipeline = Pipeline.from_file(path)
    with pytest.raises(ConfigError, match="dedup must be the first step"):
        build_plan(pipeline.config)
    with pytest.raises(ConfigError, match="dedup must be the first step"):
        LambdaApp(pipeline, function="to-lake", stream_state=object())  # type: ignore[arg-type]
    pipeline.close()


def test_compact_and_status_on_a_lambda_dataset(lake: dict[str, Any], tmp_path: Path) -> None:
    """The shards' committed flushes merge, per partition and shard; an unfinished one stays."""
    from sluiceway.compact import compact, live_files

    app = lake["app"]()
    for n in range(1, 7, 2):  # three flushes on shard 0, one on shard 1
        two = batch(record(n, event(f"a{n}")), record(n + 1, event(f"b{n}")))
        assert app.handle(two).statuses() == ["done"]
    assert app.handle(batch(record(1, event("s1"), shard=1))).statuses() == ["done"]
    crash_after_files(lake, tmp_path, batch(record(7, event("late")), record(8, event("later"))))
    before = dataset(lake)
    assert len(objects(lake)) == 5

    pipeline = app.pipeline
    report = compact(pipeline, "lake", "events")
    writer = "to-lake.shardId-000000000000"
    directory = "events/event_name=signup/date=2026-11-24"
    lo, hi = BASE_SEQ + 1, BASE_SEQ + 6
    assert [(m["directory"], m["key"], m["rows"]) for m in report.merged] == [
        (directory, f"{directory}/part-{lo}-{hi}-{writer}.parquet", 6)
    ]
    assert len(report.merged[0]["inputs"]) == 3
    # Shard 1's single file and the unfinished flush (past the checkpoint) are left alone.
    keys = set(objects(lake))
    assert len(keys) == 3 and f"{directory}/part-{lo}-{hi}-{writer}.parquet" in keys
    assert sorted(live_files(pipeline.bucket("lake"), "events")) == sorted(keys)
    assert dataset(lake) == before  # every row once, nothing lost

    shards = pipeline.stream_status()["events"]["consumers"]["to-lake"]["lambda_shards"]
    assert shards == {
        "shardId-000000000000": {
            "committed": str(hi),
            "unfinished_flush": [str(BASE_SEQ + 7), str(BASE_SEQ + 8)],
        },
        "shardId-000000000001": {"committed": str(BASE_SEQ + 1), "unfinished_flush": None},
    }
    assert compact(pipeline, "lake", "events").merged == []  # nothing left to merge


def test_status_of_local_stream_functions_on_a_dynamodb_ledger_makes_no_lambda_table(
    aws: str, write_pipeline: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    from sluiceway import Pipeline

    monkeypatch.delenv("SLUICEWAY_PROFILE", raising=False)
    prefix = fresh_prefix("st")
    path = write_pipeline(
        f"""
        pipeline: s
        buckets: {{lake: ./lake}}
        streams: {{events: {{}}}}
        functions:
          to-lake:
            stream: events
            steps:
              - write_dataset: {{bucket: lake, prefix: e}}
        profiles:
          d:
            ledger: "{dynamodb_url(aws, prefix)}"
        """
    )
    pipeline = Pipeline.from_file(path, "d")
    try:
        assert "lambda_shards" not in pipeline.stream_status()["events"]["consumers"]["to-lake"]
        tables = client("dynamodb", aws).list_tables()["TableNames"]
        assert not [t for t in tables if t.startswith(prefix) and t.endswith("stream-state")]
    finally:
        pipeline.close()
