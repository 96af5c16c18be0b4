"""The watcher offers a file only once it is fully written, and only once."""

from __future__ import annotations

import hashlib
import threading
import time
from pathlib import Path

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
        assert event.etag == hashlib.md5(b"".join(chunks)).hexdigest()
        # Touching it again without changing content raises nothing new.
        target.write_bytes(b"".join(chunks))
        wait_until(lambda: not watcher.busy, 10, "the watcher to settle")
        assert len(seen) == 1
    finally:
        stop.set()
        thread.join(10)
    assert pipeline.pending() == 1  # one message queued for the one version
