"""Fixtures for the fault suite: the report it writes, and a reaper that kills
every process a test started, on every path out of the test."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
from collections.abc import Iterator
from multiprocessing.process import BaseProcess

import pytest

from .harness import Report, group_members


@pytest.fixture(scope="session")
def reliability_report() -> Iterator[Report]:
    """Collects one row per run; writes docs/reliability.md when the session ends."""
    report = Report()
    yield report
    if report.runs:
        report.write()


class Reaper:
    """Remembers process groups and worker processes; kills what is left."""

    def __init__(self) -> None:
        self.groups: list[subprocess.Popen[bytes]] = []
        self.procs: list[BaseProcess] = []

    def group(self, proc: subprocess.Popen[bytes]) -> subprocess.Popen[bytes]:
        self.groups.append(proc)
        return proc

    def proc(self, proc: BaseProcess) -> BaseProcess:
        self.procs.append(proc)
        return proc

    def reap(self) -> None:
        for popen in self.groups:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(popen.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                popen.wait(10)
            for pid in group_members(popen.pid):  # whatever left the group leader behind
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        for p in self.procs:
            with contextlib.suppress(Exception):
                if p.exitcode is None:
                    p.kill()
                p.join(10)


@pytest.fixture
def reaper() -> Iterator[Reaper]:
    r = Reaper()
    try:
        yield r
    finally:
        r.reap()
