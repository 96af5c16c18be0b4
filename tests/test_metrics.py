"""Quality metrics: from the ledger to `status`, Prometheus text and `trace`."""

from __future__ import annotations

from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from sluiceway import Pipeline
from sluiceway.metrics import function_metrics, percentile, prometheus_text, trace

from .helpers import make_csv
from .test_pipeline_e2e import drain_inline


def test_percentiles() -> None:
    values = sorted(float(i) for i in range(1, 101))
    assert percentile(values, 0.5) == 50.0
    assert percentile(values, 0.99) == 99.0
    assert percentile([], 0.5) is None
    assert percentile([3.0], 0.99) == 3.0


def test_metrics_count_rows_bytes_and_latency(pipeline: Pipeline, tmp_path: Path) -> None:
    sizes = {}
    for i in range(4):
        make_csv(tmp_path / f"{i}.csv", 10 * (i + 1), seed=i)
        sizes[i] = (tmp_path / f"{i}.csv").stat().st_size
        pipeline.put(tmp_path / f"{i}.csv", "bronze", f"{i}.csv")
    (tmp_path / "bad.csv").write_bytes(b"")
    pipeline.put(tmp_path / "bad.csv", "bronze", "bad.csv")
    drain_inline(pipeline, rounds=1000)
    m = function_metrics(pipeline)["csv-to-parquet"]
    assert m.statuses == {"done": 4, "failed": 1}
    assert m.counters["rows_in"] == m.counters["rows_out"] == 100
    assert m.bytes_in == sum(sizes.values())
    assert len(m.latencies) == 4 and 0 < m.latency_p50 <= m.latency_p99 < 60

    families = {
        f.name: f for f in text_string_to_metric_families(prometheus_text(pipeline).decode())
    }
    rows = {
        s.labels["kind"]: s.value
        for s in families["sluiceway_rows"].samples
        if s.name == "sluiceway_rows_total"
    }
    assert rows["rows_in"] == 100
    inputs = {
        s.labels["status"]: s.value
        for s in families["sluiceway_inputs"].samples
        if s.name == "sluiceway_inputs_total"
    }
    assert inputs == {"done": 4, "failed": 1}
    depth = {
        (s.labels["queue"], s.labels["state"]): s.value
        for s in families["sluiceway_queue_messages"].samples
    }
    assert depth[("to-parquet-dlq", "visible")] == 1
    count = next(
        s.value for s in families["sluiceway_latency_seconds"].samples if s.name.endswith("_count")
    )
    assert count == 4

    t = trace(pipeline, "bronze", "bad.csv")
    assert [e["status"] for e in t["processing"]] == ["failed"]
    assert [m["queue"] for m in t["messages"]] == ["to-parquet-dlq"]
