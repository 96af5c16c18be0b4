"""Deterministic, seeded CSV data for the benchmarks, cached in bench/data/ (git-ignored).

The rows look like the bronze-to-staging example (customer_id, name, email,
country, signup_date, lifetime_value), with quoted "Last, First" names and
non-ASCII letters, so the CSV parser does real work. The same seed gives the
same bytes; a file is generated once and reused by later runs. Generation is
vectorised (NumPy + Arrow's CSV writer), so even the 1 GB file takes seconds.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.compute as pc

DATA_DIR = Path(__file__).resolve().parent / "data"
GENERATOR_VERSION = 2
MB = 1_000_000

FIRST = [
    "Chloé", "Farid", "Greta", "Jonas", "Maëlle", "Katarzyna", "Noah", "Eva", "Jürgen",
    "Søren", "Ana", "Luca", "Amélie", "Mateo", "Zoë", "Björn", "Inès", "Olek", "Aiko", "Sam",
]  # fmt: skip
LAST = [
    "Lindqvist", "Müller", "Dubois", "O'Neil", "de Vries", "García", "Weiß", "Novák",
    "Rossi", "Kowalski", "Nakamura", "Smith", "Ødegaard", "Costa", "Yılmaz", "Brown",
]  # fmt: skip
COUNTRIES = ["SE", "DE", "PL", "IT", "ES", "FR", "NL", "DK", "PT", "GB"]
HEADER = "customer_id,name,email,country,signup_date,lifetime_value"


def _names() -> tuple[pa.Array, pa.Array]:
    """All "First Last" and "Last, First" names, and the matching first names."""
    full, first = [], []
    for f in FIRST:
        for last in LAST:
            full += [f"{f} {last}", f"{last}, {f}"]
            first += [f.lower(), f.lower()]
    return pa.array(full), pa.array(first)


def customers(rows: int, *, seed: int, start_id: int = 1) -> pa.Table:
    """``rows`` customer rows; the same arguments always give the same table."""
    rng = np.random.default_rng(seed)
    full, first = _names()
    ids = np.arange(start_id, start_id + rows, dtype=np.int64)
    pick = pa.array(rng.integers(0, len(full), rows))
    id_text = pc.cast(pa.array(ids), pa.string())
    email = pc.binary_join_element_wise(pc.take(first, pick), id_text, "@example.com", ".")
    email = pc.replace_substring(email, ".@", "@")
    days = rng.integers(19_700, 20_800, rows).astype(np.int32)  # 2023-12 .. 2026-12
    value = np.round(rng.uniform(0, 5_000, rows), 2)
    country = pa.array(rng.integers(0, len(COUNTRIES), rows))
    return pa.table(
        {
            "customer_id": pa.array(ids),
            "name": pc.take(full, pick),
            "email": email,
            "country": pc.take(pa.array(COUNTRIES), country),
            "signup_date": pa.array(days, pa.date32()),
            "lifetime_value": pa.array(value),
        }
    )


def _csv_bytes(table: pa.Table, *, header: bool) -> bytes:
    """CSV text quoted only where needed, as most exporters write it."""
    return pl.from_arrow(table).write_csv(include_header=header).encode()


def _fresh(path: Path, meta: dict[str, object]) -> bool:
    """True if ``path`` exists and was made with exactly these parameters."""
    stamp = path.with_name(path.name + ".json")
    try:
        return path.exists() and json.loads(stamp.read_text()) == meta
    except (OSError, ValueError):
        return False


def _stamp(path: Path, meta: dict[str, object]) -> None:
    path.with_name(path.name + ".json").write_text(json.dumps(meta))


def large_csv(size_bytes: int, *, seed: int = 42, data_dir: Path = DATA_DIR) -> Path:
    """One CSV file of about ``size_bytes`` (within one row), generated once."""
    path = data_dir / f"customers_{size_bytes // MB}MB_seed{seed}.csv"
    meta = {"version": GENERATOR_VERSION, "size": size_bytes, "seed": seed}
    if _fresh(path, meta):
        return path
    data_dir.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".part")
    chunk_rows = 250_000
    written, chunk, next_id = 0, 0, 1
    with pa.OSFile(str(tmp), "wb") as out:
        out.write((HEADER + "\n").encode())
        written = len(HEADER) + 1
        while written < size_bytes:
            table = customers(chunk_rows, seed=seed * 1_000_003 + chunk, start_id=next_id)
            data = _csv_bytes(table, header=False)
            if written + len(data) > size_bytes:  # cut the last chunk at a row end
                cut = data.rfind(b"\n", 0, size_bytes - written) + 1
                data = data[: max(cut, data.find(b"\n") + 1)]
            out.write(data)
            written += len(data)
            next_id += chunk_rows
            chunk += 1
    os.replace(tmp, path)
    _stamp(path, meta)
    return path


def small_files(
    count: int, *, size_bytes: int = 10_000, seed: int = 7, data_dir: Path = DATA_DIR
) -> list[Path]:
    """``count`` CSV files of about ``size_bytes`` each, generated once."""
    folder = data_dir / f"small_{count}x{size_bytes // 1000}KB_seed{seed}"
    meta = {"version": GENERATOR_VERSION, "count": count, "size": size_bytes, "seed": seed}
    if not _fresh(folder, meta):
        data_dir.mkdir(parents=True, exist_ok=True)
        tmp = folder.with_name(folder.name + ".part")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        per_row = len(_csv_bytes(customers(1000, seed=seed), header=False)) / 1000
        rows = max(1, int(size_bytes / per_row))
        table = customers(rows * count, seed=seed)
        for i in range(count):
            data = _csv_bytes(table.slice(i * rows, rows), header=True)
            (tmp / f"part-{i:05d}.csv").write_bytes(data)
        shutil.rmtree(folder, ignore_errors=True)
        os.replace(tmp, folder)
        _stamp(folder, meta)
    return sorted(folder.glob("*.csv"))


if __name__ == "__main__":  # python -m bench.data: make the quick data set
    print(large_csv(10 * MB))
    print(len(small_files(300)), "small files")
