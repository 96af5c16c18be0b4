"""``write_parquet``: record batches into one Parquet object, committed atomically.

The output key is derived from the input key, never from time or a counter,
so a re-delivered message rewrites the same object with the same bytes
instead of adding a second copy.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal

import pyarrow.parquet as pq
from pydantic import Field

from ..errors import InputError
from .base import Batches, StepContext, StepFn, StepOptions, StepSpecError, StepType, register

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


class WriteParquetOptions(StepOptions):
    bucket: str
    key: str = "{path}.parquet"
    compression: Literal["snappy", "zstd", "gzip", "lz4", "brotli", "none"] = "snappy"
    row_group_size: int = Field(1 << 20, ge=1)


@register
class WriteParquet(StepType):
    name = "write_parquet"
    Options = WriteParquetOptions

    def check(self, raw: Any, cfg: PipelineConfig) -> None:
        opts = self.options(raw)
        assert isinstance(opts, WriteParquetOptions)
        if opts.bucket not in cfg.buckets:
            raise StepSpecError(f"unknown bucket {opts.bucket!r}", (self.name, "bucket"))
        try:
            render_key(opts.key, "b", "dir/file.csv")
        except (KeyError, IndexError, ValueError) as e:
            raise StepSpecError(
                f"bad key template {opts.key!r}: unknown field {e} "
                "(use {path}, {key}, {name}, {stem}, {ext}, {dir}, {bucket})",
                (self.name, "key"),
            ) from None

    def build(self, raw: Any, cfg: PipelineConfig) -> StepFn:
        opts = self.options(raw)
        assert isinstance(opts, WriteParquetOptions)
        compression = None if opts.compression == "none" else opts.compression

        def write_parquet(ctx: StepContext, batches: Batches | None) -> Batches:
            assert batches is not None, "write_parquet needs a step before it"
            event = ctx.event
            out_key = render_key(opts.key, event.bucket or "", event.key or event.id)
            bucket = ctx.bucket(opts.bucket)
            rows = 0
            with bucket.open_write(out_key) as f:
                writer: pq.ParquetWriter | None = None
                try:
                    for batch in batches:
                        if writer is None:
                            writer = pq.ParquetWriter(f, batch.schema, compression=compression)
                        writer.write_batch(batch, row_group_size=opts.row_group_size)
                        rows += batch.num_rows
                finally:
                    if writer is not None:
                        writer.close()
                if writer is None:
                    raise InputError("no rows to write", file=ctx.input_name)
            info = bucket.head(out_key)
            ctx.count("rows_out", rows)
            ctx.outputs.append(
                {"bucket": opts.bucket, "key": out_key, "rows": rows, "bytes": info.size}
            )
            return iter(())

        return write_parquet
