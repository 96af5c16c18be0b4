"""SIGTERM lets in-flight work finish within the grace period, then hands the
rest back to the queue; nothing is lost either way."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path

import pytest

from sluiceway import Pipeline
from sluiceway.activity import Activity

from .helpers import wait_until

PIPELINE = """
pipeline: slow
buckets:
  in: ./in
  out: ./out
queues:
  work: {{visibility_timeout: 60s}}
rules:
  - name: all
    pattern: {{detail: {{bucket: {{name: [in]}}}}}}
    targets: [work]
functions:
  slow:
    queue: work
    handler: slow_{n}:slow
"""

USER_MODULE = """
import time

def slow(event, ctx):
    time.sleep(float(ctx.bucket("in").read_bytes(event.key)))
    with ctx.bucket("out").open_write(event.key) as f:
        f.write(b"done")
"""


def start(path: Path, grace: float) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "sluiceway",
            "run",
            "--pipeline",
            str(path),
            "--workers",
            "1",
            "--grace",
            str(grace),
            "--no-watch",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )


@pytest.mark.parametrize(("sleep", "grace", "finished"), [(1.0, 20.0, True), (60.0, 0.5, False)])
def test_sigterm(
    write_pipeline: Callable[..., Path], tmp_path: Path, sleep: float, grace: float, finished: bool
) -> None:
    n = tmp_path.name.replace("-", "_")
    (tmp_path / f"slow_{n}.py").write_text(textwrap.dedent(USER_MODULE))
    path = write_pipeline(PIPELINE.format(n=n))
    p = Pipeline.from_file(path)
    (tmp_path / "job").write_text(str(sleep))
    p.put(tmp_path / "job", "in", "job")
    proc = start(path, grace)
    try:
        activity = Activity(p.db)
        wait_until(lambda: len(activity.all()) == 1, 60, "the worker to take the message")
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
    assert proc.returncode == 0, out
    assert "stopped" in out
    counts = p.broker.queue("work").counts()
    if finished:
        assert (tmp_path / "out" / "job").read_text() == "done"
        assert p.function_status()["slow"] == {"done": 1}
        assert counts.visible + counts.in_flight == 0
    else:
        # Handed back: visible again now, not after the 60s visibility timeout.
        assert not (tmp_path / "out" / "job").exists()
        assert counts.visible == 1 and counts.in_flight == 0
        [msg] = p.broker.queue("work").peek()
        assert msg.receive_count == 1
    assert activity.all() == []
