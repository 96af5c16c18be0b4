"""Discover new objects in buckets that have no watcher: list them on an interval.

A local bucket has a directory watcher; an S3 bucket tells nobody unless
notifications are configured (see ``notifications.py``), and even then a
notification can be lost to a misconfiguration. The poller is the safety net
that needs nothing set up: it lists the bucket and raises each new object
version's event exactly once, through ``Pipeline.object_created``, whose ledger
(``first_seen``) makes a second offer of the same version a no-op.

Why not "list from the last key"? S3 lists in *key* order, not in time order.
A watermark on keys alone (``StartAfter``) never sees a file that lands later
under a key sorting before the watermark (``2026/11/23/late.csv`` after
``2026/11/24/a.csv``), nor a key overwritten with new content. So there are
two modes, per bucket:

``scan`` (the default, always correct)
    Every poll lists every key under the prefix and compares objects with the
    ledger (``has_seen``, no write). A durable watermark, the newest
    ``Last-Modified`` any poll has seen, lets the poll skip objects
    last modified more than ``lookback`` before it without asking the ledger
    at all, which is what keeps a poll cheap with a remote ledger (a round trip
    per object) and a big bucket. The lookback exists because S3 stamps a
    multipart upload with the time it *started*, and a large PUT with the time
    its request arrived: such an object shows up in listings with a
    Last-Modified older than objects already seen. Only the store's own clock
    is compared with itself, so the local clock's skew does not matter.
    ``lookback: null`` disables the skipping (every object checked on every
    poll). Cost per poll: one LIST request per 1000 keys, plus a ledger lookup
    per object younger than the window.

``start_after`` (for append-only key layouts)
    Each poll lists only the keys after the last key seen (S3's
    ``StartAfter``), so its cost follows the number of *new* objects, not the
    size of the bucket. It is right only when every new key sorts after every
    existing one (keys that start with a timestamp or a ULID from a single
    writer) and objects are never rewritten: a late-arriving earlier key or an
    overwrite is missed until the next start.

Either way, every ``sluiceway run`` begins with the reconcile (a full listing
checked against the ledger), so whatever a running poller skipped is found
at the next start, as for a local bucket: no event is lost, and none is
raised twice.

The watermark lives in the state database, keyed by the bucket's name *and*
its place (S3 bucket, prefix, endpoint), so pointing a profile somewhere else
starts afresh instead of skipping objects by a watermark from another store.
It moves only after a poll has offered every object it covers: a crash in
the middle repeats the poll, and the ledger absorbs the repeats.
"""

from __future__ import annotations

import inspect
import logging
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from .buckets.base import Bucket, ObjectInfo
from .buckets.local import LocalBucket
from .events import Event
from .state import StateDB

if TYPE_CHECKING:
    from .notifications import NotificationSource
    from .pipeline import Pipeline

log = logging.getLogger("sluiceway.poller")

MODES = ("scan", "start_after")
DEFAULT_INTERVAL = 5.0
DEFAULT_LOOKBACK = 3600.0

SCHEMA = """
CREATE TABLE IF NOT EXISTS poll_watermarks (
    bucket         TEXT NOT NULL,  -- the pipeline's bucket name
    place          TEXT NOT NULL,  -- where it points (s3://bucket/prefix at endpoint)
    prefix         TEXT NOT NULL,  -- the polled prefix inside the bucket
    mode           TEXT NOT NULL,  -- scan | start_after
    last_modified  REAL NOT NULL,  -- newest Last-Modified seen (the store's clock)
    last_key       TEXT NOT NULL,  -- scan: the key with it; start_after: the last key listed
    updated_at     REAL NOT NULL,
    PRIMARY KEY (bucket, place, prefix, mode)
)
"""


@dataclass(frozen=True)
class Watermark:
    """How far polls have got: ``(last_modified, last_key)``."""

    last_modified: float
    last_key: str


class WatermarkStore:
    """Watermarks in the state database (one row per bucket, place, prefix and mode)."""

    def __init__(self, db: StateDB) -> None:
        self.db = db
        with db.transaction() as conn:
            conn.execute(SCHEMA)

    def get(self, bucket: str, place: str, prefix: str, mode: str) -> Watermark | None:
        row = self.db.conn.execute(
            "SELECT last_modified, last_key FROM poll_watermarks"
            " WHERE bucket = ? AND place = ? AND prefix = ? AND mode = ?",
            (bucket, place, prefix, mode),
        ).fetchone()
        return None if row is None else Watermark(float(row[0]), str(row[1]))

    def put(self, bucket: str, place: str, prefix: str, mode: str, mark: Watermark) -> None:
        with self.db.transaction() as conn:
            conn.execute(
                "INSERT INTO poll_watermarks"
                " (bucket, place, prefix, mode, last_modified, last_key, updated_at)"
                " VALUES (?, ?, ?, ?, ?, ?, ?)"
                " ON CONFLICT (bucket, place, prefix, mode) DO UPDATE SET"
                " last_modified = excluded.last_modified, last_key = excluded.last_key,"
                " updated_at = excluded.updated_at",
                (bucket, place, prefix, mode, mark.last_modified, mark.last_key, time.time()),
            )


def place_of(bucket: Bucket) -> str:
    """Where a bucket's objects are: part of the watermark's identity."""
    location = getattr(bucket, "location", None)
    if location is not None and hasattr(location, "describe"):
        return str(location.describe())
    if isinstance(bucket, LocalBucket):
        return str(bucket.root)
    return f"{type(bucket).__name__}:{bucket.name}"


def _supports_start_after(bucket: Bucket) -> bool:
    try:
        return "start_after" in inspect.signature(bucket.list).parameters
    except (TypeError, ValueError):
        return False


@dataclass
class PollResult:
    """What one poll of one bucket did."""

    bucket: str
    listed: int = 0  # objects the listing returned
    skipped_old: int = 0  # older than the watermark's lookback: not even looked up
    checked: int = 0  # compared with the ledger
    raised: list[Event] = field(default_factory=list)
    seconds: float = 0.0


class BucketPoller:
    """Polls one bucket; ``poll()`` raises the events of the versions not seen before."""

    def __init__(
        self,
        pipeline: Pipeline,
        bucket: str,
        *,
        prefix: str = "",
        mode: str = "scan",
        lookback: float | None = DEFAULT_LOOKBACK,
        on_event: Callable[[Event], None] | None = None,
    ) -> None:
        if mode not in MODES:
            raise ValueError(f"poll mode must be one of {', '.join(MODES)}, got {mode!r}")
        if lookback is not None and lookback < 0:
            raise ValueError("lookback cannot be negative")
        self.pipeline = pipeline
        self.name = bucket
        self.bucket = pipeline.bucket(bucket)
        self.prefix = prefix
        self.mode = mode
        self.lookback = lookback
        self.on_event = on_event
        self.watermarks = WatermarkStore(pipeline.db)
        self.place = place_of(self.bucket)

    def __repr__(self) -> str:
        return f"BucketPoller({self.name!r}, mode={self.mode!r}, place={self.place!r})"

    @property
    def watermark(self) -> Watermark | None:
        return self.watermarks.get(self.name, self.place, self.prefix, self.mode)

    def _listing(self, mark: Watermark | None) -> Iterator[ObjectInfo]:
        if self.mode == "scan" or mark is None:
            return iter(self.bucket.list(self.prefix))
        if _supports_start_after(self.bucket):
            return iter(self.bucket.list(self.prefix, start_after=mark.last_key))  # type: ignore[call-arg]
        return (o for o in self.bucket.list(self.prefix) if o.key > mark.last_key)

    def poll(self) -> PollResult:
        """List once, raise every new version's event, then move the watermark.

        An error (the store unreachable, the broker down) propagates before
        the watermark moves, so the next poll covers the same ground again.
        """
        started = time.monotonic()
        result = PollResult(self.name)
        mark = self.watermark
        skip_before: float | None = None
        if self.mode == "scan" and mark is not None and self.lookback is not None:
            skip_before = mark.last_modified - self.lookback
        # scan: the newest (Last-Modified, key); start_after: the last key, in key order.
        top = (mark.last_modified, mark.last_key) if mark is not None else None
        ledger = self.pipeline.ledger
        for info in self._listing(mark):
            result.listed += 1
            if top is None:
                top = (info.mtime, info.key)
            elif self.mode == "start_after":
                top = (max(top[0], info.mtime), max(top[1], info.key))
            else:
                top = max(top, (info.mtime, info.key))
            if skip_before is not None and info.mtime < skip_before:
                result.skipped_old += 1
                continue
            result.checked += 1
            if ledger.has_seen(self.name, info.key, info.etag):
                continue
            event = self.pipeline.object_created(self.name, info)
            if event is None:
                continue  # another path (watcher, put, a notification) raised it first
            log.info("new object %s/%s (found by polling)", self.name, info.key)
            result.raised.append(event)
            if self.on_event is not None:
                self.on_event(event)
        if top is not None and Watermark(*top) != mark:
            self.watermarks.put(self.name, self.place, self.prefix, self.mode, Watermark(*top))
        result.seconds = time.monotonic() - started
        log.debug(
            "polled %s: %d listed, %d skipped as old, %d checked, %d new in %.3fs",
            self.name,
            result.listed,
            result.skipped_old,
            result.checked,
            len(result.raised),
            result.seconds,
        )
        return result


def polled_buckets(pipeline: Pipeline) -> list[str]:
    """The buckets a poller covers: every one without a directory watcher."""
    return [n for n, b in pipeline.buckets.items() if not isinstance(b, LocalBucket)]


class Discovery:
    """Every way to find objects in buckets without a watcher: pollers and notifications.

    ``poll_once()`` runs each once (``run --drain``); ``start()`` runs them
    in daemon threads until ``stop`` is set (``run``): one thread polls every
    bucket each ``interval``; notifications, if the profile names a queue,
    are long-polled in another, so a slow listing never delays them.
    """

    def __init__(
        self,
        pipeline: Pipeline,
        pollers: Iterable[BucketPoller],
        *,
        interval: float = DEFAULT_INTERVAL,
        notifications: NotificationSource | None = None,
    ) -> None:
        if interval <= 0:
            raise ValueError("the poll interval must be positive")
        self.pipeline = pipeline
        self.pollers = list(pollers)
        self.interval = interval
        self.notifications = notifications
        self.threads: list[threading.Thread] = []

    @classmethod
    def for_pipeline(cls, pipeline: Pipeline) -> Discovery:
        """Pollers for every non-local bucket, as the pipeline file's ``discovery`` says."""
        cfg = pipeline.config.discovery
        pollers = [
            BucketPoller(
                pipeline,
                name,
                mode="start_after" if name in cfg.start_after else "scan",
                lookback=cfg.lookback,
            )
            for name in polled_buckets(pipeline)
        ]
        source = None
        if pipeline.config.backends.notifications:
            from .config import expand_env
            from .notifications import NotificationSource

            url = expand_env(pipeline.config.backends.notifications)
            source = NotificationSource.from_url(pipeline, url)
        return cls(pipeline, pollers, interval=cfg.poll_interval, notifications=source)

    @property
    def active(self) -> bool:
        return bool(self.pollers) or self.notifications is not None

    def poll_once(self) -> list[Event]:
        """Read pending notifications, then poll every bucket once; errors propagate."""
        raised: list[Event] = []
        if self.notifications is not None:
            raised += self.notifications.drain().raised
        for poller in self.pollers:
            raised += poller.poll().raised
        return raised

    def _poll_loop(self, stop: threading.Event) -> None:
        while not stop.is_set():
            started = time.monotonic()
            for poller in self.pollers:
                if stop.is_set():
                    return
                try:
                    poller.poll()
                except Exception:
                    # The watermark did not move: the next round covers the same ground.
                    log.exception(
                        "polling bucket %s failed; retrying in %.0fs", poller.name, self.interval
                    )
            stop.wait(max(0.0, self.interval - (time.monotonic() - started)))

    def start(self, stop: threading.Event) -> None:
        if self.pollers:
            t = threading.Thread(target=self._poll_loop, args=(stop,), name="poller", daemon=True)
            t.start()
            self.threads.append(t)
        if self.notifications is not None:
            t = threading.Thread(
                target=self.notifications.run, args=(stop,), name="notifications", daemon=True
            )
            t.start()
            self.threads.append(t)


def start_discovery(pipeline: Pipeline, stop: threading.Event, *, once: bool) -> Discovery:
    """The runtime's entry point: poll once now (``once``, for a drain) or keep polling."""
    discovery = Discovery.for_pipeline(pipeline)
    if discovery.active:
        if once:
            discovery.poll_once()
        else:
            discovery.start(stop)
    return discovery
