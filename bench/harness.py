"""Timing, child processes with their peak memory, statistics, and the report pieces.

Every contender that needs a memory figure runs in a child process of its own
(``python -m bench.child``), which reports its own peak RSS (see child.py for
why that is not ``ru_maxrss``). So one contender's allocations never show up
in another's number.
"""

from __future__ import annotations

import cProfile
import json
import pstats
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Callable, Sequence
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
        spec = json.dumps({"target": target, "kwargs": kwargs})
        with open(log, "wb") as err:
            proc = subprocess.run(
                [sys.executable, "-m", "bench.child", spec, str(out)],
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
