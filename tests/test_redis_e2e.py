"""Bronze → staging with queues and ledger in Redis: the same pipeline file, another profile.

Worker processes build their own Pipeline from the file and the profile, so
this checks what one machine's SQLite cannot: every worker sees one queue
and one ledger through the network, and each input is processed once.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from sluiceway import Pipeline, Runtime

from .conftest import BRONZE_TO_STAGING
from .helpers import make_csv, parquet_rows
from .redis_backend import fresh_prefix, redis_url


@pytest.fixture
def redis_pipeline(
    request: pytest.FixtureRequest,
    write_pipeline: Callable[..., Path],
    monkeypatch: pytest.MonkeyPatch,
) -> Path:
    """The bronze → staging pipeline with a ``redis`` profile on a fresh key prefix."""
    url = redis_url(fresh_prefix(request))
    # Runtime(profile=…) exports SLUICEWAY_PROFILE for its workers: set it here
    # so monkeypatch restores the environment for the tests that follow.
    monkeypatch.setenv("SLUICEWAY_PROFILE", "redis")
    profile = f'\nprofiles:\n  redis:\n    broker: "{url}"\n    ledger: "{url}"\n'
    return write_pipeline(BRONZE_TO_STAGING + profile)


def _inputs(tmp_path: Path, pipeline: Pipeline, n: int, rows: int) -> dict[str, list[Any]]:
    expected = {}
    for i in range(n):
        src = tmp_path / "in" / f"f{i}.csv"
        expected[f"f{i}"] = make_csv(src, rows, seed=i)
        if i % 2:  # half put while nothing runs, half found by the start-up reconcile
            pipeline.put(src, "bronze", f"f{i}.csv")
        else:
            (tmp_path / "bronze").mkdir(exist_ok=True)
            (tmp_path / "bronze" / f"f{i}.csv").write_bytes(src.read_bytes())
    return expected


def _check_exactly_once(
    tmp_path: Path, p: Pipeline, expected: dict[str, list[Any]], summary: Any
) -> None:
    assert summary.done == len(expected), summary
    assert Counter(summary.inputs) == Counter(f"bronze/f{i}.csv" for i in range(len(expected)))
    for stem, records in expected.items():
        assert parquet_rows(tmp_path / "staging" / f"{stem}.parquet") == records
    assert sorted(o.key for o in p.buckets["staging"].list()) == sorted(
        f"{stem}.parquet" for stem in expected
    )
    assert p.function_status() == {"csv-to-parquet": {"done": len(expected)}}
    entries = p.ledger.entries_since(0)
    assert len(entries) == len(expected)
    assert all(e.attempts == 1 for e in entries), [(e.key, e.attempts) for e in entries]
    status = p.status()["queues"]
    assert status["to-parquet"] == {
        "visible": 0,
        "in_flight": 0,
        "delayed": 0,
        "dead_lettered": 0,
        "is_dlq": False,
    }


def test_bronze_to_staging_on_redis_with_two_workers(redis_pipeline: Path, tmp_path: Path) -> None:
    p = Pipeline.from_file(redis_pipeline, profile="redis")
    assert not p.embedded and type(p.broker).__name__ == "RedisBroker"
    expected = _inputs(tmp_path, p, 6, 40)
    summary = Runtime(redis_pipeline, workers=2, watch=False, profile="redis").drain(timeout=60)
    _check_exactly_once(tmp_path, p, expected, summary)
    assert summary.rows_in == summary.rows_out == 6 * 40
    # A second start finds nothing new: the Redis ledger remembers every version.
    again = Runtime(redis_pipeline, workers=0, watch=False, profile="redis").drain(timeout=60)
    assert again.done == 0
    p.broker.close()
    p.ledger.close()
    p.close()


def test_four_worker_processes_process_every_input_once(
    redis_pipeline: Path, tmp_path: Path
) -> None:
    p = Pipeline.from_file(redis_pipeline, profile="redis")
    expected = _inputs(tmp_path, p, 16, 25)
    summary = Runtime(redis_pipeline, workers=4, watch=False, profile="redis").drain(timeout=60)
    _check_exactly_once(tmp_path, p, expected, summary)
    p.broker.close()
    p.ledger.close()
    p.close()
