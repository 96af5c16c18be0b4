"""The poller's watermark logic, on an in-memory bucket whose Last-Modified times we set.

S3 cannot be told what Last-Modified to give an object, so the cases that
matter (a multipart upload stamped with the time it *started*, a key that
sorts before everything seen, an overwrite) are played out here on a bucket
that lists like S3: in key order, with the store's own timestamps. The same
poller runs against SeaweedFS in tests/test_s3_pipeline.py.
"""

from __future__ import annotations

import hashlib
import io
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

import pytest

from sluiceway import Pipeline
from sluiceway.buckets.base import Bucket, ObjectInfo, ObjectNotFound
from sluiceway.config import ConfigError
from sluiceway.poller import BucketPoller, Discovery, Watermark, polled_buckets

from .conftest import BRONZE_TO_STAGING
from .helpers import wait_until

T0 = 1_800_000_000.0


class Place:
    """Where a bucket's objects are, as ``S3Bucket.location`` describes it."""

    def __init__(self, where: str) -> None:
        self.where = where

    def describe(self) -> str:
        return self.where


class MemoryBucket(Bucket):
    """Objects in a dict, listed in key order like S3, with settable Last-Modified."""

    def __init__(self, name: str, place: str = "mem://one") -> None:
        self.name = name
        self.location = Place(place)
        self.objects: dict[str, tuple[bytes, float]] = {}
        self.list_calls: list[tuple[str, str | None]] = []
        self.clock = T0

    def add(self, key: str, data: bytes, mtime: float | None = None) -> ObjectInfo:
        self.clock += 1
        self.objects[key] = (data, self.clock if mtime is None else mtime)
        return self.head(key)

    def head(self, key: str) -> ObjectInfo:
        if key not in self.objects:
            raise ObjectNotFound(key)
        data, mtime = self.objects[key]
        return ObjectInfo(key, len(data), hashlib.md5(data).hexdigest(), mtime)

    def open_read(self, key: str) -> BinaryIO:
        return io.BytesIO(self.objects[key][0])

    @contextmanager
    def open_write(self, key: str, *, if_absent: bool = False) -> Iterator[BinaryIO]:
        buf = io.BytesIO()
        yield buf
        self.add(key, buf.getvalue())

    def list(self, prefix: str = "", *, start_after: str | None = None) -> Iterator[ObjectInfo]:
        self.list_calls.append((prefix, start_after))
        for key in sorted(self.objects):
            if key.startswith(prefix) and (start_after is None or key > start_after):
                yield self.head(key)

    def delete(self, key: str) -> None:
        self.objects.pop(key, None)


class PlainListBucket(MemoryBucket):
    """A backend whose ``list`` has no ``start_after``: the poller filters instead."""

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:  # type: ignore[override]
        return super().list(prefix)


@pytest.fixture
def path(write_pipeline: Callable[..., Path]) -> Path:
    return write_pipeline(BRONZE_TO_STAGING)


def open_with(path: Path, bucket: MemoryBucket) -> Pipeline:
    """A pipeline (a "process") whose bronze bucket is ``bucket``."""
    p = Pipeline.from_file(path)
    p.buckets["bronze"] = bucket
    return p


@pytest.fixture
def mem() -> MemoryBucket:
    return MemoryBucket("bronze")


@pytest.fixture
def p(path: Path, mem: MemoryBucket) -> Iterator[Pipeline]:
    pipeline = open_with(path, mem)
    yield pipeline
    pipeline.close()


def keys(result_events: list) -> list[str]:  # type: ignore[type-arg]
    return [e.key for e in result_events]


def test_each_version_raises_one_event_and_the_watermark_moves(
    p: Pipeline, mem: MemoryBucket
) -> None:
    mem.add("b.csv", b"1")
    mem.add("a.csv", b"2")
    poller = BucketPoller(p, "bronze")
    assert keys(poller.poll().raised) == ["a.csv", "b.csv"]  # key order, like S3
    assert p.pending() == 2
    assert poller.watermark == Watermark(T0 + 2, "a.csv")  # the newest Last-Modified
    again = poller.poll()
    assert again.raised == [] and again.listed == 2
    assert p.pending() == 2


def test_a_late_key_that_sorts_first_is_found(p: Pipeline, mem: MemoryBucket) -> None:
    mem.add("2026/11/24/a.csv", b"1")
    poller = BucketPoller(p, "bronze")
    poller.poll()
    mem.add("2026/11/23/late.csv", b"2")  # sorts before the watermark's key
    assert keys(poller.poll().raised) == ["2026/11/23/late.csv"]


def test_an_overwrite_is_a_new_version(p: Pipeline, mem: MemoryBucket) -> None:
    mem.add("a.csv", b"1")
    poller = BucketPoller(p, "bronze")
    first = poller.poll().raised
    mem.add("a.csv", b"changed")
    second = poller.poll().raised
    assert keys(second) == ["a.csv"] and second[0].etag != first[0].etag


def test_lookback_covers_uploads_stamped_with_their_start(p: Pipeline, mem: MemoryBucket) -> None:
    poller = BucketPoller(p, "bronze", lookback=600)
    mem.add("x.csv", b"x", mtime=T0 + 10_000)
    poller.poll()
    # A multipart upload that started 5 minutes before x.csv was written, completed now.
    mem.add("multipart.csv", b"m", mtime=T0 + 10_000 - 300)
    # One that started two hours before: outside the window.
    mem.add("ancient.csv", b"a", mtime=T0 + 10_000 - 7200)
    result = poller.poll()
    assert keys(result.raised) == ["multipart.csv"]
    assert result.skipped_old == 1 and result.checked == 2
    # The start-up reconcile (a full listing) finds what the window skipped.
    assert [e.key for e in p.reconcile()] == ["ancient.csv"]
    # lookback=None: every object is compared with the ledger on every poll.
    mem.add("ancient2.csv", b"a2", mtime=T0)
    full = BucketPoller(p, "bronze", lookback=None).poll()
    assert keys(full.raised) == ["ancient2.csv"] and full.skipped_old == 0


def test_old_objects_cost_no_ledger_lookups(p: Pipeline, mem: MemoryBucket) -> None:
    for i in range(50):
        mem.add(f"old/{i:03d}.csv", b"%d" % i, mtime=T0 + i)
    poller = BucketPoller(p, "bronze", lookback=60)
    poller.poll()
    mem.add("new.csv", b"n", mtime=T0 + 10_000)
    poller.poll()  # moves the watermark to new.csv
    lookups: list[str] = []
    real = p.ledger.has_seen

    def counting(bucket: str, key: str, etag: str) -> bool:
        lookups.append(key)
        return real(bucket, key, etag)

    p.ledger.has_seen = counting  # type: ignore[method-assign]
    result = poller.poll()
    assert result.listed == 51 and result.skipped_old == 50
    assert lookups == ["new.csv"]


def test_the_watermark_survives_a_restart(path: Path, mem: MemoryBucket) -> None:
    first = open_with(path, mem)
    mem.add("a.csv", b"1")
    assert keys(BucketPoller(first, "bronze").poll().raised) == ["a.csv"]
    first.close()
    mem.add("while-stopped.csv", b"2")  # arrives while nothing runs
    second = open_with(path, mem)
    poller = BucketPoller(second, "bronze")
    assert poller.watermark == Watermark(T0 + 1, "a.csv")
    assert keys(poller.poll().raised) == ["while-stopped.csv"]
    second.close()


def test_a_watermark_belongs_to_the_place_not_the_name(path: Path, mem: MemoryBucket) -> None:
    p = open_with(path, mem)
    mem.add("a.csv", b"1", mtime=T0 + 10_000)
    BucketPoller(p, "bronze", lookback=0).poll()
    elsewhere = MemoryBucket("bronze", "mem://two")  # same name, another store (a new profile)
    elsewhere.add("old.csv", b"o", mtime=T0)
    q = open_with(path, elsewhere)
    assert keys(BucketPoller(q, "bronze", lookback=0).poll().raised) == ["old.csv"]
    p.close()
    q.close()


def test_a_failing_poll_leaves_the_watermark_and_repeats(
    p: Pipeline, mem: MemoryBucket, monkeypatch: pytest.MonkeyPatch
) -> None:
    for key in ("a.csv", "b.csv", "c.csv"):
        mem.add(key, key.encode())
    real = p.object_created

    def broker_down_at_b(bucket: str, info: ObjectInfo) -> object:
        if info.key == "b.csv":
            raise ConnectionError("broker unreachable")
        return real(bucket, info)

    monkeypatch.setattr(p, "object_created", broker_down_at_b)
    poller = BucketPoller(p, "bronze")
    with pytest.raises(ConnectionError):
        poller.poll()
    assert poller.watermark is None
    monkeypatch.setattr(p, "object_created", real)
    assert keys(poller.poll().raised) == ["b.csv", "c.csv"]  # a.csv is not raised twice
    assert p.pending() == 3


def test_start_after_lists_only_new_keys_and_misses_late_ones(
    p: Pipeline, mem: MemoryBucket
) -> None:
    mem.add("2026/11/24/a.csv", b"1")
    poller = BucketPoller(p, "bronze", mode="start_after")
    assert keys(poller.poll().raised) == ["2026/11/24/a.csv"]
    mem.add("2026/11/24/b.csv", b"2")
    mem.add("2026/11/23/late.csv", b"3")
    assert keys(poller.poll().raised) == ["2026/11/24/b.csv"]
    assert mem.list_calls[-1] == ("", "2026/11/24/a.csv")  # StartAfter, on the server
    assert poller.watermark is not None and poller.watermark.last_key == "2026/11/24/b.csv"
    # The documented trade-off: the late key waits for the next start's reconcile.
    assert [e.key for e in p.reconcile()] == ["2026/11/23/late.csv"]


def test_start_after_on_a_backend_without_it_filters(path: Path) -> None:
    plain = PlainListBucket("bronze")
    p = open_with(path, plain)
    plain.add("a.csv", b"1")
    poller = BucketPoller(p, "bronze", mode="start_after")
    poller.poll()
    plain.add("b.csv", b"2")
    assert keys(poller.poll().raised) == ["b.csv"]
    p.close()


def test_prefix_limits_the_listing(p: Pipeline, mem: MemoryBucket) -> None:
    mem.add("in/a.csv", b"1")
    mem.add("out/b.csv", b"2")
    assert keys(BucketPoller(p, "bronze", prefix="in/").poll().raised) == ["in/a.csv"]


def test_discovery_follows_the_pipeline_file(write_pipeline: Callable[..., Path]) -> None:
    text = BRONZE_TO_STAGING + (
        "discovery:\n  poll_interval: 250ms\n  lookback: 10m\n  start_after: [bronze]\n"
    )
    p = Pipeline.from_file(write_pipeline(text))
    assert polled_buckets(p) == []  # local buckets have the directory watcher
    p.buckets["bronze"] = MemoryBucket("bronze")
    p.buckets["staging"] = MemoryBucket("staging")
    d = Discovery.for_pipeline(p)
    assert d.interval == 0.25 and d.notifications is None
    assert [(x.name, x.mode, x.lookback) for x in d.pollers] == [
        ("bronze", "start_after", 600.0),
        ("staging", "scan", 600.0),
    ]
    p.close()


@pytest.mark.parametrize(
    ("discovery", "message"),
    [
        ("  start_after: [silver]\n", r"discovery\.start_after\.0: unknown bucket 'silver'"),
        ("  poll_interval: 0s\n", r"discovery\.poll_interval"),
        ("  every: 5s\n", r"discovery\.every: unknown key"),
    ],
)
def test_discovery_mistakes_are_reported_with_their_line(
    write_pipeline: Callable[..., Path], discovery: str, message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        Pipeline.from_file(write_pipeline(BRONZE_TO_STAGING + "discovery:\n" + discovery))


def test_the_poll_thread_keeps_polling_until_stopped(p: Pipeline, mem: MemoryBucket) -> None:
    stop = threading.Event()
    d = Discovery(p, [BucketPoller(p, "bronze")], interval=0.05)
    d.start(stop)
    try:
        mem.add("a.csv", b"1")
        wait_until(lambda: p.pending() == 1, 10, "the first object")
        mem.add("b.csv", b"2")
        wait_until(lambda: p.pending() == 2, 10, "the second object")
    finally:
        stop.set()
    for t in d.threads:
        t.join(5)
        assert not t.is_alive()


def test_the_poll_thread_survives_errors(
    p: Pipeline, mem: MemoryBucket, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = {"n": 0}
    real = mem.list

    def flaky(prefix: str = "", *, start_after: str | None = None) -> Iterator[ObjectInfo]:
        calls["n"] += 1
        if calls["n"] == 1:
            raise ConnectionError("store unreachable")
        return real(prefix, start_after=start_after)

    monkeypatch.setattr(mem, "list", flaky)
    mem.add("a.csv", b"1")
    stop = threading.Event()
    d = Discovery(p, [BucketPoller(p, "bronze")], interval=0.05)
    d.start(stop)
    try:
        wait_until(lambda: p.pending() == 1, 10, "the poll after the failed one")
    finally:
        stop.set()
