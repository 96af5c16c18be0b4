"""The runnable examples, run as a user runs them, checked by their results."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq

from sluiceway import Pipeline

ROOT = Path(__file__).resolve().parents[1]


def run_demo(name: str, tmp_path: Path) -> tuple[Path, str]:
    """Copy the example aside (so the checkout stays clean) and run its demo.sh."""
    work = tmp_path / name
    shutil.copytree(
        ROOT / "examples" / name, work, ignore=shutil.ignore_patterns("data", ".sluiceway")
    )
    env = {
        **os.environ,
        "SLUICEWAY": str(Path(sys.executable).parent / "sluiceway"),
        "COLUMNS": "200",
    }
    proc = subprocess.run(
        ["bash", str(work / "demo.sh")], capture_output=True, text=True, timeout=300, env=env
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return work, proc.stdout


def test_bronze_to_staging_demo(tmp_path: Path) -> None:
    work, out = run_demo("bronze-to-staging", tmp_path)
    assert "3 inputs processed, 700 rows in, 700 rows out" in out
    staging = work / "data" / "staging" / "incoming"
    assert sorted(p.name for p in staging.glob("*.parquet")) == [
        "customers_2026-11-20.parquet",
        "customers_2026-11-21.parquet",
        "customers_2026-11-22.parquet",
    ]
    assert sum(pq.read_metadata(p).num_rows for p in staging.glob("*.parquet")) == 700
    assert "legacy_export.csv" in out and "invalid UTF-8" in out  # in the DLQ, with why


def test_partner_csv_to_json_demo(tmp_path: Path) -> None:
    work, out = run_demo("partner-csv-to-json", tmp_path)
    assert "2 inputs processed, 122 rows in, 116 rows out, 6 rejected" in out
    p = Pipeline.from_file(work / "sluiceway.yaml")
    customers = p.tables["customers"]
    assert customers.count() == 96
    assert customers.get(2)["name"] == "Ana Müller-Schmidt"  # day two's update won
    rows = [json.loads(m.body) for m in p.broker.queue("customer-rows").peek(1000)]
    assert len(rows) == 116
    assert len({(r["source"], r["row"]) for r in rows}) == 116  # no duplicates
    summaries = [json.loads(m.body) for m in p.broker.queue("file-summaries").peek(10)]
    assert sorted(s["stats"]["rows_rejected"] for s in summaries) == [3, 3]
    errors = [json.loads(m.body) for m in p.broker.queue("partner-errors").peek(100)]
    assert sorted((e["input"].rsplit("_", 1)[1], e["line"], e["column"]) for e in errors) == [
        ("2026-11-23.csv", 7, "email"),
        ("2026-11-23.csv", 19, "country"),
        ("2026-11-23.csv", 32, "signup_date"),
        ("2026-11-24.csv", 5, "lifetime_value"),
        ("2026-11-24.csv", 14, "customer_id"),
        ("2026-11-24.csv", 21, None),
    ]
    rejects = work / "data" / "quarantine" / "_rejected" / "partner-a"
    lines = (rejects / "customers_2026-11-24.csv.jsonl").read_text().splitlines()
    assert [json.loads(x)["reason"] for x in lines][2] == "expected 7 fields, got 8"
    for s in summaries:  # rows in = rows out + rows rejected, per file
        st = s["stats"]
        assert st["rows_in"] == st["rows_out"] + st["rows_rejected"]
