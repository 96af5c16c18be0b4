"""Profiles: the same pipeline file on other backends, secrets only from the environment."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from sluiceway import Pipeline
from sluiceway.backends import redact
from sluiceway.config import ConfigError, load

from .conftest import BRONZE_TO_STAGING

PROFILES = """
profiles:
  prod:
    buckets:
      bronze: s3://dl-bronze?endpoint_url=http://127.0.0.1:1
    broker: redis://127.0.0.1:6379/0
    ledger: postgresql://app:${PGPASS}@127.0.0.1:5432/test
  local-dirs:
    buckets:
      staging: ./elsewhere
"""


def test_profile_picks_urls_and_expands_env(
    write_pipeline: Callable[..., Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    path = write_pipeline(BRONZE_TO_STAGING + PROFILES)
    monkeypatch.setenv("PGPASS", "s3cret")
    cfg = load(path, "prod")
    assert cfg.profile == "prod"
    assert cfg.bucket_url("bronze").startswith("s3://dl-bronze")
    assert cfg.bucket_url("staging") == "./staging"  # not overridden
    assert cfg.backends.broker == "redis://127.0.0.1:6379/0"
    assert load(path).profile is None  # no profile: the embedded default


def test_profile_from_environment_variable(
    write_pipeline: Callable[..., Path], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    path = write_pipeline(BRONZE_TO_STAGING + PROFILES)
    monkeypatch.setenv("SLUICEWAY_PROFILE", "local-dirs")
    p = Pipeline.from_file(path)
    assert p.config.profile == "local-dirs"
    assert p.buckets["staging"].root == tmp_path / "elsewhere"  # type: ignore[attr-defined]
    assert p.embedded


def test_unknown_profile_and_missing_variable(
    write_pipeline: Callable[..., Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    path = write_pipeline(BRONZE_TO_STAGING + PROFILES)
    with pytest.raises(
        ConfigError, match=r"unknown profile 'staging' \(profiles: local-dirs, prod\)"
    ):
        load(path, "staging")
    monkeypatch.delenv("PGPASS", raising=False)
    with pytest.raises(ConfigError, match="needs environment variables: PGPASS"):
        load(path, "prod")


def test_a_password_in_the_file_is_refused(write_pipeline: Callable[..., Path]) -> None:
    text = BRONZE_TO_STAGING + PROFILES.replace("${PGPASS}", "hunter2")
    with pytest.raises(ConfigError) as e:
        load(write_pipeline(text))
    [problem] = e.value.problems
    assert "profiles.prod.ledger" in problem and "${VARIABLE}" in problem
    assert "hunter2" not in problem


def test_profiles_yaml_beside_the_pipeline(
    write_pipeline: Callable[..., Path], tmp_path: Path
) -> None:
    path = write_pipeline(BRONZE_TO_STAGING)
    (tmp_path / "profiles.yaml").write_text("ci:\n  buckets:\n    staging: ./ci-staging\n")
    assert load(path, "ci").bucket_url("staging") == "./ci-staging"
    (tmp_path / "profiles.yaml").write_text("ci:\n  buckets:\n    silver: ./x\n")
    with pytest.raises(ConfigError, match=r"profiles\.yaml:.*unknown bucket 'silver'"):
        load(path, "ci")


def test_unknown_scheme_is_named_before_anything_runs(
    write_pipeline: Callable[..., Path],
) -> None:
    text = BRONZE_TO_STAGING + "profiles:\n  odd:\n    broker: kafka://127.0.0.1:9092\n"
    p = Pipeline.from_file(write_pipeline(text), "odd")
    with pytest.raises(
        ConfigError, match=r"broker 'kafka://127.0.0.1:9092': unknown scheme 'kafka'"
    ):
        _ = p.broker


def test_redact_hides_passwords() -> None:
    assert redact("amqp://guest:guest@127.0.0.1:5672/") == "amqp://guest:***@127.0.0.1:5672/"
    assert redact("redis://127.0.0.1:6379/0") == "redis://127.0.0.1:6379/0"
