"""RabbitMQ beyond the queue contract: processes, threads, the delay ladder, reconnects.

Two broker objects stand for two worker processes (each process builds its
own broker, with its own connection). The end-to-end tests run the
bronze → staging pipeline with worker processes on a RabbitMQ profile.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from sluiceway import Pipeline
from sluiceway.queues.base import Broker, OutgoingMessage, QueueCounts, QueueSpec
from sluiceway.queues.sqlite import SqliteBroker
from sluiceway.state import StateDB

from . import broker_e2e
from .conftest import BRONZE_TO_STAGING
from .rabbitmq_backend import (
    fresh_prefix,
    make_broker,
    profile_url,
    require_rabbitmq,
    url_with_prefix,
)
from .services import RABBITMQ_URL, free_port

RABBITMQ_PORT = urlsplit(RABBITMQ_URL).port or 5672

SPECS = {
    "q": QueueSpec("q", visibility_timeout=0.4, max_receive_count=3, dead_letter_queue="q-dlq"),
    "q-dlq": QueueSpec("q-dlq"),
    "slow": QueueSpec("slow", delay=0.6),
}


def pair(request: pytest.FixtureRequest, **subs: list[str]) -> tuple[Broker, Broker]:
    """Two brokers on the same prefix: what two worker processes see."""
    prefix = fresh_prefix()
    a = make_broker(request, SPECS, subs, prefix=prefix)
    b = make_broker(request, SPECS, subs, prefix=prefix)
    request.addfinalizer(a.close)
    request.addfinalizer(b.close)
    return a, b


def test_unreachable_server_is_one_clear_error(caplog: pytest.LogCaptureFixture) -> None:
    from sluiceway.queues.rabbitmq import RabbitBroker, RabbitUnavailable

    port = free_port()  # nothing listens there
    url = f"amqp://guest:s3cret@127.0.0.1:{port}/?prefix=sw.nowhere"
    caplog.set_level(logging.DEBUG)
    started = time.monotonic()
    with pytest.raises(RabbitUnavailable) as e:
        RabbitBroker.from_url(url, SPECS, {})
    message = str(e.value)
    assert f"127.0.0.1:{port}" in message and "guest:***@" in message
    assert "s3cret" not in message and "tried 3 times" in message
    assert time.monotonic() - started < 10
    # pika's own ERROR records with tracebacks (half a dozen per attempt) stay out.
    assert [r for r in caplog.records if r.levelno >= logging.ERROR] == []


def test_a_stuck_worker_loses_its_message_after_the_visibility_timeout(
    request: pytest.FixtureRequest,
) -> None:
    a, b = pair(request)
    a.queue("q").send("work")
    [held] = a.queue("q").receive(1)
    # `a` neither acks nor heartbeats (its main thread is stuck); its I/O thread
    # still hands the delivery back when the deadline passes.
    assert b.queue("q").counts() == QueueCounts(visible=0, in_flight=1, delayed=0)  # global
    [again] = b.queue("q").receive(1, wait=3.0)
    assert again.id == held.id and again.receive_count == 2
    assert a.queue("q").ack([held]) == 0, "a stale receipt must not ack"
    assert not a.queue("q").change_visibility(held, 10)
    assert b.queue("q").ack([again]) == 1
    assert a.queue("q").counts() == QueueCounts(0, 0, 0)


def test_heartbeats_from_another_thread_while_the_main_thread_works(
    request: pytest.FixtureRequest,
) -> None:
    a, b = pair(request)
    q = a.queue("q")
    q.send("long job")
    [m] = q.receive(1)
    stop = threading.Event()
    beats: list[bool] = []

    def heartbeat() -> None:  # as worker._Heartbeat does
        while not stop.wait(0.1):
            beats.append(q.change_visibility(m, q.spec.visibility_timeout))

    t = threading.Thread(target=heartbeat)
    t.start()
    try:
        deadline = time.monotonic() + 1.2  # three visibility timeouts
        while time.monotonic() < deadline:  # the main thread keeps using the broker too
            q.send_batch([OutgoingMessage("filler", id=f"f{time.monotonic_ns()}")])
            assert q.counts().in_flight == 1
        assert b.queue("q").receive(1, wait=0.1) != []  # fillers, never the held one
    finally:
        stop.set()
        t.join()
    assert beats and all(beats)
    assert q.ack([m]) == 1


def test_long_delays_go_down_the_ladder_exactly(request: pytest.FixtureRequest) -> None:
    (a, _) = pair(request)
    q = a.queue("q")
    sent = time.monotonic()
    q.send("later", delay=1.3)  # 0.8 s, then the rest in smaller levels
    assert q.counts().delayed == 1 and q.receive(1) == []
    [m] = q.receive(1, wait=5.0)
    waited = time.monotonic() - sent
    assert 1.3 <= waited < 2.0
    assert m.receive_count == 1, "hops down the ladder are not receives"


def test_a_retry_waits_its_backoff_and_keeps_its_failure(request: pytest.FixtureRequest) -> None:
    a, b = pair(request)
    a.queue("q").send("flaky")
    [m] = a.queue("q").receive(1)
    failed = time.monotonic()
    assert a.queue("q").record_failure(m, {"error_type": "E", "message": "try later"}, 0.5)
    assert b.queue("q").counts() == QueueCounts(visible=0, in_flight=0, delayed=1)
    [again] = b.queue("q").receive(1, wait=3.0)
    assert time.monotonic() - failed >= 0.5
    assert again.failure == {"error_type": "E", "message": "try later"}
    assert again.receive_count == 2


def test_another_process_cannot_touch_a_delivery(request: pytest.FixtureRequest) -> None:
    """The runtime blaming a dead worker: RabbitMQ requeues it when the channel closes."""
    a, b = pair(request)
    a.queue("q").send("x")
    [m] = a.queue("q").receive(1)
    assert not b.queue("q").record_failure(m, {"error_type": "WorkerDied"}, 0)
    a.close()  # the worker process is gone: its connection closes
    [again] = b.queue("q").receive(1, wait=2.0)
    assert again.id == m.id and again.receive_count == 2


def test_peek_does_not_spend_the_delivery_budget(request: pytest.FixtureRequest) -> None:
    (a, _) = pair(request)
    q = a.queue("q")
    q.send_batch([OutgoingMessage(str(i)) for i in range(3)])
    for _ in range(5):  # more peeks than max_receive_count
        assert [m.body for m in q.peek()] == ["0", "1", "2"]
    assert [(m.body, m.receive_count) for m in q.receive(3)] == [("0", 1), ("1", 1), ("2", 1)]


def test_a_topic_with_a_delayed_subscriber(request: pytest.FixtureRequest) -> None:
    a, _ = pair(request, t=["q", "slow"])
    a.publish("t", [OutgoingMessage("e", id="e1"), OutgoingMessage("e", id="e1")])
    assert [m.body for m in a.queue("q").receive(5)] == ["e"]  # deduped within the call
    assert a.queue("slow").receive(1) == [] and a.queue("slow").counts().delayed == 1
    assert [m.id for m in a.queue("slow").receive(5, wait=3.0)] == ["e1"]


def test_redrive_into_another_backend(request: pytest.FixtureRequest, tmp_path: Path) -> None:
    (a, _) = pair(request)
    q, dlq = a.queue("q"), a.queue("q-dlq")
    q.send_batch([OutgoingMessage("a", {"k": 1}), OutgoingMessage("b")])
    for m in q.receive(2):
        q.dead_letter(m, {"error_type": "E", "message": m.body})
    other = SqliteBroker(StateDB(tmp_path / "s.db"), {"x": QueueSpec("x")}).queue("x")
    assert dlq.redrive(other) == 2
    assert sorted(m.body for m in other.receive(5)) == ["a", "b"]
    assert dlq.counts() == QueueCounts(0, 0, 0)


def test_the_connection_comes_back_and_held_receipts_go_stale(
    request: pytest.FixtureRequest,
) -> None:
    a, b = pair(request)
    q = a.queue("q")
    q.send("x")
    [m] = q.receive(1)
    conn = a.link.conn  # type: ignore[attr-defined]
    sock = conn._impl._transport._sock
    sock.shutdown(socket.SHUT_RDWR)  # the network drops the connection
    [again] = b.queue("q").receive(1, wait=5.0)  # RabbitMQ requeued it
    assert again.receive_count == 2
    assert q.ack([m]) == 0  # stale: the delivery went with the old connection
    assert q.send("after") and b.queue("q").ack([again]) == 1
    assert [x.body for x in q.receive(1, wait=2.0)] == ["after"]


# -- end to end ----------------------------------------------------------------------


@pytest.fixture
def mq_pipeline(
    write_pipeline: Callable[..., Path],
    monkeypatch: pytest.MonkeyPatch,
    request: pytest.FixtureRequest,
) -> Path:
    """BRONZE_TO_STAGING on a RabbitMQ profile "mq" under a fresh prefix, removed at the end."""
    require_rabbitmq()
    return broker_e2e.mq_pipeline(
        write_pipeline, monkeypatch, request, profile_url(fresh_prefix(), monkeypatch)
    )


@pytest.mark.parametrize(("workers", "files", "rows"), [(2, 6, 50), (4, 32, 3000)])
def test_bronze_to_staging_on_rabbitmq(
    mq_pipeline: Path, tmp_path: Path, workers: int, files: int, rows: int
) -> None:
    broker_e2e.check_bronze_to_staging(mq_pipeline, tmp_path, RABBITMQ_PORT, workers, files, rows)


def test_a_profile_url_keeps_its_password_out_of_errors(
    write_pipeline: Callable[..., Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    from sluiceway.queues.rabbitmq import RabbitUnavailable

    monkeypatch.setenv("SW_TEST_AMQP_PASS", "hunter2")
    url = url_with_prefix("sw.x", f"amqp://guest:${{SW_TEST_AMQP_PASS}}@127.0.0.1:{free_port()}/")
    path = write_pipeline(BRONZE_TO_STAGING + f'profiles:\n  mq:\n    broker: "{url}"\n')
    with pytest.raises(RabbitUnavailable) as e:
        _ = Pipeline.from_file(path, profile="mq").broker
    assert "hunter2" not in str(e.value) and "guest:***@127.0.0.1" in str(e.value)


def test_changed_queue_settings_are_one_clear_error(request: pytest.FixtureRequest) -> None:
    from sluiceway.queues.rabbitmq import RabbitError

    prefix = fresh_prefix()
    make_broker(request, SPECS, {}, prefix=prefix).close()
    changed = {**SPECS, "q": QueueSpec("q", max_receive_count=5, dead_letter_queue="q-dlq")}
    with pytest.raises(RabbitError, match=rf"queue '{prefix}\.q\.q' exists with other settings"):
        make_broker(request, changed, {}, prefix=prefix)
