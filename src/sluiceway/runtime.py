"""``sluiceway run``: watcher, reconcile and a supervised pool of worker processes.

Workers are processes, not threads, so CPU-bound steps use every core and a
crash in user code takes down one worker, which is restarted, not the
runtime. Stopping is two-phase: first ask (workers finish the message in
hand), then, after the grace period, SIGTERM (a worker hands its message
back to the queue before it exits).
"""

from __future__ import annotations

import ctypes
import logging
import multiprocessing as mp
import os
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from multiprocessing.context import BaseContext
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import Any

from . import health
from .activity import Activity, Doing
from .buckets.local import LocalBucket
from .pipeline import Pipeline
from .poller import start_discovery
from .queues.base import Message
from .watcher import BucketWatcher
from .worker import Shutdown, Worker

log = logging.getLogger("sluiceway.runtime")

# How long past its deadline a worker may go (the in-process alarm should have
# fired) before the supervisor kills it: a hang inside C code.
OVERRUN_GRACE = 5.0


class SharedFlag:
    """A flag the runtime sets once and its worker processes read, without a lock.

    ``multiprocessing.Event`` takes a semaphore even to read itself. A worker
    killed while it held it (by the OOM killer, by the supervisor for an
    overrun, by ``kill -9``) left the semaphore taken for good, and the
    supervisor and every other worker hung at their next ``is_set()``. A byte
    of shared memory needs no lock: it only ever goes from unset to set.
    """

    def __init__(self, ctx: BaseContext) -> None:
        self._value = ctx.RawValue(ctypes.c_bool, False)

    def set(self) -> None:
        self._value.value = True

    def is_set(self) -> bool:
        return bool(self._value.value)


def _raise_shutdown(signum: int, frame: object) -> None:
    raise Shutdown()


def worker_main(
    pipeline_path: str,
    stop: SharedFlag,
    functions: list[str] | None,
    worker_id: str,
    drain: SharedFlag | None = None,
) -> None:
    """Entry point of a worker process."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides when to stop
    signal.signal(signal.SIGTERM, _raise_shutdown)
    logging.basicConfig(
        level=os.environ.get("SLUICEWAY_LOG", "WARNING"),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    pipeline = Pipeline.from_file(pipeline_path)
    worker = Worker(pipeline, functions, worker_id=worker_id, enforce_timeouts=True, drain=drain)
    parent = mp.parent_process()  # a SIGKILLed runtime leaves no orphan workers behind
    try:
        while not stop.is_set() and (parent is None or parent.is_alive()):
            worker.poll(wait=0.2)
    except Shutdown:
        pass
    finally:
        worker.close()
        pipeline.close()


@dataclass
class RunSummary:
    seconds: float
    done: int = 0
    failed: int = 0
    skipped: int = 0
    dead_lettered: int = 0
    rows_in: int = 0
    rows_out: int = 0
    rows_rejected: int = 0
    outputs: list[dict[str, Any]] = field(default_factory=list)
    inputs: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return self.__dict__.copy()


class Runtime:
    def __init__(
        self,
        pipeline_path: str | os.PathLike[str],
        *,
        workers: int | None = None,
        watch: bool = True,
        grace: float = 30.0,
        settle: float = 0.25,
        functions: list[str] | None = None,
        reconcile: bool = True,
        profile: str | None = None,
    ) -> None:
        if profile is not None:
            # Worker processes inherit the environment, so they load the same profile.
            os.environ["SLUICEWAY_PROFILE"] = profile
        self.pipeline_path = str(Path(pipeline_path).resolve())
        self.pipeline = Pipeline.from_file(self.pipeline_path)
        self.workers = (os.cpu_count() or 1) if workers is None else workers
        self.watch = watch
        self.grace = grace
        self.settle = settle
        self.functions = functions
        self.reconcile = reconcile
        self._ctx = mp.get_context("spawn")
        self._stop_workers = SharedFlag(self._ctx)
        # Set by drain(): stream functions flush when idle.
        self._drain_workers = SharedFlag(self._ctx)
        self._stop = threading.Event()
        self._procs: list[BaseProcess] = []
        self._watcher: BucketWatcher | None = None
        self._local_worker: Worker | None = None
        self.activity = Activity(self.pipeline.db)
        self.restarts = 0
        # The watcher, reconcile and supervisor use the backends too.
        health.persist_to(self.pipeline.db, f"{os.uname().nodename}:{os.getpid()}:runtime")

    # -- lifecycle -----------------------------------------------------------

    def worker_id(self, index: int) -> str:
        return f"{os.uname().nodename}:{os.getpid()}:w{index}"

    def _spawn(self, index: int) -> BaseProcess:
        p = self._ctx.Process(
            target=worker_main,
            args=(
                self.pipeline_path,
                self._stop_workers,
                self.functions,
                self.worker_id(index),
                self._drain_workers,
            ),
            name=f"sluiceway-worker-{index}",
            daemon=False,
        )
        p.start()
        return p

    def start(self) -> None:
        if self.watch:
            self._watcher = BucketWatcher(self.pipeline, settle=self.settle)
            threading.Thread(
                target=self._watcher.run, args=(self._stop,), name="watcher", daemon=True
            ).start()
            if not self._watcher.ready.wait(10):
                raise RuntimeError("the bucket watcher did not start within 10s")
        self.sweep()
        if self.reconcile:
            self.pipeline.reconcile()
        if self.watch:  # buckets without a directory watcher (S3): poll, read notifications
            start_discovery(self.pipeline, self._stop, once=self._drain_workers.is_set())
        if self.workers == 0:
            self._local_worker = Worker(self.pipeline, self.functions, drain=self._drain_workers)
        self._procs = [self._spawn(i) for i in range(self.workers)]

    def supervise(self) -> None:
        """Restart workers that died; kill and blame workers that overran a timeout.

        A death (SIGKILL, out of memory, ``os._exit`` in user code) or an
        overrun is recorded on the message the worker was processing, which
        becomes visible again at once: after ``max_receive_count`` such
        receives it reaches the DLQ with that reason.
        """
        now = time.time()
        for i, p in enumerate(self._procs):
            doing = self.activity.doing(self.worker_id(i))
            if p.is_alive() and doing is not None and now > doing.deadline + OVERRUN_GRACE:
                log.error("worker %s overran %s's timeout; killing it", p.name, doing.function)
                p.kill()
                p.join(5)
                self._blame(doing, "FunctionTimeout", "exceeded its timeout and was killed")
                continue
            if p.is_alive() or self._stop_workers.is_set():
                continue
            code = p.exitcode
            how = f"signal {-code}" if code is not None and code < 0 else f"exit code {code}"
            log.warning("worker %s ended with %s; restarting", p.name, how)
            if doing is not None:
                self._blame(doing, "WorkerDied", f"worker process ended with {how}")
            self.sweep()
            self._procs[i] = self._spawn(i)
            self.restarts += 1

    def sweep(self) -> None:
        """Clear the aside-files of dead writers in every local bucket."""
        for bucket in self.pipeline.buckets.values():
            if isinstance(bucket, LocalBucket):
                bucket.sweep()

    def _blame(self, doing: Doing, error_type: str, what: str) -> None:
        queue = self.pipeline.broker.queue(doing.queue)
        failure = {
            "error_type": error_type,
            "message": f"function {doing.function!r} {what} while processing message "
            f"{doing.message_id}",
            "worker": doing.worker,
            "function": doing.function,
            "at": time.time(),
        }
        msg = Message(doing.message_id, doing.queue, "", {}, 0, doing.receipt, 0.0)
        queue.record_failure(msg, failure, retry_in=0)
        self.pipeline.ledger.fail(
            doing.ledger_key, owner=doing.worker, info={"last_failure": failure}
        )
        self.activity.finish(doing.worker)

    def stop(self) -> None:
        """Finish in-flight work within the grace period, then hand the rest back."""
        self._stop.set()
        self._stop_workers.set()
        if self._local_worker is not None:
            self._local_worker.close()
        deadline = time.monotonic() + self.grace
        for p in self._procs:
            p.join(max(0.0, deadline - time.monotonic()))
        for p in self._procs:
            if p.is_alive():
                p.terminate()  # SIGTERM: the worker releases its message
        for p in self._procs:
            p.join(10)
            if p.is_alive():
                p.kill()
                p.join(5)
        health.flush()

    def tick(self, wait: float) -> None:
        if self._local_worker is not None:
            self._local_worker.poll(wait=wait)
        else:
            self._stop.wait(wait)
        self.supervise()

    def idle(self) -> bool:
        watcher_busy = self._watcher is not None and self._watcher.busy
        return not watcher_busy and self.pipeline.pending() == 0

    # -- the two ways to run ---------------------------------------------------

    def run_forever(self, on_tick: Callable[[], None] | None = None) -> None:
        """Until SIGINT/SIGTERM: the long-running service."""
        self._install_signal_handlers()
        self.start()
        try:
            while not self._stop.is_set():
                self.tick(0.2)
                if on_tick is not None:
                    on_tick()
        finally:
            self.stop()

    def drain(
        self, *, timeout: float | None = None, on_tick: Callable[[], None] | None = None
    ) -> RunSummary:
        """Process everything pending (reconciling first) and return when idle."""
        started = time.time()
        self._install_signal_handlers()
        self._drain_workers.set()
        self.start()
        deadline = None if timeout is None else time.monotonic() + timeout
        try:
            idle_since: float | None = None
            while not self._stop.is_set():
                self.tick(0.05)
                if on_tick is not None:
                    on_tick()
                if self.idle():
                    # Idle twice in a row, a tick apart: a worker's output
                    # event may be on its way into another queue.
                    if idle_since is not None:
                        break
                    idle_since = time.monotonic()
                else:
                    idle_since = None
                if deadline is not None and time.monotonic() > deadline:
                    raise TimeoutError(
                        f"drain did not finish within {timeout}s: "
                        f"{self.pipeline.pending()} messages still pending"
                    )
        finally:
            self.stop()
        return self.summary(started)

    def summary(self, since: float) -> RunSummary:
        s = RunSummary(seconds=time.time() - since)
        for entry in self.pipeline.ledger.entries_since(since):
            if entry.status == "done":
                s.done += 1
                s.inputs.append(entry.info.get("input", entry.key))
                stats = entry.info.get("stats", {})
                s.rows_in += stats.get("rows_in", 0)
                s.rows_out += stats.get("rows_out", 0)
                s.rows_rejected += stats.get("rows_rejected", 0)
                s.outputs.extend(entry.info.get("outputs", []))
            elif entry.status == "failed":
                s.failed += 1
            elif entry.status == "skipped":
                s.skipped += 1
        for q in self.pipeline.queue_status():
            if not q.is_dlq:
                s.dead_lettered += q.dead_lettered
        return s

    def _install_signal_handlers(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return

        def handle(signum: int, frame: object) -> None:
            log.warning("signal %d: stopping (grace %.0fs)", signum, self.grace)
            self._stop.set()

        signal.signal(signal.SIGINT, handle)
        signal.signal(signal.SIGTERM, handle)
