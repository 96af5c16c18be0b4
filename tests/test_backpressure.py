"""Backpressure: a burst far larger than the workers can take at once is absorbed
with flat memory, drained at the workers' pace, and visible in `status`.

CI runs a 2,000-file burst and a 100,000-event burst; `SLUICEWAY_LONG=1`
runs the sizes the reliability promise names (10,000 files, 1,000,000 events).
"""

from __future__ import annotations

import itertools
import json
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from sluiceway import Pipeline, Runtime

from .conftest import BRONZE_TO_STAGING

LONG = os.environ.get("SLUICEWAY_LONG") == "1"
FILES = 10_000 if LONG else 2_000
EVENTS = 1_000_000 if LONG else 100_000


def rss_mb(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except FileNotFoundError:
        pass
    return 0.0


class Sampler(threading.Thread):
    """Samples backlog and worker memory every ``every`` seconds while the runtime drains."""

    def __init__(self, rt: Runtime, every: float = 0.2) -> None:
        super().__init__(daemon=True)
        self.rt = rt
        self.every = every
        self.samples: list[tuple[float, int, float]] = []  # (t, backlog, max worker RSS)
        self.stop = threading.Event()

    def run(self) -> None:
        p = Pipeline.from_file(self.rt.pipeline_path)
        t0 = time.monotonic()
        while not self.stop.wait(self.every):
            rss = max((rss_mb(proc.pid) for proc in self.rt._procs if proc.pid), default=0.0)
            self.samples.append((time.monotonic() - t0, p.pending(), rss))


def check_flat_memory_and_draining(samples: list[tuple[float, int, float]], total: int) -> None:
    busy = [s for s in samples if 0 < s[1] < total and s[2] > 0]
    assert len(busy) >= 5, f"too few samples while draining: {samples}"
    # Not the first samples: a worker that drains in about a second is still
    # importing and warming up (its RSS rising) while the backlog is high.
    early = [rss for _, b, rss in busy if total * 0.3 <= b <= total * 0.7]
    late = [rss for _, b, rss in busy if b < total * 0.3]
    if early and late:
        # Memory tracks the work in hand, not the backlog behind it.
        assert max(late) <= max(early) + 40, (max(early), max(late))
    backlogs = [b for _, b, _ in samples]
    # The backlog drains: it only goes down once the burst is in (status shows it).
    peak = backlogs.index(max(backlogs))
    after = backlogs[peak:]
    assert all(b2 <= b1 for b1, b2 in itertools.pairwise(after)), after


@pytest.mark.timeout(600)
def test_burst_of_files(write_pipeline: Callable[..., Path], tmp_path: Path) -> None:
    path = write_pipeline(BRONZE_TO_STAGING)
    bronze = tmp_path / "bronze" / "burst"
    bronze.mkdir(parents=True)
    row = "id,name,amount\n" + "".join(f"{i},name {i},{i * 1.5}\n" for i in range(300))
    for i in range(FILES):  # ~10 KB each, dropped while nothing runs
        (bronze / f"f{i:05d}.csv").write_text(row)
    rt = Runtime(path, workers=2, watch=False)
    sampler = Sampler(rt)
    sampler.start()
    try:
        summary = rt.drain(timeout=540)
    finally:
        sampler.stop.set()
        sampler.join(10)
    assert summary.done == FILES and summary.rows_out == FILES * 300
    check_flat_memory_and_draining(sampler.samples, FILES)
    status = Pipeline.from_file(path).status()
    assert status["queues"]["to-parquet"]["visible"] == 0
    assert status["functions"]["csv-to-parquet"]["processed"] == FILES


STREAM_PIPELINE = """
pipeline: burst-events
buckets:
  lake: ./lake
streams:
  events: {}
functions:
  to-lake:
    stream: events
    steps:
      - dedup: {key: event_uuid, window: 24h}
      - write_dataset:
          bucket: lake
          partition_by: [event_name]
          flush_records: 20000
          flush_seconds: 5s
"""


@pytest.mark.timeout(900)
def test_burst_of_stream_events(write_pipeline: Callable[..., Path], tmp_path: Path) -> None:
    path = write_pipeline(STREAM_PIPELINE)
    p = Pipeline.from_file(path)
    chunk = 50_000
    for start in range(0, EVENTS, chunk):
        p.append_events(
            "events",
            [
                {
                    "event_uuid": f"u{i % (EVENTS - EVENTS // 10)}",  # the last 10% repeat
                    "event_name": ("signup", "login", "purchase")[i % 3],
                    "created_at": "2026-11-24T10:00:00Z",
                    "payload": {"n": i},
                }
                for i in range(start, min(start + chunk, EVENTS))
            ],
        )
    rt = Runtime(path, workers=1, watch=False)
    sampler = Sampler(rt, every=0.01)  # 100,000 events drain in 0.2-1 s, 20,000 a flush
    sampler.start()
    try:
        rt.drain(timeout=840)
    finally:
        sampler.stop.set()
        sampler.join(10)
    unique = EVENTS - EVENTS // 10
    import pyarrow.dataset as ds

    table = ds.dataset(tmp_path / "lake", format="parquet", partitioning="hive").to_table(
        columns=["event_uuid"]
    )
    assert table.num_rows == unique
    assert len(set(table["event_uuid"].to_pylist())) == unique
    check_flat_memory_and_draining(sampler.samples, EVENTS)
    stream_status = json.loads(json.dumps(Pipeline.from_file(path).status().get("streams", {})))
    assert stream_status, "status shows the stream"
