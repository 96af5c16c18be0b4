"""The local bucket's ETag: the MD5 of the content, also when hashed in a second thread.

Large writes are hashed by a thread of their own while the caller writes the
next chunk; these tests prove the ETag is still exactly the MD5 of the bytes
written, whatever the sizes and types of the writes and however they mix the
inline and threaded hashing.
"""

from __future__ import annotations

import hashlib
import threading
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sluiceway.buckets import local
from sluiceway.buckets.base import ObjectExists
from sluiceway.buckets.local import TMP_DIR, LocalBucket, _HashingWriter

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


@settings(max_examples=200, deadline=None)
@given(writes=WRITES, inline=st.integers(0, 5000), chunk=st.integers(1, 4000))
def test_etag_is_the_md5_of_what_was_written(
    writes: list[tuple[bytes, str]], inline: int, chunk: int
) -> None:
    """Small thresholds, so that inline, gathered and threaded hashing all mix."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(local, "_INLINE_BYTES", inline)
        mp.setattr(local, "_HASH_CHUNK", chunk)
        mp.setattr(local, "_IN_FLIGHT", 2)
        sink = _Sink()
        writer = _HashingWriter(sink)  # type: ignore[arg-type]
        for data, kind in writes:
            buffer = _as(kind, data)
            writer.write(buffer)
            if isinstance(buffer, memoryview):
                buffer = buffer.obj  # type: ignore[assignment]
            if isinstance(buffer, bytearray) and buffer:
                buffer[0] ^= 0xFF  # the owner reuses its buffer: the hash must not see it
        expected = b"".join(data for data, _ in writes)
        assert bytes(sink.data) == expected
        assert writer.hexdigest() == hashlib.md5(expected).hexdigest()


def _hashing_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("sluiceway-md5")]


def test_large_object_etag_and_no_thread_left(tmp_path: Path) -> None:
    bucket = LocalBucket("b", tmp_path / "b")
    piece = bytes(range(256)) * 4096  # 1 MiB
    with bucket.open_write("big.bin") as f:
        for i in range(12):  # past the inline part, so the thread hashes most of it
            f.write(piece[i:] + piece[:i])
    data = (tmp_path / "b" / "big.bin").read_bytes()
    assert len(data) == 12 * len(piece)
    assert bucket.head("big.bin").etag == hashlib.md5(data).hexdigest()
    # The cache was filled by the writer; a fresh bucket hashes the file itself.
    assert LocalBucket("b", tmp_path / "b").head("big.bin").etag == hashlib.md5(data).hexdigest()
    assert not _hashing_threads()


def test_abandoned_large_write_publishes_nothing_and_stops_the_thread(tmp_path: Path) -> None:
    bucket = LocalBucket("b", tmp_path / "b")
    with pytest.raises(RuntimeError, match="boom"), bucket.open_write("big.bin") as f:
        for _ in range(8):
            f.write(b"x" * (1 << 20))
        raise RuntimeError("boom")
    assert not (tmp_path / "b" / "big.bin").exists()
    assert not list(bucket.list())
    assert not _hashing_threads()


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
