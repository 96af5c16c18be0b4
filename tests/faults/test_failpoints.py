"""The failpoints themselves: parsing, scope, the kill, the log and its limit."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from sluiceway import faults


@pytest.fixture(autouse=True)
def _restore() -> Iterator[None]:
    yield
    faults.configure(os.environ.get(faults.ENV))


def test_parse_points_and_options() -> None:
    plan = faults.parse("during_read:0.25, after_commit ,seed=7,log=/tmp/k.jsonl,max=3,procs=w*")
    assert plan.probabilities == {"during_read": 0.25, "after_commit": 1.0}
    assert (plan.seed, plan.log, plan.max_kills, plan.procs) == ("7", "/tmp/k.jsonl", 3, "w*")


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("after_comit:0.1", "unknown point 'after_comit'"),
        ("after_commit:x", "not a number"),
        ("after_commit:1.5", "within 0..1"),
        ("colour=red", "unknown option 'colour'"),
        ("after_done:1,max=2", "max= needs log="),
        ("after_done:1,max=two,log=/tmp/x", "not an integer"),
    ],
)
def test_a_bad_spec_is_an_error_not_silence(spec: str, message: str) -> None:
    with pytest.raises(faults.FaultSpecError, match=message):
        faults.parse(spec)


def test_unset_means_disarmed_and_cheap() -> None:
    faults.configure(None)
    assert faults._armed == {}
    started = time.perf_counter()
    for _ in range(100_000):
        faults.point("after_commit")
    assert time.perf_counter() - started < 0.5  # a dict check per call, nothing more


def test_this_process_is_out_of_scope_by_default() -> None:
    # The test process shares the workers' environment; it must never die.
    faults.configure("after_commit:1")
    faults.point("after_commit")
    faults.point("after_done")  # not in the plan at all


SCRIPT = textwrap.dedent(
    """
    import multiprocessing, sys
    multiprocessing.current_process().name = sys.argv[1]
    from sluiceway import faults
    faults.point("during_read")
    print("survived", flush=True)
    """
)


def _run(name: str, spec: str, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", SCRIPT, name],
        env={**os.environ, faults.ENV: spec},
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
    )


def test_a_worker_is_killed_and_the_kill_logged(tmp_path: Path) -> None:
    log = tmp_path / "kills.jsonl"
    done = _run("sluiceway-worker-3", f"during_read:1,log={log}", tmp_path)
    assert done.returncode == -signal.SIGKILL
    assert "survived" not in done.stdout
    [entry] = faults.read_log(log)
    assert entry["point"] == "during_read"
    assert entry["process"] == "sluiceway-worker-3"


def test_probability_zero_and_other_processes_survive(tmp_path: Path) -> None:
    assert _run("sluiceway-worker-0", "during_read:0", tmp_path).stdout == "survived\n"
    assert _run("MainProcess", "during_read:1", tmp_path).stdout == "survived\n"
    assert _run("other", "during_read:1,procs=oth*", tmp_path).returncode == -signal.SIGKILL


def test_max_limits_kills_across_processes(tmp_path: Path) -> None:
    log = tmp_path / "kills.jsonl"
    spec = f"during_read:1,max=2,log={log}"
    codes = [_run("sluiceway-worker-0", spec, tmp_path).returncode for _ in range(4)]
    assert codes == [-signal.SIGKILL, -signal.SIGKILL, 0, 0]
    assert len(faults.read_log(log)) == 2
