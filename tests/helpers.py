"""Small helpers shared by the end-to-end tests."""

from __future__ import annotations

import csv
import io
import multiprocessing as mp
import queue
import random
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq


def wait_until(predicate: Callable[[], bool], timeout: float = 30.0, what: str = "") -> None:
    """Poll with a deadline; fail with a message instead of hanging."""
    deadline = time.monotonic() + timeout
    pause = 0.01
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what or predicate}")
        time.sleep(pause)
        pause = min(pause * 2, 0.2)


def consumer_reports(
    target: Callable[..., None],
    args: Callable[[int], tuple[Any, ...]],
    preload: Sequence[str],
    send: Callable[[], None],
    failure: Callable[[Any], str | None],
    count: int = 4,
    timeout: float = 60.0,
) -> list[Any]:
    """Run ``count`` consumer processes on one queue; the report each puts on its results.

    Process ``i`` runs ``target(*args(i), results, ready, go)``: it releases
    ``ready`` once connected and waits for ``go``, so every one is there before
    ``send`` queues the messages and each gets a share. A forkserver that
    imports ``preload`` once: spawned children would each import all of
    sluiceway (pyarrow included), seconds on a busy machine. ``failure(report)``
    is the error a report carries, or None.
    """
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(list(preload))
    results, ready, go = ctx.Queue(), ctx.Semaphore(0), ctx.Event()
    procs = [ctx.Process(target=target, args=(*args(i), results, ready, go)) for i in range(count)]
    for p in procs:
        p.start()
    for _ in procs:
        assert ready.acquire(timeout=30), "a worker process did not start"
    send()
    go.set()
    reports: list[Any] = []
    deadline = time.monotonic() + timeout
    while len(reports) < len(procs):
        try:
            report = results.get(timeout=1)
        except queue.Empty:
            dead = [p.exitcode for p in procs if p.exitcode not in (None, 0)]
            assert not dead, f"a worker process died (exit codes {dead}) without reporting"
            assert time.monotonic() < deadline, f"the workers did not finish within {timeout:g}s"
            continue
        error = failure(report)
        assert error is None, error
        reports.append(report)
    for p in procs:
        p.join(10)
    return reports


def make_csv(path: Path, rows: int, seed: int = 0) -> list[dict[str, str]]:
    """A CSV with awkward but valid content; returns the rows as strings."""
    rng = random.Random(seed)
    records = [
        {
            "id": str(i),
            "name": rng.choice(["Ana", "Zoë", 'Bob "B"', "Li, Wei", "Ola\nNordmann"]),
            "country": rng.choice(["DE", "FR", "NL"]),
            "amount": f"{rng.uniform(0, 1000):.2f}",
        }
        for i in range(rows)
    ]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=["id", "name", "country", "amount"])
    w.writeheader()
    w.writerows(records)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(buf.getvalue(), encoding="utf-8")
    return records


def parquet_rows(path: Path) -> list[dict[str, str]]:
    """The Parquet file's rows with every value as the string the CSV had."""
    table = pq.read_table(path)
    out = []
    for row in table.to_pylist():
        out.append(
            {
                k: (f"{v:.2f}" if isinstance(v, float) else str(v)) if v is not None else ""
                for k, v in row.items()
            }
        )
    return out
