"""RabbitMQ queues and topics (pika): SQS semantics on quorum queues.

``amqp://user:${PASSWORD}@host:5672/vhost?prefix=sw.my-pipeline`` — every
name this backend creates starts with ``prefix`` (default ``sluiceway.<pipeline>``), so
pipelines (and test runs) sharing a server stay apart. Other query
parameters go to pika (``heartbeat``, ``socket_timeout``, …).

What each SQS promise rests on — RabbitMQ's own machinery where it has it,
ours where it does not:

* **Queues** are quorum queues (``x-queue-type=quorum``), replicated and
  durable; messages are persistent and every publish waits for its
  **publisher confirm**. A topic is a **fanout exchange** bound to its
  subscribed queues (one confirmed publish reaches all of them).
* **Visibility timeout** (ours). RabbitMQ hides a delivered message until it
  is acked, but only gives it back when the channel closes (or, much later,
  at the broker's ``consumer_timeout``). So each delivery gets a deadline,
  kept by the broker object's I/O thread, which rejects (requeues) the
  delivery when it passes, even while the worker's main thread is stuck.
  ``change_visibility`` moves the deadline (the heartbeat); ``0`` requeues
  now. Backstops when the whole process hangs: the AMQP heartbeat (the
  server drops a silent connection, which requeues everything it held) and
  ``consumer_timeout`` (30 min by default: a visibility longer than that is
  cut short by the server; raise it in rabbitmq.conf for longer functions).
* **Receive count** is RabbitMQ's ``x-delivery-count`` (failed deliveries
  of this copy) plus ``sw-receives`` (receives before we republished it).
* **Max receives**: native ``x-delivery-limit`` with a dead-letter exchange
  into the DLQ (at-least-once dead-lettering), covering crash loops where
  nobody records anything. The last failure record is already in the
  message's headers (``record_failure`` republishes with it), so the native
  path carries it; the DLQ entry's ``source_queue`` and time come from
  ``x-death``. A worker that sees a failure on the last attempt moves the
  message itself (publish to the DLQ, then ack), as does a receive that finds
  a copy past its budget (the native limit counts only the current copy).
* **Delay** (ours, on native TTLs). A queue has a ladder of delay queues
  with fixed TTLs (50 ms × 4ⁿ, up to 819 s) dead-lettering into it. A delay is
  split greedily over the ladder: the message waits in the largest level that
  fits, and when it arrives early (``sw-due`` still ahead) the receiver sends
  it down the ladder again, uncounted. It never comes out before it is due;
  the last bit (under 50 ms) rounds up. Per-message TTLs in one delay queue
  would be simpler but expire only at the head: one long backoff would hold
  up every shorter one behind it.
* **Counts**: visible = the queue's ready count (passive declare); delayed =
  the ladder's ready counts; in flight = consumers on the queue's *lease*
  queue. RabbitMQ reports no unacked count over AMQP, and workers are
  separate processes, so each held delivery keeps one consumer open on an
  always-empty lease queue: the count is exact, global and goes away with a
  dead connection by itself. (``Runtime.drain`` relies on it.)
* **Dedup by id** (ours, partial): RabbitMQ has none without a plugin;
  duplicate ids inside one ``send_batch``/``publish`` are dropped. Across
  calls the ledger (``publish_once``, claims) absorbs duplicates.
* **Peek** takes messages with ``basic_get`` on a side channel and puts them
  back: a DLQ (no delivery limit) by ``basic.nack`` (order kept; RabbitMQ
  before 4.3 counts that as a delivery, which a DLQ entry ignores), any other
  queue by republishing to its tail with the count carried over (a nack
  there would spend the native delivery budget). Messages held by workers
  are not seen. **Redrive** and **purge** work the same way (purge cannot
  take messages held by a worker).

Threads: pika is not thread-safe and a worker's heartbeat thread calls
``change_visibility`` while the main thread works, so one I/O thread per
broker object owns the connection; calls from any thread run there
(``add_callback_threadsafe`` wakes it). It reconnects with backoff when the
connection drops (held deliveries are then stale: RabbitMQ requeued them)
and re-runs the interrupted call. An unreachable server at start is one
:class:`RabbitUnavailable` naming the (redacted) URL.

Limits: a worker process that died cannot have its failure recorded by
another process (a delivery belongs to its channel): its message comes
back by RabbitMQ's own requeue, with the previous failure record. RabbitMQ
4.3 stopped counting deliveries that come back on a closed channel, so a
crash loop there ends in the DLQ only through receives that do count.
"""

from __future__ import annotations

import collections
import contextlib
import datetime as dt
import json
import logging
import threading
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar
from urllib.parse import urlsplit

import pika
import pika.exceptions
from pika.adapters.blocking_connection import BlockingChannel

from .. import health
from ..connections import Backoff, one_line, redact, split_query
from ..errors import SluicewayError
from .base import Broker, Message, OutgoingMessage, Queue, QueueCounts, QueueSpec
from .conventions import broker_prefix, checked_subscriptions, max_receives_failure

log = logging.getLogger("sluiceway.rabbitmq")

T = TypeVar("T")

DEFAULT_PREFIX = "sluiceway"
OWN_PARAMETERS = ("prefix",)
# pika parameters we default differently when the URL does not set them.
PIKA_DEFAULTS = {"heartbeat": "30", "socket_timeout": "5", "blocked_connection_timeout": "60"}
# The delay ladder (ms): a message waits in the largest level that fits.
DELAY_LEVELS_MS = (50, 200, 800, 3_200, 12_800, 51_200, 204_800, 819_200)
# Each level's TTL is this much longer than its name says: RabbitMQ counts TTLs
# in whole milliseconds, and a message must never come out before it is due.
TTL_PAD_MS = 1
POLL_MIN = 0.005  # receive's wait: between empty polls, doubling up to POLL_MAX
POLL_MAX = 0.05
TICK = 0.05  # the I/O thread checks deadlines at least this often
START_ATTEMPTS = 3
RETRY_FOR = 30.0  # s a call waits for a lost connection to come back
RECONNECT_MIN, RECONNECT_MAX = 0.1, 5.0
THREAD_PREFIX = "sluiceway-amqp"

CONNECTION_ERRORS = (pika.exceptions.AMQPConnectionError, OSError)


class RabbitUnavailable(SluicewayError):
    """The RabbitMQ server cannot be reached (at start, or for longer than RETRY_FOR)."""


class RabbitError(SluicewayError):
    """RabbitMQ refused an operation (a queue with other settings, a nacked publish…)."""


class _QuietOnOurThreads(logging.Filter):
    """Drop pika's own log records on our I/O threads.

    A refused connection makes pika log half a dozen ERROR records with
    tracebacks; our thread reports the same thing once, in one line, with the
    redacted URL. Records from other threads (another pika user in the same
    process) pass untouched.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        return not threading.current_thread().name.startswith(THREAD_PREFIX)


def _quiet_pika() -> None:
    f = _QuietOnOurThreads()
    for name in list(logging.Logger.manager.loggerDict):
        if name == "pika" or name.startswith("pika."):
            logger = logging.getLogger(name)
            if not any(isinstance(x, _QuietOnOurThreads) for x in logger.filters):
                logger.addFilter(f)


_quiet_pika()


def split_url(url: str) -> tuple[str, dict[str, str]]:
    """The URL for pika (our parameters removed, our defaults added) and our parameters."""
    rest, ours, given = split_query(url, OWN_PARAMETERS)
    parts = urlsplit(rest)
    kept = [parts.query] if parts.query else []
    kept += [f"{k}={v}" for k, v in PIKA_DEFAULTS.items() if k not in given]
    return parts._replace(query="&".join(kept)).geturl(), ours


def _never(*args: Any) -> None:
    """The callback of lease consumers: nothing is ever published to a lease queue."""


# -- messages on the wire ----------------------------------------------------------


@dataclass
class _Envelope:
    """A message as it travels: body plus the headers our layer keeps."""

    id: str
    body: bytes
    attributes: dict[str, Any]
    sent_at: float
    receives: int = 0  # receives before this copy was published (ours)
    deliveries: int = 0  # x-delivery-count: failed deliveries of this copy (RabbitMQ's)
    failure: dict[str, Any] | None = None
    due: float | None = None
    dead: bool = False  # a DLQ entry: `receives` is the count at death

    def properties(self) -> pika.BasicProperties:
        headers: dict[str, Any] = {
            "sw-attr": json.dumps(self.attributes),
            "sw-sent": repr(float(self.sent_at)),  # pika encodes no floats in headers
            "sw-receives": int(self.receives),
        }
        if self.failure is not None:
            headers["sw-failure"] = json.dumps(self.failure, default=str)
        if self.due is not None:
            headers["sw-due"] = repr(float(self.due))
        if self.dead:
            headers["sw-dead"] = True
        return pika.BasicProperties(message_id=self.id, delivery_mode=2, headers=headers)

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

    def prior_receives(self) -> int:
        """Receives so far (for peek), not counting a DLQ's own re-deliveries."""
        return self.receives if self.dead else self.receives + self.deliveries


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _json(value: Any, default: Any) -> Any:
    if value is None:
        return default
    try:
        return json.loads(_text(value))
    except ValueError:
        return default


# -- the connection and its thread --------------------------------------------------


@dataclass
class _Held:
    """A delivery this process holds: the message is hidden until ack or deadline."""

    queue: str  # the short queue name
    tag: int
    lease: str  # consumer tag on the queue's lease queue
    deadline: float  # time.monotonic()
    env: _Envelope
    receive_count: int


@dataclass
class _Request:
    fn: Callable[[_Link], Any]
    deadline: float
    done: threading.Event = field(default_factory=threading.Event)
    result: Any = None
    error: BaseException | None = None
    abandoned: bool = False

    def finish(self, result: Any = None, error: BaseException | None = None) -> None:
        self.result, self.error = result, error
        self.done.set()


class _Link:
    """One pika connection, owned by one I/O thread; see the module docstring.

    ``ch`` receives, acks and holds the lease consumers (its deliveries are
    the held messages: if it closes they are gone, so ``session``, part of
    every receipt, changes); ``pub`` publishes with confirms and declares, so
    a failed passive declare never costs the held deliveries.
    """

    _counter = 0

    def __init__(
        self,
        params: pika.URLParameters,
        safe_url: str,
        setup: Callable[[_Link], None],
        retry_for: float = RETRY_FOR,
    ) -> None:
        self.params = params
        self.safe_url = safe_url
        self.setup = setup
        self.retry_for = retry_for
        self.conn: pika.BlockingConnection | None = None
        self._ch: BlockingChannel | None = None
        self._pub: BlockingChannel | None = None
        self.session = ""
        self.held: dict[str, _Held] = {}
        self.server_major = 3
        self._requests: collections.deque[_Request] = collections.deque()
        self._lock = threading.Lock()  # guards _requests
        self._closing = threading.Event()
        self._wake = threading.Event()
        self._started = threading.Event()
        self._start_error: BaseException | None = None
        self._last_error: BaseException | None = None
        _Link._counter += 1
        self._thread = threading.Thread(
            target=self._run, name=f"{THREAD_PREFIX}-{_Link._counter}", daemon=True
        )

    # -- the public side: any thread ---------------------------------------------

    def start(self) -> None:
        """Connect (a few attempts) and declare; raise one clear error if that fails."""
        self._thread.start()
        self._started.wait()
        if self._start_error is not None:
            raise self._start_error

    def call(self, fn: Callable[[_Link], T]) -> T:
        """Run ``fn(link)`` on the I/O thread and return its result (or raise its error)."""
        if threading.current_thread() is self._thread:
            return fn(self)
        if self._closing.is_set():
            raise RabbitError(f"RabbitMQ at {self.safe_url}: the broker object is closed")
        req = _Request(fn, time.monotonic() + self.retry_for)
        with self._lock:
            self._requests.append(req)
        self._poke()
        if not req.done.wait(self.retry_for + 30):
            req.abandoned = True
            raise RabbitUnavailable(
                f"RabbitMQ at {self.safe_url}: no answer within {self.retry_for + 30:g}s"
            )
        if req.error is not None:
            raise req.error
        return req.result  # type: ignore[no-any-return]

    @property
    def closed(self) -> bool:
        return self._closing.is_set()

    def close(self) -> None:
        self._closing.set()
        self._poke()
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join(10)

    def _poke(self) -> None:
        self._wake.set()
        conn = self.conn
        if conn is not None:
            with contextlib.suppress(Exception):
                conn.add_callback_threadsafe(_never)

    # -- the I/O thread ------------------------------------------------------------

    @property
    def ch(self) -> BlockingChannel:
        assert self._ch is not None
        return self._ch

    @property
    def pub(self) -> BlockingChannel:
        assert self._pub is not None
        return self._pub

    def _run(self) -> None:
        try:
            self._first_connect()
        except BaseException as e:
            self._drop(e)  # connected, but declaring failed: do not leave it open
            self._start_error = e
            self._started.set()
            return
        self._started.set()
        backoff = Backoff(RECONNECT_MIN, RECONNECT_MAX)
        while not self._closing.is_set():
            if self.conn is None:
                self._fail_overdue()
                try:
                    self._open()
                except Exception as e:  # refused, or the declares failed: try again later
                    self._drop(e)
                    self._last_error = e
                    health.lost("rabbitmq", self.safe_url, e)
                    log.debug("RabbitMQ at %s: reconnect failed: %s", self.safe_url, one_line(e))
                    self._wake.wait(backoff.next())
                    self._wake.clear()
                    continue
                backoff.reset()
                log.warning("RabbitMQ at %s: reconnected", self.safe_url)
                health.ok("rabbitmq", self.safe_url)
            try:
                self.conn.process_data_events(time_limit=0 if self._requests else TICK)  # type: ignore[union-attr]
                self._serve()
                self._expire()
            except CONNECTION_ERRORS as e:
                self._lost(e)
            except Exception:  # a bug of ours must not kill the thread every call relies on
                log.exception("RabbitMQ at %s: unexpected error in the I/O thread", self.safe_url)
        self._shutdown()

    def _first_connect(self) -> None:
        started = time.monotonic()
        delay = 0.2
        last: BaseException | None = None
        for attempt in range(1, START_ATTEMPTS + 1):
            try:
                self._open()
                return
            except (
                pika.exceptions.ProbableAuthenticationError,
                pika.exceptions.ProbableAccessDeniedError,
                pika.exceptions.AuthenticationError,
            ) as e:
                self._drop(e)
                raise RabbitUnavailable(
                    f"cannot connect to RabbitMQ at {self.safe_url}: the server refused the "
                    f"login ({one_line(e)}). Check the user, the password (from an environment "
                    "variable) and the vhost's permissions."
                ) from None
            except CONNECTION_ERRORS as e:
                self._drop(e)
                last = e
                if attempt < START_ATTEMPTS:
                    time.sleep(delay)
                    delay *= 2
        raise RabbitUnavailable(
            f"cannot connect to RabbitMQ at {self.safe_url}: tried {START_ATTEMPTS} times over "
            f"{time.monotonic() - started:.1f}s; last error: "
            f"{one_line(last) if last else 'unknown'}. Check that the server is running and "
            "that the profile's URL (host, port, vhost, user) is right."
        )

    def _open(self) -> None:
        self.conn = pika.BlockingConnection(self.params)
        version = self.conn._impl.server_properties.get("version", b"3")
        with contextlib.suppress(ValueError):
            self.server_major = int(_text(version).split(".")[0])
        self.open_channels()
        self.setup(self)

    def open_channels(self) -> None:
        assert self.conn is not None
        if self._pub is None or not self._pub.is_open:
            self._pub = self.conn.channel()
            self._pub.confirm_delivery()
        if self._ch is None or not self._ch.is_open:
            self.held.clear()  # the deliveries went with the channel
            self._ch = self.conn.channel()
            self.session = uuid.uuid4().hex[:12]

    def _drop(self, exc: BaseException) -> None:
        conn, self.conn = self.conn, None
        self._ch = self._pub = None
        self.held.clear()
        self.session = ""
        if conn is not None:
            with contextlib.suppress(Exception):
                conn.close()

    def _lost(self, exc: BaseException) -> None:
        log.warning(
            "RabbitMQ at %s: connection lost (%s); %d held deliveries go back to their "
            "queues; reconnecting",
            self.safe_url,
            one_line(exc),
            len(self.held),
        )
        self._last_error = exc
        health.lost("rabbitmq", self.safe_url, exc)
        self._drop(exc)

    def _serve(self) -> None:
        while True:
            with self._lock:
                if not self._requests:
                    return
                req = self._requests.popleft()
            if req.abandoned:
                continue
            try:
                result = req.fn(self)
            except CONNECTION_ERRORS:
                with self._lock:
                    self._requests.appendleft(req)  # run again once reconnected
                raise
            except pika.exceptions.AMQPChannelError as e:
                self._channel_failed(e)
                req.finish(error=RabbitError(f"RabbitMQ at {self.safe_url}: {one_line(e)}"))
            except BaseException as e:
                req.finish(error=e)
            else:
                req.finish(result)

    def _channel_failed(self, exc: BaseException) -> None:
        if self._ch is not None and not self._ch.is_open and self.held:
            log.warning(
                "RabbitMQ at %s: channel closed (%s); %d held deliveries go back to their queues",
                self.safe_url,
                one_line(exc),
                len(self.held),
            )
        self.open_channels()

    def _fail_overdue(self) -> None:
        now = time.monotonic()
        with self._lock:
            overdue = [r for r in self._requests if now > r.deadline]
            for req in overdue:
                self._requests.remove(req)
        last = one_line(self._last_error) if self._last_error else "unknown"
        for req in overdue:
            req.finish(
                error=RabbitUnavailable(
                    f"RabbitMQ at {self.safe_url}: gave up after {self.retry_for:g}s "
                    f"without a connection; last error: {last}"
                )
            )

    def _expire(self) -> None:
        """Requeue deliveries whose visibility timeout ran out (the worker is gone or stuck)."""
        if not self.held:
            return
        now = time.monotonic()
        for receipt, h in list(self.held.items()):
            if h.deadline <= now:
                log.info("message %s on %s: visibility timeout ran out", h.env.id, h.queue)
                self.release(receipt, requeue=True)

    def release(self, receipt: str, *, requeue: bool = False) -> _Held | None:
        """Stop holding a delivery: reject it back to its queue (``requeue``) or ack it."""
        h = self.held.pop(receipt, None)
        if h is None:
            return None
        if requeue:
            # reject, not nack: RabbitMQ 4.3+ counts only a reject as a failed delivery.
            self.ch.basic_reject(h.tag, requeue=True)
        else:
            self.ch.basic_ack(h.tag)
        self.ch.basic_cancel(h.lease)
        return h

    def publish(self, exchange: str, routing_key: str, env: _Envelope, what: str) -> None:
        try:
            self.pub.basic_publish(
                exchange, routing_key, env.body, env.properties(), mandatory=True
            )
        except pika.exceptions.UnroutableError:
            # Someone deleted the queue: declare everything again, try once more.
            log.warning("RabbitMQ at %s: %s does not exist; declaring again", self.safe_url, what)
            self.setup(self)
            try:
                self.pub.basic_publish(
                    exchange, routing_key, env.body, env.properties(), mandatory=True
                )
            except pika.exceptions.UnroutableError:
                raise RabbitError(f"RabbitMQ at {self.safe_url}: {what} does not exist") from None
        except pika.exceptions.NackError:
            raise RabbitError(
                f"RabbitMQ at {self.safe_url}: the server refused a message for {what} "
                "(nack: out of disk or memory, or the queue is unavailable)"
            ) from None

    def _shutdown(self) -> None:
        with self._lock:
            pending = list(self._requests)
            self._requests.clear()
        for req in pending:
            req.finish(error=RabbitError(f"RabbitMQ at {self.safe_url}: the broker was closed"))
        self._drop(RabbitError("closed"))


# -- queues ------------------------------------------------------------------------


def delay_plan(seconds: float) -> int:
    """The ladder level (ms) to wait in for ``seconds``: the largest that fits."""
    fitting = [ms for ms in DELAY_LEVELS_MS if ms <= seconds * 1000]
    return fitting[-1] if fitting else DELAY_LEVELS_MS[0]


class RabbitQueue(Queue):
    """One SQS-like queue: a quorum queue, its delay ladder and its lease queue."""

    def __init__(self, broker: RabbitBroker, spec: QueueSpec) -> None:
        self.broker = broker
        self.spec = spec
        p = broker.prefix
        self.main = f"{p}.q.{spec.name}"
        self.leases = f"{p}.leases.{spec.name}"
        self.parked = f"{p}.parked.{spec.name}"
        self.levels = {ms: f"{p}.delay.{ms}ms.{spec.name}" for ms in DELAY_LEVELS_MS}

    def __repr__(self) -> str:
        return f"RabbitQueue({self.name!r} at {self.main!r})"

    @property
    def _link(self) -> _Link:
        return self.broker.link

    @property
    def native_limit(self) -> bool:
        """Whether RabbitMQ dead-letters this queue's messages itself (x-delivery-limit)."""
        return self.spec.dead_letter_queue is not None

    def declare(self, link: _Link) -> None:
        """Create (or check) the queue, its ladder and its lease queue; idempotent."""
        args: dict[str, Any] = {"x-queue-type": "quorum"}
        dlq = self.spec.dead_letter_queue
        if dlq is not None:
            args.update(
                {
                    # Dead-lettered after this many *failed* deliveries: max receives in all.
                    "x-delivery-limit": max(self.spec.max_receive_count - 1, 0),
                    "x-dead-letter-exchange": "",
                    "x-dead-letter-routing-key": self.broker.queue(dlq).main,
                    "x-dead-letter-strategy": "at-least-once",
                    "x-overflow": "reject-publish",  # required by at-least-once
                }
            )
        elif link.server_major >= 4:
            args["x-delivery-limit"] = -1  # 4.x defaults to 20; before, -1 meant "drop at once"
        self.broker.declare_queue(link, self.main, args)
        for ms, name in self.levels.items():
            # Classic queues: a fixed TTL per level, so messages expire in order.
            self.broker.declare_queue(
                link,
                name,
                {
                    "x-message-ttl": ms + TTL_PAD_MS,
                    "x-dead-letter-exchange": "",
                    "x-dead-letter-routing-key": self.main,
                },
            )
        self.broker.declare_queue(link, self.leases, {})

    # -- in the I/O thread -----------------------------------------------------------

    def _deliver(self, link: _Link, env: _Envelope, delay: float) -> None:
        """Publish ``env`` to this queue now, or into the delay ladder for ``delay`` s."""
        if delay > 0:
            if env.due is None:
                env.due = time.time() + delay
            level = delay_plan(delay)
            link.publish("", self.levels[level], env, f"delay queue {self.levels[level]!r}")
        else:
            env.due = None
            link.publish("", self.main, env, f"queue {self.main!r}")

    def _decode(self, props: pika.BasicProperties, body: bytes) -> _Envelope:
        headers: dict[str, Any] = dict(props.headers or {})
        env = _Envelope(
            id=_text(props.message_id) if props.message_id else f"amqp-{uuid.uuid4()}",
            body=body,
            attributes=_json(headers.get("sw-attr"), {}),
            sent_at=float(_text(headers.get("sw-sent") or props.timestamp or time.time())),
            receives=int(headers.get("sw-receives") or 0),
            deliveries=int(headers.get("x-delivery-count") or 0),
            failure=_json(headers.get("sw-failure"), None),
            due=float(_text(headers["sw-due"])) if headers.get("sw-due") is not None else None,
            dead=bool(headers.get("sw-dead")),
        )
        for death in headers.get("x-death") or []:
            if _text(death.get("reason", "")) != "delivery_limit":
                continue
            # Dead-lettered by RabbitMQ itself: fill in what our own move writes.
            source = self.broker.short_name(_text(death.get("queue", "")))
            at = death.get("time")
            env.attributes.setdefault("source_queue", source)
            env.attributes.setdefault(
                "dead_lettered_at", at.timestamp() if isinstance(at, dt.datetime) else time.time()
            )
            spec = self.broker.specs.get(source)
            limit_receives = spec.max_receive_count if spec else 1
            env.receives += limit_receives
            env.failure = env.failure or max_receives_failure(env.receives)
            env.dead = True
            break
        return env

    def _take(self, link: _Link, max_messages: int) -> list[Message]:
        out: list[Message] = []
        ch = link.ch
        while len(out) < max_messages:
            method, props, body = ch.basic_get(self.main, auto_ack=False)
            if method is None:
                break
            env = self._decode(props, body)
            now = time.time()
            if env.due is not None and env.due > now:
                # Early from the ladder: down again for the rest (never out early,
                # at worst one smallest level late); not a receive.
                self._deliver(link, env, env.due - now)
                ch.basic_ack(method.delivery_tag)
                continue
            receive_count = env.receives + env.deliveries + 1
            if self.native_limit and receive_count > self.spec.max_receive_count:
                # Past its budget across copies (the native limit counts only this copy).
                env.receives = receive_count - 1
                self._dead_letter(link, env, env.failure or max_receives_failure(env.receives))
                ch.basic_ack(method.delivery_tag)
                continue
            lease = ch.basic_consume(self.leases, _never, auto_ack=True)
            receipt = f"{link.session}:{method.delivery_tag}"
            link.held[receipt] = _Held(
                self.name,
                method.delivery_tag,
                lease,
                time.monotonic() + self.spec.visibility_timeout,
                env,
                receive_count,
            )
            out.append(env.message(self.name, receive_count, receipt))
        return out

    def _dead_letter(self, link: _Link, env: _Envelope, failure: dict[str, Any]) -> None:
        env.attributes = {
            **env.attributes,
            "source_queue": self.name,
            "dead_lettered_at": time.time(),
        }
        env.failure, env.dead, env.due = failure, True, None
        dlq = self.spec.dead_letter_queue
        if dlq is None:
            # No DLQ: park it rather than drop it (`status` and `dlq list` do not see it).
            self.broker.declare_queue(link, self.parked, {"x-queue-type": "quorum"})
            link.publish("", self.parked, env, f"queue {self.parked!r}")
            log.warning("message %s on %s has no DLQ; parked in %s", env.id, self.name, self.parked)
            return
        link.publish("", self.broker.queue(dlq).main, env, f"dead-letter queue {dlq!r}")

    def _held(self, link: _Link, message: Message) -> _Held | None:
        h = link.held.get(message.receipt)
        return h if h is not None and h.queue == self.name else None

    # -- the interface ---------------------------------------------------------------

    def send_batch(self, messages: Sequence[OutgoingMessage]) -> list[str]:
        ids = [m.id or str(uuid.uuid4()) for m in messages]
        now = time.time()
        todo: list[tuple[_Envelope, float]] = []
        seen: set[str] = set()
        for mid, m in zip(ids, messages, strict=True):
            if mid in seen:  # the only dedup RabbitMQ allows us: within the batch
                continue
            seen.add(mid)
            env = _Envelope(mid, m.body.encode("utf-8"), dict(m.attributes), now)
            todo.append((env, self.spec.delay if m.delay is None else m.delay))
        done = [0]  # progress survives a reconnect: the call is run again from here

        def send(link: _Link) -> None:
            while done[0] < len(todo):
                env, delay = todo[done[0]]
                self._deliver(link, env, delay)
                done[0] += 1

        self._link.call(send)
        return ids

    def receive(self, max_messages: int = 1, *, wait: float = 0.0) -> list[Message]:
        # Long polling is a bounded poll of basic_get: a consumer with a
        # prefetch would hold messages this worker is not ready for, hidden
        # from the others, and basic_get hands out exactly what was asked.
        deadline = time.monotonic() + wait
        pause = POLL_MIN
        while True:
            got = self._link.call(lambda link: self._take(link, max_messages))
            remaining = deadline - time.monotonic()
            if got or remaining <= 0:
                return got
            time.sleep(min(pause, remaining))
            pause = min(pause * 2, POLL_MAX)

    def ack(self, messages: Sequence[Message]) -> int:
        def ack(link: _Link) -> int:
            n = 0
            for m in messages:
                if self._held(link, m) is not None and link.release(m.receipt) is not None:
                    n += 1
            return n

        return self._link.call(ack)

    def change_visibility(self, message: Message, seconds: float) -> bool:
        def change(link: _Link) -> bool:
            h = self._held(link, message)
            if h is None:
                return False
            if seconds <= 0:
                link.release(message.receipt, requeue=True)
            else:
                h.deadline = time.monotonic() + seconds
            return True

        return self._link.call(change)

    def record_failure(self, message: Message, failure: dict[str, Any], retry_in: float) -> bool:
        def record(link: _Link) -> bool:
            h = self._held(link, message)
            if h is None:
                # Stale, or held by another process (its channel's delivery, which we
                # cannot touch): RabbitMQ requeues it when that channel closes.
                return False
            env = h.env
            env.failure, env.receives, env.deliveries, env.due = failure, h.receive_count, 0, None
            self._deliver(link, env, retry_in)  # first the new copy …
            link.release(message.receipt)  # … then the old one goes
            return True

        return self._link.call(record)

    def dead_letter(self, message: Message, failure: dict[str, Any]) -> None:
        def move(link: _Link) -> None:
            h = self._held(link, message)
            if h is None:
                log.warning(
                    "message %s on %s: cannot dead-letter a delivery this process no longer "
                    "holds; it reaches the DLQ on a receive past max_receive_count",
                    message.id,
                    self.name,
                )
                return
            h.env.receives, h.env.deliveries = h.receive_count, 0
            self._dead_letter(link, h.env, failure)
            link.release(message.receipt)

        self._link.call(move)

    def counts(self) -> QueueCounts:
        def counts(link: _Link) -> QueueCounts:
            visible = self.broker.passive(link, self.main).message_count
            in_flight = self.broker.passive(link, self.leases).consumer_count
            delayed = sum(self.broker.passive(link, q).message_count for q in self.levels.values())
            return QueueCounts(visible=visible, in_flight=in_flight, delayed=delayed)

        return self._link.call(counts)

    def _scan(
        self, link: _Link, limit: int, take: Callable[[_Envelope], bool]
    ) -> tuple[BlockingChannel, list[tuple[int, _Envelope]], list[tuple[int, _Envelope]]]:
        """Get up to ``limit`` ready messages on a side channel, held there.

        ``take(env)`` picks; returns the side channel and the (tag, envelope)
        pairs picked and not picked, for :meth:`_settle`. Everything stays
        held until then, so nothing is looked at twice.
        """
        assert link.conn is not None
        side = link.conn.channel()
        taken: list[tuple[int, _Envelope]] = []
        kept: list[tuple[int, _Envelope]] = []
        try:
            for _ in range(limit):
                method, props, body = side.basic_get(self.main, auto_ack=False)
                if method is None:
                    break
                env = self._decode(props, body)
                (taken if take(env) else kept).append((method.delivery_tag, env))
        except BaseException:
            with contextlib.suppress(Exception):
                side.close()  # everything goes back
            raise
        return side, taken, kept

    def _settle(
        self,
        link: _Link,
        side: BlockingChannel,
        taken: list[tuple[int, _Envelope]],
        kept: list[tuple[int, _Envelope]],
    ) -> None:
        """Ack what was taken, put back what was kept, close the side channel."""
        try:
            for tag, _ in taken:
                side.basic_ack(tag)
            if kept and self.native_limit:
                # A nack would spend the delivery budget: rotate to the tail instead.
                for tag, env in kept:
                    env.receives, env.deliveries = env.receives + env.deliveries, 0
                    link.publish("", self.main, env, f"queue {self.main!r}")
                    side.basic_ack(tag)
            elif kept:
                side.basic_nack(0, multiple=True, requeue=True)  # back, in order
        finally:
            with contextlib.suppress(Exception):
                side.close()
        if kept and not self.native_limit:
            self._await_ready(link, len(kept))

    def _await_ready(self, link: _Link, n: int, timeout: float = 1.0) -> None:
        """Wait (briefly) until ``n`` messages put back by nack are ready again.

        A nack has no reply and a quorum queue applies it asynchronously: the
        next call (``redrive`` right after ``peek``) could otherwise miss them.
        """
        deadline = time.monotonic() + timeout
        while self.broker.passive(link, self.main).message_count < n:
            if time.monotonic() > deadline:
                return  # taken by someone else meanwhile, most likely
            time.sleep(0.002)

    def peek(self, limit: int = 100) -> list[Message]:
        def peek(link: _Link) -> list[_Envelope]:
            side, taken, kept = self._scan(link, limit, lambda env: False)
            self._settle(link, side, taken, kept)
            return [env for _, env in kept]

        envs = self._link.call(peek)
        return [env.message(self.name, env.prior_receives(), "") for env in envs]

    def redrive(self, to: Queue, ids: Sequence[str] | None = None) -> int:
        wanted = set(ids) if ids is not None else None

        def pick(env: _Envelope) -> bool:
            return wanted is None or env.id in wanted

        def fresh(env: _Envelope) -> _Envelope:
            env.receives = env.deliveries = 0
            env.dead, env.due = False, None
            return env

        if isinstance(to, RabbitQueue) and to.broker is self.broker:

            def move(link: _Link) -> int:
                side, taken, kept = self._scan(link, 1 << 62, pick)
                try:
                    for _, env in taken:
                        link.publish("", to.main, fresh(env), f"queue {to.main!r}")  # visible now
                except BaseException:
                    with contextlib.suppress(Exception):
                        side.close()
                    raise
                self._settle(link, side, taken, kept)
                return len(taken)

            return self._link.call(move)

        # Another broker (or backend): hold the messages on the side channel,
        # send them from this thread, then ack. A crash in between sends twice.
        side, taken, kept = self._link.call(lambda link: self._scan(link, 1 << 62, pick))
        try:
            for _, env in taken:
                body = env.body.decode("utf-8", errors="replace")
                to.send_batch([OutgoingMessage(body, fresh(env).attributes, env.id, delay=0)])
        except BaseException:
            self._link.call(lambda link: side.close())
            raise
        self._link.call(lambda link: self._settle(link, side, taken, kept))
        return len(taken)

    def purge(self) -> int:
        def purge(link: _Link) -> int:
            names = [self.main, *self.levels.values()]
            return sum(link.pub.queue_purge(q).method.message_count for q in names)

        return self._link.call(purge)


class RabbitBroker(Broker):
    """Queues and topics on one RabbitMQ vhost, under one name prefix."""

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
        pika_url, ours = split_url(url)
        self.prefix = broker_prefix(
            ours.get("prefix") or None, pipeline, DEFAULT_PREFIX, DEFAULT_PREFIX + ".{pipeline}"
        )
        self.specs = dict(specs)
        self.subscriptions = checked_subscriptions(subscriptions, self.specs, RabbitError)
        self._queues = {name: RabbitQueue(self, spec) for name, spec in self.specs.items()}
        self.exchanges = {t: f"{self.prefix}.t.{t}" for t in self.subscriptions}
        try:
            params = pika.URLParameters(pika_url)
        except ValueError as e:
            raise RabbitError(f"broker URL {self.safe_url!r}: {e}") from None
        self.link = _Link(params, self.safe_url, self._setup, retry_for)
        self.link.start()

    @classmethod
    def from_url(
        cls,
        url: str,
        specs: Mapping[str, QueueSpec],
        subscriptions: Mapping[str, Sequence[str]] | None = None,
        *,
        pipeline: str | None = None,
    ) -> RabbitBroker:
        return cls(url, specs, subscriptions, pipeline=pipeline)

    def __repr__(self) -> str:
        return f"RabbitBroker({self.safe_url!r}, prefix={self.prefix!r})"

    def short_name(self, full: str) -> str:
        """A main queue's name without the prefix (as written in the pipeline file)."""
        head = f"{self.prefix}.q."
        return full[len(head) :] if full.startswith(head) else full

    # -- topology (I/O thread) -------------------------------------------------------

    def _setup(self, link: _Link) -> None:
        """Declare every queue, ladder, lease queue, exchange and binding (idempotent).

        Run at start and after each reconnect, so a broker that lost its
        definitions (a reset node) gets them back.
        """
        for q in self._queues.values():
            q.declare(link)
        for topic, names in self.subscriptions.items():
            exchange = self.exchanges[topic]
            link.pub.exchange_declare(exchange, "fanout", durable=True)
            for name in names:
                link.pub.queue_bind(self._queues[name].main, exchange)

    def declare_queue(self, link: _Link, name: str, arguments: dict[str, Any]) -> None:
        try:
            link.pub.queue_declare(name, durable=True, arguments=arguments)
        except pika.exceptions.ChannelClosedByBroker as e:
            link.open_channels()  # the failed declare closed `pub`
            if e.reply_code == 406:
                raise RabbitError(
                    f"RabbitMQ at {self.safe_url}: queue {name!r} exists with other settings "
                    f"({e.reply_text}). RabbitMQ cannot change a queue's arguments: delete the "
                    "queue (and its messages), or use another ?prefix= in the broker URL."
                ) from None
            raise

    def passive(self, link: _Link, name: str) -> Any:
        """``queue.declare(passive)``: the queue's ready count and consumer count."""
        try:
            return link.pub.queue_declare(name, passive=True).method
        except pika.exceptions.ChannelClosedByBroker as e:
            link.open_channels()
            if e.reply_code == 404:
                raise RabbitError(
                    f"RabbitMQ at {self.safe_url}: queue {name!r} does not exist (deleted "
                    "while running?); it is declared again on the next start"
                ) from None
            raise

    # -- the interface ---------------------------------------------------------------

    def queue(self, name: str) -> RabbitQueue:
        q = self._queues.get(name)
        if q is None:
            raise KeyError(f"unknown queue {name!r}")
        return q

    def publish(self, topic: str, messages: Sequence[OutgoingMessage]) -> None:
        names = self.subscriptions.get(topic)
        if names is None:
            raise KeyError(f"unknown topic {topic!r}")
        queues = [self._queues[n] for n in names]
        if any(m.delay for m in messages) or any(q.spec.delay > 0 for q in queues):
            # Each subscriber waits its own delay: send to each, as SNS → SQS would.
            for q in queues:
                q.send_batch(messages)
            return
        now = time.time()
        envs: list[_Envelope] = []
        seen: set[str] = set()
        for m in messages:
            mid = m.id or str(uuid.uuid4())
            if mid not in seen:
                seen.add(mid)
                envs.append(_Envelope(mid, m.body.encode("utf-8"), dict(m.attributes), now))
        exchange = self.exchanges[topic]
        done = [0]

        def fan_out(link: _Link) -> None:
            while done[0] < len(envs):
                link.publish(exchange, "", envs[done[0]], f"exchange {exchange!r}")
                done[0] += 1

        self.link.call(fan_out)

    def close(self) -> None:
        """Close the connection; deliveries still held go back to their queues."""
        self.link.close()

    def destroy(self) -> None:
        """Delete every queue and exchange of this prefix (tests, and tearing down a pipeline)."""

        def delete(link: _Link) -> None:
            for q in self._queues.values():
                for name in (q.main, q.leases, q.parked, *q.levels.values()):
                    link.pub.queue_delete(name)
            for exchange in self.exchanges.values():
                link.pub.exchange_delete(exchange)

        if self.link.closed:
            conn = pika.BlockingConnection(self.link.params)
            try:
                ch = conn.channel()
                for q in self._queues.values():
                    for name in (q.main, q.leases, q.parked, *q.levels.values()):
                        ch.queue_delete(name)
                for exchange in self.exchanges.values():
                    ch.exchange_delete(exchange)
            finally:
                conn.close()
            return
        self.link.call(delete)
