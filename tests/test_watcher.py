"""The watcher offers a file only once it is fully written, and only once."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest
import xxhash

from sluiceway import Pipeline
from sluiceway.events import Event
from sluiceway.watcher import BucketWatcher

from .helpers import wait_until


def test_growing_file_is_offered_once_after_it_settles(pipeline: Pipeline, tmp_path: Path) -> None:
    seen: list[Event] = []
    watcher = BucketWatcher(pipeline, settle=0.3, on_event=seen.append)
    stop = threading.Event()
    thread = threading.Thread(target=watcher.run, args=(stop,), daemon=True)
    thread.start()
    try:
        assert watcher.ready.wait(10)
        target = pipeline.buckets["bronze"].root / "slow.csv"  # type: ignore[attr-defined]
        chunks = [b"id,name\n"] + [f"{i},row {i}\n".encode() for i in range(8)]
        with open(target, "wb") as f:
            for chunk in chunks:
                # A slow writer: a chunk every 0.1s, faster than the settle time.
                f.write(chunk)
                f.flush()
                time.sleep(0.1)
                assert seen == [], "offered while still being written"
        wait_until(lambda: len(seen) == 1, 10, "the settled file's event")
        [event] = seen
        assert event.key == "slow.csv"
        assert event.etag == xxhash.xxh3_128_hexdigest(b"".join(chunks))
        # Touching it again without changing content raises nothing new.
        target.write_bytes(b"".join(chunks))
        wait_until(lambda: not watcher.busy, 10, "the watcher to settle")
        assert len(seen) == 1
    finally:
        stop.set()
        thread.join(10)
    assert pipeline.pending() == 1  # one message queued for the one version


def test_key_of_names_objects_only(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The watcher's path → key: hidden and aside files are not objects, and a
    symlink counts by where it points, however the path is spelled."""
    from sluiceway.buckets.local import TMP_DIR, LocalBucket

    bucket = LocalBucket("b", tmp_path / "b")
    root = bucket.root
    (root / "in" / "sub").mkdir(parents=True)
    (root / "in" / "sub" / "a.csv").write_text("x")
    outside = tmp_path / "elsewhere.csv"
    outside.write_text("y")
    (root / "in" / "out.csv").symlink_to(outside)
    (root / "in" / "alias.csv").symlink_to(root / "in" / "sub" / "a.csv")
    (root / "linked").symlink_to(root / "in" / "sub", target_is_directory=True)

    assert bucket.key_of(root / "in" / "sub" / "a.csv") == "in/sub/a.csv"
    assert bucket.key_of(str(root / "in" / "sub" / "a.csv")) == "in/sub/a.csv"
    assert bucket.key_of(root / "in" / "x" / ".." / "sub" / "a.csv") == "in/sub/a.csv"
    monkeypatch.chdir(root / "in")
    assert bucket.key_of("sub/a.csv") == "in/sub/a.csv"
    assert bucket.key_of(root / TMP_DIR / "123-abc.tmp") is None
    assert bucket.key_of(root / "in" / ".hidden.csv") is None
    assert bucket.key_of(root / "in" / "a.csv.part") is None
    assert bucket.key_of(outside) is None
    assert bucket.key_of(root / "in" / "out.csv") is None  # points outside the bucket
    assert bucket.key_of(root / "in" / "alias.csv") == "in/sub/a.csv"
    assert bucket.key_of(root / "linked" / "a.csv") == "in/sub/a.csv"


def _start(watcher: BucketWatcher) -> tuple[threading.Event, threading.Thread]:
    stop = threading.Event()
    thread = threading.Thread(target=watcher.run, args=(stop,), daemon=True)
    thread.start()
    assert watcher.ready.wait(10)
    return stop, thread


def _drop_old(source: Path, target: Path, content: bytes) -> None:
    """Write aside, date it two hours back (as ``cp -p`` or tar would), rename it in."""
    source.write_bytes(content)
    old = time.time() - 7200
    os.utime(source, (old, old))
    os.replace(source, target)


def test_file_written_before_it_was_renamed_in_is_offered_without_waiting(
    pipeline: Pipeline, tmp_path: Path
) -> None:
    """Its own mtime, older than the settle time, says it is complete: the hour
    is not waited."""
    seen: list[Event] = []
    watcher = BucketWatcher(pipeline, settle=3600, on_event=seen.append)
    stop, thread = _start(watcher)
    try:
        bronze = pipeline.buckets["bronze"].root  # type: ignore[attr-defined]
        (bronze / "in").mkdir()
        for i in range(3):
            _drop_old(tmp_path / f"{i}.csv", bronze / "in" / f"{i}.csv", b"id\n%d\n" % i)
        wait_until(lambda: len(seen) == 3, 30, "the renamed-in files' events")
        assert sorted(e.key for e in seen) == ["in/0.csv", "in/1.csv", "in/2.csv"]
        assert not watcher.busy
    finally:
        stop.set()
        thread.join(10)
    assert pipeline.pending() == 3


def test_file_still_being_appended_is_not_offered_early(pipeline: Pipeline, tmp_path: Path) -> None:
    """A file being written has a fresh mtime, so it waits the settle time, even
    after an old file dropped later is offered at once."""
    seen: list[Event] = []
    watcher = BucketWatcher(pipeline, settle=3600, on_event=seen.append)
    stop, thread = _start(watcher)
    try:
        bronze = pipeline.buckets["bronze"].root  # type: ignore[attr-defined]
        with open(bronze / "growing.csv", "wb") as f:
            for i in range(5):
                f.write(b"%d,row\n" % i)
                f.flush()
            # Dropped after the appends, so the watcher has seen them all once
            # this marker is offered.
            _drop_old(tmp_path / "marker.csv", bronze / "marker.csv", b"id\n1\n")
            wait_until(lambda: len(seen) == 1, 30, "the marker's event")
            f.write(b"5,row\n")
            f.flush()
        _drop_old(tmp_path / "marker2.csv", bronze / "marker2.csv", b"id\n2\n")
        wait_until(lambda: len(seen) == 2, 30, "the second marker's event")
        assert [e.key for e in seen] == ["marker.csv", "marker2.csv"]
        assert watcher.busy  # growing.csv waits for its settle time
    finally:
        stop.set()
        thread.join(10)


def test_buckets_no_rule_routes_from_are_not_watched(pipeline: Pipeline) -> None:
    """The only rule names bronze: files in staging could reach no queue."""
    watcher = BucketWatcher(pipeline)
    assert [b.name for b in watcher.buckets] == ["bronze"]
