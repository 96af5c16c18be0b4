"""SIGKILL workers, and whole runtimes, at random moments; then check the promises.

The promises (README, "What Sluiceway promises"): no input lost, no output
row duplicated, nothing half-written visible, the state database intact and
nothing left in any queue or dead-letter queue. Kills come three ways:

* from outside: a thread in this process SIGKILLs a live worker of an
  in-process ``Runtime`` at random intervals (the supervisor restarts it);
* from inside: failpoints (``SLUICEWAY_FAULTS``, ``sluiceway/faults.py``) make
  a worker SIGKILL itself at the moments a crash is most dangerous;
* the whole ``sluiceway run`` process group, then a restart.

Every kill counted is confirmed (the process ended by SIGKILL). The default
run makes well over 50; ``SLUICEWAY_FAULTS_LONG=1`` makes over 500. Each run
adds a row to docs/reliability.md. ``SLUICEWAY_FAULTS_SEED`` replays a seed.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Callable
from multiprocessing.process import BaseProcess
from pathlib import Path

import pytest

from sluiceway import Pipeline, Runtime
from sluiceway.faults import read_log

from .conftest import Reaper
from .harness import (
    FUNCTION,
    LONG,
    PIPELINE,
    Input,
    Report,
    RunRecord,
    alive,
    audit,
    drop_file,
    group_members,
    kill_group,
    make_input,
    sluiceway_cmd,
    stage_file,
    write_pipeline,
)

SEED = int(os.environ.get("SLUICEWAY_FAULTS_SEED", "0")) or random.randrange(1, 1 << 30)

# Per hit: during_read and during_write are hit once per record batch.
WORKER_FAULTS = (
    "during_read:0.03,during_write:0.03,before_publish:0.06,after_commit:0.08,after_done:0.08"
)
RUNTIME_FAULTS = (
    "during_read:0.015,during_write:0.015,before_publish:0.03,after_commit:0.04,after_done:0.04"
)
SIGKILLED = -signal.SIGKILL


def _faults(spec: str, log: Path, seed: int) -> str:
    return f"{spec},seed={seed},log={log}"


def _worker_index(owner: str | None) -> int | None:
    """Worker ids end in ``:w<index>`` (the runtime's slot for the process)."""
    if not owner or ":w" not in owner:
        return None
    tail = owner.rsplit(":w", 1)[1]
    return int(tail) if tail.isdigit() else None


class Killer(threading.Thread):
    """SIGKILLs a live worker of ``rt`` at random intervals while ``wanted()``.

    Mostly a worker that holds a claim (it is in the middle of a file); now
    and then any live one, which may be idle or still starting.
    """

    def __init__(
        self,
        rt: Runtime,
        rng: random.Random,
        wanted: Callable[[], bool],
        interval: tuple[float, float],
    ) -> None:
        super().__init__(name="killer", daemon=True)
        self.rt = rt
        self.rng = rng
        self.wanted = wanted
        self.interval = interval
        self.stop = threading.Event()
        self.killed: list[BaseProcess] = []
        self.error: BaseException | None = None

    def busy_slots(self) -> set[int]:
        rows = self.rt.pipeline.db.conn.execute(
            "SELECT owner FROM ledger WHERE status = 'in_progress' AND expires_at > ?",
            (time.time(),),
        ).fetchall()
        return {i for (owner,) in rows if (i := _worker_index(owner)) is not None}

    def run(self) -> None:
        try:
            while not self.stop.wait(self.rng.uniform(*self.interval)):
                if not self.wanted():
                    continue
                procs = list(self.rt._procs)
                live = [(i, p) for i, p in enumerate(procs) if p.exitcode is None]
                slots = self.busy_slots()
                busy = [(i, p) for i, p in live if i in slots]
                pool = busy if busy and self.rng.random() < 0.85 else live
                if not pool:
                    continue
                _, victim = self.rng.choice(pool)
                if victim.exitcode is None:
                    victim.kill()
                    self.killed.append(victim)
        except BaseException as e:  # reported by the test, not lost in a thread
            self.error = e
        finally:
            self.rt.pipeline.db.close()


def _diagnose(p: Pipeline, log: Path) -> str:
    conn = p.db.conn
    statuses = conn.execute(
        "SELECT status, COUNT(*) FROM ledger WHERE function = ? GROUP BY status", (FUNCTION,)
    ).fetchall()
    queues = conn.execute(
        "SELECT queue, COUNT(*), MAX(receive_count) FROM messages GROUP BY queue"
    ).fetchall()
    return (
        f"seed {SEED}; ledger {[tuple(r) for r in statuses]}; "
        f"messages (queue, n, max receives) {[tuple(r) for r in queues]}; "
        f"failpoint kills {len(read_log(log))}"
    )


@pytest.mark.timeout(3600 if LONG else 240)
# durability: process skips the fsyncs, which only an OS crash needs: SIGKILL
# must find every promise kept all the same.
@pytest.mark.parametrize("durability", ["full", "process"])
def test_killing_workers_loses_and_duplicates_nothing(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    reaper: Reaper,
    reliability_report: Report,
    durability: str,
) -> None:
    target = 420 if LONG else 55  # confirmed kills, at least
    n_inputs = 300 if LONG else 60
    budget = 2400.0 if LONG else 150.0
    rng = random.Random(SEED)
    kill_log = tmp_path / "kills.jsonl"
    # The environment reaches the spawned workers; the failpoints arm only in
    # processes named sluiceway-worker-*, never in this one.
    monkeypatch.setenv("SLUICEWAY_FAULTS", _faults(WORKER_FAULTS, kill_log, SEED))
    path = write_pipeline(tmp_path, f"durability: {durability}\n{PIPELINE}")
    inputs = [make_input(i, rng) for i in range(n_inputs)]

    # A third is there before the start (found by the reconcile), a third is
    # `put` while running, a third dropped into the bucket directory (found
    # by the watcher), all at random moments.
    third = n_inputs // 3
    for inp in inputs[:third]:
        drop_file(tmp_path, inp)
    schedule: list[tuple[float, str, Input]] = sorted(
        [(rng.uniform(0, 8.0), "put", inp) for inp in inputs[third : 2 * third]]
        + [(rng.uniform(0, 8.0), "drop", inp) for inp in inputs[2 * third :]],
        key=lambda s: s[0],
    )

    rt = Runtime(path, workers=2, watch=True, grace=5.0, settle=0.2)
    # A list, not a dict by pid: pids are reused (pid_max may be 32768 and the
    # machine busy), and two workers sharing a pid must not share a kill.
    spawned: list[BaseProcess] = []
    original_spawn = rt._spawn

    def spawn(index: int) -> BaseProcess:
        p = reaper.proc(original_spawn(index))
        spawned.append(p)
        return p

    rt._spawn = spawn  # type: ignore[method-assign]
    db = rt.pipeline.db

    def done_count() -> int:
        return int(
            db.conn.execute(
                "SELECT COUNT(*) FROM ledger WHERE function = ? AND status = 'done'", (FUNCTION,)
            ).fetchone()[0]
        )

    killer: Killer | None = None

    def kills_so_far() -> int:
        return len(read_log(kill_log)) + (len(killer.killed) if killer else 0)

    external_cap = 240 if LONG else 32  # the rest of the kills come from failpoints
    killer = Killer(
        rt,
        random.Random(SEED + 1),
        wanted=lambda: (
            killer is not None and len(killer.killed) < external_cap and rt.pipeline.pending() > 0
        ),
        interval=(0.15, 0.7),
    )
    started = time.monotonic()
    deadline = started + budget
    extra_rounds = 0
    try:
        rt.start()
        killer.start()
        while True:
            rt.tick(0.05)
            now = time.monotonic()
            while schedule and schedule[0][0] <= now - started:
                _, how, inp = schedule.pop(0)
                if how == "put":
                    rt.pipeline.put(stage_file(tmp_path, inp), "bronze", inp.key)
                else:
                    drop_file(tmp_path, inp)
            settled = not schedule and not (rt._watcher and rt._watcher.busy)
            if settled and done_count() == len(inputs) and rt.pipeline.pending() == 0:
                if kills_so_far() >= target + 5 or extra_rounds >= (60 if LONG else 12):
                    break
                # Not enough kills yet: more work to kill workers in the middle of.
                extra_rounds += 1
                more = [make_input(len(inputs) + i, rng) for i in range(10)]
                inputs += more
                at = now - started
                schedule += [(at + rng.uniform(0, 1.0), "drop", inp) for inp in more]
                schedule.sort(key=lambda s: s[0])
            if now > deadline:
                raise AssertionError(
                    f"not done after {budget:g}s: {done_count()}/{len(inputs)} inputs done; "
                    + _diagnose(rt.pipeline, kill_log)
                )
            if killer.error is not None:
                raise killer.error
    finally:
        killer.stop.set()
        killer.join(10)
        rt.stop()
    seconds = time.monotonic() - started
    restarts = rt.restarts
    rt.pipeline.close()

    # Count only kills that happened: the process ended by SIGKILL.
    for p in [*spawned, *killer.killed]:
        p.join(10)
    failpoint_kills = read_log(kill_log)
    kills: Counter[str] = Counter()
    counted: set[int] = set()  # id() of each process whose death is attributed
    for e in failpoint_kills:
        pid = int(str(e["pid"]))
        match = next(
            (
                p
                for p in spawned
                if p.pid == pid and p.exitcode == SIGKILLED and id(p) not in counted
            ),
            None,
        )
        if match is not None:
            counted.add(id(match))
            kills[str(e["point"])] += 1
    for p in killer.killed:
        if id(p) not in counted and p.exitcode == SIGKILLED:
            counted.add(id(p))
            kills["external"] += 1
    dead = sum(1 for p in spawned if p.exitcode == SIGKILLED)

    result = audit(tmp_path, inputs)
    total = sum(kills.values())
    ok = not result.problems and total >= target
    reliability_report.add(
        RunRecord(
            f"worker kills (Runtime, 2 workers, durability: {durability})",
            2,
            kills,
            result,
            seconds,
            ok,
        )
    )
    assert not result.problems, f"seed {SEED}: " + "; ".join(result.problems)
    assert total == dead, f"kills counted {dict(kills)} but {dead} workers ended by SIGKILL"
    # Every death is noticed and the worker restarted (the last ones may die after the end).
    assert restarts >= total - 2, f"{total} kills but the supervisor restarted {restarts} workers"
    assert kills["external"] > 0 and len(kills) > 1, dict(kills)
    assert total >= target, f"seed {SEED}: only {total} confirmed kills: {dict(kills)}"


def _spawned_workers(pgid: int, leader: int) -> list[int]:
    out = []
    for pid in group_members(pgid):
        if pid == leader:
            continue
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except FileNotFoundError:
            continue
        if b"spawn_main" in cmdline:
            out.append(pid)
    return out


@pytest.mark.timeout(3600 if LONG else 240)
def test_killing_the_whole_runtime_loses_and_duplicates_nothing(
    tmp_path: Path, reaper: Reaper, reliability_report: Report
) -> None:
    runtime_kills = 40 if LONG else 6
    n_inputs = 200 if LONG else 40
    rng = random.Random(SEED + 2)
    kill_log = tmp_path / "kills.jsonl"
    env = {**os.environ, "SLUICEWAY_FAULTS": _faults(RUNTIME_FAULTS, kill_log, SEED + 2)}
    path = write_pipeline(tmp_path)
    inputs = [make_input(i, rng) for i in range(n_inputs)]
    remaining = list(inputs)
    out = (tmp_path / "runtime.log").open("ab")
    kills: Counter[str] = Counter()
    started = time.monotonic()

    def start(*args: str) -> subprocess.Popen[bytes]:
        return reaper.group(
            subprocess.Popen(
                sluiceway_cmd(path, "run", "--workers", "2", "--grace", "5", *args),
                cwd=tmp_path,
                env=env,
                stdout=out,
                stderr=out,
                start_new_session=True,  # its own process group, workers included
            )
        )

    per_cycle = max(1, n_inputs // (runtime_kills + 1))
    for _ in range(runtime_kills):
        # Some land while nothing runs (the start-up reconcile must find them)…
        for _ in range(per_cycle // 2):
            if remaining:
                drop_file(tmp_path, remaining.pop(0))
        proc = start()
        # …some while it runs (the watcher), and then the kill, at a random moment.
        kill_at = time.monotonic() + rng.uniform(0.8, 3.0)
        drops = sorted(rng.uniform(0, 3.0) for _ in range(per_cycle - per_cycle // 2))
        t0 = time.monotonic()
        workers: list[int] = []
        while time.monotonic() < kill_at:
            if drops and time.monotonic() - t0 >= drops[0]:
                drops.pop(0)
                if remaining:
                    drop_file(tmp_path, remaining.pop(0))
            workers = _spawned_workers(proc.pid, proc.pid) or workers
            if proc.poll() is not None:
                tail = (tmp_path / "runtime.log").read_text(errors="replace")[-3000:]
                raise AssertionError(f"the runtime exited with {proc.returncode}:\n{tail}")
            time.sleep(0.02)
        workers = _spawned_workers(proc.pid, proc.pid)
        assert kill_group(proc) == SIGKILLED
        kills["runtime"] += 1
        kills["runtime_workers"] += sum(1 for w in workers if not alive(w))

    # Whatever is left lands while nothing runs; a last run drains it all.
    for inp in remaining:
        drop_file(tmp_path, inp)
    proc = start("--drain", "--timeout", "1200" if LONG else "90", "--json")
    try:
        rc = proc.wait(1500 if LONG else 120)
    finally:
        kill_group(proc)
    assert rc == 0, (tmp_path / "runtime.log").read_text(errors="replace")[-3000:]
    out.close()
    seconds = time.monotonic() - started

    # A failpoint kill is logged just before the process SIGKILLs itself; by
    # now every process of every run is gone (each group was waited for).
    for e in read_log(kill_log):
        pid = int(str(e["pid"]))
        assert not alive(pid), f"worker {pid} logged a kill at {e['point']} but lives"
        kills[str(e["point"])] += 1

    result = audit(tmp_path, inputs)
    reliability_report.add(
        RunRecord(
            f"whole-runtime kills (`sluiceway run`, {runtime_kills} restarts)",
            2,
            kills,
            result,
            seconds,
            not result.problems,
        )
    )
    assert not result.problems, f"seed {SEED}: " + "; ".join(result.problems)
    assert kills["runtime"] == runtime_kills
