"""Sinks besides Parquet: a table (upsert), JSON messages, JSON Lines and CSV objects.

Each is idempotent by construction: table writes are upserts by key, message
ids are the input's identity plus the row number (and the publisher never
sends an id twice), and objects are named from the input key.
"""

from __future__ import annotations

import base64
import datetime as dt
import decimal
import json
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import pyarrow.csv as pacsv
from pydantic import Field, model_validator

from ..errors import InputError
from ..queues.base import OutgoingMessage
from ..tables.base import MissingKey
from .base import Batches, StepContext, StepFn, StepOptions, StepSpecError, StepType, register
from .parquet import render_key

if TYPE_CHECKING:
    from ..config import PipelineConfig


def jsonable(value: Any) -> Any:
    """Arrow's Python values → JSON: dates and times as ISO 8601, decimals as strings."""
    if isinstance(value, dt.datetime | dt.date | dt.time):
        return value.isoformat()
    if isinstance(value, decimal.Decimal):
        return str(value)
    if isinstance(value, dt.timedelta):
        return value.total_seconds()
    if isinstance(value, bytes):
        return base64.b64encode(value).decode()
    if isinstance(value, dict):
        return {k: jsonable(v) for k, v in value.items()}
    if isinstance(value, list):
        return [jsonable(v) for v in value]
    return value


def rows_of(batch: pa.RecordBatch) -> list[dict[str, Any]]:
    return [{k: jsonable(v) for k, v in row.items()} for row in batch.to_pylist()]


def dumps(obj: Any) -> str:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"))


def _check_bucket(step: str, bucket: str, cfg: PipelineConfig) -> None:
    if bucket not in cfg.buckets:
        raise StepSpecError(f"unknown bucket {bucket!r}", (step, "bucket"))


class WriteTableOptions(StepOptions):
    table: str
    batch_size: int = Field(1000, ge=1)


@register
class WriteTable(StepType):
    """``- write_table: {table: customers}``: upsert every row by the table's key."""

    name = "write_table"
    Options = WriteTableOptions

    def check(self, raw: Any, cfg: PipelineConfig) -> None:
        opts = self.options(raw)
        assert isinstance(opts, WriteTableOptions)
        if opts.table not in cfg.tables:
            raise StepSpecError(f"unknown table {opts.table!r}", (self.name, "table"))

    def build(self, raw: Any, cfg: PipelineConfig) -> StepFn:
        opts = self.options(raw)
        assert isinstance(opts, WriteTableOptions)

        def write_table(ctx: StepContext, batches: Batches | None) -> Batches:
            assert batches is not None, "write_table needs a step before it"
            table = ctx.table(opts.table)
            for batch in batches:
                rows = rows_of(batch)
                for start in range(0, len(rows), opts.batch_size):
                    chunk = rows[start : start + opts.batch_size]
                    try:
                        table.upsert(chunk)
                    except MissingKey as e:
                        raise InputError(str(e), file=ctx.input_name) from None
                ctx.count("rows_upserted", len(rows))
                yield batch  # a table write may be followed by another sink

        return write_table


class PublishJsonOptions(StepOptions):
    queue: str | None = None
    topic: str | None = None
    batch_size: int = Field(1, ge=1, le=10_000)  # rows per message

    @model_validator(mode="after")
    def _one_destination(self) -> PublishJsonOptions:
        if (self.queue is None) == (self.topic is None):
            raise ValueError("give exactly one of 'queue' or 'topic'")
        return self


@register
class PublishJson(StepType):
    """``- publish_json: {queue: rows}``: each row (or batch of rows) as a JSON message."""

    name = "publish_json"
    Options = PublishJsonOptions

    def check(self, raw: Any, cfg: PipelineConfig) -> None:
        opts = self.options(raw)
        assert isinstance(opts, PublishJsonOptions)
        if opts.queue is not None and opts.queue not in cfg.queues:
            raise StepSpecError(f"unknown queue {opts.queue!r}", (self.name, "queue"))
        if opts.topic is not None and opts.topic not in cfg.topics:
            raise StepSpecError(f"unknown topic {opts.topic!r}", (self.name, "topic"))

    def build(self, raw: Any, cfg: PipelineConfig) -> StepFn:
        opts = self.options(raw)
        assert isinstance(opts, PublishJsonOptions)

        def publish_json(ctx: StepContext, batches: Batches | None) -> Batches:
            assert batches is not None, "publish_json needs a step before it"
            assert ctx.publish is not None, "publish_json needs a publisher"
            identity = ctx.event.input_identity
            row = 0
            for batch in batches:
                rows = rows_of(batch)
                messages = []
                for start in range(0, len(rows), opts.batch_size):
                    chunk = rows[start : start + opts.batch_size]
                    first, last = row + start + 1, row + start + len(chunk)
                    mid = f"{identity}#{first}" if len(chunk) == 1 else f"{identity}#{first}-{last}"
                    body = {
                        "source": ctx.input_name,
                        "row": first,
                        "data": chunk[0] if opts.batch_size == 1 else chunk,
                    }
                    messages.append(OutgoingMessage(dumps(body), {"input": ctx.input_name}, mid))
                sent = ctx.publish(messages, queue=opts.queue, topic=opts.topic)
                ctx.count("messages_published", sent)
                ctx.count("messages_already_published", len(messages) - sent)
                row += len(rows)
                yield batch

        return publish_json


class WriteObjectOptions(StepOptions):
    bucket: str
    key: str


class WriteJsonlOptions(WriteObjectOptions):
    key: str = "{path}.jsonl"


class WriteCsvOptions(WriteObjectOptions):
    key: str = "{path}.csv"
    delimiter: str = Field(",", min_length=1, max_length=1)


class _ObjectSink(StepType):
    """One object per input, written atomically; subclasses format the batches."""

    def check(self, raw: Any, cfg: PipelineConfig) -> None:
        opts = self.options(raw)
        assert isinstance(opts, WriteObjectOptions)
        _check_bucket(self.name, opts.bucket, cfg)

    def write(self, f: Any, batches: Iterator[pa.RecordBatch], opts: Any) -> int:
        raise NotImplementedError

    def build(self, raw: Any, cfg: PipelineConfig) -> StepFn:
        opts = self.options(raw)
        assert isinstance(opts, WriteObjectOptions)

        def write_object(ctx: StepContext, batches: Batches | None) -> Batches:
            assert batches is not None, f"{self.name} needs a step before it"
            event = ctx.event
            out_key = render_key(opts.key, event.bucket or "", event.key or event.id)
            bucket = ctx.bucket(opts.bucket)
            with bucket.open_write(out_key) as f:
                rows = self.write(f, batches, opts)
            info = bucket.head(out_key)
            ctx.count("rows_written", rows)
            ctx.outputs.append(
                {"bucket": opts.bucket, "key": out_key, "rows": rows, "bytes": info.size}
            )
            return iter(())

        return write_object


@register
class WriteJsonl(_ObjectSink):
    """``- write_jsonl: {bucket: out}``: one JSON object per line."""

    name = "write_jsonl"
    Options = WriteJsonlOptions

    def write(self, f: Any, batches: Iterator[pa.RecordBatch], opts: Any) -> int:
        rows = 0
        for batch in batches:
            lines = [dumps(r) for r in rows_of(batch)]
            if lines:
                f.write(("\n".join(lines) + "\n").encode())
            rows += len(lines)
        return rows


@register
class WriteCsv(_ObjectSink):
    """``- write_csv: {bucket: out}``: CSV with a header row."""

    name = "write_csv"
    Options = WriteCsvOptions

    def write(self, f: Any, batches: Iterator[pa.RecordBatch], opts: Any) -> int:
        rows = 0
        writer: pacsv.CSVWriter | None = None
        try:
            for batch in batches:
                if writer is None:
                    writer = pacsv.CSVWriter(
                        f, batch.schema, write_options=pacsv.WriteOptions(delimiter=opts.delimiter)
                    )
                writer.write_batch(batch)
                rows += batch.num_rows
        finally:
            if writer is not None:
                writer.close()
        return rows
