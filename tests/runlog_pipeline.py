"""A bronze → table pipeline whose function logs every run, for end-to-end tests on real backends.

Each run of the function appends ``<input> <pid>`` to a run log (O_APPEND:
whole lines from any process), so an input processed twice cannot go
unnoticed; :func:`runs` counts them. The PostgreSQL end-to-end tests and the
connection-health test (Redis and PostgreSQL cut while workers run) use it
with their own queue settings and profile.
"""

from __future__ import annotations

import textwrap
from collections import Counter
from collections.abc import Mapping
from pathlib import Path

import pytest

PIPELINE = """
pipeline: {name}
buckets:
  bronze: ./bronze
tables:
  customers: {{key: [id]}}
queues:
  work: {{{work}}}
rules:
  - name: csv
    pattern: {{detail: {{bucket: {{name: [bronze]}}, object: {{key: [{{suffix: .csv}}]}}}}}}
    targets: [work]
functions:
  load:
    queue: work
    steps:
      - read_csv: {{columns: {{id: int}}}}
      - call: runlog_steps:record_run
      - write_table: {{table: customers}}
profiles:
  {profile}:
{backends}
"""

STEPS = """
import os, time

def record_run(batch, ctx):
    with open(os.environ["SLUICEWAY_TEST_RUNLOG"], "a") as f:
        f.write(f"{ctx.input_name} {os.getpid()}\\n")
    time.sleep(float(os.environ.get("SLUICEWAY_TEST_RUN_SLEEP", "0")))
    return batch
"""


def write_runlog_pipeline(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    *,
    name: str,
    work: str,
    profile: str,
    backends: Mapping[str, str],
    sleep: float = 0.0,
) -> tuple[Path, Path]:
    """Write the pipeline (queue ``work`` with settings ``work``) and its steps; (file, run log).

    Sets ``SLUICEWAY_PROFILE`` to ``profile`` (Runtime exports it for its
    workers; monkeypatch restores it) and where the workers log their runs.
    """
    lines = "\n".join(f'    {kind}: "{url}"' for kind, url in backends.items())
    path = tmp_path / "sluiceway.yaml"
    text = PIPELINE.format(name=name, work=work, profile=profile, backends=lines)
    path.write_text(textwrap.dedent(text))
    (tmp_path / "runlog_steps.py").write_text(STEPS)
    runlog = tmp_path / "runs.log"
    runlog.touch()
    monkeypatch.setenv("SLUICEWAY_PROFILE", profile)
    monkeypatch.setenv("SLUICEWAY_TEST_RUNLOG", str(runlog))
    monkeypatch.setenv("SLUICEWAY_TEST_RUN_SLEEP", str(sleep))
    return path, runlog


def runs(runlog: Path) -> Counter[str]:
    """How often each input was processed, by any worker."""
    return Counter(line.split()[0] for line in runlog.read_text().splitlines())
