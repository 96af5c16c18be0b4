"""What the fault tests share: inputs with known rows, the audit of the end
state against the promises, process-table helpers, and the report table.

Every wait here has a deadline; nothing blocks without one.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import platform
import random
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pyarrow.dataset as ds
import pyarrow.parquet as pq

from sluiceway.buckets.local import TMP_DIR

from ..helpers import parquet_rows

ROOT = Path(__file__).resolve().parents[2]
REPORT_PATH = ROOT / "docs" / "reliability.md"
LONG = os.environ.get("SLUICEWAY_FAULTS_LONG", "") not in ("", "0")
FUNCTION = "csv-to-parquet"

# Short visibility so a killed worker's message comes back within seconds; a
# receive limit no number of kills reaches, so a dead letter means a bug.
PIPELINE = """
pipeline: faults
buckets:
  bronze: ./bronze
  staging: ./staging
topics:
  landed: {subscriptions: [to-parquet]}
queues:
  to-parquet:
    visibility_timeout: 2s
    max_receive_count: 1000
    backoff_base: 0.01s
    backoff_max: 0.05s
rules:
  - name: new-csv
    pattern:
      detail-type: [Object Created]
      detail:
        bucket: {name: [bronze]}
        object: {key: [{suffix: .csv}]}
    targets: [landed]
functions:
  csv-to-parquet:
    queue: to-parquet
    timeout: 60s
    steps:
      - read_csv: {block_size: 16384}
      - write_parquet: {bucket: staging}
"""

Row = tuple[str, str, str, str]


def write_pipeline(workdir: Path, text: str = PIPELINE) -> Path:
    path = workdir / "sluiceway.yaml"
    path.write_text(textwrap.dedent(text))
    return path


# -- inputs --------------------------------------------------------------------

NAMES = ["Ana", "Zoë", 'Bob "B"', "Li, Wei", "Ola\nNordmann", "Ève", "Nuño"]


@dataclass
class Input:
    key: str  # in the bronze bucket
    rows: list[Row]

    @property
    def output_key(self) -> str:
        return self.key.rsplit(".", 1)[0] + ".parquet"


def make_input(index: int, rng: random.Random, min_rows: int = 200, max_rows: int = 2500) -> Input:
    """A CSV with ids unique across every input of a run, so a row counts once."""
    n = rng.randint(min_rows, max_rows)
    rows = [
        (
            str(index * 1_000_000 + i),
            rng.choice(NAMES),
            rng.choice(["DE", "FR", "NL"]),
            f"{rng.uniform(0, 1000):.2f}",
        )
        for i in range(n)
    ]
    return Input(key=f"p{index % 4}/f{index:04d}.csv", rows=rows)


def csv_bytes(inp: Input) -> bytes:
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["id", "name", "country", "amount"])
    w.writerows(inp.rows)
    return buf.getvalue().encode("utf-8")


def drop_file(workdir: Path, inp: Input) -> None:
    """Land an input the way another program would: write aside, rename in."""
    aside = workdir / "incoming" / inp.key.replace("/", "_")
    aside.parent.mkdir(parents=True, exist_ok=True)
    aside.write_bytes(csv_bytes(inp))
    target = workdir / "bronze" / inp.key
    target.parent.mkdir(parents=True, exist_ok=True)
    os.replace(aside, target)


def stage_file(workdir: Path, inp: Input) -> Path:
    """Write the CSV outside the buckets (for ``Pipeline.put``)."""
    path = workdir / "incoming" / ("put_" + inp.key.replace("/", "_"))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(csv_bytes(inp))
    return path


# -- the end state, against the promises ---------------------------------------


@dataclass
class Audit:
    inputs: int = 0
    inputs_done: int = 0
    inputs_lost: int = 0
    outputs: int = 0
    unexpected_files: int = 0
    unreadable_outputs: int = 0
    rows_expected: int = 0
    output_rows: int = 0
    duplicate_rows: int = 0
    rows_lost: int = 0
    hidden_temp_files: int = 0
    queued: int = 0
    dead_lettered: int = 0
    integrity: str = ""
    problems: list[str] = field(default_factory=list)


def _connect_ro(db: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30)
    conn.row_factory = sqlite3.Row
    return conn


def audit(workdir: Path, inputs: Iterable[Input]) -> Audit:
    """Check the promises on what is left on disk once every process is gone."""
    inputs = list(inputs)
    a = Audit(inputs=len(inputs))
    staging = workdir / "staging"
    db = workdir / ".sluiceway" / "state.db"

    # The ledger: one entry per input, done.
    conn = _connect_ro(db)
    try:
        a.integrity = str(conn.execute("PRAGMA integrity_check").fetchone()[0])
        entries: dict[str, tuple[str, dict[str, Any]]] = {}
        for row in conn.execute("SELECT status, info FROM ledger WHERE function = ?", (FUNCTION,)):
            info = json.loads(row["info"])
            entries.setdefault(info.get("input", "?"), (row["status"], info))
        statuses = Counter(
            r[0] for r in conn.execute("SELECT status FROM ledger WHERE function = ?", (FUNCTION,))
        )
        a.queued = conn.execute("SELECT COUNT(*) FROM messages").fetchone()[0]
        a.dead_lettered = conn.execute(
            "SELECT COUNT(*) FROM messages WHERE queue LIKE '%-dlq'"
        ).fetchone()[0]
        dlq_sample = [
            json.loads(r[0] or "{}").get("message", "")
            for r in conn.execute("SELECT failure FROM messages WHERE queue LIKE '%-dlq' LIMIT 3")
        ]
    finally:
        conn.close()
    for inp in inputs:
        status, _ = entries.get(f"bronze/{inp.key}", ("missing", {}))
        if status == "done":
            a.inputs_done += 1
    a.inputs_lost = a.inputs - a.inputs_done
    if a.integrity != "ok":
        a.problems.append(f"PRAGMA integrity_check: {a.integrity}")
    if a.inputs_lost:
        a.problems.append(f"{a.inputs_lost} inputs not done in the ledger (statuses {statuses})")
    if sum(statuses.values()) != a.inputs or statuses.get("done", 0) != a.inputs:
        a.problems.append(f"ledger entries for {FUNCTION}: {dict(statuses)}, want {a.inputs} done")
    if a.queued:
        a.problems.append(f"{a.queued} messages left in queues ({a.dead_lettered} in DLQs)")
    if dlq_sample:
        a.problems.append(f"dead-lettered: {dlq_sample}")

    # The outputs: exactly one complete Parquet file per input, nothing else.
    expected = {inp.output_key for inp in inputs}
    seen: set[str] = set()
    rows = Counter[Row]()
    for dirpath, _, filenames in os.walk(staging):
        rel_dir = Path(dirpath).relative_to(staging)
        if rel_dir.parts and rel_dir.parts[0] == TMP_DIR:
            a.hidden_temp_files += len(filenames)
            continue
        for fn in filenames:
            key = "/".join((*rel_dir.parts, fn))
            if key not in expected:
                a.unexpected_files += 1
                a.problems.append(f"unexpected file in the staging bucket: {key}")
                continue
            seen.add(key)
            try:
                rows.update(tuple(r.values()) for r in parquet_rows(staging / key))  # type: ignore[misc]
            except Exception as e:  # a half-written file would land here
                a.unreadable_outputs += 1
                a.problems.append(f"{key}: not a complete Parquet file: {e}")
    a.outputs = len(seen)
    missing = sorted(expected - seen)
    if missing:
        a.problems.append(f"{len(missing)} outputs missing, e.g. {missing[:3]}")

    # What a reader of the bucket directory sees (PyArrow skips dot-directories).
    try:
        files = ds.dataset(staging, format="parquet").files
    except Exception as e:
        files = []
        a.problems.append(f"a dataset reader cannot open the staging bucket: {e}")
    visible = sorted(Path(f).relative_to(staging).as_posix() for f in files)
    if files and visible != sorted(seen):
        extra = sorted(set(visible) - seen)[:3]
        a.problems.append(f"a dataset reader sees {len(visible)} files, not {len(seen)}: {extra}")

    want = Counter[Row]()
    for inp in inputs:
        want.update(inp.rows)
    a.rows_expected = sum(want.values())
    a.output_rows = sum(rows.values())
    a.duplicate_rows = sum(n - 1 for n in rows.values() if n > 1)
    a.rows_lost = sum((want - rows).values())
    surplus = sum((rows - want).values()) - a.duplicate_rows
    if a.duplicate_rows:
        a.problems.append(f"{a.duplicate_rows} output rows appear more than once")
    if a.rows_lost:
        a.problems.append(f"{a.rows_lost} input rows missing from the outputs")
    if surplus > 0:
        a.problems.append(f"{surplus} output rows that no input has")
    return a


def row_count(path: Path) -> int:
    return pq.ParquetFile(path).metadata.num_rows


# -- processes -----------------------------------------------------------------


def _stat(pid: int) -> tuple[str, int, int] | None:
    """(state, ppid, pgrp) from /proc, or None if there is no such process."""
    try:
        with open(f"/proc/{pid}/stat", encoding="utf-8", errors="replace") as f:
            text = f.read()
    except (FileNotFoundError, ProcessLookupError):
        return None
    fields = text.rsplit(")", 1)[1].split()
    return fields[0], int(fields[1]), int(fields[2])


def alive(pid: int) -> bool:
    st = _stat(pid)
    return st is not None and st[0] not in ("Z", "X")


def processes() -> dict[int, tuple[str, int, int]]:
    out = {}
    for name in os.listdir("/proc"):
        if name.isdigit() and (st := _stat(int(name))) is not None:
            out[int(name)] = st
    return out


def group_members(pgid: int) -> list[int]:
    return [pid for pid, (state, _, pgrp) in processes().items() if pgrp == pgid and state != "Z"]


def children(pid: int) -> list[int]:
    return [p for p, (state, ppid, _) in processes().items() if ppid == pid and state != "Z"]


def wait_for(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(0.02)


def kill_group(proc: subprocess.Popen[bytes], timeout: float = 10.0) -> int:
    """SIGKILL a process group; wait (bounded) until every member is gone."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout)
    wait_for(lambda: not group_members(proc.pid), timeout, f"process group {proc.pid} to die")
    return proc.returncode


def sluiceway_cmd(pipeline: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "sluiceway", *args, "--pipeline", str(pipeline)]


# -- the report ----------------------------------------------------------------

KILL_KINDS = (
    "external",
    "during_read",
    "during_write",
    "before_publish",
    "after_commit",
    "after_done",
    "runtime",
    "runtime_workers",
)


@dataclass
class RunRecord:
    name: str
    workers: int
    kills: Counter[str]
    audit: Audit
    seconds: float
    passed: bool

    @property
    def total_kills(self) -> int:
        return sum(self.kills.values())


@dataclass
class Report:
    runs: list[RunRecord] = field(default_factory=list)

    def add(self, record: RunRecord) -> None:
        self.runs.append(record)

    def section(self, long: bool = LONG) -> str:
        """This session's runs: the table for one mode (default or long)."""
        mode = "long" if long else "default"
        title = (
            "Long run (`SLUICEWAY_FAULTS_LONG=1 .venv/bin/pytest tests/faults`)"
            if long
            else "Default run (CI: `.venv/bin/pytest tests/faults`)"
        )
        total = sum(r.total_kills for r in self.runs)
        lines = [
            f"<!-- BEGIN {mode} -->",
            f"## {title}",
            "",
            f"{datetime.now(UTC).strftime('%Y-%m-%d %H:%M UTC')}, {os.cpu_count()} cores, "
            f"Python {platform.python_version()}, {platform.system()} {platform.machine()}: "
            f"**{total} kills** delivered in all.",
            "",
            "| run | kills | inputs | inputs done | outputs | output rows | duplicate rows "
            "| inputs lost | rows lost | temp files left (hidden) | integrity | time | result |",
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- | ---: "
            "| --- |",
        ]
        for r in self.runs:
            a = r.audit
            lines.append(
                f"| {r.name} | {r.total_kills} | {a.inputs} | {a.inputs_done} | {a.outputs} "
                f"| {a.output_rows:,} | {a.duplicate_rows} | {a.inputs_lost} | {a.rows_lost} "
                f"| {a.hidden_temp_files} | {a.integrity} | {r.seconds:.1f} s "
                f"| {'pass' if r.passed else '**FAIL**'} |"
            )
        lines += [
            "",
            "Kills by kind:",
            "",
            "| run | " + " | ".join(KILL_KINDS) + " |",
            "| --- | " + " | ".join("---:" for _ in KILL_KINDS) + " |",
        ]
        for r in self.runs:
            lines.append(f"| {r.name} | " + " | ".join(str(r.kills[k]) for k in KILL_KINDS) + " |")
        lines += [f"<!-- END {mode} -->"]
        return "\n".join(lines)

    @staticmethod
    def _kept(old: str, mode: str) -> str | None:
        begin, end = f"<!-- BEGIN {mode} -->", f"<!-- END {mode} -->"
        if begin in old and end in old:
            return old[old.index(begin) : old.index(end) + len(end)]
        return None

    def render(self, previous: str = "") -> str:
        """The whole page: this session's section, the other mode's kept as it was."""
        default = self.section(False) if not LONG else self._kept(previous, "default")
        long = self.section(True) if LONG else self._kept(previous, "long")
        lines = [
            "# Reliability: the delivery promises under SIGKILL",
            "",
            "<!-- Generated by tests/faults (pytest tests/faults); do not edit by hand. -->",
            "",
            "The fault suite in `tests/faults/` runs the bronze → staging pipeline through",
            "real worker processes and kills them with SIGKILL at random moments: from",
            "outside (a thread picks a live worker), at failpoints inside the engine",
            "(`SLUICEWAY_FAULTS`, see `src/sluiceway/faults.py`), and by killing the whole",
            "`sluiceway run` process group and starting it again. Then it checks the",
            "promises on what is left: every input done in the ledger, every input row in",
            "the Parquet outputs exactly once, one complete file per input and nothing",
            "else visible in the bucket (nor to a PyArrow dataset reader), `PRAGMA",
            "integrity_check` ok, no message left in any queue or dead-letter queue.",
            "Every kill counted is confirmed: the process ended by SIGKILL.",
            "",
            default or "<!-- BEGIN default -->\n(no default run yet)\n<!-- END default -->",
            "",
            long or "<!-- BEGIN long -->\n(no long run yet)\n<!-- END long -->",
            "",
            "## What the columns mean",
            "",
            "- **external**: a thread in the test SIGKILLs a live worker process at random",
            "  intervals (mostly one in the middle of a file); the runtime's supervisor",
            "  restarts it.",
            "- **during_read**, **during_write**, **before_publish**, **after_commit**,",
            "  **after_done**: the worker SIGKILLs itself at that failpoint: after a batch",
            "  was read; mid Parquet write (the file has no footer yet); the object complete",
            "  aside but not renamed into place; outputs published but the ledger not done;",
            "  the ledger done but the message not acked (on the embedded default both",
            "  commit in one transaction, so this kill lands just after that commit).",
            "- **runtime**: the whole `sluiceway run` process group is SIGKILLed and",
            "  started again; **runtime_workers** are its worker processes that went with it.",
            "- **duplicate rows**, **rows lost**: the multiset of every row in every Parquet",
            "  output against the rows of the inputs (ids are unique across inputs).",
            "- **temp files left (hidden)**: files killed writers left in a bucket's",
            "  `.sluiceway-tmp/` that were not swept yet; no listing, watcher or dataset",
            "  reader sees them.",
            "",
        ]
        return "\n".join(lines)

    def write(self, path: Path = REPORT_PATH) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        previous = path.read_text(encoding="utf-8") if path.exists() else ""
        path.write_text(self.render(previous), encoding="utf-8")
