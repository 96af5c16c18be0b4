"""The Redis broker beyond the contract suite: its own state machine, URLs, lost connections.

The contract suite (tests/contract/test_queues.py) runs its state machine on
SQLite only; here the same promise (nothing lost, nothing duplicated) is
checked on Redis, with stale receipts and timeouts in the mix.
"""

from __future__ import annotations

import contextlib
import random
import socket
import threading
import time
import traceback
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from sluiceway.queues.base import Message, OutgoingMessage, QueueSpec

from .helpers import consumer_reports
from .redis_backend import client, delete_keys, fresh_prefix, redis_url, require_redis
from .services import free_port

SPECS = {
    "q": QueueSpec("q", visibility_timeout=0.2, max_receive_count=3, dead_letter_queue="q-dlq"),
    "q-dlq": QueueSpec("q-dlq", max_receive_count=1),
    "other": QueueSpec("other", visibility_timeout=30),
}


@pytest.fixture
def prefix(request: pytest.FixtureRequest) -> str:
    return fresh_prefix(request)


@pytest.fixture
def broker(prefix: str) -> Iterator[Any]:
    from sluiceway.queues.redis import RedisBroker

    b = RedisBroker.from_url(redis_url(prefix), SPECS, {"t": ["q", "other"]})
    yield b
    b.close()


# -- URLs and the first connection ------------------------------------------------------


def test_url_prefix_from_query_or_path_and_our_options_stay_ours() -> None:
    pytest.importorskip("redis")
    from sluiceway.queues.redis import parse_url

    t = parse_url("redis://:pw@h:6379/3?prefix=acme:orders&retry_for=2.5&socket_timeout=4")
    assert (t.prefix, t.retry_for) == ("acme:orders", 2.5)
    assert t.client_url == "redis://:pw@h:6379/3?socket_timeout=4"
    assert "pw" not in t.display and ":***@" in t.display
    assert parse_url("redis://h/0/acme:billing").prefix == "acme:billing"
    assert parse_url("rediss://h").prefix == "sluiceway"
    assert "secret" not in parse_url("redis://h/0?password=secret").display


def test_unreachable_server_is_one_clear_error_without_the_password() -> None:
    pytest.importorskip("redis")
    from sluiceway.backends import BROKERS, factory
    from sluiceway.queues.redis import RedisUnavailable

    url = f"redis://:hunter2@127.0.0.1:{free_port()}/0"
    with pytest.raises(RedisUnavailable) as e:
        factory("broker", BROKERS, url)(url, SPECS, {})
    text = str(e.value)
    assert "hunter2" not in text and "redis://:***@127.0.0.1:" in text
    assert "tried to connect 3 times" in text and "broker" in text
    assert e.value.__cause__ is None and e.value.__suppress_context__


# -- behaviour the contract does not pin down ----------------------------------------------


def test_a_hide_longer_than_the_visibility_timeout_holds(broker: Any) -> None:
    """Why deadlines are in a sorted set: idle time could not express this."""
    q = broker.queue("q")  # visibility_timeout 0.2s
    q.send("x")
    [m] = q.receive(1)
    assert q.record_failure(m, {"error_type": "E", "message": "later"}, retry_in=1.2)
    assert q.receive(1, wait=0.5) == []  # well past the 0.2s timeout: still hidden
    assert q.counts().in_flight == 1
    [again] = q.receive(1, wait=3.0)
    assert again.receive_count == 2 and again.failure == {"error_type": "E", "message": "later"}


def test_long_poll_wakes_when_a_delayed_message_is_due(broker: Any) -> None:
    q = broker.queue("other")
    q.send("soon", delay=0.3)
    t0 = time.monotonic()
    [m] = q.receive(1, wait=5.0)
    took = time.monotonic() - t0
    assert m.body == "soon" and 0.25 <= took < 2.0  # not the whole 5s


def test_stale_receipt_cannot_heartbeat_fail_or_dead_letter(broker: Any) -> None:
    q, dlq = broker.queue("q"), broker.queue("q-dlq")
    q.send("x")
    [old] = q.receive(1)
    [new] = q.receive(1, wait=2.0)  # the old holder's time ran out
    assert not q.change_visibility(old, 10)
    assert not q.record_failure(old, {"error_type": "E", "message": "stale"}, 0)
    q.dead_letter(old, {"error_type": "E", "message": "stale"})
    assert dlq.peek() == [] and q.counts().in_flight == 1
    assert q.ack([new]) == 1


def test_dead_letter_queue_without_its_own_dlq_parks_and_keeps(broker: Any) -> None:
    dlq = broker.queue("q-dlq")  # max_receive_count 1, no DLQ of its own
    dlq.send("poison", id="p1")
    [m] = dlq.receive(1)
    assert dlq.change_visibility(m, 0)
    assert dlq.receive(1, wait=0.1) == []  # second receive: over the limit, parked
    assert dlq.counts() == type(dlq.counts())(visible=0, in_flight=0, delayed=1)
    [parked] = dlq.peek()
    assert parked.failure is not None
    assert parked.failure["error_type"] == "MaxReceiveCountExceeded"
    assert dlq.redrive(broker.queue("other")) == 1
    assert [m.body for m in broker.queue("other").receive(1)] == ["poison"]


def test_dead_letter_keeps_user_attributes_exactly_and_redrive_resets(broker: Any) -> None:
    q, dlq = broker.queue("q"), broker.queue("q-dlq")
    attrs = {"big": 2**62 + 1, "f": 0.1 + 0.2, "nested": {"a": [1, None]}, "s": "ü"}
    q.send("x", attributes=attrs, id="m1")
    [m] = q.receive(1)
    q.dead_letter(m, {"error_type": "E", "message": "boom"})
    [dead] = dlq.peek()
    assert {k: dead.attributes[k] for k in attrs} == attrs
    assert dead.attributes["source_queue"] == "q" and dead.receive_count == 1
    assert dead.sent_at == pytest.approx(m.sent_at)
    assert dlq.redrive(q, ["m1", "missing"]) == 1
    [back] = q.receive(1)
    assert back.receive_count == 1 and back.attributes["big"] == 2**62 + 1


def test_redrive_to_a_queue_of_another_broker(broker: Any, tmp_path: Path) -> None:
    from sluiceway.queues.sqlite import SqliteBroker
    from sluiceway.state import StateDB

    q, dlq = broker.queue("q"), broker.queue("q-dlq")
    q.send("x", id="m1")
    [m] = q.receive(1)
    q.dead_letter(m, {"error_type": "E", "message": "boom"})
    local = SqliteBroker(StateDB(tmp_path / "s.db"), {"here": QueueSpec("here")})
    assert dlq.redrive(local.queue("here")) == 1
    assert dlq.peek() == [] and dlq.counts().visible == 0
    [moved] = local.queue("here").receive(1)
    assert (moved.id, moved.body) == ("m1", "x")
    local.db.close()


def test_publish_is_one_transaction_with_shared_ids_and_dedup(broker: Any) -> None:
    broker.publish("t", [OutgoingMessage("a", id="e1"), OutgoingMessage("b")])
    broker.publish("t", [OutgoingMessage("a again", id="e1")])  # still queued: not twice
    for name in ("q", "other"):
        got = broker.queue(name).receive(10)
        assert sorted(m.body for m in got) == ["a", "b"]
    ids_q = {m.id for m in broker.queue("q").peek()}
    assert ids_q == {m.id for m in broker.queue("other").peek()}
    with pytest.raises(KeyError):
        broker.publish("nope", [OutgoingMessage("x")])


def test_acked_id_can_be_sent_again_and_purge_counts(broker: Any) -> None:
    q = broker.queue("other")
    q.send("one", id="k")
    [m] = q.receive(1)
    assert q.ack([m]) == 1
    q.send("two", id="k")  # no longer in the queue: a new message
    q.send_batch([OutgoingMessage(str(i)) for i in range(5)])
    q.send("later", delay=60)
    assert q.counts() == type(q.counts())(visible=6, in_flight=0, delayed=1)
    assert q.purge() == 7
    assert q.counts() == type(q.counts())(0, 0, 0) and q.peek() == []
    q.send("after purge")
    assert [m.body for m in q.receive(5)] == ["after purge"]


def test_every_key_is_under_the_prefix_and_cleanup_removes_them(broker: Any, prefix: str) -> None:
    q = broker.queue("q")
    q.send_batch([OutgoingMessage(str(i)) for i in range(3)])
    [m] = q.receive(1)
    q.dead_letter(m, {"error_type": "E", "message": "x"})
    c = client()
    try:
        ours = set(c.scan_iter(match=f"{prefix}:*", count=1000))
        assert {f"{prefix}:q:q:s", f"{prefix}:q:q-dlq:s"} <= ours
        assert all(k.startswith(f"{prefix}:q:") for k in ours)
    finally:
        c.close()
    assert delete_keys(prefix) == len(ours)


# -- lost connections -------------------------------------------------------------------------


class Proxy:
    """A TCP proxy to the test Redis that can be cut and restored: a server that restarts."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.port = free_port()
        self._listener: socket.socket | None = None
        self._socks: list[socket.socket] = []
        self._lock = threading.Lock()

    def up(self) -> None:
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", self.port))
        s.listen(16)
        self._listener = s
        threading.Thread(target=self._accept, args=(s,), daemon=True).start()

    def down(self) -> None:
        with self._lock:
            if self._listener is not None:
                # close() alone does not wake a thread blocked in accept() on Linux
                with contextlib.suppress(OSError):
                    self._listener.shutdown(socket.SHUT_RDWR)
                self._listener.close()
                self._listener = None
            for s in self._socks:
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)
                s.close()
            self._socks.clear()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                a, _ = listener.accept()
            except OSError:
                return
            b = socket.create_connection(self.target)
            with self._lock:
                self._socks += [a, b]
            for src, dst in ((a, b), (b, a)):
                threading.Thread(target=self._pipe, args=(src, dst), daemon=True).start()

    @staticmethod
    def _pipe(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        for s in (src, dst):
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)


@pytest.fixture
def proxy() -> Iterator[Proxy]:
    from urllib.parse import urlsplit

    from .services import REDIS_URL

    require_redis()
    parts = urlsplit(REDIS_URL)
    p = Proxy((parts.hostname or "127.0.0.1", parts.port or 6379))
    p.up()
    yield p
    p.down()


def _via(proxy: Proxy, prefix: str, retry_for: float) -> str:
    from .services import REDIS_URL

    db = REDIS_URL.rstrip("/").rsplit("/", 1)[-1]
    return f"redis://127.0.0.1:{proxy.port}/{db}?prefix={prefix}&retry_for={retry_for}"


def test_lost_connection_is_retried_until_the_server_is_back(proxy: Proxy, prefix: str) -> None:
    from sluiceway.queues.redis import RedisBroker

    broker = RedisBroker.from_url(_via(proxy, prefix, 10), SPECS, {})
    timers: list[threading.Timer] = []

    def later(seconds: float, fn: Any) -> None:
        timers.append(threading.Timer(seconds, fn))
        timers[-1].start()

    try:
        q = broker.queue("other")
        q.send("x")
        [m] = q.receive(1)
        proxy.down()
        later(0.6, proxy.up)
        t0 = time.monotonic()
        assert q.ack([m]) == 1  # waited for the server instead of failing or dropping
        assert time.monotonic() - t0 >= 0.5
        assert q.counts() == type(q.counts())(0, 0, 0)
        # A receive blocked in its long poll when the connection goes is retried too.
        later(0.2, proxy.down)
        later(0.5, proxy.up)
        later(0.9, lambda: q.send("late"))
        assert [m.body for m in q.receive(1, wait=5.0)] == ["late"]
    finally:
        for t in timers:  # none may still be using the client when it closes
            t.join(10)
        broker.close()


def test_a_server_gone_for_good_raises_and_the_message_is_kept(proxy: Proxy, prefix: str) -> None:
    from sluiceway.queues.redis import RedisBroker, RedisUnavailable

    broker = RedisBroker.from_url(_via(proxy, prefix, 0.5), SPECS, {})
    try:
        q = broker.queue("other")
        q.send("x")
        [m] = q.receive(1)
        proxy.down()
        with pytest.raises(RedisUnavailable, match="during ack"):
            q.ack([m])  # never a silent 0: the caller knows the ack did not happen
    finally:
        broker.close()
    direct = client()
    try:
        assert direct.zcard(f"{prefix}:q:other:i") == 1  # still in flight, not lost
    finally:
        direct.close()


# -- the state machine, on Redis --------------------------------------------------------------


class RedisQueueMachine(RuleBasedStateMachine):
    """Sends, receives, acks, failures, releases and stale acks never lose or duplicate.

    A released (or failed) message's old copy is kept: acking it must succeed
    exactly when its receipt is still the latest one handed out.
    """

    def __init__(self) -> None:
        super().__init__()
        import uuid

        from sluiceway.queues.redis import RedisBroker

        self.prefix = f"sluiceway-test:{uuid.uuid4().hex[:12]}"
        specs = {
            "q": QueueSpec(
                "q", visibility_timeout=1000, max_receive_count=3, dead_letter_queue="d"
            ),
            "d": QueueSpec("d"),
        }
        self.broker = RedisBroker.from_url(redis_url(self.prefix), specs)
        self.q = self.broker.queue("q")
        self.sent: set[str] = set()
        self.acked: set[str] = set()
        self.held: dict[str, Message] = {}
        self.old: list[Message] = []
        self.latest: dict[str, str] = {}
        self.n = 0

    @rule(k=st.integers(1, 3))
    def send(self, k: int) -> None:
        for _ in range(k):
            self.n += 1  # ids fixed by the steps: a replayed example behaves the same
            self.sent.add(self.q.send(f"m{self.n}", id=f"m{self.n}"))

    @rule(k=st.integers(1, 4))
    def receive(self, k: int) -> None:
        for m in self.q.receive(k):
            assert m.id not in self.held, "a held message was handed out again"
            self.held[m.id] = m
            self.latest[m.id] = m.receipt

    @precondition(lambda self: bool(self.held))
    @rule(data=st.data())
    def ack_one(self, data: st.DataObject) -> None:
        mid = data.draw(st.sampled_from(list(self.held)))
        assert self.q.ack([self.held.pop(mid)]) == 1
        self.acked.add(mid)

    @precondition(lambda self: bool(self.held))
    @rule(data=st.data(), fail=st.booleans())
    def give_back(self, data: st.DataObject, fail: bool) -> None:
        m = self.held.pop(data.draw(st.sampled_from(list(self.held))))
        if fail:
            assert self.q.record_failure(m, {"error_type": "E", "message": "x"}, retry_in=0)
        else:
            assert self.q.change_visibility(m, 0)
        self.old.append(m)

    @precondition(lambda self: bool(self.old))
    @rule(data=st.data())
    def ack_old_copy(self, data: st.DataObject) -> None:
        m = self.old.pop(data.draw(st.integers(0, len(self.old) - 1)))
        dead = {d.id for d in self.broker.queue("d").peek(10_000)}
        live = m.id not in self.acked and m.id not in dead and m.id not in self.held
        expected = live and self.latest.get(m.id) == m.receipt
        assert self.q.ack([m]) == int(expected)
        if expected:
            self.acked.add(m.id)

    @invariant()
    def nothing_lost_or_duplicated(self) -> None:
        queued = {m.id for m in self.q.peek(10_000)}
        dead = {m.id for m in self.broker.queue("d").peek(10_000)}
        assert not (queued & dead) and not (queued & self.acked) and not (dead & self.acked)
        assert queued | dead | self.acked == self.sent
        c = self.q.counts()
        assert c.visible + c.in_flight + c.delayed == len(queued)
        assert c.in_flight == len(self.held)

    def teardown(self) -> None:
        self.broker.close()
        delete_keys(self.prefix)


def test_redis_queue_state_machine() -> None:
    require_redis()
    run = RedisQueueMachine.TestCase
    run.settings = settings(
        max_examples=25,
        stateful_step_count=30,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow],
    )
    run().runTest()


# -- four processes on one queue ------------------------------------------------------------------


def _consume(url: str, worker: int, results: Any, ready: Any, go: Any) -> None:
    """A worker process; any error goes back to the test with its traceback."""
    try:
        _consume_loop(url, worker, results, ready, go)
    except BaseException:
        results.put((worker, None, traceback.format_exc()))
        raise


def _consume_loop(url: str, worker: int, results: Any, ready: Any, go: Any) -> None:
    """Receive, sometimes "die" (no ack), ack late copies, report acks."""
    from sluiceway.queues.redis import RedisBroker

    rng = random.Random(worker)
    broker = RedisBroker.from_url(url, SPECS, {})
    q = broker.queue("q")  # visibility 0.2s: dropped messages come back quickly
    ready.release()
    go.wait(30)  # all four connected before anything is sent: each gets a share
    stop_at = time.monotonic() + 30
    dropped: list[tuple[float, Message]] = []
    acked: list[str] = []
    stale_refused = 0

    def ack_late(older_than: float) -> None:
        nonlocal stale_refused
        while dropped and dropped[0][0] < time.monotonic() - older_than:
            _, late = dropped.pop(0)
            if q.ack([late]) == 1:  # nobody received it again yet: still the latest receipt
                acked.append(late.id)
            else:  # re-delivered since: the stale copy must not delete it
                stale_refused += 1

    while time.monotonic() < stop_at:
        got = q.receive(5, wait=0.2)
        if not got and q.counts() == type(q.counts())(0, 0, 0):
            break
        for m in got:
            if m.receive_count < 3 and rng.random() < 0.15:
                dropped.append((time.monotonic(), m))  # as if the worker died: no ack
                continue
            time.sleep(0.001)  # the "work"
            if q.ack([m]) == 1:
                acked.append(m.id)
        ack_late(0.3)  # past the visibility timeout: usually someone else has it
    ack_late(-1)
    results.put((worker, acked, stale_refused))
    broker.close()


def test_four_processes_ack_every_message_exactly_once(prefix: str) -> None:
    from sluiceway.queues.redis import RedisBroker

    url = redis_url(prefix)
    broker = RedisBroker.from_url(url, SPECS, {})
    sent: set[str] = set()

    def send() -> None:
        sent.update(broker.queue("q").send_batch([OutgoingMessage(f"m{i}") for i in range(300)]))

    reports = consumer_reports(
        _consume,
        lambda i: (url, i),
        ["sluiceway.queues.redis", "tests.test_redis_queue"],
        send,
        lambda r: None if r[1] is not None else f"worker {r[0]} failed:\n{r[2]}",
    )
    acked = [mid for _, ids, _ in reports for mid in ids]
    assert len(acked) == len(set(acked)) == 300, "each message acked exactly once"
    assert set(acked) == sent
    assert all(len(ids) > 0 for _, ids, _ in reports), "all four workers took part"
    assert sum(n for _, _, n in reports) >= 1, "late acks of re-delivered messages refused"
    assert broker.queue("q").counts() == type(broker.queue("q").counts())(0, 0, 0)
    assert broker.queue("q-dlq").peek() == []
    broker.close()
