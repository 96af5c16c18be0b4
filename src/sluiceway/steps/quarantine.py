"""Quarantine: the rows a step rejects, kept in a JSON Lines file beside the output.

The file is ``<bucket>/_rejected/<input key>.jsonl``, one object per rejected
row. Its key comes from the input key alone, so a re-delivered message
rewrites the same object, and it is written through ``Bucket.open_write``, so
it appears whole or not at all: when the function fails, the rejects of the
failed attempt are discarded with everything else.

A run without rejects deletes the file: it may be left from an earlier version
of the same input, and the reject file must describe the version whose output
sits beside it.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterable
from types import TracebackType
from typing import IO, Any

from ..buckets.base import Bucket
from .base import StepContext

REJECTS_PREFIX = "_rejected/"


def rejects_key(ctx: StepContext) -> str:
    """``_rejected/<input key>.jsonl`` (the event id for inputs that are not objects)."""
    return f"{REJECTS_PREFIX}{ctx.event.key or ctx.event.id}.jsonl"


def _dumps(record: dict[str, Any]) -> str:
    # default=str: decimals, dates and timestamps from typed columns as text.
    return json.dumps(record, ensure_ascii=False, default=str)


class RejectFile:
    """Writes reject records as they come; published when the block exits cleanly.

    Use as a context manager around the whole stream. ``write`` counts each
    record in ``rows_rejected``; on a clean exit the file is published (or a
    stale one deleted) and listed in ``ctx.outputs``; on an exception it is
    discarded.
    """

    def __init__(self, ctx: StepContext, bucket: str) -> None:
        self.ctx = ctx
        self.bucket_name = bucket
        self.bucket: Bucket = ctx.bucket(bucket)
        self.key = rejects_key(ctx)
        self.rows = 0
        self._stack = contextlib.ExitStack()
        self._out: IO[bytes] | None = None

    def __enter__(self) -> RejectFile:
        self.ctx.stats.setdefault("rows_rejected", 0)
        return self

    def write(self, records: Iterable[dict[str, Any]]) -> None:
        lines = [_dumps(r) + "\n" for r in records]
        if not lines:
            return
        if self._out is None:
            # Opened on the first reject, so clean inputs leave no file.
            self._out = self._stack.enter_context(self.bucket.open_write(self.key))
        self._out.write("".join(lines).encode("utf-8"))
        self.rows += len(lines)
        self.ctx.count("rows_rejected", len(lines))

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool:
        if exc_type is not None:
            self._stack.__exit__(exc_type, exc, tb)  # open_write discards the object
            return False
        if self._out is None:
            self.bucket.delete(self.key)
            return False
        self._stack.close()
        info = self.bucket.head(self.key)
        self.ctx.outputs.append(
            {
                "bucket": self.bucket_name,
                "key": self.key,
                "rows": self.rows,
                "bytes": info.size,
                "kind": "rejects",
            }
        )
        return False
