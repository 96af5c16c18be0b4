"""write_parquet with partition_by: a Hive dataset that PyArrow and DuckDB read
back with the partitions as columns, rewritten in place on re-delivery."""

from __future__ import annotations

import csv
from collections.abc import Callable
from pathlib import Path
from typing import Any

import duckdb
import pyarrow.dataset as ds
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sluiceway import Pipeline, Runtime
from sluiceway.steps.partition import DERIVED, derive

from .conftest import BRONZE_TO_STAGING

PARTITIONED = BRONZE_TO_STAGING.replace(
    "      - write_parquet: {bucket: staging}",
    "      - write_parquet:\n"
    "          bucket: staging\n"
    "          dataset: customers\n"
    "          partition_by: [country, {date: created_at}]",
)


def write_customers(path: Path, rows: list[tuple[int, str, str]]) -> None:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["id", "country", "created_at"])
        w.writerows(rows)


ROWS = [
    (1, "DE", "2026-11-24T08:00:00"),
    (2, "DE", "2026-11-24T23:59:59"),
    (3, "FR", "2026-11-24T10:00:00"),
    (4, "DE", "2026-11-25T00:00:01"),
    (5, "NL", "2026-11-23T12:00:00"),
]


@pytest.fixture
def loaded(write_pipeline: Callable[..., Path], tmp_path: Path) -> tuple[Path, Path]:
    path = write_pipeline(PARTITIONED)
    write_customers(tmp_path / "in.csv", ROWS)
    Pipeline.from_file(path).put(tmp_path / "in.csv", "bronze", "in/customers.csv")
    assert Runtime(path, workers=0, watch=False).drain(timeout=60).rows_out == 5
    return path, tmp_path / "staging" / "customers"


def test_hive_layout(loaded: tuple[Path, Path]) -> None:
    _, root = loaded
    dirs = sorted(str(p.parent.relative_to(root)) for p in root.rglob("*.parquet"))
    assert dirs == [
        "country=DE/date=2026-11-24",
        "country=DE/date=2026-11-25",
        "country=FR/date=2026-11-24",
        "country=NL/date=2026-11-23",
    ]
    assert all(p.name.startswith("part-") for p in root.rglob("*.parquet"))


def test_pyarrow_reads_partitions_as_columns(loaded: tuple[Path, Path]) -> None:
    _, root = loaded
    table = ds.dataset(root, format="parquet", partitioning="hive").to_table()
    got = sorted(
        zip(
            table["id"].to_pylist(),
            table["country"].to_pylist(),
            table["date"].to_pylist(),
            strict=True,
        )
    )
    assert got == [
        (1, "DE", "2026-11-24"),
        (2, "DE", "2026-11-24"),
        (3, "FR", "2026-11-24"),
        (4, "DE", "2026-11-25"),
        (5, "NL", "2026-11-23"),
    ]


def test_duckdb_reads_partitions_as_columns(loaded: tuple[Path, Path]) -> None:
    _, root = loaded
    got = duckdb.sql(
        f"SELECT country, date, count(*) FROM read_parquet('{root}/**/*.parquet',"
        " hive_partitioning = true) GROUP BY ALL ORDER BY ALL"
    ).fetchall()
    assert [(c, str(d), n) for c, d, n in got] == [
        ("DE", "2026-11-24", 2),
        ("DE", "2026-11-25", 1),
        ("FR", "2026-11-24", 1),
        ("NL", "2026-11-23", 1),
    ]


def test_new_version_replaces_its_rows_in_every_partition(
    loaded: tuple[Path, Path], tmp_path: Path
) -> None:
    path, root = loaded
    # The corrected file moves every row to FR: nothing may linger under DE or NL.
    write_customers(tmp_path / "in.csv", [(i, "FR", ts) for i, _, ts in ROWS])
    Pipeline.from_file(path).put(tmp_path / "in.csv", "bronze", "in/customers.csv")
    assert Runtime(path, workers=0, watch=False).drain(timeout=60).rows_out == 5
    table = ds.dataset(root, format="parquet", partitioning="hive").to_table()
    assert sorted(table["id"].to_pylist()) == [1, 2, 3, 4, 5]
    assert set(table["country"].to_pylist()) == {"FR"}


def test_missing_partition_column_fails_the_file_clearly(
    write_pipeline: Callable[..., Path], tmp_path: Path
) -> None:
    path = write_pipeline(PARTITIONED)
    (tmp_path / "in.csv").write_text("id,region\n1,EU\n")
    p = Pipeline.from_file(path)
    p.put(tmp_path / "in.csv", "bronze", "x.csv")
    Runtime(path, workers=0, watch=False).drain(timeout=60)
    [dead] = p.broker.queue("to-parquet-dlq").peek()
    assert "partition column 'country' is not in the data" in dead.failure["message"]
    assert "bronze/x.csv" in dead.failure["message"]


def test_row_groups_and_dictionaries_as_unpartitioned(
    write_pipeline: Callable[..., Path], tmp_path: Path
) -> None:
    """Partitioned files follow row_group_size and encode dictionaries only where values repeat."""
    import pyarrow.parquet as pq

    text = PARTITIONED.replace(
        "partition_by: [country, {date: created_at}]", "partition_by: [country]"
    )
    text = text.replace(
        "dataset: customers\n", "dataset: customers\n          row_group_size: 1000\n"
    )
    path = write_pipeline(text)
    rows = [(i, ["DE", "FR"][i % 2], f"2026-11-{1 + i % 28:02d}T00:00:00") for i in range(5000)]
    write_customers(tmp_path / "in.csv", rows)
    Pipeline.from_file(path).put(tmp_path / "in.csv", "bronze", "in/customers.csv")
    assert Runtime(path, workers=0, watch=False).drain(timeout=60).rows_out == 5000
    root = tmp_path / "staging" / "customers"
    table = ds.dataset(root, format="parquet", partitioning="hive").to_table()
    got = sorted(zip(table["id"].to_pylist(), table["country"].to_pylist(), strict=True))
    assert got == [(i, c) for i, c, _ in rows]
    for file in root.rglob("*.parquet"):
        meta = pq.ParquetFile(file).metadata
        assert meta.num_row_groups > 1
        assert all(meta.row_group(g).num_rows <= 1000 for g in range(meta.num_row_groups))
        names = [meta.schema.column(c).name for c in range(meta.num_columns)]
        columns = meta.row_group(0)
        encodings = {names[c]: columns.column(c).encodings for c in range(meta.num_columns)}
        assert not any("DICTIONARY" in e for e in encodings["id"])  # every id distinct
        assert any("DICTIONARY" in e for e in encodings["created_at"])  # 28 values


@settings(max_examples=200, deadline=None)
@given(
    micros=st.lists(st.none() | st.integers(-(10**16), 10**17), max_size=40),
    fmt=st.sampled_from(sorted(DERIVED.values())),
    tz=st.sampled_from([None, "UTC", "+00:00", "+05:30", "America/New_York"]),
    chunked=st.booleans(),
)
def test_derived_partitions_are_strftime(
    micros: list[int | None], fmt: str, tz: str | None, chunked: bool
) -> None:
    """Each distinct day or hour formatted once gives what strftime gives row by row."""
    import pyarrow as pa
    import pyarrow.compute as pc

    values: Any = pa.array(micros, pa.timestamp("us", tz=tz))
    if chunked:
        values = pa.chunked_array([values[: len(micros) // 2], values[len(micros) // 2 :]])
    got = derive(pa.table({"t": values}), "p", "t", fmt, "test")
    want = pc.strftime(values, format=fmt)
    assert got.type == want.type and got.to_pylist() == want.to_pylist()
