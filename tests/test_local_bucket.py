"""The local bucket's ETag: the xxh3-128 of the content, however it was written.

A write is hashed on its way to the file, a dropped file by reading it; these
tests prove the two agree with each other and with the hash of the bytes, whatever
the sizes and types of the writes.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import xxhash
from hypothesis import given, settings
from hypothesis import strategies as st

from sluiceway.buckets.base import ObjectExists
from sluiceway.buckets.local import TMP_DIR, LocalBucket, _HashingWriter, file_etag

WRITES = st.lists(
    st.tuples(
        st.binary(min_size=0, max_size=3000), st.sampled_from(["bytes", "bytearray", "view"])
    ),
    max_size=40,
)


def _as(kind: str, data: bytes) -> bytes | bytearray | memoryview:
    if kind == "bytearray":
        return bytearray(data)
    if kind == "view":
        return memoryview(bytearray(data))
    return data


class _Sink:
    def __init__(self) -> None:
        self.data = bytearray()

    def write(self, data: bytes | bytearray | memoryview) -> int:
        self.data += data
        return len(data)


@settings(max_examples=100, deadline=None)
@given(writes=WRITES)
def test_etag_is_the_hash_of_what_was_written(writes: list[tuple[bytes, str]]) -> None:
    sink = _Sink()
    writer = _HashingWriter(sink)  # type: ignore[arg-type]
    for data, kind in writes:
        buffer = _as(kind, data)
        writer.write(buffer)
        if isinstance(buffer, memoryview):
            buffer = buffer.obj  # type: ignore[assignment]
        if isinstance(buffer, bytearray) and buffer:
            buffer[0] ^= 0xFF  # the owner reuses its buffer once written
    expected = b"".join(data for data, _ in writes)
    assert bytes(sink.data) == expected
    assert writer.hexdigest() == xxhash.xxh3_128_hexdigest(expected)


def test_written_and_dropped_objects_have_the_same_etag(tmp_path: Path) -> None:
    """Written through the bucket (hashed on the way, in pieces) or dropped in by
    another program (hashed from the file as it is read): one identity."""
    bucket = LocalBucket("b", tmp_path / "b")
    piece = bytes(range(256)) * 4096  # 1 MiB
    with bucket.open_write("big.bin") as f:
        for i in range(3):
            f.write(piece[i:] + piece[:i])
        f.write(b"tail")
    data = (tmp_path / "b" / "big.bin").read_bytes()
    assert len(data) == 3 * len(piece) + 4
    expected = xxhash.xxh3_128_hexdigest(data)
    assert bucket.head("big.bin").etag == expected
    (tmp_path / "b" / "dropped.bin").write_bytes(data)
    # The cache was filled by the writer; a fresh bucket hashes the files itself.
    fresh = LocalBucket("b", tmp_path / "b")
    assert {o.key: o.etag for o in fresh.list()} == {"big.bin": expected, "dropped.bin": expected}
    assert file_etag(tmp_path / "b" / "big.bin") == expected
    (tmp_path / "empty").touch()
    assert file_etag(tmp_path / "empty") == xxhash.xxh3_128_hexdigest(b"")


def test_abandoned_write_publishes_nothing(tmp_path: Path) -> None:
    bucket = LocalBucket("b", tmp_path / "b")
    with pytest.raises(RuntimeError, match="boom"), bucket.open_write("big.bin") as f:
        for _ in range(8):
            f.write(b"x" * (1 << 20))
        raise RuntimeError("boom")
    assert not (tmp_path / "b" / "big.bin").exists()
    assert not list(bucket.list())


def test_no_write_leaves_anything_aside(tmp_path: Path) -> None:
    """Published by a rename, by a link (if_absent), refused or abandoned: the
    aside-file is gone every time (a rename needs no unlink after it, a link does)."""
    bucket = LocalBucket("b", tmp_path / "b")
    with bucket.open_write("a/plain.bin") as f:
        f.write(b"one")
    with bucket.open_write("a/plain.bin") as f:  # over an existing object
        f.write(b"two")
    with bucket.open_write("a/new.bin", if_absent=True) as f:
        f.write(b"three")
    with pytest.raises(ObjectExists), bucket.open_write("a/new.bin", if_absent=True) as f:
        f.write(b"four")
    with pytest.raises(RuntimeError, match="boom"), bucket.open_write("a/gone.bin") as f:
        f.write(b"five")
        raise RuntimeError("boom")
    assert list((tmp_path / "b" / TMP_DIR).iterdir()) == []
    assert {o.key: (tmp_path / "b" / o.key).read_bytes() for o in bucket.list()} == {
        "a/new.bin": b"three",
        "a/plain.bin": b"two",
    }
    bucket.delete("a/plain.bin")
    bucket.delete("a/plain.bin")  # already gone: nothing to do
    assert [o.key for o in bucket.list()] == ["a/new.bin"]
