"""Figure 2: many small files end to end, and the worker-count scaling of figure 6.

Sluiceway runs as the service (``sluiceway run --workers N``, warmed up). The
clock starts at the drop: the files, staged on the bucket's file system
beforehand, are hard-linked into bronze, and the service's watcher takes it
from there (notice, ETag, event, queue). It stops at the last ``finished_at``
in the ledger, i.e. when the last Parquet file is committed. The same runs
also put the files through ``Pipeline.put`` (copy, ETag, fsync, event), the
way in that does the upload's work too, timed the same way. The raw
baselines convert the same files with ``read_csv`` + ``write_table``: a plain
loop, and a warm ``ProcessPoolExecutor(N)``. The service is measured with
the default ``durability: full`` (the target) and again with ``durability:
process`` (no fsync), each against the raw pool of its own run.
"""

from __future__ import annotations

import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import data
from .common import (
    Service,
    drop,
    make_pipeline,
    quiet,
    raised,
    raw_convert,
    stage,
    wait_done,
)
from .harness import Profile, Sampled, Section, Stats, fresh_dir, profile, run_child, sampled

if TYPE_CHECKING:
    from sluiceway import Pipeline

    from .__main__ import Context

POOL_TARGET = 0.7  # × the raw pool's files/s


# -- the contenders, each run in a child process ---------------------------------


def throughput(
    files: list[str],
    workers: int,
    runs: int,
    work: str,
    durability: str = "full",
    through_put: bool = True,
) -> dict[str, list[float]]:
    """Files/s per run for Sluiceway and the raw pool, run by run in turn.

    Both stay warm across runs: the service keeps running (idle while the
    pool works) and the pool keeps its processes. Sluiceway's clock starts at
    the drop (the staged files hard-linked into bronze, a fresh prefix per
    run); with ``through_put`` each run also puts the files in with
    ``Pipeline.put``, the way in that copies them, timed the same way.
    """
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    import psutil

    from sluiceway import Pipeline

    path = make_pipeline(Path(work) / "pipeline", durability)
    staged = stage(files, Path(work) / "staged")
    out: dict[str, list[float]] = {"sluiceway": [], "raised": [], "first": [], "pool": []}
    out.update(cpu=[], busy=[], pool_cpu=[], pool_busy=[])
    if through_put:
        out.update(through_put=[], put=[])
    pool = ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn"))
    # The pool starts its processes while the service starts its own.
    warm = [
        pool.submit(raw_convert, files[0], f"{work}/warm-{i}.parquet") for i in range(4 * workers)
    ]
    with pool, Service(path, workers, Path(files[0])) as service:
        for future in warm:
            future.result()
        pipeline = Pipeline.from_file(path)

        def finished(prefix: str) -> float:
            done = wait_done(pipeline, f"{prefix}/", len(files), 600, service.check)
            return max(e["finished_at"] for e in done)

        def cpu_seconds(pids: list[int]) -> float:
            return sum(sum(psutil.Process(pid).cpu_times()[:2]) for pid in pids)

        def account(name: str, pids: list[int], cpu_before: float, seconds: float) -> None:
            """CPU ms per file of ``pids`` over a timed run, and the share of the cores busy."""
            try:
                spent = cpu_seconds(pids) - cpu_before
            except psutil.NoSuchProcess:  # a worker was replaced: no figure for this run
                return
            out[name].append(spent / len(files) * 1e3)
            out[name.replace("cpu", "busy")].append(spent / (seconds * (os.cpu_count() or 1)))

        def service_pids() -> list[int]:
            return [service.pid, *(c.pid for c in psutil.Process(service.pid).children(True))]

        pool_pids = [p.pid for p in pool._processes.values()]  # type: ignore[attr-defined]
        for run in range(runs):
            pids = service_pids()
            cpu_before = cpu_seconds(pids)
            started = drop(pipeline, staged, f"drop{run}")
            seconds = finished(f"drop{run}") - started
            account("cpu", pids, cpu_before, seconds)
            out["sluiceway"].append(len(files) / seconds)
            events = raised(pipeline, f"drop{run}/")
            if events is not None:
                out["first"].append(events[0] - started)
                out["raised"].append(len(files) / (events[1] - started))

            if through_put:
                quiet()
                started = time.time()
                for f in files:
                    pipeline.put(f, "bronze", f"put{run}/{Path(f).name}")
                put_done = time.time()
                out["through_put"].append(len(files) / (finished(f"put{run}") - started))
                out["put"].append(len(files) / (put_done - started))

            dsts = [f"{work}/{run}-{i}.parquet" for i in range(len(files))]
            quiet()
            cpu_before = cpu_seconds(pool_pids)
            started = time.time()
            list(pool.map(raw_convert, files, dsts))
            seconds = time.time() - started
            account("pool_cpu", pool_pids, cpu_before, seconds)
            out["pool"].append(len(files) / seconds)
    return out


def raw_loop(files: list[str], runs: int, work: str) -> list[float]:
    out = []
    for run in range(runs):
        started = time.perf_counter()
        for i, f in enumerate(files):
            raw_convert(f, f"{work}/{run}-{i}.parquet")
        out.append(len(files) / (time.perf_counter() - started))
    return out


def _offer(pipeline: Pipeline, key: str) -> None:
    """What the watcher does for a file it offers: stat, head (the ETag), raise the event."""
    bucket = pipeline.bucket("bronze")
    os.stat(bucket.local_path(key) or key)
    pipeline.object_created("bronze", bucket.head(key))


def profile_inline(files: list[str], work: str) -> dict[str, Any]:
    """The per-file work in one process, timed, then profiled.

    The drop's path: the file linked into bronze (the producer's, not
    timed), the watcher's work on it (``_offer``), then ``Worker.poll``;
    and ``Pipeline.put``, the other way in. Timed with both ``durability``
    settings, file by file in turn, so all see the same machine; the drop's
    path profiled with the default.
    """
    from sluiceway import Pipeline, Worker

    modes = ("full", "process")
    pipelines = {m: Pipeline.from_file(make_pipeline(Path(work) / m, m)) for m in modes}
    workers = {m: Worker(p) for m, p in pipelines.items()}
    staged = stage(files, Path(work) / "staged")
    spent: dict[str, float] = {}
    for i, f in enumerate(staged):
        for mode in modes:
            suffix = "" if mode == "full" else f"_{mode}"
            pipeline, worker = pipelines[mode], workers[mode]
            key = f"timed/{f.name}"
            target = Path(pipeline.bucket("bronze").local_path(key) or key)
            target.parent.mkdir(parents=True, exist_ok=True)
            os.link(f, target)
            t0 = time.perf_counter()
            _offer(pipeline, key)
            t1 = time.perf_counter()
            worker.poll()
            t2 = time.perf_counter()
            pipeline.put(f, "bronze", f"put/{f.name}")
            t3 = time.perf_counter()
            worker.poll()
            t4 = time.perf_counter()
            for name, seconds in (("offer", t1 - t0), ("worker", t2 - t1), ("put", t3 - t2)):
                spent[name + suffix] = spent.get(name + suffix, 0.0) + seconds
            spent["worker_after_put" + suffix] = spent.get("worker_after_put" + suffix, 0.0)
            spent["worker_after_put" + suffix] += t4 - t3
        t5 = time.perf_counter()
        raw_convert(str(f), f"{work}/{i}.parquet")
        spent["raw"] = spent.get("raw", 0.0) + time.perf_counter() - t5

    pipeline, worker = pipelines["full"], workers["full"]
    folder = Path(pipeline.bucket("bronze").local_path("profiled/x") or "profiled").parent
    folder.mkdir(parents=True)

    def everything() -> None:
        for f in staged:
            os.link(f, folder / f.name)
            _offer(pipeline, f"profiled/{f.name}")
            worker.poll()

    ms = {k: v / len(files) * 1e3 for k, v in spent.items()}
    return {"ms_per_file": ms, "profile": profile(everything)}


def service_profile(files: list[str], work: str) -> dict[str, Any]:
    """One run of the warm service (2 workers) under py-spy: where its CPU goes, per process."""
    from sluiceway import Pipeline

    path = make_pipeline(Path(work) / "pipeline")
    staged = stage(files, Path(work) / "staged")
    with Service(path, 2, Path(files[0])) as service:
        pipeline = Pipeline.from_file(path)
        quiet()
        with sampled() as found:
            drop(pipeline, staged, "sampled")
            wait_done(pipeline, "sampled/", len(files), 600, service.check)
        pipeline.close()
    return found


# -- measuring and reporting --------------------------------------------------------


@dataclass
class Throughput:
    sluiceway: Stats  # from the drop to the last commit
    pool: Stats
    raised: Stats | None = None  # from the drop to the last event raised (the watcher's pace)
    first: Stats | None = None  # seconds from the drop to the first event raised
    through_put: Stats | None = None  # the files put in with Pipeline.put, to the last commit
    put: Stats | None = None  # how fast the driver alone got the files in (Pipeline.put)
    cpu: Stats | None = None  # CPU ms per file of all the service's processes, from the drop
    busy: Stats | None = None  # ... as a share of all cores' time over the run
    pool_cpu: Stats | None = None  # the same for the raw pool's processes
    pool_busy: Stats | None = None

    @classmethod
    def of(cls, got: dict[str, list[float]]) -> Throughput:
        def stats(name: str) -> Stats | None:
            return Stats.of(got[name]) if got.get(name) else None

        return cls(
            Stats.of(got["sluiceway"]),
            Stats.of(got["pool"]),
            stats("raised"),
            stats("first"),
            stats("through_put"),
            stats("put"),
            stats("cpu"),
            stats("busy"),
            stats("pool_cpu"),
            stats("pool_busy"),
        )


def measure(
    files: list[Path],
    workers: int,
    runs: int,
    durability: str = "full",
    through_put: bool = True,
) -> Throughput:
    work = fresh_dir("small")
    try:
        got = run_child(
            "bench.fig_small:throughput",
            files=[str(f) for f in files],
            workers=workers,
            runs=runs,
            work=str(work),
            durability=durability,
            through_put=through_put,
        ).result
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return Throughput.of(got)


def run(ctx: Context) -> Section:
    files = data.small_files(ctx.small_count)
    kb = sum(f.stat().st_size for f in files) / len(files) / 1000
    section = Section(f"2. Many small files: {len(files):,} CSV files of ~{kb:.0f} KB")
    got = measure(files, 2, ctx.runs)
    ctx.shared["small"] = {2: got}
    # Without fsync: against its own run's pool, the same service otherwise.
    loose = measure(files, 2, ctx.runs, "process")
    work = fresh_dir("small-loop")
    try:
        loop = Stats.of(
            run_child(
                "bench.fig_small:raw_loop",
                files=[str(f) for f in files],
                runs=ctx.runs,
                work=str(work),
            ).result
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)
    base = got.pool.median
    # The larger run: the same service and pool on ten times the files, default durability.
    many = measure(data.small_files(ctx.many_count), 2, ctx.runs) if ctx.many_count else None

    def row(name: str, s: Stats | None, pool: Stats = got.pool, own: bool = False) -> list[str]:
        if s is None:
            return [name, "not measured", "", ""]
        ratio = f"{s.median / pool.median:.2f}×" + (" its own run's pool" if own else "")
        return [name, s.fmt(0, " files/s"), s.range(0), ratio]

    drop_in, put_in = "dropped into the bucket", "through `Pipeline.put`, which copies each file in"
    loose_name = "2 worker processes, `durability: process` (no fsync)"
    rows = [
        row(f"Sluiceway, 2 worker processes, {drop_in}", got.sluiceway),
        row(f"Sluiceway, 2 worker processes, {put_in}", got.through_put),
        row(f"Sluiceway, {loose_name}, {drop_in}", loose.sluiceway, loose.pool, True),
        row(f"Sluiceway, {loose_name}, {put_in}", loose.through_put, loose.pool, True),
        row("raw ProcessPoolExecutor(2)", got.pool),
        row("raw sequential loop", loop),
    ]
    if many:
        n = f"{ctx.many_count:,} files"
        rows += [
            row(f"Sluiceway, 2 worker processes, {n}, {drop_in}", many.sluiceway, many.pool, True),
            row(f"Sluiceway, 2 worker processes, {n}, {put_in}", many.through_put, many.pool, True),
            row(f"raw ProcessPoolExecutor(2), {n}", many.pool, many.pool),
        ]
    section.add(
        f"{ctx.runs} runs of all {len(files):,} files each. Sluiceway: `sluiceway run --workers 2`"
        " (watcher on, as by default), warmed up. Its clock starts at the drop: the files, "
        "staged beforehand on the bucket's file system and synced to disk, are hard-linked "
        "one after the other into the bronze bucket under a fresh prefix per run, the way a "
        "careful producer lands files (written aside, then linked or renamed in: each complete "
        "the moment it appears). A run ends at the last `finished_at` in the ledger. On the "
        "clock, the issue's end to end: the watcher noticing each file (one whose mtime is "
        "already `settle` old, as these staged files', is offered at once; one still being "
        "written waits until it has settled), "
        "its ETag (xxh3: ours to compute on a local bucket), the event, queue, worker, commit, "
        "ack and ledger. Not on it, as for the raw pool, which reads files already on disk: "
        "getting the bytes onto the disk, the producer's upload in the real design (S3 "
        "receives it; on a local bucket the producer writes the file into the directory). The "
        "rows through `Pipeline.put` are the same service in the same runs with the driver "
        "putting the files one after the other: `put` copies each into the bucket, hashes and "
        "fsyncs it and raises its event, doing the upload's work as well, on the clock. Raw: "
        "`read_csv` + `write_table` (zstd) per file, in a warm `ProcessPoolExecutor(2)` taking "
        "its turn after Sluiceway in every run, and in a plain loop. Every timed run starts "
        "after `os.sync()` and half a second's pause. Ratio: files/s ÷ the raw pool's.",
        "",
    )
    section.table(["contender", "median", "range", "× raw pool"], rows)
    facts = []
    if got.raised is not None:
        facts.append(
            f"From the drop, the watcher raised the events at {got.raised.fmt(0)} files/s "
            f"(range {got.raised.range(0)}; the last event that long after the drop), in the "
            "service process, on the same two cores as the workers: the end-to-end rate cannot "
            "exceed it."
            + (
                f" The first event came {got.first.fmt(2)} s after the drop (range "
                f"{got.first.range(2)}): the watcher's notice of the first file and its first "
                "batch of events, a fixed delay that weighs less the more files a run has."
                if got.first is not None
                else ""
            )
        )
    if got.put is not None:
        facts.append(
            f"Through `put`, the driver's `put` calls alone ran at {got.put.fmt(0)} files/s "
            f"(range {got.put.range(0)})."
        )
    facts.append(
        "With `durability: process` the objects written to local buckets are not fsynced (a "
        "crash of any Sluiceway process loses nothing, an OS crash may); its ratios are "
        f"against the raw pool of its own runs ({loose.pool.fmt(0, ' files/s')})"
        + (f", and its `put` ran at {loose.put.fmt(0)} files/s." if loose.put else ".")
    )
    section.add(" ".join(facts), "")
    if got.cpu is not None and got.pool_cpu is not None and got.busy and got.pool_busy:
        cores = os.cpu_count() or 1
        budget = cores / (POOL_TARGET * base) * 1e3
        section.add(
            f"CPU in the same runs (user + system, every process of the service: its watcher "
            f"and its workers): Sluiceway spent {got.cpu.fmt(2)} ms per file (range "
            f"{got.cpu.range(2)}) and kept {got.busy.median:.0%} of the {cores} cores busy "
            f"(range {got.busy.lo:.0%}–{got.busy.hi:.0%}); the raw pool's processes "
            f"{got.pool_cpu.fmt(2)} ms per file (range {got.pool_cpu.range(2)}), keeping "
            f"{got.pool_busy.median:.0%} busy. At the target's {POOL_TARGET}× the pool's rate "
            f"({POOL_TARGET * base:,.0f} files/s) the {cores} cores give Sluiceway at most "
            f"{budget:.2f} ms of CPU per file, with every core busy all the time: "
            f"{budget / got.pool_cpu.median:.2f}× the raw conversion's CPU, for the watcher, "
            "ETag, event, queue, claim, fsync, ledger and ack on top of the same conversion. "
            "The cores' idle share is time every process of the service spent waiting: on "
            "fsync (a disk flush each; see the machine facts) and on the state database's "
            "write lock.",
            "",
        )
    ratio = got.sluiceway.median / base
    met = ratio >= POOL_TARGET
    section.target(
        "small files: throughput vs raw pool (2 workers)", f"{ratio:.2f}×", "≥ 0.7×", met
    )
    if many:
        many_ratio = many.sluiceway.median / many.pool.median
        section.target(
            f"small files, {ctx.many_count:,} of them: throughput vs raw pool (2 workers)",
            f"{many_ratio:.2f}×",
            "≥ 0.7×",
            many_ratio >= POOL_TARGET,
        )
        met = met and many_ratio >= POOL_TARGET
    if not met:
        explain(section, files[:100])
    return section


def _in_scratch(function: str, files: list[Path]) -> Any:
    """What ``function`` of this module returns, run in a child with a scratch directory."""
    work = fresh_dir(f"small-{function}")
    try:
        return run_child(
            f"bench.fig_small:{function}", files=[str(f) for f in files], work=str(work)
        ).result
    finally:
        shutil.rmtree(work, ignore_errors=True)


def explain(section: Section, files: list[Path]) -> None:
    got = _in_scratch("profile_inline", files)
    ms = got["ms_per_file"]
    drop_ms, put_ms = ms["offer"] + ms["worker"], ms["put"] + ms["worker_after_put"]
    loose_ms = ms["offer_process"] + ms["worker_process"]
    section.add(
        "### Where the time goes",
        "",
        f"The same per-file work in one process, file by file, for {len(files)} files: time "
        "per file, against the raw conversion of the same file. The drop's path: the file "
        "hard-linked into bronze (the producer's step, not timed), then what the watcher does "
        "for it once it offers it (stat, `head`: the ETag, then `Pipeline.object_created`), "
        "then `Worker.poll`. `Pipeline.put`, the other way in, on the same file after it.",
        "",
    )
    section.table(
        ["step", "ms per file"],
        [
            [
                "watcher, per dropped file (stat, ETag, event + queue in one transaction)",
                f"{ms['offer']:.2f}",
            ],
            [
                "`Worker.poll` (receive, claim, read, write, fsync, ledger, output event, ack)",
                f"{ms['worker']:.2f}",
            ],
            ["watcher, per dropped file, `durability: process`", f"{ms['offer_process']:.2f}"],
            ["`Worker.poll`, `durability: process` (no fsync)", f"{ms['worker_process']:.2f}"],
            [
                "`Pipeline.put` (copy into bronze, ETag, fsync, event + queue in one transaction)",
                f"{ms['put']:.2f}",
            ],
            ["`Worker.poll` after `put`", f"{ms['worker_after_put']:.2f}"],
            ["`Pipeline.put`, `durability: process` (no fsync)", f"{ms['put_process']:.2f}"],
            ["raw `read_csv` + `write_table`", f"{ms['raw']:.2f}"],
        ],
    )
    prof = Profile.of(got["profile"])
    n = len(files)
    fsyncs, fsync_s = prof.own("posix.fsync")
    opens, open_s = prof.own("io.open")
    sql, sql_s = prof.own("sqlite3.Connection")
    threads, _ = prof.own("start_new_thread")
    started = f" and starts {threads / n:.0f} thread(s)" if threads >= n / 2 else ""
    section.add(
        "Reading (the drop's path, profiled below): per file, Sluiceway makes "
        f"{fsyncs / n:.0f} fsyncs ({fsync_s / n * 1e3:.2f} ms), opens {opens / n:.0f} files "
        f"({open_s / n * 1e3:.2f} ms), runs {sql / n:.0f} SQLite statements "
        f"({sql_s / n * 1e3:.2f} ms){started}, where the raw conversion opens two files and "
        "syncs nothing. One of the opens creates a file (the Parquet output, written aside and "
        "renamed), as the raw conversion does (see the machine facts for what a create and "
        "an fsync cost on this disk); the opens for reading cost microseconds. The "
        f"watcher's work and `poll` together take {drop_ms:.1f} ms per file against "
        f"{ms['raw']:.1f} ms for the raw conversion ({drop_ms / ms['raw']:.1f}× the work); on "
        f"the same two cores that alone limits Sluiceway to roughly {ms['raw'] / drop_ms:.2f}"
        "× the raw pool. In the service the watcher shares those cores with the workers, and "
        "every statement that writes takes the one SQLite write lock (three write "
        "transactions per file in the worker: receive, claim, done + ack; one in the "
        f"watcher's offer). Without the fsyncs (`durability: process`) the two take "
        f"{loose_ms:.1f} ms. Through `put` the way in also creates the copy in bronze and "
        f"fsyncs it: `put` and `poll` take {put_ms:.1f} ms. The Parquet writer encodes a file "
        "of one row group in the worker's thread (no encoder thread per small file).",
        "",
        prof.table(15),
    )
    found = _in_scratch("service_profile", files)
    section.add(
        f"The service itself, all {len(files)} files dropped in and converted once more with "
        "py-spy attached to the driver, the `sluiceway run` process (its watcher) and its "
        "workers:",
        "",
    )
    if "error" in found:
        section.add(f"(no sampled profile: {found['error']})", "")
    else:
        section.add(Sampled(**found).table(15))
