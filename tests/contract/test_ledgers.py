"""The ledger contract: claims, expiry, versions and sent ids, on every backend."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from sluiceway.ledger import Claim, Ledger, SqliteLedger
from sluiceway.state import StateDB

from ..aws_backend import dynamo_ledger
from ..postgres_backend import postgres_ledger
from ..redis_backend import redis_ledger


def _sqlite(request: pytest.FixtureRequest, tmp_path: Path) -> Ledger:
    return SqliteLedger(StateDB(tmp_path / "state.db"))


# name → factory(request, tmp_path) giving an empty ledger (a fresh namespace).
BACKENDS: dict[str, Callable[[pytest.FixtureRequest, Path], Ledger]] = {"sqlite": _sqlite}
BACKENDS["postgres"] = postgres_ledger
BACKENDS["redis"] = redis_ledger
BACKENDS["dynamodb"] = dynamo_ledger


@pytest.fixture(params=sorted(BACKENDS))
def ledger(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Ledger]:
    led = BACKENDS[request.param](request, tmp_path)
    yield led
    led.close()


def test_first_seen_once_per_version(ledger: Ledger) -> None:
    assert not ledger.has_seen("b", "k", "e1")
    assert ledger.first_seen("b", "k", "e1", 10, "ev1")
    assert not ledger.first_seen("b", "k", "e1", 10, "ev1-again")
    assert ledger.has_seen("b", "k", "e1")
    assert ledger.first_seen("b", "k", "e2", 11, "ev2")
    assert [v["etag"] for v in ledger.versions("b", "k")] == ["e1", "e2"]
    assert ledger.versions("b", "other") == []


def test_claim_complete_and_redelivery(ledger: Ledger) -> None:
    key = "fn|b/k@e1"
    assert ledger.claim(key, function="fn", owner="w1", ttl=60) is Claim.ACQUIRED
    assert ledger.claim(key, function="fn", owner="w2", ttl=60) is Claim.BUSY
    ledger.complete(key, owner="w1", info={"outputs": [{"bucket": "o", "key": "k.parquet"}]})
    assert ledger.claim(key, function="fn", owner="w2", ttl=60) is Claim.DONE
    entry = ledger.get(key)
    assert entry is not None and entry.status == "done" and entry.attempts == 1
    assert entry.info["outputs"][0]["key"] == "k.parquet"
    assert ledger.function_counts() == {"fn": {"done": 1}}


def test_expired_claim_is_taken_over(ledger: Ledger) -> None:
    key = "fn|b/k@e1"
    assert ledger.claim(key, function="fn", owner="dead", ttl=0.2) is Claim.ACQUIRED
    deadline = time.monotonic() + 5
    while ledger.claim(key, function="fn", owner="w2", ttl=60) is not Claim.ACQUIRED:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    entry = ledger.get(key)
    assert entry is not None and entry.owner == "w2" and entry.attempts == 2
    # The dead owner cannot finish over the new owner.
    ledger.complete(key, owner="dead", info={})
    assert ledger.get(key).status == "in_progress"  # type: ignore[union-attr]


def test_extend_keeps_the_claim(ledger: Ledger) -> None:
    key = "fn|x"
    ledger.claim(key, function="fn", owner="w1", ttl=0.3)
    for _ in range(4):
        time.sleep(0.1)
        assert ledger.extend(key, owner="w1", ttl=0.3)
    assert ledger.claim(key, function="fn", owner="w2", ttl=60) is Claim.BUSY
    assert not ledger.extend(key, owner="w2", ttl=10)


def test_failed_can_be_claimed_again_skipped_cannot(ledger: Ledger) -> None:
    ledger.claim("fn|a", function="fn", owner="w", ttl=60)
    ledger.fail("fn|a", owner="w", info={"last_failure": {"error_type": "E"}})
    assert ledger.get("fn|a").status == "failed"  # type: ignore[union-attr]
    assert ledger.claim("fn|a", function="fn", owner="w", ttl=60) is Claim.ACQUIRED
    ledger.claim("fn|b", function="fn", owner="w", ttl=60)
    ledger.skip("fn|b", owner="w", info={"reason": "deleted"})
    assert ledger.claim("fn|b", function="fn", owner="w", ttl=60) is Claim.DONE


def test_versions_entries_and_supersede(ledger: Ledger) -> None:
    for etag in ("e1", "e2"):
        key = f"fn|b/k_1%@{etag}"  # LIKE wildcards in keys must not leak
        ledger.claim(key, function="fn", owner="w", ttl=60)
        ledger.complete(key, owner="w", info={"v": etag})
    ledger.claim("fn|b/k_10@e9", function="fn", owner="w", ttl=60)
    ledger.complete("fn|b/k_10@e9", owner="w", info={})
    others = ledger.other_versions("fn", "b/k_1%@", "fn|b/k_1%@e2")
    assert [e.key for e in others] == ["fn|b/k_1%@e1"]
    ledger.supersede("fn|b/k_1%@e1")
    assert ledger.get("fn|b/k_1%@e1").status == "superseded"  # type: ignore[union-attr]
    assert [e.key for e in ledger.entries_for("b/k_1%@e2")] == ["fn|b/k_1%@e2"]
    assert len(ledger.entries_since(0)) == 3
    assert sorted(info["v"] for fn, info in ledger.done_infos() if "v" in info) == ["e2"]


def test_sent_ids(ledger: Ledger) -> None:
    assert ledger.unsent(["a", "b", "c"]) == ["a", "b", "c"]
    ledger.mark_sent(["a", "c"])
    ledger.mark_sent(["a"])
    assert ledger.unsent(["a", "b", "c"]) == ["b"]
    assert ledger.forget_sent(older_than=3600) == 0
    assert ledger.forget_sent(older_than=-1) == 2
    assert ledger.unsent(["a"]) == ["a"]
