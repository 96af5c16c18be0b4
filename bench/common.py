"""What several figures share: the pipeline under test, the drop, the raw per-file conversion."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .harness import ROOT

if TYPE_CHECKING:
    from sluiceway import Pipeline

EXAMPLE = ROOT / "examples" / "bronze-to-staging" / "sluiceway.yaml"
FUNCTION = "csv-to-parquet"
COMPRESSION = "zstd"  # what the example pipeline writes; every contender does the same


def make_pipeline(root: Path, durability: str = "full") -> Path:
    """The example pipeline (bronze CSV → staging Parquet, zstd) in ``root``.

    ``durability: process`` (no fsync of outputs) is measured next to the
    default, so the cost of surviving an OS crash is visible.
    """
    root.mkdir(parents=True, exist_ok=True)
    path = root / "sluiceway.yaml"
    text = EXAMPLE.read_text()
    if durability != "full":
        text = f"durability: {durability}\n{text}"
    path.write_text(text)
    return path


def stage(files: Sequence[str | os.PathLike[str]], where: Path) -> list[Path]:
    """The inputs laid ready on the bucket's file system, on disk: the producer's upload.

    A hard link of the cached data file where it can be (the same inode, no
    copy), else a copy that keeps the old mtime, as an upload finished long
    ago would have. Outside the clock: the raw contenders are not charged for
    getting their input onto the disk either.
    """
    where.mkdir(parents=True, exist_ok=True)
    staged = []
    for f in files:
        target = where / Path(f).name
        try:
            os.link(f, target)
        except OSError:  # another file system
            shutil.copy2(f, target)
        staged.append(target)
    os.sync()
    return staged


QUIET = 0.5  # seconds to let the disk and the watcher settle before a timed run


def quiet() -> None:
    """Before a timed run: dirty pages written back, and a moment of calm."""
    os.sync()
    time.sleep(QUIET)


def drop(pipeline: Pipeline, staged: Sequence[Path], prefix: str) -> float:
    """Hard-link the staged files into bronze under ``prefix/``; the time the drop began.

    This is how a careful producer lands files: written aside, then linked
    (or renamed) in, so each appears complete at once. The prefix directory
    is made first, outside the clock, so the watcher has registered it when
    the files arrive (it would find them anyway: a new directory is walked).
    """
    where = pipeline.bucket("bronze").local_path(f"{prefix}/{staged[0].name}")
    if where is None:
        raise RuntimeError("the drop needs a local bronze bucket")
    folder = Path(where).parent
    folder.mkdir(parents=True)
    quiet()
    started = time.time()
    for f in staged:
        os.link(f, folder / f.name)
    return started


def raised(pipeline: Pipeline, key_prefix: str) -> tuple[float, float] | None:
    """When the first and the last event for the objects under ``key_prefix`` in bronze were raised.

    From the embedded ledger's record of object versions (``seen_at``);
    None where there is none.
    """
    row = pipeline.db.conn.execute(
        "SELECT MIN(seen_at), MAX(seen_at) FROM objects WHERE bucket = 'bronze' AND key LIKE ?",
        (f"{key_prefix}%",),
    ).fetchone()
    return None if row is None or row[0] is None else (row[0], row[1])


def raw_convert(src: str, dst: str) -> int:
    """The raw-library baseline for one file: read_csv + write_table, same types."""
    import pyarrow as pa
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    types = {"customer_id": pa.int64(), "signup_date": pa.date32()}
    table = pacsv.read_csv(src, convert_options=pacsv.ConvertOptions(column_types=types))
    pq.write_table(table, dst, compression=COMPRESSION)
    return table.num_rows


# The ledger's primary key range of one prefix: LIKE cannot use the index and
# would scan the whole ledger on every poll, CPU the service under test needs.
_UNDER = "key >= ? AND key < ?"


def _under(key_prefix: str) -> tuple[str, str]:
    start = f"{FUNCTION}|bronze/{key_prefix}"
    return start, start + "\U0010ffff"


def done_entries(pipeline: Pipeline, key_prefix: str) -> list[dict[str, Any]]:
    """Ledger info of the finished entries whose input key starts with ``key_prefix``."""
    rows = pipeline.db.conn.execute(
        "SELECT json_extract(info, '$.started_at'), json_extract(info, '$.finished_at'),"
        " json_extract(info, '$.input') FROM ledger"
        f" WHERE {_UNDER} AND +status = 'done'",
        _under(key_prefix),
    ).fetchall()
    return [{"started_at": r[0], "finished_at": r[1], "input": r[2]} for r in rows]


def wait_done(
    pipeline: Pipeline,
    key_prefix: str,
    count: int,
    timeout: float,
    check: Callable[[], None] | None = None,
) -> list[dict[str, Any]]:
    """Poll the ledger until ``count`` inputs under ``key_prefix`` are done.

    ``check`` is called on every poll and may raise (e.g. the service died).
    Polled every 50 ms: the driver shares the two cores with the service it
    measures, and a count over 10,000 entries takes about 2 ms. The clock is
    read from the entries' ``finished_at``, so how soon a poll notices the
    end changes no figure.
    """
    deadline = time.monotonic() + timeout
    while True:
        if check is not None:
            check()
        n = pipeline.db.conn.execute(
            f"SELECT COUNT(*) FROM ledger WHERE {_UNDER} AND +status = 'done'",
            _under(key_prefix),
        ).fetchone()[0]
        if n >= count:
            return done_entries(pipeline, key_prefix)
        if time.monotonic() > deadline:
            raise TimeoutError(f"only {n} of {count} files under {key_prefix!r} done")
        time.sleep(0.05)


class Service:
    """``sluiceway run --workers N`` in the background, as a user would run it.

    Warm: entering returns once every worker has committed a file, so the
    figures measure the running service, not interpreter start-up.
    """

    def __init__(self, pipeline_path: Path, workers: int, warm_file: Path) -> None:
        self.path = pipeline_path
        self.workers = workers
        self.warm_file = warm_file
        self.log = pipeline_path.parent / "service.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> Service:
        from sluiceway import Pipeline

        cmd = [sys.executable, "-c", "from sluiceway.cli import main; main()"]
        cmd += ["run", "--pipeline", str(self.path), "--workers", str(self.workers)]
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(cmd, cwd=self.path.parent, stdout=log, stderr=log)
        pipeline = Pipeline.from_file(self.path)
        try:
            for i in range(50):  # until each worker has done one file
                for j in range(self.workers):
                    pipeline.put(self.warm_file, "bronze", f"warm/{i}-{j}.csv")
                wait_done(pipeline, "warm/", (i + 1) * self.workers, 120, self.check)
                owners = pipeline.db.conn.execute(
                    "SELECT COUNT(DISTINCT owner) FROM ledger WHERE status = 'done'"
                ).fetchone()[0]
                if owners >= self.workers:
                    break
        except BaseException:
            self.__exit__()
            raise
        finally:
            pipeline.close()
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None, "the service is not running"
        return self.proc.pid

    def check(self) -> None:
        """Raise if the service has exited, with the end of its log."""
        if self.proc is not None and self.proc.poll() is not None:
            tail = self.log.read_text(errors="replace")[-3000:]
            raise RuntimeError(f"sluiceway run exited with {self.proc.returncode}:\n{tail}")

    def __exit__(self, *exc: object) -> None:
        if self.proc is None:
            return
        self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
