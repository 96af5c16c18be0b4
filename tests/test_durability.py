"""``durability``: full fsyncs what local buckets publish, process does not; same results."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest

from sluiceway import Pipeline, Worker
from sluiceway.errors import ConfigError

from .conftest import BRONZE_TO_STAGING
from .helpers import make_csv, parquet_rows


def _run(
    write_pipeline: Callable[[str], Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    durability: str | None,
) -> tuple[list[dict[str, str]], int]:
    """Rows of the Parquet output and the fsyncs made, for a put and its processing."""
    header = "" if durability is None else f"durability: {durability}\n"
    pipeline = Pipeline.from_file(write_pipeline(header + BRONZE_TO_STAGING))
    try:
        make_csv(tmp_path / "in.csv", 300, seed=7)
        synced: list[int] = []
        real_fsync = os.fsync

        def counting_fsync(fd: int) -> None:
            synced.append(fd)
            real_fsync(fd)

        monkeypatch.setattr(os, "fsync", counting_fsync)
        pipeline.put(tmp_path / "in.csv", "bronze", "in.csv")
        worker = Worker(pipeline)
        statuses = [o.status for _ in range(20) if pipeline.pending() for o in worker.poll()]
        monkeypatch.setattr(os, "fsync", real_fsync)
        assert statuses == ["done"]
        assert pipeline.pending() == 0
        entry = pipeline.ledger.get(f"csv-to-parquet|bronze/in.csv@{_etag(pipeline)}")
        assert entry is not None and entry.status == "done"
        return parquet_rows(tmp_path / "staging" / "in.parquet"), len(synced)
    finally:
        pipeline.close()


def _etag(pipeline: Pipeline) -> str:
    return pipeline.buckets["bronze"].head("in.csv").etag


def test_default_is_full(write_pipeline: Callable[[str], Path]) -> None:
    assert Pipeline.from_file(write_pipeline(BRONZE_TO_STAGING)).config.durability == "full"


def test_unknown_durability_is_a_config_error(write_pipeline: Callable[[str], Path]) -> None:
    with pytest.raises(ConfigError, match="durability"):
        Pipeline.from_file(write_pipeline("durability: sometimes\n" + BRONZE_TO_STAGING))


@pytest.mark.parametrize("durability", [None, "full", "process"])
def test_same_output_with_or_without_fsync(
    write_pipeline: Callable[[str], Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    durability: str | None,
) -> None:
    rows, fsyncs = _run(write_pipeline, tmp_path, monkeypatch, durability)
    expected = make_csv(tmp_path / "expected.csv", 300, seed=7)
    assert rows == expected
    if durability == "process":
        assert fsyncs == 0
    else:  # the input copied into bronze and the Parquet output, each before it is published
        assert fsyncs == 2
