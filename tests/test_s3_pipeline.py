"""bronze → staging with both buckets on S3 (SeaweedFS), queues and ledger embedded.

Another program drops CSV files into S3 with boto3; nothing tells Sluiceway,
so the poller has to find them. Each test checks the promises on S3: every
version processed once, a file that arrives while nothing runs found on the
next start, a changed object processed again, and the Parquet in the staging
bucket holds exactly the CSV's rows.
"""

from __future__ import annotations

import io
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest

from sluiceway import Pipeline, Runtime
from sluiceway.buckets.s3 import S3Bucket
from sluiceway.poller import BucketPoller

from .conftest import BRONZE_TO_STAGING
from .helpers import make_csv, wait_until
from .s3_backend import client_for, create_bucket, s3_url, use_endpoint_credentials
from .services import S3Endpoint


def rows_of(table: Any) -> list[dict[str, str]]:
    """Parquet rows with every value as the string the CSV had (as helpers.parquet_rows)."""
    return [
        {
            k: (f"{v:.2f}" if isinstance(v, float) else str(v)) if v is not None else ""
            for k, v in row.items()
        }
        for row in table.to_pylist()
    ]


class S3Scenario:
    """A pipeline whose bronze and staging buckets are fresh S3 buckets."""

    def __init__(self, endpoint: S3Endpoint, bronze: str, staging: str, path: Path) -> None:
        self.endpoint = endpoint
        self.bronze = bronze
        self.staging = staging
        self.path = path
        self.s3 = client_for(endpoint)  # "another program"

    def drop_csv(self, tmp: Path, key: str, rows: int, seed: int) -> list[dict[str, str]]:
        records = make_csv(tmp / f"src-{seed}.csv", rows, seed=seed)
        self.s3.put_object(Bucket=self.bronze, Key=key, Body=(tmp / f"src-{seed}.csv").read_bytes())
        return records

    def staged(self, key: str) -> list[dict[str, str]]:
        body = self.s3.get_object(Bucket=self.staging, Key=key)["Body"].read()
        return rows_of(pq.read_table(io.BytesIO(body)))

    def staged_keys(self) -> list[str]:
        listing = self.s3.list_objects_v2(Bucket=self.staging)
        return [o["Key"] for o in listing.get("Contents", ())]


@pytest.fixture
def scenario(
    request: pytest.FixtureRequest,
    s3_endpoint: S3Endpoint,
    monkeypatch: pytest.MonkeyPatch,
    write_pipeline: Callable[..., Path],
) -> S3Scenario:
    use_endpoint_credentials(s3_endpoint, monkeypatch)
    bronze = create_bucket(request, s3_endpoint, "bronze")
    staging = create_bucket(request, s3_endpoint, "staging")
    profile = (
        "discovery:\n"
        "  poll_interval: 100ms\n"
        "profiles:\n"
        "  s3:\n"
        "    buckets:\n"
        f"      bronze: {s3_url(s3_endpoint, bronze)}\n"
        f"      staging: {s3_url(s3_endpoint, staging)}\n"
    )
    path = write_pipeline(BRONZE_TO_STAGING + profile)
    # Worker processes inherit the environment: the same profile, the same credentials.
    monkeypatch.setenv("SLUICEWAY_PROFILE", "s3")
    return S3Scenario(s3_endpoint, bronze, staging, path)


def test_poller_finds_objects_and_parquet_lands_in_s3(scenario: S3Scenario, tmp_path: Path) -> None:
    records = scenario.drop_csv(tmp_path, "incoming/customers.csv", 300, seed=1)
    summary = Runtime(scenario.path, workers=0).drain(timeout=60)
    assert (summary.done, summary.rows_in, summary.rows_out) == (1, 300, 300)
    assert scenario.staged_keys() == ["incoming/customers.parquet"]
    assert scenario.staged("incoming/customers.parquet") == records

    p = Pipeline.from_file(scenario.path)
    assert isinstance(p.buckets["bronze"], S3Bucket) and isinstance(p.buckets["staging"], S3Bucket)
    # A second poll raises nothing: not for the input, not for the output the worker wrote.
    assert BucketPoller(p, "bronze").poll().raised == []
    assert BucketPoller(p, "staging").poll().raised == []
    assert p.pending() == 0
    p.close()


def test_found_on_restart_and_changed_objects_processed_again(
    scenario: S3Scenario, tmp_path: Path
) -> None:
    first = scenario.drop_csv(tmp_path, "a.csv", 50, seed=2)
    assert Runtime(scenario.path, workers=0).drain(timeout=60).done == 1
    assert scenario.staged("a.parquet") == first

    # Arrives while nothing runs. No reconcile this time: the durable watermark
    # and the poller alone must find it on the next start.
    late = scenario.drop_csv(tmp_path, "0-sorts-first.csv", 20, seed=3)
    summary = Runtime(scenario.path, workers=0, reconcile=False).drain(timeout=60)
    assert (summary.done, summary.inputs) == (1, ["bronze/0-sorts-first.csv"])
    assert scenario.staged("0-sorts-first.parquet") == late

    # New content under the same key: a new ETag, a new version, processed again.
    changed = scenario.drop_csv(tmp_path, "a.csv", 70, seed=4)
    summary = Runtime(scenario.path, workers=0, reconcile=False).drain(timeout=60)
    assert (summary.done, summary.rows_out) == (1, 70)
    assert scenario.staged("a.parquet") == changed

    # And a run with nothing new does nothing.
    assert Runtime(scenario.path, workers=0).drain(timeout=60).done == 0


def test_a_running_pipeline_polls_on_its_interval(scenario: S3Scenario, tmp_path: Path) -> None:
    # One worker process: it builds its own S3 buckets from the profile and the
    # AWS variables it inherits, exactly as `sluiceway run` does.
    rt = Runtime(scenario.path, workers=1, grace=5)
    runner = threading.Thread(target=rt.run_forever, name="runtime")
    runner.start()
    try:
        records = scenario.drop_csv(tmp_path, "live/x.csv", 40, seed=5)
        wait_until(lambda: "live/x.parquet" in scenario.staged_keys(), 30, "the Parquet output")
        assert scenario.staged("live/x.parquet") == records
    finally:
        rt._stop.set()
        runner.join(30)
    assert not runner.is_alive()
