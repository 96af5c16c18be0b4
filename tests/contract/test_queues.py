"""The queue contract: SQS semantics that every backend must keep."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from sluiceway.queues.base import Broker, OutgoingMessage, QueueCounts, QueueSpec
from sluiceway.queues.sqlite import SqliteBroker
from sluiceway.state import StateDB

from ..aws_backend import sqs_broker, sqs_pipeline_broker
from ..nats_backend import nats_broker, nats_pipeline_broker
from ..rabbitmq_backend import rabbitmq_broker, rabbitmq_pipeline_broker
from ..redis_backend import redis_broker, redis_pipeline_broker

SPECS = {
    "q": QueueSpec("q", visibility_timeout=0.3, max_receive_count=2, dead_letter_queue="q-dlq"),
    "q-dlq": QueueSpec("q-dlq"),
    "other": QueueSpec("other"),
    "delayed": QueueSpec("delayed", delay=0.3),
}
SUBSCRIPTIONS = {"fanout": ["q", "other"]}


def _sqlite(request: pytest.FixtureRequest, tmp_path: Path) -> Broker:
    return SqliteBroker(StateDB(tmp_path / "state.db"), SPECS, SUBSCRIPTIONS)


# name → factory(request, tmp_path) building a broker with SPECS and SUBSCRIPTIONS
# (fresh queues per test); service fixtures via request.getfixturevalue(...).
BACKENDS: dict[str, Callable[[pytest.FixtureRequest, Path], Broker]] = {"sqlite": _sqlite}
BACKENDS["redis"] = redis_broker
BACKENDS["sqs"] = sqs_broker
BACKENDS["rabbitmq"] = rabbitmq_broker
BACKENDS["nats"] = nats_broker


# name → factory(request, pipeline name) building the broker a pipeline of that name
# gets from a URL without ?prefix= (its keys, queues or streams deleted afterwards).
# SQLite has no entry: its broker lives in the pipeline's own state file.
PIPELINE_BROKERS: dict[str, Callable[[pytest.FixtureRequest, str], Broker]] = {
    "redis": redis_pipeline_broker,
    "sqs": sqs_pipeline_broker,
    "rabbitmq": rabbitmq_pipeline_broker,
    "nats": nats_pipeline_broker,
}


@pytest.fixture(params=sorted(BACKENDS))
def broker(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Broker]:
    b = BACKENDS[request.param](request, tmp_path)
    yield b
    b.close()


def wait_for(predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached before the deadline"
        time.sleep(0.01)


@pytest.mark.parametrize("backend", sorted(PIPELINE_BROKERS))
def test_two_pipelines_on_one_broker_do_not_meet(
    request: pytest.FixtureRequest, backend: str
) -> None:
    """Without ?prefix=, the pipeline's name keeps same-named queues and topics apart."""
    run = uuid.uuid4().hex[:8]
    one = PIPELINE_BROKERS[backend](request, f"one{run}")
    two = PIPELINE_BROKERS[backend](request, f"two{run}")
    try:
        one.queue("q").send("for one")
        one.publish("fanout", [OutgoingMessage("fanned to one")])
        two.queue("other").send("for two")
        assert two.queue("q").receive(10, wait=0.5) == []
        assert [m.body for m in two.queue("other").receive(10, wait=1.0)] == ["for two"]
        got = sorted(m.body for m in one.queue("q").receive(10, wait=1.0))
        assert got == ["fanned to one", "for one"]
        assert [m.body for m in one.queue("other").receive(10, wait=1.0)] == ["fanned to one"]
        assert two.queue("q").counts() == QueueCounts(0, 0, 0)
    finally:
        one.close()
        two.close()


def test_an_explicit_prefix_wins_over_the_pipeline_name(request: pytest.FixtureRequest) -> None:
    """Deployments that set ?prefix= keep their names; so does ?prefix= (empty) on SQS."""
    from sluiceway.queues.redis import RedisBroker
    from sluiceway.queues.sqs import SqsBroker

    from ..aws_backend import moto, sqs_url
    from ..redis_backend import fresh_prefix, redis_url

    prefix = fresh_prefix(request)
    redis = RedisBroker.from_url(redis_url(prefix), SPECS, SUBSCRIPTIONS, pipeline="p")
    endpoint = moto(request)
    sqs = SqsBroker.from_url(sqs_url(endpoint, ""), SPECS, SUBSCRIPTIONS, pipeline="p")
    default = SqsBroker.from_url(sqs_url(endpoint, None), SPECS, SUBSCRIPTIONS, pipeline="p")
    try:
        assert (redis.prefix, sqs.prefix, default.prefix) == (prefix, "", "p-")
    finally:
        for b in (redis, sqs, default):
            b.close()


def test_send_receive_ack(broker: Broker) -> None:
    q = broker.queue("q")
    mid = q.send("hello", attributes={"a": 1})
    [m] = q.receive(1)
    assert (m.id, m.body, m.attributes, m.receive_count) == (mid, "hello", {"a": 1}, 1)
    assert q.counts().in_flight == 1
    assert q.receive(1) == []  # hidden while in flight
    assert q.ack([m]) == 1
    assert q.counts() == type(q.counts())(0, 0, 0)


def test_unacked_message_reappears_after_visibility_timeout(broker: Broker) -> None:
    q = broker.queue("q")
    q.send("x")
    [first] = q.receive(1)
    [again] = q.receive(1, wait=2.0)
    assert again.id == first.id
    assert again.receive_count == 2
    assert q.ack([first]) == 0, "a stale receipt must not delete the re-delivered message"
    assert q.ack([again]) == 1


def test_heartbeat_keeps_message_hidden(broker: Broker) -> None:
    q = broker.queue("q")
    q.send("slow")
    [m] = q.receive(1)
    for _ in range(4):
        time.sleep(0.1)
        assert q.change_visibility(m, 0.3)
    assert q.receive(1) == []  # 0.4s > the 0.3s timeout, but heartbeats kept it hidden


def test_exceeding_max_receive_count_dead_letters(broker: Broker) -> None:
    q, dlq = broker.queue("q"), broker.queue("q-dlq")
    q.send("poison")
    for _ in range(2):
        [m] = q.receive(1, wait=2.0)
        q.change_visibility(m, 0)  # the worker died: no ack
    assert q.receive(1, wait=0.1) == []
    [dead] = dlq.peek()
    assert dead.body == "poison"
    assert dead.failure is not None and dead.failure["error_type"] == "MaxReceiveCountExceeded"
    assert dead.attributes["source_queue"] == "q"


def test_failure_record_travels_to_the_dlq_and_redrive_brings_it_back(broker: Broker) -> None:
    q, dlq = broker.queue("q"), broker.queue("q-dlq")
    q.send("bad")
    [m] = q.receive(1)
    assert q.record_failure(m, {"error_type": "ValueError", "message": "boom"}, retry_in=0)
    [m] = q.receive(1)
    assert m.failure == {"error_type": "ValueError", "message": "boom"}
    q.dead_letter(m, {"error_type": "ValueError", "message": "boom again"})
    assert q.counts().visible == 0
    [dead] = dlq.peek()
    assert dead.failure["message"] == "boom again"
    assert dlq.redrive(q) == 1
    [back] = q.receive(1)
    assert back.body == "bad" and back.receive_count == 1


def test_redrive_by_id_and_purge(broker: Broker) -> None:
    q, dlq = broker.queue("q"), broker.queue("q-dlq")
    for body in ("a", "b", "c"):
        q.send(body)
    for m in q.receive(3):
        q.dead_letter(m, {"error_type": "E", "message": body})
    ids = [m.id for m in dlq.peek()]
    assert dlq.redrive(broker.queue("other"), ids[:1]) == 1
    assert [m.body for m in broker.queue("other").receive(5)] == ["a"]
    assert dlq.purge() == 2
    assert dlq.peek() == []


def test_delay_hides_new_messages(broker: Broker) -> None:
    q = broker.queue("delayed")
    q.send("later")
    assert q.receive(1) == []
    assert q.counts().delayed == 1
    assert [m.body for m in q.receive(1, wait=2.0)] == ["later"]


def test_same_id_is_queued_once(broker: Broker) -> None:
    q = broker.queue("q")
    q.send_batch([OutgoingMessage("one", id="m1"), OutgoingMessage("dup", id="m1")])
    assert [m.body for m in q.receive(10)] == ["one"]


def test_topic_fans_out_to_every_subscription(broker: Broker) -> None:
    broker.publish("fanout", [OutgoingMessage("e1"), OutgoingMessage("e2")])
    assert sorted(m.body for m in broker.queue("q").receive(10)) == ["e1", "e2"]
    assert sorted(m.body for m in broker.queue("other").receive(10)) == ["e1", "e2"]


def test_receive_waits_until_a_message_arrives(broker: Broker) -> None:
    import threading

    q = broker.queue("other")
    threading.Timer(0.2, lambda: q.send("late")).start()
    t0 = time.monotonic()
    got = q.receive(1, wait=3.0)
    assert [m.body for m in got] == ["late"]
    assert time.monotonic() - t0 < 2.5


def test_batch_receive_is_fifo_per_queue(broker: Broker) -> None:
    q = broker.queue("other")
    q.send_batch([OutgoingMessage(str(i)) for i in range(50)])
    got = q.receive(50)
    assert [m.body for m in got] == [str(i) for i in range(50)]


class QueueMachine(RuleBasedStateMachine):
    """Random sends, receives, acks and failures never lose or duplicate a message."""

    def __init__(self) -> None:
        super().__init__()
        import tempfile

        self.dir = tempfile.TemporaryDirectory()
        specs = {
            "q": QueueSpec(
                "q", visibility_timeout=1000, max_receive_count=3, dead_letter_queue="d"
            ),
            "d": QueueSpec("d"),
        }
        self.broker = SqliteBroker(StateDB(Path(self.dir.name) / "s.db"), specs)
        self.q = self.broker.queue("q")
        self.sent: set[str] = set()
        self.acked: set[str] = set()
        self.held: dict[str, object] = {}
        self.n = 0

    @rule(k=st.integers(1, 3))
    def send(self, k: int) -> None:
        for _ in range(k):
            self.n += 1
            self.sent.add(self.q.send(f"m{self.n}"))

    @rule(k=st.integers(1, 4))
    def receive(self, k: int) -> None:
        for m in self.q.receive(k):
            assert m.id not in self.held, "a held message was handed out again"
            self.held[m.id] = m

    @rule()
    def ack_one(self) -> None:
        if self.held:
            mid, m = self.held.popitem()
            assert self.q.ack([m]) == 1  # type: ignore[list-item]
            self.acked.add(mid)

    @rule()
    def fail_one(self) -> None:
        if self.held:
            _, m = self.held.popitem()
            self.q.record_failure(m, {"error_type": "E", "message": "x"}, retry_in=0)  # type: ignore[arg-type]

    @invariant()
    def nothing_lost_or_duplicated(self) -> None:
        queued = {m.id for m in self.q.peek(10_000)}
        dead = {m.id for m in self.broker.queue("d").peek(10_000)}
        assert not (queued & dead) and not (queued & self.acked) and not (dead & self.acked)
        assert queued | dead | self.acked == self.sent

    def teardown(self) -> None:
        self.broker.db.close()  # type: ignore[attr-defined]
        self.dir.cleanup()


TestQueueStateMachine = QueueMachine.TestCase
TestQueueStateMachine.settings = settings(
    max_examples=30,
    stateful_step_count=30,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
