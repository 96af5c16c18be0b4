"""The Lambda handler: every AWS event shape in, batch answers out, the pipeline run once.

The conformance payloads (../shared/conformance/aws-events) are real Lambda
events; each is parsed and handled here. The batch-failure tests run user
handlers that fail on purpose and check what Lambda is told. The last tests
run a real pipeline (read_csv → write_parquet, write_table) on S3 and
DynamoDB in moto, through the handler.
"""

from __future__ import annotations

import io
import json
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

import sluiceway
from sluiceway.aws.handler import (
    InvocationFailed,
    LambdaApp,
    first_keys,
)
from sluiceway.events import Event
from sluiceway.pipeline import Pipeline

from .aws_backend import kinesis_record
from .conftest import conformance_dir

SEEN: list[dict[str, Any]] = []


@sluiceway.handler("aws-test-record")
def _record(event: Event, ctx: sluiceway.StepContext) -> None:
    """Remembers every event; fails for payloads that ask it to."""
    SEEN.append(event.to_dict())
    d = event.detail
    payload = d.get("body") or d.get("data") or d.get("message") or d.get("newImage")
    if isinstance(payload, dict) and payload.get("fail"):
        raise RuntimeError(f"asked to fail: {payload}")


@pytest.fixture(autouse=True)
def _clear_seen() -> Iterator[None]:
    SEEN.clear()
    yield
    SEEN.clear()


CONFORMANCE_PIPELINE = """
pipeline: conformance
buckets:
  artifacts: ./artifacts
  images: ./images
  source: ./source
  inbox: ./inbox
queues:
  messages: {max_receive_count: 3, backoff_base: 2s, backoff_max: 10s}
  csv: {}
rules:
  - name: transport-messages
    pattern:
      source: [aws.sqs, aws.sns, aws.kinesis, aws.dynamodb]
    targets: [messages]
  - name: new-csv
    pattern:
      detail-type: [Object Created]
      detail: {object: {key: [{suffix: .csv}]}}
    targets: [csv]
functions:
  record:
    queue: messages
    handler: aws-test-record
  csv-handler:
    queue: csv
    handler: aws-test-record
profiles:
  aws:
    buckets:
      artifacts: s3://lambda-artifacts-deafc19498e3f2df
      images: s3://example-bucket
      source: s3://sourcebucket
      inbox: s3://xxx/incoming
"""


class FakeSqs:
    """Records the SQS calls the handler makes (DLQ sends, visibility changes)."""

    def __init__(self) -> None:
        self.sent: list[dict[str, Any]] = []
        self.visibility: list[dict[str, Any]] = []

    def send_message(self, **kwargs: Any) -> dict[str, Any]:
        self.sent.append(kwargs)
        return {"MessageId": f"m{len(self.sent)}"}

    def change_message_visibility(self, **kwargs: Any) -> dict[str, Any]:
        self.visibility.append(kwargs)
        return {}

    def get_queue_url(self, QueueName: str, **kwargs: Any) -> dict[str, Any]:
        return {"QueueUrl": f"https://sqs.example/{QueueName}"}


@pytest.fixture
def conformance_app(
    write_pipeline: Callable[..., Path], monkeypatch: pytest.MonkeyPatch
) -> Iterator[tuple[LambdaApp, FakeSqs]]:
    monkeypatch.delenv("SLUICEWAY_PROFILE", raising=False)
    pipeline = Pipeline.from_file(write_pipeline(CONFORMANCE_PIPELINE), profile="aws")
    sqs = FakeSqs()
    app = LambdaApp(pipeline, dlq_url="https://sqs.example/dlq", sqs_client=sqs)
    yield app, sqs
    pipeline.close()


def load_event(name: str) -> dict[str, Any]:
    return json.loads((conformance_dir("aws-events") / name).read_text())


def events_of(app: LambdaApp, payload: Any) -> list[tuple[str, Event | None]]:
    _, items = app.items(payload)
    return [(p.kind, p.event) for item in items for p in item.parsed]


# -- every conformance payload -----------------------------------------------------------

# file → (source, statuses, batch failures)
EXPECTED = {
    "dynamoStreamEvent.json": ("dynamodb", ["done", "done"]),
    "eventBridgeEvent.json": ("eventbridge", ["unrouted"]),
    "kinesisStreamEvent.json": ("kinesis", ["done", "done"]),
    "kinesisStreamEventOneRecord.json": ("kinesis", ["done"]),
    "s3Event.json": ("s3", ["unrouted"]),
    "s3EventBridgeNotificationObjectCreatedEvent.json": ("eventbridge", ["unrouted"]),
    "s3EventBridgeNotificationObjectDeletedEvent.json": ("eventbridge", ["deleted"]),
    "s3EventDecodedKey.json": ("s3", ["unrouted"]),
    "s3EventDeleteObject.json": ("s3", ["deleted"]),
    "s3SqsEvent.json": ("sqs", ["ignored"]),  # not under the bucket's prefix
    "snsEvent.json": ("sns", ["done"]),
    "snsSqsEvent.json": ("sqs", ["done"]),
    "snsSqsFifoEvent.json": ("sqs", ["done"]),
    "sqsDlqTriggerEvent.json": ("sqs", ["done"]),
    "sqsEvent.json": ("sqs", ["done", "done"]),
}


def test_every_conformance_payload_is_covered() -> None:
    names = {p.name for p in conformance_dir("aws-events").glob("*.json")}
    assert names == set(EXPECTED), "a new payload in ../shared/conformance needs an expectation"


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_conformance_payload_is_handled(
    name: str, conformance_app: tuple[LambdaApp, FakeSqs]
) -> None:
    app, sqs = conformance_app
    source, statuses = EXPECTED[name]
    result = app.handle(load_event(name))
    assert result.source == source
    assert result.statuses() == statuses
    assert result.failures == []
    if result.batch:
        assert result.response() == {"batchItemFailures": []}
    assert sqs.sent == []  # nothing was unrecognised: nothing went to the DLQ


def test_s3_notifications_become_pipeline_bucket_events(
    conformance_app: tuple[LambdaApp, FakeSqs],
) -> None:
    app, _ = conformance_app
    [(kind, event)] = events_of(app, load_event("s3Event.json"))
    assert kind == "event" and event is not None
    assert (event.bucket, event.key, event.etag) == (
        "artifacts",
        "b21b84d653bb07b05b1e6b33684dc11b",
        "b21b84d653bb07b05b1e6b33684dc11b",
    )
    assert event.source == "sluiceway.bucket"  # the same event `sluiceway put` raises
    assert event.detail_type == "Object Created"
    assert event.detail["object"]["size"] == 1305107
    assert event.time == "2019-09-03T19:37:27.192Z"

    # URL-encoded keys are decoded the way S3 encodes them.
    [(_, decoded)] = events_of(app, load_event("s3EventDecodedKey.json"))
    assert decoded is not None and (decoded.bucket, decoded.key) == ("source", "Happy Face.jpg")

    # On EventBridge: the event id and time survive, the key is taken as it is.
    [(_, eb)] = events_of(app, load_event("s3EventBridgeNotificationObjectCreatedEvent.json"))
    assert eb is not None
    assert (eb.id, eb.bucket, eb.key) == (
        "f5f1e65c-dc3a-93ca-6c1e-b1647eac7963",
        "images",
        "IMG_m7fzo3.jpg",
    )
    assert eb.etag == "4e68adba0abe2dc8653dc3354e14c01d"

    # Through SQS, under the pipeline bucket's prefix "incoming/": outside it, ignored.
    [(kind, _)] = events_of(app, load_event("s3SqsEvent.json"))
    assert kind == "ignored"


def test_prefix_of_a_pipeline_bucket_is_stripped(
    conformance_app: tuple[LambdaApp, FakeSqs],
) -> None:
    app, _ = conformance_app
    payload = load_event("s3SqsEvent.json")
    body = json.loads(payload["Records"][0]["body"])
    body["Records"][0]["s3"]["object"]["key"] = "incoming/day+1/test.csv"
    payload["Records"][0]["body"] = json.dumps(body)
    [(kind, event)] = events_of(app, payload)
    assert kind == "event" and event is not None
    assert (event.bucket, event.key) == ("inbox", "day 1/test.csv")
    assert app.targets(event) == ["csv-handler"]


def test_deletions_are_recorded_not_failed(conformance_app: tuple[LambdaApp, FakeSqs]) -> None:
    app, _ = conformance_app
    for name in ("s3EventDeleteObject.json", "s3EventBridgeNotificationObjectDeletedEvent.json"):
        result = app.handle(load_event(name))
        [r] = result.results
        assert r.status == "deleted" and not r.failed
        assert r.detail["bucket"] in ("artifacts", "images")
    assert SEEN == []  # no function ran


def test_plain_messages_become_transport_events(
    conformance_app: tuple[LambdaApp, FakeSqs],
) -> None:
    app, _ = conformance_app
    app.handle(load_event("sqsEvent.json"))
    app.handle(load_event("snsSqsFifoEvent.json"))
    app.handle(load_event("kinesisStreamEventOneRecord.json"))
    app.handle(load_event("dynamoStreamEvent.json"))
    sqs1, sqs2, sns, kinesis, ddb1, ddb2 = SEEN
    assert (sqs1["source"], sqs1["detail-type"]) == ("aws.sqs", "SQS Message")
    assert sqs1["detail"]["body"] == "Test message."
    assert sqs1["detail"]["queue"] == "my-queue"
    assert sqs1["detail"]["attributes"] == {"testAttr": 100}
    assert sqs2["detail"]["body"] == {"message": "foo1"}
    assert sns["source"] == "aws.sns"
    assert sns["id"] == "a7c9d2fa-77fa-5184-9de9-89391027cc7d"  # SNS's id, not SQS's
    assert sns["detail"]["message"] == {"message": "hello world", "username": "lessa"}
    assert sns["detail"]["topic"] == "Test.fifo"
    assert kinesis["detail"]["data"] == {"message": "test message", "username": "test"}
    assert kinesis["detail"]["stream"] == "lambda-stream"
    assert ddb1["detail"]["newImage"] == {"Message": "New item!", "Id": 101}
    assert ddb2["detail"]["eventName"] == "MODIFY"
    assert ddb2["detail"]["oldImage"]["Message"] == "New item!"


def test_redelivery_is_recognised_by_the_ledger(
    conformance_app: tuple[LambdaApp, FakeSqs],
) -> None:
    app, _ = conformance_app
    payload = load_event("snsSqsEvent.json")
    assert app.handle(payload).statuses() == ["done"]
    assert app.handle(payload).statuses() == ["duplicate"]
    assert len(SEEN) == 1


# -- bad input --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "payload",
    [
        {"foo": 1, "bar": {"baz": 2}},
        [1, 2, 3],
        "just text",
        None,
        {"Records": [{"eventSource": "aws:unknown", "x": 1}]},
        {"Records": ["not an object"]},
    ],
)
def test_unknown_shapes_go_to_the_dlq_and_are_acknowledged(
    payload: Any, conformance_app: tuple[LambdaApp, FakeSqs]
) -> None:
    app, sqs = conformance_app
    result = app.handle(payload)  # never raises
    assert result.statuses() == ["unrecognized"]
    assert result.failures == []
    [sent] = sqs.sent
    assert sent["QueueUrl"] == "https://sqs.example/dlq"
    failure = json.loads(sent["MessageAttributes"]["sluiceway.failure"]["StringValue"])
    assert failure["error_type"] == "UnrecognizedEvent"
    if isinstance(payload, dict) and "foo" in payload:
        assert "{foo, bar}" in failure["message"]  # reported with its first keys


def test_an_unknown_record_in_an_sqs_batch_does_not_fail_the_batch(
    conformance_app: tuple[LambdaApp, FakeSqs],
) -> None:
    app, sqs = conformance_app
    payload = load_event("sqsEvent.json")
    broken = dict(
        payload["Records"][0], body=json.dumps({"Records": [{"eventSource": "aws:s3", "s3": {}}]})
    )
    broken["messageId"] = "broken-1"
    payload["Records"].append(broken)
    result = app.handle(payload)
    assert result.statuses() == ["done", "done", "unrecognized"]
    assert result.response() == {"batchItemFailures": []}
    [sent] = sqs.sent
    assert json.loads(sent["MessageBody"])["Records"][0]["s3"] == {}  # the body as it came


def test_without_a_dlq_unknown_shapes_are_still_acknowledged(
    write_pipeline: Callable[..., Path],
) -> None:
    pipeline = Pipeline.from_file(write_pipeline(CONFORMANCE_PIPELINE))
    app = LambdaApp(pipeline)
    assert app.handle({"nope": True}).statuses() == ["unrecognized"]
    pipeline.close()


def test_first_keys() -> None:
    assert first_keys({"a": 1, "b": 2}) == "{a, b}"
    assert first_keys({str(i): i for i in range(9)}) == "{0, 1, 2, 3, 4, 5, …}"
    assert first_keys([1]) == "a JSON array of 1 items"


# -- partial batch failures --------------------------------------------------------------


def sqs_record(i: int, body: Any, *, receives: int = 1, fifo: bool = False) -> dict[str, Any]:
    queue = "p-messages.fifo" if fifo else "p-messages"
    attributes = {"ApproximateReceiveCount": str(receives), "SentTimestamp": "1700000000000"}
    if fifo:
        attributes["MessageGroupId"] = "g1"
    return {
        "messageId": f"msg-{i}",
        "receiptHandle": f"receipt-{i}",
        "body": json.dumps(body),
        "attributes": attributes,
        "messageAttributes": {},
        "eventSource": "aws:sqs",
        "eventSourceARN": f"arn:aws:sqs:us-east-1:123456789012:{queue}",
        "awsRegion": "us-east-1",
    }


def test_sqs_batch_reports_only_the_failed_messages(
    conformance_app: tuple[LambdaApp, FakeSqs],
) -> None:
    app, sqs = conformance_app
    records = [sqs_record(i, {"n": i, "fail": i in (1, 3)}) for i in range(5)]
    result = app.handle({"Records": records})
    assert result.response() == {
        "batchItemFailures": [{"itemIdentifier": "msg-1"}, {"itemIdentifier": "msg-3"}]
    }
    assert result.statuses() == ["done", "retry", "done", "retry", "done"]
    # Retries come back after the pipeline's backoff, not the queue's long timeout.
    assert [v["ReceiptHandle"] for v in sqs.visibility] == ["receipt-1", "receipt-3"]
    assert all(0 <= v["VisibilityTimeout"] <= 2 for v in sqs.visibility)
    # The retry succeeds: only the failed ones run again; the others are duplicates.
    again = app.handle({"Records": [sqs_record(i, {"n": i}) for i in range(5)]})
    assert again.statuses() == ["duplicate", "done", "duplicate", "done", "duplicate"]


def test_message_past_max_receive_count_goes_to_the_dlq_with_its_failure(
    conformance_app: tuple[LambdaApp, FakeSqs],
) -> None:
    app, sqs = conformance_app
    record = sqs_record(7, {"fail": True}, receives=3)  # max_receive_count: 3
    result = app.handle({"Records": [record]})
    assert result.statuses() == ["dead"]
    assert result.failures == []  # in the DLQ now: acknowledged
    [sent] = sqs.sent
    assert sent["MessageBody"] == record["body"]  # redrivable as it was
    failure = json.loads(sent["MessageAttributes"]["sluiceway.failure"]["StringValue"])
    assert failure["error_type"] == "RuntimeError" and failure["attempt"] == 3
    assert sent["MessageAttributes"]["sluiceway.source"]["StringValue"] == "conformance"


def test_fifo_batch_stops_at_the_first_failure(
    conformance_app: tuple[LambdaApp, FakeSqs],
) -> None:
    app, _ = conformance_app
    records = [sqs_record(i, {"n": i, "fail": i == 1}, fifo=True) for i in range(4)]
    result = app.handle({"Records": records})
    assert result.statuses() == ["done", "retry", "not_started", "not_started"]
    assert [f["itemIdentifier"] for f in result.response()["batchItemFailures"]] == [
        "msg-1",
        "msg-2",
        "msg-3",
    ]
    assert [e["detail"]["body"]["n"] for e in SEEN] == [0, 1]


def test_kinesis_checkpoints_at_the_first_failed_record(
    conformance_app: tuple[LambdaApp, FakeSqs],
) -> None:
    app, _ = conformance_app
    records = [kinesis_record(100 + i, {"n": i, "fail": i == 2}) for i in range(5)]
    result = app.handle({"Records": records})
    assert result.response() == {"batchItemFailures": [{"itemIdentifier": "102"}]}
    assert result.statuses() == ["done", "done", "retry", "not_started", "not_started"]


def test_dynamodb_stream_reports_sequence_numbers(
    conformance_app: tuple[LambdaApp, FakeSqs],
) -> None:
    app, _ = conformance_app
    payload = load_event("dynamoStreamEvent.json")
    payload["Records"][1]["dynamodb"]["NewImage"]["fail"] = {"BOOL": True}
    result = app.handle(payload)
    assert result.response() == {"batchItemFailures": [{"itemIdentifier": "222"}]}
    assert result.statuses() == ["done", "retry"]


def test_out_of_time_records_are_not_started_and_come_back(
    conformance_app: tuple[LambdaApp, FakeSqs],
) -> None:
    app, _ = conformance_app

    class Context:
        def get_remaining_time_in_millis(self) -> int:
            return 1_000

    records = [sqs_record(i, {"n": i}) for i in range(2)]
    result = app.handle({"Records": records}, Context())
    assert result.statuses() == ["not_started", "not_started"]
    assert len(result.failures) == 2
    streams = app.handle({"Records": [kinesis_record(1, {}), kinesis_record(2, {})]}, Context())
    assert streams.failures == ["1"]  # retried from the first one not started
    assert SEEN == []


def test_direct_invocation_failure_raises_for_lambdas_own_retries(
    conformance_app: tuple[LambdaApp, FakeSqs],
) -> None:
    app, _ = conformance_app
    payload = load_event("snsEvent.json")
    payload["Records"][0]["Sns"]["Message"] = json.dumps({"fail": True})
    with pytest.raises(InvocationFailed, match="asked to fail"):
        app.handle(payload)


def test_pinned_function_and_source_queue(
    write_pipeline: Callable[..., Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("SLUICEWAY_PROFILE", raising=False)
    pipeline = Pipeline.from_file(write_pipeline(CONFORMANCE_PIPELINE), profile="aws")
    app = LambdaApp(pipeline, function="csv-handler", queue_prefix="p-", sqs_client=FakeSqs())
    # A message on the queue of another function is not this Lambda's business.
    assert app.handle({"Records": [sqs_record(1, {"n": 1})]}).statuses() == ["unrouted"]
    # A message on this function's own queue runs it, whatever the rules say.
    record = sqs_record(2, {"n": 2})
    record["eventSourceARN"] = "arn:aws:sqs:us-east-1:123456789012:p-csv"
    assert app.handle({"Records": [record]}).statuses() == ["done"]
    assert app.source_queue("arn:aws:sqs:us-east-1:1:p-csv.fifo") == "csv"
    assert app.source_queue("arn:aws:sqs:us-east-1:1:other") is None
    pipeline.close()


def test_stream_functions_need_the_state_next_to_a_dynamodb_ledger(
    write_pipeline: Callable[..., Path],
) -> None:
    path = write_pipeline(
        """
        pipeline: s
        buckets: {lake: ./lake}
        streams: {events: {}}
        functions:
          to-lake:
            stream: events
            steps:
              - write_dataset: {bucket: lake, prefix: e, partition_by: [event_name]}
        """
    )
    pipeline = Pipeline.from_file(path)
    with pytest.raises(sluiceway.ConfigError, match="SLUICEWAY_LEDGER=dynamodb://"):
        LambdaApp(pipeline, function="to-lake")
    pipeline.close()


# -- a real pipeline on S3 and DynamoDB (moto) -------------------------------------------

S3_PIPELINE = """
pipeline: lam
buckets:
  bronze: ./bronze
  staging: ./staging
topics:
  landed: {subscriptions: [to-parquet, to-table]}
queues:
  to-parquet: {max_receive_count: 3}
  to-table: {max_receive_count: 3}
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
functions:
  csv-to-parquet:
    queue: to-parquet
    steps:
      - read_csv
      - write_parquet: {bucket: staging}
  csv-to-table:
    queue: to-table
    steps:
      - read_csv
      - write_table: {table: customers}
"""

CSV = b"customer_id,name\n1,Ada\n2,Grace\n3,Edsger\n"


def _eventbridge_body(bucket: str, key: str, etag: str, size: int) -> str:
    """What EventBridge puts into SQS for an S3 "Object Created"."""
    return json.dumps(
        {
            "version": "0",
            "id": "7e7a0c6c-0000-4000-8000-000000000001",
            "detail-type": "Object Created",
            "source": "aws.s3",
            "account": "123456789012",
            "time": "2026-11-24T10:00:00Z",
            "region": "us-east-1",
            "resources": [f"arn:aws:s3:::{bucket}"],
            "detail": {
                "version": "0",
                "bucket": {"name": bucket},
                "object": {"key": key, "size": size, "etag": etag, "sequencer": "01"},
                "reason": "PutObject",
            },
        }
    )


def test_pipeline_runs_on_s3_and_dynamodb(
    aws: str, write_pipeline: Callable[..., Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    boto3 = pytest.importorskip("boto3")
    import pyarrow.parquet as pq

    path = write_pipeline(textwrap.dedent(S3_PIPELINE))
    s3 = boto3.client("s3", endpoint_url=aws, region_name="us-east-1")
    for name in ("lam-bronze", "lam-staging"):
        s3.create_bucket(Bucket=name)
    put = s3.put_object(Bucket="lam-bronze", Key="in/customers.csv", Body=CSV)
    etag = put["ETag"].strip('"')
    opts = f"endpoint_url={aws}&region=us-east-1&path_style=true"
    dynamo = f"dynamodb://?endpoint_url={aws}&region=us-east-1&table_prefix=lam-"
    env = {
        "SLUICEWAY_PIPELINE": str(path),
        "SLUICEWAY_BUCKETS": json.dumps(
            {"bronze": f"s3://lam-bronze?{opts}", "staging": f"s3://lam-staging?{opts}"}
        ),
        "SLUICEWAY_LEDGER": dynamo,
        "SLUICEWAY_TABLES": dynamo,
        "SLUICEWAY_STATE_DIR": str(path.parent / "state"),
    }
    monkeypatch.delenv("SLUICEWAY_PROFILE", raising=False)
    body = _eventbridge_body("lam-bronze", "in/customers.csv", etag, len(CSV))
    for function, queue in (("csv-to-parquet", "to-parquet"), ("csv-to-table", "to-table")):
        app = LambdaApp.from_env({**env, "SLUICEWAY_FUNCTION": function})
        record = sqs_record(1, {})
        record["body"] = body
        record["eventSourceARN"] = f"arn:aws:sqs:us-east-1:123456789012:{queue}"
        result = app.handle({"Records": [record]})
        assert result.statuses() == ["done"], result.results
        assert result.response() == {"batchItemFailures": []}
        # SQS delivers again (at least once): the ledger in DynamoDB recognises it.
        assert app.handle({"Records": [record]}).statuses() == ["duplicate"]
        app.pipeline.close()

    obj = s3.get_object(Bucket="lam-staging", Key="in/customers.parquet")
    table = pq.read_table(io.BytesIO(obj["Body"].read()))
    assert table.num_rows == 3
    ddb = boto3.client("dynamodb", endpoint_url=aws, region_name="us-east-1")
    items = ddb.scan(TableName="lam-lam-table-customers")["Items"]
    assert sorted(i["name"]["S"] for i in items) == ["Ada", "Edsger", "Grace"]
    entries = ddb.scan(TableName="lam-lam-ledger-entries")["Items"]
    assert sorted(e["status"]["S"] for e in entries) == ["done", "done"]


def test_from_env_needs_a_shared_ledger(
    write_pipeline: Callable[..., Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("SLUICEWAY_PROFILE", raising=False)
    path = write_pipeline(textwrap.dedent(S3_PIPELINE))
    with pytest.raises(sluiceway.ConfigError, match="ledger must be shared"):
        LambdaApp.from_env({"SLUICEWAY_PIPELINE": str(path)})
    with pytest.raises(sluiceway.ConfigError, match="unknown bucket 'gold'"):
        LambdaApp.from_env(
            {"SLUICEWAY_PIPELINE": str(path), "SLUICEWAY_BUCKETS": '{"gold": "s3://x"}'}
        )


def test_a_record_that_cannot_be_read_now_is_retried_not_dropped(
    conformance_app: tuple[LambdaApp, FakeSqs], monkeypatch: pytest.MonkeyPatch
) -> None:
    app, sqs = conformance_app

    def unreachable(self: LambdaApp, obj: Any) -> Any:
        raise ConnectionError("S3 did not answer")

    monkeypatch.setattr(LambdaApp, "_bucket_notes", unreachable)
    payload = load_event("s3SqsEvent.json")
    result = app.handle(payload)
    assert result.statuses() == ["error"]
    assert result.response() == {
        "batchItemFailures": [{"itemIdentifier": payload["Records"][0]["messageId"]}]
    }
    assert sqs.sent == []  # a transient failure is no reason for the DLQ
