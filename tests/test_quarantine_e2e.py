"""Validation with quarantine end to end: a messy CSV in bronze, good rows in
Parquet, bad rows in ``staging/_rejected/…jsonl`` with their physical lines."""

from __future__ import annotations

import json
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from sluiceway import Pipeline, Runtime

from .conftest import BRONZE_TO_STAGING
from .test_pipeline_e2e import drain_inline

SCHEMA = """\
extra_columns: reject
columns:
  customer_id: {type: int, required: true, unique: true, min: 1}
  name: {type: string, required: true}
  email: {type: string, required: true, regex: '[^@\\s]+@[^@\\s]+\\.[a-z]{2,}'}
  age: {type: int, min: 0, max: 130}
  signup_date: {type: date, rename: signed_up}
  plan: {type: string, enum: [free, pro]}
  balance: {type: "decimal(10,2)", min: 0}
"""

# Line numbers on the right are physical lines, as an editor shows them.
MESSY = (
    "customer_id,name,email,age,signup_date,plan,balance\n"  # 1
    '1,"Ana\nMaria",ana@example.com,34,2024-01-15,pro,10.50\n'  # 2-3 good, two lines
    "2,Bob,bob@example,41,2024-02-01,free,0\n"  # 4 email fails the regex
    "3,Cy,cy@example.com,212,2024-02-03,pro,1\n"  # 5 age out of range
    "4,Di,di@example.com,29,2024-02-30,free,1\n"  # 6 no such date
    "1,Eve,eve@example.com,50,2024-03-01,pro,1\n"  # 7 duplicate customer_id
    "5,Fay,,33,2024-03-02,free,1\n"  # 8 required email missing
    "6,Gus,gus@example.com,27,2024-03-03,pro,1,EXTRA\n"  # 9 one field too many
    "7,Hal,hal@example.com,45\n"  # 10 three fields too few
    "\n"  # 11 empty lines are not rows
    "8,Ida,ida@example.com,,2024-03-05,free,\n"  # 12 good: optional values empty
    "9,Jo,jo@example.com,38,2024-03-06,enterprise,1\n"  # 13 plan not in the enum
    "10,Kai,kai@example.com,19,2024-03-07,pro,3.999\n"  # 14 too many decimals
    "11,Lu,lu@example.com,52,2024-03-08,free,99.99\n"  # 15 good
)

EXPECTED_REJECTS = [
    (4, "email", "bob@example", "does not match the pattern"),
    (5, "age", "212", "greater than the maximum 130"),
    (6, "signup_date", "2024-02-30", "not a valid date"),
    (7, "customer_id", "1", "duplicate of line 2"),
    (8, "email", "", "required value is missing"),
    (9, None, "6,Gus,gus@example.com,27,2024-03-03,pro,1,EXTRA", "expected 7 fields, got 8"),
    (10, None, "7,Hal,hal@example.com,45", "expected 7 fields, got 4"),
    (13, "plan", "enterprise", "not one of free, pro"),
    (14, "balance", "3.999", "more than 2 decimal places"),
]


def validating_pipeline(
    write_pipeline: Callable[..., Path], on_invalid: str = "quarantine"
) -> Path:
    path = write_pipeline(
        BRONZE_TO_STAGING.replace(
            "      - read_csv\n",
            "      - read_csv\n"
            f"      - validate: {{schema: schemas/customer.yaml, on_invalid: {on_invalid}}}\n",
        )
    )
    (path.parent / "schemas").mkdir(exist_ok=True)
    (path.parent / "schemas" / "customer.yaml").write_text(SCHEMA)
    return path


def stats_of(p: Pipeline, event: Any) -> dict[str, int]:
    entry = p.ledger.get(f"csv-to-parquet|{event.input_identity}")
    assert entry is not None and entry.status == "done", entry
    return entry.info["stats"]


def test_messy_csv_is_split_into_parquet_and_rejects(
    write_pipeline: Callable[..., Path], tmp_path: Path
) -> None:
    path = validating_pipeline(write_pipeline)
    p = Pipeline.from_file(path)
    (tmp_path / "customers.csv").write_text(MESSY)
    event = p.put(tmp_path / "customers.csv", "bronze", "2026/customers.csv")
    assert event is not None

    summary = Runtime(path, workers=0, watch=False).drain(timeout=60)
    assert summary.done == 1 and summary.failed == 0

    table = pq.read_table(tmp_path / "staging" / "2026" / "customers.parquet")
    assert table.schema.names == [
        "customer_id",
        "name",
        "email",
        "age",
        "signed_up",
        "plan",
        "balance",
    ]
    rows = table.to_pylist()
    assert [(r["customer_id"], r["name"]) for r in rows] == [
        (1, "Ana\nMaria"),
        (8, "Ida"),
        (11, "Lu"),
    ]
    assert rows[1]["age"] is None and rows[1]["balance"] is None
    assert str(rows[2]["balance"]) == "99.99" and str(rows[0]["signed_up"]) == "2024-01-15"

    reject_file = tmp_path / "staging" / "_rejected" / "2026" / "customers.csv.jsonl"
    rejects = [json.loads(line) for line in reject_file.read_text().splitlines()]
    got = [(r["line"], r["column"], r["value"], r["reason"]) for r in rejects]
    assert len(got) == len(EXPECTED_REJECTS)
    for (line, column, value, reason), expected in zip(got, EXPECTED_REJECTS, strict=True):
        assert (line, column, value) == expected[:3]
        assert reason.startswith(expected[3]), reason
    # The original row travels with each reject (as written, original names).
    assert rejects[0]["row"] == {
        "customer_id": "2",
        "name": "Bob",
        "email": "bob@example",
        "age": "41",
        "signup_date": "2024-02-01",
        "plan": "free",
        "balance": "0",
    }
    assert rejects[5]["row"] is None  # a malformed row has no columns, only its text

    stats = stats_of(p, event)
    assert stats["rows_in"] == 12
    assert stats["rows_out"] == 3 and stats["rows_rejected"] == 9
    assert stats["rows_in"] == stats["rows_out"] + stats["rows_rejected"]
    outputs = {o["key"]: o for o in summary.outputs}
    assert outputs["_rejected/2026/customers.csv.jsonl"]["rows"] == 9
    assert outputs["2026/customers.parquet"]["rows"] == 3
    p.close()


def test_redelivery_rewrites_the_same_reject_file(
    write_pipeline: Callable[..., Path], tmp_path: Path
) -> None:
    p = Pipeline.from_file(validating_pipeline(write_pipeline))
    (tmp_path / "customers.csv").write_text(MESSY)
    event = p.put(tmp_path / "customers.csv", "bronze", "customers.csv")
    assert event is not None
    assert drain_inline(p) == ["done"]
    reject_file = tmp_path / "staging" / "_rejected" / "customers.csv.jsonl"
    first = reject_file.read_bytes()
    # Forget it was done and deliver the same event again: same bytes, one file.
    p.db.conn.execute("DELETE FROM ledger")
    p.broker.queue("to-parquet").send(event.to_json(), id="again")
    assert drain_inline(p) == ["done"]
    assert reject_file.read_bytes() == first
    assert sorted(o.key for o in p.buckets["staging"].list()) == [
        "_rejected/customers.csv.jsonl",
        "customers.parquet",
    ]
    p.close()


def test_fail_mode_dead_letters_with_file_line_field_and_value(
    write_pipeline: Callable[..., Path], tmp_path: Path
) -> None:
    p = Pipeline.from_file(validating_pipeline(write_pipeline, on_invalid="fail"))
    (tmp_path / "customers.csv").write_text(MESSY)
    p.put(tmp_path / "customers.csv", "bronze", "customers.csv")
    statuses = drain_inline(p, rounds=2000)
    assert statuses.count("dead") == 1
    [dead] = p.broker.queue("to-parquet-dlq").peek()
    failure = dead.failure
    assert failure is not None
    assert (failure["file"], failure["line"], failure["field"]) == (
        "bronze/customers.csv",
        4,
        "email",
    )
    assert "'bob@example'" in failure["message"]
    assert not (tmp_path / "staging" / "customers.parquet").exists()
    assert not (tmp_path / "staging" / "_rejected").exists()
    p.close()


def test_a_file_missing_a_declared_column_fails_naming_it(
    write_pipeline: Callable[..., Path], tmp_path: Path
) -> None:
    p = Pipeline.from_file(validating_pipeline(write_pipeline))
    header = MESSY.partition("\n")[0]
    (tmp_path / "c.csv").write_text(header.replace(",balance", "") + "\n1,A,a@b.de,1,,free\n")
    p.put(tmp_path / "c.csv", "bronze", "c.csv")
    drain_inline(p, rounds=2000)
    [dead] = p.broker.queue("to-parquet-dlq").peek()
    assert dead.failure is not None
    assert dead.failure["field"] == "balance"
    assert "missing column 'balance'" in dead.failure["message"]
    p.close()


def test_pipeline_validation_reports_schema_mistakes_with_lines(
    write_pipeline: Callable[..., Path],
) -> None:
    from sluiceway.errors import ConfigError

    path = validating_pipeline(write_pipeline)
    (path.parent / "schemas" / "customer.yaml").write_text(
        textwrap.dedent(
            """\
            columns:
              customer_id: {type: int, unique: yes-please}
            """
        )
    )
    try:
        Pipeline.from_file(path)
    except ConfigError as e:
        [problem] = e.problems
    else:
        raise AssertionError("the schema mistake was not reported")
    assert problem.startswith(f"{path}:")
    assert (
        "steps.1.validate.schema: schemas/customer.yaml:2: columns.customer_id.unique:" in problem
    )


def test_read_csv_alone_quarantines_rows_with_the_wrong_number_of_fields(
    write_pipeline: Callable[..., Path], tmp_path: Path
) -> None:
    from .conftest import BRONZE_TO_STAGING

    path = write_pipeline(
        BRONZE_TO_STAGING.replace("- read_csv\n", "- read_csv: {rejects: staging}\n")
    )
    (tmp_path / "in.csv").write_text("id,name\n1,a\n2,b,extra\n3,c\n4\n5,e\n")
    Pipeline.from_file(path).put(tmp_path / "in.csv", "bronze", "in.csv")
    summary = Runtime(path, workers=0, watch=False).drain(timeout=60)
    assert (summary.done, summary.rows_in, summary.rows_out, summary.rows_rejected) == (1, 5, 3, 2)
    assert pq.read_table(tmp_path / "staging" / "in.parquet")["id"].to_pylist() == [1, 3, 5]
    rejects = (tmp_path / "staging" / "_rejected" / "in.csv.jsonl").read_text().splitlines()
    assert [(json.loads(r)["line"], json.loads(r)["value"]) for r in rejects] == [
        (3, "2,b,extra"),
        (5, "4"),
    ]
