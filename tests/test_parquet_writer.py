"""RowGroupWriter: a one-group file is encoded inline, with the same result as the threaded path."""

from __future__ import annotations

import io

import pyarrow as pa
import pyarrow.parquet as pq
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
