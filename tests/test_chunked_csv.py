"""A big CSV split into byte ranges over several workers, committed as one Parquet."""

from __future__ import annotations

import io
import json
import random
import textwrap
import threading
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from sluiceway import Pipeline, Runtime
from sluiceway.config import ConfigError, loads
from sluiceway.steps import chunks as chunks_mod
from sluiceway.steps.chunks import RangeReader

from .conftest import BRONZE_TO_STAGING
from .helpers import wait_until
from .test_pipeline_e2e import drain_inline

CHUNKED = BRONZE_TO_STAGING.replace(
    "- read_csv\n",
    "- read_csv: {chunk_size: 256KiB, quoted_newlines: false, block_size: 65536}\n",
)
SINGLE = BRONZE_TO_STAGING.replace("- read_csv\n", "- read_csv: {block_size: 65536}\n")


def big_csv(rows: int, seed: int = 1) -> bytes:
    rng = random.Random(seed)
    lines = ["id,name,country,amount,note"]
    for i in range(rows):
        name = rng.choice(["Ana", "Zoë", '"Bob ""B"""', '"Li, Wei"', ""])
        note = rng.choice(["", "x" * rng.randint(1, 60), "ok"])
        lines.append(
            f"{i},{name},{rng.choice(['DE', 'FR', 'NL'])},{rng.uniform(0, 1e3):.2f},{note}"
        )
    return ("\n".join(lines) + "\n").encode()


def setup(root: Path, text: str, data: bytes) -> Path:
    root.mkdir(parents=True)
    (root / "bronze").mkdir()
    (root / "bronze" / "big.csv").write_bytes(data)
    path = root / "sluiceway.yaml"
    path.write_text(textwrap.dedent(text))
    return path


def test_chunked_result_equals_single_worker_result(tmp_path: Path) -> None:
    data = big_csv(50_000)
    assert 5 * 256 * 1024 < len(data) < 8 * 256 * 1024
    single = setup(tmp_path / "single", SINGLE, data)
    chunked = setup(tmp_path / "chunked", CHUNKED, data)
    assert Runtime(single, workers=0, watch=False).drain(timeout=120).done == 1
    (tmp_path / "chunked" / "bronze" / "big.csv").unlink()
    p = Pipeline.from_file(chunked)
    rt = Runtime(chunked, workers=2, watch=False, grace=10)
    thread = threading.Thread(target=rt.run_forever, daemon=True)
    thread.start()
    try:
        # Both worker processes up and polling before the big file lands.
        warm = tmp_path / "warm.csv"
        warm.write_bytes(big_csv(3))
        deadline = time.monotonic() + 60
        while len({info.get("worker") for _, info in p.ledger.done_infos()}) < 2:
            assert time.monotonic() < deadline, "two workers never both processed a file"
            p.put(warm, "bronze", f"warm/{time.monotonic_ns()}.csv")
            time.sleep(0.05)
        (tmp_path / "big.csv").write_bytes(data)
        p.put(tmp_path / "big.csv", "bronze", "big.csv")
        wait_until(
            lambda: (
                p.pending() == 0 and (tmp_path / "chunked" / "staging" / "big.parquet").exists()
            ),
            120,
            "the chunked commit",
        )
    finally:
        rt._stop.set()
        thread.join(30)
    for key in [o.key for o in p.buckets["staging"].list(prefix="warm/")]:
        p.buckets["staging"].delete(key)

    expected = pq.read_table(tmp_path / "single" / "staging" / "big.parquet")
    out = tmp_path / "chunked" / "staging" / "big.parquet"
    got = pq.read_table(out)
    assert got.schema == expected.schema
    assert got.num_rows == 50_000
    assert got.to_pylist() == expected.to_pylist()  # row for row, same order

    assert [o.key for o in p.buckets["staging"].list()] == ["big.parquet"]  # no parts left
    base = f"csv-to-parquet|bronze/big.csv@{p.buckets['bronze'].head('big.csv').etag}"
    parent = p.ledger.get(base)
    assert parent is not None and parent.status == "done" and parent.info["outputs"] == []
    count = parent.info["chunk_plan"]["chunks"]
    assert 5 <= count <= 8
    chunks = [p.ledger.get(f"{base}#chunk-{i}-of-{count}") for i in range(count)]
    assert all(e is not None and e.status == "done" for e in chunks)
    assert len({e.info["worker"] for e in chunks}) > 1  # really spread over processes
    assert sum(e.info["stats"]["rows_in"] for e in chunks) == 50_000
    commit = p.ledger.get(f"{base}#commit")
    assert commit is not None and commit.status == "done"
    assert commit.info["outputs"][0]["key"] == "big.parquet"
    assert commit.info["outputs"][0]["rows"] == 50_000

    # A chunk message delivered again after the commit changes nothing.
    first_bytes = out.read_bytes()
    assert p.broker.queue("to-parquet-dlq").peek() == []
    [last] = [e for e in chunks if e.info["chunk"]["index"] == count - 1]
    event = {
        "version": "0",
        "id": f"again-{last.info['event_id']}",
        "detail-type": "Object Created",
        "source": "sluiceway.bucket",
        "account": "000000000000",
        "time": "2026-01-01T00:00:00Z",
        "region": "local",
        "resources": [],
        "detail": {
            "bucket": {"name": "bronze"},
            "object": {
                "key": "big.csv",
                "size": len(data),
                "etag": p.buckets["bronze"].head("big.csv").etag,
            },
            "chunk": {
                **last.info["chunk"],
                "columns": parent.info["chunk_plan"]["columns"],
            },
        },
    }
    p.broker.queue("to-parquet").send(json.dumps(event), id="again")
    assert drain_inline(p) == ["duplicate"]
    assert out.read_bytes() == first_bytes
    assert [o.key for o in p.buckets["staging"].list()] == ["big.parquet"]
    assert set(p.function_status()["csv-to-parquet"]) == {"done"}
    p.close()


def test_small_file_is_not_chunked(tmp_path: Path) -> None:
    data = big_csv(100)
    path = setup(tmp_path / "p", CHUNKED, data)
    assert Runtime(path, workers=0, watch=False).drain(timeout=60).done == 1
    p = Pipeline.from_file(path)
    assert p.function_status()["csv-to-parquet"] == {"done": 1}
    assert pq.read_table(tmp_path / "p" / "staging" / "big.parquet").num_rows == 100
    p.close()


@pytest.mark.parametrize("seed", range(5))
def test_ranges_cover_every_row_exactly_once(seed: int) -> None:
    rng = random.Random(seed)
    header = b"a,b\n"
    rows = [f"{i},{'y' * rng.randint(0, 9)}\n".encode() for i in range(rng.randint(1, 30))]
    if seed % 2:
        rows[-1] = rows[-1].rstrip(b"\n")  # no newline at the end
    data = header + b"".join(rows)
    for size in range(1, len(data) + 1):
        got = b""
        for start in range(0, len(data), size):
            end = min(len(data), start + size)
            head = header if start > 0 else b""
            r = RangeReader(io.BytesIO(data), start, end, head)
            part = r.read() if r.has_rows else head
            assert part.startswith(header)
            got += part[len(header) :]
        assert got == b"".join(rows), size


@pytest.mark.parametrize(
    ("options", "field", "why"),
    [
        ("{chunk_size: 64MiB}", "quoted_newlines", "quoted_newlines: false"),
        (
            "{chunk_size: 64MiB, quoted_newlines: false, compression: gzip}",
            "compression",
            "uncompressed",
        ),
        ("{chunk_size: 64MiB, quoted_newlines: false, header: false}", "header", "header"),
        ("{chunk_size: lots, quoted_newlines: false}", "chunk_size", "size"),
    ],
)
def test_refusing_to_chunk_is_a_config_error_with_its_line(
    options: str, field: str, why: str
) -> None:
    text = textwrap.dedent(BRONZE_TO_STAGING.replace("- read_csv\n", f"- read_csv: {options}\n"))
    with pytest.raises(ConfigError) as exc:
        loads(text, source="p.yaml")
    [problem] = exc.value.problems
    line = next(i for i, s in enumerate(text.splitlines(), 1) if "chunk_size" in s)
    assert problem.startswith(f"p.yaml:{line}: functions.csv-to-parquet.steps.0.read_csv"), problem
    assert field in problem and why in problem


def test_a_failed_commit_is_redone_by_the_redelivered_chunk(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = big_csv(20_000, seed=2)
    path = setup(
        tmp_path / "p",
        CHUNKED.replace(
            "quoted_newlines: false", "quoted_newlines: false, columns: {amount: 'decimal(10,2)'}"
        ),
        data,
    )
    p = Pipeline.from_file(path)
    p.reconcile()
    real = chunks_mod.render_key
    failures = []

    def crash_once(*args: str) -> str:
        if not failures:
            failures.append(args)
            raise OSError("disk went away")
        return real(*args)

    monkeypatch.setattr(chunks_mod, "render_key", crash_once)
    statuses = drain_inline(p)
    assert failures and "retry" in statuses and statuses[-1] == "duplicate"
    table = pq.read_table(tmp_path / "p" / "staging" / "big.parquet")
    assert table.num_rows == 20_000 and table.column("id").to_pylist() == list(range(20_000))
    assert str(table.schema.field("amount").type) == "decimal128(10, 2)"
    assert [o.key for o in p.buckets["staging"].list()] == ["big.parquet"]
    assert set(p.function_status()["csv-to-parquet"]) == {"done"}
    p.close()


class _Forward:
    """A chunk read forward only: the CSV reader's precise pass, for comparison."""

    def __init__(self, reader: RangeReader) -> None:
        self._reader = reader

    def read(self, size: int = -1, /) -> bytes:
        return self._reader.read(size)


def _read_all(source: object) -> tuple[list[dict[str, object]], str | None]:
    from sluiceway.errors import InputError
    from sluiceway.steps.csv import CsvOptions, read_csv_batches

    options = CsvOptions(
        column_types={"id": "int", "amount": "float"}, compression="none", block_size=1024
    )
    rows: list[dict[str, object]] = []
    try:
        for batch in read_csv_batches(source, name="big.csv", options=options):  # type: ignore[arg-type]
            rows += batch.to_pylist()
    except InputError as exc:
        return rows, str(exc)
    return rows, None


@pytest.mark.parametrize("bom", [False, True])
@pytest.mark.parametrize("bad_row", [None, 3, 700, 1999])
def test_chunk_fast_pass_equals_precise_pass(bad_row: int | None, bom: bool) -> None:
    """A chunk is read by pyarrow's native reader (it can rewind): same rows or the same error.

    Rows yielded before an error may differ (blocks are cut differently);
    callers treat output as incomplete until iteration ends, as for any file.
    """
    header = ("\ufeff" if bom else "") + "id,amount,note\n"
    rows = [f"{i},{'oops' if i == bad_row else i * 1.5},n{i % 7}\n" for i in range(2000)]
    data = (header + "".join(rows)).encode()
    size = len(data) // 3 + 1
    errors = 0
    for start in range(0, len(data), size):
        end = min(len(data), start + size)
        head = chunks_mod.header_line(io.BytesIO(data)) if start > 0 else b""
        fast = RangeReader(io.BytesIO(data), start, end, head)
        precise = RangeReader(io.BytesIO(data), start, end, head)
        assert fast.has_rows and precise.has_rows
        (rows, error), (expected_rows, expected_error) = (
            _read_all(fast),
            _read_all(_Forward(precise)),
        )
        assert error == expected_error  # same message, line and field
        if error is None:
            assert rows == expected_rows
        errors += error is not None
    assert errors == (bad_row is not None)
