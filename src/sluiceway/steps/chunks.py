"""Chunked CSV: one big object read by several workers, committed as one output.

``read_csv: {chunk_size: 64MiB, quoted_newlines: false}`` in a function whose
steps are exactly ``read_csv`` then an unpartitioned ``write_parquet`` splits
an uncompressed object larger than ``chunk_size`` into byte ranges:

1. *Fan-out.* The worker that gets the object's event reads the first block
   (to pin the column types pyarrow would infer for the whole file) and
   publishes one message per range to the function's own queue, with ids
   ``<input identity>#chunk-<i>-of-<n>`` (sent once, however often the event
   is re-run). Its ledger entry is ``done`` with the plan in ``chunk_plan``
   and no outputs: its job, planning, is finished.
2. *Chunks.* A chunk message carries ``detail.chunk = {index, count, start,
   end, columns}``; its ledger key is the input's plus ``#chunk-<i>-of-<n>``.
   It owns the rows that *start* in ``[start, end)``: it skips to the byte
   after the first newline at or after ``start - 1`` (unless ``start`` is 0)
   and reads through the newline that ends the row crossing ``end``. Chunks
   after the first get the header line prepended. Its rows go to the part
   ``<output key>.parts/part-<i>.parquet`` in the sink's bucket.
3. *Commit.* A chunk worker that, after marking its chunk done, finds every
   chunk done claims ``<function>|<input identity>#commit`` and concatenates
   the parts in order into the output key (atomically, one row group at a
   time), marks the commit entry done with the output, then deletes the parts.
   A re-delivered chunk message finding its chunk done retries the commit (a
   finisher that crashed) or, once committed, only removes leftover parts.

A byte offset can be moved to a row boundary only when no quoted value
contains a newline, hence ``quoted_newlines: false`` is required. Line
numbers in a chunk's error messages count from the chunk's first row.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import pyarrow.parquet as pq

from ..errors import InputError
from ..events import Event
from ..ledger import Claim
from ..queues.base import OutgoingMessage
from .base import parse_step
from .csv import _SIMPLE_TYPES, read_csv_batches
from .parquet import RowGroupWriter, WriteParquetOptions, render_key

if TYPE_CHECKING:
    from ..config import FunctionConfig
    from ..pipeline import Pipeline
    from .base import StepContext
    from .read_csv import ReadCsvOptions

log = logging.getLogger("sluiceway.chunks")

_READ = 1 << 20
_SIZE = re.compile(r"\s*(\d+)\s*(b|kb|kib|mb|mib|gb|gib)?\s*", re.I)
_UNITS = {None: 1, "b": 1, "kb": 1000, "kib": 1 << 10, "mb": 10**6, "mib": 1 << 20}
_UNITS |= {"gb": 10**9, "gib": 1 << 30}
_TYPE_NAMES = {t: name for name, t in _SIMPLE_TYPES.items()}


def parse_size(value: Any) -> Any:
    """``1048576``, ``"256MiB"``, ``"64 KiB"``, ``"1GB"`` → bytes."""
    if isinstance(value, str):
        m = _SIZE.fullmatch(value)
        if m is None:
            raise ValueError("expected a size such as 64MiB, 1GiB or a number of bytes")
        return int(m.group(1)) * _UNITS[m.group(2) and m.group(2).lower()]
    return value


def chunk_of(event: Event) -> dict[str, Any] | None:
    chunk = event.detail.get("chunk")
    return chunk if isinstance(chunk, dict) else None


def chunk_suffix(index: int, count: int) -> str:
    return f"#chunk-{index}-of-{count}"


def key_suffix(event: Event) -> str:
    """What a chunk message adds to its input's ledger key (nothing for others)."""
    chunk = chunk_of(event)
    return "" if chunk is None else chunk_suffix(chunk["index"], chunk["count"])


class RangeReader:
    """The rows of ``[start, end)`` of a seekable stream, behind an optional header.

    It can be rewound (``seek`` to an offset of its own output, by reading it
    again from the start), which is all the CSV reader's fast pass needs of a
    source: so a chunk is parsed by pyarrow's native multi-threaded reader, and
    the precise reader runs only if that fails, as for a whole file.
    """

    def __init__(self, f: Any, start: int, end: int, header: bytes = b"") -> None:
        self._f = f
        self._start = start
        self._end = end
        self._header = header
        self._begin()
        self.has_rows = self._state == "body" and self._pos < end
        if not self.has_rows:
            self._state = "done"

    def _begin(self) -> None:
        self._out = bytearray(self._header)
        self._pending = b""
        self._state = "body"
        self._told = 0  # bytes handed out by read()
        if self._start > 0:
            self._f.seek(self._start - 1)
            self._pos = self._start - 1
            self._skip_line()
        else:
            self._f.seek(0)
            self._pos = 0
        if self._pos >= self._end:
            self._state = "done"

    closed = False  # the bucket's stream underneath is closed by its owner

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._told

    def seek(self, offset: int, whence: int = 0, /) -> int:
        if whence != 0 or offset < 0:
            raise OSError("a chunk can only be rewound to an offset from its start")
        self._begin()
        while self._told < offset and self.read(min(_READ, offset - self._told)):
            pass
        return self._told

    def _skip_line(self) -> None:
        while True:
            block = self._f.read(_READ)
            if not block:
                self._state = "done"
                return
            i = block.find(b"\n")
            if i >= 0:
                self._pos += i + 1
                self._pending = block[i + 1 :]
                return
            self._pos += len(block)

    def _raw(self, n: int) -> bytes:
        if self._pending:
            data, self._pending = self._pending[:n], self._pending[n:]
            return data
        return self._f.read(n)

    def _fill(self, size: int) -> None:
        if self._state == "body":
            data = self._raw(min(max(size, 1), self._end - self._pos))
            if not data:
                self._state = "done"
                return
            self._pos += len(data)
            self._out += data
            if self._pos >= self._end:
                self._state = "done" if data.endswith(b"\n") else "tail"
        elif self._state == "tail":
            data = self._raw(_READ)
            i = data.find(b"\n")
            if not data:
                self._state = "done"
            elif i >= 0:
                self._out += data[: i + 1]
                self._state = "done"
            else:
                self._out += data

    def read(self, size: int = -1, /) -> bytes:
        while (size is None or size < 0 or len(self._out) < size) and self._state != "done":
            self._fill(_READ if size is None or size < 0 else size - len(self._out))
        if size is None or size < 0:
            size = len(self._out)
        data = bytes(self._out[:size])
        del self._out[:size]
        self._told += len(data)
        return data


def header_line(f: Any) -> bytes:
    f.seek(0)
    head = bytearray()
    while b"\n" not in head:
        block = f.read(1 << 16)
        if not block:
            break
        head += block
    i = head.find(b"\n")
    return bytes(head if i < 0 else head[: i + 1])


@dataclass(frozen=True)
class Chunking:
    """How one function splits big objects; None from ``setup`` when it does not."""

    function: str
    queue: str
    chunk_size: int
    read: ReadCsvOptions
    write: WriteParquetOptions

    @classmethod
    def setup(cls, name: str, fn: FunctionConfig) -> Chunking | None:
        from .read_csv import ReadCsvOptions

        if fn.handler or fn.queue is None or len(fn.steps) != 2:
            return None
        (first, raw_read), (last, raw_write) = (parse_step(s) for s in fn.steps)
        if first != "read_csv" or last != "write_parquet":
            return None
        read = ReadCsvOptions.model_validate(raw_read or {})
        write = WriteParquetOptions.model_validate(raw_write or {})
        if read.chunk_size is None or read.rejects is not None or write.partition_by:
            return None
        return cls(name, fn.queue, read.chunk_size, read, write)

    # -- fan-out -------------------------------------------------------------

    def fan_out(self, pipeline: Pipeline, ctx: StepContext) -> dict[str, Any] | None:
        """Split the event's object into chunk messages; None: process it whole."""
        from .read_csv import csv_options_of

        event = ctx.event
        if chunk_of(event) is not None or event.bucket is None or event.key is None:
            return None
        bucket = pipeline.bucket(event.bucket)
        size = bucket.head(event.key).size
        if size <= self.chunk_size:
            return None
        with bucket.open_read(event.key) as f:
            magic = f.read(4)
            if magic[:2] == b"\x1f\x8b" or magic == b"PK\x03\x04":
                return None  # compressed after all (compression: auto): whole
            f.seek(0)
            options = csv_options_of(self.read)
            with contextlib.closing(read_csv_batches(f, name=ctx.input_name, options=options)) as b:
                first = next(b, None)
        if first is None:
            return None
        columns: dict[str, str] = {}
        declared = self.read.columns or {}
        for field in first.schema:
            name = declared.get(field.name) or _TYPE_NAMES.get(field.type)
            if name is None:  # a type the options cannot pin (e.g. timestamp[s]): whole
                return None
            columns[field.name] = name
        count = -(-size // self.chunk_size)
        messages = []
        for i in range(count):
            chunk = {
                "index": i,
                "count": count,
                "start": i * self.chunk_size,
                "end": min(size, (i + 1) * self.chunk_size),
                "columns": columns,
            }
            part = dataclasses.replace(
                event,
                id=f"{event.id}{chunk_suffix(i, count)}",
                detail={**event.detail, "chunk": chunk},
            )
            messages.append(
                OutgoingMessage(
                    part.to_json(), {}, f"{event.input_identity}{chunk_suffix(i, count)}"
                )
            )
        pipeline.publish_once(messages, queue=self.queue)
        return {"chunks": count, "chunk_size": self.chunk_size, "size": size, "columns": columns}

    # -- commit --------------------------------------------------------------

    def commit(
        self,
        pipeline: Pipeline,
        event: Event,
        *,
        owner: str,
        ttl: float,
        extend: Callable[[], None] = lambda: None,
    ) -> tuple[str, list[dict[str, Any]]]:
        """After chunk ``event`` is done: commit the whole if every chunk is.

        Returns ``(status, outputs)``: ``waiting`` (chunks still running),
        ``busy`` (another worker is committing: try again later),
        ``committed`` (by this call; ``outputs`` is the final object) or
        ``done`` (committed before; leftover parts removed).
        """
        chunk = chunk_of(event)
        assert chunk is not None
        ledger = pipeline.ledger
        base = f"{self.function}|{event.input_identity}"
        entries = [
            ledger.get(f"{base}{chunk_suffix(i, chunk['count'])}") for i in range(chunk["count"])
        ]
        parts = [out for e in entries if e is not None for out in e.info.get("outputs", [])]
        commit_key = f"{base}#commit"
        committed = ledger.get(commit_key)
        if committed is not None and committed.status == "done":
            self._delete(pipeline, parts)
            return "done", []
        if any(e is None or e.status != "done" for e in entries):
            return "waiting", []
        claim = ledger.claim(commit_key, function=self.function, owner=owner, ttl=ttl)
        if claim is Claim.DONE:
            self._delete(pipeline, parts)
            return "done", []
        if claim is Claim.BUSY:
            return "busy", []
        try:
            started = time.time()
            out_key = render_key(self.write.key, event.bucket or "", event.key or event.id)
            bucket = pipeline.bucket(self.write.bucket)
            compression = None if self.write.compression == "none" else self.write.compression
            rows = 0
            with bucket.open_write(out_key) as f:
                # The same writer as an unchunked write_parquet (row groups of
                # row_group_size, encoded in the background, dictionaries only
                # where values repeat), so chunking changes no output but speed.
                writer: RowGroupWriter | None = None
                schema: pa.Schema | None = None
                try:
                    for part in parts:
                        with bucket.open_read(part["key"]) as pf:
                            src = pq.ParquetFile(pf)
                            for g in range(src.num_row_groups):
                                table = src.read_row_group(g)
                                if schema is None:
                                    schema = table.schema
                                elif not table.schema.equals(schema):
                                    table = table.cast(schema)
                                for batch in table.to_batches():
                                    if writer is None:
                                        writer = RowGroupWriter(
                                            f, batch, compression, self.write.row_group_size
                                        )
                                    writer.add(batch)
                                rows += table.num_rows
                                extend()
                    if writer is not None:
                        writer.finish()
                finally:
                    if writer is not None:
                        writer.close()
                if writer is None:
                    raise InputError("no rows to write", file=f"{event.bucket}/{event.key}")
            output = {
                "bucket": self.write.bucket,
                "key": out_key,
                "rows": rows,
                "bytes": writer.size,
            }
        except BaseException as e:
            ledger.fail(commit_key, owner=owner, info={"error": str(e)})
            raise
        finished = time.time()
        ledger.complete(
            commit_key,
            owner=owner,
            info={
                "input": f"{event.bucket}/{event.key}",
                "outputs": [output],
                "stats": {"rows_committed": rows, "chunks": chunk["count"]},
                "worker": owner,
                "started_at": started,
                "finished_at": finished,
                "seconds": round(finished - started, 6),
            },
        )
        self._delete(pipeline, parts)
        return "committed", [output]

    @staticmethod
    def _delete(pipeline: Pipeline, parts: list[dict[str, Any]]) -> None:
        for part in parts:
            if part.get("bucket") in pipeline.buckets:
                pipeline.bucket(part["bucket"]).delete(part["key"])
