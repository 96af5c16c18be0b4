"""NATS JetStream beyond the queue contract: processes, threads, delays, dedup.

Two broker objects stand for two worker processes (each process builds its
own broker, with its own connection and event loop). The end-to-end tests
run the bronze → staging pipeline with worker processes on a NATS profile.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from sluiceway.queues.base import Broker, Message, OutgoingMessage, QueueCounts, QueueSpec

from . import broker_e2e
from .nats_backend import fresh_prefix, make_broker, require_nats, url_with_prefix
from .services import NATS_URL, free_port

NATS_PORT = urlsplit(NATS_URL).port or 4222

SPECS = {
    "q": QueueSpec("q", visibility_timeout=0.4, max_receive_count=3, dead_letter_queue="q-dlq"),
    "q-dlq": QueueSpec("q-dlq"),
    "slow": QueueSpec("slow", delay=0.6),
    "long": QueueSpec("long", visibility_timeout=30),
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
    from sluiceway.queues.nats import NatsBroker, NatsUnavailable

    port = free_port()
    url = f"nats://sw:s3cret@127.0.0.1:{port}?prefix=sw.nowhere"
    caplog.set_level(logging.DEBUG)
    started = time.monotonic()
    with pytest.raises(NatsUnavailable) as e:
        NatsBroker.from_url(url, SPECS, {})
    message = str(e.value)
    assert f"127.0.0.1:{port}" in message and "sw:***@" in message
    assert "s3cret" not in message and "tried 3 times" in message
    assert time.monotonic() - started < 10
    assert [r for r in caplog.records if r.levelno >= logging.ERROR] == []


def test_a_stuck_worker_loses_its_message_after_the_visibility_timeout(
    request: pytest.FixtureRequest,
) -> None:
    a, b = pair(request)
    a.queue("q").send("work")
    [held] = a.queue("q").receive(1)
    assert b.queue("q").counts() == QueueCounts(visible=0, in_flight=1, delayed=0)
    [again] = b.queue("q").receive(1, wait=3.0)  # the server's AckWait ran out
    assert again.id == held.id and again.receive_count == 2
    assert a.queue("q").ack([held]) == 0, "a stale receipt must not delete it from under b"
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
        while time.monotonic() < deadline:
            q.send(f"filler {time.monotonic_ns()}")
            assert q.counts().in_flight == 1
        got = b.queue("q").receive(10, wait=0.1)
        assert got and m.id not in {x.id for x in got}
    finally:
        stop.set()
        t.join()
    assert beats and all(beats)
    assert q.ack([m]) == 1


def test_closing_hands_held_messages_back_at_once(request: pytest.FixtureRequest) -> None:
    a, b = pair(request)
    a.queue("long").send("x")
    [m] = a.queue("long").receive(1)
    a.close()  # a worker shutting down; its visibility timeout is 30 s
    [again] = b.queue("long").receive(1, wait=3.0)
    assert again.id == m.id and again.receive_count == 2


def test_visibility_can_be_longer_than_ackwait(request: pytest.FixtureRequest) -> None:
    a, b = pair(request)
    a.queue("q").send("x")
    [m] = a.queue("q").receive(1)
    assert a.queue("q").change_visibility(m, 1.2)  # 3x AckWait, one call
    assert b.queue("q").receive(1, wait=0.9) == []
    [again] = b.queue("q").receive(1, wait=2.0)
    assert again.id == m.id and again.receive_count == 2


def test_another_process_can_record_a_failure(request: pytest.FixtureRequest) -> None:
    """The runtime blaming a dead worker: the ack subject works from any connection."""
    a, b = pair(request)
    a.queue("q").send("x", attributes={"k": "v"})
    [m] = a.queue("q").receive(1)
    blamed = Message(m.id, "q", "", {}, 0, m.receipt, 0.0)  # what Runtime._blame knows
    failure = {"error_type": "WorkerDied", "message": "exit code -9"}
    assert b.queue("q").record_failure(blamed, failure, retry_in=0)
    a.queue("q").ack([m])  # the old delivery's ack cannot touch the new copy
    [again] = b.queue("q").receive(1, wait=1.0)
    assert (again.body, again.attributes, again.failure) == ("x", {"k": "v"}, failure)
    assert again.receive_count == 2


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


def test_the_last_receive_moves_to_the_dlq_with_the_last_failure(
    request: pytest.FixtureRequest,
) -> None:
    a, _ = pair(request)
    q, dlq = a.queue("q"), a.queue("q-dlq")
    q.send("poison")
    [m] = q.receive(1)
    q.record_failure(m, {"error_type": "E", "message": "first"}, 0)
    for _ in range(2):  # then the worker dies twice
        [m] = q.receive(1, wait=1.0)
        q.change_visibility(m, 0)
    assert q.receive(1, wait=0.2) == []
    [dead] = dlq.peek()
    assert dead.failure == {"error_type": "E", "message": "first"}
    assert dead.receive_count == 3 and dead.attributes["source_queue"] == "q"


def test_same_id_in_separate_calls_is_deduplicated(request: pytest.FixtureRequest) -> None:
    a, b = pair(request)
    a.queue("q").send("one", id="m1")
    b.queue("q").send("again", id="m1")  # another process, within the duplicate window
    assert [m.body for m in a.queue("q").receive(5)] == ["one"]


def test_a_topic_with_a_delayed_subscriber(request: pytest.FixtureRequest) -> None:
    a, _ = pair(request, t=["q", "slow"])
    a.publish("t", [OutgoingMessage("e", id="e1")])
    assert [m.body for m in a.queue("q").receive(5)] == ["e"]
    assert a.queue("slow").receive(1) == [] and a.queue("slow").counts().delayed == 1
    assert [m.id for m in a.queue("slow").receive(5, wait=3.0)] == ["e1"]


# -- end to end ----------------------------------------------------------------------


@pytest.fixture
def mq_pipeline(
    write_pipeline: Callable[..., Path],
    monkeypatch: pytest.MonkeyPatch,
    request: pytest.FixtureRequest,
) -> Path:
    """BRONZE_TO_STAGING on a NATS profile "mq" under a fresh prefix, removed at the end."""
    require_nats()
    return broker_e2e.mq_pipeline(
        write_pipeline, monkeypatch, request, url_with_prefix(fresh_prefix())
    )


@pytest.mark.parametrize(("workers", "files", "rows"), [(2, 6, 50), (4, 32, 3000)])
def test_bronze_to_staging_on_nats(
    mq_pipeline: Path, tmp_path: Path, workers: int, files: int, rows: int
) -> None:
    broker_e2e.check_bronze_to_staging(mq_pipeline, tmp_path, NATS_PORT, workers, files, rows)
