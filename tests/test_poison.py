"""Poison input: raising, hanging and process-killing functions end in the DLQ
with their reason, while other messages keep flowing."""

from __future__ import annotations

import json
import textwrap
from collections.abc import Callable
from pathlib import Path

from sluiceway import Pipeline, Runtime

USER_MODULE = """
import os
import time

def behave(event, ctx):
    name = event.key.rsplit("/", 1)[-1]
    if name.startswith("raise"):
        raise ValueError(f"cannot handle {name}")
    if name.startswith("hang"):
        time.sleep(120)
    if name.startswith("exit"):
        os._exit(3)
    out = ctx.bucket("out")
    with out.open_write(name + ".done") as f:
        f.write(b"ok")
"""

PIPELINE = """
pipeline: poison
buckets:
  in: ./in
  out: ./out
queues:
  work:
    visibility_timeout: 60s
    max_receive_count: 2
    backoff_base: 0.05s
    backoff_max: 0.1s
rules:
  - name: all
    pattern: {{detail: {{bucket: {{name: [in]}}}}}}
    targets: [work]
functions:
  behave:
    queue: work
    handler: poison_{n}:behave
    timeout: 1s
"""


def test_poison_messages_are_dead_lettered_with_their_reason(
    write_pipeline: Callable[..., Path], tmp_path: Path
) -> None:
    n = tmp_path.name.replace("-", "_")
    (tmp_path / f"poison_{n}.py").write_text(textwrap.dedent(USER_MODULE))
    path = write_pipeline(PIPELINE.format(n=n))
    p = Pipeline.from_file(path)
    names = ["raise.txt", "hang.txt", "exit.txt"] + [f"good{i}.txt" for i in range(10)]
    for name in names:
        (tmp_path / name).write_text(name)
        p.put(tmp_path / name, "in", name)

    rt = Runtime(path, workers=2, watch=False, grace=5)
    summary = rt.drain(timeout=90)
    assert summary.done == 10
    assert sorted(o.key for o in p.buckets["out"].list()) == sorted(
        f"good{i}.txt.done" for i in range(10)
    )
    dead = {
        json.loads(m.body)["detail"]["object"]["key"]: m.failure
        for m in p.broker.queue("work-dlq").peek()
    }
    assert set(dead) == {"raise.txt", "hang.txt", "exit.txt"}
    assert dead["raise.txt"]["error_type"] == "ValueError"
    assert "cannot handle raise.txt" in dead["raise.txt"]["message"]
    assert dead["hang.txt"]["error_type"] == "FunctionTimeout"
    assert "timeout of 1s" in dead["hang.txt"]["message"]
    assert dead["exit.txt"]["error_type"] == "WorkerDied"
    assert "exit code 3" in dead["exit.txt"]["message"]
    assert rt.restarts == 2  # the exit.txt worker died on each of its two receives
    assert p.function_status()["behave"] == {"done": 10, "failed": 3}
