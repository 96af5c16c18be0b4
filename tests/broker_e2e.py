"""The bronze → staging run with worker processes on a broker profile, for every broker.

The RabbitMQ and NATS suites (and any broker that joins them) run the same
end-to-end check: :func:`mq_pipeline` writes the pipeline with a profile
``mq`` on the broker URL and removes the broker's queues afterwards;
:func:`check_bronze_to_staging` runs it with worker processes and checks that
every file was converted exactly once.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from sluiceway import Pipeline, Runtime
from sluiceway.queues.base import QueueCounts

from .conftest import BRONZE_TO_STAGING
from .helpers import make_csv, parquet_rows, wait_until


def mq_pipeline(
    write_pipeline: Callable[..., Path],
    monkeypatch: pytest.MonkeyPatch,
    request: pytest.FixtureRequest,
    url: str,
) -> Path:
    """BRONZE_TO_STAGING with a profile "mq" whose broker is ``url``, destroyed at the end."""
    path = write_pipeline(BRONZE_TO_STAGING + f'profiles:\n  mq:\n    broker: "{url}"\n')
    monkeypatch.setenv("SLUICEWAY_PROFILE", "mq")  # restored afterwards; Runtime sets it too

    def remove() -> None:
        p = Pipeline.from_file(path, profile="mq")
        p.broker.destroy()  # type: ignore[attr-defined]
        p.broker.close()

    request.addfinalizer(remove)
    return path


def check_bronze_to_staging(
    path: Path, tmp_path: Path, port: int, workers: int, files: int, rows: int
) -> None:
    """Run ``files`` CSVs through ``workers`` processes; each converted once, by several workers."""
    expected = {
        f"in{i}": make_csv(tmp_path / "bronze" / f"in{i}.csv", rows, seed=i) for i in range(files)
    }  # there before the start: the reconcile raises their events
    rt = Runtime(path, workers=workers, watch=False, profile="mq")
    offer_files_once_workers_poll(rt, port)
    try:
        summary = rt.drain(timeout=60)
        p = rt.pipeline
        assert summary.done == files and summary.failed == 0 and summary.dead_lettered == 0
        assert summary.rows_in == summary.rows_out == files * rows
        for stem, records in expected.items():
            assert parquet_rows(tmp_path / "staging" / f"{stem}.parquet") == records
        entries = [e for e in p.ledger.entries_since(0) if e.key.startswith("csv-to-parquet|")]
        assert len(entries) == files and {e.status for e in entries} == {"done"}
        # Exactly once: every input done on its first receive, nothing redone.
        assert [e.info["attempt"] for e in entries] == [1] * files
        assert p.pending() == 0
        assert p.broker.queue("to-parquet-dlq").counts() == QueueCounts(0, 0, 0)
        if workers == 4:
            by_worker = {e.info["worker"] for e in entries}
            assert len(by_worker) >= 3, f"the work was not shared: {by_worker}"
    finally:
        rt.pipeline.broker.close()


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
