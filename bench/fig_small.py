"""Figure 2: many small files end to end, and the worker-count scaling of figure 6.

Sluiceway runs as the service (``sluiceway run --workers N``, warmed up); the
driver puts every file through ``Pipeline.put`` (copy, MD5, event, queue) and
the clock stops at the last ``finished_at`` in the ledger, i.e. when the last
Parquet file is committed. The raw baselines convert the same files with
``read_csv`` + ``write_table``: a plain loop, and a warm
``ProcessPoolExecutor(N)``. The service is measured with the default
``durability: full`` (the target) and again with ``durability: process`` (no
fsync), each against the raw pool of its own run.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import data
from .common import Service, make_pipeline, raw_convert, wait_done
from .harness import Profile, Sampled, Section, Stats, fresh_dir, profile, run_child, sampled

if TYPE_CHECKING:
    from .__main__ import Context

POOL_TARGET = 0.7  # × the raw pool's files/s


# -- the contenders, each run in a child process ---------------------------------


def throughput(
    files: list[str], workers: int, runs: int, work: str, durability: str = "full"
) -> dict[str, list[float]]:
    """Files/s per run for Sluiceway and the raw pool, run by run in turn.

    Both stay warm across runs: the service keeps running (idle while the
    pool works) and the pool keeps its processes.
    """
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    from sluiceway import Pipeline

    path = make_pipeline(Path(work) / "pipeline", durability)
    out: dict[str, list[float]] = {"sluiceway": [], "pool": [], "put": []}
    pool = ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn"))
    # The pool starts its processes while the service starts its own.
    warm = [
        pool.submit(raw_convert, files[0], f"{work}/warm-{i}.parquet") for i in range(4 * workers)
    ]
    with pool, Service(path, workers, Path(files[0])) as service:
        for future in warm:
            future.result()
        pipeline = Pipeline.from_file(path)
        for run in range(runs):
            started = time.time()
            for f in files:
                pipeline.put(f, "bronze", f"run{run}/{Path(f).name}")
            put_done = time.time()
            done = wait_done(pipeline, f"run{run}/", len(files), 600, service.check)
            finished = max(e["finished_at"] for e in done)
            out["sluiceway"].append(len(files) / (finished - started))
            out["put"].append(len(files) / (put_done - started))

            dsts = [f"{work}/{run}-{i}.parquet" for i in range(len(files))]
            started = time.time()
            list(pool.map(raw_convert, files, dsts))
            out["pool"].append(len(files) / (time.time() - started))
    return out


def raw_loop(files: list[str], runs: int, work: str) -> list[float]:
    out = []
    for run in range(runs):
        started = time.perf_counter()
        for i, f in enumerate(files):
            raw_convert(f, f"{work}/{run}-{i}.parquet")
        out.append(len(files) / (time.perf_counter() - started))
    return out


def profile_inline(files: list[str], work: str) -> dict[str, Any]:
    """The per-file work in one process (put, then Worker.poll): timed, then profiled.

    Timed with both ``durability`` settings, file by file in turn, so the
    two see the same machine; profiled with the default.
    """
    from sluiceway import Pipeline, Worker

    modes = ("full", "process")
    pipelines = {m: Pipeline.from_file(make_pipeline(Path(work) / m, m)) for m in modes}
    workers = {m: Worker(p) for m, p in pipelines.items()}
    spent = {k: 0.0 for k in ("put", "worker", "put_process", "worker_process", "raw")}
    for i, f in enumerate(files):
        for mode in modes:
            suffix = "" if mode == "full" else f"_{mode}"
            t0 = time.perf_counter()
            pipelines[mode].put(f, "bronze", f"timed/{Path(f).name}")
            t1 = time.perf_counter()
            workers[mode].poll()
            spent[f"put{suffix}"] += t1 - t0
            spent[f"worker{suffix}"] += time.perf_counter() - t1
        t2 = time.perf_counter()
        raw_convert(f, f"{work}/{i}.parquet")
        spent["raw"] += time.perf_counter() - t2

    pipeline, worker = pipelines["full"], workers["full"]

    def everything() -> None:
        for f in files:
            pipeline.put(f, "bronze", f"profiled/{Path(f).name}")
            worker.poll()

    ms = {k: v / len(files) * 1e3 for k, v in spent.items()}
    return {"ms_per_file": ms, "profile": profile(everything)}


def service_profile(files: list[str], work: str) -> dict[str, Any]:
    """One run of the warm service (2 workers) under py-spy: where its CPU goes, per process."""
    from sluiceway import Pipeline

    path = make_pipeline(Path(work) / "pipeline")
    with Service(path, 2, Path(files[0])) as service:
        pipeline = Pipeline.from_file(path)
        with sampled() as found:
            for f in files:
                pipeline.put(f, "bronze", f"sampled/{Path(f).name}")
            wait_done(pipeline, "sampled/", len(files), 600, service.check)
        pipeline.close()
    return found


# -- measuring and reporting --------------------------------------------------------


@dataclass
class Throughput:
    sluiceway: Stats
    pool: Stats
    put: Stats  # how fast the driver alone got the files in (Pipeline.put)


def measure(files: list[Path], workers: int, runs: int, durability: str = "full") -> Throughput:
    work = fresh_dir("small")
    try:
        got = run_child(
            "bench.fig_small:throughput",
            files=[str(f) for f in files],
            workers=workers,
            runs=runs,
            work=str(work),
            durability=durability,
        ).result
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return Throughput(Stats.of(got["sluiceway"]), Stats.of(got["pool"]), Stats.of(got["put"]))


def run(ctx: Context) -> Section:
    files = data.small_files(ctx.small_count)
    kb = sum(f.stat().st_size for f in files) / len(files) / 1000
    section = Section(f"2. Many small files: {len(files):,} CSV files of ~{kb:.0f} KB")
    got = measure(files, 2, ctx.runs)
    ctx.shared["small"] = {2: got}
    # Without fsync: against its own run's pool, the same service otherwise.
    loose = measure(files, 2, ctx.runs, "process")
    loose_ratio = loose.sluiceway.median / loose.pool.median
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

    def row(name: str, s: Stats) -> list[str]:
        return [name, s.fmt(0, " files/s"), s.range(0), f"{s.median / base:.2f}×"]

    section.add(
        f"{ctx.runs} runs of all {len(files):,} files each. Sluiceway: `sluiceway run --workers 2`"
        " (watcher on, as by default), warmed up, files put one after the other with "
        "`Pipeline.put`; a run ends at the last `finished_at` in the ledger. Raw: "
        "`read_csv` + `write_table` (zstd) per file. Ratio: files/s ÷ the raw pool's.",
        "",
    )
    section.table(
        ["contender", "median", "range", "× raw pool"],
        [
            row("Sluiceway, 2 worker processes", got.sluiceway),
            [
                "Sluiceway, 2 worker processes, `durability: process` (no fsync)",
                loose.sluiceway.fmt(0, " files/s"),
                loose.sluiceway.range(0),
                f"{loose_ratio:.2f}×",
            ],
            row("raw ProcessPoolExecutor(2)", got.pool),
            row("raw sequential loop", loop),
            *(
                [
                    [
                        f"Sluiceway, 2 worker processes, {ctx.many_count:,} files",
                        many.sluiceway.fmt(0, " files/s"),
                        many.sluiceway.range(0),
                        f"{many.sluiceway.median / many.pool.median:.2f}× its own run's pool",
                    ],
                    [
                        f"raw ProcessPoolExecutor(2), {ctx.many_count:,} files",
                        many.pool.fmt(0, " files/s"),
                        many.pool.range(0),
                        "1.00×",
                    ],
                ]
                if many
                else []
            ),
        ],
    )
    section.add(
        f"The driver's `put` calls alone ran at {got.put.fmt(0)} files/s (range "
        f"{got.put.range(0)}), on the same two cores as the workers. With `durability: "
        "process` the objects written to local buckets are not fsynced (a crash of any "
        "Sluiceway process loses nothing, an OS crash may); its ratio is against the raw pool "
        f"of its own run ({loose.pool.fmt(0, ' files/s')}), and its `put` ran at "
        f"{loose.put.fmt(0)} files/s.",
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
    section.add(
        "### Where the time goes",
        "",
        f"The same path in one process, file by file, for {len(files)} files: time per file, "
        "against the raw conversion of the same file.",
        "",
    )
    section.table(
        ["step", "ms per file"],
        [
            [
                "`Pipeline.put` (copy into bronze, MD5, fsync, event + queue in one transaction)",
                f"{ms['put']:.2f}",
            ],
            [
                "`Worker.poll` (receive, claim, read, write, fsync, ledger, output event, ack)",
                f"{ms['worker']:.2f}",
            ],
            ["`Pipeline.put`, `durability: process` (no fsync)", f"{ms['put_process']:.2f}"],
            ["`Worker.poll`, `durability: process` (no fsync)", f"{ms['worker_process']:.2f}"],
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
        f"Reading: per file, Sluiceway makes {fsyncs / n:.0f} fsyncs ({fsync_s / n * 1e3:.2f} ms),"
        f" opens {opens / n:.0f} files ({open_s / n * 1e3:.2f} ms), runs {sql / n:.0f} SQLite "
        f"statements ({sql_s / n * 1e3:.2f} ms){started}, where the raw conversion opens two "
        "files and syncs nothing. Two of the opens create a file (the copy in bronze and the "
        "Parquet output, written aside and renamed): each is a new inode, which on this ext4 "
        "costs about 0.2 ms even when the machine is quiet and more while fsyncs (ours or "
        "another process's) hold the journal; the opens for reading cost microseconds. The raw "
        "conversion creates one file. Together `put` and `poll` take "
        f"{ms['put'] + ms['worker']:.1f} ms per file against {ms['raw']:.1f} ms for the raw "
        f"conversion ({(ms['put'] + ms['worker']) / ms['raw']:.1f}× the work); on the same two "
        f"cores that alone limits Sluiceway to roughly {ms['raw'] / (ms['put'] + ms['worker']):.2f}"
        "× the raw pool. In the service the driver's `put` and the watcher share those cores "
        "with the workers, and every statement that writes takes the one SQLite write lock "
        "(three write transactions per file in the worker: receive, claim, done + ack; one in "
        f"`put`). Without the fsyncs (`durability: process`) the two take "
        f"{ms['put_process'] + ms['worker_process']:.1f} ms. The Parquet writer encodes a "
        "file of one row group in the worker's thread (no encoder thread per small file).",
        "",
        prof.table(15),
    )
    found = _in_scratch("service_profile", files)
    section.add(
        f"The service itself, all {len(files)} files put and converted once more with py-spy "
        "attached to the driver, the `sluiceway run` process and its workers:",
        "",
    )
    if "error" in found:
        section.add(f"(no sampled profile: {found['error']})", "")
    else:
        section.add(Sampled(**found).table(15))
