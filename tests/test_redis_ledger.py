"""The Redis ledger beyond the contract suite: contention, namespaces, indexes kept in step."""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest

from sluiceway.ledger import Claim

from .redis_backend import client, fresh_prefix, redis_url
from .services import free_port


@pytest.fixture
def prefix(request: pytest.FixtureRequest) -> str:
    return fresh_prefix(request)


@pytest.fixture
def ledger(prefix: str) -> Iterator[Any]:
    from sluiceway.ledgers.redis import RedisLedger

    led = RedisLedger.from_url(redis_url(prefix), "pipe")
    yield led
    led.close()


def test_only_one_of_many_simultaneous_claims_wins(ledger: Any) -> None:
    results: list[Claim] = []
    start = threading.Barrier(16)

    def claim(i: int) -> None:
        start.wait()
        results.append(ledger.claim("fn|b/k@e", function="fn", owner=f"w{i}", ttl=60))

    threads = [threading.Thread(target=claim, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert Counter(results) == {Claim.ACQUIRED: 1, Claim.BUSY: 15}
    assert ledger.get("fn|b/k@e").attempts == 1


def test_counts_follow_every_transition(ledger: Any) -> None:
    ledger.claim("f|a@1", function="f", owner="w", ttl=60)
    ledger.fail("f|a@1", owner="w", info={})
    assert ledger.function_counts() == {"f": {"failed": 1}}
    ledger.claim("f|a@1", function="f", owner="w", ttl=60)
    assert ledger.function_counts() == {"f": {"in_progress": 1}}
    ledger.complete("f|a@1", owner="w", info={"n": 1})
    ledger.complete("f|a@1", owner="w", info={"n": 2})  # done stays done, counted once
    ledger.claim("g|a@1", function="g", owner="w", ttl=60)
    ledger.skip("g|a@1", owner="w", info={})
    assert ledger.function_counts() == {"f": {"done": 1}, "g": {"skipped": 1}}
    ledger.supersede("f|a@1")
    ledger.supersede("f|missing")
    assert ledger.function_counts() == {"f": {"superseded": 1}, "g": {"skipped": 1}}
    assert list(ledger.done_infos()) == []
    assert ledger.get("f|a@1").info == {"n": 1}


def test_namespaces_under_one_prefix_do_not_meet(ledger: Any, prefix: str) -> None:
    from sluiceway.ledgers.redis import RedisLedger

    other = RedisLedger.from_url(redis_url(prefix), "other-pipe")
    try:
        assert ledger.first_seen("b", "k", "e1", 1, "ev")
        assert other.first_seen("b", "k", "e1", 1, "ev")
        ledger.mark_sent(["x"])
        assert other.unsent(["x"]) == ["x"]
        other.claim("f|k", function="f", owner="w", ttl=60)
        assert ledger.get("f|k") is None and ledger.function_counts() == {}
    finally:
        other.close()
    c = client()
    try:
        keys = list(c.scan_iter(match=f"{prefix}:*", count=1000))
    finally:
        c.close()
    assert keys and all(
        k.startswith((f"{prefix}:ledger:pipe:", f"{prefix}:ledger:other-pipe:")) for k in keys
    )


def test_identities_with_bars_and_unicode(ledger: Any) -> None:
    for fn in ("a", "b"):
        key = f"{fn}|bücket/x|y z@é1"
        ledger.claim(key, function=fn, owner="w", ttl=60)
        ledger.complete(key, owner="w", info={"fn": fn})
    assert [e.key for e in ledger.entries_for("bücket/x|y z@é1")] == [
        "a|bücket/x|y z@é1",
        "b|bücket/x|y z@é1",
    ]
    assert ledger.entries_for("y z@é1") == []
    assert [e.key for e in ledger.other_versions("a", "bücket/x|y z@", "a|other")] == [
        "a|bücket/x|y z@é1"
    ]
    assert ledger.other_versions("a", "bücket/x|y z@", "a|bücket/x|y z@é1") == []


def test_versions_keep_their_details_and_order(ledger: Any) -> None:
    assert ledger.first_seen("b", "dir/k.csv", "e1", 10, "ev1")
    time.sleep(0.002)
    assert ledger.first_seen("b", "dir/k.csv", "e0", 11, "ev2")
    [v1, v2] = ledger.versions("b", "dir/k.csv")
    assert (v1["etag"], v1["size"], v1["event_id"]) == ("e1", 10, "ev1")
    assert (v2["etag"], v2["size"], v2["event_id"]) == ("e0", 11, "ev2")
    assert v1["seen_at"] < v2["seen_at"] <= time.time() + 5
    assert not ledger.has_seen("b", "dir/k.csv", "e2")


def test_done_infos_walks_more_than_one_batch(ledger: Any) -> None:
    for i in range(1200):
        key = f"fn|b/{i}@e"
        ledger.claim(key, function="fn", owner="w", ttl=60)
        ledger.complete(key, owner="w", info={"i": i})
    infos = sorted(info["i"] for fn, info in ledger.done_infos())
    assert infos == list(range(1200))
    assert len(ledger.entries_since(0)) == 1200


def test_forget_sent_drops_only_the_old(ledger: Any) -> None:
    ledger.mark_sent(["old"])
    time.sleep(1.0)
    ledger.mark_sent(["new", "old"])  # marking again keeps the first time
    assert ledger.forget_sent(older_than=0.5) == 1
    assert ledger.unsent(["old", "new"]) == ["old"]
    assert ledger.unsent([]) == []


def test_unreachable_ledger_names_itself() -> None:
    pytest.importorskip("redis")
    from sluiceway.backends import LEDGERS, factory
    from sluiceway.queues.redis import RedisUnavailable

    url = f"redis://127.0.0.1:{free_port()}/0"
    with pytest.raises(RedisUnavailable, match=r"for the ledger at redis://127\.0\.0\.1:"):
        factory("ledger", LEDGERS, url)(url, "pipe")
