"""`sluiceway deploy rehearse`: the end-to-end test of the AWS path, on moto.

The plan's resources are created through boto3 on a loopback moto server; a
CSV is put into the bronze bucket; S3 → EventBridge → SQS (moto delivers it)
and the rule → SNS → SQS fan-out (moto does not: the rehearsal falls back and
says so) bring its event to the functions' queues; the handler runs as
Lambda would; the Parquet output raises an event of its own that a chained
function receives; and the outputs, the table and the ledger are checked.
"""

from __future__ import annotations

import io
import json
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

import sluiceway
from sluiceway.aws.rehearse import parse_events, parse_puts, rehearse
from sluiceway.cli import app

AUDITED: list[dict[str, Any]] = []


@sluiceway.handler("rehearse-audit")
def _audit(event: sluiceway.Event, ctx: sluiceway.StepContext) -> None:
    AUDITED.append(event.to_dict())


PIPELINE = """
pipeline: shop
buckets:
  bronze: ./bronze
  staging: ./staging
topics:
  landed: {subscriptions: [to-parquet, to-table]}
queues:
  to-parquet: {max_receive_count: 3}
  to-table: {max_receive_count: 3}
  audits: {}
tables:
  customers: {key: [customer_id]}
rules:
  - name: new-csv
    pattern:
      detail-type: [Object Created]
      detail:
        bucket: {name: [bronze]}
        object: {key: [{suffix: .csv}]}
    targets: [landed]
  - name: new-parquet
    pattern:
      detail-type: [Object Created]
      detail:
        bucket: {name: [staging]}
        object: {key: [{suffix: .parquet}]}
    targets: [audits]
functions:
  csv-to-parquet:
    queue: to-parquet
    timeout: 1m
    steps:
      - read_csv
      - write_parquet: {bucket: staging}
  csv-to-table:
    queue: to-table
    timeout: 1m
    batch_size: 5
    steps:
      - read_csv
      - write_table: {table: customers}
  audit:
    queue: audits
    timeout: 30s
    handler: rehearse-audit
profiles:
  aws:
    buckets:
      staging: s3://lake/staging
"""

CSV = "customer_id,name,country\n1,Ada,DE\n2,Grace,US\n3,Edsger,NL\n4,Barbara,US\n"


def test_rehearsal_end_to_end(
    aws: str,
    write_pipeline: Callable[..., Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    boto3 = pytest.importorskip("boto3")
    import pyarrow.parquet as pq

    monkeypatch.setenv("SLUICEWAY_PROFILE", "aws")  # staging lives under a prefix
    AUDITED.clear()
    path = write_pipeline(textwrap.dedent(PIPELINE))
    source = tmp_path / "customers.csv"
    source.write_text(CSV)
    report = rehearse(
        path,
        aws,
        [(source, "bronze", "in/customers.csv")],
        prefix="rh-test-",
        deliver_wait=1.0,
        timeout=60,
        keep=True,
    )
    failed = [c for c in report.checks if not c.ok]
    assert report.ok, json.dumps(report.to_dict(), indent=1)
    assert not failed
    names = {c.name for c in report.checks}
    assert "csv-to-parquet processed bronze/in/customers.csv" in names
    assert "csv-to-table processed bronze/in/customers.csv" in names
    assert "audit processed staging/in/customers.parquet" in names  # the chained event
    assert "output staging/in/customers.parquet" in names

    # moto cannot deliver EventBridge → SNS; the rehearsal said so and delivered it.
    assert len(report.fallbacks) == 1 and "topic landed" in report.fallbacks[0]
    # S3 → EventBridge → SQS needed no help, for the chained Parquet event either.
    assert not any("audits" in f for f in report.fallbacks)
    functions = {i["function"] for i in report.invocations}
    assert functions == {"csv-to-parquet", "csv-to-table", "audit"}
    assert all(not i["failed"] for i in report.invocations)

    # The outputs, read back independently.
    s3 = boto3.client("s3", endpoint_url=aws, region_name="us-east-1")
    obj = s3.get_object(Bucket="rh-test-staging", Key="staging/in/customers.parquet")
    assert pq.read_table(io.BytesIO(obj["Body"].read())).num_rows == 4
    ddb = boto3.client("dynamodb", endpoint_url=aws, region_name="us-east-1")
    items = ddb.scan(TableName="rh-test-shop-table-customers")["Items"]
    assert sorted(i["name"]["S"] for i in items) == ["Ada", "Barbara", "Edsger", "Grace"]
    entries = ddb.scan(TableName="rh-test-shop-ledger-entries")["Items"]
    assert sorted(e["function"]["S"] for e in entries if e["status"]["S"] == "done") == [
        "audit",
        "csv-to-parquet",
        "csv-to-table",
    ]
    # The audit handler saw the Parquet file as the pipeline names it.
    [seen] = AUDITED
    assert seen["detail"]["bucket"]["name"] == "staging"
    assert seen["detail"]["object"]["key"] == "in/customers.parquet"

    # The role of csv-to-table may write its table and nothing in S3.
    iam = boto3.client("iam", endpoint_url=aws, region_name="us-east-1")
    policy = iam.get_role_policy(RoleName="rh-test-csv-to-table", PolicyName="sluiceway")
    doc = policy["PolicyDocument"]
    doc = json.loads(doc) if isinstance(doc, str) else doc
    actions = {a for s in doc["Statement"] for a in s["Action"]}
    assert "dynamodb:BatchWriteItem" in actions and "s3:PutObject" not in actions


def test_rehearse_command_reports_a_stuck_pipeline_and_cleans_up(
    aws: str, write_pipeline: Callable[..., Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    boto3 = pytest.importorskip("boto3")
    monkeypatch.delenv("SLUICEWAY_PROFILE", raising=False)
    path = write_pipeline(textwrap.dedent(PIPELINE))
    source = tmp_path / "broken.csv"
    source.write_bytes(b"customer_id,name\n1,Ada\n2\n")  # a row with too few fields
    result = CliRunner().invoke(
        app,
        [
            "deploy",
            "rehearse",
            "--pipeline",
            str(path),
            "--endpoint",
            aws,
            "--put",
            f"{source}=bronze/in/broken.csv",
            "--deliver-wait",
            "0.5",
            "--timeout",
            "20",
            "--json",
        ],
    )
    assert result.exit_code == 1, result.output
    report = json.loads(result.output)
    assert report["ok"] is False
    bad = {c["name"]: c["detail"] for c in report["checks"] if not c["ok"]}
    assert bad["csv-to-table processed bronze/in/broken.csv"] == "failed"
    assert bad["dead-letter queue to-table-dlq is empty"] == "1 messages"
    # Nothing is left behind (no --keep).
    s3 = boto3.client("s3", endpoint_url=aws, region_name="us-east-1")
    assert not [b for b in s3.list_buckets()["Buckets"] if b["Name"].startswith(report["prefix"])]


def test_parse_puts() -> None:
    assert parse_puts(["a.csv=bronze/in/a.csv"]) == [(Path("a.csv"), "bronze", "in/a.csv")]
    with pytest.raises(ValueError, match="FILE=BUCKET/KEY"):
        parse_puts(["a.csv"])
    assert parse_events(["e.jsonl=events"]) == [(Path("e.jsonl"), "events")]
    with pytest.raises(ValueError, match="FILE=STREAM"):
        parse_events(["e.jsonl=lake/events"])


LAKE = Path(__file__).resolve().parents[1] / "examples" / "events-to-lake"


def test_rehearsal_of_a_stream_function_kinesis_to_lambda_to_s3(
    aws: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """examples/events-to-lake as it is: PutRecords, the mapping's batches, the lake checked."""
    boto3 = pytest.importorskip("boto3")
    import pyarrow.parquet as pq

    monkeypatch.delenv("SLUICEWAY_PROFILE", raising=False)
    samples = (LAKE / "samples" / "events.jsonl").read_text().splitlines()
    uuids = [json.loads(line)["event_uuid"] for line in samples if line.strip()]
    assert len(set(uuids)) < len(uuids)  # the samples re-send some events
    events = tmp_path / "events.jsonl"
    events.write_text("\n".join([*samples, '{"event_name": "no id"}']) + "\n")
    report = rehearse(
        LAKE / "sluiceway.yaml",
        aws,
        [],
        events=[(events, "events")],
        prefix="rk-test-",
        timeout=120,
        keep=True,
    )
    assert report.ok, json.dumps(report.to_dict(), indent=1)
    checks = {c.name: c.detail for c in report.checks}
    assert "to-lake: every event in the lake exactly once" in checks
    assert "to-lake: replayed batches (whole and bisected) changed nothing" in checks
    assert "stream events settings" in checks
    runs = [i for i in report.invocations if i["function"] == "to-lake"]
    assert {i["shard"] for i in runs} == {"shardId-000000000000", "shardId-000000000001"}
    # Per shard: the first invocation out of time (its first record answered), then done.
    for shard in ("shardId-000000000000", "shardId-000000000001"):
        first, *rest = [i for i in runs if i["shard"] == shard]
        assert first["statuses"] == ["not_started"] and len(first["failed"]) == 1
        assert rest and all(not i["failed"] and i["statuses"] == ["done"] for i in rest)
    assert sum(i["messages"] for i in runs if i["statuses"] == ["done"]) == len(uuids) + 1

    # Read back independently: each event once; the record that is no event in the DLQ.
    s3 = boto3.client("s3", endpoint_url=aws, region_name="us-east-1")
    seen: list[str] = []
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket="rk-test-lake"):
        for obj in page.get("Contents", []):
            assert obj["Key"].startswith("events/event_name=")
            assert ".shardId-00000000000" in obj["Key"]
            body = s3.get_object(Bucket="rk-test-lake", Key=obj["Key"])["Body"].read()
            seen += pq.read_table(io.BytesIO(body)).column("event_uuid").to_pylist()
    assert sorted(seen) == sorted(set(uuids))
    sqs = boto3.client("sqs", endpoint_url=aws, region_name="us-east-1")
    url = sqs.get_queue_url(QueueName="rk-test-to-lake-failed")["QueueUrl"]
    [dead] = sqs.receive_message(QueueUrl=url, MessageAttributeNames=["All"])["Messages"]
    assert "event_uuid: missing" in dead["MessageAttributes"]["sluiceway.failure"]["StringValue"]
