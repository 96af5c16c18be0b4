"""``read_csv``: the source step that streams an object's CSV as record batches.

The parsing itself lives in ``steps/csv.py``; this is the glue between a
bucket event and that reader, and the options users may give in the file.

When a ``validate`` step follows, it asks (through the StepContext, before
reading starts) for every column as text, for each row's physical line number
in a hidden column, and, with ``on_invalid: quarantine``, for rows with the
wrong number of fields to be handed over rather than fail the file. Those rows
count in ``rows_in`` like any other, so ``rows_in = rows_out + rows_rejected``.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import BeforeValidator, Field

from ..errors import InputError
from .base import Batches, StepContext, StepFn, StepOptions, StepSpecError, StepType, register
from .chunks import RangeReader, chunk_of, header_line, parse_size
from .csv import CsvOptions, MalformedRow, _is_utf8, read_csv_batches
from .quarantine import RejectFile

if TYPE_CHECKING:
    from ..config import PipelineConfig


class ReadCsvOptions(StepOptions):
    delimiter: str = Field(",", min_length=1, max_length=1)
    encoding: str = "utf-8"
    compression: Literal["auto", "none", "gzip", "zip"] = "auto"
    header: bool = True
    columns: dict[str, str] | None = None
    null_values: list[str] | None = None
    block_size: int = Field(4 << 20, ge=1 << 10)  # 4 MiB: under 512 MiB peak for any file size
    # Quarantine rows with the wrong number of fields into BUCKET/_rejected/<key>.jsonl
    # instead of failing the file (a following `validate` step does this itself).
    rejects: str | None = None
    # Split objects larger than this (bytes, or 64MiB, 1GiB) into byte ranges
    # read by several workers and committed as one output (steps/chunks.py).
    chunk_size: Annotated[int, BeforeValidator(parse_size), Field(ge=1 << 10)] | None = None
    # Whether a quoted value may contain a newline; chunking needs `false`.
    quoted_newlines: bool = True


def csv_options_of(opts: ReadCsvOptions) -> CsvOptions:
    return CsvOptions(
        delimiter=opts.delimiter,
        encoding=opts.encoding,
        compression=opts.compression,
        header=opts.header,
        column_types=opts.columns,
        block_size=opts.block_size,
        null_values=opts.null_values,
    )


@register
class ReadCsv(StepType):
    name = "read_csv"
    Options = ReadCsvOptions
    source = True

    def check(self, raw: Any, cfg: PipelineConfig) -> None:
        opts = self.options(raw)
        assert isinstance(opts, ReadCsvOptions)
        if opts.rejects is not None and opts.rejects not in cfg.buckets:
            raise StepSpecError(f"unknown bucket {opts.rejects!r}", (self.name, "rejects"))
        if opts.chunk_size is not None:
            row_boundary = "rows are found by newlines, so no quoted value may contain one"
            refuse = (
                (
                    "quoted_newlines",
                    opts.quoted_newlines,
                    f"needs quoted_newlines: false ({row_boundary})",
                ),
                (
                    "compression",
                    opts.compression not in ("auto", "none"),
                    "needs an uncompressed object",
                ),
                ("header", not opts.header, "needs header: true"),
                ("encoding", not _is_utf8(opts.encoding), "needs a UTF-8 encoding"),
            )
            for field, wrong, why in refuse:
                if wrong:
                    raise StepSpecError(f"chunk_size {why}", (self.name, field))

    def build(self, raw: Any, cfg: PipelineConfig) -> StepFn:
        opts = self.options(raw)
        assert isinstance(opts, ReadCsvOptions)
        csv_options = csv_options_of(opts)

        def read_csv(ctx: StepContext, _: Batches | None) -> Batches:
            event = ctx.event
            if event.bucket is None or event.key is None:
                raise InputError(f"read_csv needs a bucket event, got {event.detail_type!r}")
            options = csv_options
            if ctx.read_as_text or ctx.line_column is not None:
                options = dataclasses.replace(
                    options,
                    all_strings=options.all_strings or ctx.read_as_text,
                    line_column=ctx.line_column,
                )
            malformed = ctx.malformed_rows
            with contextlib.ExitStack() as stack:
                own = (
                    stack.enter_context(RejectFile(ctx, opts.rejects))
                    if malformed is None and opts.rejects is not None
                    else None
                )

                def hand_over(rows: list[MalformedRow]) -> None:
                    ctx.count("rows_in", len(rows))
                    if own is not None:
                        own.write(
                            {"line": r.line, "column": None, "value": r.text, "reason": r.reason}
                            for r in rows
                        )
                        return
                    assert malformed is not None
                    malformed.extend(
                        {"line": row.line, "text": row.text, "reason": row.reason} for row in rows
                    )

                handler = hand_over if malformed is not None or own is not None else None
                bucket = ctx.bucket(event.bucket)
                with bucket.open_read(event.key) as f:
                    source: Any = f
                    if (chunk := chunk_of(event)) is not None:
                        # Rows starting in [start, end) (steps/chunks.py), types pinned.
                        header = header_line(f) if chunk["start"] > 0 else b""
                        source = RangeReader(f, chunk["start"], chunk["end"], header)
                        if not source.has_rows:
                            return
                        options = dataclasses.replace(
                            options, compression="none", column_types=chunk["columns"]
                        )
                    for batch in read_csv_batches(
                        source, name=ctx.input_name, options=options, on_malformed=handler
                    ):
                        ctx.count("rows_in", batch.num_rows)
                        yield batch

        return read_csv
