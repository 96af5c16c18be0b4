"""``write_parquet``: record batches into Parquet, committed atomically.

Unpartitioned, one object per input; partitioned (``partition_by``), a
Hive-style dataset written by PyArrow's dataset writer into a scratch
directory and then published file by file. Either way every name is derived
from the input's key, never from time or a counter, so a re-delivered message
rewrites the same objects with the same bytes instead of adding copies.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, Literal

import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
from pydantic import Field, field_validator

from .. import faults
from ..errors import InputError
from .base import Batches, StepContext, StepFn, StepOptions, StepSpecError, StepType, register
from .partition import PartitionBy, check_partition_by, derive, partition_spec

if TYPE_CHECKING:
    from ..config import PipelineConfig

KNOWN_COMPOUND_EXTENSIONS = (".csv.gz", ".csv.zip", ".tsv.gz", ".json.gz", ".jsonl.gz")


def key_fields(bucket: str, key: str) -> dict[str, str]:
    """Names a key template may use, e.g. for ``in/2026/customers.csv.gz``:
    ``path`` = ``in/2026/customers``, ``name`` = ``customers.csv.gz``,
    ``stem`` = ``customers``, ``dir`` = ``in/2026``, ``ext`` = ``.csv.gz``."""
    directory, _, name = key.rpartition("/")
    ext = next((e for e in KNOWN_COMPOUND_EXTENSIONS if name.lower().endswith(e)), None)
    if ext is None:
        dot = name.rfind(".")
        ext = name[dot:] if dot > 0 else ""
    stem = name[: len(name) - len(ext)] if ext else name
    return {
        "bucket": bucket,
        "key": key,
        "name": name,
        "stem": stem,
        "ext": ext,
        "dir": directory,
        "path": f"{directory}/{stem}" if directory else stem,
    }


def render_key(template: str, bucket: str, key: str) -> str:
    out = template.format(**key_fields(bucket, key))
    return out.lstrip("/")


#: A row group is written once it has ``row_group_size`` rows or this many
#: bytes of Arrow data, whichever comes first, so wide rows cannot make the
#: two row groups in memory (one filling, one encoding) outgrow the 512 MiB
#: budget.
ROW_GROUP_BYTES = 64 << 20
#: What PyArrow writes is gathered into pieces of this size for the file object.
SINK_BUFFER_BYTES = 1 << 20
#: Rows of the first batch looked at to choose the columns worth a dictionary.
DICTIONARY_SAMPLE = 1 << 16


def dictionary_columns(batch: pa.RecordBatch) -> list[str] | bool:
    """The columns to dictionary-encode: those whose values repeat, judged by ``batch``.

    PyArrow dictionary-encodes every column by default and falls back to
    plain encoding only once a column chunk's dictionary outgrows 1 MiB, after
    paying for hashing every value. For columns that are mostly distinct (ids,
    e-mail addresses, amounts) that costs more than half of their encoding
    time and makes the file larger, not smaller. So a column gets a dictionary
    when at most half of the sampled values are distinct; files with nested
    columns, whose leaves this does not look at, keep PyArrow's default.
    """
    if any(pa.types.is_nested(field.type) for field in batch.schema):
        return True
    sample = batch.slice(0, DICTIONARY_SAMPLE)
    chosen = []
    for field, column in zip(batch.schema, sample.columns, strict=True):
        try:
            # unique() counts a null as one value, as count_distinct(mode="all")
            # does, at half its cost for strings (no scalar aggregate around it).
            distinct = len(column.unique())
        except pa.ArrowNotImplementedError:
            distinct = 0  # a type without hashing: leave it to PyArrow
        if distinct * 2 <= sample.num_rows:
            chosen.append(field.name)
    return chosen


class RowGroupWriter:
    """Batches into Parquet row groups of ``row_group_size`` rows, encoded in the background.

    PyArrow's ``write_batch`` makes a row group of every batch it is given, so
    a CSV read in 4 MiB blocks became row groups of a few tens of thousands of
    rows whatever ``row_group_size`` said: slower to write (each restarts its
    dictionaries) and a third larger. So batches are collected (zero-copy)
    until a row group is full, and each full one is encoded and compressed in
    a second thread, which PyArrow runs without the GIL, while the next is
    read: the time approaches the larger of reading and writing rather than
    their sum. At most one row group is being encoded while the next fills. The
    last group has nothing to overlap with and is encoded in the caller's thread,
    so a small file (one group) never starts a thread.
    """

    def __init__(
        self, f: Any, first: pa.RecordBatch, compression: str | None, row_group_size: int
    ) -> None:
        self._schema = first.schema
        self._rows_per_group = row_group_size
        # PyArrow writes a file in many small pieces (each page, its header,
        # the footer's parts): a small file took about twenty calls into Python,
        # each taking the GIL (from the encoder thread too) and going through
        # the bucket's hashing writer. Gathered natively, it takes one.
        self._sink = pa.BufferedOutputStream(pa.PythonFile(f, mode="w"), SINK_BUFFER_BYTES)
        #: The file's size once closed (what a bucket's head would say, without asking it).
        self.size: int | None = None
        try:
            self._writer = pq.ParquetWriter(
                self._sink,
                self._schema,
                compression=compression,
                use_dictionary=dictionary_columns(first),
            )
        except BaseException:
            self._release_sink()
            raise
        # Started by the first full row group: a file of one group is encoded
        # in finish(), with nothing left to overlap, and starting a thread
        # would cost a small file more than its encoding does.
        self._pool: ThreadPoolExecutor | None = None
        self._encoding: Future[None] | None = None
        self._pending: list[pa.RecordBatch] = []
        self._rows = 0
        self._bytes = 0

    def add(self, batch: pa.RecordBatch) -> None:
        if not batch.schema.equals(self._schema):
            if not batch.schema.equals(self._schema, check_metadata=False):
                # PyArrow's own error for a stream whose schema changes.
                self._wait()
                self._writer.write_batch(batch)
            batch = pa.RecordBatch.from_arrays(batch.columns, schema=self._schema)
        self._pending.append(batch)
        self._rows += batch.num_rows
        self._bytes += batch.nbytes
        while self._rows >= self._rows_per_group:
            table = pa.Table.from_batches(self._pending, self._schema)
            self._submit(table.slice(0, self._rows_per_group))
            rest = table.slice(self._rows_per_group)
            self._pending, self._rows = rest.to_batches(), rest.num_rows
            self._bytes = rest.nbytes
        if self._bytes >= ROW_GROUP_BYTES:
            self._submit(pa.Table.from_batches(self._pending, self._schema))
            self._pending, self._rows, self._bytes = [], 0, 0

    def finish(self) -> None:
        """Write what is left and wait for it; errors of the encoder surface here."""
        self._wait()
        if self._pending:  # the last group: nothing to read meanwhile, so encode it here
            table = pa.Table.from_batches(self._pending, self._schema)
            self._pending = []
            self._writer.write_table(table, row_group_size=self._rows_per_group)

    def close(self) -> None:
        """Finish the file (its footer), also after an error, and stop the thread."""
        try:
            with contextlib.suppress(Exception):
                self._wait()  # an error here was raised by finish() or is moot
            try:
                self._writer.close()
                self.size = self._sink.tell()
            finally:
                self._release_sink()
        finally:
            if self._pool is not None:
                self._pool.shutdown(wait=True)

    def _release_sink(self) -> None:
        """Hand the buffered rest to ``f``, which stays open: its owner's business."""
        try:
            self._sink.detach()
        except BaseException:
            # ``f`` refused it (a full disk): drop it now, or the stream's
            # destructor would try again, on a file closed by then.
            with contextlib.suppress(Exception):
                self._sink.close()
            raise

    def _submit(self, table: pa.Table) -> None:
        self._wait()
        if self._pool is None:
            self._pool = ThreadPoolExecutor(1, thread_name_prefix="sluiceway-parquet")
        self._encoding = self._pool.submit(
            self._writer.write_table, table, row_group_size=self._rows_per_group
        )

    def _wait(self) -> None:
        # No timeout: the encoder is a finite CPU job writing into our own
        # aside file, and one that timed out could not be stopped safely (it
        # would still be writing while the file is closed); a stuck worker is
        # the visibility timeout's business, as for any step.
        encoding, self._encoding = self._encoding, None
        if encoding is not None:
            encoding.result()


class WriteParquetOptions(StepOptions):
    bucket: str
    key: str = "{path}.parquet"
    compression: Literal["snappy", "zstd", "gzip", "lz4", "brotli", "none"] = "snappy"
    row_group_size: int = Field(1 << 18, ge=1)  # Polars' default; DuckDB's is 122,880
    # Hive partitioning: column names, or {date|year|month|day|hour: column}.
    partition_by: PartitionBy | None = None
    # With partition_by: the dataset's root, from the same fields as `key`.
    dataset: str = "{dir}"
    max_open_files: int = Field(256, ge=1)

    @field_validator("partition_by")
    @classmethod
    def _check_parts(cls, parts: PartitionBy | None) -> PartitionBy | None:
        if parts is not None and not parts:
            raise ValueError("partition_by needs at least one column")
        return None if parts is None else check_partition_by(parts)


@register
class WriteParquet(StepType):
    name = "write_parquet"
    Options = WriteParquetOptions

    def check(self, raw: Any, cfg: PipelineConfig) -> None:
        opts = self.options(raw)
        assert isinstance(opts, WriteParquetOptions)
        if opts.bucket not in cfg.buckets:
            raise StepSpecError(f"unknown bucket {opts.bucket!r}", (self.name, "bucket"))
        for field in ("key", "dataset"):
            template = getattr(opts, field)
            try:
                render_key(template, "b", "dir/file.csv")
            except (KeyError, IndexError, ValueError) as e:
                raise StepSpecError(
                    f"bad template {template!r}: unknown field {e} "
                    "(use {path}, {key}, {name}, {stem}, {ext}, {dir}, {bucket})",
                    (self.name, field),
                ) from None

    def build(self, raw: Any, cfg: PipelineConfig) -> StepFn:
        opts = self.options(raw)
        assert isinstance(opts, WriteParquetOptions)
        if opts.partition_by:
            return self._build_partitioned(opts)
        compression = None if opts.compression == "none" else opts.compression

        def write_parquet(ctx: StepContext, batches: Batches | None) -> Batches:
            assert batches is not None, "write_parquet needs a step before it"
            event = ctx.event
            out_key = render_key(opts.key, event.bucket or "", event.key or event.id)
            chunk = event.detail.get("chunk")
            if isinstance(chunk, dict):  # one range of a chunked input (steps/chunks.py)
                out_key = f"{out_key}.parts/part-{chunk['index']:05d}.parquet"
            bucket = ctx.bucket(opts.bucket)
            rows = 0
            with bucket.open_write(out_key) as f:
                writer: RowGroupWriter | None = None
                try:
                    for batch in batches:
                        faults.point("during_read")
                        if writer is None:
                            writer = RowGroupWriter(f, batch, compression, opts.row_group_size)
                        writer.add(batch)
                        faults.point("during_write")
                        rows += batch.num_rows
                    if writer is not None:
                        writer.finish()
                finally:
                    if writer is not None:
                        writer.close()
                if writer is None and not isinstance(chunk, dict):
                    raise InputError("no rows to write", file=ctx.input_name)
            if writer is None:  # a chunk that owns no row: no part
                bucket.delete(out_key)
                return iter(())
            ctx.count("rows_written", rows)
            ctx.outputs.append(
                {"bucket": opts.bucket, "key": out_key, "rows": rows, "bytes": writer.size}
            )
            return iter(())

        return write_parquet

    def _build_partitioned(self, opts: WriteParquetOptions) -> StepFn:
        assert opts.partition_by
        spec = partition_spec(opts.partition_by)
        compression = None if opts.compression == "none" else opts.compression

        def with_partitions(ctx: StepContext, batches: Batches) -> Iterator[pa.RecordBatch]:
            for batch in batches:
                for name, column, fmt in spec:
                    if column not in batch.schema.names:
                        raise InputError(
                            f"partition column {column!r} is not in the data "
                            f"(columns: {', '.join(batch.schema.names)})",
                            file=ctx.input_name,
                            field=column,
                        )
                    if fmt is None:
                        continue
                    value = derive(batch, name, column, fmt, ctx.input_name)
                    if name in batch.schema.names:
                        batch = batch.drop_columns([name])
                    batch = batch.append_column(name, value)
                yield batch
                faults.point("during_write")

        def write_partitioned(ctx: StepContext, batches: Batches | None) -> Batches:
            assert batches is not None, "write_parquet needs a step before it"
            event = ctx.event
            root = render_key(opts.dataset, event.bucket or "", event.key or event.id).strip("/")
            ident = hashlib.sha1(event.input_identity.rsplit("@", 1)[0].encode()).hexdigest()[:16]
            stream = with_partitions(ctx, batches)
            first = next(stream, None)
            if first is None:
                raise InputError("no rows to write", file=ctx.input_name)

            def chained() -> Iterator[pa.RecordBatch]:
                yield first
                yield from stream

            reader = pa.RecordBatchReader.from_batches(first.schema, chained())
            partitioning = ds.partitioning(
                pa.schema([first.schema.field(name) for name, _, _ in spec]).with_metadata({}),
                flavor="hive",
            )
            bucket = ctx.bucket(opts.bucket)
            written: list[tuple[str, int]] = []
            with bucket.scratch_dir() as scratch:
                ds.write_dataset(
                    reader,
                    scratch,
                    format="parquet",
                    partitioning=partitioning,
                    basename_template=f"part-{ident}-{{i}}.parquet",
                    existing_data_behavior="overwrite_or_ignore",
                    max_open_files=opts.max_open_files,
                    # As unpartitioned: dictionaries only where values repeat, and
                    # row groups of at most row_group_size rows.
                    file_options=ds.ParquetFileFormat().make_write_options(
                        compression=compression, use_dictionary=dictionary_columns(first)
                    ),
                    max_rows_per_group=opts.row_group_size,
                    file_visitor=lambda f: written.append(
                        (f.path, f.metadata.num_rows if f.metadata is not None else 0)
                    ),
                )
                rows = 0
                for path, n in sorted(written):
                    rel = os.path.relpath(path, scratch).replace(os.sep, "/")
                    key = f"{root}/{rel}" if root else rel
                    info = bucket.put_file(key, path)
                    rows += n
                    ctx.outputs.append(
                        {"bucket": opts.bucket, "key": key, "rows": n, "bytes": info.size}
                    )
            ctx.count("rows_written", rows)
            return iter(())

        return write_partitioned
