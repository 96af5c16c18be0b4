"""RabbitMQ for the tests: a broker under a fresh name prefix per test, deleted afterwards.

The queue contract suite gets :func:`rabbitmq_broker` through ``BACKENDS``;
the RabbitMQ tests use :func:`make_broker` and :func:`profile_url` directly.
Every test gets its own prefix (``sw.test.<random>``), so tests never see
each other's queues, and everything the prefix created is deleted at the end.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from sluiceway.queues.base import Broker, QueueSpec

from .services import RABBITMQ_URL, fresh_prefix, require_url, with_prefix

PASSWORD_VARIABLE = "SLUICEWAY_TEST_AMQP_PASSWORD"


def require_rabbitmq() -> None:
    require_url(
        "RabbitMQ",
        RABBITMQ_URL,
        5672,
        "Start it (apt install rabbitmq-server) or set SLUICEWAY_TEST_RABBITMQ.",
    )


def url_with_prefix(prefix: str, base: str = RABBITMQ_URL) -> str:
    return with_prefix(base, prefix)


def make_broker(
    request: pytest.FixtureRequest,
    specs: Mapping[str, QueueSpec],
    subscriptions: Mapping[str, Sequence[str]] | None = None,
    prefix: str | None = None,
) -> Broker:
    """A RabbitBroker under a fresh prefix; its queues are deleted when the test ends."""
    from sluiceway.queues.rabbitmq import RabbitBroker

    require_rabbitmq()
    broker = RabbitBroker.from_url(url_with_prefix(prefix or fresh_prefix()), specs, subscriptions)
    request.addfinalizer(broker.destroy)
    return broker


def rabbitmq_broker(request: pytest.FixtureRequest, tmp_path: Path) -> Broker:
    """The contract suite's factory: its SPECS and SUBSCRIPTIONS on a fresh prefix."""
    module = request.module
    return make_broker(request, module.SPECS, module.SUBSCRIPTIONS)


def profile_url(prefix: str, monkeypatch: pytest.MonkeyPatch) -> str:
    """The broker URL for a pipeline file's profile: the password from the environment.

    A pipeline file may not hold a password, so it says ``${VAR}`` and the
    variable (inherited by worker processes) holds the test server's.
    """
    parts = urlsplit(RABBITMQ_URL)
    if parts.password is not None:
        monkeypatch.setenv(PASSWORD_VARIABLE, parts.password)
        netloc = parts.netloc.replace(f":{parts.password}@", f":${{{PASSWORD_VARIABLE}}}@")
        base = parts._replace(netloc=netloc).geturl()
    else:
        base = RABBITMQ_URL
    return url_with_prefix(prefix, base)


def rabbitmq_pipeline_broker(request: pytest.FixtureRequest, pipeline: str) -> Broker:
    """The contract suite's broker for pipeline ``pipeline``, on the default prefix."""
    from sluiceway.queues.rabbitmq import RabbitBroker

    from .contract.test_queues import SPECS, SUBSCRIPTIONS

    require_rabbitmq()
    broker = RabbitBroker.from_url(RABBITMQ_URL, SPECS, SUBSCRIPTIONS, pipeline=pipeline)
    request.addfinalizer(broker.destroy)
    return broker
