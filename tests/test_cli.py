"""The CLI as a user runs it: a real subprocess per command."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pyarrow.parquet as pq

from .helpers import make_csv

SLUICEWAY = [sys.executable, "-m", "sluiceway"]


def sw(*args: str, cwd: Path, check: bool = True) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "COLUMNS": "200"}
    proc = subprocess.run(
        [*SLUICEWAY, *args], cwd=cwd, capture_output=True, text=True, timeout=120, env=env
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"sluiceway {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}")
    return proc


def test_validate_ok_and_with_errors(write_pipeline: Callable[..., Path], tmp_path: Path) -> None:
    write_pipeline()
    assert "ok" in sw("validate", cwd=tmp_path).stdout
    bad = (tmp_path / "sluiceway.yaml").read_text().replace("targets: [landed]", "targets: [x]")
    (tmp_path / "bad.yaml").write_text(bad)
    proc = sw("validate", "--pipeline", "bad.yaml", cwd=tmp_path, check=False)
    assert proc.returncode == 2
    assert "bad.yaml:" in proc.stderr and "rules.0.targets.0: unknown target 'x'" in proc.stderr


def test_put_run_drain_status_and_dlq(write_pipeline: Callable[..., Path], tmp_path: Path) -> None:
    write_pipeline()
    records = make_csv(tmp_path / "good.csv", 40)
    (tmp_path / "bad.csv").write_bytes(b"")
    out = sw("put", "good.csv", "bronze/in/good.csv", cwd=tmp_path).stdout
    assert "bronze/in/good.csv" in out and "landed" in out
    sw("put", "bad.csv", "bronze/in/bad.csv", cwd=tmp_path)

    summary = json.loads(sw("run", "--drain", "--json", "--workers", "1", cwd=tmp_path).stdout)
    assert summary["done"] == 1 and summary["rows_out"] == 40
    assert summary["dead_lettered"] == 1
    assert pq.read_table(tmp_path / "staging" / "in" / "good.parquet").num_rows == len(records)

    status = json.loads(sw("status", "--json", cwd=tmp_path).stdout)
    assert status["queues"]["to-parquet"] == {
        "visible": 0,
        "in_flight": 0,
        "delayed": 0,
        "dead_lettered": 1,
        "is_dlq": False,
    }
    fn = status["functions"]["csv-to-parquet"]
    assert (fn["processed"], fn["failed"]) == (1, 1)
    assert fn["counters"]["rows_in"] == fn["counters"]["rows_out"] == 40
    assert fn["bytes_in"] == (tmp_path / "good.csv").stat().st_size
    assert fn["latency_p50"] is not None and fn["latency_p50"] > 0
    text = sw("status", cwd=tmp_path).stdout
    assert "to-parquet" in text and "latency p99" in text

    traced = json.loads(sw("trace", "bronze/in/good.csv", "--json", cwd=tmp_path).stdout)
    assert len(traced["versions"]) == 1
    [processing] = traced["processing"]
    assert processing["status"] == "done" and processing["attempts"] == 1
    assert processing["info"]["outputs"][0]["key"] == "in/good.parquet"
    text = sw("trace", "bronze/in/bad.csv", cwd=tmp_path).stdout
    assert "failed after 3 attempt(s)" in text and "empty file" in text
    assert "dead-lettered in to-parquet-dlq" in text
    assert sw("trace", "bronze/nothing.csv", cwd=tmp_path, check=False).returncode == 1

    dead = json.loads(sw("dlq", "list", "to-parquet", "--json", cwd=tmp_path).stdout)
    assert len(dead) == 1
    assert "bronze/in/bad.csv" in dead[0]["failure"]["message"]
    assert "empty" in dead[0]["failure"]["message"]
    shown = sw("dlq", "show", "to-parquet", dead[0]["id"], cwd=tmp_path).stdout
    assert '"error_type": "InputError"' in shown and "Traceback (most recent call last)" in shown
    assert "bronze/in/bad.csv" in sw("dlq", "list", "to-parquet", cwd=tmp_path).stdout
    assert sw("dlq", "show", "to-parquet", "nope", cwd=tmp_path, check=False).returncode == 1

    # Fix the file in place, redrive: it is the same event (same version id),
    # so the worker reads the object as it is now.
    make_csv(tmp_path / "bronze" / "in" / "bad.csv", 5)
    assert "redrove 1" in sw("dlq", "redrive", "to-parquet", cwd=tmp_path).stdout
    summary = json.loads(
        sw("run", "--drain", "--json", "--workers", "0", "--no-watch", cwd=tmp_path).stdout
    )
    assert summary["done"] >= 1
    assert (tmp_path / "staging" / "in" / "bad.parquet").exists()
    assert "purged 0" in sw("dlq", "purge", "to-parquet", "--yes", cwd=tmp_path).stdout


def test_put_to_unknown_bucket_is_a_clear_error(
    write_pipeline: Callable[..., Path], tmp_path: Path
) -> None:
    write_pipeline()
    make_csv(tmp_path / "a.csv", 1)
    proc = sw("put", "a.csv", "silver/a.csv", cwd=tmp_path, check=False)
    assert proc.returncode == 2
    assert "unknown bucket 'silver'" in proc.stderr
