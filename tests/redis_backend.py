"""Redis for tests: a fresh key prefix per test, every key under it deleted afterwards.

The contract suites (tests/contract) call :func:`redis_broker` and
:func:`redis_ledger` through their ``BACKENDS`` dicts; the Redis tests use
:func:`fresh_prefix` and :func:`redis_url` directly. Tests use database 15
of the server in ``SLUICEWAY_TEST_REDIS`` (default ``redis://127.0.0.1:6379/15``)
and never touch a key outside their own prefix, so they can run beside each
other and beside anything else using that server.

``redis`` and the Redis backend are imported inside the functions, so
collecting the contract suites works where the client is not installed.
"""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import pytest

from sluiceway.ledger import Ledger
from sluiceway.queues.base import Broker

from .services import REDIS_URL, require_url


def require_redis() -> None:
    """Skip (fail in CI) unless the test Redis listens and its client is installed."""
    require_url(
        "Redis",
        REDIS_URL,
        6379,
        "Start redis-server, or set SLUICEWAY_TEST_REDIS to a redis:// URL.",
    )
    pytest.importorskip("redis", reason="the redis client (pip install 'sluiceway[redis]')")


def redis_url(prefix: str, url: str = REDIS_URL) -> str:
    """The test server's URL with ``?prefix=``."""
    return f"{url}{'&' if '?' in url else '?'}prefix={prefix}"


def client() -> Any:
    """A plain client on the test database (for assertions and cleanup)."""
    import redis

    from sluiceway.queues.redis import parse_url

    return redis.Redis.from_url(parse_url(REDIS_URL).client_url, decode_responses=True)


def delete_keys(prefix: str) -> int:
    """Delete every key under ``prefix``; returns how many there were."""
    from sluiceway.queues.redis import delete_prefix

    c = client()
    try:
        return delete_prefix(c, prefix + ":")
    finally:
        c.close()


def count_keys(prefix: str) -> int:
    c = client()
    try:
        return sum(1 for _ in c.scan_iter(match=prefix + ":*", count=1000))
    finally:
        c.close()


def fresh_prefix(request: pytest.FixtureRequest) -> str:
    """A key prefix of this test's own; its keys are deleted when the test ends."""
    require_redis()
    prefix = f"sluiceway-test:{uuid.uuid4().hex[:12]}"
    request.addfinalizer(lambda: delete_keys(prefix))
    return prefix


def redis_broker(request: pytest.FixtureRequest, tmp_path: Path) -> Broker:
    """The contract suite's broker (its SPECS and SUBSCRIPTIONS) on a fresh prefix."""
    from sluiceway.queues.redis import RedisBroker

    from .contract.test_queues import SPECS, SUBSCRIPTIONS

    return RedisBroker.from_url(redis_url(fresh_prefix(request)), SPECS, SUBSCRIPTIONS)


def redis_ledger(request: pytest.FixtureRequest, tmp_path: Path) -> Ledger:
    """An empty ledger: a fresh prefix, namespace ``test``."""
    from sluiceway.ledgers.redis import RedisLedger

    return RedisLedger.from_url(redis_url(fresh_prefix(request)), "test")


def redis_pipeline_broker(request: pytest.FixtureRequest, pipeline: str) -> Broker:
    """The contract suite's broker for pipeline ``pipeline``, on the default prefix."""
    from sluiceway.queues.redis import DEFAULT_PREFIX, RedisBroker

    from .contract.test_queues import SPECS, SUBSCRIPTIONS

    require_redis()
    request.addfinalizer(lambda: delete_keys(f"{DEFAULT_PREFIX}:{pipeline}"))
    return RedisBroker.from_url(REDIS_URL, SPECS, SUBSCRIPTIONS, pipeline=pipeline)
