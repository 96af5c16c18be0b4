"""Compaction: merge a partition's small flush files into one, without losing or doubling rows.

A stream function writes one file per partition per flush, so a quiet
partition collects many small files. ``sluiceway compact lake/events``
merges, per partition directory and function, each run of consecutive small
files (in stream order) into one file named for the whole seq range::

    part-0000000000000001-0000000000000050-to-lake.parquet  ┐
    part-0000000000000051-0000000000000100-to-lake.parquet  ├→ part-…0001-…0150-to-lake.parquet
    part-0000000000000101-0000000000000150-to-lake.parquet  ┘

The merged file is written aside and published atomically *first*; only then
are its inputs deleted. So a reader never misses a row. A reader that lists
the directory in the few milliseconds between the two (or after a crash
between them, until the next ``compact`` removes the leftovers) can see a
row twice, unless it applies the rule this naming makes possible: **a file
whose seq range lies inside another file's range (same function) is
superseded and must be skipped.** ``live_files`` and ``read_dataset`` here
apply it; with them a concurrent reader sees every row exactly once.

Only flushes a function has committed (``to <= checkpoint``) are merged, so
compaction never races the replay of an unfinished flush. One compaction per
dataset runs at a time (a lease in the state database).

Datasets written by stream functions on Lambda (``aws/streams.py``) name
their files ``part-<first>-<last>-<function>.<shard>.<ext>``, one writer per
shard, with the shard's checkpoint in the DynamoDB state table next to the
ledger: run with the same profile (its ``dynamodb://`` ledger), ``compact``
merges each shard's committed files as it does a local function's. The lease
is local, so run one ``compact`` per dataset at a time.
"""

from __future__ import annotations

import io
import posixpath
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from .buckets.base import Bucket
from .errors import SluicewayError
from .steps.dataset import parse_part_name, part_name
from .streams.lease import Lease

if TYPE_CHECKING:
    from .pipeline import Pipeline

SMALL_BYTES = 32 << 20  # files under this are merged …
TARGET_ROWS = 1_000_000  # … into files of at most this many rows
LEASE_TTL = 600.0


@dataclass(frozen=True)
class PartFile:
    """One data file of a dataset, with what its name says."""

    key: str
    directory: str
    from_seq: int
    to_seq: int
    function: str
    format: str
    size: int

    def covers(self, other: PartFile) -> bool:
        """This file's range contains ``other``'s (and is not the same file)."""
        return (
            self.key != other.key
            and self.function == other.function
            and self.from_seq <= other.from_seq
            and other.to_seq <= self.to_seq
            and (self.from_seq, self.to_seq) != (other.from_seq, other.to_seq)
        )


@dataclass
class CompactReport:
    merged: list[dict[str, Any]] = field(default_factory=list)
    removed_superseded: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "merged": self.merged,
            "removed_superseded": self.removed_superseded,
            "skipped": self.skipped,
        }


def part_files(bucket: Bucket, prefix: str = "") -> list[PartFile]:
    """Every ``part-…`` file under ``prefix``, in key order."""
    prefix = prefix.strip("/")
    out = []
    for info in bucket.list(f"{prefix}/" if prefix else ""):
        directory, _, name = info.key.rpartition("/")
        parsed = parse_part_name(name)
        if parsed is not None:
            lo, hi, function, fmt = parsed
            out.append(PartFile(info.key, directory, lo, hi, function, fmt, info.size))
    return out


def split_superseded(files: Iterable[PartFile]) -> tuple[list[PartFile], list[PartFile]]:
    """(live, superseded): a file inside another file's range in its directory is superseded."""
    by_dir: dict[tuple[str, str], list[PartFile]] = {}
    for f in files:
        by_dir.setdefault((f.directory, f.function), []).append(f)
    live: list[PartFile] = []
    dead: list[PartFile] = []
    for group in by_dir.values():
        for f in group:
            (dead if any(g.covers(f) for g in group) else live).append(f)
    live.sort(key=lambda f: f.key)
    dead.sort(key=lambda f: f.key)
    return live, dead


def live_files(bucket: Bucket, prefix: str = "") -> list[str]:
    """Keys a reader should read: every row once, even mid-compaction."""
    return [f.key for f in split_superseded(part_files(bucket, prefix))[0]]


def read_dataset(bucket: Bucket, prefix: str = "", format: str = "parquet") -> ds.Dataset:
    """A PyArrow dataset of the live files, Hive partitions as columns (local buckets)."""
    root = getattr(bucket, "root", None)
    if root is None:
        raise SluicewayError(f"bucket {bucket.name!r} has no local directory to read from")
    base = posixpath.join(str(root), prefix.strip("/")) if prefix.strip("/") else str(root)
    paths = [bucket.local_path(k) for k in live_files(bucket, prefix)]
    fmt = "json" if format == "jsonl" else format
    return ds.dataset(
        [p for p in paths if p is not None],
        format=fmt,
        partitioning="hive",
        partition_base_dir=base,
    )


def _rows(bucket: Bucket, f: PartFile) -> int:
    with bucket.open_read(f.key) as fh:
        if f.format == "parquet":
            return int(pq.ParquetFile(fh).metadata.num_rows)
        return sum(1 for line in fh if line.strip())


def _merge(bucket: Bucket, files: list[PartFile]) -> tuple[str, int, int]:
    """Write the merged file (atomically); returns (key, rows, bytes). Inputs stay."""
    first, last = files[0], files[-1]
    name = part_name(first.from_seq, last.to_seq, first.function, first.format)
    key = f"{first.directory}/{name}" if first.directory else name
    if first.format == "parquet":
        tables = []
        for f in files:
            with bucket.open_read(f.key) as fh:
                # ParquetFile, not read_table: the path's partitions must not become columns.
                tables.append(pq.ParquetFile(fh).read())
        table = pa.concat_tables(tables, promote_options="permissive")
        with bucket.open_write(key) as out:
            pq.write_table(table, out, compression="zstd")
        rows = table.num_rows
    else:
        buf = io.BytesIO()
        for f in files:
            data = bucket.read_bytes(f.key)
            buf.write(data if data.endswith(b"\n") or not data else data + b"\n")
        with bucket.open_write(key) as out:
            out.write(buf.getvalue())
        rows = sum(1 for line in buf.getvalue().splitlines() if line.strip())
    return key, rows, bucket.head(key).size


def compact(
    pipeline: Pipeline,
    bucket_name: str,
    prefix: str = "",
    *,
    small_bytes: int = SMALL_BYTES,
    target_rows: int = TARGET_ROWS,
    dry_run: bool = False,
) -> CompactReport:
    """Merge runs of small committed files per partition; remove superseded leftovers."""
    bucket = pipeline.bucket(bucket_name)
    lease = Lease(pipeline.db, f"compact:{bucket_name}/{prefix.strip('/')}", ttl=LEASE_TTL)
    if not dry_run and not lease.acquire():
        raise SluicewayError(f"another compaction of {bucket_name}/{prefix} is running")
    report = CompactReport()
    try:
        live, dead = split_superseded(part_files(bucket, prefix))
        for f in dead:
            report.removed_superseded.append(f.key)
            if not dry_run:
                bucket.delete(f.key)
        checkpoints = _Checkpoints(pipeline)
        groups: dict[tuple[str, str], list[PartFile]] = {}
        for f in live:
            groups.setdefault((f.directory, f.function), []).append(f)
        for (directory, function), files in sorted(groups.items()):
            committed, why_not = checkpoints.of(function)
            if committed is None:
                report.skipped.append(f"{directory}: files of {function!r}, {why_not}")
                continue
            for run in _runs(bucket, files, committed, small_bytes, target_rows):
                entry: dict[str, Any] = {
                    "directory": directory,
                    "inputs": [f.key for f in run],
                }
                if not dry_run:
                    key, rows, size = _merge(bucket, run)
                    for f in run:  # only after the merged file is in place
                        bucket.delete(f.key)
                    entry.update({"key": key, "rows": rows, "bytes": size})
                report.merged.append(entry)
    finally:
        checkpoints.close()
        if not dry_run:
            lease.release()
    return report


class _Checkpoints:
    """How far each writer of a dataset has committed: a local function, or one on Lambda."""

    def __init__(self, pipeline: Pipeline) -> None:
        self.pipeline = pipeline
        self.known: dict[str, tuple[int | None, str]] = {}
        self._lambda: Any = None
        self._lambda_shards: dict[str, dict[str, Any]] = {}

    def of(self, writer: str) -> tuple[int | None, str]:
        """(the last committed seq, or None with the reason nothing can be merged)."""
        if writer not in self.known:
            self.known[writer] = self._lookup(writer)
        return self.known[writer]

    def _lookup(self, writer: str) -> tuple[int | None, str]:
        from .aws.streams import parse_writer

        functions = self.pipeline.config.functions
        fn = functions.get(writer)
        if fn is not None and fn.stream is not None:
            return self.pipeline.stream(fn.stream).checkpoint(writer), ""
        parsed = parse_writer(writer)
        if parsed is None or functions.get(parsed[0]) is None or not functions[parsed[0]].stream:
            return None, "not a stream function"
        function, shard = parsed
        if self._lambda is None:
            from .aws.streams import lambda_stream_state

            self._lambda = lambda_stream_state(self.pipeline) or False
        if self._lambda is False:
            return None, "written on Lambda: use the profile with its dynamodb:// ledger"
        if function not in self._lambda_shards:
            self._lambda_shards[function] = self._lambda.shards(function)
        state = self._lambda_shards[function].get(shard)
        if state is None or state.committed_number is None:
            return None, f"nothing of {function!r} on {shard} is committed yet"
        return state.committed_number, ""

    def close(self) -> None:
        if self._lambda:
            self._lambda.close()


def _runs(
    bucket: Bucket, files: list[PartFile], committed: int, small_bytes: int, target_rows: int
) -> list[list[PartFile]]:
    """Groups of ≥ 2 consecutive small committed files, each ≤ target_rows rows.

    Consecutive matters: a merged file's range must not cover a file it does
    not contain, or readers would skip that file as superseded.
    """
    out: list[list[PartFile]] = []
    run: list[PartFile] = []
    rows = 0

    def close() -> None:
        nonlocal run, rows
        if len(run) >= 2:
            out.append(run)
        run, rows = [], 0

    for f in sorted(files, key=lambda f: f.from_seq):
        if f.size >= small_bytes or f.to_seq > committed:
            close()
            continue
        n = _rows(bucket, f)
        if run and (rows + n > target_rows or run[-1].format != f.format):
            close()
        run.append(f)
        rows += n
    close()
    return out
