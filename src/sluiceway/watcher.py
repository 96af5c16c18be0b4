"""Raise events for files other programs drop into bucket directories.

A file is offered only once it is fully written. A file whose modification
time is already ``settle`` seconds old when it is seen was written before: it
was renamed or hard-linked in, copied with ``cp -p`` or extracted from an
archive (all of which set an old mtime only once the data is in), and it is
offered at once. Any other file must keep the same size and modification time
for ``settle`` seconds. Either way, its size and mtime when hashed must still
be those it was seen with. Hidden files and names such as ``*.part`` are never
objects (see ``buckets/local.py``), so a program that writes aside and renames
is picked up at the rename. Offering a file twice is harmless: the ledger
raises one event per object version.

Only buckets some rule can route from are watched (``Router.may_route``):
events from the others would reach no queue, and the start-up reconcile still
records the files users drop there.
"""

from __future__ import annotations

import logging
import os
import stat
import threading
import time
from collections.abc import Callable, Iterator

from watchfiles import Change, watch

from .buckets.base import ObjectInfo, ObjectNotFound
from .buckets.local import LocalBucket
from .events import Event
from .pipeline import Pipeline

log = logging.getLogger("sluiceway.watcher")

# A file seen: its bucket, key and stat when seen.
_Seen = tuple[LocalBucket, str, os.stat_result]


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
        self.buckets = [
            b
            for b in pipeline.buckets.values()
            if isinstance(b, LocalBucket) and pipeline.router.may_route(b.name)
        ]
        # path -> (bucket, key, stat when last changed, unchanged since)
        self._pending: dict[str, tuple[LocalBucket, str, os.stat_result, float]] = {}
        self._settled: dict[str, _Seen] = {}  # to offer at the end of this pass
        self.ready = threading.Event()

    @property
    def busy(self) -> bool:
        """True while a file is seen but its event not yet raised (drain waits for it)."""
        return bool(self._pending or self._settled)

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
            if time.time() - st.st_mtime >= self.settle:  # written before it came in
                self._pending.pop(path, None)
                self._settled[path] = (bucket, key, st)
            else:
                self._pending[path] = (bucket, key, st, time.monotonic())

    def _settle(self) -> None:
        now = time.monotonic()
        for path, (bucket, key, seen, since) in list(self._pending.items()):
            try:
                st = os.stat(path)
            except FileNotFoundError:
                del self._pending[path]
                continue
            if (st.st_size, st.st_mtime_ns) != (seen.st_size, seen.st_mtime_ns):
                self._pending[path] = (bucket, key, st, now)
            elif now - since >= self.settle:
                del self._pending[path]
                self._settled[path] = (bucket, key, st)
        if not self._settled:
            return
        try:
            raised = self.pipeline.objects_created(self._heads(list(self._settled.values())))
        finally:
            self._settled.clear()  # after the raise, so ``busy`` covers it
        for event in raised:
            log.info("new object %s/%s", event.bucket, event.key)
            if self.on_event is not None:
                self.on_event(event)

    def _heads(self, settled: list[_Seen]) -> Iterator[tuple[str, ObjectInfo]]:
        """The settled files' versions (hashed here), unless they changed since they were seen."""
        for bucket, key, seen in settled:
            try:
                info = bucket.head(key)
            except ObjectNotFound:
                continue
            if (info.size, info.mtime) != (seen.st_size, seen.st_mtime):
                # Written to again: it waits as a file being written does.
                path = bucket.path_of(key)
                self._pending[path] = (bucket, key, seen, time.monotonic())
                continue
            yield bucket.name, info

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
