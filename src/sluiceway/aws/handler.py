"""The Lambda entry point: ``sluiceway.aws.handler.handler``.

One Lambda function runs one pipeline function. The deployment package holds
the project and the pipeline file; environment variables say which file, which
function and where its backends are (Terraform from ``sluiceway deploy
terraform`` sets them all):

``SLUICEWAY_PIPELINE``
    The pipeline file, relative to the package root (``LAMBDA_TASK_ROOT``).
    Default ``pipeline/sluiceway.yaml``, where ``sluiceway package`` puts it.
``SLUICEWAY_FUNCTION``
    The pipeline function this Lambda runs. Without it, every queue function
    the rules route an event to runs here.
``SLUICEWAY_PROFILE``
    The pipeline's profile for AWS (``s3://`` buckets, ``dynamodb://`` ledger
    and tables), if it has one.
``SLUICEWAY_BUCKETS``, ``SLUICEWAY_LEDGER``, ``SLUICEWAY_TABLES``, ``SLUICEWAY_BROKER``
    Override the profile: a JSON object ``{"bronze": "s3://real-name"}`` and
    backend URLs. The deployment knows the real names, so they win.
``SLUICEWAY_QUEUE_PREFIX``
    What the SQS queue names have before the pipeline's queue names (default:
    the ``prefix`` of the profile's ``sqs://`` broker URL).
``SLUICEWAY_DLQ_URL``
    The SQS dead-letter queue for payloads the handler does not understand
    and for messages that failed ``max_receive_count`` times; for a stream
    function, its failure queue (records that are no events go there too).
``SLUICEWAY_DESTINATIONS``
    JSON ``{"queue:NAME": URL, "topic:NAME": ARN}`` for publishing steps and
    ``on_success``/``on_error``: sent to directly, so the function's role needs
    only ``sqs:SendMessage``/``sns:Publish`` on them, not the rights to create
    queues and topics that the ``sqs://`` broker uses at start.
``SLUICEWAY_STATE_DIR``
    Scratch state (the worker's activity record); default ``/tmp/sluiceway``,
    the only writable place on Lambda. Nothing there needs to outlive an
    invocation: the ledger that must is in DynamoDB.

What it accepts
---------------
S3 notifications (direct, or as SQS bodies, raw or wrapped by SNS), S3 events
on EventBridge (direct or as SQS bodies), SQS batches (also FIFO), SNS, other
EventBridge events, Kinesis and DynamoDB Streams batches. Each becomes a
Sluiceway :class:`~sluiceway.events.Event`:

- an object created in an S3 bucket that is one of the pipeline's becomes the
  same "Object Created" event ``sluiceway put`` raises locally: pipeline bucket
  name, key inside the bucket's prefix, ETag as version. Rules written for the
  local pipeline therefore match unchanged;
- an event envelope (EventBridge shape) stays what it is;
- anything else becomes an event of its transport (``aws.sqs`` "SQS Message",
  ``aws.sns`` "SNS Notification", ``aws.kinesis`` "Kinesis Record",
  ``aws.dynamodb`` "DynamoDB Stream Record") with the payload in ``detail``,
  so a rule can send it to a ``handler:`` function.

A Kinesis batch from the stream of a stream function (``stream:``; the
function this Lambda is pinned to, or the one whose stream the ARN names,
after ``SLUICEWAY_QUEUE_PREFIX``) is not routed as events: it is that
function's next flush, exactly once through retries and crashes, with its
dedup keys and shard checkpoints in DynamoDB next to the ledger; see
:mod:`sluiceway.aws.streams`.

Which function runs: a message from one of the pipeline's queues belongs to the
function that queue feeds (EventBridge or SNS already routed it there);
anything else goes through the pipeline's rules (topics fan out to their
queues) to the functions of the target queues. ``SLUICEWAY_FUNCTION`` keeps
only that one. The function runs through :meth:`Worker.process
<sluiceway.worker.Worker.process>`: claim in the ledger, run, commit, mark
done. A re-delivered message of finished work is only acknowledged.

What it answers
---------------
Batches (SQS, Kinesis, DynamoDB Streams) get ``{"batchItemFailures": […]}``
(enable ``ReportBatchItemFailures`` on the event source mapping): SQS message
ids of the messages to retry (on a FIFO queue, the first failure and every
message after it, so order holds); for streams, the sequence number of the
first failed record only (Lambda checkpoints there and retries from it; the
records after it are not even started). A retried SQS message is made visible
again after the pipeline's backoff instead of the queue's long visibility
timeout; after ``max_receive_count`` receives it goes to the DLQ with its
failure record, as on every other broker.

Deletions, S3 test events and events no rule routes to this function are
acknowledged and logged (one JSON line each), never failed. A payload of a
shape the handler does not know is logged with its first keys, sent to the
DLQ with a failure record, and acknowledged: it can never make Lambda retry
forever. Direct (asynchronous) invocations raise :class:`InvocationFailed`
when processing failed, so Lambda's own bounded retries apply.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import json
import logging
import math
import os
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from .. import backends
from ..buckets.base import ObjectInfo, ObjectNotFound
from ..config import ProfileConfig, expand_env
from ..config import load as load_config
from ..errors import ConfigError, SluicewayError
from ..events import BUCKET_SOURCE, Event, object_created
from ..notifications import (
    AWS_S3_SOURCE,
    BucketNotification,
    Kind,
    UnrecognizedNotification,
    parse_notification,
)
from ..pipeline import Pipeline
from ..queues.base import Broker, Message, OutgoingMessage, Queue, QueueCounts, QueueSpec

# Sluiceway's SQS message attributes: the same as the sqs:// broker's, so its
# consumers, `dlq list` and `dlq redrive` read what Lambda sends.
from ..queues.sqs import A_ATTRS, A_DEAD_AT, A_FAILURE, A_ID, A_RECEIVES, A_SENT_AT, A_SOURCE
from ..router import Router
from ..tables.base import Table
from ..worker import Worker
from .streams import (
    FlushOutcome,
    KinesisRecord,
    LambdaStreamFunction,
    StreamState,
    parse_record,
)
from .streams import check_function as check_stream_function

log = logging.getLogger("sluiceway.aws")

ENV_PIPELINE = "SLUICEWAY_PIPELINE"
ENV_FUNCTION = "SLUICEWAY_FUNCTION"
ENV_PROFILE = "SLUICEWAY_PROFILE"
ENV_BUCKETS = "SLUICEWAY_BUCKETS"
ENV_LEDGER = "SLUICEWAY_LEDGER"
ENV_TABLES = "SLUICEWAY_TABLES"
ENV_BROKER = "SLUICEWAY_BROKER"
ENV_QUEUE_PREFIX = "SLUICEWAY_QUEUE_PREFIX"
ENV_DLQ_URL = "SLUICEWAY_DLQ_URL"
ENV_DESTINATIONS = "SLUICEWAY_DESTINATIONS"
ENV_STATE_DIR = "SLUICEWAY_STATE_DIR"
DEFAULT_PIPELINE = "pipeline/sluiceway.yaml"
DEFAULT_STATE_DIR = "/tmp/sluiceway"
LAMBDA_PROFILE = "lambda"  # the profile made from the environment when the file has none

MAX_DLQ_BODY = 200_000  # bytes; SQS takes 256 KiB with the attributes
# Stop starting new records when less than this is left of the invocation:
# what is not started is reported failed and comes back, instead of being cut
# off half done by the timeout.
TIME_MARGIN_MS = 10_000

# Statuses after which a record is acknowledged (not retried).
SETTLED = {"done", "duplicate", "skipped", "dead", "deleted", "ignored", "unrouted", "unrecognized"}


class InvocationFailed(SluicewayError):
    """A direct (asynchronous) invocation failed: raised so Lambda retries it (twice at most)."""


# -- what an invocation holds ------------------------------------------------------


@dataclass(frozen=True)
class Parsed:
    """One thing a record turned out to say.

    ``kind``: ``event`` (run the functions it routes to), ``deleted`` (an
    object deletion: recorded, nothing to run), ``ignored`` (nothing for this
    pipeline: S3 test events, buckets it does not have, …) or ``unrecognized``
    (a shape the handler does not know: to the DLQ).
    """

    kind: str
    event: Event | None = None
    reason: str = ""


@dataclass
class Item:
    """One record of an invocation (or the whole payload of a direct one)."""

    source: str  # sqs | sns | s3 | eventbridge | kinesis | dynamodb | unknown
    ident: str | None  # what batchItemFailures names: SQS message id, stream sequence number
    raw: str  # the payload as text, for the DLQ
    parsed: list[Parsed]
    message_id: str
    receive_count: int = 1
    receipt: str = ""
    queue_arn: str | None = None
    group: str | None = None
    sent_at: float = field(default_factory=time.time)
    attributes: dict[str, Any] = field(default_factory=dict)


@dataclass
class ItemResult:
    """What happened to one event of one record (a record can carry several)."""

    ident: str | None
    source: str
    status: str  # done | duplicate | skipped | dead | retry | busy | error | not_started | …
    function: str | None = None
    detail: dict[str, Any] = field(default_factory=dict)

    @property
    def failed(self) -> bool:
        return self.status not in SETTLED

    def to_dict(self) -> dict[str, Any]:
        return {
            "item": self.ident,
            "source": self.source,
            "status": self.status,
            "function": self.function,
            **self.detail,
        }


@dataclass
class InvocationResult:
    """Everything one invocation did, and what to answer Lambda."""

    source: str
    batch: bool  # answered with batchItemFailures (SQS, Kinesis, DynamoDB Streams)
    results: list[ItemResult] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)  # item identifiers to retry

    def response(self) -> dict[str, Any]:
        """The return value for Lambda: for batches exactly ``{"batchItemFailures": […]}``."""
        if self.batch:
            return {"batchItemFailures": [{"itemIdentifier": i} for i in self.failures]}
        return {"source": self.source, "results": [r.to_dict() for r in self.results]}

    def statuses(self) -> list[str]:
        return [r.status for r in self.results]


# -- shapes ------------------------------------------------------------------------------


def first_keys(payload: Any, n: int = 6) -> str:
    """What a payload looks like, for an error message: its first keys, or its type."""
    if isinstance(payload, Mapping):
        keys = [str(k) for k in list(payload)[:n]]
        more = ", …" if len(payload) > n else ""
        return "{" + ", ".join(keys) + more + "}" if keys else "{} (empty object)"
    if isinstance(payload, list):
        return f"a JSON array of {len(payload)} items"
    if isinstance(payload, str | bytes):
        return f"text {payload[:40]!r}"
    return type(payload).__name__


def _iso(value: Any) -> str | None:
    """Epoch seconds or milliseconds (or text already) as ISO 8601, for an event's ``time``."""
    if value in (None, ""):
        return None
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            return value
    if not isinstance(value, int | float) or isinstance(value, bool):
        return None
    seconds = value / 1000 if value > 1e11 else value
    return datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _json_or_text(data: str | bytes) -> Any:
    """A payload as JSON when it is a JSON object or array, else as text."""
    text = data.decode("utf-8", errors="replace") if isinstance(data, bytes) else data
    stripped = text.lstrip()
    if stripped[:1] in ("{", "["):
        try:
            return json.loads(text)
        except ValueError:
            pass
    return text


def _is_envelope(obj: Mapping[str, Any]) -> bool:
    return "detail-type" in obj and "source" in obj and "id" in obj


def _is_s3_notification(obj: Mapping[str, Any]) -> bool:
    if obj.get("Event") == "s3:TestEvent":
        return True
    records = obj.get("Records")
    if not isinstance(records, list) or not records or not isinstance(records[0], Mapping):
        return False
    source = str(records[0].get("eventSource") or "")
    return "s3" in records[0] and source.endswith(":s3")


def _sqs_attributes(raw: Mapping[str, Any]) -> dict[str, Any]:
    """Lambda's ``messageAttributes`` (``stringValue``/``dataType``) as plain values."""
    out: dict[str, Any] = {}
    for name, value in (raw or {}).items():
        if not isinstance(value, Mapping):
            continue
        text = value.get("stringValue")
        if text is None:
            out[name] = value.get("binaryValue")
        elif str(value.get("dataType", "")).startswith("Number"):
            try:
                out[name] = int(text)
            except ValueError:
                try:
                    out[name] = float(text)
                except ValueError:
                    out[name] = text
        else:
            out[name] = text
    return out


def _sns_attributes(raw: Mapping[str, Any]) -> dict[str, Any]:
    """SNS's ``MessageAttributes`` (``Type``/``Value``) as plain values."""
    return {k: v.get("Value") if isinstance(v, Mapping) else v for k, v in (raw or {}).items()}


def _arn_name(arn: str | None) -> str:
    """The resource name at the end of an ARN (``…:queue-name``, ``…:stream/name``)."""
    if not arn:
        return ""
    tail = arn.rsplit(":", 1)[-1]
    return tail.split("/")[1] if tail.startswith(("stream/", "table/")) else tail


def _deserialize_image(image: Any) -> Any:
    """A DynamoDB Streams image (``{"N": "1"}`` …) as plain JSON values."""
    if not isinstance(image, Mapping):
        return image
    from boto3.dynamodb.types import TypeDeserializer

    de = TypeDeserializer()

    def plain(value: Any) -> Any:
        from decimal import Decimal

        if isinstance(value, Decimal):
            return int(value) if value == value.to_integral_value() else float(value)
        if isinstance(value, Mapping):
            return {k: plain(v) for k, v in value.items()}
        if isinstance(value, list | set | frozenset | tuple):
            return [plain(v) for v in value]
        if isinstance(value, bytes | bytearray):
            return base64.b64encode(bytes(value)).decode()
        inner = getattr(value, "value", None)
        if isinstance(inner, bytes):
            return base64.b64encode(inner).decode()
        return value

    try:
        return {k: plain(de.deserialize(v)) for k, v in image.items()}
    except (TypeError, ValueError, AttributeError):
        return dict(image)  # not typed the way DynamoDB types it: keep as it came


@dataclass(frozen=True)
class _Origin:
    """The transport a payload came by: what a plain (non-event) payload becomes."""

    source: str
    detail_type: str
    id: str
    time: str | None
    region: str | None
    resources: tuple[str, ...]
    detail: dict[str, Any]
    payload_field: str

    def event(self, payload: Any) -> Event:
        kwargs: dict[str, Any] = {"id": self.id, "resources": self.resources}
        if self.time:
            kwargs["time"] = self.time
        if self.region:
            kwargs["region"] = self.region
        detail = {**self.detail, self.payload_field: payload}
        return Event(source=self.source, detail_type=self.detail_type, detail=detail, **kwargs)


# -- publishing from Lambda ------------------------------------------------------------


class _NotAvailable(Queue):
    """Base for the queues the handler hands out: only what Lambda needs works."""

    def __init__(self, spec: QueueSpec) -> None:
        self.spec = spec

    def _unsupported(self, what: str) -> Any:
        raise SluicewayError(f"queue {self.name}: {what} is not available inside a Lambda function")

    def send_batch(self, messages: Sequence[OutgoingMessage]) -> list[str]:
        return self._unsupported("sending")  # type: ignore[no-any-return]

    def receive(self, max_messages: int = 1, *, wait: float = 0.0) -> list[Message]:
        return []

    def ack(self, messages: Sequence[Message]) -> int:
        return 0

    def change_visibility(self, message: Message, seconds: float) -> bool:
        return False

    def dead_letter(self, message: Message, failure: dict[str, Any]) -> None:
        self._unsupported("dead-lettering")

    def record_failure(self, message: Message, failure: dict[str, Any], retry_in: float) -> bool:
        return False

    def counts(self) -> QueueCounts:
        return QueueCounts()

    def peek(self, limit: int = 100) -> list[Message]:
        return []

    def redrive(self, to: Queue, ids: Sequence[str] | None = None) -> int:
        return self._unsupported("redrive")  # type: ignore[no-any-return]

    def purge(self) -> int:
        return 0


def _string(value: str) -> dict[str, str]:
    return {"DataType": "String", "StringValue": value}


def _number(value: float) -> dict[str, str]:
    return {"DataType": "Number", "StringValue": f"{value:.6f}"}


def _chunks(entries: list[dict[str, Any]], limit: int = 200_000) -> Iterator[list[dict[str, Any]]]:
    """Batches of at most ten entries and ``limit`` bytes (SQS and SNS take 256 KiB a call)."""
    chunk: list[dict[str, Any]] = []
    size = 0
    for entry in entries:
        n = len(json.dumps(entry, default=str))
        if chunk and (len(chunk) == 10 or size + n > limit):
            yield chunk
            chunk, size = [], 0
        chunk.append(entry)
        size += n
    if chunk:
        yield chunk


class _DestinationQueue(_NotAvailable):
    """A queue publishing steps send to, by URL (``sqs:SendMessage`` is all it needs)."""

    def __init__(self, spec: QueueSpec, url: str, client: Any) -> None:
        super().__init__(spec)
        self.url = url
        self.client = client

    def send_batch(self, messages: Sequence[OutgoingMessage]) -> list[str]:
        ids = [m.id or str(uuid.uuid4()) for m in messages]
        entries = []
        seen: set[str] = set()
        for mid, m in zip(ids, messages, strict=True):
            if mid in seen:
                continue
            seen.add(mid)
            entries.append(_entry(m.body, mid, m.attributes, fifo=self.url.endswith(".fifo")))
            entries[-1]["Id"] = str(len(entries) - 1)
        for chunk in _chunks(entries):
            reply = self.client.send_message_batch(QueueUrl=self.url, Entries=chunk)
            if reply.get("Failed"):
                failed = reply["Failed"][0]
                raise SluicewayError(
                    f"SQS refused a message for queue {self.name}: "
                    f"{failed.get('Code')}: {failed.get('Message')}"
                )
        return ids


def _entry(body: str, mid: str, attributes: Mapping[str, Any], *, fifo: bool) -> dict[str, Any]:
    """One SendMessageBatch/PublishBatch entry in the sqs:// broker's format."""
    attrs: dict[str, dict[str, str]] = {A_ID: _string(mid)}
    if attributes:
        attrs[A_ATTRS] = _string(json.dumps(dict(attributes), default=str))
    entry: dict[str, Any] = {"MessageBody": body, "MessageAttributes": attrs}
    if fifo:
        import hashlib

        group = attributes.get("message_group_id") if attributes else None
        entry["MessageGroupId"] = str(group or "sluiceway")
        entry["MessageDeduplicationId"] = hashlib.sha256(mid.encode()).hexdigest()
    return entry


class LambdaPublisher(Broker):
    """The broker publishing steps use on Lambda: queues by URL, topics by ARN.

    The ``sqs://`` broker creates and configures every queue and topic when it
    starts, which a function's role should not be allowed to do. This one only
    sends, to the destinations the deployment names in
    ``SLUICEWAY_DESTINATIONS``, with the same message attributes, so consumers
    on any broker read the messages the same way.
    """

    def __init__(
        self,
        destinations: Mapping[str, str],
        specs: Mapping[str, QueueSpec],
        *,
        sqs: Any = None,
        sns: Any = None,
    ) -> None:
        self.destinations = dict(destinations)
        self.specs = dict(specs)
        self._sqs = sqs
        self._sns = sns

    def _client(self, service: str) -> Any:
        attr = f"_{service}"
        if getattr(self, attr) is None:
            from ..aws_clients import session

            setattr(self, attr, session().client(service))
        return getattr(self, attr)

    def queue(self, name: str) -> Queue:
        url = self.destinations.get(f"queue:{name}")
        spec = self.specs.get(name, QueueSpec(name))
        if url is None:
            return _NotAvailable(spec)
        return _DestinationQueue(spec, url, self._client("sqs"))

    def publish(self, topic: str, messages: Sequence[OutgoingMessage]) -> None:
        arn = self.destinations.get(f"topic:{topic}")
        if arn is None:
            raise SluicewayError(
                f"topic {topic!r}: no ARN for it in {ENV_DESTINATIONS}; deploy with "
                "`sluiceway deploy terraform`, which sets it"
            )
        entries = []
        seen: set[str] = set()
        for m in messages:
            mid = m.id or str(uuid.uuid4())
            if mid in seen:
                continue
            seen.add(mid)
            entry = _entry(m.body, mid, m.attributes, fifo=arn.endswith(".fifo"))
            entry["Message"] = entry.pop("MessageBody")
            entry["Id"] = str(len(entries))
            entries.append(entry)
        for chunk in _chunks(entries):
            reply = self._client("sns").publish_batch(
                TopicArn=arn, PublishBatchRequestEntries=chunk
            )
            if reply.get("Failed"):
                failed = reply["Failed"][0]
                raise SluicewayError(
                    f"SNS refused a message for topic {topic}: "
                    f"{failed.get('Code')}: {failed.get('Message')}"
                )


class _NoBroker(Broker):
    """On Lambda without destinations or a broker: publishing fails, saying what to set."""

    def queue(self, name: str) -> Queue:
        raise SluicewayError(
            f"queue {name!r}: this Lambda has no way to publish; set {ENV_DESTINATIONS} "
            "(Terraform from `sluiceway deploy terraform` does) or a broker in the profile"
        )

    def publish(self, topic: str, messages: Sequence[OutgoingMessage]) -> None:
        self.queue(topic)


class _LazyTables(Mapping[str, Table]):
    """The pipeline's tables, each opened on first use.

    ``Pipeline.tables`` opens every table at once; on Lambda that would need
    rights on every table for every function. This opens only those the
    function's steps use.
    """

    def __init__(self, pipeline: Pipeline) -> None:
        self.pipeline = pipeline
        self._open: dict[str, Table] = {}

    def __getitem__(self, name: str) -> Table:
        if name not in self._open:
            cfg = self.pipeline.config
            if name not in cfg.tables:
                raise KeyError(name)
            url = cfg.backends.tables
            if url is None:
                from ..tables.sqlite import SqliteTable

                self._open[name] = SqliteTable(self.pipeline.db, name, cfg.tables[name].key)
            else:
                url = expand_env(url)
                make = backends.factory("tables", backends.TABLES, url)
                self._open[name] = make(url, name, list(cfg.tables[name].key), cfg.pipeline)
        return self._open[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self.pipeline.config.tables)

    def __len__(self) -> int:
        return len(self.pipeline.config.tables)


# -- the dead-letter path --------------------------------------------------------------


class DeadLetters:
    """Sends what the handler gives up on to the function's SQS dead-letter queue.

    The message carries the same attributes as the ``sqs://`` broker's dead
    letters (``sluiceway.failure``, ``sluiceway.source`` …), so ``sluiceway dlq
    list`` shows why, and a redrive puts the original body back in the queue.
    """

    def __init__(self, url: str | None, *, source: str, client: Any = None) -> None:
        self.url = url
        self.source = source
        self._client = client

    @property
    def client(self) -> Any:
        if self._client is None:
            from ..aws_clients import session

            self._client = session().client("sqs")
        return self._client

    def send(
        self,
        body: str,
        failure: Mapping[str, Any],
        *,
        message_id: str,
        receives: int = 0,
        group: str | None = None,
    ) -> bool:
        """True once the DLQ has it; False when there is no DLQ (logged as an error)."""
        if not self.url:
            log.error(
                "no dead-letter queue configured (%s): dropping message %s after logging it: %s",
                ENV_DLQ_URL,
                message_id,
                json.dumps({"failure": failure, "body": body[:2000]}, default=str),
            )
            return False
        if len(body.encode()) > MAX_DLQ_BODY:
            body = json.dumps(
                {"truncated": True, "bytes": len(body.encode()), "head": body[:10_000]}
            )
        attrs = {
            A_ID: _string(message_id),
            A_FAILURE: _string(json.dumps(dict(failure), default=str)[:50_000]),
            A_SOURCE: _string(self.source),
            A_DEAD_AT: _number(time.time()),
            A_SENT_AT: _number(time.time()),
        }
        if receives:
            attrs[A_RECEIVES] = _number(receives)
        kwargs: dict[str, Any] = {}
        if self.url.endswith(".fifo"):
            kwargs = {
                "MessageGroupId": group or self.source,
                "MessageDeduplicationId": uuid.uuid4().hex,
            }
        self.client.send_message(
            QueueUrl=self.url, MessageBody=body or "{}", MessageAttributes=attrs, **kwargs
        )
        return True


class _BatchQueue(_NotAvailable):
    """The queue :meth:`Worker.process` sees on Lambda: it records, Lambda's answer acts.

    Lambda's event source mapping owns receiving and deleting. Acking here
    only marks the record done (it is left out of ``batchItemFailures``); a
    retry remembers its backoff (applied with ``ChangeMessageVisibility``
    after the answer is known); a dead letter goes to the DLQ by
    :class:`DeadLetters`, with the record's original body.
    """

    def __init__(self, spec: QueueSpec, dead_letters: DeadLetters, item: Item) -> None:
        super().__init__(spec)
        self.dead_letters = dead_letters
        self.item = item
        self.acked = False
        self.retry_in: float | None = None
        self.dead_lettered = False

    def ack(self, messages: Sequence[Message]) -> int:
        self.acked = True
        return len(messages)

    def change_visibility(self, message: Message, seconds: float) -> bool:
        return True  # Lambda keeps the message hidden while the invocation runs

    def record_failure(self, message: Message, failure: dict[str, Any], retry_in: float) -> bool:
        self.retry_in = retry_in
        return True

    def dead_letter(self, message: Message, failure: dict[str, Any]) -> None:
        try:
            self.dead_lettered = self.dead_letters.send(
                self.item.raw,
                failure,
                message_id=message.id,
                receives=message.receive_count,
                group=self.item.group,
            )
        except Exception:  # the record stays failed; SQS's redrive policy moves it
            log.exception("sending message %s to the dead-letter queue failed", message.id)


# -- the application ---------------------------------------------------------------------


def load_pipeline(
    path: str | os.PathLike[str],
    *,
    profile: str | None = None,
    buckets: Mapping[str, str] | None = None,
    ledger: str | None = None,
    tables: str | None = None,
    broker: str | None = None,
    state_dir: str | None = None,
) -> Pipeline:
    """Load the pipeline with its AWS profile, overlaid with what the deployment says.

    The overlay wins over the profile: the deployment created the resources
    and knows their real names. Without a profile in the file, the overlay is
    the profile (named ``lambda``).
    """
    path = Path(path).resolve()
    cfg = load_config(path, profile)
    active = cfg.backends if cfg.profile else ProfileConfig()
    unknown = sorted(set(buckets or {}) - set(cfg.buckets))
    if unknown:
        raise ConfigError(
            [f"{ENV_BUCKETS}: unknown bucket {unknown[0]!r} (buckets: {', '.join(cfg.buckets)})"]
        )
    merged = active.model_copy(
        update={
            "buckets": {**active.buckets, **(buckets or {})},
            "ledger": ledger or active.ledger,
            "tables": tables or active.tables,
            "broker": broker or active.broker,
        }
    )
    name = cfg.profile or LAMBDA_PROFILE
    cfg.profiles[name] = merged
    cfg.profile = name
    if state_dir is not None:
        cfg.state_dir = state_dir
    return Pipeline(cfg, path)


class LambdaApp:
    """One pipeline (and usually one of its functions) answering Lambda invocations.

    Built once per execution environment (a cold start) and reused by every
    invocation it serves, like the worker process it stands in for.
    """

    def __init__(
        self,
        pipeline: Pipeline,
        *,
        function: str | None = None,
        dlq_url: str | None = None,
        queue_prefix: str | None = None,
        destinations: Mapping[str, str] | None = None,
        sqs_client: Any = None,
        sns_client: Any = None,
        worker_id: str | None = None,
        stream_state: StreamState | None = None,
    ) -> None:
        cfg = pipeline.config
        self.pipeline = pipeline
        self.config = cfg
        if function is not None and function not in cfg.functions:
            known = ", ".join(cfg.functions) or "none"
            raise ConfigError([f"{ENV_FUNCTION}={function!r}: no such function ({known})"])
        self.function = function
        self.queue_prefix = queue_prefix if queue_prefix is not None else self._broker_prefix()
        self._sqs = sqs_client
        self._queue_urls: dict[str, str] = {}
        # One queue per function; the queue a message came from names its function.
        self.queue_functions = {
            fn.queue: name for name, fn in cfg.functions.items() if fn.queue is not None
        }
        runnable = [function] if function else list(self.queue_functions.values())
        # Stream functions answer Kinesis batches of their stream (aws/streams.py).
        self.stream_functions = [
            n for n in ([function] if function else cfg.functions) if cfg.functions[n].stream
        ]
        runnable = [n for n in runnable if n not in self.stream_functions]
        ledger_scheme = backends.scheme_of(cfg.backends.ledger or "") if cfg.backends.ledger else ""
        if self.stream_functions and stream_state is None and ledger_scheme != "dynamodb":
            raise ConfigError(
                [
                    f"stream function {self.stream_functions[0]!r} keeps its checkpoints and "
                    f"dedup keys next to the ledger on Lambda: set {ENV_LEDGER}=dynamodb://…"
                ]
            )
        for name in self.stream_functions:
            check_stream_function(cfg, name)
        self._stream_runners: dict[str, LambdaStreamFunction] = {}
        self._stream_state = stream_state
        own_queue = cfg.functions[function].queue if function else None
        self.dead_letters = DeadLetters(
            dlq_url, source=own_queue or cfg.pipeline, client=sqs_client
        )
        if destinations:
            vars(pipeline)["broker"] = LambdaPublisher(
                destinations, pipeline.queue_specs(), sqs=sqs_client, sns=sns_client
            )
        vars(pipeline)["tables"] = _LazyTables(pipeline)
        # The router only matches; it never sends from here.
        self.router = Router.from_config(cfg.rules, _NoBroker(), set(cfg.topics))
        self.worker = Worker(
            pipeline,
            runnable,
            worker_id=worker_id or f"lambda:{function or cfg.pipeline}:{uuid.uuid4().hex[:12]}",
            announce_outputs=False,  # S3 → EventBridge raises the outputs' events itself
        )
        self._locations: list[tuple[str, str, str]] | None = None

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> LambdaApp:
        """Configured by the environment variables in the module docstring."""
        env = os.environ if environ is None else environ
        root = Path(env.get("LAMBDA_TASK_ROOT") or Path.cwd())
        path = Path(env.get(ENV_PIPELINE) or DEFAULT_PIPELINE)
        if not path.is_absolute():
            path = root / path
        try:
            buckets = json.loads(env.get(ENV_BUCKETS) or "{}")
            destinations = json.loads(env.get(ENV_DESTINATIONS) or "{}")
        except ValueError as e:
            raise ConfigError([f"{ENV_BUCKETS} / {ENV_DESTINATIONS}: not JSON: {e}"]) from None
        pipeline = load_pipeline(
            path,
            profile=env.get(ENV_PROFILE) or None,
            buckets=buckets,
            ledger=env.get(ENV_LEDGER) or None,
            tables=env.get(ENV_TABLES) or None,
            broker=env.get(ENV_BROKER) or None,
            state_dir=env.get(ENV_STATE_DIR) or DEFAULT_STATE_DIR,
        )
        if pipeline.config.backends.ledger is None:
            raise ConfigError(
                [
                    f"{path}: on Lambda the ledger must be shared by every instance: set "
                    f"{ENV_LEDGER}=dynamodb://?region=… or give the profile a ledger"
                ]
            )
        if not destinations and pipeline.config.backends.broker is None:
            vars(pipeline)["broker"] = _NoBroker()
        return cls(
            pipeline,
            function=env.get(ENV_FUNCTION) or None,
            dlq_url=env.get(ENV_DLQ_URL) or None,
            queue_prefix=env.get(ENV_QUEUE_PREFIX),
            destinations=destinations,
        )

    def _broker_prefix(self) -> str | None:
        url = self.config.backends.broker
        if not url or backends.scheme_of(url) != "sqs":
            return None
        from urllib.parse import parse_qs, urlsplit

        from ..queues.conventions import broker_prefix

        given = parse_qs(urlsplit(url).query, keep_blank_values=True).get("prefix", [None])[-1]
        return broker_prefix(given, self.config.pipeline, "", "{pipeline}-")

    @property
    def sqs(self) -> Any:
        if self._sqs is None:
            from ..aws_clients import session

            self._sqs = session().client("sqs")
        return self._sqs

    # -- one invocation -------------------------------------------------------------

    def handle(self, payload: Any, context: Any = None) -> InvocationResult:
        """Process one invocation; never raises for bad input (see the module docstring)."""
        functions = self._stream_targets(payload)
        if functions:
            return self._handle_stream(payload["Records"], functions, context)
        source, items = self.items(payload)
        batch = source in ("sqs", "kinesis", "dynamodb")
        result = InvocationResult(source=source, batch=batch)
        fifo = source == "sqs" and any((i.queue_arn or "").endswith(".fifo") for i in items)
        stream = source in ("kinesis", "dynamodb")
        stop = False
        for item in items:
            if stop or self._out_of_time(context):
                # Not started: SQS gets every one back; a stream retries from
                # the first of them, unless an earlier record failed already.
                if item.ident is not None and (not stream or not result.failures):
                    result.failures.append(item.ident)
                stop = True
                result.results.append(ItemResult(item.ident, item.source, "not_started"))
                continue
            outcomes = self._process_item(item)
            result.results.extend(outcomes)
            if any(o.failed for o in outcomes):
                if item.ident is not None:
                    result.failures.append(item.ident)
                # Streams retry from the first failure; FIFO keeps order: stop here.
                stop = stream or fifo
        for r in result.results:
            log.info(json.dumps({"sluiceway": r.to_dict()}, default=str))
        if not batch and any(r.failed for r in result.results):
            failed = [r.to_dict() for r in result.results if r.failed]
            raise InvocationFailed(f"{len(failed)} events failed: {json.dumps(failed)[:2000]}")
        return result

    # -- stream functions ---------------------------------------------------------------

    def _stream_targets(self, payload: Any) -> list[str]:
        """The stream functions a Kinesis batch is for: the pinned one, or its stream's."""
        if not self.stream_functions or not isinstance(payload, Mapping):
            return []
        records = payload.get("Records")
        if not isinstance(records, list) or not records:
            return []
        if not all(
            isinstance(r, Mapping) and r.get("eventSource") == "aws:kinesis" for r in records
        ):
            return []
        if self.function is not None:  # its own event source mapping: its stream
            return [self.function]
        name = _arn_name(records[0].get("eventSourceARN"))
        if self.queue_prefix and name.startswith(self.queue_prefix):
            name = name[len(self.queue_prefix) :]
        return [n for n in self.stream_functions if self.config.functions[n].stream == name]

    def stream_runner(self, function: str) -> LambdaStreamFunction:
        if function not in self._stream_runners:
            if self._stream_state is None:
                url = self.config.backends.ledger
                assert url is not None
                self._stream_state = StreamState.from_url(url, self.config.pipeline)
            self._stream_runners[function] = LambdaStreamFunction(
                self.pipeline,
                function,
                self._stream_state,
                self.dead_letters,
                worker_id=self.worker.worker_id,
            )
        return self._stream_runners[function]

    def _handle_stream(
        self, raw: list[Mapping[str, Any]], functions: list[str], context: Any
    ) -> InvocationResult:
        """One Kinesis batch, one flush per function (see aws/streams.py)."""
        result = InvocationResult(source="kinesis", batch=True)
        records: list[KinesisRecord] = []
        for r in raw:
            try:
                records.append(parse_record(r))
            except (KeyError, TypeError, ValueError) as e:
                item = self._unknown(r, f"a Kinesis record without a sequence number: {e}")
                result.results.append(self._unrecognized(item, item.parsed[0].reason))
        failed: list[str] = []
        for function in functions:
            try:
                outcomes = self.stream_runner(function).handle(records, context)
            except Exception as e:  # the state table unreachable, …: the whole batch again
                log.exception("stream function %s could not start", function)
                first = min((r.number for r in records), default=None)
                outcomes = [
                    FlushOutcome("error", "", str(first or ""), "", {"error": f"{e}"[:2000]})
                ]
            for o in outcomes:
                detail = {"shard": o.shard, "from_seq": o.from_seq, "to_seq": o.to_seq}
                detail.update(_summary(o.detail))
                if "replay" in o.detail:  # it rewrote an unfinished flush's files
                    detail["replay"] = o.detail["replay"]
                item = ItemResult(o.from_seq, "kinesis", o.status, function, detail)
                result.results.append(item)
                if item.failed and o.from_seq:
                    failed.append(o.from_seq)
        if failed:  # Lambda checkpoints before the lowest one and retries from it
            result.failures.append(min(failed, key=int))
        for r in result.results:
            log.info(json.dumps({"sluiceway": r.to_dict()}, default=str))
        return result

    @staticmethod
    def _out_of_time(context: Any) -> bool:
        remaining = getattr(context, "get_remaining_time_in_millis", None)
        return callable(remaining) and remaining() < TIME_MARGIN_MS

    def _process_item(self, item: Item) -> list[ItemResult]:
        out: list[ItemResult] = []
        for parsed in item.parsed:
            if parsed.kind == "event":
                assert parsed.event is not None
                out += self._run_event(item, parsed.event)
            elif parsed.kind == "unrecognized":
                out.append(self._unrecognized(item, parsed.reason))
            else:
                detail: dict[str, Any] = {"reason": parsed.reason}
                if parsed.event is not None and parsed.event.bucket is not None:
                    detail.update(bucket=parsed.event.bucket, key=parsed.event.key)
                out.append(ItemResult(item.ident, item.source, parsed.kind, None, detail))
        return out

    def _unrecognized(self, item: Item, reason: str) -> ItemResult:
        failure = {
            "error_type": "UnrecognizedEvent",
            "message": reason,
            "source": item.source,
            "at": time.time(),
            "function": self.function,
        }
        log.error("unrecognized %s payload (to the DLQ): %s", item.source, reason)
        try:
            sent = self.dead_letters.send(
                item.raw, failure, message_id=item.message_id, group=item.group
            )
        except Exception as e:
            log.exception("sending an unrecognized payload to the DLQ failed")
            if item.source == "sqs":  # it stays in the queue; its redrive policy moves it
                return ItemResult(item.ident, item.source, "error", None, {"reason": str(e)})
            sent = False
        return ItemResult(
            item.ident, item.source, "unrecognized", None, {"reason": reason, "to_dlq": sent}
        )

    # -- routing and running ------------------------------------------------------------

    def source_queue(self, queue_arn: str | None) -> str | None:
        """The pipeline queue an SQS queue ARN is (prefix and ``.fifo`` stripped)."""
        name = _arn_name(queue_arn).removesuffix(".fifo")
        if not name:
            return None
        if self.queue_prefix and name.startswith(self.queue_prefix):
            name = name[len(self.queue_prefix) :]
        return name if name in self.config.queues else None

    def targets(self, event: Event, source_queue: str | None = None) -> list[str]:
        """The functions that run for an event, in the pipeline's order."""
        if source_queue is not None and source_queue in self.queue_functions:
            names = [self.queue_functions[source_queue]]
        else:
            queues: list[str] = []
            for _, target in self.router.targets_for(event):
                subs = (
                    self.config.topics[target].subscriptions
                    if target in self.config.topics
                    else [target]
                )
                queues += [q for q in subs if q not in queues]
            names = [self.queue_functions[q] for q in queues if q in self.queue_functions]
        if self.function is not None:
            names = [n for n in names if n == self.function]
        return names

    def _spec(self, function: str) -> QueueSpec:
        fn = self.config.functions[function]
        assert fn.queue is not None
        base = self.pipeline.queue_specs()[fn.queue]
        # The claim lives as long as Lambda lets the function run (plus a little),
        # so an instance cut off by its timeout leaves a claim that expires before
        # SQS delivers again (its visibility timeout is at least 6 × that).
        return replace(base, visibility_timeout=min(fn.timeout, 900.0) + 30.0)

    def _run_event(self, item: Item, event: Event) -> list[ItemResult]:
        functions = self.targets(event, self.source_queue(item.queue_arn))
        if not functions:
            detail = {
                "reason": "no rule routes this event to "
                + (
                    f"function {self.function!r}"
                    if self.function
                    else "a function of this pipeline"
                ),
                "event": {"source": event.source, "detail-type": event.detail_type, "id": event.id},
            }
            if event.bucket is not None:
                detail.update(bucket=event.bucket, key=event.key)
            return [ItemResult(item.ident, item.source, "unrouted", None, detail)]
        results = []
        for function in functions:
            spec = self._spec(function)
            queue = _BatchQueue(spec, self.dead_letters, item)
            message = Message(
                id=item.message_id if len(item.parsed) == 1 else f"{item.message_id}#{event.id}",
                queue=spec.name,
                body=event.to_json(),
                attributes=dict(item.attributes),
                receive_count=item.receive_count,
                receipt=item.receipt,
                sent_at=item.sent_at,
            )
            try:
                outcome = self.worker.process(function, queue, message)
            except Exception as e:  # the ledger or S3 unreachable, …: retry the record
                log.exception("function %s failed outside its steps on %s", function, message.id)
                results.append(
                    ItemResult(
                        item.ident,
                        item.source,
                        "error",
                        function,
                        {"error": f"{type(e).__name__}: {e}"},
                    )
                )
                continue
            status = outcome.status
            if status == "dead" and not queue.dead_lettered:
                status = "retry"  # not in the DLQ yet: SQS's redrive policy will move it
            detail = _summary(outcome.detail)
            if status in ("retry", "busy"):
                delay = queue.retry_in if status == "retry" else min(spec.visibility_timeout, 5.0)
                detail["retry_in"] = delay
                self._retry_after(item, delay)
            results.append(ItemResult(item.ident, item.source, status, function, detail))
        return results

    def _retry_after(self, item: Item, seconds: float | None) -> None:
        """Make a failed SQS message visible again after the pipeline's backoff.

        Without this it would wait out the queue's visibility timeout, which is
        six times the function's timeout. Best effort: if it fails, the message
        simply comes back later.
        """
        if seconds is None or not item.receipt or not item.queue_arn:
            return
        try:
            url = self._queue_url(item.queue_arn)
            self.sqs.change_message_visibility(
                QueueUrl=url,
                ReceiptHandle=item.receipt,
                VisibilityTimeout=max(0, min(43_200, math.ceil(seconds))),
            )
        except Exception as e:
            log.info("could not shorten the visibility of %s: %s", item.message_id, e)

    def _queue_url(self, arn: str) -> str:
        if arn not in self._queue_urls:
            parts = arn.split(":")
            kwargs: dict[str, Any] = {"QueueName": parts[-1]}
            if len(parts) >= 6 and parts[4].isdigit():
                kwargs["QueueOwnerAWSAccountId"] = parts[4]
            self._queue_urls[arn] = self.sqs.get_queue_url(**kwargs)["QueueUrl"]
        return self._queue_urls[arn]

    # -- reading an invocation ----------------------------------------------------------

    def items(self, payload: Any) -> tuple[str, list[Item]]:
        """The invocation's source and its records, each interpreted."""
        if isinstance(payload, Mapping):
            records = payload.get("Records")
            if isinstance(records, list) and records:
                items = [self._safe_record(r) for r in records]
                kinds = {i.source for i in items}
                return (kinds.pop() if len(kinds) == 1 else "mixed"), items
            if _is_envelope(payload):
                origin = _Origin(
                    source=str(payload.get("source")),
                    detail_type=str(payload.get("detail-type")),
                    id=str(payload.get("id")),
                    time=None,
                    region=None,
                    resources=(),
                    detail={},
                    payload_field="event",
                )
                item = Item(
                    source="eventbridge",
                    ident=None,
                    raw=json.dumps(payload, default=str),
                    parsed=self.interpret(payload, origin),
                    message_id=str(payload.get("id")),
                )
                return "eventbridge", [item]
        return "unknown", [
            self._unknown(payload, f"unrecognized event shape: {first_keys(payload)}")
        ]

    def _safe_record(self, record: Any) -> Item:
        """A record, or, when reading it needs a service that failed (S3 HEAD), a retry."""
        try:
            return self._record(record)
        except Exception as e:
            log.exception("reading a record failed; it is retried")
            r = record if isinstance(record, Mapping) else {}
            source = str(r.get("eventSource") or r.get("EventSource") or "unknown")
            kind = source.removeprefix("aws:")
            ident = r.get("messageId") or (r.get("kinesis") or {}).get("sequenceNumber")
            ident = ident or (r.get("dynamodb") or {}).get("SequenceNumber")
            return Item(
                source=kind,
                ident=str(ident) if ident is not None else None,
                raw=json.dumps(r, default=str),
                parsed=[Parsed("error", reason=f"{type(e).__name__}: {e}")],
                message_id=str(ident or uuid.uuid4()),
            )

    def _unknown(self, payload: Any, reason: str) -> Item:
        try:
            raw = json.dumps(payload, default=str)
        except (TypeError, ValueError):
            raw = repr(payload)
        return Item(
            source="unknown",
            ident=None,
            raw=raw,
            parsed=[Parsed("unrecognized", reason=reason)],
            message_id=f"unrecognized-{uuid.uuid4().hex[:12]}",
        )

    def _record(self, record: Any) -> Item:
        if not isinstance(record, Mapping):
            return self._unknown(record, f"a record that is not an object: {first_keys(record)}")
        source = str(record.get("eventSource") or record.get("EventSource") or "")
        try:
            if source == "aws:sqs" and "body" in record:
                return self._sqs_record(record)
            if source == "aws:sns" and isinstance(record.get("Sns"), Mapping):
                return self._sns_record(record)
            if source.endswith(":s3") and "s3" in record:
                return self._s3_record(record)
            if source == "aws:kinesis" and isinstance(record.get("kinesis"), Mapping):
                return self._kinesis_record(record)
            if source == "aws:dynamodb" and isinstance(record.get("dynamodb"), Mapping):
                return self._dynamodb_record(record)
        except (KeyError, TypeError, ValueError, binascii.Error) as e:
            return self._unknown(record, f"a malformed {source or 'unknown'} record: {e}")
        return self._unknown(
            record,
            f"unrecognized record from {source or 'an unknown source'}: {first_keys(record)}",
        )

    def _sqs_record(self, r: Mapping[str, Any]) -> Item:
        system = r.get("attributes") or {}
        attrs = _sqs_attributes(r.get("messageAttributes") or {})
        mid = str(attrs.pop(A_ID, None) or r["messageId"])
        user = attrs.pop(A_ATTRS, None)
        receives = int(float(attrs.pop(A_RECEIVES, 0) or 0))
        for own in (A_FAILURE, A_SENT_AT, A_SOURCE, A_DEAD_AT):
            attrs.pop(own, None)
        if isinstance(user, str):
            with contextlib.suppress(ValueError):
                attrs = {**json.loads(user), **attrs}
        queue_arn = r.get("eventSourceARN")
        body = str(r["body"])
        sent = system.get("SentTimestamp")
        origin = _Origin(
            source="aws.sqs",
            detail_type="SQS Message",
            id=mid,
            time=_iso(sent),
            region=r.get("awsRegion"),
            resources=(str(queue_arn),) if queue_arn else (),
            detail={
                "queue": _arn_name(queue_arn),
                "messageId": r["messageId"],
                "attributes": attrs,
            },
            payload_field="body",
        )
        return Item(
            source="sqs",
            ident=str(r["messageId"]),
            raw=body,
            parsed=self.interpret(body, origin),
            message_id=mid,
            receive_count=receives + int(system.get("ApproximateReceiveCount") or 1),
            receipt=str(r.get("receiptHandle") or ""),
            queue_arn=queue_arn,
            group=system.get("MessageGroupId"),
            sent_at=int(sent) / 1000 if str(sent or "").isdigit() else time.time(),
            attributes=attrs,
        )

    def _sns_origin(self, sns: Mapping[str, Any]) -> _Origin:
        attrs = _sns_attributes(sns.get("MessageAttributes") or {})
        mid = str(attrs.pop(A_ID, None) or sns.get("MessageId") or uuid.uuid4())
        return _Origin(
            source="aws.sns",
            detail_type="SNS Notification",
            id=mid,
            time=_iso(sns.get("Timestamp")),
            region=None,
            resources=(str(sns["TopicArn"]),) if sns.get("TopicArn") else (),
            detail={
                "topic": _arn_name(sns.get("TopicArn")),
                "subject": sns.get("Subject"),
                "attributes": attrs,
            },
            payload_field="message",
        )

    def _sns_record(self, r: Mapping[str, Any]) -> Item:
        sns = r["Sns"]
        origin = self._sns_origin(sns)
        message = str(sns.get("Message") or "")
        return Item(
            source="sns",
            ident=None,
            raw=json.dumps(dict(r), default=str),
            parsed=self.interpret(message, origin),
            message_id=origin.id,
        )

    def _s3_record(self, r: Mapping[str, Any]) -> Item:
        doc = {"Records": [dict(r)]}
        return Item(
            source="s3",
            ident=None,
            raw=json.dumps(doc, default=str),
            parsed=self._bucket_notes(doc),
            message_id=str(
                (r.get("responseElements") or {}).get("x-amz-request-id") or uuid.uuid4()
            ),
        )

    def _kinesis_record(self, r: Mapping[str, Any]) -> Item:
        k = r["kinesis"]
        seq = str(k["sequenceNumber"])
        data = base64.b64decode(str(k.get("data") or ""), validate=True)
        arn = r.get("eventSourceARN")
        origin = _Origin(
            source="aws.kinesis",
            detail_type="Kinesis Record",
            id=str(r.get("eventID") or f"{_arn_name(arn)}:{seq}"),
            time=_iso(k.get("approximateArrivalTimestamp")),
            region=r.get("awsRegion"),
            resources=(str(arn),) if arn else (),
            detail={
                "stream": _arn_name(arn),
                "partitionKey": k.get("partitionKey"),
                "sequenceNumber": seq,
            },
            payload_field="data",
        )
        return Item(
            source="kinesis",
            ident=seq,
            raw=json.dumps(dict(r), default=str),
            parsed=self.interpret(data, origin),
            message_id=origin.id,
        )

    def _dynamodb_record(self, r: Mapping[str, Any]) -> Item:
        d = r["dynamodb"]
        seq = str(d["SequenceNumber"])
        arn = r.get("eventSourceARN")
        detail = {
            "table": _arn_name(arn),
            "eventName": r.get("eventName"),
            "sequenceNumber": seq,
            "streamViewType": d.get("StreamViewType"),
            "keys": _deserialize_image(d.get("Keys")),
        }
        for name, key in (("NewImage", "newImage"), ("OldImage", "oldImage")):
            if name in d:
                detail[key] = _deserialize_image(d[name])
        event = Event(
            source="aws.dynamodb",
            detail_type="DynamoDB Stream Record",
            detail=detail,
            id=str(r.get("eventID") or f"{_arn_name(arn)}:{seq}"),
            region=str(r.get("awsRegion") or "local"),
            resources=(str(arn),) if arn else (),
        )
        when = _iso(d.get("ApproximateCreationDateTime"))
        if when:
            event = replace(event, time=when)
        return Item(
            source="dynamodb",
            ident=seq,
            raw=json.dumps(dict(r), default=str),
            parsed=[Parsed("event", event)],
            message_id=event.id,
        )

    # -- payloads -----------------------------------------------------------------------

    def interpret(self, payload: Any, origin: _Origin) -> list[Parsed]:
        """What a payload says: bucket changes, an event envelope, or a plain message."""
        obj = _json_or_text(payload) if isinstance(payload, str | bytes) else payload
        if isinstance(obj, Mapping):
            kind = obj.get("Type")
            if kind == "Notification" and "Message" in obj and "TopicArn" in obj:
                return self.interpret(obj["Message"], self._sns_origin(obj))  # SNS → SQS
            if kind in ("SubscriptionConfirmation", "UnsubscribeConfirmation"):
                return [Parsed("ignored", reason=f"SNS {kind}: confirm it via its SubscribeURL")]
            if _is_s3_notification(obj) or (
                _is_envelope(obj) and obj.get("source") == AWS_S3_SOURCE
            ):
                return self._bucket_notes(obj)
            if _is_envelope(obj):
                try:
                    return [Parsed("event", Event.from_dict(dict(obj)))]
                except (TypeError, ValueError) as e:
                    return [Parsed("unrecognized", reason=f"a broken event envelope: {e}")]
        return [Parsed("event", origin.event(obj))]

    def _bucket_notes(self, obj: Mapping[str, Any]) -> list[Parsed]:
        try:
            notes = parse_notification(obj)
        except UnrecognizedNotification as e:
            return [Parsed("unrecognized", reason=f"{e} (payload {first_keys(obj)})")]
        if not notes:
            return [Parsed("ignored", reason="an S3 test event or a change no pipeline acts on")]
        return [self._bucket_event(n) for n in notes]

    def locate(self, s3_bucket: str, key: str) -> tuple[str, str] | None:
        """(pipeline bucket, key in it) for an S3 object, or None when no bucket maps there.

        Several pipeline buckets can share an S3 bucket under prefixes; the
        longest prefix that holds the key wins.
        """
        if self._locations is None:
            found = []
            for name, bucket in self.pipeline.buckets.items():
                loc = getattr(bucket, "location", None)
                if loc is not None and hasattr(loc, "prefix"):
                    found.append((loc.bucket, loc.prefix, name))
            self._locations = sorted(found, key=lambda t: -len(t[1]))
        for bucket, prefix, name in self._locations:
            if bucket == s3_bucket and key.startswith(prefix) and len(key) > len(prefix):
                return name, key[len(prefix) :]
        return None

    def _bucket_event(self, note: BucketNotification) -> Parsed:
        where = self.locate(note.bucket, note.key)
        if where is None or where[1].endswith("/"):
            return Parsed(
                "ignored",
                note.event,
                f"s3://{note.bucket}/{note.key} is in no bucket of this pipeline",
            )
        name, key = where
        aws = note.event
        if note.kind is Kind.DELETED:
            detail = {
                **aws.detail,
                "bucket": {"name": name},
                "object": {**aws.detail["object"], "key": key},
            }
            return Parsed(
                "deleted", replace(aws, detail=detail), "object deleted: nothing to process"
            )
        etag, size = note.etag, note.size
        if not etag:  # some S3-compatible stores leave it out: ask the bucket
            try:
                info: ObjectInfo = self.pipeline.bucket(name).head(key)
            except ObjectNotFound:
                return Parsed("ignored", None, f"{name}/{key} no longer exists")
            etag, size = info.etag, info.size
        event = object_created(
            name,
            key,
            size=size,
            etag=etag,
            sequencer=note.sequencer,
            reason=str(aws.detail.get("reason") or "PutObject"),
            source=BUCKET_SOURCE,
        )
        event = replace(event, id=aws.id, time=aws.time, region=aws.region, account=aws.account)
        return Parsed("event", event)


def _summary(detail: Mapping[str, Any]) -> dict[str, Any]:
    """The parts of a worker outcome worth a log line (not the traceback)."""
    keep = ("key", "outputs", "stats", "error_type", "message", "reason", "retry_in", "attempt")
    return {k: detail[k] for k in keep if k in detail}


# -- the entry point -----------------------------------------------------------------------

_app: LambdaApp | None = None


def handler(event: Any, context: Any = None) -> dict[str, Any]:
    """``sluiceway.aws.handler.handler``: the function Lambda calls.

    The application is built on the first invocation of an execution
    environment and kept for the ones after it.
    """
    global _app
    if _app is None:
        level = os.environ.get("SLUICEWAY_LOG", "INFO")
        logging.getLogger("sluiceway").setLevel(level)
        _app = LambdaApp.from_env()
    return _app.handle(event, context).response()


def reset() -> None:
    """Forget the application (tests; a new environment takes effect on the next call)."""
    global _app
    _app = None
