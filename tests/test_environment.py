"""Environmental faults: a full disk, a locked state database, scaling out workers."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from sluiceway import Pipeline
from sluiceway.state import StateLocked

from .conftest import BRONZE_TO_STAGING, REQUIRE_SERVICES
from .helpers import make_csv, parquet_rows, wait_until
from .test_pipeline_e2e import drain_inline


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 512 KiB tmpfs: a real ENOSPC, not a mock (needs root to mount)."""
    mount = tmp_path / "small"
    mount.mkdir()
    proc = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=512k", "tmpfs", str(mount)],
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0:
        msg = f"cannot mount a tmpfs here ({proc.stderr.strip()}); disk-full test needs root"
        if REQUIRE_SERVICES:
            pytest.fail(msg)
        pytest.skip(msg)
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def test_disk_full_on_write_retries_and_leaves_nothing_half_written(
    write_pipeline: Callable[..., Path], tmp_path: Path, small_disk: Path
) -> None:
    text = BRONZE_TO_STAGING.replace("staging: ./staging", f"staging: {small_disk}/staging")
    text = text.replace("max_receive_count: 3", "max_receive_count: 50")
    p = Pipeline.from_file(write_pipeline(text))
    filler = small_disk / "filler"
    filler.write_bytes(b"\0" * (480 * 1024))
    records = make_csv(tmp_path / "big.csv", 20000)
    p.put(tmp_path / "big.csv", "bronze", "big.csv")
    statuses = drain_inline_some(p, rounds=5)
    assert statuses and set(statuses) == {"retry"}, statuses
    failure = p.broker.queue("to-parquet").peek()[0].failure
    assert failure is not None and "No space left on device" in failure["message"]
    staging = small_disk / "staging"
    assert list(p.buckets["staging"].list()) == []  # nothing half-written is visible
    assert not any((staging / ".sluiceway-tmp").glob("*.tmp"))  # and nothing left aside
    filler.unlink()  # space comes back: the next retry succeeds
    drain_inline(p, rounds=500)
    assert parquet_rows(staging / "big.parquet") == records


def drain_inline_some(p: Pipeline, rounds: int) -> list[str]:
    from sluiceway import Worker

    worker = Worker(p)
    out: list[str] = []
    for _ in range(rounds):
        out += [o.status for o in worker.poll(wait=0.1)]
    return out


def test_locked_state_database_waits_then_fails_clearly(
    write_pipeline: Callable[..., Path], tmp_path: Path
) -> None:
    path = write_pipeline(BRONZE_TO_STAGING + "state_timeout: 1s\n")
    p = Pipeline.from_file(path)
    make_csv(tmp_path / "a.csv", 3)
    p.put(tmp_path / "a.csv", "bronze", "a.csv")  # creates the database
    holder = sqlite3.connect(tmp_path / ".sluiceway" / "state.db", isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "sluiceway", "put", "a.csv", "bronze/b.csv"],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert proc.returncode == 1
        assert "is locked by another process (waited 1s)" in proc.stderr
        with pytest.raises(StateLocked):
            Pipeline.from_file(path).put(tmp_path / "a.csv", "bronze", "c.csv")
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    # Released: it works again, and waiting for a short lock just works.
    locked, release = threading.Event(), threading.Event()

    def hold_briefly() -> None:
        conn = sqlite3.connect(tmp_path / ".sluiceway" / "state.db", isolation_level=None)
        conn.execute("BEGIN EXCLUSIVE")
        locked.set()
        release.wait(0.3)  # holds the lock for 0.3s, well inside the 1s deadline
        conn.execute("ROLLBACK")
        conn.close()

    t = threading.Thread(target=hold_briefly)
    t.start()
    assert locked.wait(10)
    assert Pipeline.from_file(path).put(tmp_path / "a.csv", "bronze", "d.csv") is not None
    t.join(10)


def test_worker_command_scales_out_beside_run(
    write_pipeline: Callable[..., Path], tmp_path: Path
) -> None:
    path = write_pipeline()
    p = Pipeline.from_file(path)
    proc = subprocess.Popen(
        [sys.executable, "-m", "sluiceway", "worker", "--workers", "2", "--pipeline", str(path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        for i in range(8):
            make_csv(tmp_path / f"{i}.csv", 20, seed=i)
            p.put(tmp_path / f"{i}.csv", "bronze", f"{i}.csv")
        wait_until(lambda: p.function_status()["csv-to-parquet"].get("done", 0) == 8, 60, "8 done")
        workers = {e.info["worker"] for e in _done_entries(p)}
        assert len(workers) >= 1
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)
        assert proc.returncode == 0, out
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)


def _done_entries(p: Pipeline) -> list:
    return [e for e in p.ledger.entries_since(0) if e.status == "done"]
