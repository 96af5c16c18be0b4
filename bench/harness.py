"""Timing, child processes with their peak memory, statistics, and the report pieces.

Every contender that needs a memory figure runs in a child process of its own
(``python -m bench.child``), which reports its own peak RSS (see child.py for
why that is not ``ru_maxrss``). So one contender's allocations never show up
in another's number.
"""

from __future__ import annotations

import cProfile
import json
import os
import pstats
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
WORK_DIR = Path(__file__).resolve().parent / "data" / "work"


# -- statistics ----------------------------------------------------------------


@dataclass(frozen=True)
class Stats:
    """Median and range of repeated measurements."""

    values: tuple[float, ...]

    @classmethod
    def of(cls, values: Sequence[float]) -> Stats:
        if not values:
            raise ValueError("no measurements")
        return cls(tuple(values))

    @property
    def median(self) -> float:
        return statistics.median(self.values)

    @property
    def lo(self) -> float:
        return min(self.values)

    @property
    def hi(self) -> float:
        return max(self.values)

    def fmt(self, digits: int = 2, unit: str = "") -> str:
        """``1.23 s`` for the median."""
        return f"{self.median:,.{digits}f}{unit}"

    def range(self, digits: int = 2) -> str:
        return f"{self.lo:,.{digits}f}–{self.hi:,.{digits}f}"


def percentile(values: Sequence[float], p: float) -> float:
    """The p-th percentile (0-100), linear between the closest ranks."""
    data = sorted(values)
    if not data:
        raise ValueError("no values")
    k = (len(data) - 1) * p / 100
    lo, hi = int(k), min(int(k) + 1, len(data) - 1)
    return data[lo] + (data[hi] - data[lo]) * (k - lo)


# -- child processes -----------------------------------------------------------


@dataclass
class ChildResult:
    result: Any
    peak_rss: int  # bytes, the child process's own high-water mark


class ChildFailed(RuntimeError):
    pass


# Children that wrote their result and then exited abnormally; the report lists them.
EXIT_FAILURES: list[str] = []


def run_child(target: str, *, timeout: float = 3600.0, **kwargs: Any) -> ChildResult:
    """Call ``module:function(**kwargs)`` in a fresh interpreter; JSON in and out."""
    with tempfile.TemporaryDirectory(prefix="bench-child-") as tmp:
        out = Path(tmp) / "result.json"
        log = Path(tmp) / "stderr.txt"
        # In a file, not argv: 10,000 file names are past the kernel's argument limit.
        spec = Path(tmp) / "spec.json"
        spec.write_text(json.dumps({"target": target, "kwargs": kwargs}))
        with open(log, "wb") as err:
            proc = subprocess.run(
                [sys.executable, "-m", "bench.child", str(spec), str(out)],
                cwd=ROOT,
                stdout=subprocess.DEVNULL,
                stderr=err,
                timeout=timeout,
                check=False,
            )
        tail = log.read_text(errors="replace")[-3000:]
        if not out.exists():
            raise ChildFailed(f"{target} exited with {proc.returncode}:\n{tail}")
        if proc.returncode != 0:  # finished its work, then died on the way out
            last = tail.strip().splitlines()[-1:] or ["(nothing on stderr)"]
            EXIT_FAILURES.append(f"`{target}`: exit code {proc.returncode}, `{last[0]}`")
        got = json.loads(out.read_text())
        return ChildResult(got["result"], got["peak_rss"])


def fresh_dir(name: str) -> Path:
    """An empty scratch directory under bench/data/work (same disk as the inputs)."""
    WORK_DIR.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f"{name}-", dir=WORK_DIR))


# -- profiles ------------------------------------------------------------------


def profile(fn: Callable[[], Any]) -> dict[str, Any]:
    """Run ``fn`` under cProfile; JSON-able totals per function, by own time.

    cProfile sees the calling thread only: time spent in threads that
    PyArrow starts (its CSV reader calls back into Python from one) shows up
    as waiting in the call that drives them, e.g. ``read_csv_batches``.
    """
    prof = cProfile.Profile()
    prof.enable()
    try:
        fn()
    finally:
        prof.disable()
    st = pstats.Stats(prof)
    rows = []
    for (filename, line, name), (_, ncalls, tt, ct, _) in st.stats.items():  # type: ignore[attr-defined]
        label = f"{_short_path(filename)}:{line} {name}" if line else name
        rows.append((label, ncalls, tt, ct))
    rows.sort(key=lambda r: r[2], reverse=True)
    return {"total": st.total_tt, "rows": rows[:200]}  # type: ignore[attr-defined]


@dataclass
class Profile:
    """What ``profile`` returned, to print and to ask questions of."""

    total: float
    rows: list[tuple[str, int, float, float]]  # function, calls, own s, cumulative s

    @classmethod
    def of(cls, raw: dict[str, Any]) -> Profile:
        return cls(raw["total"], [tuple(r) for r in raw["rows"]])  # type: ignore[misc]

    def own(self, *needles: str) -> tuple[int, float]:
        """Calls and own seconds of the functions whose label contains any needle."""
        hits = [r for r in self.rows if any(n in r[0] for n in needles)]
        return sum(r[1] for r in hits), sum(r[2] for r in hits)

    def table(self, top: int = 12) -> str:
        lines = [
            f"cProfile (main thread), {self.total:.2f} s in all; the top {top} by own time:",
            "",
            "| own s | cumulative s | calls | function |",
            "| ---: | ---: | ---: | --- |",
        ]
        for label, calls, own, cum in self.rows[:top]:
            lines.append(f"| {own:.3f} | {cum:.3f} | {calls:,} | `{label}` |")
        return "\n".join(lines) + "\n"


SAMPLE_RATE = 250  # py-spy samples per second


@contextmanager
def sampled(rate: int = SAMPLE_RATE) -> Iterator[dict[str, Any]]:
    """Sample this process, its threads and its subprocesses with py-spy while the block runs.

    cProfile sees one thread of one process; the service's time is spread
    over a driver, a service process, workers and encoder threads, which a
    sampling profiler attached from outside sees all at once. Fills the
    yielded dict with ``Sampled``'s fields, or with ``error`` where py-spy is
    missing or may not attach (it needs ptrace rights: root, or sudo on macOS).
    """
    found: dict[str, Any] = {}
    exe = shutil.which(
        "py-spy", path=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    )
    if exe is None:
        found["error"] = "py-spy is not installed (bench/requirements.lock pins it)"
        yield found
        return
    out = fresh_dir("py-spy") / "raw.txt"
    cmd = [exe, "record", "--pid", str(os.getpid()), "--format", "raw", "--rate", str(rate)]
    cmd += ["--subprocesses", "--nonblocking", "--full-filenames", "-o", str(out)]
    spy = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert spy.stdout is not None
    first = spy.stdout.readline()  # "Sampling process …" once attached, or why it could not
    if "Sampling" not in first:
        spy.wait(timeout=30)
        found["error"] = f"py-spy could not attach: {first.strip() or spy.returncode}"
        yield found
        return
    try:
        yield found
    finally:
        spy.send_signal(signal.SIGINT)
        tail = spy.communicate(timeout=60)[0]
    if not out.exists():
        found["error"] = f"py-spy wrote nothing: {tail.strip()[-300:]}"
        return
    found.update(_collapse(out.read_text(), os.getpid(), rate))
    shutil.rmtree(out.parent, ignore_errors=True)


def _collapse(raw: str, own_pid: int, rate: int) -> dict[str, Any]:
    """py-spy's collapsed stacks → seconds by process role and by function (own and total)."""
    roles: Counter[str] = Counter()
    own: Counter[str] = Counter()
    total: Counter[str] = Counter()
    for line in raw.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        frames = _frames(stack)
        procs = [f for f in frames if f.startswith("process ")]
        calls = [_frame_label(f) for f in frames if not f.startswith("process ")]
        seconds = int(count) / rate
        roles[_role(procs[-1] if procs else "", own_pid)] += seconds
        if calls:
            own[calls[-1]] += seconds
            for label in set(calls):
                total[label] += seconds
    return {
        "seconds": sum(roles.values()),
        "roles": roles.most_common(),
        "rows": [(label, s, total[label]) for label, s in own.most_common(200)],
    }


def _frames(stack: str) -> list[str]:
    """Split a collapsed stack at ``;``, but not inside a quoted ``process PID:"cmd"``."""
    frames: list[str] = []
    for part in stack.split(";"):
        if frames and frames[-1].startswith("process ") and not frames[-1].endswith('"'):
            frames[-1] += ";" + part
        else:
            frames.append(part)
    return frames


def _frame_label(frame: str) -> str:
    """``name (/path/file.py:12)`` → ``file.py name``: one row per function, not per line."""
    name, _, where = frame.partition(" (")
    filename = where.rstrip(")").rpartition(":")[0] or where.rstrip(")")
    return f"{_short_path(filename)} {name}"


def _role(process: str, own_pid: int) -> str:
    pid, _, cmd = process.removeprefix("process ").partition(":")
    if not process or pid == str(own_pid):
        return "driver (this process)"
    if " run " in cmd and "sluiceway" in cmd:
        return "service (`sluiceway run`)"
    if "multiprocessing" in cmd or "spawn_main" in cmd:
        return "worker processes"
    return cmd.strip('"')[:60]


@dataclass
class Sampled:
    """What ``sampled`` collected, to print."""

    seconds: float  # CPU seconds sampled, all processes and threads
    roles: list[tuple[str, float]]
    rows: list[tuple[str, float, float]]  # function, own s, total s

    def table(self, top: int = 15) -> str:
        lines = [
            f"py-spy ({SAMPLE_RATE} samples/s, every process and thread, idle time left out): "
            f"{self.seconds:.2f} s of CPU in all; "
            + ", ".join(f"{role} {s:.2f} s" for role, s in self.roles)
            + f". The top {top} functions by own time:",
            "",
            "| own s | total s | function |",
            "| ---: | ---: | --- |",
        ]
        for label, own, total in self.rows[:top]:
            lines.append(f"| {own:.3f} | {total:.3f} | `{label}` |")
        return "\n".join(lines) + "\n"


def _short_path(filename: str) -> str:
    for marker in ("/site-packages/", "/src/", "/lib/python3"):
        if marker in filename:
            return filename.split(marker, 1)[1]
    return filename


# -- the report ----------------------------------------------------------------


@dataclass
class Target:
    what: str
    value: str
    goal: str
    met: bool | None  # None: could not be measured


@dataclass
class Section:
    """One figure of RESULTS.md: markdown lines, and the targets it checked."""

    title: str
    lines: list[str] = field(default_factory=list)
    targets: list[Target] = field(default_factory=list)

    def add(self, *lines: str) -> None:
        self.lines.extend(lines)

    def table(self, headers: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
        align = ["---"] + ["---:"] * (len(headers) - 1)
        self.lines.append("| " + " | ".join(headers) + " |")
        self.lines.append("| " + " | ".join(align) + " |")
        for row in rows:
            self.lines.append("| " + " | ".join(row) + " |")
        self.lines.append("")

    def target(self, what: str, value: str, goal: str, met: bool | None) -> None:
        """Record a target, and say right here whether it was met."""
        self.targets.append(Target(what, value, goal, met))
        self.add(f"**Target:** {what}: {value}, goal {goal} — {verdict(met)}.", "")

    def markdown(self) -> str:
        return "\n".join([f"## {self.title}", "", *self.lines]).rstrip() + "\n"


def verdict(met: bool | None) -> str:
    return {True: "met", False: "**missed**", None: "not measured"}[met]


def mb(n_bytes: float, unit: bool = True) -> str:
    return f"{n_bytes / 2**20:,.0f}" + (" MiB" if unit else "")
