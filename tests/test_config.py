"""Every mistake in a pipeline file is reported before anything runs, with its line."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from sluiceway.config import ConfigError, load, loads, parse_duration

from .conftest import BRONZE_TO_STAGING


def problems(text: str) -> list[str]:
    with pytest.raises(ConfigError) as exc:
        loads(textwrap.dedent(text), source="p.yaml")
    return exc.value.problems


def test_the_example_pipeline_loads() -> None:
    cfg = loads(BRONZE_TO_STAGING)
    assert cfg.pipeline == "test"
    assert cfg.queue_config("to-parquet").visibility_timeout == 30
    assert cfg.dead_letter_queue("to-parquet") == "to-parquet-dlq"
    assert cfg.all_queue_names() == ["to-parquet", "to-parquet-dlq"]


def test_unknown_bucket_in_a_rule_names_line_and_key() -> None:
    text = BRONZE_TO_STAGING.replace("name: [bronze]", "name: [bronz]")
    [p] = problems(text)
    line = next(i for i, s in enumerate(textwrap.dedent(text).splitlines(), 1) if "bronz]" in s)
    assert p.startswith(f"p.yaml:{line}: rules.0.pattern.detail.bucket.name.0: unknown bucket")


def test_unknown_target_queue() -> None:
    [p] = problems(BRONZE_TO_STAGING.replace("targets: [landed]", "targets: [nowhere]"))
    assert "rules.0.targets.0: unknown target 'nowhere'" in p


def test_bad_pattern_is_rejected_with_its_path() -> None:
    [p] = problems(BRONZE_TO_STAGING.replace("{suffix: .csv}", "{suffix: 5}"))
    assert "rules.0.pattern.detail.object.key" in p
    assert "invalid event pattern" in p


def test_wrong_types_and_unknown_keys_are_all_reported_at_once() -> None:
    text = BRONZE_TO_STAGING.replace("max_receive_count: 3", "max_receive_count: lots").replace(
        "visibility_timeout: 30s", "visibility_timout: 30s"
    )
    ps = problems(text)
    assert any("queues.to-parquet.max_receive_count" in p and "integer" in p for p in ps)
    assert any("queues.to-parquet.visibility_timout: unknown key" in p for p in ps)
    assert all(p.startswith("p.yaml:") for p in ps)


def test_unknown_step_and_unknown_output_bucket() -> None:
    ps = problems(
        BRONZE_TO_STAGING.replace("- read_csv\n", "- read_cvs\n").replace(
            "{bucket: staging}", "{bucket: silver}"
        )
    )
    assert any(
        "functions.csv-to-parquet.steps.0" in p and "unknown step 'read_cvs'" in p for p in ps
    )
    assert any("steps.1.write_parquet.bucket: unknown bucket 'silver'" in p for p in ps)


def test_bad_duration_and_bad_yaml() -> None:
    [p] = problems(BRONZE_TO_STAGING.replace("visibility_timeout: 30s", "visibility_timeout: soon"))
    assert "queues.to-parquet.visibility_timeout" in p and "duration" in p
    [p] = problems("pipeline: x\nqueues: {a: [\n")
    assert p.startswith("p.yaml:") and "not valid YAML" in p


def test_topic_subscribing_an_unknown_queue_and_a_queue_feeding_two_functions() -> None:
    text = BRONZE_TO_STAGING.replace("subscriptions: [to-parquet]", "subscriptions: [q2]")
    text += (
        textwrap.dedent(
            """
          again:
            queue: to-parquet
            handler: os:getcwd
        """
        )
        .replace("\n", "\n  ")
        .rstrip()
        + "\n"
    )
    ps = problems(text)
    assert any("topics.landed.subscriptions.0: unknown queue 'q2'" in p for p in ps)
    assert any("functions.again.queue" in p and "already feeds" in p for p in ps)


def test_handler_that_cannot_be_imported() -> None:
    text = BRONZE_TO_STAGING.replace(
        "    steps:\n      - read_csv\n      - write_parquet: {bucket: staging}\n",
        "    handler: no_such_module_xyz:fn\n",
    )
    [p] = problems(text)
    assert "functions.csv-to-parquet.handler" in p and "no_such_module_xyz" in p


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no such pipeline file"):
        load(tmp_path / "missing.yaml")


@pytest.mark.parametrize(
    ("text", "seconds"), [(5, 5.0), ("90s", 90.0), ("1.5m", 90.0), ("500ms", 0.5), ("2h", 7200.0)]
)
def test_durations(text: object, seconds: float) -> None:
    assert parse_duration(text) == seconds


def test_retry_settings_grouped_or_flat() -> None:
    text = BRONZE_TO_STAGING.replace(
        "    max_receive_count: 3\n    backoff_base: 0.01s\n    backoff_max: 0.05s\n",
        "    retry: {max_receive_count: 7, backoff_base: 2s, backoff_max: 1m}\n",
    )
    q = loads(text).queue_config("to-parquet")
    assert (q.max_receive_count, q.backoff_base, q.backoff_max) == (7, 2.0, 60.0)
    [p] = problems(text.replace("backoff_max: 1m", "backoff_max: 1s"))
    assert "queues.to-parquet" in p and "backoff_max must not be smaller" in p
