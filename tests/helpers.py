"""Small helpers shared by the end-to-end tests."""

from __future__ import annotations

import csv
import io
import random
import time
from collections.abc import Callable
from pathlib import Path

import pyarrow.parquet as pq


def wait_until(predicate: Callable[[], bool], timeout: float = 30.0, what: str = "") -> None:
    """Poll with a deadline; fail with a message instead of hanging."""
    deadline = time.monotonic() + timeout
    pause = 0.01
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what or predicate}")
        time.sleep(pause)
        pause = min(pause * 2, 0.2)


def make_csv(path: Path, rows: int, seed: int = 0) -> list[dict[str, str]]:
    """A CSV with awkward but valid content; returns the rows as strings."""
    rng = random.Random(seed)
    records = [
        {
            "id": str(i),
            "name": rng.choice(["Ana", "Zoë", 'Bob "B"', "Li, Wei", "Ola\nNordmann"]),
            "country": rng.choice(["DE", "FR", "NL"]),
            "amount": f"{rng.uniform(0, 1000):.2f}",
        }
        for i in range(rows)
    ]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=["id", "name", "country", "amount"])
    w.writeheader()
    w.writerows(records)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(buf.getvalue(), encoding="utf-8")
    return records


def parquet_rows(path: Path) -> list[dict[str, str]]:
    """The Parquet file's rows with every value as the string the CSV had."""
    table = pq.read_table(path)
    out = []
    for row in table.to_pylist():
        out.append(
            {
                k: (f"{v:.2f}" if isinstance(v, float) else str(v)) if v is not None else ""
                for k, v in row.items()
            }
        )
    return out
