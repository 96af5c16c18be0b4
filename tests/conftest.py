"""Shared fixtures: a pipeline in a temporary directory, and the conformance data."""

from __future__ import annotations

import os
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from sluiceway import Pipeline

from .services import S3Endpoint, moto_reset, moto_server, seaweedfs

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
CONFORMANCE = SHARED / "conformance"
REQUIRE_SERVICES = os.environ.get("SLUICEWAY_REQUIRE_SERVICES") == "1"


def conformance_dir(name: str) -> Path:
    """A folder of ../shared/conformance, read in place; skip (or fail in CI) if absent."""
    path = CONFORMANCE / name
    if not path.is_dir():
        msg = f"conformance data {path} not found (it lives beside the checkout in ../shared)"
        if REQUIRE_SERVICES:
            pytest.fail(msg)
        pytest.skip(msg)
    return path


BRONZE_TO_STAGING = """
pipeline: test
buckets:
  bronze: ./bronze
  staging: ./staging
topics:
  landed: {subscriptions: [to-parquet]}
queues:
  to-parquet:
    visibility_timeout: 30s
    max_receive_count: 3
    backoff_base: 0.01s
    backoff_max: 0.05s
rules:
  - name: new-csv
    pattern:
      detail-type: [Object Created]
      detail:
        bucket: {name: [bronze]}
        object: {key: [{suffix: .csv}]}
    targets: [landed]
functions:
  csv-to-parquet:
    queue: to-parquet
    steps:
      - read_csv
      - write_parquet: {bucket: staging}
"""


@pytest.fixture(scope="session")
def s3_endpoint(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Endpoint]:
    """A SeaweedFS S3 endpoint on loopback for the whole test session."""
    with seaweedfs(tmp_path_factory.mktemp("seaweedfs")) as endpoint:
        yield endpoint


@pytest.fixture(scope="session")
def moto_url() -> Iterator[str]:
    """A moto server (AWS APIs) on loopback for the whole session."""
    with moto_server() as url:
        yield url


@pytest.fixture
def aws(moto_url: str, monkeypatch: pytest.MonkeyPatch) -> str:
    """A freshly reset moto server, with dummy credentials in the environment."""
    moto_reset(moto_url)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    return moto_url


@pytest.fixture
def write_pipeline(tmp_path: Path) -> Callable[[str], Path]:
    def write(text: str = BRONZE_TO_STAGING, name: str = "sluiceway.yaml") -> Path:
        path = tmp_path / name
        path.write_text(textwrap.dedent(text))
        return path

    return write


@pytest.fixture
def pipeline(write_pipeline: Callable[[str], Path]) -> Pipeline:
    p = Pipeline.from_file(write_pipeline(BRONZE_TO_STAGING))
    yield p
    p.close()
