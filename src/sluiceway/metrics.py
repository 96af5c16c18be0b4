"""Quality metrics per function, computed from the ledger: one source of truth.

Every finished input leaves its counters (rows in, out, rejected, bytes,
latency from the object's creation to the commit) in its ledger entry, so
``status``, ``/metrics`` and ``trace`` all read the same numbers, across
processes and restarts, without a metrics daemon.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, SummaryMetricFamily
from prometheus_client.registry import Collector, CollectorRegistry

from . import health
from .pipeline import Pipeline


def percentile(sorted_values: list[float], q: float) -> float | None:
    """Nearest-rank percentile of an already sorted list."""
    if not sorted_values:
        return None
    rank = max(0, min(len(sorted_values) - 1, math.ceil(q * len(sorted_values)) - 1))
    return sorted_values[rank]


@dataclass
class FunctionMetrics:
    name: str
    statuses: dict[str, int] = field(default_factory=dict)
    counters: dict[str, int] = field(default_factory=dict)
    bytes_in: int = 0
    latencies: list[float] = field(default_factory=list)

    @property
    def latency_p50(self) -> float | None:
        return percentile(self.latencies, 0.50)

    @property
    def latency_p99(self) -> float | None:
        return percentile(self.latencies, 0.99)

    def to_dict(self) -> dict[str, Any]:
        return {
            "processed": self.statuses.get("done", 0),
            "failed": self.statuses.get("failed", 0),
            "skipped": self.statuses.get("skipped", 0),
            "in_progress": self.statuses.get("in_progress", 0),
            "superseded": self.statuses.get("superseded", 0),
            "bytes_in": self.bytes_in,
            "counters": dict(sorted(self.counters.items())),
            "latency_p50": self.latency_p50,
            "latency_p99": self.latency_p99,
        }


def function_metrics(pipeline: Pipeline) -> dict[str, FunctionMetrics]:
    out = {name: FunctionMetrics(name) for name in pipeline.config.functions}
    for name, statuses in pipeline.ledger.function_counts().items():
        out.setdefault(name, FunctionMetrics(name)).statuses = statuses
    for function, info in pipeline.ledger.done_infos():
        m = out.setdefault(function, FunctionMetrics(function))
        for k, v in (info.get("stats") or {}).items():
            if isinstance(v, int):
                m.counters[k] = m.counters.get(k, 0) + v
        m.bytes_in += int(info.get("bytes_in") or 0)
        if info.get("latency") is not None:
            m.latencies.append(float(info["latency"]))
    for m in out.values():
        m.latencies.sort()
    return out


class LedgerCollector(Collector):
    """Prometheus collector reading the pipeline's queues and ledger on each scrape."""

    def __init__(self, pipeline: Pipeline) -> None:
        self.pipeline = pipeline

    def collect(self) -> Iterator[Any]:
        p = self.pipeline
        depth = GaugeMetricFamily(
            "sluiceway_queue_messages", "Messages in a queue by state", labels=["queue", "state"]
        )
        for q in p.queue_status():
            depth.add_metric([q.name, "visible"], q.counts.visible)
            depth.add_metric([q.name, "in_flight"], q.counts.in_flight)
            depth.add_metric([q.name, "delayed"], q.counts.delayed)
        yield depth
        inputs = CounterMetricFamily(
            "sluiceway_inputs", "Inputs by function and final status", labels=["function", "status"]
        )
        rows = CounterMetricFamily(
            "sluiceway_rows", "Rows and events counted by functions", labels=["function", "kind"]
        )
        bytes_in = CounterMetricFamily("sluiceway_input_bytes", "Bytes read", labels=["function"])
        latency = SummaryMetricFamily(
            "sluiceway_latency_seconds",
            "From the event (object created) to the commit",
            labels=["function"],
        )
        for name, m in function_metrics(p).items():
            for status, n in m.statuses.items():
                inputs.add_metric([name, status], n)
            for kind, n in m.counters.items():
                rows.add_metric([name, kind], n)
            bytes_in.add_metric([name], m.bytes_in)
            latency.add_metric([name], len(m.latencies), sum(m.latencies))
        yield inputs
        yield rows
        yield bytes_in
        yield latency
        yield from connection_metrics(health.read(p.db))


def connection_metrics(connections: list[dict[str, Any]]) -> Iterator[Any]:
    """Lost connections (health.py) as metrics: one series per worker, backend and URL."""
    labels = ["worker", "backend", "url"]
    up = GaugeMetricFamily(
        "sluiceway_connection_up",
        "0 while a worker's connection is lost, 1 once back",
        labels=labels,
    )
    attempts = GaugeMetricFamily(
        "sluiceway_connection_failed_attempts",
        "Failed attempts in the current (or the last) outage",
        labels=labels,
    )
    reconnects = CounterMetricFamily(
        "sluiceway_connection_reconnects", "Outages that ended in a reconnect", labels=labels
    )
    for c in connections:
        values = [c["worker"], c["backend"], c["url"]]
        up.add_metric(values, 1 if c["state"] == "ok" else 0)
        attempts.add_metric(values, c["attempts"])
        reconnects.add_metric(values, c["reconnects"])
    yield up
    yield attempts
    yield reconnects


def prometheus_text(pipeline: Pipeline) -> bytes:
    from prometheus_client import generate_latest

    registry = CollectorRegistry()
    registry.register(LedgerCollector(pipeline))
    return generate_latest(registry)


def trace(pipeline: Pipeline, bucket: str, key: str) -> dict[str, Any]:
    """Everything known about one object: its versions' events, attempts, outputs, rejects."""
    versions = pipeline.ledger.versions(bucket, key)
    entries = [
        {
            "function": e.function,
            "version": v["etag"],
            "status": e.status,
            "attempts": e.attempts,
            "info": e.info,
        }
        for v in versions
        for e in pipeline.ledger.entries_for(f"{bucket}/{key}@{v['etag']}")
    ]
    messages = []
    ids = {v["event_id"] for v in versions}
    for name in pipeline.config.all_queue_names():
        for m in pipeline.broker.queue(name).peek(100_000):
            if json.loads(m.body).get("id") in ids:
                messages.append(
                    {
                        "queue": name,
                        "id": m.id,
                        "receive_count": m.receive_count,
                        "failure": m.failure,
                    }
                )
    return {
        "bucket": bucket,
        "key": key,
        "versions": versions,
        "processing": entries,
        "messages": messages,
    }
