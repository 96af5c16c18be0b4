"""The table contract: items upserted by key, on every backend."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from sluiceway.state import StateDB
from sluiceway.tables.base import MissingKey, Table
from sluiceway.tables.sqlite import SqliteTable

from ..aws_backend import dynamo_table
from ..postgres_backend import postgres_table


def _sqlite(request: pytest.FixtureRequest, tmp_path: Path, name: str, key: list[str]) -> Table:
    return SqliteTable(StateDB(tmp_path / "state.db"), name, key)


# name → factory(request, tmp_path, table name, key fields) giving an empty table.
BACKENDS: dict[str, Callable[[pytest.FixtureRequest, Path, str, list[str]], Table]] = {
    "sqlite": _sqlite
}
BACKENDS["postgres"] = postgres_table
BACKENDS["dynamodb"] = dynamo_table


@pytest.fixture(params=sorted(BACKENDS))
def make_table(
    request: pytest.FixtureRequest, tmp_path: Path
) -> Iterator[Callable[[str, list[str]], Table]]:
    yield lambda name, key: BACKENDS[request.param](request, tmp_path, name, key)


def test_upsert_get_scan_count_delete(make_table: Callable[[str, list[str]], Table]) -> None:
    t = make_table("customers", ["id"])
    assert t.upsert([{"id": 1, "name": "Ana"}, {"id": 2, "name": "Ben"}]) == 2
    assert t.upsert([{"id": 1, "name": "Ana B.", "country": "DE"}]) == 1
    assert t.count() == 2
    assert t.get(1) == {"id": 1, "name": "Ana B.", "country": "DE"}
    assert t.get(3) is None
    assert sorted(i["id"] for i in t.scan()) == [1, 2]
    assert len(list(t.scan(limit=1))) == 1
    assert t.delete(2) and not t.delete(2)
    assert t.count() == 1


def test_compound_keys_and_tables_are_separate(
    make_table: Callable[[str, list[str]], Table],
) -> None:
    a = make_table("orders", ["customer", "order"])
    b = make_table("returns", ["customer", "order"])
    a.upsert([{"customer": "c1", "order": 1, "v": "a"}, {"customer": "c1", "order": 2, "v": "b"}])
    b.upsert([{"customer": "c1", "order": 1, "v": "r"}])
    assert a.get("c1", 1)["v"] == "a" and b.get("c1", 1)["v"] == "r"  # type: ignore[index]
    assert a.count() == 2 and b.count() == 1


def test_missing_or_null_key_is_refused(make_table: Callable[[str, list[str]], Table]) -> None:
    t = make_table("t", ["id"])
    with pytest.raises(MissingKey):
        t.upsert([{"name": "no id"}])
    with pytest.raises(MissingKey):
        t.upsert([{"id": None}])
    assert t.count() == 0


def test_values_round_trip(make_table: Callable[[str, list[str]], Table]) -> None:
    t = make_table("t", ["id"])
    item = {"id": "k", "n": 1.5, "b": True, "none": None, "list": [1, 2], "nested": {"x": "é"}}
    t.upsert([item])
    assert t.get("k") == item
