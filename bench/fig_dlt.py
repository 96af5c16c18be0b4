"""Figure 7: dlt, a peer, loading the same small CSV files filesystem → filesystem as Parquet.

dlt's ``filesystem`` source lists the files; each is read with PyArrow in a
``@dlt.transformer`` (dlt's own ``read_csv`` needs pandas, and its
``read_csv_duckdb`` fails on DuckDB 2.x), and the ``filesystem`` destination
writes Parquet. Each run is a fresh pipeline and destination, timed around
``pipeline.run`` with dlt already imported; telemetry is off, so it runs
offline.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import data
from .harness import ChildFailed, Section, Stats, fresh_dir, run_child

if TYPE_CHECKING:
    from .__main__ import Context


def dlt_load(folder: str, runs: int, work: str) -> dict[str, Any]:
    os.environ["RUNTIME__DLTHUB_TELEMETRY"] = "false"
    os.environ["DLT_DATA_DIR"] = f"{work}/dlt-home"
    import dlt
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq
    from dlt.sources.filesystem import filesystem

    @dlt.transformer(name="customers")
    def read_csv_arrow(items: Any) -> Any:
        for item in items:
            with item.open() as f:
                yield pacsv.read_csv(f)

    count = len(list(Path(folder).glob("*.csv")))
    rates = []
    rows = 0
    for run in range(runs):
        out = Path(work) / f"out-{run}"
        pipeline = dlt.pipeline(
            pipeline_name=f"bench_{run}",
            destination=dlt.destinations.filesystem(bucket_url=out.as_uri()),
            dataset_name="staging",
            pipelines_dir=f"{work}/pipelines",
        )
        files = filesystem(bucket_url=Path(folder).as_uri(), file_glob="*.csv")
        started = time.perf_counter()
        info = pipeline.run(files | read_csv_arrow(), loader_file_format="parquet")
        rates.append(count / (time.perf_counter() - started))
        info.raise_on_failed_jobs()
        rows = sum(pq.read_metadata(p).num_rows for p in out.glob("staging/customers/*.parquet"))
    return {"rates": rates, "rows": rows, "version": dlt.__version__}


def run(ctx: Context) -> Section:
    files = data.small_files(ctx.small_count)
    section = Section(f"7. Peer: dlt, the same {len(files):,} small CSV files → Parquet")
    work = fresh_dir("dlt")
    try:
        got = run_child(
            "bench.fig_dlt:dlt_load", folder=str(files[0].parent), runs=ctx.runs, work=str(work)
        )
    except ChildFailed as e:
        section.add(f"dlt could not be measured here:\n\n```\n{str(e)[-1500:]}\n```", "")
        section.target("peer: dlt measured", "failed", "runs offline", None)
        return section
    finally:
        shutil.rmtree(work, ignore_errors=True)
    dlt = Stats.of(got.result["rates"])
    expected = sum(len(f.read_text().splitlines()) - 1 for f in files)
    section.add(
        f"dlt {got.result['version']}, {ctx.runs} runs, each a fresh pipeline and destination "
        "directory, timed around `pipeline.run` (extract, normalize, load) with dlt imported. "
        f"It wrote {got.result['rows']:,} rows (the files hold {expected:,}). dlt batches: all "
        "files land in one Parquet file per load, with no per-file event, queue or ledger, and "
        "nothing is fsynced; Sluiceway writes one committed Parquet file per input.",
        "",
    )
    rows = [["dlt (filesystem → filesystem, parquet)", dlt.fmt(0), dlt.range(0), "1.00×"]]
    small = ctx.shared.get("small", {}).get(2)
    if small is not None:
        sw = small.sluiceway
        rows.append(
            [
                "Sluiceway, 2 workers (figure 2)",
                sw.fmt(0),
                sw.range(0),
                f"{sw.median / dlt.median:.2f}×",
            ]
        )
        rows.append(
            [
                "raw ProcessPoolExecutor(2) (figure 2)",
                small.pool.fmt(0),
                small.pool.range(0),
                f"{small.pool.median / dlt.median:.2f}×",
            ]
        )
    section.table(["contender", "files/s", "range", "× dlt"], rows)
    return section
