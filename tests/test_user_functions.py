"""Users' own Python: batch steps and event handlers, by path or by decorator."""

from __future__ import annotations

import textwrap
from collections.abc import Callable
from pathlib import Path

import pyarrow.parquet as pq

from sluiceway import Pipeline, Runtime

from .helpers import make_csv

USER_MODULE = """
import json

import pyarrow as pa
import pyarrow.compute as pc

import sluiceway


def only_germany(batch: pa.RecordBatch) -> pa.RecordBatch:
    return batch.filter(pc.equal(batch["country"], "DE"))


@sluiceway.step("add_source")
def add_source(batch, ctx):
    keys = pa.array([ctx.event.key] * batch.num_rows)
    return batch.append_column("source_key", keys)


@sluiceway.handler("count-lines")
def count_lines(event, ctx):
    bucket = ctx.bucket(event.bucket)
    with bucket.open_read(event.key) as f:
        lines = sum(1 for _ in f)
    out_key = event.key + ".count.json"
    bucket_out = ctx.bucket("staging")
    with bucket_out.open_write(out_key) as f:
        f.write(json.dumps({"key": event.key, "lines": lines}).encode())
    ctx.outputs.append({"bucket": "staging", "key": out_key, "rows": lines, "bytes": 0})
"""

PIPELINE = """
pipeline: user-code
imports: [usercode_{n}]
buckets:
  bronze: ./bronze
  staging: ./staging
queues:
  to-parquet: {{}}
  counts: {{}}
rules:
  - name: csv
    pattern: {{detail: {{object: {{key: [{{suffix: .csv}}]}}, bucket: {{name: [bronze]}}}}}}
    targets: [to-parquet, counts]
functions:
  filter-and-tag:
    queue: to-parquet
    steps:
      - read_csv
      - call: usercode_{n}:only_germany
      - add_source
      - write_parquet: {{bucket: staging}}
  count:
    queue: counts
    handler: count-lines
"""


def test_batch_steps_and_handlers(write_pipeline: Callable[..., Path], tmp_path: Path) -> None:
    n = tmp_path.name.replace("-", "_")  # a module name unique to this test run
    (tmp_path / f"usercode_{n}.py").write_text(textwrap.dedent(USER_MODULE))
    path = write_pipeline(PIPELINE.format(n=n))
    records = make_csv(tmp_path / "in.csv", 300)
    Pipeline.from_file(path).put(tmp_path / "in.csv", "bronze", "in.csv")
    summary = Runtime(path, workers=1, watch=False).drain(timeout=120)
    assert summary.done == 2
    table = pq.read_table(tmp_path / "staging" / "in.parquet")
    german = [r for r in records if r["country"] == "DE"]
    assert table.num_rows == len(german) > 0
    assert set(table.column("source_key").to_pylist()) == {"in.csv"}
    assert table.column("id").to_pylist() == [int(r["id"]) for r in german]
    counted = (tmp_path / "staging" / "in.csv.count.json").read_text()
    assert '"lines": ' in counted
