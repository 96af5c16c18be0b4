"""NATS JetStream queues and topics (nats-py): SQS semantics on pull consumers.

``nats://[user:${PASSWORD}@]host:4222?prefix=sw.my-pipeline`` — the prefix
(default ``sluiceway.<pipeline>``) names everything this backend creates; also
``replicas=N`` (stream replicas, default 1) and ``duplicate_window=SECONDS``
(message-id dedup window, default 120).

The layout: **one stream per pipeline** (work-queue retention: an acked
message is gone) with the subjects ``<prefix>.q.<queue>`` (ready),
``<prefix>.d.<queue>`` (delayed) and ``<prefix>.p.<queue>`` (parked), and
per queue **a durable pull consumer** on its ``q`` subject plus one on its
``d`` subject.

What is JetStream's own and what is ours:

* **Visibility timeout**: native. The consumer's ``AckWait`` is the
  queue's ``visibility_timeout``; an unacked delivery is redelivered by the
  server however stuck the worker is. ``change_visibility`` is native too:
  ``+WPI`` (in progress: AckWait again) for the heartbeat, ``-NAK`` with a
  delay for any other time (the server then treats the delivery as due
  after exactly that long; the holder may still ack it), ``-NAK`` for 0.
* **Receive count**: the server's delivery count (from the ack subject)
  plus ``Sw-Receives`` (receives before we republished the message).
* **Stale receipts** (ours): JetStream acks by stream sequence, so an ack
  from an earlier delivery would delete a message redelivered to someone
  else. Each broker object tracks the deliveries it holds and their
  deadlines; an ack, heartbeat or failure on a delivery whose deadline
  passed (or that this process received again since) is refused, as SQS
  refuses a stale receipt.
* **Max receives and the DLQ** (ours): ``MaxDeliver`` is unlimited; a
  receive that finds a message past ``max_receive_count`` moves it to the
  DLQ's subject with its failure record and acks it, as the SQLite backend
  does. Native ``MaxDeliver`` would leave the message in the stream, never
  delivered again, behind an advisory that nobody may be listening for
  (advisories are not persisted) and without our failure record.
* **Failure records** travel in headers: ``record_failure`` republishes the
  message with ``Sw-Failure`` (to ``d`` with a due time when ``retry_in`` >
  0) and then acks the original, so the record reaches the next receive
  and the DLQ without a side store. The ack subject is the receipt, so even
  another process (the runtime blaming a dead worker) can do this.
* **Delay** (ours, on native timers): a delayed message is published to the
  queue's ``d`` subject with ``Sw-Due``. Receives pump that consumer: a
  message not yet due is ``-NAK``ed with exactly the time left (the server
  keeps the timer; nothing blocks anything else), a due one is published to
  ``q`` and acked. NATS 2.9 has no scheduled messages.
* **Dedup**: native ``Nats-Msg-Id`` (``<queue>:<id>``) within the stream's
  duplicate window; internal moves use their own ids, so a retried move is
  idempotent and never collides with a user's send.
* **Counts**: consumer info. Visible = ``num_pending`` of ``q``; in flight
  = its ``num_ack_pending`` (also a message whose visibility ran out, until
  it is delivered again); delayed = everything on ``d``.
* **Peek** reads the stream by sequence (``next_by_subj``): nothing is
  delivered, held messages included. **Redrive** copies and then deletes by
  sequence; **purge** is a filtered stream purge (held messages too).
* **Topics**: publishing to a topic publishes to each subscribed queue's
  subject (each with its own delay and dedup id). A subject per topic with
  one consumer per queue would need interest retention and per-consumer
  delays; a retried publish is idempotent by message id either way.

nats-py is asyncio: each broker object runs one private event loop in a
background thread and its methods call into it with
``run_coroutine_threadsafe`` and a timeout, so any thread (the heartbeat)
may use it. The client reconnects by itself; calls retry for a while with
backoff. An unreachable server at start is one :class:`NatsUnavailable`.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import hashlib
import itertools
import json
import logging
import re
import threading
import time
import uuid
from collections.abc import Callable, Coroutine, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import nats
import nats.errors
import nats.js.errors
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js.api import (
    AckPolicy,
    ConsumerConfig,
    DeliverPolicy,
    RetentionPolicy,
    StorageType,
    StreamConfig,
)

from .. import health
from ..connections import Backoff, one_line, redact, split_query
from ..errors import SluicewayError
from .base import Broker, Message, OutgoingMessage, Queue, QueueCounts, QueueSpec
from .conventions import broker_prefix, checked_subscriptions, max_receives_failure

log = logging.getLogger("sluiceway.nats")

T = TypeVar("T")

DEFAULT_PREFIX = "sluiceway"
OWN_PARAMETERS = ("prefix", "replicas", "duplicate_window")
START_ATTEMPTS = 3
CONNECT_TIMEOUT = 2
RETRY_FOR = 30.0  # s an operation retries while the server is unreachable
API_TIMEOUT = 5.0
PULL_GRACE = 2.0  # s past a pull's expiry before we stop waiting for its end
LONG_POLL_SLICE = 0.25  # s: a long poll in slices, pumping delayed messages between
PUMP_EVERY = 0.05  # s between pumps of one queue's delayed messages (per process)
PUMP_BATCH = 64
DELAY_ACK_WAIT = 5.0  # s: the delay consumer's AckWait (only matters if a pump dies)
TOKEN_RE = re.compile(r"^[A-Za-z0-9_-]+$")


class NatsUnavailable(SluicewayError):
    """The NATS server cannot be reached (at start, or for longer than RETRY_FOR)."""


class NatsError(SluicewayError):
    """JetStream refused an operation (JetStream off, a conflicting stream…)."""


def split_url(url: str) -> tuple[str, dict[str, str]]:
    """The server URL for nats-py and our own query parameters."""
    rest, ours, _ = split_query(url, OWN_PARAMETERS)
    return rest, ours


def safe_name(text: str) -> str:
    """``text`` as a stream or consumer name (no ``.``, ``*``, ``>``, spaces).

    Changed names get a short hash, so ``a.b`` and ``a_b`` stay different.
    """
    clean = re.sub(r"[^A-Za-z0-9_-]", "_", text)
    if clean == text:
        return text
    return f"{clean}_{hashlib.sha256(text.encode()).hexdigest()[:8]}"


@dataclass(frozen=True)
class AckSubject:
    """What a JetStream delivery's reply subject (``$JS.ACK…``) says."""

    stream: str
    consumer: str
    delivered: int
    seq: int

    @classmethod
    def parse(cls, reply: str) -> AckSubject | None:
        t = reply.split(".")
        if len(t) < 9 or t[0] != "$JS" or t[1] != "ACK":
            return None
        off = 2 if len(t) == 9 else 4  # v2 subjects carry domain and account hash
        try:
            return cls(t[off], t[off + 1], int(t[off + 2]), int(t[off + 3]))
        except (IndexError, ValueError):
            return None


@dataclass
class _Envelope:
    """A message as it travels: body plus the headers our layer keeps."""

    id: str
    body: bytes
    attributes: dict[str, Any]
    sent_at: float
    receives: int = 0  # receives before this copy was published
    failure: dict[str, Any] | None = None
    due: float | None = None
    dead: bool = False  # a DLQ entry: `receives` is the count at death

    def headers(self, msg_id: str) -> dict[str, str]:
        h = {
            "Nats-Msg-Id": msg_id,
            "Sw-Id": self.id,
            "Sw-Attr": json.dumps(self.attributes),
            "Sw-Sent": repr(float(self.sent_at)),
            "Sw-Receives": str(int(self.receives)),
        }
        if self.failure is not None:
            h["Sw-Failure"] = json.dumps(self.failure, default=str)  # one line: \\n escaped
        if self.due is not None:
            h["Sw-Due"] = repr(float(self.due))
        if self.dead:
            h["Sw-Dead"] = "1"
        return h

    @classmethod
    def decode(
        cls, headers: Mapping[str, str] | None, data: bytes | None, fallback_id: str
    ) -> _Envelope:
        h = dict(headers or {})

        def js(key: str, default: Any) -> Any:
            try:
                return json.loads(h[key]) if key in h else default
            except ValueError:
                return default

        return cls(
            id=h.get("Sw-Id") or h.get("Nats-Msg-Id") or fallback_id,
            body=data or b"",
            attributes=js("Sw-Attr", {}),
            sent_at=float(h.get("Sw-Sent") or time.time()),
            receives=int(h.get("Sw-Receives") or 0),
            failure=js("Sw-Failure", None),
            due=float(h["Sw-Due"]) if h.get("Sw-Due") else None,
            dead=h.get("Sw-Dead") == "1",
        )

    def message(self, queue: str, receive_count: int, receipt: str) -> Message:
        return Message(
            id=self.id,
            queue=queue,
            body=self.body.decode("utf-8", errors="replace"),
            attributes=dict(self.attributes),
            receive_count=receive_count,
            receipt=receipt,
            sent_at=self.sent_at,
            failure=self.failure,
        )


@dataclass
class _Held:
    """A delivery this process holds, with the deadline after which it is stale."""

    queue: str
    ack: AckSubject
    deadline: float  # time.monotonic()
    env: _Envelope
    receive_count: int


@dataclass
class _Publish:
    subject: str
    env: _Envelope
    msg_id: str
    future: asyncio.Future[Any] | None = field(default=None, repr=False)


@dataclass
class _PullSub:
    """A consumer's delivery inbox in this process; pulls on it take turns."""

    inbox: str
    queue: asyncio.Queue[Msg] = field(default_factory=asyncio.Queue)
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    active: str | None = None  # the token of the pull in progress


class _Loop:
    """A private asyncio event loop in a daemon thread; sync callers wait with a timeout."""

    def __init__(self, name: str) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self._run, name=name, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float, what: str) -> T:
        if threading.current_thread() is self.thread:
            coro.close()
            raise RuntimeError("a NATS broker method was called from its own event loop")
        fut = asyncio.run_coroutine_threadsafe(coro, self.loop)
        try:
            return fut.result(timeout)
        except concurrent.futures.TimeoutError:
            fut.cancel()
            raise NatsUnavailable(f"{what}: no answer within {timeout:g}s") from None

    def stop(self) -> None:
        if self.loop.is_closed():
            return
        self.loop.call_soon_threadsafe(self.loop.stop)
        if threading.current_thread() is not self.thread:
            self.thread.join(5)
        if not self.thread.is_alive():
            self.loop.close()


RETRYABLE = (
    nats.errors.TimeoutError,
    nats.errors.NoRespondersError,
    nats.errors.ConnectionReconnectingError,
    nats.errors.StaleConnectionError,
    nats.js.errors.ServiceUnavailableError,
    TimeoutError,
)


class NatsQueue(Queue):
    """One SQS-like queue: two subjects of the pipeline's stream and their consumers."""

    def __init__(self, broker: NatsBroker, spec: QueueSpec) -> None:
        self.broker = broker
        self.spec = spec
        p = broker.prefix
        self.subject = f"{p}.q.{spec.name}"
        self.delay_subject = f"{p}.d.{spec.name}"
        self.parked_subject = f"{p}.p.{spec.name}"
        self.consumer = safe_name(f"q_{spec.name}")
        self.delay_consumer = safe_name(f"d_{spec.name}")
        self._next_pump = 0.0

    def __repr__(self) -> str:
        return f"NatsQueue({self.name!r} on {self.subject!r})"

    def _run(
        self, op: Callable[[], Coroutine[Any, Any, T]], what: str, timeout: float | None = None
    ) -> T:
        return self.broker.run(op, f"{what} on queue {self.name!r}", timeout)

    # -- setup (loop) ------------------------------------------------------------------

    async def declare(self) -> None:
        b = self.broker
        for name, subject, ack_wait in (
            (self.consumer, self.subject, self.spec.visibility_timeout),
            (self.delay_consumer, self.delay_subject, DELAY_ACK_WAIT),
        ):
            config = ConsumerConfig(
                durable_name=name,
                filter_subject=subject,
                ack_policy=AckPolicy.EXPLICIT,
                deliver_policy=DeliverPolicy.ALL,
                ack_wait=ack_wait,
                max_deliver=-1,  # max receives are ours: see the module docstring
                max_ack_pending=-1,
            )
            try:
                await b.jsm.add_consumer(b.stream, config)
            except nats.js.errors.APIError as e:
                raise NatsError(
                    f"NATS at {b.safe_url}: cannot create consumer {name!r} on stream "
                    f"{b.stream!r}: {e.description or e}. If it exists with other settings "
                    "that cannot change, delete it or use another ?prefix=."
                ) from None

    # -- inside the loop ---------------------------------------------------------------

    async def _pump(self) -> None:
        """Move due delayed messages to the queue; NAK the others for the time they have left."""
        now = time.monotonic()
        if now < self._next_pump:
            return
        self._next_pump = now + PUMP_EVERY
        b = self.broker
        msgs = await b.pull(self.delay_consumer, PUMP_BATCH, None)
        for m in msgs:
            ack = AckSubject.parse(m.reply or "")
            env = _Envelope.decode(m.headers, m.data, f"nats-{b.stream}-{ack.seq if ack else 0}")
            left = (env.due or 0) - time.time()
            if left > 0:  # never out early: NAK again for what is left
                await b.nc.publish(m.reply, f'-NAK {{"delay": {int(left * 1e9)}}}'.encode())
                continue
            env.due = None
            seq = ack.seq if ack else uuid.uuid4().hex
            await b.publish_all([_Publish(self.subject, env, f"mv:{self.name}:{seq}")])
            await b.reply(m.reply, b"+ACK")

    async def _admit(self, msgs: list[Msg]) -> list[Message]:
        """Deliveries → messages; those past their receive budget go to the DLQ instead."""
        b = self.broker
        out: list[Message] = []
        for m in msgs:
            ack = AckSubject.parse(m.reply or "")
            if ack is None:
                continue
            env = _Envelope.decode(m.headers, m.data, f"nats-{b.stream}-{ack.seq}")
            receive_count = env.receives + ack.delivered
            if (
                self.spec.dead_letter_queue is not None
                and receive_count > self.spec.max_receive_count
            ):
                env.receives = receive_count - 1
                await self._dead_letter(env, env.failure or max_receives_failure(env.receives), ack)
                await b.reply(m.reply, b"+ACK")
                continue
            b.hold(
                m.reply,
                _Held(
                    self.name, ack, self._deadline(self.spec.visibility_timeout), env, receive_count
                ),
            )
            out.append(env.message(self.name, receive_count, m.reply))
        return out

    def _deadline(self, seconds: float) -> float:
        """When this process stops trusting a delivery: a little before the server does.

        The server's timer started before the message reached us.
        """
        return time.monotonic() + seconds - min(0.05, seconds * 0.1)

    async def _receive(self, max_messages: int, wait: float) -> list[Message]:
        b = self.broker
        deadline = time.monotonic() + wait
        while True:
            await self._pump()
            out = await self._admit(await b.pull(self.consumer, max_messages, None))
            remaining = deadline - time.monotonic()
            if out or remaining <= 0:
                return out
            if remaining < 0.01:
                await asyncio.sleep(remaining)
                continue
            # Long poll for one message, a slice at a time (delayed ones are pumped between).
            got = await b.pull(self.consumer, 1, min(remaining, LONG_POLL_SLICE))
            out = await self._admit(got)
            if out:
                if max_messages > 1:
                    out += await self._admit(await b.pull(self.consumer, max_messages - 1, None))
                return out

    async def _dead_letter(self, env: _Envelope, failure: dict[str, Any], ack: AckSubject) -> None:
        b = self.broker
        env.attributes = {
            **env.attributes,
            "source_queue": self.name,
            "dead_lettered_at": time.time(),
        }
        env.failure, env.dead, env.due = failure, True, None
        dlq = self.spec.dead_letter_queue
        if dlq is None:
            subject = self.parked_subject  # no DLQ: park it rather than drop it
            log.warning("message %s on %s has no DLQ; parked on %s", env.id, self.name, subject)
        else:
            subject = b.queue(dlq).subject
        await b.publish_all([_Publish(subject, env, f"dl:{self.name}:{ack.seq}")])

    async def _resolve(
        self, message: Message
    ) -> tuple[_Held | None, AckSubject | None, _Envelope | None, int]:
        """The delivery behind a receipt: held here, or another process's (by its ack subject).

        Returns ``(held, ack, envelope, receive_count)``; all None when the
        receipt is stale here or the message is gone.
        """
        b = self.broker
        h = b.held.get(message.receipt)
        if h is not None:
            if h.queue != self.name or time.monotonic() >= h.deadline:
                return None, None, None, 0
            return h, h.ack, h.env, h.receive_count
        if message.receipt in b.released:
            return None, None, None, 0
        ack = AckSubject.parse(message.receipt)
        if ack is None or ack.stream != b.stream or ack.consumer != self.consumer:
            return None, None, None, 0
        try:
            raw = await b.jsm.get_msg(b.stream, ack.seq)
        except nats.js.errors.NotFoundError:
            return None, None, None, 0
        env = _Envelope.decode(raw.headers, raw.data, message.id)
        return None, ack, env, env.receives + ack.delivered

    async def _ack(self, messages: Sequence[Message]) -> int:
        b = self.broker
        n = 0
        for m in messages:
            h = b.held.get(m.receipt)
            if h is None or h.queue != self.name or time.monotonic() >= h.deadline:
                continue
            await b.reply(m.receipt, b"+ACK")
            b.release(m.receipt)
            n += 1
        return n

    async def _change_visibility(self, message: Message, seconds: float) -> bool:
        b = self.broker
        h = b.held.get(message.receipt)
        if h is None or h.queue != self.name or time.monotonic() >= h.deadline:
            return False
        if seconds <= 0:
            await b.reply(message.receipt, b"-NAK")
            b.release(message.receipt)
        elif seconds == self.spec.visibility_timeout:
            await b.reply(message.receipt, b"+WPI")  # the heartbeat: AckWait again
            h.deadline = self._deadline(seconds)
        else:
            # Due again after exactly `seconds`; still ours to ack until then.
            await b.reply(message.receipt, f'-NAK {{"delay": {int(seconds * 1e9)}}}'.encode())
            h.deadline = self._deadline(seconds)
        return True

    async def _record_failure(
        self, message: Message, failure: dict[str, Any], retry_in: float
    ) -> bool:
        b = self.broker
        _, ack, env, receive_count = await self._resolve(message)
        if ack is None or env is None:
            return False
        env.failure, env.receives = failure, receive_count
        if retry_in > 0:
            env.due = time.time() + retry_in
            subject = self.delay_subject
        else:
            env.due = None
            subject = self.subject
        # First the new copy (idempotent by id), then the old one goes.
        await b.publish_all([_Publish(subject, env, f"rf:{self.name}:{ack.seq}:{ack.delivered}")])
        await b.reply(message.receipt, b"+ACK")
        b.release(message.receipt)
        return True

    async def _dead_letter_message(self, message: Message, failure: dict[str, Any]) -> None:
        b = self.broker
        _, ack, env, receive_count = await self._resolve(message)
        if ack is None or env is None:
            log.warning(
                "message %s on %s: its delivery is stale or gone; not dead-lettered here",
                message.id,
                self.name,
            )
            return
        env.receives = receive_count
        await self._dead_letter(env, failure, ack)
        await b.reply(message.receipt, b"+ACK")
        b.release(message.receipt)

    async def _counts(self) -> QueueCounts:
        b = self.broker
        main = await b.jsm.consumer_info(b.stream, self.consumer)
        delay = await b.jsm.consumer_info(b.stream, self.delay_consumer)
        return QueueCounts(
            visible=main.num_pending or 0,
            in_flight=main.num_ack_pending or 0,
            delayed=(delay.num_pending or 0) + (delay.num_ack_pending or 0),
        )

    async def _scan(self, limit: int, subject: str | None = None) -> list[tuple[int, _Envelope]]:
        """Up to ``limit`` messages on the subject, by stream sequence; nothing is delivered."""
        b = self.broker
        subject = subject or self.subject
        out: list[tuple[int, _Envelope]] = []
        seq = 1
        while len(out) < limit:
            try:
                raw = await b.jsm.get_msg(b.stream, seq, subject=subject, next=True)
            except nats.js.errors.NotFoundError:
                break
            assert raw.seq is not None
            out.append(
                (raw.seq, _Envelope.decode(raw.headers, raw.data, f"nats-{b.stream}-{raw.seq}"))
            )
            seq = raw.seq + 1
        return out

    async def _purge(self) -> int:
        b = self.broker
        n = 0
        for subject in (self.subject, self.delay_subject):
            resp = await b.api(f"$JS.API.STREAM.PURGE.{b.stream}", {"filter": subject})
            n += int(resp.get("purged", 0))
        return n

    # -- the interface -----------------------------------------------------------------

    def _outgoing(self, messages: Sequence[OutgoingMessage], ids: list[str]) -> list[_Publish]:
        now = time.time()
        out = []
        for mid, m in zip(ids, messages, strict=True):
            env = _Envelope(mid, m.body.encode("utf-8"), dict(m.attributes), now)
            delay = self.spec.delay if m.delay is None else m.delay
            if delay > 0:
                env.due = now + delay
                subject = self.delay_subject
            else:
                subject = self.subject
            out.append(_Publish(subject, env, f"{self.name}:{mid}"))  # native dedup by id
        return out

    def send_batch(self, messages: Sequence[OutgoingMessage]) -> list[str]:
        ids = [m.id or str(uuid.uuid4()) for m in messages]
        pubs = self._outgoing(messages, ids)
        self._run(lambda: self.broker.publish_all(pubs), "send")
        return ids

    def receive(self, max_messages: int = 1, *, wait: float = 0.0) -> list[Message]:
        return self._run(
            lambda: self._receive(max_messages, wait),
            "receive",
            timeout=wait + PULL_GRACE + API_TIMEOUT * 2,
        )

    def ack(self, messages: Sequence[Message]) -> int:
        return self._run(lambda: self._ack(messages), "ack")

    def change_visibility(self, message: Message, seconds: float) -> bool:
        return self._run(lambda: self._change_visibility(message, seconds), "change_visibility")

    def record_failure(self, message: Message, failure: dict[str, Any], retry_in: float) -> bool:
        return self._run(lambda: self._record_failure(message, failure, retry_in), "record_failure")

    def dead_letter(self, message: Message, failure: dict[str, Any]) -> None:
        self._run(lambda: self._dead_letter_message(message, failure), "dead_letter")

    def counts(self) -> QueueCounts:
        return self._run(self._counts, "counts")

    def peek(self, limit: int = 100) -> list[Message]:
        found = self._run(lambda: self._scan(limit), "peek")
        return [env.message(self.name, env.receives, "") for _, env in found]

    def redrive(self, to: Queue, ids: Sequence[str] | None = None) -> int:
        wanted = set(ids) if ids is not None else None
        found = self._run(lambda: self._scan(1 << 62), "redrive")
        moved = 0
        b = self.broker
        for seq, env in found:
            if wanted is not None and env.id not in wanted:
                continue
            env.receives, env.dead, env.due = 0, False, None
            if isinstance(to, NatsQueue) and to.broker is b:
                pub = _Publish(to.subject, env, f"rd:{to.name}:{seq}")  # visible now
                self._run(lambda p=pub: b.publish_all([p]), "redrive")
            else:
                body = env.body.decode("utf-8", errors="replace")
                to.send_batch([OutgoingMessage(body, env.attributes, env.id, delay=0)])
            # Copied first, then removed: a crash in between leaves a duplicate, never a loss.
            self._run(lambda n=seq: b.jsm.delete_msg(b.stream, n), "redrive")
            moved += 1
        return moved

    def purge(self) -> int:
        return self._run(self._purge, "purge")


class NatsBroker(Broker):
    """Queues and topics in one JetStream stream per pipeline (per prefix)."""

    _counter = itertools.count(1)

    def __init__(
        self,
        url: str,
        specs: Mapping[str, QueueSpec],
        subscriptions: Mapping[str, Sequence[str]] | None = None,
        *,
        retry_for: float = RETRY_FOR,
        pipeline: str | None = None,
    ) -> None:
        self.url = url
        self.safe_url = redact(url)
        self.server_url, ours = split_url(url)
        self.prefix = broker_prefix(
            ours.get("prefix") or None, pipeline, DEFAULT_PREFIX, DEFAULT_PREFIX + ".{pipeline}"
        )
        if not all(TOKEN_RE.match(t) for t in self.prefix.split(".")):
            raise NatsError(
                f"broker URL {self.safe_url!r}: prefix {self.prefix!r} must be dot-separated "
                "tokens of letters, digits, '_' and '-'"
            )
        try:
            self.replicas = int(ours.get("replicas", "1"))
            self.duplicate_window = float(ours.get("duplicate_window", "120"))
        except ValueError as e:
            raise NatsError(f"broker URL {self.safe_url!r}: {e}") from None
        self.stream = safe_name(self.prefix)
        self.specs = dict(specs)
        self.subscriptions = checked_subscriptions(subscriptions, self.specs, NatsError)
        self.retry_for = retry_for
        self._queues = {n: NatsQueue(self, s) for n, s in self.specs.items()}
        # Loop-thread state: deliveries held, receipts given up, pending replies by token.
        self.held: dict[str, _Held] = {}
        self._by_seq: dict[tuple[str, int], str] = {}
        self.released: dict[str, None] = {}  # insertion-ordered, bounded
        self._waiters: dict[str, asyncio.Future[Msg]] = {}
        self._pull_subs: dict[str, _PullSub] = {}
        self._tokens = itertools.count(1)
        self._closed = False
        self._closing = False  # set before we close the client ourselves
        self.nc: Client
        self._loop = _Loop(f"sluiceway-nats-{next(self._counter)}")
        try:
            self._loop.run(self._start(), START_ATTEMPTS * (CONNECT_TIMEOUT + 1) + 30, "connect")
        except BaseException:
            # Connected but unusable (no JetStream, a conflicting stream): close it too.
            if getattr(self, "nc", None) is not None and not self.nc.is_closed:
                with contextlib.suppress(Exception):
                    self._loop.run(self.nc.close(), 5, "close")
            self._loop.stop()
            raise

    @classmethod
    def from_url(
        cls,
        url: str,
        specs: Mapping[str, QueueSpec],
        subscriptions: Mapping[str, Sequence[str]] | None = None,
        *,
        pipeline: str | None = None,
    ) -> NatsBroker:
        return cls(url, specs, subscriptions, pipeline=pipeline)

    def __repr__(self) -> str:
        return f"NatsBroker({self.safe_url!r}, stream={self.stream!r})"

    # -- connection and setup (loop) ---------------------------------------------------

    async def _start(self) -> None:
        started = time.monotonic()
        errors: list[BaseException] = []

        async def on_error(e: Exception) -> None:
            errors.append(e)
            del errors[:-START_ATTEMPTS]  # only the last ones are reported: keep memory bounded
            log.debug("NATS at %s: %s", self.safe_url, one_line(e))
            nc = getattr(self, "nc", None)
            if nc is not None and nc.is_reconnecting and not self._closing:  # a failed attempt
                health.lost("nats", self.safe_url, e)

        async def on_disconnect() -> None:
            if not self._closing:
                log.warning("NATS at %s: disconnected; reconnecting", self.safe_url)
                health.lost("nats", self.safe_url, "disconnected")

        async def on_reconnect() -> None:
            log.warning("NATS at %s: reconnected", self.safe_url)
            health.ok("nats", self.safe_url)

        try:
            # nats-py makes the attempts itself: 1 + max_reconnect_attempts of them.
            self.nc = await nats.connect(
                servers=[self.server_url],
                name="sluiceway",
                connect_timeout=CONNECT_TIMEOUT,
                allow_reconnect=True,
                max_reconnect_attempts=START_ATTEMPTS - 1,
                reconnect_time_wait=0.3,
                error_cb=on_error,
                disconnected_cb=on_disconnect,
                reconnected_cb=on_reconnect,
            )
        except (TimeoutError, OSError, nats.errors.Error) as e:
            last = errors[-1] if errors and isinstance(e, nats.errors.NoServersError) else e
            raise NatsUnavailable(
                f"cannot connect to NATS at {self.safe_url}: tried {START_ATTEMPTS} times over "
                f"{time.monotonic() - started:.1f}s; last error: {one_line(last)}. Check that "
                "the server is running (with JetStream: nats-server -js) and that the "
                "profile's URL is right."
            ) from None
        # Connected once: from now on the client reconnects by itself, forever.
        self.nc.options["max_reconnect_attempts"] = -1
        self.nc.options["reconnect_time_wait"] = 0.5
        self.jsm = self.nc.jsm(timeout=API_TIMEOUT)
        self.inbox = self.nc.new_inbox()
        await self.nc.subscribe(f"{self.inbox}.*", cb=self._on_reply)
        try:
            await self.jsm.account_info()
        except (nats.errors.NoRespondersError, nats.js.errors.APIError) as e:
            raise NatsError(
                f"NATS at {self.safe_url}: JetStream is not available ({one_line(e)}); "
                "start the server with JetStream enabled (nats-server -js)"
            ) from None
        await self._declare()

    async def _declare(self) -> None:
        config = StreamConfig(
            name=self.stream,
            subjects=[f"{self.prefix}.q.>", f"{self.prefix}.d.>", f"{self.prefix}.p.>"],
            retention=RetentionPolicy.WORK_QUEUE,
            storage=StorageType.FILE,
            num_replicas=self.replicas,
            duplicate_window=self.duplicate_window,
        )
        try:
            await self.jsm.add_stream(config)
        except nats.js.errors.BadRequestError as e:
            if e.err_code != 10058:  # "stream name already in use with a different configuration"
                raise NatsError(
                    f"NATS at {self.safe_url}: cannot create stream {self.stream!r}: "
                    f"{e.description}"
                ) from None
            try:
                await self.jsm.update_stream(config)
            except nats.js.errors.APIError as e2:
                raise NatsError(
                    f"NATS at {self.safe_url}: stream {self.stream!r} exists with other settings "
                    f"({e2.description}); delete it or use another ?prefix=."
                ) from None
        for q in self._queues.values():
            await q.declare()

    # -- plumbing used by the queues (loop) ----------------------------------------------

    async def _on_reply(self, msg: Msg) -> None:
        """Replies to our requests (publish acks), by the token ending the inbox subject."""
        waiter = self._waiters.get(msg.subject.rsplit(".", 1)[-1])
        if waiter is not None and not waiter.done():
            waiter.set_result(msg)

    async def _pull_sub(self, consumer: str) -> _PullSub:
        ps = self._pull_subs.get(consumer)
        if ps is None:
            ps = _PullSub(inbox=self.nc.new_inbox())

            async def on_msg(msg: Msg) -> None:
                status = (msg.headers or {}).get("Status") if not msg.reply else None
                if status is not None:
                    # The end of a pull; only the current one's counts.
                    if msg.subject.rsplit(".", 1)[-1] == ps.active:
                        ps.queue.put_nowait(msg)
                elif ps.active is not None:
                    ps.queue.put_nowait(msg)
                elif msg.reply:
                    # A delivery for a pull we stopped waiting for: hand it back now
                    # instead of holding it until its AckWait runs out.
                    await self.nc.publish(msg.reply, b"-NAK")

            await self.nc.subscribe(f"{ps.inbox}.*", cb=on_msg)
            self._pull_subs[consumer] = ps
        return ps

    async def pull(self, consumer: str, batch: int, expires: float | None) -> list[Msg]:
        """One pull request: ``no_wait`` when ``expires`` is None, else a long poll.

        Deliveries arrive under their stream subject, so each consumer has
        one subscription and its pulls take turns. A pull waits for its end
        (batch full, or the server's 404/408) rather than abandoning it: a
        pull left open on the server would deliver messages nobody reads.
        """
        ps = await self._pull_sub(consumer)
        async with ps.lock:
            token = str(next(self._tokens))
            ps.active = token
            while not ps.queue.empty():  # leftovers of an earlier pull's end
                ps.queue.get_nowait()
            req: dict[str, Any] = {"batch": batch}
            if expires is None:
                req["no_wait"] = True
            else:
                req["expires"] = int(expires * 1e9)
            out: list[Msg] = []
            try:
                await self.nc.publish(
                    f"$JS.API.CONSUMER.MSG.NEXT.{self.stream}.{consumer}",
                    json.dumps(req).encode(),
                    reply=f"{ps.inbox}.{token}",
                )
                end = time.monotonic() + (expires or 0) + PULL_GRACE
                while len(out) < batch:
                    remaining = end - time.monotonic()
                    if remaining <= 0:
                        break
                    try:
                        m = await asyncio.wait_for(ps.queue.get(), remaining)
                    except TimeoutError:
                        break
                    status = (m.headers or {}).get("Status") if not m.reply else None
                    if status == "100":
                        continue  # idle heartbeat
                    if status is not None:
                        if status not in ("404", "408"):
                            log.debug("pull on %s: status %s %s", consumer, status, m.headers)
                        break
                    out.append(m)
            finally:
                ps.active = None
            return out

    async def reply(self, subject: str, body: bytes) -> None:
        """An ack (``+ACK``, ``-NAK``, ``+WPI``) the server confirms before we go on."""
        await self.nc.request(subject, body, timeout=API_TIMEOUT)

    async def api(self, subject: str, payload: dict[str, Any]) -> dict[str, Any]:
        resp = await self.nc.request(subject, json.dumps(payload).encode(), timeout=API_TIMEOUT)
        data: dict[str, Any] = json.loads(resp.data or b"{}")
        if "error" in data:
            err = data["error"]
            raise NatsError(f"NATS at {self.safe_url}: {subject}: {err.get('description', err)}")
        return data

    async def publish_all(self, pubs: Sequence[_Publish]) -> None:
        """Publish in order, pipelined, and wait for every stream ack; retry the missing ones.

        Retrying is safe: each message has its Nats-Msg-Id.
        """
        todo = list(pubs)
        give_up = time.monotonic() + self.retry_for
        backoff = Backoff(jitter=False)
        while todo:
            loop = asyncio.get_running_loop()
            tokens = []
            try:
                for p in todo:
                    token = str(next(self._tokens))
                    p.future = loop.create_future()
                    self._waiters[token] = p.future
                    tokens.append(token)
                    await self.nc.publish(
                        p.subject,
                        p.env.body,
                        reply=f"{self.inbox}.{token}",
                        headers=p.env.headers(p.msg_id),
                    )
                failed: list[_Publish] = []
                for p in todo:
                    assert p.future is not None
                    try:
                        resp = await asyncio.wait_for(p.future, API_TIMEOUT)
                    except TimeoutError:
                        failed.append(p)
                        continue
                    self._check_pub_ack(p, resp)
            except (nats.errors.ConnectionReconnectingError, nats.errors.OutboundBufferLimitError):
                failed = todo
            finally:
                for token in tokens:
                    self._waiters.pop(token, None)
            todo = failed
            if todo:
                if time.monotonic() > give_up:
                    raise NatsUnavailable(
                        f"NATS at {self.safe_url}: {len(todo)} messages not confirmed by "
                        f"JetStream after {self.retry_for:g}s"
                    )
                await asyncio.sleep(backoff.next())

    def _check_pub_ack(self, p: _Publish, resp: Msg) -> None:
        status = (resp.headers or {}).get("Status")
        if status == "503":
            raise NatsError(
                f"NATS at {self.safe_url}: no stream takes subject {p.subject!r} (deleted?)"
            )
        try:
            data = json.loads(resp.data or b"{}")
        except ValueError:
            data = {}
        if "error" in data:
            err = data["error"]
            raise NatsError(
                f"NATS at {self.safe_url}: JetStream refused a message for {p.subject!r}: "
                f"{err.get('description', err)}"
            )

    def hold(self, receipt: str, held: _Held) -> None:
        key = (held.queue, held.ack.seq)
        older = self._by_seq.get(key)
        if older is not None and older != receipt:
            self.release(older)  # delivered again: the old receipt is stale
        self._by_seq[key] = receipt
        self.held[receipt] = held

    def release(self, receipt: str) -> None:
        h = self.held.pop(receipt, None)
        if h is not None and self._by_seq.get((h.queue, h.ack.seq)) == receipt:
            del self._by_seq[(h.queue, h.ack.seq)]
        self.released[receipt] = None
        while len(self.released) > 10_000:
            del self.released[next(iter(self.released))]
        # Deliveries whose deadline passed long ago are not coming back to us.
        if len(self.held) > 1000:
            now = time.monotonic()
            for r, x in list(self.held.items()):
                if x.deadline < now - 60:
                    self.release(r)

    # -- sync side ---------------------------------------------------------------------

    def run(
        self,
        op: Callable[[], Coroutine[Any, Any, T]],
        what: str,
        timeout: float | None = None,
    ) -> T:
        """Run ``op()`` on the broker's loop; retry while the server is unreachable.

        ``op`` makes a fresh coroutine per attempt. Every operation retried
        this way is idempotent on the server (publishes carry message ids,
        acks of a gone message are no-ops).
        """
        if self._closed:
            raise NatsError(f"NATS at {self.safe_url}: the broker object is closed")
        attempt_timeout = timeout or API_TIMEOUT * 3
        return self._loop.run(
            self._retrying(op, what),
            attempt_timeout + self.retry_for + 5,
            f"NATS at {self.safe_url}: {what}",
        )

    async def _retrying(self, op: Callable[[], Coroutine[Any, Any, T]], what: str) -> T:
        give_up = time.monotonic() + self.retry_for
        backoff = Backoff(jitter=False)
        while True:
            try:
                return await op()
            except RETRYABLE as e:
                if time.monotonic() > give_up or self.nc.is_closed:
                    raise NatsUnavailable(
                        f"NATS at {self.safe_url}: {what}: gave up after {self.retry_for:g}s; "
                        f"last error: {one_line(e)}"
                    ) from None
                log.debug("NATS at %s: %s: %s; retrying", self.safe_url, what, one_line(e))
                await asyncio.sleep(backoff.next())

    def queue(self, name: str) -> NatsQueue:
        q = self._queues.get(name)
        if q is None:
            raise KeyError(f"unknown queue {name!r}")
        return q

    def publish(self, topic: str, messages: Sequence[OutgoingMessage]) -> None:
        names = self.subscriptions.get(topic)
        if names is None:
            raise KeyError(f"unknown topic {topic!r}")
        ids = [m.id or str(uuid.uuid4()) for m in messages]
        pubs = [p for n in names for p in self._queues[n]._outgoing(messages, ids)]
        self.run(lambda: self.publish_all(pubs), f"publish to topic {topic!r}")

    def close(self) -> None:
        """Close the connection, handing back held deliveries at once.

        (A closing RabbitMQ channel does that by itself; here they would
        otherwise wait for their AckWait.)
        """
        if self._closed:
            return

        async def close() -> None:
            self._closing = True
            now = time.monotonic()
            for receipt, h in list(self.held.items()):
                if now < h.deadline:
                    with contextlib.suppress(Exception):
                        await self.nc.publish(receipt, b"-NAK")
            try:
                if self.held:
                    await self.nc.flush(timeout=2)
                await asyncio.wait_for(self.nc.close(), 5)
            except Exception:  # closing: nothing left to tell anyone
                log.debug("NATS at %s: close failed", self.safe_url, exc_info=True)

        try:
            self._loop.run(close(), 10, "close")
        finally:
            self._closed = True
            self._loop.stop()

    def destroy(self) -> None:
        """Delete this prefix's stream with its consumers (tests, and tearing a pipeline down)."""

        async def delete(nc: Client) -> None:
            with contextlib.suppress(nats.js.errors.NotFoundError):
                await nc.jsm().delete_stream(self.stream)

        if not self._closed:
            self.run(lambda: delete(self.nc), "destroy")
            return

        async def standalone() -> None:
            nc = await nats.connect(
                servers=[self.server_url], connect_timeout=CONNECT_TIMEOUT, allow_reconnect=False
            )
            try:
                await delete(nc)
            finally:
                await nc.close()

        asyncio.run(standalone())
