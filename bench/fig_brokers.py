"""Figure 3, continued: the network brokers, send → receive → ack, against their raw clients.

Each Sluiceway broker (Redis Streams, RabbitMQ, NATS JetStream on 127.0.0.1;
SQS on a ``moto_server`` the bench starts on loopback) runs the same cycle as
figure 3 through the ``Queue`` interface, against its raw client doing the
equivalent by hand:

- Redis: redis-py ``XADD`` (pipelined) / ``XREADGROUP`` / ``XACK`` + ``XDEL``;
- RabbitMQ: pika ``basic_publish`` with publisher confirms / ``basic_get`` /
  ``basic_ack``;
- NATS: nats-py ``js.publish`` (each awaits its ack, a batch concurrently) /
  pull ``fetch`` / ``ack``;
- SQS: boto3 ``send_message_batch`` / ``receive_message`` /
  ``delete_message_batch`` (10 per call, the SQS limit).

A broker whose service does not answer is skipped with the reason.
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
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .fig_queue import BATCH, REDIS, Cycle, _body, redis_cycle
from .harness import Section, Stats, percentile, run_child

if TYPE_CHECKING:
    from .__main__ import Context

RABBIT = ("127.0.0.1", 5672)
NATS = ("127.0.0.1", 4222)
RABBIT_URL = "amqp://guest:guest@127.0.0.1:5672/"
NATS_URL = "nats://127.0.0.1:4222"
REGION = "us-east-1"
BROKERS = ["Redis Streams", "RabbitMQ", "NATS JetStream", "SQS (moto_server)"]
WARM_CYCLES = 1
# The slower brokers get fewer messages, so that quick mode stays quick.
SCALE = {"RabbitMQ": 0.6, "SQS (moto_server)": 0.4}


def _url(broker: str, endpoint: str, prefix: str) -> str:
    if broker == "Redis Streams":
        return f"redis://{REDIS[0]}:{REDIS[1]}/15?prefix={prefix}-"
    if broker == "RabbitMQ":
        return f"{RABBIT_URL}?prefix=sw.bench.{prefix}"
    if broker == "NATS JetStream":
        return f"{NATS_URL}?prefix=sw.bench.{prefix}"
    return f"sqs://?endpoint_url={endpoint}&region={REGION}&prefix={prefix}-"


# -- Sluiceway's brokers ---------------------------------------------------------------


def sluiceway_cycle(broker_name: str, endpoint: str) -> tuple[Cycle, Callable[[], None]]:
    from sluiceway.queues.base import OutgoingMessage, QueueSpec
    from sluiceway.queues.nats import NatsBroker
    from sluiceway.queues.rabbitmq import RabbitBroker
    from sluiceway.queues.redis import RedisBroker
    from sluiceway.queues.sqs import SqsBroker

    kinds: dict[str, Any] = {
        "Redis Streams": RedisBroker,
        "RabbitMQ": RabbitBroker,
        "NATS JetStream": NatsBroker,
        "SQS (moto_server)": SqsBroker,
    }
    prefix = f"b{uuid.uuid4().hex[:8]}"
    url = _url(broker_name, endpoint, prefix)
    broker = kinds[broker_name].from_url(url, {"q": QueueSpec("q")}, {})
    queue = broker.queue("q")

    def cycle(bodies: list[str]) -> None:
        queue.send_batch([OutgoingMessage(b) for b in bodies])
        got: list[Any] = []
        while len(got) < len(bodies):
            got += queue.receive(min(len(bodies) - len(got), 100), wait=1.0)
        queue.ack(got)

    def cleanup() -> None:
        if broker_name == "Redis Streams":
            from sluiceway.queues.redis import delete_prefix

            with contextlib.suppress(Exception):
                delete_prefix(broker.conn.client, f"{prefix}-")  # type: ignore[attr-defined]
        if hasattr(broker, "destroy"):
            with contextlib.suppress(Exception):
                broker.destroy()
        with contextlib.suppress(Exception):
            broker.close()

    return cycle, cleanup


# -- the raw clients -------------------------------------------------------------------


def raw_redis(endpoint: str) -> tuple[Cycle, Callable[[], None]]:
    import redis

    cycle = redis_cycle("")
    return cycle, lambda: redis.Redis(*REDIS).delete(cycle.stream)  # type: ignore[attr-defined]


def raw_rabbit(endpoint: str) -> tuple[Cycle, Callable[[], None]]:
    import pika

    conn = pika.BlockingConnection(pika.URLParameters(RABBIT_URL))
    ch = conn.channel()
    ch.confirm_delivery()
    name = f"sw.bench.raw.{uuid.uuid4().hex[:8]}"
    ch.queue_declare(name, durable=True)
    props = pika.BasicProperties(delivery_mode=2, content_type="application/json")

    def cycle(bodies: list[str]) -> None:
        for b in bodies:
            ch.basic_publish("", name, b.encode(), props)  # returns once confirmed
        got = 0
        last = 0
        while got < len(bodies):
            method, _, _ = ch.basic_get(name, auto_ack=False)
            if method is None:
                continue
            got += 1
            last = method.delivery_tag
        ch.basic_ack(last, multiple=True)

    def cleanup() -> None:
        with contextlib.suppress(Exception):
            ch.queue_delete(name)
            conn.close()

    return cycle, cleanup


def raw_nats(endpoint: str) -> tuple[Cycle, Callable[[], None]]:
    import asyncio

    import nats

    loop = asyncio.new_event_loop()
    name = f"swbenchraw{uuid.uuid4().hex[:8]}"
    subject = f"{name}.q"

    async def setup() -> Any:
        nc = await nats.connect(NATS_URL)
        js = nc.jetstream()
        await js.add_stream(name=name, subjects=[subject])
        sub = await js.pull_subscribe(subject, durable="c", stream=name)
        return nc, js, sub

    nc, js, sub = loop.run_until_complete(setup())

    async def acycle(bodies: list[str]) -> None:
        await asyncio.gather(*[js.publish(subject, b.encode()) for b in bodies])
        got = 0
        while got < len(bodies):
            msgs = await sub.fetch(len(bodies) - got, timeout=1)
            for m in msgs:
                await m.ack()
            got += len(msgs)

    def cycle(bodies: list[str]) -> None:
        loop.run_until_complete(acycle(bodies))

    def cleanup() -> None:
        async def down() -> None:
            with contextlib.suppress(Exception):
                await js.delete_stream(name)
            await nc.close()

        with contextlib.suppress(Exception):
            loop.run_until_complete(down())
        loop.close()

    return cycle, cleanup


def raw_sqs(endpoint: str) -> tuple[Cycle, Callable[[], None]]:
    import boto3

    sqs = boto3.client(
        "sqs",
        endpoint_url=endpoint,
        region_name=REGION,
        aws_access_key_id="bench",
        aws_secret_access_key="bench",
    )
    url = sqs.create_queue(QueueName=f"raw{uuid.uuid4().hex[:8]}")["QueueUrl"]

    def cycle(bodies: list[str]) -> None:
        for i in range(0, len(bodies), 10):
            entries = [{"Id": str(j), "MessageBody": b} for j, b in enumerate(bodies[i : i + 10])]
            sqs.send_message_batch(QueueUrl=url, Entries=entries)
        handles: list[str] = []
        while len(handles) < len(bodies):
            got = sqs.receive_message(
                QueueUrl=url, MaxNumberOfMessages=min(10, len(bodies) - len(handles))
            )
            handles += [m["ReceiptHandle"] for m in got.get("Messages", [])]
        for i in range(0, len(handles), 10):
            entries = [
                {"Id": str(j), "ReceiptHandle": h} for j, h in enumerate(handles[i : i + 10])
            ]
            sqs.delete_message_batch(QueueUrl=url, Entries=entries)

    return cycle, lambda: sqs.delete_queue(QueueUrl=url)


RAW = {
    "Redis Streams": ("redis-py XADD / XREADGROUP / XACK", raw_redis),
    "RabbitMQ": ("pika publish (confirms) / basic_get / ack", raw_rabbit),
    "NATS JetStream": ("nats-py js.publish / fetch / ack", raw_nats),
    "SQS (moto_server)": ("boto3 send/receive/delete batch", raw_sqs),
}


def _time(cycle: Cycle, batch: int, total: int) -> dict[str, Any]:
    bodies = [_body()] * batch
    for _ in range(WARM_CYCLES):
        cycle(bodies)
    durations = []
    for _ in range(max(1, total // batch)):
        started = time.perf_counter()
        cycle(bodies)
        durations.append(time.perf_counter() - started)
    return {"rate": batch * len(durations) / sum(durations), "durations": durations}


def measure(
    brokers: list[str], runs: int, batched: int, single: int, endpoint: str
) -> dict[str, Any]:
    """Per broker, contender and mode, ``runs`` results; contenders take turns run by run."""
    if endpoint:  # moto accepts any key; these are placeholders, not credentials
        os.environ.setdefault("AWS_ACCESS_KEY_ID", "bench")
        os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "bench")
    out: dict[str, Any] = {}
    for _ in range(runs):
        for broker in brokers:
            scale = SCALE.get(broker, 1.0)
            for mode, batch, total in (
                ("batched", BATCH, int(batched * scale)),
                ("single", 1, int(single * scale)),
            ):
                for who in ("sluiceway", "raw"):
                    if who == "sluiceway":
                        cycle, cleanup = sluiceway_cycle(broker, endpoint)
                    else:
                        cycle, cleanup = RAW[broker][1](endpoint)
                    try:
                        got = _time(cycle, batch, total)
                    finally:
                        cleanup()
                    out.setdefault(broker, {}).setdefault(who, {}).setdefault(mode, []).append(got)
    return out


# -- services ----------------------------------------------------------------------------


def _port_open(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1):
            return True
    except OSError:
        return False


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def moto_server() -> Iterator[str | None]:
    """A ``moto_server`` on a free loopback port (None if it is not installed)."""
    exe = shutil.which("moto_server", path=str(Path(sys.executable).parent))
    if exe is None:
        yield None
        return
    port = _free_port()
    proc = subprocess.Popen(
        [exe, "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                with urllib.request.urlopen(f"{url}/moto-api/", timeout=1):
                    break
            except OSError:
                time.sleep(0.1)
        else:
            yield None
            return
        yield url
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)


def reachable() -> tuple[list[str], dict[str, str]]:
    ok, why = [], {}
    for broker, (host, port) in (
        ("Redis Streams", REDIS),
        ("RabbitMQ", RABBIT),
        ("NATS JetStream", NATS),
    ):
        if _port_open(host, port):
            ok.append(broker)
        else:
            why[broker] = f"no server listening on {host}:{port}"
    return ok, why


# -- reporting ---------------------------------------------------------------------------


def extend(ctx: Context, section: Section) -> None:
    batched, single = (500, 50) if ctx.quick else (20_000, 2_000)
    brokers, why = reachable()
    with moto_server() as endpoint:
        if endpoint is None:
            why["SQS (moto_server)"] = "moto_server (moto[server]) is missing or did not start"
        else:
            brokers.append("SQS (moto_server)")
        results: dict[str, Any] = {}
        if brokers:
            results = run_child(
                "bench.fig_brokers:measure",
                brokers=brokers,
                runs=ctx.runs,
                batched=batched,
                single=single,
                endpoint=endpoint or "",
                timeout=1800,
            ).result
    section.add(
        "### Network brokers against their raw clients",
        "",
        f"{ctx.runs} runs per broker, contender and mode, taking turns, each on a fresh queue "
        f"or stream: {batched:,} messages in batches of {BATCH}, and {single:,} one at a time "
        f"({WARM_CYCLES} warm-up cycle first; RabbitMQ gets {SCALE['RabbitMQ']:.0%} and SQS "
        f"{SCALE['SQS (moto_server)']:.0%} of those counts, being much slower). Redis, "
        "RabbitMQ and NATS on 127.0.0.1; SQS "
        "on a `moto_server` started by the bench on loopback (an emulator: its numbers say "
        "what the client side costs, not what AWS does). Ratio: messages/s ÷ the raw "
        "client's on the same broker in the same run.",
        "",
    )
    rows = []
    for broker in brokers:
        for mode in ("batched", "single"):
            base = Stats.of([r["rate"] for r in results[broker]["raw"][mode]]).median
            per = BATCH if mode == "batched" else 1
            for who, label in (("sluiceway", "Sluiceway"), ("raw", RAW[broker][0])):
                runs = results[broker][who][mode]
                rate = Stats.of([r["rate"] for r in runs])
                durations = [d for r in runs for d in r["durations"]]
                rows.append(
                    [
                        f"{broker}: {label}, {mode}",
                        rate.fmt(0),
                        rate.range(0),
                        f"{rate.median / base:.2f}×",
                        f"{percentile(durations, 50) * 1e3:.2f} ms",
                        f"{percentile(durations, 99) * 1e3:.2f} ms",
                        f"{percentile(durations, 50) / per * 1e6:.1f} µs",
                    ]
                )
    if rows:
        section.table(
            [
                "broker: contender, mode",
                "msgs/s",
                "range",
                "× raw client",
                "round trip p50",
                "p99",
                "per message (p50)",
            ],
            rows,
        )
    for broker, reason in why.items():
        section.add(f"{broker}: not measured: {reason}.", "")
