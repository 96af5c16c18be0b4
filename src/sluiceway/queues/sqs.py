"""Queues on Amazon SQS and topics on Amazon SNS: the services the interface imitates.

URL (credentials from the standard AWS chain, never from the URL)::

    sqs://?region=eu-central-1&prefix=mypipeline-
    sqs://?endpoint_url=http://127.0.0.1:5000&region=us-east-1&prefix=mypipeline-&fifo=true

``prefix``
    Put before every queue and topic name (``mypipeline-to-parquet``), so
    several pipelines (or test runs) share one account. Default: the
    pipeline's name and ``-`` (Terraform's default too); ``prefix=`` (empty): none.
``fifo``
    ``true``: FIFO queues and FIFO topics (names get ``.fifo``). Default false.
``manage``
    ``false``: use queues and topics that exist already (made by Terraform,
    ``sluiceway deploy`` or by hand) without changing them: each is looked up
    and its attributes read, never set; a missing one is an error naming it.
    Default true (create or update everything from the pipeline file).
``endpoint_url``, ``region``, ``max_attempts``
    See :mod:`sluiceway.aws_clients`.

What maps to what
-----------------
* Every queue of the pipeline is created at start (``CreateQueue``, or
  ``SetQueueAttributes`` when it exists with other settings: the pipeline
  file wins; with ``manage=false`` the queue wins: its ``VisibilityTimeout``,
  ``DelaySeconds`` and redrive ``maxReceiveCount`` are read and used instead
  of the file's, and nothing is written) with ``VisibilityTimeout``, ``DelaySeconds``, 14 days'
  retention and, for queues with a DLQ, SQS's own ``RedrivePolicy``
  (``deadLetterTargetArn``, ``maxReceiveCount``). SQS counts whole seconds:
  0.3 s becomes 1 s (always rounded up, so nothing is visible earlier than
  the file says).
* Every topic is an SNS topic; each subscribed queue gets an SQS subscription
  with ``RawMessageDelivery`` (the body and attributes arrive as sent, not in
  SNS's JSON envelope) and a queue policy that lets exactly the pipeline's
  topics send to it. Sluiceway owns the ``Policy`` of its queues. A
  subscription the file no longer has is removed only if its queue is one of
  this pipeline's; other subscribers to the topic are left alone.
* ``send_batch`` is ``SendMessageBatch`` in tens, ``publish`` is SNS
  ``PublishBatch`` in tens, ``receive`` is ``ReceiveMessage`` (up to ten a
  call, long polling with ``WaitTimeSeconds`` up to 20 for the whole seconds
  of ``wait`` and short polls for the rest), ``ack`` is
  ``DeleteMessageBatch``, ``change_visibility`` is ``ChangeMessageVisibility``
  (the heartbeat), ``counts`` is ``GetQueueAttributes``
  (``ApproximateNumberOfMessages``/``…NotVisible``/``…Delayed``: approximate
  on AWS, for a minute or so after a change), ``purge`` is ``PurgeQueue``.
* Message ids: SQS assigns its own; Sluiceway's id travels in the message
  attribute ``sluiceway.id`` (with the attributes as JSON in
  ``sluiceway.attributes``). Messages from other producers get SQS's id and
  their own string/number attributes.

Deduplication
-------------
FIFO queues deduplicate natively: ``MessageDeduplicationId`` is the message
id (hashed when it is longer than SQS allows), so a known id sent again
within SQS's five-minute window is dropped. ``MessageGroupId`` is the
attribute ``message_group_id`` when a message has it, else the queue's (or
topic's) name, which makes a FIFO queue strictly ordered and one message at
a time; give messages a group attribute to get parallelism. Standard queues
have no deduplication: ids repeated inside one batch are sent once, but the
same id sent twice in two calls is delivered twice. That is harmless here:
``Pipeline.publish_once`` remembers sent ids in the ledger, and a worker's
ledger claim turns a second delivery of finished work into a plain ack.

Stale receipts
--------------
SQS does not say whether a receipt handle is still the newest one: deleting
with an old handle may delete a message someone else has received since.
The queue therefore keeps a lease per receipt it handed out: the time until
which SQS keeps that receive hidden, on this process's monotonic clock. A
visibility change counts from before its request (never later than SQS's
own deadline); a receive counts from its reply less 0.25 s for the reply's
travel (a long poll answers the moment a message is there, possibly many
seconds after the request), but never from before the request. Once that
time has passed, the message may be someone else's: ``ack``, ``change_visibility``,
``record_failure`` and ``dead_letter`` with that receipt do nothing (and
report it). The cost of refusing is one more delivery, which the ledger
recognises. Receipts handed out by another process (the supervisor blaming
a dead worker) are passed to SQS as they are.

Failure records (``record_failure``)
-----------------------------------
SQS cannot change a message in place, but the failure record must travel
with the message (the next attempt and ``dlq list`` show it). On a standard
queue ``record_failure`` therefore *replaces* the message: it sends a copy
with the failure in ``sluiceway.failure``, the receives so far in
``sluiceway.receives``, the original send time and a ``DelaySeconds`` of the
retry backoff (at most SQS's 900 s), then deletes the original. Copy first,
delete second: a crash in between leaves two copies (one extra delivery,
absorbed by the ledger), never none. The receive count a worker sees is
``sluiceway.receives`` plus SQS's ``ApproximateReceiveCount``; past
``max_receive_count`` the queue moves the message to its DLQ itself, with its
failure record (the native redrive policy also counts, but restarts with
each copy). A copy that would be too large for SQS falls back to the next
way.

On a FIFO queue a copy would go behind the rest of its message group and
could not be delayed (FIFO has no per-message delay), so ``record_failure``
only hides the message for the backoff (``ChangeMessageVisibility``); its
failure is in the ledger (``sluiceway trace``) and the last one goes with
the message to the DLQ. The same holds for the supervisor's record of a dead
worker (it has only the receipt, not the body to copy).

Dead letters
------------
``dead_letter`` sends the message to the DLQ with its failure record, its
receive count, its source queue and the time, then deletes it. A message
SQS moves itself (the redrive policy: a worker died on it every time) has no
failure record; ``peek`` shows it as ``MaxReceiveCountExceeded`` with the
source from SQS's ``DeadLetterQueueSourceArn`` or the one queue that
dead-letters into that DLQ.

Peek and redrive
----------------
SQS cannot look at a message without receiving it. ``peek`` receives in
tens with a 30 s visibility timeout (so it pages through the queue instead
of seeing the same ten again), then makes them all visible again at once;
each peek counts as a receive in ``ApproximateReceiveCount``, and for those
seconds workers cannot take the peeked messages. In-flight messages are not
seen. Peeking a queue that has a DLQ would count towards its redrive policy
(three peeks could dead-letter a healthy message), so ``peek`` of such a
queue returns nothing and logs why; ``status`` shows its counts. DLQs and
queues without a DLQ are peeked.

``redrive`` moves by receiving, sending to the target (receive count reset,
failure record kept) and deleting; SQS's ``StartMessageMoveTask`` only moves
back to the original source queue, and not by id. ``purge`` is
``PurgeQueue`` (on AWS it can take up to a minute, and only one per minute
is allowed; when one is already running the queue is emptied by receiving
and deleting) and returns the approximate count from before.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import re
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, TypeVar

from ..aws_clients import (
    AwsTarget,
    AwsUnavailable,
    error_code,
    make_client,
    parse_url,
    probe,
    retry_unprocessed,
    session,
)
from ..errors import ConfigError, SluicewayError
from .base import Broker, Message, OutgoingMessage, Queue, QueueCounts, QueueSpec
from .conventions import broker_prefix, max_receives_failure

log = logging.getLogger("sluiceway.sqs")
T = TypeVar("T")

OWN_OPTIONS = ("prefix", "fifo", "manage")

# Our message attributes (SQS allows ten per message; we use at most seven).
A_ID = "sluiceway.id"
A_ATTRS = "sluiceway.attributes"
A_FAILURE = "sluiceway.failure"
A_RECEIVES = "sluiceway.receives"
A_SENT_AT = "sluiceway.sent_at"
A_SOURCE = "sluiceway.source"
A_DEAD_AT = "sluiceway.dead_lettered_at"
OWN_ATTRIBUTES = {A_ID, A_ATTRS, A_FAILURE, A_RECEIVES, A_SENT_AT, A_SOURCE, A_DEAD_AT}
GROUP_ATTRIBUTE = "message_group_id"

MAX_BATCH = 10
# SQS and SNS take 256 KiB per batch request (1 MiB on newer AWS); stay under it.
MAX_BATCH_BYTES = 250_000
MAX_WAIT = 20  # WaitTimeSeconds
MAX_DELAY = 900  # DelaySeconds
MAX_VISIBILITY = 43_200  # 12 h
RETENTION = 1_209_600  # 14 days, SQS's maximum
PEEK_HIDE = 30  # seconds a peek or redrive hides what it has seen
SHORT_POLL_PAUSE = 0.25
# How long a reply may travel between SQS hiding a message and us reading it.
REPLY_ALLOWANCE = 0.25
_NAME_RE = re.compile(r"^[A-Za-z0-9_-]+$")
_DEDUP_RE = re.compile(r"^[\x21-\x7e]{1,128}$")
_SYSTEM_ATTRIBUTES = [
    "ApproximateReceiveCount",
    "SentTimestamp",
    "MessageGroupId",
    "DeadLetterQueueSourceArn",
]


def _seconds(value: float, upper: int) -> int:
    """Whole seconds for SQS, rounded up (never visible earlier than asked), clamped."""
    return max(0, min(upper, math.ceil(value - 1e-9)))


def _dedup_id(message_id: str) -> str:
    """``MessageDeduplicationId``: the id itself when SQS accepts it, else its SHA-256."""
    if _DEDUP_RE.match(message_id):
        return message_id
    return hashlib.sha256(message_id.encode()).hexdigest()


def _string(value: str) -> dict[str, str]:
    return {"DataType": "String", "StringValue": value}


def _number(value: float) -> dict[str, str]:
    text = f"{value:.6f}" if isinstance(value, float) else str(value)
    return {"DataType": "Number", "StringValue": text}


def _attr_value(raw: Mapping[str, Any]) -> Any:
    """A foreign message attribute's value (from another producer)."""
    text = raw.get("StringValue")
    if text is None:
        return raw.get("BinaryValue")
    if str(raw.get("DataType", "")).startswith("Number"):
        try:
            return int(text)
        except ValueError:
            return float(text)
    return text


@dataclass
class _Held:
    """What this process knows about a receive it handed out."""

    hidden_until: float  # monotonic; SQS keeps the receive hidden at least this long
    group: str | None


@dataclass
class _Raw:
    """One SQS message as received, parsed."""

    message: Message
    sqs_id: str
    group: str | None
    approximate: int  # SQS's ApproximateReceiveCount
    receives: int  # ours before this copy (sluiceway.receives)
    dead_lettered: bool
    source_arn: str | None


class SqsQueue(Queue):
    """One SQS queue (see the module docstring for how each call maps)."""

    def __init__(self, broker: SqsBroker, spec: QueueSpec, url: str, arn: str) -> None:
        self.spec = spec
        self.url = url
        self.arn = arn
        self._broker = broker
        self._sqs = broker.sqs
        self.fifo = broker.fifo
        self.visibility = _seconds(spec.visibility_timeout, MAX_VISIBILITY)
        self._held: dict[str, _Held] = {}
        self._lock = threading.Lock()
        self._warned_peek = False

    def __repr__(self) -> str:
        return f"SqsQueue({self.name!r}, {self.url!r})"

    # -- leases on receipts ------------------------------------------------------

    def _hold(self, receipt: str, until: float, group: str | None) -> None:
        with self._lock:
            self._held[receipt] = _Held(until, group)
            if len(self._held) > 10_000:  # forget receipts long lapsed
                now = time.monotonic()
                for r in [r for r, h in self._held.items() if h.hidden_until < now - 3600]:
                    del self._held[r]

    def _lapsed(self, receipt: str) -> bool:
        """True when SQS may have handed this message to someone else since."""
        if not receipt:
            return True  # a peeked message: no receive to act on
        with self._lock:
            held = self._held.get(receipt)
        return held is not None and time.monotonic() >= held.hidden_until

    def _forget(self, receipt: str) -> _Held | None:
        with self._lock:
            return self._held.pop(receipt, None)

    def _group(self, receipt: str) -> str | None:
        with self._lock:
            held = self._held.get(receipt)
        return held.group if held else None

    # -- sending -----------------------------------------------------------------

    def _group_for(self, attributes: Mapping[str, Any]) -> str:
        group = attributes.get(GROUP_ATTRIBUTE)
        return str(group) if group not in (None, "") else self.name

    def _entry(
        self,
        body: str,
        message_id: str,
        attributes: Mapping[str, Any],
        *,
        extra: Mapping[str, dict[str, str]] | None = None,
        delay: float | None = None,
        dedup: str | None = None,
        group: str | None = None,
    ) -> dict[str, Any]:
        attrs: dict[str, dict[str, str]] = {A_ID: _string(message_id)}
        user = {
            k: v for k, v in attributes.items() if k not in ("source_queue", "dead_lettered_at")
        }
        if user:
            attrs[A_ATTRS] = _string(json.dumps(user, default=str))
        attrs.update(extra or {})
        entry: dict[str, Any] = {"MessageBody": body, "MessageAttributes": attrs}
        if self.fifo:
            entry["MessageGroupId"] = group or self._group_for(attributes)
            entry["MessageDeduplicationId"] = dedup or _dedup_id(message_id)
        elif delay is not None:
            entry["DelaySeconds"] = _seconds(delay, MAX_DELAY)
        return entry

    def _send_entries(self, entries: list[dict[str, Any]]) -> None:
        """``SendMessageBatch`` in chunks; entries SQS failed on its side are sent again."""
        for chunk in _chunks(entries):
            retry_unprocessed(self._send_chunk, chunk, f"send to SQS queue {self.name}")

    def _send_chunk(self, chunk: list[dict[str, Any]]) -> list[dict[str, Any]]:
        numbered = {str(i): e for i, e in enumerate(chunk)}
        reply = self._broker.call(
            lambda: self._sqs.send_message_batch(
                QueueUrl=self.url, Entries=[{"Id": i, **e} for i, e in numbered.items()]
            ),
            f"send to {self.name}",
        )
        again: list[dict[str, Any]] = []
        for failed in reply.get("Failed", []):
            if failed.get("SenderFault"):
                raise SluicewayError(
                    f"SQS refused a message for queue {self.name}: "
                    f"{failed.get('Code')}: {failed.get('Message')}"
                )
            again.append(numbered[failed["Id"]])
        return again

    def send_batch(self, messages: Sequence[OutgoingMessage]) -> list[str]:
        # Ids are fixed before the first attempt, so botocore's retry of a
        # call whose reply was lost sends the same ids (deduplicated on FIFO).
        ids = [m.id or str(uuid.uuid4()) for m in messages]
        seen: set[str] = set()
        entries = []
        for mid, m in zip(ids, messages, strict=True):
            if mid in seen:  # SQS would refuse the batch; the first one wins
                continue
            seen.add(mid)
            entries.append(self._entry(m.body, mid, m.attributes, delay=m.delay))
        self._send_entries(entries)
        return ids

    def _send_copy(
        self,
        msg: Message,
        *,
        failure: Mapping[str, Any] | None,
        receives: int,
        delay: float | None = None,
        source: str | None = None,
        dead_at: float | None = None,
        group: str | None = None,
    ) -> None:
        """Send ``msg`` here again, with Sluiceway's bookkeeping in its attributes."""
        extra: dict[str, dict[str, str]] = {A_SENT_AT: _number(msg.sent_at)}
        if receives:
            extra[A_RECEIVES] = _number(receives)
        if failure is not None:
            extra[A_FAILURE] = _string(json.dumps(failure, default=str))
        if source is not None:
            extra[A_SOURCE] = _string(source)
        if dead_at is not None:
            extra[A_DEAD_AT] = _number(dead_at)
        entry = self._entry(
            msg.body,
            msg.id,
            msg.attributes,
            extra=extra,
            delay=delay,
            # A copy is a new message, whatever the 5-minute dedup window remembers.
            dedup=uuid.uuid4().hex,
            group=group,
        )
        self._send_entries([entry])

    # -- receiving ---------------------------------------------------------------

    def _receive_raw(self, n: int, wait: int, visibility: int) -> tuple[list[_Raw], float]:
        """Messages received, and when (monotonic) SQS at the earliest hid them.

        That moment lies between sending the request and the reply; a long
        poll answers as soon as a message is there, so it is the reply less
        the reply's travel (REPLY_ALLOWANCE), but never before the request.
        """
        started = time.monotonic()
        reply = self._broker.call(
            lambda: self._sqs.receive_message(
                QueueUrl=self.url,
                MaxNumberOfMessages=n,
                WaitTimeSeconds=wait,
                VisibilityTimeout=visibility,
                MessageAttributeNames=["All"],
                MessageSystemAttributeNames=_SYSTEM_ATTRIBUTES,
            ),
            f"receive from {self.name}",
        )
        hidden_from = max(started, time.monotonic() - REPLY_ALLOWANCE)
        return [self._parse(m) for m in reply.get("Messages", [])], hidden_from

    def _parse(self, raw: Mapping[str, Any]) -> _Raw:
        system = raw.get("Attributes", {})
        attrs = raw.get("MessageAttributes", {})

        def own(name: str) -> str | None:
            value = attrs.get(name)
            return None if value is None else value.get("StringValue")

        attributes: dict[str, Any] = json.loads(own(A_ATTRS) or "{}")
        for name, value in attrs.items():
            if name not in OWN_ATTRIBUTES:
                attributes[name] = _attr_value(value)
        source = own(A_SOURCE)
        dead_at = own(A_DEAD_AT)
        if source is not None:
            attributes["source_queue"] = source
        if dead_at is not None:
            attributes["dead_lettered_at"] = float(dead_at)
        approximate = int(system.get("ApproximateReceiveCount", "1"))
        receives = int(float(own(A_RECEIVES) or 0))
        sent_at = own(A_SENT_AT)
        failure = own(A_FAILURE)
        message = Message(
            id=own(A_ID) or raw["MessageId"],
            queue=self.name,
            body=raw["Body"],
            attributes=attributes,
            receive_count=receives + approximate,
            receipt=raw["ReceiptHandle"],
            sent_at=float(sent_at) if sent_at else int(system.get("SentTimestamp", 0)) / 1000,
            failure=json.loads(failure) if failure else None,
        )
        return _Raw(
            message=message,
            sqs_id=raw["MessageId"],
            group=system.get("MessageGroupId"),
            approximate=approximate,
            receives=receives,
            dead_lettered=dead_at is not None,
            source_arn=system.get("DeadLetterQueueSourceArn"),
        )

    def receive(self, max_messages: int = 1, *, wait: float = 0.0) -> list[Message]:
        """Up to ``max_messages`` (in calls of ten), long-polling for whole seconds of ``wait``."""
        deadline = time.monotonic() + wait
        out: list[Message] = []
        while len(out) < max_messages:
            remaining = deadline - time.monotonic()
            poll = 0 if out or remaining < 1 else min(MAX_WAIT, int(remaining))
            got, hidden_from = self._receive_raw(
                min(MAX_BATCH, max_messages - len(out)), poll, self.visibility
            )
            for raw in got:
                msg = raw.message
                self._hold(msg.receipt, hidden_from + self.visibility, raw.group)
                if msg.receive_count > self.spec.max_receive_count:
                    # Received that often without an ack (copies restart SQS's
                    # own count): the worker died each time. Stop the loop here,
                    # not counting this receive, which only moves it.
                    before = replace(msg, receive_count=msg.receive_count - 1)
                    self.dead_letter(
                        before, msg.failure or max_receives_failure(before.receive_count)
                    )
                    continue
                out.append(msg)
            if got:
                continue  # fill up with more calls while messages keep coming
            if out or deadline - time.monotonic() <= 0:
                break
            if poll == 0:  # under a second left: few short polls (each is a billed request)
                time.sleep(min(SHORT_POLL_PAUSE, max(0.0, deadline - time.monotonic())))
        return out

    # -- acting on a receive -----------------------------------------------------

    def ack(self, messages: Sequence[Message]) -> int:
        live = []
        for m in messages:
            if self._lapsed(m.receipt):
                log.info("not acking message %s of %s: its receipt has lapsed", m.id, self.name)
                continue
            live.append(m)
        deleted = 0
        for i in range(0, len(live), MAX_BATCH):
            chunk = live[i : i + MAX_BATCH]
            reply = self._broker.call(
                lambda c=chunk: self._sqs.delete_message_batch(
                    QueueUrl=self.url,
                    Entries=[{"Id": str(j), "ReceiptHandle": m.receipt} for j, m in enumerate(c)],
                ),
                f"ack on {self.name}",
            )
            deleted += len(reply.get("Successful", []))
            for m in chunk:
                self._forget(m.receipt)
        return deleted

    def _delete(self, message: Message) -> None:
        from botocore.exceptions import ClientError

        try:
            self._broker.call(
                lambda: self._sqs.delete_message(QueueUrl=self.url, ReceiptHandle=message.receipt),
                f"delete from {self.name}",
            )
        except ClientError as e:
            log.warning("could not delete message %s from %s: %s", message.id, self.name, e)
        self._forget(message.receipt)

    def change_visibility(self, message: Message, seconds: float) -> bool:
        if self._lapsed(message.receipt):
            return False
        from botocore.exceptions import ClientError

        hide = _seconds(seconds, MAX_VISIBILITY)
        started = time.monotonic()
        try:
            self._broker.call(
                lambda: self._sqs.change_message_visibility(
                    QueueUrl=self.url, ReceiptHandle=message.receipt, VisibilityTimeout=hide
                ),
                f"change visibility on {self.name}",
            )
        except ClientError as e:
            # ReceiptHandleIsInvalid, MessageNotInflight, or past SQS's 12 h limit.
            log.info("visibility of message %s on %s not changed: %s", message.id, self.name, e)
            return False
        with self._lock:
            held = self._held.get(message.receipt)
            if held is not None:
                held.hidden_until = started + hide
        return True

    def record_failure(self, message: Message, failure: dict[str, Any], retry_in: float) -> bool:
        """Replace the message by a delayed copy carrying ``failure`` (see the module docstring)."""
        if self._lapsed(message.receipt):
            return False
        if self.fifo or not message.body:
            # FIFO: a copy would lose its place in the group; an empty body is
            # a receipt-only stand-in (SQS never delivers empty bodies).
            return self.change_visibility(message, retry_in)
        from botocore.exceptions import ClientError

        try:
            self._send_copy(
                message, failure=failure, receives=message.receive_count, delay=retry_in
            )
        except (ClientError, SluicewayError) as e:
            log.warning(
                "message %s on %s: the failure record could not travel with it (%s); "
                "retrying it without",
                message.id,
                self.name,
                e,
            )
            return self.change_visibility(message, retry_in)
        self._delete(message)
        return True

    def dead_letter(self, message: Message, failure: dict[str, Any]) -> None:
        """Send the message to the DLQ with ``failure``, then delete it here."""
        if self._lapsed(message.receipt):
            log.warning(
                "message %s of %s not dead-lettered: received again since", message.id, self.name
            )
            return
        if not message.body:
            raise ValueError("dead_letter needs the received message, not a receipt stand-in")
        dlq_name = self.spec.dead_letter_queue
        if dlq_name is None:
            # SQS cannot park a message for ever; hide it as long as it allows.
            log.warning(
                "queue %s has no dead-letter queue: message %s is hidden for 12 h instead",
                self.name,
                message.id,
            )
            self.change_visibility(message, MAX_VISIBILITY)
            return
        dlq = self._broker.queue(dlq_name)
        dlq._send_copy(
            message,
            failure=failure,
            receives=message.receive_count,
            source=self.name,
            dead_at=time.time(),
            group=self._group(message.receipt) or self.name,
        )
        self._delete(message)

    # -- looking and moving ------------------------------------------------------

    def counts(self) -> QueueCounts:
        reply = self._broker.call(
            lambda: self._sqs.get_queue_attributes(
                QueueUrl=self.url,
                AttributeNames=[
                    "ApproximateNumberOfMessages",
                    "ApproximateNumberOfMessagesNotVisible",
                    "ApproximateNumberOfMessagesDelayed",
                ],
            ),
            f"counts of {self.name}",
        )
        a = reply.get("Attributes", {})
        return QueueCounts(
            visible=int(a.get("ApproximateNumberOfMessages", 0)),
            in_flight=int(a.get("ApproximateNumberOfMessagesNotVisible", 0)),
            delayed=int(a.get("ApproximateNumberOfMessagesDelayed", 0)),
        )

    def _scan(self, limit: int | None = None) -> Iterator[_Raw]:
        """Receive everything visible once, each hidden for PEEK_HIDE, in tens.

        The caller releases or deletes what it got. Stops when SQS has nothing
        more (a short poll, confirmed by the visible count and one long poll,
        since a short poll on AWS samples only some servers), or on a message
        seen before (the scan took longer than PEEK_HIDE).
        """
        seen: set[str] = set()
        n = 0
        while limit is None or n < limit:
            want = MAX_BATCH if limit is None else min(MAX_BATCH, limit - n)
            got, _ = self._receive_raw(want, 0, PEEK_HIDE)
            if not got and self.counts().visible > 0:
                got, _ = self._receive_raw(want, 1, PEEK_HIDE)
            if not got:
                return
            for raw in got:
                if raw.sqs_id in seen:
                    self._release([raw.message.receipt])
                    return
                seen.add(raw.sqs_id)
                n += 1
                yield raw

    def _release(self, receipts: Sequence[str]) -> None:
        """Make peeked messages visible again at once."""
        for i in range(0, len(receipts), MAX_BATCH):
            chunk = receipts[i : i + MAX_BATCH]
            self._broker.call(
                lambda c=chunk: self._sqs.change_message_visibility_batch(
                    QueueUrl=self.url,
                    Entries=[
                        {"Id": str(j), "ReceiptHandle": r, "VisibilityTimeout": 0}
                        for j, r in enumerate(c)
                    ],
                ),
                f"release on {self.name}",
            )

    def _dead_letter_view(self, raw: _Raw) -> Message:
        """A message as ``peek`` shows it: no receipt; DLQ bookkeeping filled in."""
        msg = replace(raw.message, receipt="", attributes=dict(raw.message.attributes))
        if raw.dead_lettered:
            msg.receive_count = raw.receives  # the count when it died; peeks do not add
        else:
            msg.receive_count = raw.receives + max(raw.approximate - 1, 0)  # minus this peek
        if self._broker.is_dlq(self.name) and not raw.dead_lettered:
            # Moved by SQS's redrive policy: nobody wrote down why.
            msg.failure = msg.failure or max_receives_failure(msg.receive_count)
            source = self._broker.source_of(self.name, raw.source_arn)
            if source is not None:
                msg.attributes.setdefault("source_queue", source)
        return msg

    def peek(self, limit: int = 100) -> list[Message]:
        if limit <= 0:
            return []
        if self.spec.dead_letter_queue is not None:
            if not self._warned_peek:
                log.warning(
                    "not peeking SQS queue %s: SQS can only look by receiving, and every "
                    "receive counts towards its redrive policy (max_receive_count %d); "
                    "`sluiceway status` shows its counts",
                    self.name,
                    self.spec.max_receive_count,
                )
                self._warned_peek = True
            return []
        out: list[Message] = []
        receipts: list[str] = []
        try:
            for raw in self._scan(limit):
                receipts.append(raw.message.receipt)
                out.append(self._dead_letter_view(raw))
        finally:
            self._release(receipts)
        return out

    def redrive(self, to: Queue, ids: Sequence[str] | None = None) -> int:
        wanted = set(ids) if ids is not None else None
        moved = 0
        skipped: list[str] = []
        try:
            for raw in self._scan():
                msg = raw.message
                if wanted is not None and msg.id not in wanted:
                    skipped.append(msg.receipt)
                    continue
                view = self._dead_letter_view(raw)
                if isinstance(to, SqsQueue):
                    to._send_copy(view, failure=view.failure, receives=0, delay=0)
                else:
                    to.send(view.body, attributes=view.attributes, id=view.id, delay=0)
                self._delete(msg)
                moved += 1
                if wanted is not None:
                    wanted.discard(msg.id)
                    if not wanted:
                        break
        finally:
            self._release(skipped)
        return moved

    def purge(self) -> int:
        c = self.counts()
        total = c.visible + c.in_flight + c.delayed
        from botocore.exceptions import ClientError

        try:
            self._broker.call(
                lambda: self._sqs.purge_queue(QueueUrl=self.url), f"purge {self.name}"
            )
        except ClientError as e:
            if "PurgeQueueInProgress" not in error_code(e):
                raise
            # One purge a minute: empty it by hand (visible messages only).
            total = 0
            for raw in self._scan():
                self._delete(raw.message)
                total += 1
        return total


def _entry_size(entry: Mapping[str, Any]) -> int:
    size = len(str(entry.get("MessageBody") or entry.get("Message") or "").encode())
    for name, value in (entry.get("MessageAttributes") or {}).items():
        size += len(name) + len(str(value)) + 16
    return size


def _chunks(entries: list[dict[str, Any]]) -> Iterator[list[dict[str, Any]]]:
    """Batches of at most ten entries and MAX_BATCH_BYTES."""
    chunk: list[dict[str, Any]] = []
    size = 0
    for e in entries:
        n = _entry_size(e)
        if chunk and (len(chunk) == MAX_BATCH or size + n > MAX_BATCH_BYTES):
            yield chunk
            chunk, size = [], 0
        chunk.append(e)
        size += n
    if chunk:
        yield chunk


class SqsBroker(Broker):
    """SQS queues and SNS topics under one name prefix (see the module docstring)."""

    def __init__(
        self,
        target: AwsTarget,
        specs: Mapping[str, QueueSpec],
        subscriptions: Mapping[str, Sequence[str]] | None = None,
        *,
        pipeline: str | None = None,
    ) -> None:
        self.target = target
        # The default is Terraform's too (``<pipeline>-``); an explicit empty
        # ``?prefix=`` means no prefix at all.
        self.prefix = broker_prefix(target.options.get("prefix"), pipeline, "", "{pipeline}-")
        self.fifo = target.flag("fifo")
        self.manage = target.flag("manage", default=True)
        self.specs = dict(specs)
        self.subscriptions = {t: list(qs) for t, qs in (subscriptions or {}).items()}
        for dlq in {s.dead_letter_queue for s in self.specs.values()} - {None}:
            self.specs.setdefault(dlq, QueueSpec(dlq))  # type: ignore[arg-type]
        self._check_names()
        sess = session()
        probe(
            "sqs",
            target,
            "broker",
            lambda c: c.list_queues(MaxResults=1),
            "SQS ListQueues",
            sess=sess,
        )
        self.sqs = make_client("sqs", target, sess=sess)
        self.sns = make_client("sns", target, sess=sess)
        self._queues: dict[str, SqsQueue] = {}
        self._topic_arns: dict[str, str] = {}
        self._setup()

    @classmethod
    def from_url(
        cls,
        url: str,
        specs: Mapping[str, QueueSpec],
        subscriptions: Mapping[str, Sequence[str]] | None = None,
        *,
        pipeline: str | None = None,
    ) -> SqsBroker:
        """``sqs://?region=…&prefix=…``: creates the queues and topics now."""
        return cls(parse_url(url, "sqs", OWN_OPTIONS), specs, subscriptions, pipeline=pipeline)

    def __repr__(self) -> str:
        return f"SqsBroker({self.target.display!r})"

    # -- names and set-up ----------------------------------------------------------

    def sqs_name(self, name: str) -> str:
        """The SQS queue (or SNS topic) name of a pipeline queue or topic."""
        return f"{self.prefix}{name}{'.fifo' if self.fifo else ''}"

    def _check_names(self) -> None:
        problems = []
        for kind, names, most in (("queue", self.specs, 80), ("topic", self.subscriptions, 256)):
            for name in names:
                full = self.sqs_name(name)
                if not _NAME_RE.match(full.removesuffix(".fifo")) or len(full) > most:
                    problems.append(
                        f"{self.target.display}: {kind} {name!r} becomes {full!r}, which "
                        f"{'SQS' if kind == 'queue' else 'SNS'} refuses: up to {most} characters "
                        "of letters, digits, '-' and '_' (rename it, or shorten the prefix)"
                    )
        for spec in self.specs.values():
            if spec.visibility_timeout > MAX_VISIBILITY:
                problems.append(f"queue {spec.name!r}: SQS allows a visibility_timeout up to 12h")
            if spec.delay > MAX_DELAY:
                problems.append(f"queue {spec.name!r}: SQS allows a delay up to 15m")
            if spec.max_receive_count > 1000:
                problems.append(f"queue {spec.name!r}: SQS allows max_receive_count up to 1000")
        if problems:
            raise ConfigError(problems)

    def call(self, fn: Callable[[], T], what: str) -> T:
        """Run one API call; botocore has retried it already, so name what failed."""
        from botocore.exceptions import BotoCoreError

        try:
            return fn()
        except BotoCoreError as e:
            raise AwsUnavailable(
                f"SQS/SNS at {self.target.where()} ({self.target.display}): {what} failed after "
                f"{self.target.max_attempts} attempts: {e}"
            ) from e

    def _setup(self) -> None:
        """Create (or update) every queue, DLQs first, then the topics and subscriptions."""
        if not self.manage:
            self._use_existing()
            return
        done: set[str] = set()

        def ensure(name: str) -> None:
            if name in done:
                return
            spec = self.specs[name]
            if spec.dead_letter_queue is not None:
                ensure(spec.dead_letter_queue)
            self._ensure_queue(spec)
            done.add(name)

        for name in self.specs:
            ensure(name)
        policies: dict[str, list[str]] = {}
        for topic, queues in self.subscriptions.items():
            arn = self._ensure_topic(topic, queues)
            for q in queues:
                policies.setdefault(q, []).append(arn)
        for q, topic_arns in policies.items():
            queue = self._queues[q]
            policy = {
                "Version": "2012-10-17",
                "Statement": [
                    {
                        "Sid": "sluiceway-topics",
                        "Effect": "Allow",
                        "Principal": {"Service": "sns.amazonaws.com"},
                        "Action": "sqs:SendMessage",
                        "Resource": queue.arn,
                        "Condition": {"ArnEquals": {"aws:SourceArn": sorted(topic_arns)}},
                    }
                ],
            }
            self.call(
                lambda u=queue.url, p=policy: self.sqs.set_queue_attributes(
                    QueueUrl=u, Attributes={"Policy": json.dumps(p)}
                ),
                f"queue policy of {q}",
            )

    def _ensure_queue(self, spec: QueueSpec) -> None:
        from botocore.exceptions import ClientError

        attributes = {
            "VisibilityTimeout": str(_seconds(spec.visibility_timeout, MAX_VISIBILITY)),
            "DelaySeconds": str(_seconds(spec.delay, MAX_DELAY)),
            "MessageRetentionPeriod": str(RETENTION),
        }
        if spec.dead_letter_queue is not None:
            attributes["RedrivePolicy"] = json.dumps(
                {
                    "deadLetterTargetArn": self._queues[spec.dead_letter_queue].arn,
                    "maxReceiveCount": str(spec.max_receive_count),
                }
            )
        name = self.sqs_name(spec.name)
        create = dict(attributes)
        if self.fifo:
            create.update({"FifoQueue": "true", "ContentBasedDeduplication": "false"})
        try:
            url = self.call(
                lambda: self.sqs.create_queue(QueueName=name, Attributes=create)["QueueUrl"],
                f"create queue {name}",
            )
        except ClientError as e:
            code = error_code(e)
            if code == "QueueDeletedRecently" or "DeletedRecently" in code:
                raise SluicewayError(
                    f"SQS queue {name} was deleted less than a minute ago; SQS refuses to "
                    "create it again before then. Start again in a minute."
                ) from None
            if "QueueAlreadyExists" not in code and "QueueNameExists" not in code:
                raise
            # It exists with other settings: the pipeline file wins.
            url = self.call(
                lambda: self.sqs.get_queue_url(QueueName=name)["QueueUrl"], f"find queue {name}"
            )
            self.call(
                lambda: self.sqs.set_queue_attributes(QueueUrl=url, Attributes=attributes),
                f"update queue {name}",
            )
        arn = self.call(
            lambda: self.sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["QueueArn"])[
                "Attributes"
            ]["QueueArn"],
            f"describe queue {name}",
        )
        self._queues[spec.name] = SqsQueue(self, spec, url, arn)

    def _use_existing(self) -> None:
        """``manage=false``: find every queue and topic, read their settings, change nothing.

        The queue's own settings win over the file's (Terraform may have made
        the visibility timeout six times the Lambda timeout, as AWS advises).
        Every problem is collected, so one start names every missing piece.
        """
        from botocore.exceptions import ClientError

        problems: list[str] = []
        attributes: dict[str, dict[str, str]] = {}
        for name in self.specs:
            full = self.sqs_name(name)
            try:
                url = self.call(
                    lambda n=full: self.sqs.get_queue_url(QueueName=n)["QueueUrl"],
                    f"find queue {full}",
                )
            except ClientError as e:
                if "NonExistentQueue" not in error_code(e) and "QueueDoesNotExist" not in str(e):
                    raise
                problems.append(f"SQS queue {full} (the pipeline's queue {name!r}) does not exist")
                continue
            attributes[name] = {
                "QueueUrl": url,
                **self.call(
                    lambda u=url: self.sqs.get_queue_attributes(QueueUrl=u, AttributeNames=["All"])[
                        "Attributes"
                    ],
                    f"describe queue {full}",
                ),
            }
        arns = {name: a["QueueArn"] for name, a in attributes.items()}
        for name, attrs in attributes.items():
            spec = self.specs[name]
            full = self.sqs_name(name)
            if (attrs.get("FifoQueue") == "true") != self.fifo:
                problems.append(
                    f"SQS queue {full} is {'' if self.fifo else 'not '}expected to be FIFO "
                    f"(fifo={'true' if self.fifo else 'false'} in the URL), but it "
                    f"{'is not' if self.fifo else 'is'}"
                )
            changes: dict[str, Any] = {
                "visibility_timeout": float(
                    attrs.get("VisibilityTimeout", spec.visibility_timeout)
                ),
                "delay": float(attrs.get("DelaySeconds", spec.delay)),
            }
            redrive = json.loads(attrs.get("RedrivePolicy") or "null")
            dlq = spec.dead_letter_queue
            if redrive:
                changes["max_receive_count"] = int(redrive["maxReceiveCount"])
                target = redrive.get("deadLetterTargetArn")
                if dlq is not None and dlq in arns and target != arns[dlq]:
                    problems.append(
                        f"SQS queue {full} dead-letters to {target}, not to the pipeline's "
                        f"DLQ {self.sqs_name(dlq)} ({arns[dlq]})"
                    )
            self.specs[name] = replace(spec, **changes)
            self._queues[name] = SqsQueue(self, self.specs[name], attrs["QueueUrl"], arns[name])
        for topic, queues in self.subscriptions.items():
            problems += self._check_topic(topic, [q for q in queues if q in arns])
        if problems:
            raise SluicewayError(
                "\n".join(
                    [f"{self.target.display}: manage=false uses what exists and changes nothing:"]
                    + [f"  {p}" for p in problems]
                    + ["Create them (`sluiceway deploy terraform` does), or drop manage=false."]
                )
            )

    def _check_topic(self, topic: str, queues: Sequence[str]) -> list[str]:
        """``manage=false``: the topic's ARN, and a raw-delivery subscription per queue."""
        name = self.sqs_name(topic)
        arn = None
        for page in self._pages(self.sns.list_topics, "Topics", f"list topics for {name}"):
            arn = next((t["TopicArn"] for t in page if t["TopicArn"].endswith(f":{name}")), arn)
        if arn is None:
            return [f"SNS topic {name} (the pipeline's topic {topic!r}) does not exist"]
        self._topic_arns[topic] = arn
        subs = self._subscriptions(arn, name)
        problems = []
        for q in queues:
            queue = self._queues[q]
            sub_arn = subs.get(queue.arn)
            if sub_arn is None:
                problems.append(f"SNS topic {name} has no subscription for SQS queue {queue.arn}")
                continue
            raw = self.call(
                lambda a=sub_arn: self.sns.get_subscription_attributes(SubscriptionArn=a),
                f"subscription of {q} to {name}",
            )["Attributes"].get("RawMessageDelivery")
            if raw != "true":
                problems.append(
                    f"the subscription of SQS queue {queue.arn} to SNS topic {name} needs "
                    "RawMessageDelivery=true (the body must arrive as published)"
                )
        return problems

    def _subscriptions(self, arn: str, name: str) -> dict[str, str]:
        """A topic's confirmed SQS subscriptions: queue ARN → subscription ARN."""
        return {
            sub["Endpoint"]: sub["SubscriptionArn"]
            for page in self._pages(
                lambda **k: self.sns.list_subscriptions_by_topic(TopicArn=arn, **k),
                "Subscriptions",
                f"list {name}",
            )
            for sub in page
            if sub.get("Protocol") == "sqs" and sub.get("SubscriptionArn", "").startswith("arn:")
        }

    def _pages(
        self, fn: Callable[..., dict[str, Any]], key: str, what: str
    ) -> Iterator[list[dict[str, Any]]]:
        """The ``key`` lists of every page of an SNS listing (``NextToken`` paging)."""
        kwargs: dict[str, str] = {}
        while True:
            page = self.call(lambda k=kwargs: fn(**k), what)
            yield page.get(key, [])
            if not page.get("NextToken"):
                return
            kwargs = {"NextToken": page["NextToken"]}

    def _ensure_topic(self, topic: str, queues: Sequence[str]) -> str:
        name = self.sqs_name(topic)
        attributes = (
            {"FifoTopic": "true", "ContentBasedDeduplication": "false"} if self.fifo else {}
        )
        arn = self.call(
            lambda: self.sns.create_topic(Name=name, Attributes=attributes)["TopicArn"],
            f"create topic {name}",
        )
        self._topic_arns[topic] = arn
        existing = self._subscriptions(arn, name)  # queue ARN → subscription ARN
        wanted = {self._queues[q].arn for q in queues if q in self._queues}
        missing = [q for q in queues if q not in self._queues]
        if missing:
            raise ConfigError([f"topic {topic!r} subscribes unknown queues: {', '.join(missing)}"])
        ours = {q.arn for q in self._queues.values()}
        for endpoint, sub_arn in existing.items():
            if endpoint in ours and endpoint not in wanted:
                self.call(
                    lambda s=sub_arn: self.sns.unsubscribe(SubscriptionArn=s),
                    f"unsubscribe from {name}",
                )
        for q in queues:
            queue_arn = self._queues[q].arn
            if queue_arn in existing:
                self.call(
                    lambda s=existing[queue_arn]: self.sns.set_subscription_attributes(
                        SubscriptionArn=s,
                        AttributeName="RawMessageDelivery",
                        AttributeValue="true",
                    ),
                    f"subscription of {q} to {name}",
                )
                continue
            self.call(
                lambda a=queue_arn: self.sns.subscribe(
                    TopicArn=arn,
                    Protocol="sqs",
                    Endpoint=a,
                    Attributes={"RawMessageDelivery": "true"},
                    ReturnSubscriptionArn=True,
                ),
                f"subscribe {q} to {name}",
            )
        return arn

    # -- the interface -------------------------------------------------------------

    def queue(self, name: str) -> SqsQueue:
        q = self._queues.get(name)
        if q is None:
            raise KeyError(f"unknown queue {name!r}")
        return q

    def is_dlq(self, name: str) -> bool:
        return any(s.dead_letter_queue == name for s in self.specs.values())

    def source_of(self, dlq: str, source_arn: str | None) -> str | None:
        """The queue a natively dead-lettered message came from, when it can be known."""
        if source_arn:
            for name, q in self._queues.items():
                if q.arn == source_arn:
                    return name
        sources = [s.name for s in self.specs.values() if s.dead_letter_queue == dlq]
        return sources[0] if len(sources) == 1 else None

    def publish(self, topic: str, messages: Sequence[OutgoingMessage]) -> None:
        """SNS ``PublishBatch`` in tens; SNS copies each message to every subscribed queue."""
        arn = self._topic_arns.get(topic)
        if arn is None:
            raise KeyError(f"unknown topic {topic!r}")
        entries: list[dict[str, Any]] = []
        seen: set[str] = set()
        for m in messages:
            mid = m.id or str(uuid.uuid4())
            if mid in seen:
                continue
            seen.add(mid)
            attrs = {A_ID: _string(mid)}
            if m.attributes:
                attrs[A_ATTRS] = _string(json.dumps(m.attributes, default=str))
            entry: dict[str, Any] = {"Message": m.body, "MessageAttributes": attrs}
            if self.fifo:
                group = m.attributes.get(GROUP_ATTRIBUTE)
                entry["MessageGroupId"] = str(group) if group not in (None, "") else topic
                entry["MessageDeduplicationId"] = _dedup_id(mid)
            entries.append(entry)

        def publish_chunk(chunk: list[dict[str, Any]]) -> list[dict[str, Any]]:
            numbered = {str(i): e for i, e in enumerate(chunk)}
            reply = self.call(
                lambda: self.sns.publish_batch(
                    TopicArn=arn,
                    PublishBatchRequestEntries=[{"Id": i, **e} for i, e in numbered.items()],
                ),
                f"publish to {topic}",
            )
            again = []
            for failed in reply.get("Failed", []):
                if failed.get("SenderFault"):
                    raise SluicewayError(
                        f"SNS refused a message for topic {topic}: "
                        f"{failed.get('Code')}: {failed.get('Message')}"
                    )
                again.append(numbered[failed["Id"]])
            return again

        for chunk in _chunks(entries):
            retry_unprocessed(publish_chunk, chunk, f"publish to SNS topic {topic}")

    def close(self) -> None:
        for client in (self.sqs, self.sns):
            client.close()
