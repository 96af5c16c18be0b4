"""``write_dataset``: a stream function's flush into a Hive-partitioned dataset.

::

    - write_dataset:
        bucket: lake
        prefix: events              # the dataset's root in the bucket ("" = the bucket root)
        format: parquet             # or jsonl
        partition_by: [event_name, {date: created_at}]
        flush_records: 10000        # flush when this many records are buffered …
        flush_seconds: 60s          # … or the oldest has waited this long

Each flush writes one file per partition it touches::

    events/event_name=signup/date=2026-11-24/part-<from>-<to>-<function>.parquet

``from``/``to`` are the flush's stream seqs (zero-padded, so names sort in
stream order) and ``function`` the stream function: a replayed flush rewrites
the very same keys, and a compacted file named for a wider range says which
small files it replaces (see ``sluiceway.compact``). Files are bounded by
``flush_records`` (at most one flush's rows) and grow with traffic up to
it; ``sluiceway compact`` merges the small ones. Partition values are
formatted by PyArrow's Hive partitioning (URL-encoded), partition columns
live in the path only, and rows keep stream order inside a file.
"""

from __future__ import annotations

import io
import json
from datetime import datetime
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.parquet as pq
from pydantic import Field, field_validator

from ..config import Duration
from ..errors import InputError
from .base import Batches, StepContext, StepFn, StepOptions, StepSpecError, StepType, register
from .partition import PartitionBy, check_partition_by, derive, partition_spec

if TYPE_CHECKING:
    from ..config import PipelineConfig

EXTENSIONS = {"parquet": ".parquet", "jsonl": ".jsonl"}
SEQ_DIGITS = 16


def part_name(from_seq: int, to_seq: int, function: str, fmt: str) -> str:
    """The deterministic file name of a flush (or a compaction) of one partition."""
    return f"part-{from_seq:0{SEQ_DIGITS}d}-{to_seq:0{SEQ_DIGITS}d}-{function}{EXTENSIONS[fmt]}"


def parse_part_name(name: str) -> tuple[int, int, str, str] | None:
    """``part-<from>-<to>-<function>.<ext>`` → (from, to, function, format), else None."""
    for fmt, ext in EXTENSIONS.items():
        if name.startswith("part-") and name.endswith(ext):
            body = name[len("part-") : -len(ext)]
            parts = body.split("-", 2)
            if len(parts) == 3 and parts[0].isdigit() and parts[1].isdigit() and parts[2]:
                return int(parts[0]), int(parts[1]), parts[2], fmt
    return None


class WriteDatasetOptions(StepOptions):
    bucket: str
    prefix: str = ""
    format: Literal["parquet", "jsonl"] = "parquet"
    partition_by: PartitionBy = Field(default_factory=list)
    flush_records: int = Field(10_000, ge=1, le=1_000_000)
    flush_seconds: Duration = 60.0
    compression: Literal["snappy", "zstd", "gzip", "lz4", "brotli", "none"] = "zstd"
    row_group_size: int = Field(100_000, ge=1)

    @field_validator("partition_by")
    @classmethod
    def _check_parts(cls, parts: PartitionBy) -> PartitionBy:
        return check_partition_by(parts)

    @field_validator("prefix")
    @classmethod
    def _check_prefix(cls, prefix: str) -> str:
        prefix = prefix.strip("/")
        if any(p in ("", ".", "..") for p in prefix.split("/")) and prefix:
            raise ValueError(f"invalid prefix {prefix!r}")
        return prefix


def _json_value(value: Any) -> Any:
    if isinstance(value, datetime):
        if value.tzinfo is not None:
            return value.isoformat().replace("+00:00", "Z")
        return value.isoformat()
    if isinstance(value, bytes):
        return value.hex()
    if isinstance(value, dict):
        return {k: _json_value(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_json_value(v) for v in value]
    if isinstance(value, int | float | str | bool) or value is None:
        return value
    return str(value)


def jsonl_bytes(table: pa.Table) -> bytes:
    """Rows as JSON Lines; fields marked as JSON text are embedded as JSON again."""
    embedded = {
        f.name for f in table.schema if f.metadata and f.metadata.get(b"sluiceway.json") == b"true"
    }
    out = io.StringIO()
    for row in table.to_pylist():
        for name in embedded:
            if isinstance(row.get(name), str):
                row[name] = json.loads(row[name])
        out.write(json.dumps(_json_value(row), ensure_ascii=False, separators=(",", ":")))
        out.write("\n")
    return out.getvalue().encode()


def write_file(bucket: Any, key: str, table: pa.Table, fmt: str, opts: WriteDatasetOptions) -> int:
    """One file, published atomically; returns its size. Same table → same bytes."""
    with bucket.open_write(key) as f:
        if fmt == "parquet":
            compression = None if opts.compression == "none" else opts.compression
            pq.write_table(table, f, compression=compression, row_group_size=opts.row_group_size)
        else:
            f.write(jsonl_bytes(table))
    return int(bucket.head(key).size)


@register
class WriteDataset(StepType):
    name = "write_dataset"
    Options = WriteDatasetOptions
    stream_only = True  # its files and intent are part of the flush protocol
    stream_sink = True

    def check(self, raw: Any, cfg: PipelineConfig) -> None:
        opts = self.options(raw)
        assert isinstance(opts, WriteDatasetOptions)
        if opts.bucket not in cfg.buckets:
            raise StepSpecError(f"unknown bucket {opts.bucket!r}", (self.name, "bucket"))
        names = [name for name, _, _ in partition_spec(opts.partition_by)]
        if len(set(names)) != len(names):
            raise StepSpecError("partition names must differ", (self.name, "partition_by"))

    def build(self, raw: Any, cfg: PipelineConfig) -> StepFn:
        opts = self.options(raw)
        assert isinstance(opts, WriteDatasetOptions)
        spec = partition_spec(opts.partition_by)

        def write_dataset(ctx: StepContext, batches: Batches | None) -> Batches:
            from ..streams.consumer import FlushContext

            if not isinstance(ctx, FlushContext) or ctx.plan_outputs is None:
                raise InputError("write_dataset runs in stream functions only", file=ctx.input_name)
            got = list(batches or [])
            table = pa.Table.from_batches(got) if got else None
            files = self._plan(ctx, table, spec, opts)
            # Step 1 of the flush protocol: every key is on record before any is written.
            ctx.plan_outputs([{"bucket": opts.bucket, "key": key} for key, _ in files])
            bucket = ctx.bucket(opts.bucket)
            written = 0
            for key, part in files:
                size = write_file(bucket, key, part, opts.format, opts)
                written += part.num_rows
                ctx.outputs.append(
                    {"bucket": opts.bucket, "key": key, "rows": part.num_rows, "bytes": size}
                )
            ctx.count("rows_written", written)
            return iter(())

        return write_dataset

    def _plan(
        self,
        ctx: Any,
        table: pa.Table | None,
        spec: list[tuple[str, str, str | None]],
        opts: WriteDatasetOptions,
    ) -> list[tuple[str, pa.Table]]:
        """(key, rows) per partition, in key order; nothing for an empty flush."""
        if table is None or table.num_rows == 0:
            return []
        ctx.count_by(table, "written")
        name = part_name(ctx.from_seq, ctx.to_seq, ctx.function, opts.format)
        if not spec:
            return [(f"{opts.prefix}/{name}" if opts.prefix else name, table)]
        values: dict[str, pa.Array | pa.ChunkedArray] = {}
        for part, column, fmt in spec:
            if column not in table.schema.names:
                raise InputError(
                    f"partition column {column!r} is not in the data "
                    f"(columns: {', '.join(table.schema.names)})",
                    file=ctx.input_name,
                    field=column,
                )
            values[part] = (
                table.column(column)
                if fmt is None
                else derive(table, part, column, fmt, ctx.input_name)
            )
        part_names = [part for part, _, _ in spec]
        partitioning = ds.partitioning(
            pa.schema([pa.field(p, values[p].type) for p in part_names]), flavor="hive"
        )
        # One code per row for its combination of partition values (nulls included),
        # then a stable sort: each partition's rows, still in stream order.
        code = np.zeros(table.num_rows, np.int64)
        dictionaries = []
        for p in part_names:
            encoded = pc.dictionary_encode(values[p], null_encoding="encode")
            if isinstance(encoded, pa.ChunkedArray):
                encoded = encoded.combine_chunks()
            dictionaries.append(encoded.dictionary.to_pylist())
            code = code * len(encoded.dictionary) + encoded.indices.to_numpy(zero_copy_only=False)
        order = np.argsort(code, kind="stable")
        starts = np.flatnonzero(np.diff(code[order], prepend=-1))
        data = table.drop_columns([p for p in part_names if p in table.schema.names])
        out: list[tuple[str, pa.Table]] = []
        for rows in np.split(order, starts[1:]):
            c, combo = int(code[rows[0]]), []
            for values_of in reversed(dictionaries):
                c, i = divmod(c, len(values_of))
                combo.append(values_of[i])
            expr = None
            for p, v in zip(part_names, reversed(combo), strict=True):
                term = pc.field(p).is_null() if v is None else pc.field(p) == v
                expr = term if expr is None else expr & term
            directory, _ = partitioning.format(expr)
            root = f"{opts.prefix}/{directory}" if opts.prefix else directory
            out.append((f"{root}/{name}", data.take(pa.array(rows))))
        return sorted(out, key=lambda item: item[0])
