"""Receive → claim → run → commit → ack, or retry, or dead-letter.

The order is the promise: a message is acked only after its outputs are
committed and the ledger says done. A crash anywhere before the ack means a
re-delivery; the ledger turns a re-delivery of finished work into a plain
ack, and deterministic output keys make a re-run of unfinished work rewrite
the same objects. A heartbeat keeps the message hidden (and the claim alive)
while a long file is still being worked on.
"""

from __future__ import annotations

import json
import logging
import os
import random
import signal
import socket
import threading
import time
import traceback
from collections.abc import Callable, Iterable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any

from . import faults, health
from .activity import Activity
from .buckets.base import ObjectNotFound
from .config import DestinationConfig
from .errors import InputError
from .events import Event
from .ledger import Claim
from .pipeline import Pipeline, PreparedEvent
from .queues.base import Message, OutgoingMessage, Queue
from .steps import STEPS, parse_step
from .steps.base import StepContext, StepFn
from .steps.chunks import Chunking, chunk_of, key_suffix
from .steps.python import resolve_handler

log = logging.getLogger("sluiceway.worker")
# The pause after a poll that read stream records but had nothing to flush yet.
BUSY_WAIT = 0.005


class Shutdown(BaseException):
    """Raised in the worker's main thread when it must stop now (SIGTERM, grace over)."""


class FunctionTimeout(Exception):
    """The function ran past its ``timeout``; the message is failed and retried."""


def _alarm(signum: int, frame: object) -> None:
    raise FunctionTimeout()


@contextmanager
def time_limit(seconds: float, enabled: bool, what: str) -> Iterator[None]:
    """Interrupt the main thread after ``seconds`` (worker processes only).

    SIGALRM interrupts Python code and sleeps; a hang inside C code that never
    returns is caught by the supervisor instead, which kills the process.
    """
    if not enabled:
        yield
        return
    previous = signal.signal(signal.SIGALRM, _alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    except FunctionTimeout:
        raise FunctionTimeout(f"{what} exceeded its timeout of {seconds:g}s") from None
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


@dataclass
class Outcome:
    status: str  # done | duplicate | busy | skipped | retry | dead
    message_id: str
    function: str
    detail: dict[str, Any]


class FunctionRunner:
    """One function of the pipeline, built once per worker process."""

    def __init__(self, pipeline: Pipeline, name: str) -> None:
        self.pipeline = pipeline
        self.name = name
        self.config = pipeline.config.functions[name]
        cfg = pipeline.config
        self.handler = (
            resolve_handler(self.config.handler, cfg.base_dir) if self.config.handler else None
        )
        self.steps: list[StepFn] = []
        for raw in self.config.steps:
            step_name, options = parse_step(raw)
            self.steps.append(STEPS[step_name].build(options, cfg))
        # read_csv's chunk_size: big objects split over workers (steps/chunks.py).
        self.chunking = Chunking.setup(name, self.config)

    def run(self, ctx: StepContext) -> None:
        if self.handler is not None:
            result = self.handler(ctx.event, ctx)
            if isinstance(result, Iterable) and not isinstance(result, str | bytes | dict):
                for _ in result:
                    pass
            return
        stream = None
        last = len(self.steps) - 1
        for i, step in enumerate(self.steps):
            if i == last and stream is not None:
                stream = _counted(ctx, "rows_out", stream)
            stream = step(ctx, stream)
        if stream is not None:
            for _ in stream:  # drive the chain; a sink consumes everything
                pass


def _counted(ctx: StepContext, name: str, batches: Iterator[Any]) -> Iterator[Any]:
    """Count rows on their way into the last step: the function's rows out."""
    ctx.stats.setdefault(name, 0)
    for batch in batches:
        ctx.count(name, batch.num_rows)
        yield batch


def backoff(attempt: int, base: float, cap: float) -> float:
    """Exponential backoff with full jitter (AWS's recommendation)."""
    return random.uniform(0, min(cap, base * (2 ** max(attempt - 1, 0))))


def failure_record(exc: BaseException, message: Message, worker_id: str) -> dict[str, Any]:
    record: dict[str, Any] = {
        "error_type": type(exc).__name__,
        "message": str(exc),
        "traceback": "".join(traceback.format_exception(exc))[-8000:],
        "attempt": message.receive_count,
        "worker": worker_id,
        "at": time.time(),
    }
    if isinstance(exc, InputError):
        record.update({"file": exc.file, "line": exc.line, "field": exc.field})
    return record


class _Heartbeat:
    """Keeps the message in hand hidden and its claim alive while work goes on.

    One thread per worker, started once and reused: a thread per message
    costs more than processing a small file does.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._job: tuple[Queue, Message, Callable[[], bool], float] | None = None
        self._due = 0.0
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        # When the thread looks again on its own (inf: not before it is woken).
        self._looks_at = float("inf")

    @contextmanager
    def watch(
        self, queue: Queue, message: Message, extend_claim: Callable[[], bool]
    ) -> Iterator[None]:
        interval = max(queue.spec.visibility_timeout / 3, 0.05)
        with self._lock:
            self._job = (queue, message, extend_claim, interval)
            self._due = time.monotonic() + interval
            # Waking the thread per message costs two context switches; it is
            # needed only if it would look later than this job's first beat.
            wake = self._looks_at > self._due
        if self._thread is None or not self._thread.is_alive():
            self._thread = threading.Thread(target=self._run, name="heartbeat", daemon=True)
            self._thread.start()
        if wake:
            self._wake.set()
        try:
            yield
        finally:
            with self._lock:
                self._job = None

    def _run(self) -> None:
        while True:
            with self._lock:
                job, due = self._job, self._due
                self._looks_at = float("inf") if job is None else due
                # Cleared under the lock: a watch() that saw this _looks_at
                # and chose to wake sets the event after this, never before.
                self._wake.clear()
            if job is None:
                self._wake.wait()
                continue
            delay = due - time.monotonic()
            if delay > 0:
                self._wake.wait(delay)
                continue
            queue, message, extend_claim, interval = job
            try:
                extend_claim()  # first: the message stays hidden while the claim lives
                queue.change_visibility(message, queue.spec.visibility_timeout)
            except Exception:  # a missed beat is retried next interval
                log.exception("heartbeat failed for message %s", message.id)
            with self._lock:
                if self._job is job:
                    self._due = time.monotonic() + interval


class Worker:
    """Processes messages for some or all functions of a pipeline, in this process."""

    def __init__(
        self,
        pipeline: Pipeline,
        functions: Iterable[str] | None = None,
        *,
        worker_id: str | None = None,
        enforce_timeouts: bool = False,
        drain: Any = None,
        announce_outputs: bool = True,
    ) -> None:
        from .streams.consumer import StreamConsumer

        self.pipeline = pipeline
        self.enforce_timeouts = enforce_timeouts
        # Raise each output object's "Object Created" event after the commit.
        # False where the store raises those events itself (S3 → EventBridge
        # on AWS Lambda): routing them here too would deliver them twice.
        self.announce_outputs = announce_outputs
        self._heartbeat = _Heartbeat()
        self.activity = Activity(pipeline.db)
        names = list(functions) if functions is not None else list(pipeline.config.functions)
        self.worker_id = worker_id or f"{socket.gethostname()}:{os.getpid()}"
        health.persist_to(pipeline.db, self.worker_id)  # lost connections, for `status`
        # Stream functions consume a stream (streams/consumer.py), not a queue.
        is_stream = {n: pipeline.config.functions[n].stream is not None for n in names}
        self.runners = {n: FunctionRunner(pipeline, n) for n in names if not is_stream[n]}
        self.consumers = {
            n: StreamConsumer(pipeline, n, worker_id=self.worker_id) for n in names if is_stream[n]
        }
        # Set (an Event) while draining: stream functions flush once caught up.
        self.drain = drain
        self.stopping = threading.Event()

    def poll(self, wait: float = 0.0) -> list[Outcome]:
        """Take and process at most one message per function; returns what happened."""
        outcomes: list[Outcome] = []
        names = list(self.runners)
        random.shuffle(names)  # no function starves another
        for name in names:
            queue = self.pipeline.broker.queue(self.runners[name].config.queue)
            for msg in queue.receive(1, wait=0.0):
                outcomes.append(self.process(name, queue, msg))
        flush_idle = self.drain is not None and self.drain.is_set()
        for name, consumer in self.consumers.items():
            for r in consumer.poll(flush_idle=flush_idle):
                outcomes.append(Outcome(r.status, r.id, name, r.info))
        if any(c.read_any for c in self.consumers.values()):
            # Records are arriving: a stream read nothing to flush yet, but the
            # rest of its flush is on the way. Waiting the whole idle pause
            # would leave the worker idle with work coming in.
            wait = min(wait, BUSY_WAIT)
        if not outcomes and wait > 0 and not names:
            self.stopping.wait(wait)  # only stream functions: nothing to block on
        elif not outcomes and wait > 0:
            # Block on one queue for the rest of the wait, so idle workers
            # do not spin; messages on other queues wait at most `wait`.
            name = names[0]
            queue = self.pipeline.broker.queue(self.runners[name].config.queue)
            for msg in queue.receive(1, wait=wait):
                outcomes.append(self.process(name, queue, msg))
        return outcomes

    def run(self, *, idle_wait: float = 0.2, stop: threading.Event | None = None) -> None:
        stop = stop or self.stopping
        while not stop.is_set():
            self.poll(wait=idle_wait)

    def close(self) -> None:
        """Release stream leases so a successor takes over without waiting for expiry."""
        for consumer in self.consumers.values():
            consumer.close()
        health.flush()

    def process(self, function: str, queue: Queue, msg: Message) -> Outcome:
        runner = self.runners[function]
        ledger = self.pipeline.ledger
        try:
            event = Event.from_json(msg.body)
        except ValueError as e:
            failure = failure_record(e, msg, self.worker_id)
            failure["message"] = f"message {msg.id} is not an event envelope: {e}"
            queue.dead_letter(msg, failure)
            return Outcome("dead", msg.id, function, failure)

        key = f"{function}|{event.input_identity}{key_suffix(event)}"
        ttl = queue.spec.visibility_timeout
        timeout = runner.config.timeout
        with self._together():
            claim = ledger.claim(key, function=function, owner=self.worker_id, ttl=ttl)
            if claim is Claim.ACQUIRED:
                queue.change_visibility(msg, ttl)  # hidden at least as long as the claim
                self.activity.start(
                    self.worker_id,
                    function=function,
                    queue=queue.name,
                    message_id=msg.id,
                    receipt=msg.receipt,
                    ledger_key=key,
                    timeout=timeout,
                )
        if claim is Claim.DONE:
            if chunk_of(event) is not None and runner.chunking is not None:
                # A finisher may have crashed before committing the whole.
                retry = self._commit_chunks(runner.chunking, function, queue, msg, key, event)
                if retry is not None:
                    return retry
            queue.ack([msg])
            return Outcome("duplicate", msg.id, function, {"key": key})
        if claim is Claim.BUSY:
            # Someone else holds a live claim; look again after it would expire.
            queue.change_visibility(msg, min(ttl, 5.0))
            return Outcome("busy", msg.id, function, {"key": key})

        ctx = StepContext(
            event=event,
            function=function,
            buckets=self.pipeline.buckets,
            attempt=msg.receive_count,
            tables=self.pipeline.tables,
            publish=self.pipeline.publish_once,
        )
        started = time.time()
        try:
            self._check_version(event)
            with (
                self._heartbeat.watch(
                    queue, msg, lambda: ledger.extend(key, owner=self.worker_id, ttl=ttl)
                ),
                time_limit(timeout, self.enforce_timeouts, f"function {function!r}"),
            ):
                plan = runner.chunking and runner.chunking.fan_out(self.pipeline, ctx)
                if plan is None:
                    runner.run(ctx)
        except ObjectNotFound as e:
            self.activity.finish(self.worker_id)
            info = {"reason": str(e), "skipped_at": time.time()}
            ledger.skip(key, owner=self.worker_id, info=info)
            queue.ack([msg])
            return Outcome("skipped", msg.id, function, info)
        except Shutdown:
            # Not the message's fault: hand it back untouched and now.
            ledger.fail(key, owner=self.worker_id, info={"released": "shutdown"})
            queue.change_visibility(msg, 0)
            self.activity.finish(self.worker_id)
            raise
        except Exception as e:
            self.activity.finish(self.worker_id)
            return self._failed(function, queue, msg, key, e)

        finished = time.time()
        info = {
            "event_id": event.id,
            "input": ctx.input_name,
            "outputs": ctx.outputs,
            "stats": ctx.stats,
            "attempt": msg.receive_count,
            "worker": self.worker_id,
            "started_at": started,
            "finished_at": finished,
            "seconds": round(finished - started, 6),
            "event_time": event.timestamp,
            "latency": round(finished - event.timestamp, 6),
            "bytes_in": (event.detail.get("object") or {}).get("size", 0),
            "detail_type": event.detail_type,
        }
        chunk = chunk_of(event)
        if plan is not None:
            info["chunk_plan"] = plan  # done here means: split; the commit entry has the output
        if chunk is not None:
            info["chunk"] = {k: chunk[k] for k in ("index", "count", "start", "end")}
            info["bytes_in"] = 0  # counted once, on the input's own entry
        faults.point("after_commit")
        self._notify(runner.config.on_success, f"{key}#summary", {"status": "done", **info})
        if plan is None and chunk is None:  # a chunked input's entries share its identity
            self._remove_replaced_outputs(function, event, key, ctx.outputs)
        if chunk is None and self.pipeline.embedded:
            # Done, output events and ack are rows of one database: one commit,
            # so there is no window in which the input is done but not acked.
            events = self._output_events(ctx.outputs)
            with self.pipeline.db.transaction():
                ledger.complete(key, owner=self.worker_id, info=info)
                self._finish(events, queue, msg)
            faults.point("after_done")
            return Outcome("done", msg.id, function, info)
        ledger.complete(key, owner=self.worker_id, info=info)
        faults.point("after_done")
        if chunk is not None and runner.chunking is not None:
            retry = self._commit_chunks(runner.chunking, function, queue, msg, key, event)
            if retry is not None:
                self.activity.finish(self.worker_id)
                return retry
        events = self._output_events(ctx.outputs if chunk is None else [])
        with self._together():
            self._finish(events, queue, msg)
        return Outcome("done", msg.id, function, info)

    def _output_events(self, outputs: list[dict[str, Any]]) -> list[PreparedEvent]:
        """The outputs' "Object Created" events, prepared before the write lock is taken."""
        events = []
        for out in outputs if self.announce_outputs else ():
            if "bucket" in out and "key" in out:
                bucket = self.pipeline.bucket(out["bucket"])
                prepared = self.pipeline.prepare_event(out["bucket"], bucket.head(out["key"]))
                if prepared is not None:
                    events.append(prepared)
        return events

    def _finish(self, events: list[PreparedEvent], queue: Queue, msg: Message) -> None:
        """Raise the outputs' events, ack, and clear the activity record."""
        self.pipeline.raise_events(events)
        queue.ack([msg])
        self.activity.finish(self.worker_id)

    def _together(self) -> AbstractContextManager[Any]:
        """One state transaction around steps that follow each other anyway.

        On the embedded default the claim, the message's hiding and the
        activity record are rows in one database: one write lock and one
        commit instead of one per step, and a crash keeps all or none.
        Elsewhere each step goes to its own backend.
        """
        return self.pipeline.db.transaction() if self.pipeline.embedded else nullcontext()

    def _commit_chunks(
        self, chunking: Chunking, function: str, queue: Queue, msg: Message, key: str, event: Event
    ) -> Outcome | None:
        """Commit a chunked input if every chunk is done; an Outcome unless the ack may go."""
        ledger = self.pipeline.ledger
        ttl = queue.spec.visibility_timeout
        commit_key = f"{function}|{event.input_identity}#commit"
        try:
            with self._heartbeat.watch(
                queue, msg, lambda: ledger.extend(commit_key, owner=self.worker_id, ttl=ttl)
            ):
                status, outputs = chunking.commit(
                    self.pipeline, event, owner=self.worker_id, ttl=ttl
                )
        except Exception as e:
            return self._failed(function, queue, msg, key, e)
        if status == "busy":  # another worker commits; come back to see it done
            queue.change_visibility(msg, min(ttl, 5.0))
            return Outcome("busy", msg.id, function, {"key": commit_key})
        if self.announce_outputs:
            self.pipeline.objects_created(
                (out["bucket"], self.pipeline.bucket(out["bucket"]).head(out["key"]))
                for out in outputs
            )
        return None

    def _notify(
        self, dest: DestinationConfig | None, message_id: str, body: dict[str, Any]
    ) -> None:
        """A function's summary or error message, sent once per input version."""
        if dest is None:
            return
        msg = OutgoingMessage(
            json.dumps(body, default=str), {"function": body.get("function")}, message_id
        )
        self.pipeline.publish_once([msg], queue=dest.queue, topic=dest.topic)

    def _remove_replaced_outputs(
        self, function: str, event: Event, key: str, outputs: list[dict[str, Any]]
    ) -> None:
        """Delete what earlier versions of this input wrote and this one did not.

        A new version of a partitioned file may touch other partitions than
        the old one did; its old rows must not linger there. Done before the
        ledger marks this version done, so a crash in between repeats it.
        """
        if event.bucket is None or event.key is None:
            return
        kept = {(o.get("bucket"), o.get("key")) for o in outputs}
        prefix = f"{event.bucket}/{event.key}@"
        for old in self.pipeline.ledger.other_versions(function, prefix, key):
            for out in old.info.get("outputs", []):
                where = (out.get("bucket"), out.get("key"))
                if where not in kept and out.get("bucket") in self.pipeline.buckets:
                    self.pipeline.bucket(out["bucket"]).delete(out["key"])
            self.pipeline.ledger.supersede(old.key)

    def _check_version(self, event: Event) -> None:
        """Refuse to process a newer object under an older version's identity.

        A local bucket keeps only the latest version; if the object changed
        since this event, the new version has an event of its own.
        """
        if event.bucket is None or event.key is None or not event.etag:
            return
        bucket = self.pipeline.buckets.get(event.bucket)
        if bucket is None:
            return
        current = bucket.head(event.key)  # ObjectNotFound: deleted, skipped
        if current.etag != event.etag:
            raise ObjectNotFound(
                f"{event.bucket}/{event.key}: version {event.etag} was replaced by "
                f"{current.etag}, which is processed under its own event"
            )

    def _failed(
        self, function: str, queue: Queue, msg: Message, key: str, exc: Exception
    ) -> Outcome:
        failure = failure_record(exc, msg, self.worker_id)
        failure["function"] = function
        self.pipeline.ledger.fail(key, owner=self.worker_id, info={"last_failure": failure})
        log.warning(
            "%s failed on message %s (attempt %d): %s", function, msg.id, msg.receive_count, exc
        )
        if msg.receive_count >= queue.spec.max_receive_count:
            self._notify(
                self.runners[function].config.on_error,
                f"{key}#failed",
                {"status": "dead-lettered", "input": key.split("|", 1)[1], **failure},
            )
            queue.dead_letter(msg, failure)
            return Outcome("dead", msg.id, function, failure)
        delay = backoff(msg.receive_count, queue.spec.backoff_base, queue.spec.backoff_max)
        queue.record_failure(msg, failure, delay)
        return Outcome("retry", msg.id, function, {**failure, "retry_in": delay})
