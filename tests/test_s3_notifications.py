"""S3 event notifications: real AWS payloads (read in place), then real delivery through moto.

The payloads in ../shared/conformance/aws-events are what AWS sends; moto
then plays S3 itself: a bucket configured to notify SQS (directly, through
SNS, or through EventBridge), an object put, the message received and parsed,
and finally a NotificationSource routing it into a pipeline.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from sluiceway import Pipeline, Runtime
from sluiceway.config import ConfigError
from sluiceway.events import OBJECT_CREATED
from sluiceway.notifications import (
    OBJECT_DELETED,
    Kind,
    NotificationSource,
    SqsLocation,
    UnrecognizedNotification,
    parse_notification,
)

from .conftest import BRONZE_TO_STAGING, REQUIRE_SERVICES
from .helpers import make_csv

EVENTS = Path(__file__).resolve().parents[2] / "shared" / "conformance" / "aws-events"


def payload(name: str) -> dict[str, Any]:
    path = EVENTS / name
    if not path.is_file():
        msg = f"AWS event payload {path} not found (it lives beside the checkout in ../shared)"
        if REQUIRE_SERVICES:
            pytest.fail(msg)
        pytest.skip(msg)
    return json.loads(path.read_text())


# -- the real payloads ---------------------------------------------------------


def test_s3_event_to_sqs() -> None:
    [note] = parse_notification(json.dumps(payload("s3Event.json")))
    assert note.kind is Kind.CREATED
    e = note.event
    assert (e.source, e.detail_type, e.region) == ("aws.s3", OBJECT_CREATED, "us-east-2")
    assert (note.bucket, note.key) == (
        "lambda-artifacts-deafc19498e3f2df",
        "b21b84d653bb07b05b1e6b33684dc11b",
    )
    assert (note.size, note.etag, note.sequencer) == (
        1305107,
        "b21b84d653bb07b05b1e6b33684dc11b",
        "0C0F6F405D6ED209E1",
    )
    assert e.detail["reason"] == "PutObject"
    assert e.time == "2019-09-03T19:37:27.192Z"
    assert e.input_identity == (
        "lambda-artifacts-deafc19498e3f2df/b21b84d653bb07b05b1e6b33684dc11b"
        "@b21b84d653bb07b05b1e6b33684dc11b"
    )


def test_keys_are_url_decoded() -> None:
    data = payload("s3EventDecodedKey.json")
    [note] = parse_notification(data)
    obj = data["Records"][0]["s3"]["object"]
    assert note.key == obj["urlDecodedKey"] == "Happy Face.jpg"
    assert note.version_id == "version"
    # S3 encodes keys like an HTML form: '+' is a space, a real '+' is %2B.
    data["Records"][0]["s3"]["object"]["key"] = "in/red+flower%2B1+%28copy%29.csv"
    assert parse_notification(data)[0].key == "in/red flower+1 (copy).csv"


def test_lambda_sqs_batch_of_s3_events() -> None:
    data = payload("s3SqsEvent.json")
    [note] = parse_notification(data)  # the Lambda batch: each record's body parsed
    assert (note.bucket, note.key, note.etag) == (
        "xxx",
        "test.pdf",
        "2e3ad1e983318bbd8e73b080e2997980",
    )
    assert note.version_id == "yd3d4HaWOT2zguDLvIQLU6ptDTwKBnQV"
    # What an SQS consumer receives is the record's body alone: the same notification.
    [alone] = parse_notification(data["Records"][0]["body"])
    assert (alone.kind, alone.key, alone.etag, alone.sequencer) == (
        note.kind,
        note.key,
        note.etag,
        "00643717F9F8B85354",
    )


def test_sns_envelopes_are_unwrapped() -> None:
    data = payload("snsSqsEvent.json")
    body = data["Records"][0]["body"]
    # This SNS message is not from S3: it is refused, not silently dropped.
    with pytest.raises(UnrecognizedNotification):
        parse_notification(body)
    # The same envelope carrying S3's notification (S3 → SNS → SQS).
    envelope = json.loads(body)
    envelope["Message"] = json.dumps(payload("s3Event.json"))
    [note] = parse_notification(json.dumps(envelope))
    assert note.kind is Kind.CREATED and note.key == "b21b84d653bb07b05b1e6b33684dc11b"


def test_eventbridge_object_created() -> None:
    data = payload("s3EventBridgeNotificationObjectCreatedEvent.json")
    [note] = parse_notification(json.dumps(data))
    e = note.event
    assert (note.kind, note.bucket, note.key) == (Kind.CREATED, "example-bucket", "IMG_m7fzo3.jpg")
    assert (note.size, note.etag) == (184662, "4e68adba0abe2dc8653dc3354e14c01d")
    assert (e.id, e.time, e.account) == (data["id"], data["time"], "123456789012")
    assert e.detail["object"] == data["detail"]["object"]  # the same detail S3 gave EventBridge
    # EventBridge keys are not URL-encoded: a '+' stays a '+'.
    data["detail"]["object"]["key"] = "a+b%20c.csv"
    assert parse_notification(data)[0].key == "a+b%20c.csv"


@pytest.mark.parametrize(
    "name", ["s3EventDeleteObject.json", "s3EventBridgeNotificationObjectDeletedEvent.json"]
)
def test_deletions_are_a_kind_of_their_own(name: str) -> None:
    [note] = parse_notification(payload(name))
    assert note.kind is Kind.DELETED
    assert note.event.detail_type == OBJECT_DELETED
    assert note.event.detail["reason"] == "DeleteObject"
    assert note.key in ("b21b84d653bb07b05b1e6b33684dc11b", "IMG_m7fzo3.jpg")


def test_test_events_and_other_types_yield_nothing() -> None:
    test_event = {"Service": "Amazon S3", "Event": "s3:TestEvent", "Bucket": "b"}
    assert parse_notification(json.dumps(test_event)) == []
    restore = payload("s3Event.json")
    restore["Records"][0]["eventName"] = "ObjectRestore:Completed"
    assert parse_notification(restore) == []
    tags = payload("s3EventBridgeNotificationObjectCreatedEvent.json")
    tags["detail-type"] = "Object Tags Added"
    assert parse_notification(tags) == []
    assert parse_notification({"Records": []}) == []


@pytest.mark.parametrize(
    "name", ["sqsEvent.json", "eventBridgeEvent.json", "snsEvent.json", "kinesisStreamEvent.json"]
)
def test_payloads_from_elsewhere_are_refused(name: str) -> None:
    with pytest.raises(UnrecognizedNotification):
        parse_notification(payload(name))


def test_garbage_is_refused() -> None:
    for body in ("not json", "[1, 2]", "{}", '{"Records": [{"eventSource": "aws:s3"}]}'):
        with pytest.raises(UnrecognizedNotification):
            parse_notification(body)


def test_sqs_urls() -> None:
    loc = SqsLocation.parse("sqs://landing?endpoint_url=http://127.0.0.1:5000&region=eu-west-1")
    assert (loc.queue_name, loc.endpoint_url, loc.region) == (
        "landing",
        "http://127.0.0.1:5000",
        "eu-west-1",
    )
    direct = SqsLocation.parse("https://sqs.eu-west-1.amazonaws.com/123456789012/landing")
    assert (direct.queue_url, direct.region) == (
        "https://sqs.eu-west-1.amazonaws.com/123456789012/landing",
        "eu-west-1",
    )
    for bad in ("sqs://landing?visibility=3", "sqs://u:p@landing", "redis://x"):
        with pytest.raises(ValueError):
            SqsLocation.parse(bad)


# -- real delivery through moto -------------------------------------------------


class Moto:
    """boto3 clients on the moto server, and helpers to wire notifications."""

    def __init__(self, url: str) -> None:
        import boto3

        self.url = url
        kw = {"endpoint_url": url, "region_name": "us-east-1"}
        self.s3 = boto3.client("s3", **kw)
        self.sqs = boto3.client("sqs", **kw)
        self.sns = boto3.client("sns", **kw)
        self.events = boto3.client("events", **kw)

    def queue(self, name: str) -> tuple[str, str]:
        url = self.sqs.create_queue(QueueName=name)["QueueUrl"]
        arn = self.sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["QueueArn"])
        return url, arn["Attributes"]["QueueArn"]

    def bodies(self, queue_url: str, expect: int) -> list[str]:
        out: list[str] = []
        for _ in range(10):
            r = self.sqs.receive_message(
                QueueUrl=queue_url, MaxNumberOfMessages=10, WaitTimeSeconds=1
            )
            for m in r.get("Messages", ()):
                out.append(m["Body"])
                self.sqs.delete_message(QueueUrl=queue_url, ReceiptHandle=m["ReceiptHandle"])
            if len(out) >= expect:
                break
        return out

    def waiting(self, queue_url: str) -> int:
        attrs = self.sqs.get_queue_attributes(
            QueueUrl=queue_url,
            AttributeNames=["ApproximateNumberOfMessages", "ApproximateNumberOfMessagesNotVisible"],
        )["Attributes"]
        return int(attrs["ApproximateNumberOfMessages"]) + int(
            attrs["ApproximateNumberOfMessagesNotVisible"]
        )


@pytest.fixture
def moto(aws: str) -> Moto:
    return Moto(aws)


def parsed(bodies: list[str]) -> list[tuple[Kind, str, str]]:
    return [(n.kind, n.bucket, n.key) for b in bodies for n in parse_notification(b)]


def test_s3_to_sqs_with_moto(moto: Moto) -> None:
    moto.s3.create_bucket(Bucket="landing")
    url, arn = moto.queue("landing-events")
    moto.s3.put_bucket_notification_configuration(
        Bucket="landing",
        NotificationConfiguration={
            "QueueConfigurations": [
                {"QueueArn": arn, "Events": ["s3:ObjectCreated:*", "s3:ObjectRemoved:*"]}
            ]
        },
    )
    key = "in/red flower+1 (copy).csv"
    put = moto.s3.put_object(Bucket="landing", Key=key, Body=b"id\n1\n")
    moto.s3.delete_object(Bucket="landing", Key=key)
    bodies = moto.bodies(url, expect=3)  # the test event, the put, the delete
    assert parsed(bodies) == [
        (Kind.CREATED, "landing", key),
        (Kind.DELETED, "landing", key),
    ]
    [created] = [n for b in bodies for n in parse_notification(b) if n.kind is Kind.CREATED]
    assert (created.etag, created.size) == (put["ETag"].strip('"'), 5)


def test_s3_to_sns_to_sqs_with_moto(moto: Moto) -> None:
    moto.s3.create_bucket(Bucket="landing")
    url, arn = moto.queue("landing-events")
    topic = moto.sns.create_topic(Name="landing-topic")["TopicArn"]
    moto.sns.subscribe(TopicArn=topic, Protocol="sqs", Endpoint=arn)
    moto.s3.put_bucket_notification_configuration(
        Bucket="landing",
        NotificationConfiguration={
            "TopicConfigurations": [{"TopicArn": topic, "Events": ["s3:ObjectCreated:*"]}]
        },
    )
    moto.s3.put_object(Bucket="landing", Key="a b.csv", Body=b"x")
    bodies = moto.bodies(url, expect=2)
    assert all(json.loads(b)["Type"] == "Notification" for b in bodies)  # SNS envelopes
    assert parsed(bodies) == [(Kind.CREATED, "landing", "a b.csv")]


def test_s3_to_eventbridge_to_sqs_with_moto(moto: Moto) -> None:
    moto.s3.create_bucket(Bucket="landing")
    url, arn = moto.queue("landing-events")
    moto.s3.put_bucket_notification_configuration(
        Bucket="landing", NotificationConfiguration={"EventBridgeConfiguration": {}}
    )
    moto.events.put_rule(
        Name="landing-objects",
        EventPattern=json.dumps(
            {"source": ["aws.s3"], "detail": {"bucket": {"name": ["landing"]}}}
        ),
    )
    moto.events.put_targets(Rule="landing-objects", Targets=[{"Id": "q", "Arn": arn}])
    moto.s3.put_object(Bucket="landing", Key="in/a b+c.csv", Body=b"x")
    moto.s3.delete_object(Bucket="landing", Key="in/a b+c.csv")
    bodies = moto.bodies(url, expect=2)
    assert all(json.loads(b)["source"] == "aws.s3" for b in bodies)
    assert parsed(bodies) == [
        (Kind.CREATED, "landing", "in/a b+c.csv"),
        (Kind.DELETED, "landing", "in/a b+c.csv"),
    ]


# -- a NotificationSource routing into a pipeline ----------------------------------


@pytest.fixture
def wired(
    moto: Moto, write_pipeline: Callable[..., Path], monkeypatch: pytest.MonkeyPatch
) -> Iterator[tuple[Moto, Path, str]]:
    """bronze on moto's S3 (under a prefix) notifying an SQS queue; the rest embedded."""
    bucket = f"landing-{uuid.uuid4().hex[:8]}"
    moto.s3.create_bucket(Bucket=bucket)
    url, arn = moto.queue(f"{bucket}-events")
    moto.s3.put_bucket_notification_configuration(
        Bucket=bucket,
        NotificationConfiguration={
            "QueueConfigurations": [
                {"QueueArn": arn, "Events": ["s3:ObjectCreated:*", "s3:ObjectRemoved:*"]}
            ]
        },
    )
    moto.bodies(url, expect=1)  # the s3:TestEvent
    profile = (
        "profiles:\n"
        "  aws:\n"
        "    buckets:\n"
        f"      bronze: s3://{bucket}/partners?endpoint_url={moto.url}&path_style=true\n"
        f"    notifications: sqs://{bucket}-events?endpoint_url={moto.url}&region=us-east-1\n"
    )
    monkeypatch.setenv("SLUICEWAY_PROFILE", "aws")
    yield moto, write_pipeline(BRONZE_TO_STAGING + profile), bucket


def test_notification_source_routes_then_deletes(wired: tuple[Moto, Path, str]) -> None:
    moto, path, bucket = wired
    p = Pipeline.from_file(path)
    source = NotificationSource.from_url(p, p.config.backends.notifications or "", wait_seconds=1)
    moto.s3.put_object(Bucket=bucket, Key="partners/in/a b.csv", Body=b"id\n1\n")
    moto.s3.put_object(Bucket=bucket, Key="elsewhere/x.csv", Body=b"id\n2\n")  # not bronze
    stats = source.drain()
    assert [(e.bucket, e.key) for e in stats.raised] == [("bronze", "in/a b.csv")]
    assert stats.ignored == 1 and stats.kept == 0
    assert p.pending() == 1  # queued for csv-to-parquet
    assert moto.waiting(source.queue_url) == 0  # deleted, after routing
    # A redelivered notification (or the poller finding the same version) raises nothing.
    moto.s3.put_object(Bucket=bucket, Key="partners/in/a b.csv", Body=b"id\n1\n")
    again = source.drain()
    assert again.raised == [] and again.duplicates == 1 and p.pending() == 1
    moto.s3.delete_object(Bucket=bucket, Key="partners/in/a b.csv")
    assert source.drain().deleted == [("bronze", "in/a b.csv")]
    p.close()


def test_a_message_that_cannot_be_routed_stays_queued(
    wired: tuple[Moto, Path, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    moto, path, bucket = wired
    p = Pipeline.from_file(path)
    source = NotificationSource.from_url(p, p.config.backends.notifications or "", wait_seconds=0)

    def broker_down(*args: object, **kwargs: object) -> None:
        raise ConnectionError("broker unreachable")

    monkeypatch.setattr(p, "object_created", broker_down)
    moto.s3.put_object(Bucket=bucket, Key="partners/a.csv", Body=b"id\n1\n")
    moto.sqs.send_message(QueueUrl=source.queue_url, MessageBody="not a notification")
    stats = source.poll(wait_seconds=1)
    assert stats.messages == 2 and stats.kept == 2 and stats.raised == []
    assert moto.waiting(source.queue_url) == 2  # both come back after the visibility timeout
    p.close()


def test_run_drain_reads_the_profiles_notifications(
    wired: tuple[Moto, Path, str], tmp_path: Path
) -> None:
    moto, path, bucket = wired
    records = make_csv(tmp_path / "c.csv", 25)
    moto.s3.put_object(Bucket=bucket, Key="partners/c.csv", Body=(tmp_path / "c.csv").read_bytes())
    # The drain reads the queue (and polls the bucket): two paths, one event.
    summary = Runtime(path, workers=0, reconcile=False).drain(timeout=60)
    assert (summary.done, summary.rows_out) == (1, len(records))
    assert (tmp_path / "staging" / "c.parquet").exists()
    queue_url = moto.sqs.get_queue_url(QueueName=f"{bucket}-events")["QueueUrl"]
    assert moto.waiting(queue_url) == 0  # the notification was routed and deleted


def test_a_bad_notifications_url_is_a_config_error(
    write_pipeline: Callable[..., Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    text = BRONZE_TO_STAGING + "profiles:\n  aws:\n    notifications: sqs://q?wait=5\n"
    monkeypatch.setenv("SLUICEWAY_PROFILE", "aws")
    p = Pipeline.from_file(write_pipeline(text))
    with pytest.raises(ConfigError, match="unknown option 'wait'"):
        NotificationSource.from_url(p, "sqs://q?wait=5")
    p.close()
