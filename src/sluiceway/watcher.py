"""Raise events for files other programs drop into bucket directories.

A file is offered only once it is fully written: its size and modification
time must stay the same for ``settle`` seconds. Hidden files and names such
as ``*.part`` are never objects (see ``buckets/local.py``), so a program
that writes aside and renames is picked up at the rename. Offering a file
twice is harmless: the ledger raises one event per object version.
"""

from __future__ import annotations

import logging
import os
import stat
import threading
import time
from collections.abc import Callable

from watchfiles import Change, watch

from .buckets.base import ObjectNotFound
from .buckets.local import LocalBucket
from .events import Event
from .pipeline import Pipeline

log = logging.getLogger("sluiceway.watcher")


class BucketWatcher:
    def __init__(
        self,
        pipeline: Pipeline,
        *,
        settle: float = 0.25,
        on_event: Callable[[Event], None] | None = None,
    ) -> None:
        self.pipeline = pipeline
        self.settle = settle
        self.on_event = on_event
        self.buckets = [b for b in pipeline.buckets.values() if isinstance(b, LocalBucket)]
        # path -> (bucket, key, size, mtime_ns, unchanged since)
        self._pending: dict[str, tuple[LocalBucket, str, int, int, float]] = {}
        self.ready = threading.Event()

    @property
    def busy(self) -> bool:
        """True while a file is seen but not yet settled (drain waits for it)."""
        return bool(self._pending)

    def _bucket_for(self, path: str) -> LocalBucket | None:
        for b in self.buckets:
            if path.startswith(str(b.root) + os.sep):
                return b
        return None

    def _note(self, path: str) -> None:
        bucket = self._bucket_for(path)
        if bucket is None:
            return
        key = bucket.key_of(path)  # aside-files and hidden names: None, decided on the string
        if key is None:
            return
        try:
            st = os.stat(path)
        except FileNotFoundError:
            self._pending.pop(path, None)
            return
        if stat.S_ISDIR(st.st_mode):
            # A directory moved in whole: its files raise no events.
            for dirpath, _, files in os.walk(path):
                for fn in files:
                    self._note(os.path.join(dirpath, fn))
        elif stat.S_ISREG(st.st_mode):
            self._pending[path] = (bucket, key, st.st_size, st.st_mtime_ns, time.monotonic())

    def _settle(self) -> None:
        now = time.monotonic()
        for path, (bucket, key, size, mtime_ns, since) in list(self._pending.items()):
            try:
                st = os.stat(path)
            except FileNotFoundError:
                del self._pending[path]
                continue
            if (st.st_size, st.st_mtime_ns) != (size, mtime_ns):
                self._pending[path] = (bucket, key, st.st_size, st.st_mtime_ns, now)
                continue
            if now - since < self.settle:
                continue
            del self._pending[path]
            try:
                event = self.pipeline.object_created(bucket.name, bucket.head(key))
            except ObjectNotFound:
                continue
            if event is not None:
                log.info("new object %s/%s", bucket.name, key)
                if self.on_event is not None:
                    self.on_event(event)

    def run(self, stop: threading.Event) -> None:
        roots = [str(b.root) for b in self.buckets]
        if not roots:
            self.ready.set()
            stop.wait()
            return
        for changes in watch(
            *roots,
            stop_event=stop,
            yield_on_timeout=True,
            rust_timeout=100,
            debounce=50,
            step=20,
            recursive=True,
            raise_interrupt=False,
        ):
            # The first yield means the OS watch is in place: files dropped
            # from now on are seen, so a reconcile started now misses none.
            self.ready.set()
            for change, path in changes:
                if change is Change.deleted:
                    self._pending.pop(path, None)
                else:
                    self._note(path)
            self._settle()
