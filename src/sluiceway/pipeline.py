"""A loaded pipeline with its backends: the Python API the CLI is a thin layer over.

Everything is opened lazily and per process, because worker processes build
their own ``Pipeline`` from the same file: SQLite connections and file
handles must not cross a fork.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

from . import backends, health
from . import config as config_mod
from .backends import scheme_of
from .buckets.base import Bucket, ObjectInfo
from .buckets.local import LocalBucket
from .config import PipelineConfig, expand_env
from .errors import ConfigError
from .events import Event, object_created
from .ledger import Ledger, SqliteLedger
from .queues.base import Broker, OutgoingMessage, QueueCounts, QueueSpec
from .queues.sqlite import SqliteBroker
from .router import Router
from .state import StateDB
from .streams.base import Stream
from .tables.base import Table
from .tables.sqlite import SqliteTable

STATE_FILE = "state.db"
#: Object versions recorded and queued per transaction by ``objects_created``:
#: enough that the commit is a small part of each file's cost, few enough that
#: the write lock is never held long enough to stall the workers.
RAISE_BATCH = 256
#: The first batch of a call: small, so the first events go out at once.
FIRST_BATCH = 16


@dataclass(frozen=True)
class PreparedEvent:
    """An "Object Created" event with its messages, ready to be raised."""

    bucket: str
    info: ObjectInfo
    event: Event
    plan: list[tuple[str, OutgoingMessage]]


@dataclass(frozen=True)
class QueueStatus:
    name: str
    counts: QueueCounts
    dead_lettered: int
    is_dlq: bool


class Pipeline:
    def __init__(self, config: PipelineConfig, path: Path | None = None) -> None:
        self.config = config
        self.path = path

    @classmethod
    def from_file(
        cls, path: str | os.PathLike[str] = "sluiceway.yaml", profile: str | None = None
    ) -> Pipeline:
        """Load a pipeline; ``profile`` (or ``$SLUICEWAY_PROFILE``) picks its backends."""
        path = Path(path).resolve()
        return cls(config_mod.load(path, profile), path)

    @property
    def embedded(self) -> bool:
        """Queues and ledger both live in the local state database.

        Then raising an event and recording it, or publishing and recording
        what was sent, share one transaction. With real backends they cannot,
        so the order is chosen to duplicate (harmless: the ledger dedups)
        rather than to lose.
        """
        b = self.config.backends
        return b.broker is None and b.ledger is None

    @property
    def name(self) -> str:
        return self.config.pipeline

    # -- backends ------------------------------------------------------------

    @cached_property
    def db(self) -> StateDB:
        return StateDB(self.config.state_path / STATE_FILE, busy_timeout=self.config.state_timeout)

    @cached_property
    def buckets(self) -> dict[str, Bucket]:
        out: dict[str, Bucket] = {}
        for name in self.config.buckets:
            url = expand_env(self.config.bucket_url(name))
            if scheme_of(url) in ("", "file"):
                out[name] = LocalBucket(
                    name,
                    self.config.resolve_path(url),
                    etag_cache=self.db,
                    fsync=self.config.durability == "full",
                )
            else:
                out[name] = backends.factory(f"bucket {name}", backends.BUCKETS, url)(name, url)
        return out

    def queue_specs(self) -> dict[str, QueueSpec]:
        specs: dict[str, QueueSpec] = {}
        for name in self.config.all_queue_names():
            q = self.config.queue_config(name)
            is_dlq = name not in self.config.queues
            specs[name] = QueueSpec(
                name=name,
                visibility_timeout=q.visibility_timeout,
                max_receive_count=q.max_receive_count,
                delay=q.delay,
                dead_letter_queue=None if is_dlq else self.config.dead_letter_queue(name),
                backoff_base=q.backoff_base,
                backoff_max=q.backoff_max,
            )
        return specs

    @cached_property
    def broker(self) -> Broker:
        subs = {t: list(cfg.subscriptions) for t, cfg in self.config.topics.items()}
        url = self.config.backends.broker
        if url is None:
            return SqliteBroker(self.db, self.queue_specs(), subs)
        url = expand_env(url)
        make = backends.factory("broker", backends.BROKERS, url)
        return make(url, self.queue_specs(), subs, pipeline=self.name)

    @cached_property
    def ledger(self) -> Ledger:
        url = self.config.backends.ledger
        if url is None:
            return SqliteLedger(self.db)
        url = expand_env(url)
        return backends.factory("ledger", backends.LEDGERS, url)(url, self.name)

    @cached_property
    def router(self) -> Router:
        return Router.from_config(self.config.rules, self.broker, set(self.config.topics))

    @cached_property
    def tables(self) -> dict[str, Table]:
        url = self.config.backends.tables
        if url is None:
            return {n: SqliteTable(self.db, n, t.key) for n, t in self.config.tables.items()}
        url = expand_env(url)
        make = backends.factory("tables", backends.TABLES, url)
        return {n: make(url, n, list(t.key), self.name) for n, t in self.config.tables.items()}

    @cached_property
    def streams(self) -> dict[str, Stream]:
        """The pipeline's streams (SQLite tables in the state database)."""
        from .streams.sqlite import SqliteStream

        return {name: SqliteStream(self.db, name) for name in self.config.streams}

    def stream(self, name: str) -> Stream:
        try:
            return self.streams[name]
        except KeyError:
            known = ", ".join(sorted(self.streams)) or "none"
            raise ConfigError([f"unknown stream {name!r} (streams: {known})"]) from None

    def append_events(self, stream: str, events: Sequence[Any]) -> list[int]:
        """Check events (raises EventError naming each bad one) and append them all, or none."""
        from .streams.events import events_batch

        target = self.stream(stream)
        return list(target.append_events(events_batch(events)))

    def stream_status(self) -> dict[str, Any]:
        """Per stream: length and head; per consuming function: checkpoint, lag, counts.

        With a ``dynamodb://`` ledger, also each function's shards on Lambda
        (``lambda_shards``: committed seq and unfinished flush per shard).
        """
        from .aws.streams import lambda_stream_state
        from .streams.consumer import lease_name
        from .streams.lease import Lease

        out: dict[str, Any] = {}
        conn = self.db.conn
        on_lambda = lambda_stream_state(self)
        for name, stream in self.streams.items():
            last = stream.last_seq()
            consumers: dict[str, Any] = {}
            for fname, fn in self.config.functions.items():
                if fn.stream != name:
                    continue
                checkpoint = stream.checkpoint(fname)
                intent = conn.execute(
                    "SELECT from_seq, to_seq FROM stream_flushes WHERE consumer = ?", (fname,)
                ).fetchone()
                counts = {
                    r["event_name"]: {
                        k: r[k] for k in ("records", "duplicates", "written", "rejected")
                    }
                    for r in conn.execute(
                        "SELECT * FROM stream_stats WHERE consumer = ? ORDER BY event_name",
                        (fname,),
                    )
                }
                holder = Lease.holder(self.db, lease_name(name, fname))
                consumers[fname] = {
                    "checkpoint": checkpoint,
                    "lag": max(0, last - checkpoint),
                    "unfinished_flush": None if intent is None else [intent[0], intent[1]],
                    "lease_owner": None if holder is None else holder["owner"],
                    "totals": counts.pop("*", {}),
                    "by_event_name": counts,
                }
                if on_lambda is not None:
                    consumers[fname]["lambda_shards"] = {
                        shard: {
                            "committed": st.committed,
                            "unfinished_flush": None
                            if st.pending is None
                            else [st.pending["from_seq"], st.pending["to_seq"]],
                        }
                        for shard, st in on_lambda.shards(fname).items()
                    }
            out[name] = {"last_seq": last, "length": stream.length(), "consumers": consumers}
        if on_lambda is not None:
            on_lambda.close()
        return out

    def publish_once(
        self,
        messages: Sequence[OutgoingMessage],
        *,
        queue: str | None = None,
        topic: str | None = None,
    ) -> int:
        """Send messages whose ids were never sent to this destination; returns how many.

        The "sent" record and the messages share one transaction, so a crash
        leaves both or neither and a re-run of the same input sends nothing
        twice, even after the first copies were consumed.
        """
        if (queue is None) == (topic is None):
            raise ValueError("give exactly one of queue or topic")
        dest = f"queue:{queue}" if queue is not None else f"topic:{topic}"
        by_id = {f"{dest}|{m.id}": m for m in messages}

        def send(batch: list[OutgoingMessage]) -> None:
            if not batch:
                return
            if topic is not None:
                self.broker.publish(topic, batch)
            else:
                self.broker.queue(queue).send_batch(batch)  # type: ignore[arg-type]

        if self.embedded:
            with self.db.transaction():
                fresh = self.ledger.unsent(list(by_id))
                send([by_id[i] for i in fresh])
                self.ledger.mark_sent(fresh)
            return len(fresh)
        # Send, then remember: a crash in between sends again (the broker's
        # own dedup or the consumer's ledger absorbs it) and loses nothing.
        fresh = self.ledger.unsent(list(by_id))
        send([by_id[i] for i in fresh])
        self.ledger.mark_sent(fresh)
        return len(fresh)

    def forget_sent(self, older_than: float) -> int:
        """Drop "sent" records older than ``older_than`` seconds (a retention window)."""
        return self.ledger.forget_sent(older_than)

    def bucket(self, name: str) -> Bucket:
        try:
            return self.buckets[name]
        except KeyError:
            known = ", ".join(sorted(self.buckets)) or "none"
            raise ConfigError([f"unknown bucket {name!r} (buckets: {known})"]) from None

    # -- events in -----------------------------------------------------------

    def object_created(self, bucket: str, info: ObjectInfo) -> Event | None:
        """Raise the event for one object version, exactly once (a batch of one)."""
        raised = self.objects_created([(bucket, info)])
        return raised[0] if raised else None

    def objects_created(self, offers: Iterable[tuple[str, ObjectInfo]]) -> list[Event]:
        """Raise the events for object versions, exactly once each; returns those raised.

        The watcher, ``put``, the reconcile and the pollers all come here, so
        each can offer the same file safely. Offers are taken in batches of
        up to ``RAISE_BATCH`` (``offers`` may be a lazy listing that hashes as
        it goes): each batch is prepared before the write lock is taken, then recorded
        and queued in one transaction on the embedded default -- one write
        lock and one commit per few hundred files instead of per file, and a
        crash leaves all of a batch or none. The first batch is small and
        each next one twice the size, so the first files of a burst reach the
        workers before the rest are hashed.
        """
        raised: list[Event] = []
        batch: list[PreparedEvent] = []
        size = FIRST_BATCH
        for bucket, info in offers:
            prepared = self.prepare_event(bucket, info)
            if prepared is not None:
                batch.append(prepared)
            if len(batch) >= size:
                raised += self.raise_events(batch)
                batch, size = [], min(size * 2, RAISE_BATCH)
        if batch:
            raised += self.raise_events(batch)
        return raised

    def prepare_event(self, bucket: str, info: ObjectInfo) -> PreparedEvent | None:
        """The event and messages for an object version; None if it raised one before.

        No write happens here: the matching and encoding are done before the
        write lock is taken (``raise_events`` holds it only for the inserts).
        """
        # Most offers are repeats (the watcher seeing what put or a worker just
        # raised): a read answers those without taking a write lock.
        if self.ledger.has_seen(bucket, info.key, info.etag):
            return None
        event = object_created(
            bucket,
            info.key,
            size=info.size,
            etag=info.etag,
            sequencer=f"{int(info.mtime * 1e9):020X}",
        )
        # Matching costs more than the rest of the offer; the outputs a worker
        # announces are mostly in buckets no rule routes from.
        plan = self.router.plan(event) if self.router.may_route(bucket) else []
        return PreparedEvent(bucket, info, event, plan)

    def raise_events(self, offers: Sequence[PreparedEvent]) -> list[Event]:
        """Record the versions and queue their messages, but those someone raised meanwhile.

        ``ledger.first_seen`` decides per object version, inside the same
        transaction as the messages on the embedded default.
        """
        ledger = self.ledger
        if self.embedded:
            with self.db.transaction():
                fresh = [
                    o
                    for o in offers
                    if ledger.first_seen(o.bucket, o.info.key, o.info.etag, o.info.size, o.event.id)
                ]
                self.router.send([m for o in fresh for m in o.plan])
            return [o.event for o in fresh]
        # Route first, record after, per event: a crash in between raises the
        # event again on the next offer (a duplicate the processing ledger
        # absorbs), never loses it.
        for o in offers:
            self.router.send(o.plan)
            ledger.first_seen(o.bucket, o.info.key, o.info.etag, o.info.size, o.event.id)
        return [o.event for o in offers]

    def put(self, source: str | os.PathLike[str], bucket: str, key: str) -> Event | None:
        """Copy a local file into a bucket and raise its "Object Created" event."""
        b = self.bucket(bucket)
        with open(source, "rb") as src, b.open_write(key) as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
        return self.object_created(bucket, b.head(key))

    def reconcile(self) -> list[Event]:
        """Raise events for objects that arrived while nothing was running."""
        raised: list[Event] = []
        for name, bucket in self.buckets.items():
            raised += self.objects_created((name, info) for info in bucket.list())
        if "db" in self.__dict__:
            self.db.flush()  # the ETags just computed, so the next start need not
        return raised

    # -- looking at it -------------------------------------------------------

    def queue_status(self) -> list[QueueStatus]:
        out = []
        for name in self.config.all_queue_names():
            is_dlq = name not in self.config.queues
            counts = self.broker.queue(name).counts()
            dead = 0
            if not is_dlq:
                dlq = self.broker.queue(self.config.dead_letter_queue(name)).counts()
                dead = dlq.visible + dlq.in_flight + dlq.delayed
            out.append(QueueStatus(name, counts, dead, is_dlq))
        return out

    def function_status(self) -> dict[str, dict[str, int]]:
        counts = self.ledger.function_counts()
        return {name: counts.get(name, {}) for name in self.config.functions}

    def pending(self) -> int:
        """Messages not yet finished in the queues that feed functions."""
        total = 0
        for name, fn in self.config.functions.items():
            if fn.stream is not None:  # records not yet committed by the function
                stream = self.stream(fn.stream)
                total += max(0, stream.last_seq() - stream.checkpoint(name))
                continue
            assert fn.queue is not None
            c = self.broker.queue(fn.queue).counts()
            total += c.visible + c.in_flight + c.delayed
        return total

    def status(self) -> dict[str, Any]:
        from .metrics import function_metrics

        return {
            "pipeline": self.name,
            "queues": {
                q.name: {
                    "visible": q.counts.visible,
                    "in_flight": q.counts.in_flight,
                    "delayed": q.counts.delayed,
                    "dead_lettered": q.dead_lettered,
                    "is_dlq": q.is_dlq,
                }
                for q in self.queue_status()
            },
            "functions": {name: m.to_dict() for name, m in function_metrics(self).items()},
            "connections": health.read(self.db),
            **({"streams": self.stream_status()} if self.config.streams else {}),
        }

    def close(self) -> None:
        if "db" in self.__dict__:
            self.db.close()
