"""``read_csv``: the source step that streams an object's CSV as record batches.

The parsing itself lives in ``steps/csv.py``; this is the glue between a
bucket event and that reader, and the options users may give in the file.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field

from ..errors import InputError
from .base import Batches, StepContext, StepFn, StepOptions, StepType, register
from .csv import CsvOptions, read_csv_batches

if TYPE_CHECKING:
    from ..config import PipelineConfig


class ReadCsvOptions(StepOptions):
    delimiter: str = Field(",", min_length=1, max_length=1)
    encoding: str = "utf-8"
    compression: Literal["auto", "none", "gzip", "zip"] = "auto"
    header: bool = True
    columns: dict[str, str] | None = None
    null_values: list[str] | None = None
    block_size: int = Field(8 << 20, ge=1 << 10)


@register
class ReadCsv(StepType):
    name = "read_csv"
    Options = ReadCsvOptions
    source = True

    def build(self, raw: Any, cfg: PipelineConfig) -> StepFn:
        opts = self.options(raw)
        assert isinstance(opts, ReadCsvOptions)
        csv_options = CsvOptions(
            delimiter=opts.delimiter,
            encoding=opts.encoding,
            compression=opts.compression,
            header=opts.header,
            column_types=opts.columns,
            block_size=opts.block_size,
            null_values=opts.null_values,
        )

        def read_csv(ctx: StepContext, _: Batches | None) -> Batches:
            event = ctx.event
            if event.bucket is None or event.key is None:
                raise InputError(f"read_csv needs a bucket event, got {event.detail_type!r}")
            bucket = ctx.bucket(event.bucket)
            with bucket.open_read(event.key) as f:
                for batch in read_csv_batches(f, name=ctx.input_name, options=csv_options):
                    ctx.count("rows_in", batch.num_rows)
                    yield batch

        return read_csv
