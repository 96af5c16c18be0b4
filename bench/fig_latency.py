"""Figure 5: latency from a file's put to its committed output, at a steady rate.

Through ``Pipeline.put``, not the drop of figures 1, 2 and 6: a producer that
calls ``put`` gets its event raised at once, where a dropped file waits for
the watcher's debounce (``settle``).

``sluiceway run`` (default: one worker per core, watcher on) runs in the
background, warmed up. The driver puts small files at a fixed rate and notes
when each put *started*; the ledger gives when the worker started on the file
(``started_at``) and when its Parquet output was committed (``finished_at``).
So latency = waiting (put, event, queue, poll) + processing (read, write,
commit). The raw baseline is the conversion alone, per file, in a loop.
"""

from __future__ import annotations

import math
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING

from . import data
from .common import Service, make_pipeline, raw_convert, wait_done
from .harness import Section, fresh_dir, percentile, run_child

if TYPE_CHECKING:
    from .__main__ import Context

RATE = 20.0  # files per second
WORKERS = 2
P50_TARGET = 0.050
P99_TARGET = 0.250


def sluiceway(files: list[str], runs: int, rate: float, work: str) -> list[dict[str, list[float]]]:
    from sluiceway import Pipeline

    path = make_pipeline(Path(work))
    out = []
    with Service(path, WORKERS, Path(files[0])) as service:
        pipeline = Pipeline.from_file(path)
        for run in range(runs):
            put_at: dict[str, float] = {}
            start = time.monotonic() + 0.1
            for i, f in enumerate(files):
                delay = start + i / rate - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
                key = f"run{run}/{Path(f).name}"
                put_at[f"bronze/{key}"] = time.time()
                pipeline.put(f, "bronze", key)
            done = wait_done(pipeline, f"run{run}/", len(files), 600, service.check)
            out.append(
                {
                    "total": [e["finished_at"] - put_at[e["input"]] for e in done],
                    "waiting": [e["started_at"] - put_at[e["input"]] for e in done],
                    "processing": [e["finished_at"] - e["started_at"] for e in done],
                }
            )
    return out


def raw(files: list[str], runs: int, work: str) -> list[list[float]]:
    out = []
    for run in range(runs):
        times = []
        for i, f in enumerate(files):
            started = time.perf_counter()
            raw_convert(f, f"{work}/{run}-{i}.parquet")
            times.append(time.perf_counter() - started)
        out.append(times)
    return out


def _poll_note() -> str:
    """What the queue's idle polling costs, from the constants in the source."""
    from sluiceway.queues import sqlite

    low, high = getattr(sqlite, "POLL_MIN", None), getattr(sqlite, "POLL_MAX", None)
    if low is None or high is None:
        return "the queue is polled, not notified."
    return (
        f"an idle worker polls the SQLite queue with a pause that doubles from {low * 1e3:.0f} "
        f"to {high * 1e3:.0f} ms, so at {RATE:.0f} files/s a file usually lands in a pause."
    )


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:.1f} ms"


def run(ctx: Context) -> Section:
    total = 200 if ctx.quick else 1_000
    per_run = math.ceil(total / ctx.runs)
    files = [str(f) for f in data.small_files(ctx.small_count)[:per_run]]
    section = Section(f"5. Latency: put → committed, {per_run * ctx.runs:,} files at {RATE:.0f}/s")
    work = fresh_dir("latency")
    try:
        sw = run_child(
            "bench.fig_latency:sluiceway", files=files, runs=ctx.runs, rate=RATE, work=str(work)
        ).result
        base = run_child("bench.fig_latency:raw", files=files, runs=ctx.runs, work=str(work)).result
    finally:
        shutil.rmtree(work, ignore_errors=True)

    def row(name: str, per_run: list[list[float]], ratio_to: float | None = None) -> list[str]:
        pooled = [x for r in per_run for x in r]
        p50s = [percentile(r, 50) for r in per_run]
        p99s = [percentile(r, 99) for r in per_run]
        p50 = percentile(pooled, 50)
        return [
            name,
            _ms(p50),
            f"{min(p50s) * 1e3:.1f}–{max(p50s) * 1e3:.1f}",
            _ms(percentile(pooled, 99)),
            f"{min(p99s) * 1e3:.1f}–{max(p99s) * 1e3:.1f}",
            _ms(max(pooled)),
            f"{p50 / ratio_to:.1f}×" if ratio_to else "",
        ]

    raw_p50 = percentile([x for r in base for x in r], 50)
    section.add(
        f"{ctx.runs} runs of {per_run} files (~10 KB) put at a steady {RATE:.0f} files/s into a "
        f"warm `sluiceway run --workers {WORKERS}`. Percentiles over all files of all runs; the "
        "ranges are the per-run values. Ratio: p50 ÷ the raw conversion's p50.",
        "",
        "The path measured is `Pipeline.put`'s, unlike figures 1, 2 and 6: a producer that "
        "calls `put` has its event raised as soon as the copy is in the bucket, so the clock "
        "starts at the start of `put` and includes its copy, ETag and fsync. A file dropped into "
        "the bucket directory instead waits for the watcher, which offers it once its size and "
        "mtime have stayed unchanged for its `settle` time: that debounce is not in these "
        "numbers.",
        "",
    )
    section.table(
        ["", "p50", "p50 range", "p99", "p99 range", "max", "p50 × raw"],
        [
            row("Sluiceway put → committed", [r["total"] for r in sw], raw_p50),
            row("… of which waiting (put start → worker starts)", [r["waiting"] for r in sw]),
            row("… of which processing (worker start → committed)", [r["processing"] for r in sw]),
            row("raw read_csv + write_table, per file", base, raw_p50),
        ],
    )
    waiting = percentile([x for r in sw for x in r["waiting"]], 50)
    processing = percentile([x for r in sw for x in r["processing"]], 50)
    section.add(
        f"Waiting is {_ms(waiting)} at p50: {_poll_note()} Processing takes "
        f"{processing / raw_p50:.1f}× the raw conversion at p50 (it also fsyncs the output and "
        "writes the ledger).",
        "",
    )
    pooled = [x for r in sw for x in r["total"]]
    p50, p99 = percentile(pooled, 50), percentile(pooled, 99)
    section.target("latency p50", _ms(p50), f"≤ {P50_TARGET * 1e3:.0f} ms", p50 <= P50_TARGET)
    section.target("latency p99", _ms(p99), f"≤ {P99_TARGET * 1e3:.0f} ms", p99 <= P99_TARGET)
    return section
