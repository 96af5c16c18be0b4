"""Figure 6: scaling with worker processes, and cost growth with file size.

Throughput reuses figure 2's method (warm ``sluiceway run --workers N``
against a warm ``ProcessPoolExecutor(N)``) for N = 1, 2, 4 on a 2-core
machine, then for N = 1 and 4 with the queues on each network broker
(Redis Streams, RabbitMQ, NATS JetStream, SQS on moto_server). Cost growth
reuses figure 1's: Sluiceway against the fastest raw tool of figure 1, time
and peak RSS, at each file size. Both go into bench/scaling.png.
"""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import data, fig_large, fig_small
from .harness import ChildFailed, Section, fresh_dir, mb, run_child

if TYPE_CHECKING:
    from .__main__ import Context

WORKERS = (1, 2, 4)
BROKER_WORKERS = (1, 4)
PLOT = Path(__file__).resolve().parent / "scaling.png"


def run(ctx: Context) -> Section:
    section = Section("6. Scaling")
    files = data.small_files(ctx.small_count)[: ctx.scaling_count]
    throughput: dict[int, fig_small.Throughput] = dict(ctx.shared.get("small", {}))
    reused = "".join(f" N = {n} is figure 2's, on {ctx.small_count:,} files." for n in throughput)
    for n in WORKERS:
        if n not in throughput:
            throughput[n] = fig_small.measure(files, n, ctx.runs, through_put=False)
    one = throughput[1].sluiceway.median
    section.add(
        f"### Throughput with worker processes ({ctx.runs} runs)",
        "",
        f"As figure 2, with N workers for Sluiceway and N processes for the raw pool, on "
        f"{len(files):,} small files per run.{reused} Sluiceway's clock starts at the drop "
        "(the staged files hard-linked into the bucket) and stops at the last commit; the raw "
        "pool reads the same files already on disk. The machine has "
        f"{ctx.cores} cores, so 4 workers oversubscribe it.",
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

    brokers = broker_profiles(ctx, section, files, throughput)

    fig1_size, fig1 = ctx.shared.get("large", (0, {}))
    sizes = ctx.growth_sizes
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
        f"As figure 1: Sluiceway from the drop into the bucket to the commit against "
        f"**{raw_name}** (figure 1's fastest raw "
        "tool), each run in a fresh process; the other raw tools are left out here to keep the "
        "run short (the largest file alone takes minutes per contender).",
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
    plot(throughput, growth, raw_name, brokers)
    section.add(f"![scaling]({PLOT.name})", "")
    return section


def plot(
    throughput: dict[int, fig_small.Throughput],
    growth: dict[int, dict[str, fig_large.Measured]],
    raw_name: str,
    brokers: dict[str, dict[int, fig_small.Throughput]] | None = None,
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
    for broker, by_n in (brokers or {}).items():
        rn = sorted(by_n)
        stats = [by_n[n].sluiceway for n in rn]
        med = [s.median for s in stats]
        err = [
            [m - s.lo for m, s in zip(med, stats, strict=True)],
            [s.hi - m for m, s in zip(med, stats, strict=True)],
        ]
        ax1.errorbar(rn, med, yerr=err, marker="s", capsize=4, label=f"Sluiceway, {broker}")
    ax1.set(
        xlabel="worker processes",
        ylabel="files/s",
        title="Small files: throughput",
        xticks=ns,
        ylim=(0, None),
    )
    ax1.legend(fontsize="small")

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


# -- the network broker profiles -----------------------------------------------------------

# Quick mode keeps these short: 8 services to start (4 brokers × 1 and 4 workers).
BROKER_COUNT = {"quick": 20, "full": 500}
PASSWORD_VARIABLE = "SLUICEWAY_BENCH_BROKER_PASSWORD"


def _profile_url(url: str) -> str:
    """``url`` for a profile file: a password moves to the environment (files may hold none)."""
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    if parts.password is None:
        return url
    os.environ[PASSWORD_VARIABLE] = parts.password
    netloc = parts.netloc.replace(f":{parts.password}@", f":${{{PASSWORD_VARIABLE}}}@")
    return parts._replace(netloc=netloc).geturl()


def broker_throughput(
    files: list[str], workers: int, runs: int, work: str, broker: str, endpoint: str
) -> dict[str, list[float]]:
    """Figure 2's throughput with the queues on ``broker`` (profile ``bench-broker``).

    The ledger and state stay embedded, so the broker is the only change from
    the embedded rows. Everything the run created on the broker is deleted after.
    """
    from sluiceway import Pipeline

    from .common import make_pipeline
    from .fig_brokers import _url

    prefix = f"b{uuid.uuid4().hex[:8]}"
    url = _url(broker, endpoint, prefix)
    folder = Path(work) / "pipeline"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "profiles.yaml").write_text(
        f'bench-broker:\n  broker: "{_profile_url(url)}"\n', encoding="utf-8"
    )
    os.environ["SLUICEWAY_PROFILE"] = "bench-broker"  # the service and its workers inherit it
    os.environ.setdefault("AWS_ACCESS_KEY_ID", "bench")  # moto takes any credentials
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "bench")
    check = Pipeline.from_file(make_pipeline(folder))
    if type(check.broker).__name__ == "SqliteBroker":
        raise RuntimeError(f"the profile did not take: broker is {check.broker!r}")
    try:
        return fig_small.throughput(files, workers, runs, work, through_put=False)
    finally:
        b: Any = check.broker
        if broker == "Redis Streams":
            from sluiceway.queues.redis import delete_prefix

            delete_prefix(b.conn.client, f"{prefix}-")
        elif hasattr(b, "destroy"):
            b.destroy()
        b.close()
        check.close()


def _first_events(got: dict[str, dict[int, fig_small.Throughput]]) -> str:
    """How long after the drop the first event came, over all broker runs: a fixed delay."""
    firsts = [x for by_n in got.values() for t in by_n.values() if t.first for x in t.first.values]
    if not firsts:
        return ""
    return (
        f" The first event of a run came {min(firsts):.2f}–{max(firsts):.2f} s after the drop "
        "(the watcher's notice of the first file and the first publish): with "
        "this few files per run that delay weighs on the rates."
    )


def broker_profiles(
    ctx: Context,
    section: Section,
    files: list[Path],
    embedded: dict[int, fig_small.Throughput],
) -> dict[str, dict[int, fig_small.Throughput]]:
    """Throughput with 1 and 4 workers on each network broker, against the embedded runs."""
    from .fig_brokers import moto_server, reachable

    count = BROKER_COUNT["quick" if ctx.quick else "full"]
    files = files[:count]
    section.add(f"### On the network brokers ({ctx.runs} runs)", "")
    brokers, why = reachable()
    got: dict[str, dict[int, fig_small.Throughput]] = {}
    failures: list[str] = []
    with moto_server() as endpoint:
        if endpoint is None:
            why["SQS (moto_server)"] = "moto_server (moto[server]) is missing or did not start"
        else:
            brokers.append("SQS (moto_server)")
        for broker in brokers:
            for n in BROKER_WORKERS:
                work = fresh_dir("small-broker")
                try:
                    raw: Any = run_child(
                        "bench.fig_scaling:broker_throughput",
                        files=[str(f) for f in files],
                        workers=n,
                        runs=ctx.runs,
                        work=str(work),
                        broker=broker,
                        endpoint=endpoint or "",
                    ).result
                except ChildFailed as e:
                    failures.append(f"{broker}, {n} worker(s):\n\n```\n{str(e)[-1500:]}\n```")
                    continue
                finally:
                    shutil.rmtree(work, ignore_errors=True)
                got.setdefault(broker, {})[n] = fig_small.Throughput.of(raw)
    section.add(
        "As above, with the pipeline's queues on each network broker (a profile with only "
        "`broker:` set; ledger and state embedded), on the first "
        f"{len(files):,} of those files per run: Redis, RabbitMQ and NATS JetStream on "
        "127.0.0.1, SQS on a `moto_server` the bench starts on loopback (an emulator: it says "
        "what the client side costs, not what AWS does). Each run has its own raw pool, "
        'measured in turn. "4 vs 1" is the speed-up from 1 to 4 workers on that broker; '
        '"× embedded" compares with the embedded row for the same N above (another run, '
        "more files). On 2 cores, 4 workers share the cores with the broker and the watcher. "
        'As above the files are dropped into the bucket; "events raised" is how fast the '
        "service's one watcher raised their events from the drop (notice, ETag, event, publish "
        "to the broker): the end-to-end rate cannot exceed it, so where the two are close the "
        "watcher, not the workers, sets the pace." + _first_events(got),
        "",
    )
    rows = []
    for broker, by_n in got.items():
        one = by_n.get(1)
        for n, t in sorted(by_n.items()):
            base = embedded.get(n)
            rows.append(
                [
                    broker,
                    str(n),
                    t.sluiceway.fmt(0),
                    t.sluiceway.range(0),
                    t.raised.fmt(0) if t.raised else "—",
                    t.pool.fmt(0),
                    f"{t.sluiceway.median / t.pool.median:.2f}×",
                    f"{t.sluiceway.median / one.sluiceway.median:.2f}×" if one else "—",
                    f"{t.sluiceway.median / base.sluiceway.median:.2f}×" if base else "—",
                ]
            )
    section.table(
        [
            "broker",
            "workers",
            "Sluiceway files/s",
            "range",
            "events raised files/s",
            "raw pool files/s",
            "× raw pool",
            "4 vs 1",
            "× embedded",
        ],
        rows,
    )
    for broker, reason in why.items():
        section.add(f"{broker}: not measured: {reason}.", "")
    for failure in failures:
        section.add(f"Failed: {failure}", "")
    return got
