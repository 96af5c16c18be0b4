"""Figure 6: scaling with worker processes, and cost growth with file size.

Throughput reuses figure 2's method (warm ``sluiceway run --workers N``
against a warm ``ProcessPoolExecutor(N)``) for N = 1, 2, 4 on a 2-core
machine. Cost growth reuses figure 1's: Sluiceway against the fastest raw
tool of figure 1, time and peak RSS, at each file size. Both go into
bench/scaling.png.
"""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import data, fig_large, fig_small
from .harness import ChildFailed, Section, Stats, fresh_dir, mb, run_child

if TYPE_CHECKING:
    from .__main__ import Context

WORKERS = (1, 2, 4)
REDIS_WORKERS = (1, 4)
REDIS_URL = "redis://127.0.0.1:6379/15"
PLOT = Path(__file__).resolve().parent / "scaling.png"


def run(ctx: Context) -> Section:
    section = Section("6. Scaling")
    files = data.small_files(ctx.small_count)[: ctx.scaling_count]
    throughput: dict[int, fig_small.Throughput] = dict(ctx.shared.get("small", {}))
    reused = "".join(f" N = {n} is figure 2's, on {ctx.small_count:,} files." for n in throughput)
    for n in WORKERS:
        if n not in throughput:
            throughput[n] = fig_small.measure(files, n, ctx.runs)
    one = throughput[1].sluiceway.median
    section.add(
        f"### Throughput with worker processes ({ctx.runs} runs)",
        "",
        f"As figure 2, with N workers for Sluiceway and N processes for the raw pool, on "
        f"{len(files):,} small files per run.{reused} The machine has {ctx.cores} cores, so 4 "
        "workers oversubscribe it.",
        "",
    )
    section.table(
        [
            "workers",
            "Sluiceway files/s",
            "range",
            "raw pool files/s",
            "range",
            "× raw pool",
            "Sluiceway speed-up vs 1",
        ],
        [
            [
                str(n),
                t.sluiceway.fmt(0),
                t.sluiceway.range(0),
                t.pool.fmt(0),
                t.pool.range(0),
                f"{t.sluiceway.median / t.pool.median:.2f}×",
                f"{t.sluiceway.median / one:.2f}×",
            ]
            for n, t in sorted(throughput.items())
        ],
    )

    redis = redis_profile(ctx, section, files, throughput)

    fig1_size, fig1 = ctx.shared.get("large", (0, {}))
    sizes = (
        [10 * data.MB, 50 * data.MB] if ctx.quick else [10 * data.MB, 100 * data.MB, 1000 * data.MB]
    )
    raw_name = fig_large.fastest_raw(fig1) if fig1 else "Polars scan_csv().sink_parquet()"
    names = [fig_large.SLUICEWAY, raw_name]
    growth: dict[int, dict[str, fig_large.Measured]] = {}
    for size in sizes:
        if size == fig1_size:
            growth[size] = {n: fig1[n] for n in names}
        else:
            growth[size] = fig_large.measure(data.large_csv(size), names, ctx.runs)
    section.add(
        f"### Cost growth with file size ({ctx.runs} runs per point)",
        "",
        f"As figure 1: Sluiceway put → committed against **{raw_name}** (figure 1's fastest raw "
        "tool), each run in a fresh process.",
        "",
    )
    rows = []
    for size, m in growth.items():
        sw, raw = m[fig_large.SLUICEWAY], m[raw_name]
        rows.append(
            [
                f"{size // data.MB:,} MB",
                sw.seconds.fmt(2, " s"),
                sw.seconds.range(2),
                raw.seconds.fmt(2, " s"),
                f"{sw.seconds.median / raw.seconds.median:.2f}×",
                mb(sw.peak_rss.median),
                mb(raw.peak_rss.median),
            ]
        )
    section.table(
        ["CSV size", "Sluiceway", "range", "raw", "× raw", "Sluiceway peak RSS", "raw peak RSS"],
        rows,
    )
    plot(throughput, growth, raw_name, redis)
    section.add(f"![scaling]({PLOT.name})", "")
    return section


def plot(
    throughput: dict[int, fig_small.Throughput],
    growth: dict[int, dict[str, fig_large.Measured]],
    raw_name: str,
    redis: dict[int, fig_small.Throughput] | None = None,
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, NullFormatter

    fig, (ax1, ax2, ax3) = plt.subplots(1, 3, figsize=(15, 4.5))
    ns = sorted(throughput)
    for label, get in (
        ("Sluiceway", lambda t: t.sluiceway),
        ("raw ProcessPoolExecutor(N)", lambda t: t.pool),
    ):
        stats = [get(throughput[n]) for n in ns]
        med = [s.median for s in stats]
        err = [
            [m - s.lo for m, s in zip(med, stats, strict=True)],
            [s.hi - m for m, s in zip(med, stats, strict=True)],
        ]
        ax1.errorbar(ns, med, yerr=err, marker="o", capsize=4, label=label)
    if redis:
        rn = sorted(redis)
        stats = [redis[n].sluiceway for n in rn]
        med = [s.median for s in stats]
        err = [
            [m - s.lo for m, s in zip(med, stats, strict=True)],
            [s.hi - m for m, s in zip(med, stats, strict=True)],
        ]
        ax1.errorbar(rn, med, yerr=err, marker="s", capsize=4, label="Sluiceway, Redis broker")
    ax1.set(
        xlabel="worker processes",
        ylabel="files/s",
        title="Small files: throughput",
        xticks=ns,
        ylim=(0, None),
    )
    ax1.legend()

    sizes = sorted(growth)
    x = [s / data.MB for s in sizes]
    for name, label in ((fig_large.SLUICEWAY, "Sluiceway"), (raw_name, raw_name)):
        secs = [growth[s][name].seconds for s in sizes]
        med = [t.median for t in secs]
        err = [
            [m - t.lo for m, t in zip(med, secs, strict=True)],
            [t.hi - m for m, t in zip(med, secs, strict=True)],
        ]
        ax2.errorbar(x, med, yerr=err, marker="o", capsize=4, label=label)
        ax3.plot(
            x, [growth[s][name].peak_rss.median / 2**20 for s in sizes], marker="o", label=label
        )
    ax3.axhline(512, color="grey", linestyle="--", label="target 512 MiB")
    plain = FuncFormatter(lambda v, _: f"{v:g}")
    for ax, ylabel, title in (
        (ax2, "seconds (median, range)", "Large file: time"),
        (ax3, "peak RSS (MiB, median)", "Large file: peak memory"),
    ):
        ax.set(xscale="log", xlabel="CSV size (MB)", ylabel=ylabel, title=title)
        ax.set_xticks(x, [f"{v:g}" for v in x])
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.legend(fontsize="small")
    ax2.set_yscale("log")
    ax2.yaxis.set_major_formatter(plain)
    ax2.yaxis.set_minor_formatter(NullFormatter())
    ax3.set_ylim(0, None)
    fig.tight_layout()
    fig.savefig(PLOT, dpi=110)
    plt.close(fig)


# -- the Redis broker profile --------------------------------------------------------------


def redis_throughput(
    files: list[str], workers: int, runs: int, work: str, url: str
) -> dict[str, list[float]]:
    """figure 2's throughput with the queues on Redis (profile ``bench-redis``), ledger embedded."""
    import redis

    from sluiceway.queues.redis import delete_prefix

    prefix = f"swbench{uuid.uuid4().hex[:8]}-"
    folder = Path(work) / "pipeline"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "profiles.yaml").write_text(
        f'bench-redis:\n  broker: "{url}?prefix={prefix}"\n', encoding="utf-8"
    )
    os.environ["SLUICEWAY_PROFILE"] = "bench-redis"  # the service and its workers inherit it
    from sluiceway import Pipeline

    from .common import make_pipeline

    check = Pipeline.from_file(make_pipeline(folder))
    if type(check.broker).__name__ != "RedisBroker":
        raise RuntimeError(f"the profile did not take: broker is {check.broker!r}")
    check.close()
    try:
        return fig_small.throughput(files, workers, runs, work)
    finally:
        delete_prefix(redis.Redis.from_url(url), prefix)


def redis_profile(
    ctx: Context,
    section: Section,
    files: list[Path],
    embedded: dict[int, fig_small.Throughput],
) -> dict[int, fig_small.Throughput]:
    """Throughput with 1 and 4 workers on the Redis broker profile, against the embedded runs."""
    from .fig_queue import redis_available

    section.add(f"### On the Redis broker profile ({ctx.runs} runs)", "")
    why = redis_available()
    if why:
        section.add(f"Not measured: {why}.", "")
        return {}
    got: dict[int, fig_small.Throughput] = {}
    for n in REDIS_WORKERS:
        work = fresh_dir("small-redis")
        try:
            raw: Any = run_child(
                "bench.fig_scaling:redis_throughput",
                files=[str(f) for f in files],
                workers=n,
                runs=ctx.runs,
                work=str(work),
                url=REDIS_URL,
            ).result
        except ChildFailed as e:
            section.add(f"{n} worker(s) on Redis failed:\n\n```\n{str(e)[-1500:]}\n```", "")
            continue
        finally:
            shutil.rmtree(work, ignore_errors=True)
        got[n] = fig_small.Throughput(
            Stats.of(raw["sluiceway"]), Stats.of(raw["pool"]), Stats.of(raw["put"])
        )
    section.add(
        "As above, with the pipeline's queues on Redis (a profile with `broker: redis://"
        "127.0.0.1:6379/15`, the ledger and state embedded) on the same "
        f"{len(files):,} files. Each Redis run has its own raw pool, measured in turn; "
        '"× embedded" compares with the embedded row for the same N above (another run).',
        "",
    )
    rows = []
    for n, t in sorted(got.items()):
        base = embedded.get(n)
        rows.append(
            [
                str(n),
                t.sluiceway.fmt(0),
                t.sluiceway.range(0),
                t.pool.fmt(0),
                f"{t.sluiceway.median / t.pool.median:.2f}×",
                f"{t.sluiceway.median / base.sluiceway.median:.2f}×" if base else "—",
            ]
        )
    section.table(
        [
            "workers",
            "Sluiceway (Redis) files/s",
            "range",
            "raw pool files/s",
            "× raw pool",
            "× embedded",
        ],
        rows,
    )
    return got
