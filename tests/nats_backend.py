"""NATS JetStream for the tests: a broker under a fresh prefix per test, deleted afterwards.

The queue contract suite gets :func:`nats_broker` through ``BACKENDS``; the
NATS tests use :func:`make_broker` and :func:`url_with_prefix` directly.
Every test gets its own prefix, hence its own stream (``sw_test_<random>…``),
deleted with its consumers when the test ends.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import pytest

from sluiceway.queues.base import Broker, QueueSpec

from .services import NATS_URL, fresh_prefix, require_url, with_prefix


def require_nats() -> None:
    require_url(
        "NATS",
        NATS_URL,
        4222,
        "Start it with JetStream (nats-server -js) or set SLUICEWAY_TEST_NATS.",
    )


def url_with_prefix(prefix: str, base: str = NATS_URL) -> str:
    return with_prefix(base, prefix)


def make_broker(
    request: pytest.FixtureRequest,
    specs: Mapping[str, QueueSpec],
    subscriptions: Mapping[str, Sequence[str]] | None = None,
    prefix: str | None = None,
) -> Broker:
    """A NatsBroker under a fresh prefix; its stream is deleted when the test ends."""
    from sluiceway.queues.nats import NatsBroker

    require_nats()
    broker = NatsBroker.from_url(url_with_prefix(prefix or fresh_prefix()), specs, subscriptions)
    request.addfinalizer(broker.destroy)
    return broker


def nats_broker(request: pytest.FixtureRequest, tmp_path: Path) -> Broker:
    """The contract suite's factory: its SPECS and SUBSCRIPTIONS on a fresh prefix."""
    module = request.module
    return make_broker(request, module.SPECS, module.SUBSCRIPTIONS)


def nats_pipeline_broker(request: pytest.FixtureRequest, pipeline: str) -> Broker:
    """The contract suite's broker for pipeline ``pipeline``, on the default prefix."""
    from sluiceway.queues.nats import NatsBroker

    from .contract.test_queues import SPECS, SUBSCRIPTIONS

    require_nats()
    broker = NatsBroker.from_url(NATS_URL, SPECS, SUBSCRIPTIONS, pipeline=pipeline)
    request.addfinalizer(broker.destroy)
    return broker
