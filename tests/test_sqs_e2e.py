"""Bronze → staging on SQS/SNS and DynamoDB (moto): the same pipeline file, an ``aws`` profile.

Worker processes build their own Pipeline (and their own boto3 clients) from
the file and the profile, so this checks what one machine's SQLite cannot:
every worker sees the same queues, topics and ledger through the network,
each input is converted exactly once, a topic fans out to two queues, and a
failing file ends in SQS's dead-letter queue with its failure record.
"""

from __future__ import annotations

import json
import textwrap
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest
from typer.testing import CliRunner

from sluiceway import Pipeline, Runtime
from sluiceway.cli import app

from .aws_backend import client, dynamodb_url, fresh_prefix, sqs_url
from .conftest import BRONZE_TO_STAGING
from .helpers import make_csv, parquet_rows

pytest.importorskip("boto3")


def _profile(endpoint: str, prefix: str, tables: bool = False) -> str:
    lines = [
        "",
        "profiles:",
        "  aws:",
        f'    broker: "{sqs_url(endpoint, prefix)}"',
        f'    ledger: "{dynamodb_url(endpoint, prefix)}"',
    ]
    if tables:
        lines.append(f'    tables: "{dynamodb_url(endpoint, prefix)}"')
    return "\n".join(lines) + "\n"


@pytest.fixture
def aws_pipeline(
    aws: str, write_pipeline: Callable[..., Path], monkeypatch: pytest.MonkeyPatch
) -> Callable[[str], Path]:
    """Write a pipeline file with an ``aws`` profile on the reset moto server."""
    # Runtime(profile=…) exports SLUICEWAY_PROFILE for its workers: set it here
    # so monkeypatch restores the environment for the tests that follow.
    monkeypatch.setenv("SLUICEWAY_PROFILE", "aws")

    def write(text: str = BRONZE_TO_STAGING, tables: bool = False) -> Path:
        return write_pipeline(textwrap.dedent(text) + _profile(aws, fresh_prefix(), tables))

    return write


def _close(p: Pipeline) -> None:
    p.broker.close()
    p.ledger.close()
    p.close()


@pytest.mark.parametrize("workers", [2, 4])
def test_bronze_to_staging_on_sqs_and_dynamodb(
    aws_pipeline: Callable[..., Path], tmp_path: Path, workers: int
) -> None:
    path = aws_pipeline()
    p = Pipeline.from_file(path, profile="aws")
    assert not p.embedded
    assert (type(p.broker).__name__, type(p.ledger).__name__) == ("SqsBroker", "DynamoLedger")
    expected = {}
    for i in range(6):
        src = tmp_path / "in" / f"f{i}.csv"
        expected[f"f{i}"] = make_csv(src, 30, seed=i)
        if i % 2:  # half put while nothing runs (SNS → SQS now) …
            p.put(src, "bronze", f"f{i}.csv")
        else:  # … half found by the start-up reconcile
            (tmp_path / "bronze").mkdir(exist_ok=True)
            (tmp_path / "bronze" / f"f{i}.csv").write_bytes(src.read_bytes())

    summary = Runtime(path, workers=workers, watch=False, profile="aws").drain(timeout=90)

    assert summary.done == 6, summary
    assert Counter(summary.inputs) == Counter(f"bronze/f{i}.csv" for i in range(6))
    assert summary.rows_in == summary.rows_out == 6 * 30
    for stem, records in expected.items():
        assert parquet_rows(tmp_path / "staging" / f"{stem}.parquet") == records
    assert p.function_status() == {"csv-to-parquet": {"done": 6}}
    entries = p.ledger.entries_since(0)
    assert len(entries) == 6 and all(e.attempts == 1 for e in entries), entries
    assert p.status()["queues"]["to-parquet"] == {
        "visible": 0,
        "in_flight": 0,
        "delayed": 0,
        "dead_lettered": 0,
        "is_dlq": False,
    }
    # A second start finds nothing new: DynamoDB remembers every version.
    again = Runtime(path, workers=0, watch=False, profile="aws").drain(timeout=60)
    assert again.done == 0
    _close(p)


FANOUT = (
    BRONZE_TO_STAGING.replace(
        "landed: {subscriptions: [to-parquet]}", "landed: {subscriptions: [to-parquet, audit]}"
    )
    .replace("queues:\n", "queues:\n  audit: {visibility_timeout: 10s}\n")
    .replace(
        "functions:\n",
        "functions:\n  audit:\n    queue: audit\n    handler: aws_audit:audit\n",
    )
)

AUDIT = """
import os

def audit(event, ctx):
    with open(os.path.join(os.path.dirname(__file__), "audit.log"), "a") as f:
        f.write(event.key + "\\n")
"""


def test_topic_fans_out_through_sns_to_two_queues(
    aws_pipeline: Callable[..., Path], tmp_path: Path, aws: str
) -> None:
    path = aws_pipeline(FANOUT)
    (tmp_path / "aws_audit.py").write_text(AUDIT)
    p = Pipeline.from_file(path, profile="aws")
    for i in range(3):
        make_csv(tmp_path / "in" / f"g{i}.csv", 5, seed=i)
        p.put(tmp_path / "in" / f"g{i}.csv", "bronze", f"g{i}.csv")
    # SNS delivered every event to both subscribed queues.
    assert p.broker.queue("to-parquet").counts().visible == 3
    assert p.broker.queue("audit").counts().visible == 3

    summary = Runtime(path, workers=0, watch=False, profile="aws").drain(timeout=60)

    assert summary.done == 6
    assert sorted((tmp_path / "audit.log").read_text().split()) == ["g0.csv", "g1.csv", "g2.csv"]
    assert sorted(o.key for o in p.buckets["staging"].list()) == [
        "g0.parquet",
        "g1.parquet",
        "g2.parquet",
    ]
    # What SNS was told: raw delivery into each queue, and queue policies letting it send.
    sns, sqs = client("sns", aws), client("sqs", aws)
    broker = p.broker
    topic_arn = broker._topic_arns["landed"]  # type: ignore[attr-defined]
    subs = sns.list_subscriptions_by_topic(TopicArn=topic_arn)["Subscriptions"]
    assert sorted(s["Endpoint"] for s in subs) == sorted(
        broker.queue(q).arn  # type: ignore[attr-defined]
        for q in ("to-parquet", "audit")
    )
    for s in subs:
        attrs = sns.get_subscription_attributes(SubscriptionArn=s["SubscriptionArn"])
        assert attrs["Attributes"]["RawMessageDelivery"] == "true"
    policy = sqs.get_queue_attributes(
        QueueUrl=broker.queue("audit").url,  # type: ignore[attr-defined]
        AttributeNames=["Policy"],
    )["Attributes"]["Policy"]
    assert topic_arn in policy
    _close(p)


def test_failing_file_ends_in_the_native_dlq_with_its_failure_record(
    aws_pipeline: Callable[..., Path], tmp_path: Path, aws: str
) -> None:
    path = aws_pipeline()
    p = Pipeline.from_file(path, profile="aws")
    make_csv(tmp_path / "in" / "good.csv", 10)
    p.put(tmp_path / "in" / "good.csv", "bronze", "good.csv")
    bad = tmp_path / "in" / "bad.csv"
    bad.write_bytes(b"id,name\n1,ok\n2,\xff\xfe broken\n")
    p.put(bad, "bronze", "bad.csv")

    summary = Runtime(path, workers=0, watch=False, profile="aws").drain(timeout=60)

    assert summary.done == 1 and summary.dead_lettered == 1, summary
    # The DLQ is SQS's own: the one the source queue's redrive policy names.
    source = p.broker.queue("to-parquet")
    redrive = client("sqs", aws).get_queue_attributes(
        QueueUrl=source.url,  # type: ignore[attr-defined]
        AttributeNames=["RedrivePolicy"],
    )["Attributes"]["RedrivePolicy"]
    policy = json.loads(redrive)
    assert policy["deadLetterTargetArn"] == p.broker.queue("to-parquet-dlq").arn  # type: ignore[attr-defined]
    assert int(policy["maxReceiveCount"]) == 3

    runner = CliRunner()
    listed = runner.invoke(app, ["dlq", "list", "to-parquet", "--pipeline", str(path), "--json"])
    assert listed.exit_code == 0, listed.output
    [dead] = json.loads(listed.output)
    assert dead["receive_count"] == 3
    failure = dead["failure"]
    assert (failure["error_type"], failure["file"], failure["line"]) == (
        "InputError",
        "bronze/bad.csv",
        3,
    )
    assert "invalid UTF-8" in failure["message"] and "Traceback" in failure["traceback"]
    assert dead["failure"]["attempt"] == 3 and dead["failure"]["function"] == "csv-to-parquet"
    assert dead["body"]["detail"]["object"]["key"] == "bad.csv"
    # Listing does not take the message: it is still there, and shows the same again.
    [again] = p.broker.queue("to-parquet-dlq").peek()
    assert again.id == dead["id"] and again.failure == dead["failure"]
    assert again.attributes["source_queue"] == "to-parquet"

    redriven = runner.invoke(app, ["dlq", "redrive", "to-parquet", "--pipeline", str(path)])
    assert redriven.exit_code == 0, redriven.output
    assert p.broker.queue("to-parquet-dlq").counts().visible == 0
    [back] = source.receive(1)
    assert back.id == dead["id"] and back.receive_count == 1
    _close(p)
