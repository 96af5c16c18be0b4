"""RabbitMQ for the tests: a broker under a fresh name prefix per test, deleted afterwards.

The queue contract suite gets :func:`rabbitmq_broker` through ``BACKENDS``;
the RabbitMQ tests use :func:`make_broker` and :func:`profile_url` directly,
and the end-to-end tests of both brokers :func:`offer_files_once_workers_poll`.
Every test gets its own prefix (``sw.test.<random>``), so tests never see
each other's queues, and everything the prefix created is deleted at the end.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from sluiceway import Runtime
from sluiceway.queues.base import Broker, QueueSpec

from .helpers import wait_until
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


def connections_to(pid: int, port: int) -> int:
    """How many established TCP connections process ``pid`` has to ``port`` (Linux /proc)."""
    inodes: set[str] = set()
    try:
        for fd in os.listdir(f"/proc/{pid}/fd"):
            with contextlib.suppress(OSError):
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
                if target.startswith("socket:["):
                    inodes.add(target[8:-1])
        n = 0
        for table in ("tcp", "tcp6"):
            with open(f"/proc/{pid}/net/{table}") as f:
                next(f)
                for line in f:
                    cols = line.split()
                    remote_port = int(cols[2].rsplit(":", 1)[1], 16)
                    if remote_port == port and cols[3] == "01" and cols[9] in inodes:
                        n += 1
        return n
    except OSError:
        return 0


def offer_files_once_workers_poll(runtime: Runtime, port: int) -> None:
    """Make ``runtime`` raise the files' events only once every worker is connected.

    Spawned workers start one after another (imports take a while, more so
    on a loaded machine), and the first one up could finish a small batch
    alone. The files are there before the start either way; the reconcile
    that the runtime would run before spawning runs right after instead, once
    each worker holds its broker connection (it connects on its first poll).
    """
    runtime.reconcile = False
    start = runtime.start

    def start_then_reconcile() -> None:
        start()
        procs = runtime._procs
        if os.path.isdir("/proc/self/fd"):
            wait_until(
                lambda: all(p.pid and connections_to(p.pid, port) for p in procs),
                timeout=45,
                what="every worker connected to the broker",
            )
        else:  # no /proc: give the workers a moment instead
            time.sleep(5)
        runtime.pipeline.reconcile()

    runtime.start = start_then_reconcile  # type: ignore[method-assign]


def rabbitmq_pipeline_broker(request: pytest.FixtureRequest, pipeline: str) -> Broker:
    """The contract suite's broker for pipeline ``pipeline``, on the default prefix."""
    from sluiceway.queues.rabbitmq import RabbitBroker

    from .contract.test_queues import SPECS, SUBSCRIPTIONS

    require_rabbitmq()
    broker = RabbitBroker.from_url(RABBITMQ_URL, SPECS, SUBSCRIPTIONS, pipeline=pipeline)
    request.addfinalizer(broker.destroy)
    return broker
