"""The bucket contract: every backend passes the same tests.

A new backend (S3, an S3-compatible store) is added to ``BACKENDS`` and is
done when this file passes for it.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from sluiceway.buckets.base import Bucket, ObjectExists, ObjectNotFound
from sluiceway.buckets.local import LocalBucket

from ..s3_backend import s3_bucket_factory


def _local(request: pytest.FixtureRequest, tmp_path: Path) -> Bucket:
    return LocalBucket("test", tmp_path / "bucket")


# name → factory(request, tmp_path); a factory may ask for service fixtures
# with request.getfixturevalue(...) and skips (or fails in CI) without them.
BACKENDS: dict[str, Callable[[pytest.FixtureRequest, Path], Bucket]] = {"local": _local}
BACKENDS["s3"] = s3_bucket_factory  # SeaweedFS on loopback (tests/s3_backend.py)


@pytest.fixture(params=sorted(BACKENDS))
def bucket(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Bucket]:
    yield BACKENDS[request.param](request, tmp_path)


def test_put_then_read_and_head(bucket: Bucket) -> None:
    info = bucket.put_bytes("a/b/c.csv", b"x,y\n1,2\n")
    assert info.key == "a/b/c.csv"
    assert info.size == 8
    # The ETag is the content's identity: the same bytes under another key
    # have the same one, other bytes another (each backend's own hash).
    assert info.etag
    assert bucket.put_bytes("a/b/copy.csv", b"x,y\n1,2\n").etag == info.etag
    assert bucket.put_bytes("a/b/other.csv", b"x,y\n1,3\n").etag != info.etag
    assert bucket.read_bytes("a/b/c.csv") == b"x,y\n1,2\n"
    assert bucket.head("a/b/c.csv") == info


def test_missing_object(bucket: Bucket) -> None:
    with pytest.raises(ObjectNotFound):
        bucket.head("nope.csv")
    with pytest.raises(ObjectNotFound):
        bucket.open_read("nope.csv")
    bucket.delete("nope.csv")  # not an error


def test_list_by_prefix_in_key_order(bucket: Bucket) -> None:
    for key in ["in/b.csv", "in/a.csv", "out/c.csv", "in/sub/d.csv"]:
        bucket.put_bytes(key, key.encode())
    assert [o.key for o in bucket.list("in/")] == ["in/a.csv", "in/b.csv", "in/sub/d.csv"]
    assert [o.key for o in bucket.list()] == ["in/a.csv", "in/b.csv", "in/sub/d.csv", "out/c.csv"]


def test_failed_write_leaves_nothing(bucket: Bucket) -> None:
    with pytest.raises(RuntimeError), bucket.open_write("x.parquet") as f:
        f.write(b"half")
        raise RuntimeError("disk on fire")
    with pytest.raises(ObjectNotFound):
        bucket.head("x.parquet")
    assert list(bucket.list()) == []


def test_object_invisible_until_the_write_ends(bucket: Bucket) -> None:
    with bucket.open_write("big.bin") as f:
        f.write(b"x" * 1000)
        assert list(bucket.list()) == []
        with pytest.raises(ObjectNotFound):
            bucket.head("big.bin")
    assert bucket.head("big.bin").size == 1000


def test_overwrite_replaces_content_and_etag(bucket: Bucket) -> None:
    first = bucket.put_bytes("k", b"one")
    second = bucket.put_bytes("k", b"two")
    assert first.etag != second.etag
    assert bucket.read_bytes("k") == b"two"


def test_conditional_put_only_if_absent(bucket: Bucket) -> None:
    bucket.put_bytes("once", b"first", if_absent=True)
    with pytest.raises(ObjectExists):
        bucket.put_bytes("once", b"second", if_absent=True)
    assert bucket.read_bytes("once") == b"first"


def test_conditional_put_races_have_one_winner(bucket: Bucket) -> None:
    wins: list[int] = []
    barrier = threading.Barrier(8)

    def attempt(i: int) -> None:
        barrier.wait(timeout=10)
        try:
            bucket.put_bytes("race", str(i).encode(), if_absent=True)
            wins.append(i)
        except ObjectExists:
            pass

    threads = [threading.Thread(target=attempt, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=10)
    assert len(wins) == 1
    assert bucket.read_bytes("race") == str(wins[0]).encode()


@pytest.mark.parametrize("key", ["", "/abs", "a//b", "../up", "a/./b"])
def test_bad_keys_are_refused(bucket: Bucket, key: str) -> None:
    with pytest.raises(ValueError, match="invalid object key"):
        bucket.put_bytes(key, b"x")


def test_streaming_read_in_chunks(bucket: Bucket) -> None:
    data = bytes(range(256)) * 4096
    bucket.put_bytes("blob", data)
    got = bytearray()
    with bucket.open_read("blob") as f:
        while chunk := f.read(10_000):
            got += chunk
    assert bytes(got) == data
