"""Failpoints: kill this process (SIGKILL) at named points, to prove crash safety.

The engine calls ``faults.point("after_commit")`` at the moments where a crash
is most likely to break a promise. Nothing happens unless the environment
variable ``SLUICEWAY_FAULTS`` is set; it is read once, when this module is
first imported, and an unset variable leaves ``point`` a single dict check.

The variable is a comma-separated list of ``point:probability`` pairs and
``option=value`` settings::

    SLUICEWAY_FAULTS="during_read:0.05,after_commit:0.2,seed=7,log=/tmp/kills.jsonl"

Points (where the engine calls them):

``during_read``
    ``write_parquet``, after a record batch was read and before it is written.
``during_write``
    ``write_parquet``, after a batch went to the Parquet writer (into the
    row group it fills, or with it to the encoder thread): the file in the
    bucket's temporary directory has no footer yet.
``before_publish``
    ``LocalBucket.open_write``: the object is complete and fsynced aside but
    not yet renamed into place.
``after_commit``
    the worker: every output is published, the ledger does not say done.
``after_done``
    the worker: the ledger says done, the message is not acked.

Options:

``seed=N``
    Each process draws from ``Random(f"{N}:{pid}")``: reproducible per pid.
``log=PATH``
    Before a kill, append one JSON line ``{"pid", "point", "process", "at"}``
    to PATH, so a test can count the kills and tell them apart.
``max=N``
    At most N kills in total across processes (counted in the ``log`` file,
    under a file lock); needs ``log``.
``procs=GLOB``
    Only in processes whose ``multiprocessing`` name matches (default
    ``sluiceway-worker-*``, the runtime's workers), so a test or the
    supervising parent that shares the environment is never killed.
"""

from __future__ import annotations

import fnmatch
import json
import multiprocessing
import os
import random
import signal
import time
from dataclasses import dataclass, field

ENV = "SLUICEWAY_FAULTS"
POINTS = ("during_read", "during_write", "before_publish", "after_commit", "after_done")
DEFAULT_PROCS = "sluiceway-worker-*"


class FaultSpecError(ValueError):
    """``SLUICEWAY_FAULTS`` cannot be parsed."""


@dataclass
class Plan:
    """What to do at each point: the parsed form of ``SLUICEWAY_FAULTS``."""

    probabilities: dict[str, float] = field(default_factory=dict)
    seed: str | None = None
    log: str | None = None
    max_kills: int | None = None
    procs: str = DEFAULT_PROCS


def parse(spec: str) -> Plan:
    plan = Plan()
    for raw in spec.split(","):
        item = raw.strip()
        if not item:
            continue
        if "=" in item:
            name, _, value = item.partition("=")
            name, value = name.strip(), value.strip()
            if name == "seed":
                plan.seed = value
            elif name == "log":
                plan.log = value
            elif name == "procs":
                plan.procs = value
            elif name == "max":
                try:
                    plan.max_kills = int(value)
                except ValueError:
                    raise FaultSpecError(f"{ENV}: max={value!r} is not an integer") from None
            else:
                raise FaultSpecError(f"{ENV}: unknown option {name!r} (seed, log, max, procs)")
            continue
        name, sep, value = item.partition(":")
        name = name.strip()
        if name not in POINTS:
            raise FaultSpecError(f"{ENV}: unknown point {name!r} (points: {', '.join(POINTS)})")
        try:
            p = float(value) if sep else 1.0
        except ValueError:
            raise FaultSpecError(f"{ENV}: {item!r}: probability is not a number") from None
        if not 0.0 <= p <= 1.0:
            raise FaultSpecError(f"{ENV}: {item!r}: probability must be within 0..1")
        plan.probabilities[name] = p
    if plan.max_kills is not None and plan.log is None:
        raise FaultSpecError(f"{ENV}: max= needs log= to count kills across processes")
    return plan


_plan: Plan = Plan()
_armed: dict[str, float] = {}  # empty: point() returns at once
_rng: random.Random | None = None
_rng_pid: int | None = None
_in_scope: bool | None = None


def configure(spec: str | None) -> None:
    """(Re)load the plan; ``None`` or ``""`` disarms every point."""
    global _plan, _armed, _rng, _rng_pid, _in_scope
    _plan = parse(spec) if spec else Plan()
    _armed = {k: v for k, v in _plan.probabilities.items() if v > 0}
    _rng = None
    _rng_pid = None
    _in_scope = None


def point(name: str) -> None:
    """A failpoint: maybe SIGKILL this process here, as the plan says."""
    if _armed:
        _maybe_kill(name)


def _maybe_kill(name: str) -> None:
    global _rng, _rng_pid, _in_scope
    p = _armed.get(name)
    if not p:
        return
    if _in_scope is None:
        _in_scope = fnmatch.fnmatchcase(multiprocessing.current_process().name, _plan.procs)
    if not _in_scope:
        return
    pid = os.getpid()
    if _rng is None or _rng_pid != pid:  # a forked child draws its own numbers
        _rng = random.Random(f"{_plan.seed}:{pid}" if _plan.seed is not None else None)
        _rng_pid = pid
    if _rng.random() >= p:
        return
    if _plan.log is not None and not _record(name, pid):
        return
    os.kill(pid, signal.SIGKILL)
    time.sleep(10)  # SIGKILL to oneself is delivered before this returns


def _record(name: str, pid: int) -> bool:
    """Log the kill about to happen; False if ``max`` kills were already made."""
    import fcntl

    assert _plan.log is not None
    line = json.dumps(
        {
            "pid": pid,
            "point": name,
            "process": multiprocessing.current_process().name,
            "at": time.time(),
        }
    )
    fd = os.open(_plan.log, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        if _plan.max_kills is not None:
            with open(fd, closefd=False) as f:
                f.seek(0)
                if sum(1 for _ in f) >= _plan.max_kills:
                    return False
        os.write(fd, (line + "\n").encode())
        return True
    finally:
        os.close(fd)  # also releases the lock


def read_log(path: str | os.PathLike[str]) -> list[dict[str, object]]:
    """The kills a ``log=`` file recorded (a missing file is no kills)."""
    try:
        with open(path, encoding="utf-8") as f:
            return [json.loads(line) for line in f if line.strip()]
    except FileNotFoundError:
        return []


configure(os.environ.get(ENV))
