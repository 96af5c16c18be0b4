"""Figure 3: the embedded SQLite queue, send → receive → ack.

One cycle sends a batch (100 messages, or 1), receives it and acks it; its
duration is the round trip, and messages/s is messages over the summed
cycles. The body is a real "Object Created" event (about 500 bytes). The
baselines do the same cycle by hand: raw ``sqlite3`` on Sluiceway's own
schema (insert; select + hide with a receipt; delete), and Redis Streams
(XADD; XREADGROUP; XACK + XDEL) on 127.0.0.1:6379 when a server is there.
"""

from __future__ import annotations

import shutil
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .harness import Profile, Section, Stats, fresh_dir, percentile, profile, run_child

if TYPE_CHECKING:
    from .__main__ import Context

BATCH = 100
TARGET = 50_000  # messages/s, batched
REDIS = ("127.0.0.1", 6379)
Cycle = Callable[[list[str]], None]


def _body() -> str:
    from sluiceway.events import object_created

    event = object_created(
        "bronze", "incoming/customers_2026-11-20.csv", size=9_812, etag="0" * 32, sequencer="0" * 20
    )
    return event.to_json()


def _time_cycles(cycle: Cycle, batch: int, total: int) -> dict[str, Any]:
    bodies = [_body()] * batch
    for _ in range(20):  # warm caches, statements and the WAL
        cycle(bodies)
    durations = []
    for _ in range(total // batch):
        started = time.perf_counter()
        cycle(bodies)
        durations.append(time.perf_counter() - started)
    return {"rate": total / sum(durations), "durations": durations}


# -- the three queues, each run in a child process ---------------------------------


def sluiceway_cycle(work: str) -> Cycle:
    from sluiceway.queues.base import OutgoingMessage, QueueSpec
    from sluiceway.queues.sqlite import SqliteBroker
    from sluiceway.state import StateDB

    broker = SqliteBroker(StateDB(Path(work) / "state.db"), {"q": QueueSpec("q")})
    queue = broker.queue("q")

    def cycle(bodies: list[str]) -> None:
        queue.send_batch([OutgoingMessage(b) for b in bodies])
        got = []
        while len(got) < len(bodies):
            got += queue.receive(len(bodies) - len(got))
        queue.ack(got)

    return cycle


def sqlite_cycle(work: str) -> Cycle:
    import sqlite3

    from sluiceway.state import SCHEMA

    conn = sqlite3.connect(Path(work) / "raw.db", isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=NORMAL")
    conn.executescript(SCHEMA)
    counter = iter(range(1 << 62))

    def cycle(bodies: list[str]) -> None:
        now = time.time()
        conn.execute("BEGIN IMMEDIATE")
        conn.executemany(
            "INSERT INTO messages (id, queue, body, sent_at, visible_at) VALUES (?, 'q', ?, ?, ?)",
            [(str(next(counter)), b, now, now) for b in bodies],
        )
        conn.execute("COMMIT")
        receipt = uuid.uuid4().hex
        conn.execute("BEGIN IMMEDIATE")
        rows = conn.execute(
            "SELECT seq, body FROM messages WHERE queue = 'q' AND visible_at <= ?"
            " ORDER BY visible_at, seq LIMIT ?",
            (now, len(bodies)),
        ).fetchall()
        conn.executemany(
            "UPDATE messages SET visible_at = ?, receipt = ?, receive_count = receive_count + 1"
            " WHERE seq = ?",
            [(now + 60, receipt, seq) for seq, _ in rows],
        )
        conn.execute("COMMIT")
        conn.execute("BEGIN IMMEDIATE")
        conn.executemany(
            "DELETE FROM messages WHERE seq = ? AND receipt = ?", [(s, receipt) for s, _ in rows]
        )
        conn.execute("COMMIT")

    return cycle


def redis_cycle(work: str) -> Cycle:
    import redis

    r = redis.Redis(*REDIS, socket_connect_timeout=2)
    stream = f"sluiceway-bench-{uuid.uuid4().hex}"
    r.xgroup_create(stream, "g", id="0", mkstream=True)

    def cycle(bodies: list[str]) -> None:
        pipe = r.pipeline(transaction=False)
        for b in bodies:
            pipe.xadd(stream, {"body": b})
        pipe.execute()
        ids: list[bytes] = []
        while len(ids) < len(bodies):
            got = r.xreadgroup("g", "c", {stream: ">"}, count=len(bodies) - len(ids))
            ids += [mid for _, entries in got for mid, _ in entries]
        pipe = r.pipeline(transaction=False)
        pipe.xack(stream, "g", *ids)
        pipe.xdel(stream, *ids)
        pipe.execute()

    cycle.stream = stream  # type: ignore[attr-defined]
    return cycle


KINDS: dict[str, Callable[[str], Cycle]] = {
    "Sluiceway SqliteBroker": sluiceway_cycle,
    "raw sqlite3 loop": sqlite_cycle,
    "Redis Streams (redis-py)": redis_cycle,
}


def measure(kinds: list[str], runs: int, batched: int, single: int, work: str) -> dict[str, Any]:
    """Per queue and mode, ``runs`` results; the queues take turns, each run on a fresh
    database or stream."""
    out: dict[str, dict[str, list[Any]]] = {k: {"batched": [], "single": []} for k in kinds}
    for run in range(runs):
        for kind in kinds:
            for mode, batch, total in (("batched", BATCH, batched), ("single", 1, single)):
                folder = Path(work) / f"{kind}-{mode}-{run}"
                folder.mkdir(parents=True)
                cycle = KINDS[kind](str(folder))
                try:
                    out[kind][mode].append(_time_cycles(cycle, batch, total))
                finally:
                    if hasattr(cycle, "stream"):
                        import redis

                        redis.Redis(*REDIS).delete(cycle.stream)
    return out


def profile_batched(total: int, work: str) -> dict[str, Any]:
    cycle = sluiceway_cycle(work)
    bodies = [_body()] * BATCH
    return profile(lambda: [cycle(bodies) for _ in range(total // BATCH)])


def redis_available() -> str | None:
    """None if Redis answers on 127.0.0.1:6379, else why not."""
    try:
        import redis
    except ImportError:
        return "redis-py is not installed (pip install -e '.[bench]')"
    try:
        redis.Redis(*REDIS, socket_connect_timeout=1).ping()
    except Exception as e:
        return f"no Redis server reachable on {REDIS[0]}:{REDIS[1]} ({type(e).__name__})"
    return None


# -- reporting --------------------------------------------------------------------------


def run(ctx: Context) -> Section:
    batched, single = (6_000, 600) if ctx.quick else (100_000, 10_000)
    section = Section("3. Queue: send → receive → ack")
    kinds = list(KINDS)
    why_no_redis = redis_available()
    if why_no_redis:
        kinds.remove("Redis Streams (redis-py)")
    work = fresh_dir("queue")
    try:
        results = run_child(
            "bench.fig_queue:measure",
            kinds=kinds,
            runs=ctx.runs,
            batched=batched,
            single=single,
            work=str(work),
        ).result
    finally:
        shutil.rmtree(work, ignore_errors=True)
    section.add(
        f"{ctx.runs} runs per queue and mode, the queues taking turns, each run on a fresh "
        "database or stream: "
        f"{batched:,} messages in batches of {BATCH}, and {single:,} one at a time. A cycle "
        "is send → receive → ack of one batch (or one message) on an otherwise empty queue, "
        "so its duration is the uncontended round trip. Ratio: messages/s ÷ the raw sqlite3 "
        "loop's.",
        "",
    )
    rows = []
    for mode in ("batched", "single"):
        base = Stats.of([r["rate"] for r in results["raw sqlite3 loop"][mode]]).median
        for kind in kinds:
            runs = results[kind][mode]
            rate = Stats.of([r["rate"] for r in runs])
            durations = [d for r in runs for d in r["durations"]]
            per = BATCH if mode == "batched" else 1
            rows.append(
                [
                    f"{kind}, {mode}",
                    rate.fmt(0),
                    rate.range(0),
                    f"{rate.median / base:.2f}×",
                    f"{percentile(durations, 50) * 1e3:.2f} ms",
                    f"{percentile(durations, 99) * 1e3:.2f} ms",
                    f"{percentile(durations, 50) / per * 1e6:.1f} µs",
                ]
            )
    section.table(
        [
            "queue, mode",
            "msgs/s",
            "range",
            "× raw sqlite3",
            "round trip p50",
            "p99",
            "per message (p50)",
        ],
        rows,
    )
    if why_no_redis:
        section.add(f"Redis Streams: not measured: {why_no_redis}.", "")
    sw = Stats.of([r["rate"] for r in results["Sluiceway SqliteBroker"]["batched"]])
    met = sw.median >= TARGET
    section.target(
        "queue: embedded SQLite, batched", f"{sw.median:,.0f} msgs/s", f"≥ {TARGET:,}", met
    )
    if not met:
        work = fresh_dir("queue-profile")
        try:
            raw = run_child("bench.fig_queue:profile_batched", total=batched, work=str(work)).result
        finally:
            shutil.rmtree(work, ignore_errors=True)
        prof = Profile.of(raw)
        execs, exec_s = prof.own("'execute' of 'sqlite3")
        many, many_s = prof.own("'executemany' of 'sqlite3")
        uuid_s = prof.own("uuid.py", "posix.urandom")[1]
        json_s = prof.own("json/", "_json.")[1]
        per_row = " (one statement per message)" if execs >= 0.9 * batched else ""
        section.add(
            "### Where the time goes",
            "",
            f"The batched cycle of SqliteBroker, {batched:,} messages, in one process. Reading: "
            f"{execs:,} `execute` calls{per_row}, {exec_s:.2f} s, against {many:,} "
            f"`executemany`, {many_s:.2f} s; UUIDs {uuid_s:.2f} s and JSON {json_s:.2f} s of own "
            f"time, of {prof.total:.2f} s in all. The raw loop runs three `executemany`/`execute`"
            " per batch and makes one receipt per batch.",
            "",
            prof.table(),
        )
    from .fig_brokers import extend

    extend(ctx, section)
    return section
