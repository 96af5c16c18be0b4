"""S3 event notifications arriving through SQS, turned into Sluiceway bucket events.

S3 can tell a queue about new objects in three shapes, and all three end up
as the body of an SQS message:

1. S3 → SQS: S3's own notification, ``{"Records": [{"eventSource": "aws:s3", …}]}``.
2. S3 → SNS → SQS: SNS's envelope ``{"Type": "Notification", "Message": "<1. as text>"}``
   (or 1. itself when the subscription has raw message delivery).
3. S3 → EventBridge → SQS: the EventBridge event, ``{"source": "aws.s3",
   "detail-type": "Object Created", "detail": {…}}``, which is already the
   shape of a Sluiceway event.

``parse_notification`` accepts any of them (and Lambda's batches of SQS or
SNS records, which wrap the same bodies), and returns zero or more
:class:`BucketNotification`: *created* ones carry the event
``sluiceway.events.object_created`` builds; *deleted* ones are a kind of
their own, so a caller records and acknowledges them instead of routing them
as if they were new data. ``s3:TestEvent`` (sent when a notification is
configured), SNS subscription confirmations and the other S3 event types
(restore, tagging, ACL, replication, lifecycle transition) yield nothing.
A body that is none of these raises :class:`UnrecognizedNotification`.

Keys: S3's notification format (1. and 2.) URL-encodes the key the way an
HTML form does (``red flower+1.csv`` arrives as ``red+flower%2B1.csv``), so
it is decoded with ``unquote_plus``. EventBridge events carry the key as it
is (decoding it would turn a real ``+`` into a space), and so do Sluiceway's.

:class:`NotificationSource` reads a queue: it long-polls, hands each created
object to ``Pipeline.object_created`` (whose ledger makes a notification and
the poller finding the same version raise one event), and deletes a message
only after everything in it was routed. A message it could not route, or
could not understand, stays in the queue and comes back after the queue's
visibility timeout; give the queue a redrive policy so such a message ends in
its dead-letter queue rather than coming back forever.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from enum import StrEnum
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, unquote_plus, urlsplit

from .buckets.base import ObjectInfo, ObjectNotFound
from .errors import ConfigError, SluicewayError
from .events import OBJECT_CREATED, Event, object_created

if TYPE_CHECKING:
    from .pipeline import Pipeline

log = logging.getLogger("sluiceway.notifications")

OBJECT_DELETED = "Object Deleted"
AWS_S3_SOURCE = "aws.s3"

# S3 notification event names → the ``reason`` S3 gives the same change on EventBridge.
_CREATED_REASONS = {
    "Put": "PutObject",
    "Post": "POST Object",
    "Copy": "CopyObject",
    "CompleteMultipartUpload": "CompleteMultipartUpload",
}


class Kind(StrEnum):
    CREATED = "created"
    DELETED = "deleted"


class UnrecognizedNotification(SluicewayError, ValueError):
    """A message body that is no S3 notification in any known wrapping."""


@dataclass(frozen=True)
class BucketNotification:
    """One object change S3 reported, as a Sluiceway event.

    ``event`` is EventBridge-shaped: "Object Created" (from
    ``events.object_created``) or "Object Deleted". ``bucket`` and ``key``
    are the S3 bucket's name and the decoded key, not yet mapped to a
    pipeline bucket (see :meth:`NotificationSource.locate`).
    """

    kind: Kind
    event: Event
    version_id: str | None = None

    @property
    def bucket(self) -> str:
        return str(self.event.bucket)

    @property
    def key(self) -> str:
        return str(self.event.key)

    @property
    def etag(self) -> str:
        return str(self.event.etag or "")

    @property
    def size(self) -> int:
        return int((self.event.detail.get("object") or {}).get("size") or 0)

    @property
    def sequencer(self) -> str:
        return str((self.event.detail.get("object") or {}).get("sequencer") or "")


# -- parsing ---------------------------------------------------------------------


def _iso(value: Any) -> str:
    """An event time as ISO 8601 (EventBridge gives text; some emulators epoch seconds)."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        return datetime.fromtimestamp(value, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    return str(value) if value else datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _created(
    bucket: str,
    key: str,
    obj: Mapping[str, Any],
    *,
    reason: str,
    time_: Any,
    region: str | None,
    event_id: str | None = None,
    account: str | None = None,
) -> BucketNotification:
    etag = str(obj.get("eTag") or obj.get("etag") or "").strip('"')
    event = object_created(
        bucket,
        key,
        size=int(obj.get("size") or 0),
        etag=etag,
        sequencer=str(obj.get("sequencer") or ""),
        reason=reason,
        source=AWS_S3_SOURCE,
    )
    changes: dict[str, Any] = {"time": _iso(time_)}
    if region:
        changes["region"] = region
    if event_id:
        changes["id"] = event_id
    if account:
        changes["account"] = account
    version = obj.get("versionId") or obj.get("version-id")
    return BucketNotification(Kind.CREATED, replace(event, **changes), version or None)


def _deleted(
    bucket: str,
    key: str,
    obj: Mapping[str, Any],
    *,
    reason: str,
    deletion_type: str,
    time_: Any,
    region: str | None,
    event_id: str | None = None,
) -> BucketNotification:
    version = obj.get("versionId") or obj.get("version-id")
    detail: dict[str, Any] = {
        "version": "0",
        "bucket": {"name": bucket},
        "object": {"key": key, "sequencer": str(obj.get("sequencer") or "")},
        "reason": reason,
        "deletion-type": deletion_type,
    }
    if version:
        detail["object"]["version-id"] = version
    kwargs: dict[str, Any] = {"time": _iso(time_), "resources": (f"bucket:{bucket}",)}
    if region:
        kwargs["region"] = region
    if event_id:
        kwargs["id"] = event_id
    event = Event(source=AWS_S3_SOURCE, detail_type=OBJECT_DELETED, detail=detail, **kwargs)
    return BucketNotification(Kind.DELETED, event, version or None)


def _from_s3_record(record: Mapping[str, Any]) -> list[BucketNotification]:
    """One record of S3's notification format (keys URL-encoded, form style)."""
    s3 = record.get("s3")
    if not isinstance(s3, Mapping):
        raise UnrecognizedNotification("an S3 record without its 's3' member")
    bucket = str((s3.get("bucket") or {}).get("name") or "")
    obj = s3.get("object") or {}
    raw_key = obj.get("key")
    if not bucket or not isinstance(raw_key, str):
        raise UnrecognizedNotification("an S3 record without a bucket name or object key")
    key = unquote_plus(raw_key)
    name = str(record.get("eventName") or "").removeprefix("s3:")
    family, _, action = name.partition(":")
    when, region = record.get("eventTime"), record.get("awsRegion")
    if family == "ObjectCreated":
        reason = _CREATED_REASONS.get(action, action or "PutObject")
        return [_created(bucket, key, obj, reason=reason, time_=when, region=region)]
    if family in ("ObjectRemoved", "LifecycleExpiration"):
        marker = action == "DeleteMarkerCreated"
        return [
            _deleted(
                bucket,
                key,
                obj,
                reason="DeleteObject" if family == "ObjectRemoved" else "Lifecycle Expiration",
                deletion_type="Delete Marker Created" if marker else "Permanently Deleted",
                time_=when,
                region=region,
            )
        ]
    return []  # restore, tagging, ACL, replication, transitions: no new data


def _from_eventbridge(event: Mapping[str, Any]) -> list[BucketNotification]:
    """An S3 event on EventBridge (keys as they are)."""
    detail = event.get("detail") or {}
    bucket = str((detail.get("bucket") or {}).get("name") or "")
    obj = detail.get("object") or {}
    key = obj.get("key")
    if not bucket or not isinstance(key, str):
        raise UnrecognizedNotification("an S3 EventBridge event without bucket name or key")
    common: dict[str, Any] = {
        "time_": event.get("time"),
        "region": event.get("region"),
        "event_id": event.get("id"),
    }
    kind = event.get("detail-type")
    if kind == OBJECT_CREATED:
        reason = str(detail.get("reason") or "PutObject")
        return [_created(bucket, key, obj, reason=reason, account=event.get("account"), **common)]
    if kind == OBJECT_DELETED:
        return [
            _deleted(
                bucket,
                key,
                obj,
                reason=str(detail.get("reason") or "DeleteObject"),
                deletion_type=str(detail.get("deletion-type") or "Permanently Deleted"),
                **common,
            )
        ]
    return []


def parse_notification(body: str | bytes | Mapping[str, Any]) -> list[BucketNotification]:
    """Zero or more bucket notifications from one message body (see the module docstring)."""
    if isinstance(body, str | bytes | bytearray):
        try:
            data = json.loads(body)
        except ValueError as e:
            raise UnrecognizedNotification(f"not JSON: {e}") from None
    else:
        data = body
    if not isinstance(data, Mapping):
        raise UnrecognizedNotification(f"expected a JSON object, got {type(data).__name__}")
    if data.get("Event") == "s3:TestEvent":
        return []  # S3 checks the destination when notifications are configured
    if data.get("Type") in ("SubscriptionConfirmation", "UnsubscribeConfirmation"):
        log.warning(
            "SNS %s on the notification queue: confirm it via its SubscribeURL", data["Type"]
        )
        return []
    if data.get("Type") == "Notification" and "Message" in data:  # SNS → SQS
        return parse_notification(data["Message"])
    if "detail-type" in data and "source" in data:
        if data["source"] != AWS_S3_SOURCE:
            raise UnrecognizedNotification(f"an EventBridge event from {data['source']!r}")
        return _from_eventbridge(data)
    records = data.get("Records")
    if isinstance(records, list):
        out: list[BucketNotification] = []
        for record in records:
            if not isinstance(record, Mapping):
                raise UnrecognizedNotification("a record that is not a JSON object")
            source = str(record.get("eventSource") or record.get("EventSource") or "")
            if "s3" in record and source.endswith(":s3"):  # aws:s3, minio:s3, …
                out += _from_s3_record(record)
            elif source == "aws:sqs" and "body" in record:  # a Lambda SQS batch
                out += parse_notification(record["body"])
            elif source == "aws:sns" and isinstance(record.get("Sns"), Mapping):
                out += parse_notification(record["Sns"].get("Message") or "")
            else:
                raise UnrecognizedNotification(f"a record from {source or 'an unknown source'!r}")
        return out
    raise UnrecognizedNotification(
        "neither an S3 notification, an SNS envelope nor an EventBridge event"
    )


# -- reading a queue -------------------------------------------------------------


@dataclass
class NotificationStats:
    """What reading notifications did (one receive, or a whole drain)."""

    messages: int = 0
    raised: list[Event] = field(default_factory=list)
    duplicates: int = 0  # versions raised before (by the poller, a redelivery, …)
    deleted: list[tuple[str, str]] = field(default_factory=list)  # (pipeline bucket, key)
    ignored: int = 0  # buckets or prefixes this pipeline does not have
    kept: int = 0  # messages left in the queue: unroutable or not understood

    def add(self, other: NotificationStats) -> None:
        self.messages += other.messages
        self.raised += other.raised
        self.duplicates += other.duplicates
        self.deleted += other.deleted
        self.ignored += other.ignored
        self.kept += other.kept


@dataclass(frozen=True)
class SqsLocation:
    """``sqs://QUEUE?endpoint_url=…&region=…``, or the queue's ``https://`` URL itself."""

    queue_name: str | None
    queue_url: str | None
    endpoint_url: str | None
    region: str | None

    @classmethod
    def parse(cls, url: str) -> SqsLocation:
        parts = urlsplit(url)
        if parts.username is not None or parts.password is not None:
            raise ValueError("credentials never go in the URL: use the AWS environment variables")
        if parts.scheme in ("http", "https"):
            host = parts.hostname or ""
            region = host.split(".")[1] if host.startswith("sqs.") and host.count(".") > 2 else None
            return cls(None, url, None, region)
        if parts.scheme != "sqs" or not parts.netloc:
            raise ValueError(f"expected sqs://QUEUE or a queue's https:// URL, got {url!r}")
        query = {k: v[-1] for k, v in parse_qs(parts.query).items()}
        unknown = sorted(set(query) - {"endpoint_url", "region"})
        if unknown:
            raise ValueError(f"unknown option {unknown[0]!r} (known: endpoint_url, region)")
        return cls(parts.netloc, None, query.get("endpoint_url"), query.get("region"))


class NotificationSource:
    """Long-polls one SQS queue of S3 notifications and raises their events."""

    def __init__(
        self,
        pipeline: Pipeline,
        queue_url: str,
        *,
        client: Any,
        wait_seconds: int = 10,
        max_messages: int = 10,
    ) -> None:
        self.pipeline = pipeline
        self.queue_url = queue_url
        self.client = client
        self.wait_seconds = wait_seconds
        self.max_messages = max_messages
        self._targets: list[tuple[str, str, str]] | None = None

    @classmethod
    def from_url(cls, pipeline: Pipeline, url: str, **kwargs: Any) -> NotificationSource:
        """From a profile's ``notifications`` URL; credentials come from the AWS chain."""
        try:
            loc = SqsLocation.parse(url)
        except ValueError as e:
            from .connections import redact

            raise ConfigError([f"notifications {redact(url.split('?')[0])}: {e}"]) from None
        from .aws_clients import session as boto_session
        from .aws_clients import watch_client
        from .connections import redact

        client = watch_client(
            boto_session().client("sqs", endpoint_url=loc.endpoint_url, region_name=loc.region),
            "sqs",
            redact(url),
        )
        queue_url = loc.queue_url or client.get_queue_url(QueueName=loc.queue_name)["QueueUrl"]
        return cls(pipeline, queue_url, client=client, **kwargs)

    def locate(self, s3_bucket: str, key: str) -> tuple[str, str] | None:
        """(pipeline bucket, its key) for an S3 object, or None if no bucket maps there.

        Several pipeline buckets can share one S3 bucket under different
        prefixes; the longest prefix that contains the key wins.
        """
        if self._targets is None:
            self._targets = sorted(
                (
                    (loc.bucket, loc.prefix, name)
                    for name, b in self.pipeline.buckets.items()
                    if (loc := getattr(b, "location", None)) is not None and hasattr(loc, "prefix")
                ),
                key=lambda t: -len(t[1]),
            )
        for bucket, prefix, name in self._targets:
            if bucket == s3_bucket and key.startswith(prefix) and len(key) > len(prefix):
                return name, key[len(prefix) :]
        return None

    def route(self, note: BucketNotification, stats: NotificationStats) -> None:
        """Raise one created object's event (once), or record a deletion."""
        where = self.locate(note.bucket, note.key)
        if where is None or where[1].endswith("/"):
            stats.ignored += 1
            log.debug("notification for s3://%s/%s: no pipeline bucket", note.bucket, note.key)
            return
        name, key = where
        if note.kind is Kind.DELETED:
            # Nothing to process: work already queued for it is skipped by the
            # worker (the object is gone), which records it in the ledger.
            log.info("object %s/%s deleted (notification)", name, key)
            stats.deleted.append((name, key))
            return
        if not note.etag:  # some S3-compatible stores leave it out: ask the bucket
            try:
                info = self.pipeline.bucket(name).head(key)
            except ObjectNotFound:
                stats.ignored += 1
                return
        else:
            info = ObjectInfo(key=key, size=note.size, etag=note.etag, mtime=note.event.timestamp)
        if self.pipeline.ledger.has_seen(name, key, info.etag):
            stats.duplicates += 1
            return
        event = self.pipeline.object_created(name, info)
        if event is None:
            stats.duplicates += 1
        else:
            log.info("new object %s/%s (notification)", name, key)
            stats.raised.append(event)

    def poll(self, wait_seconds: int | None = None) -> NotificationStats:
        """One receive: route each message's notifications, then delete the routed ones."""
        stats = NotificationStats()
        response = self.client.receive_message(
            QueueUrl=self.queue_url,
            MaxNumberOfMessages=self.max_messages,
            WaitTimeSeconds=self.wait_seconds if wait_seconds is None else wait_seconds,
        )
        done: list[dict[str, str]] = []
        for message in response.get("Messages", ()):
            stats.messages += 1
            try:
                for note in parse_notification(message["Body"]):
                    self.route(note, stats)
            except UnrecognizedNotification as e:
                stats.kept += 1
                log.error("message %s is not an S3 notification (%s)", message["MessageId"], e)
                continue
            except Exception:
                stats.kept += 1  # it comes back after the visibility timeout
                log.exception("routing message %s failed; it stays queued", message["MessageId"])
                continue
            done.append({"Id": str(len(done)), "ReceiptHandle": message["ReceiptHandle"]})
        if done:
            # Only now: a crash before this line redelivers, and the ledger absorbs it.
            result = self.client.delete_message_batch(QueueUrl=self.queue_url, Entries=done)
            for failed in result.get("Failed", ()):
                log.warning("could not delete a routed message: %s", failed.get("Message"))
        return stats

    def drain(self) -> NotificationStats:
        """Receive until the queue answers empty (``run --drain``)."""
        total = NotificationStats()
        while True:
            stats = self.poll(wait_seconds=1)
            total.add(stats)
            if stats.messages == 0:
                return total

    def run(self, stop: threading.Event) -> None:
        """Until ``stop``: long-poll, route, delete; back off while SQS fails."""
        pause = 1.0
        while not stop.is_set():
            try:
                self.poll()
                pause = 1.0
            except Exception:
                log.exception("reading notifications from %s failed", self.queue_url)
                stop.wait(pause)
                pause = min(pause * 2, 60.0)
