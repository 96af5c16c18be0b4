"""RowGroupWriter: a one-group file is encoded inline, with the same result as the threaded path."""

from __future__ import annotations

import errno
import gc
import io
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sluiceway.steps.parquet import RowGroupWriter


def _write(batches: list[pa.RecordBatch], row_group_size: int) -> tuple[pa.Table, bool]:
    """The table read back, and whether an encoder thread was started."""
    buf = io.BytesIO()
    writer = RowGroupWriter(buf, batches[0], "zstd", row_group_size)
    try:
        for batch in batches:
            writer.add(batch)
        writer.finish()
        threaded = writer._pool is not None
    finally:
        writer.close()
    return pq.read_table(io.BytesIO(buf.getvalue())), threaded


@settings(max_examples=30, deadline=None)
@given(
    sizes=st.lists(st.integers(1, 50), min_size=1, max_size=6),
    group=st.integers(1, 120),
)
def test_inline_last_group_matches_threaded_groups(sizes: list[int], group: int) -> None:
    start = 0
    batches = []
    for n in sizes:
        ids = list(range(start, start + n))
        batches.append(pa.record_batch({"id": ids, "tag": [f"t{i % 3}" for i in ids]}))
        start += n
    expected = pa.Table.from_batches(batches)
    one_group, threaded = _write(batches, start + 1)  # never full: one group
    assert not threaded
    assert one_group.equals(expected)
    grouped, _ = _write(batches, group)
    assert grouped.equals(expected)


def test_small_file_starts_no_thread() -> None:
    batch = pa.record_batch({"a": [1, 2, 3]})
    table, threaded = _write([batch], 1 << 18)
    assert not threaded
    assert table.num_rows == 3


class _FullDisk(io.RawIOBase):
    """A file every write to which fails, as on a full disk."""

    def __init__(self) -> None:
        self.attempts = 0

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        self.attempts += 1
        raise OSError(errno.ENOSPC, "No space left on device")


def test_a_refused_write_fails_close_and_is_not_retried_later() -> None:
    """What PyArrow wrote is buffered: the file's error surfaces when the
    buffer goes to it, and nothing is sent to the file after that (the
    stream's destructor would otherwise try again, on a file closed by then)."""
    disk = _FullDisk()
    batch = pa.record_batch({"a": [1, 2, 3]})
    writer = RowGroupWriter(disk, batch, "zstd", 1 << 18)
    writer.add(batch)
    writer.finish()
    with pytest.raises(OSError, match="No space left"):
        writer.close()
    attempts = disk.attempts
    assert attempts >= 1
    del writer
    gc.collect()
    assert disk.attempts == attempts
