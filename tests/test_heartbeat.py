"""A message whose work outlasts the visibility timeout is not handed to a second
worker while the first is alive (the heartbeat), but is once the first dies."""

from __future__ import annotations

import textwrap
from collections.abc import Callable
from pathlib import Path

from sluiceway import Pipeline, Runtime

USER_MODULE = """
import time

def slow(event, ctx):
    time.sleep(2.5)  # far past the 0.6s visibility timeout
    with ctx.bucket("out").open_write(event.key) as f:
        f.write(b"done")
"""

PIPELINE = """
pipeline: heartbeat
buckets:
  in: ./in
  out: ./out
queues:
  work: {{visibility_timeout: 0.6s, max_receive_count: 2}}
rules:
  - name: all
    pattern: {{detail: {{bucket: {{name: [in]}}}}}}
    targets: [work]
functions:
  slow:
    queue: work
    handler: hb_{n}:slow
"""


def test_long_work_is_not_given_to_a_second_worker(
    write_pipeline: Callable[..., Path], tmp_path: Path
) -> None:
    n = tmp_path.name.replace("-", "_")
    (tmp_path / f"hb_{n}.py").write_text(textwrap.dedent(USER_MODULE))
    path = write_pipeline(PIPELINE.format(n=n))
    p = Pipeline.from_file(path)
    for i in range(2):
        (tmp_path / f"job{i}").write_text("x")
        p.put(tmp_path / f"job{i}", "in", f"job{i}")
    summary = Runtime(path, workers=2, watch=False).drain(timeout=60)
    assert summary.done == 2
    for i in range(2):
        entry = p.ledger.get(f"slow|in/job{i}@{p.buckets['in'].head(f'job{i}').etag}")
        assert entry is not None and entry.status == "done"
        assert entry.attempts == 1 and entry.info["attempt"] == 1  # received once
    assert p.broker.queue("work-dlq").peek() == []
