"""The SQLite queue beyond the contract suite: batch order, dead letters in a batch, processes.

A receive hides its batch with one statement of a fixed text that picks the
rows again, and an ack of one receipt is one statement of its own
(src/sluiceway/queues/sqlite.py); these check what that must keep: the batch
in the order its messages became visible, the messages over
max_receive_count dead-lettered from the middle of a batch, acks across
receipts, and processes sharing one file never holding the same message.
"""

from __future__ import annotations

import multiprocessing as mp
import time
import traceback
from pathlib import Path
from typing import Any

from sluiceway.queues.base import OutgoingMessage, QueueSpec
from sluiceway.queues.sqlite import SqliteBroker
from sluiceway.state import StateDB

from .helpers import consumer_reports

SPECS = {
    "q": QueueSpec("q", visibility_timeout=30, max_receive_count=1, dead_letter_queue="d"),
    "d": QueueSpec("d"),
}


def _broker(path: Path | str) -> SqliteBroker:
    return SqliteBroker(StateDB(path), SPECS)


def test_a_batch_comes_in_the_order_its_messages_became_visible(tmp_path: Path) -> None:
    q = _broker(tmp_path / "s.db").queue("q")
    q.send_batch([OutgoingMessage("third", delay=0.2), OutgoingMessage("first")])
    q.send("second")
    deadline = time.monotonic() + 5
    while q.counts().visible < 3:  # the delayed one, sent first, shows up last
        assert time.monotonic() < deadline, "the delayed message never became visible"
        time.sleep(0.01)
    assert [m.body for m in q.receive(3)] == ["first", "second", "third"]


def test_a_message_over_max_receive_count_is_dead_lettered_from_a_batch(tmp_path: Path) -> None:
    broker = _broker(tmp_path / "s.db")
    q, dlq = broker.queue("q"), broker.queue("d")
    q.send("poison", id="p")
    [m] = q.receive(1)
    assert q.change_visibility(m, 0)  # the worker died: no ack
    q.send_batch([OutgoingMessage("a", id="a"), OutgoingMessage("b", id="b")])
    got = q.receive(3)
    assert [(m.id, m.receive_count) for m in got] == [("a", 1), ("b", 1)]
    [dead] = dlq.peek()
    assert (dead.id, dead.receive_count, dead.attributes["source_queue"]) == ("p", 1, "q")
    assert dead.failure is not None and dead.failure["error_type"] == "MaxReceiveCountExceeded"
    assert q.ack(got) == 2
    assert q.counts() == type(q.counts())(0, 0, 0)


def test_one_ack_for_messages_of_several_receives(tmp_path: Path) -> None:
    q = _broker(tmp_path / "s.db").queue("q")
    q.send_batch([OutgoingMessage(str(i)) for i in range(3)])
    first, rest = q.receive(1), q.receive(2)
    assert first[0].receipt != rest[0].receipt
    assert q.ack([rest[1], *first, rest[0]]) == 3
    assert q.ack(first) == 0
    assert q.counts() == type(q.counts())(0, 0, 0)


# -- four processes on one file -------------------------------------------------------------


def _drain(path: str, holding: Any, results: Any, ready: Any, go: Any) -> None:
    """Receive batches until the queue stays empty; ack each; report the ids.

    The first batch is held until every process holds one (``holding``, a
    barrier), so all four take part however the OS schedules them: one
    process could otherwise drain all 2,000 before the others woke up.
    """
    try:
        q = _broker(path).queue("q")
        ready.release()
        go.wait(30)
        acked: list[str] = []
        first = True
        while batch := q.receive(7, wait=0.5):
            if first:
                holding.wait(30)
                first = False
            # Nobody else may hold these: a second delivery would have a new
            # receipt and make this ack delete fewer.
            assert q.ack(batch) == len(batch), "a message held here was handed out again"
            acked += [m.id for m in batch]
        results.put((acked, None))
    except BaseException:
        results.put((None, traceback.format_exc()))
        raise


def test_four_processes_receive_every_message_exactly_once(tmp_path: Path) -> None:
    path = str(tmp_path / "s.db")
    broker = _broker(path)
    sent: set[str] = set()

    def send() -> None:
        sent.update(broker.queue("q").send_batch([OutgoingMessage(f"m{i}") for i in range(2000)]))

    holding = mp.get_context("forkserver").Barrier(4)
    reports = consumer_reports(
        _drain,
        lambda i: (path, holding),
        ["sluiceway.queues.sqlite", "tests.test_sqlite_queue"],
        send,
        lambda report: report[1],
    )
    reports = [acked for acked, _ in reports]
    every = [mid for acked in reports for mid in acked]
    assert len(every) == len(set(every)) == len(sent) and set(every) == sent
    assert all(reports), "a process received nothing"
    assert broker.queue("q").counts() == type(broker.queue("q").counts())(0, 0, 0)
