"""The ``validate`` step and its schema files: every rule, type and error, step by step.

Most tests run the real chain read_csv → validate → write_parquet exactly as a
worker does (``FunctionRunner.run``) on one input, without queues, and look at
the Parquet rows, the reject records and the counters.
"""

from __future__ import annotations

import csv
import datetime as dt
import io
import json
import textwrap
import zoneinfo
from collections.abc import Iterator
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from sluiceway import Pipeline
from sluiceway.config import loads
from sluiceway.errors import ConfigError, InputError
from sluiceway.events import object_created
from sluiceway.schema import loads_schema
from sluiceway.steps.base import StepContext
from sluiceway.steps.csv import CsvOptions, read_csv_batches
from sluiceway.worker import FunctionRunner

BERLIN = zoneinfo.ZoneInfo("Europe/Berlin")

PIPELINE = """
pipeline: t
buckets: {{bronze: ./bronze, staging: ./staging, quarantine: ./quarantine}}
queues: {{q: {{}}}}
functions:
  f:
    queue: q
    steps:
      - read_csv: {{block_size: {block_size}}}
      - validate: {{schema: schema.yaml, on_invalid: {on_invalid}{extra}}}
      - write_parquet: {{bucket: staging}}
"""


@dataclass
class Result:
    rows: list[dict[str, Any]]
    rejects: list[dict[str, Any]]
    stats: dict[str, int]
    outputs: list[dict[str, Any]]
    schema: pa.Schema


class Harness:
    """One pipeline in a directory; ``run`` processes one CSV through its function."""

    def __init__(self, root: Path, schema: str, **options: Any) -> None:
        self.root = root
        self.set_schema(schema)
        self.pipeline = Pipeline(self._config(**options))
        self.runner = FunctionRunner(self.pipeline, "f")

    def _config(
        self, on_invalid: str = "quarantine", block_size: int = 1 << 20, extra: str = ""
    ) -> Any:
        text = PIPELINE.format(block_size=block_size, on_invalid=on_invalid, extra=extra)
        return loads(text, source="sluiceway.yaml", base_dir=self.root)

    def set_schema(self, schema: str) -> None:
        (self.root / "schema.yaml").write_text(textwrap.dedent(schema))

    def run(self, data: str | bytes, key: str = "in.csv") -> Result:
        bronze = self.pipeline.buckets["bronze"]
        info = bronze.put_bytes(key, data.encode() if isinstance(data, str) else data)
        event = object_created("bronze", key, size=info.size, etag=info.etag, sequencer="1")
        ctx = StepContext(event=event, function="f", buckets=self.pipeline.buckets)
        self.runner.run(ctx)
        stem = key.rsplit(".", 1)[0]
        table = pq.read_table(self.root / "staging" / f"{stem}.parquet")
        rejected = self.root / "staging" / "_rejected" / f"{key}.jsonl"
        rejects = (
            [json.loads(line) for line in rejected.read_text().splitlines()]
            if rejected.exists()
            else []
        )
        return Result(table.to_pylist(), rejects, ctx.stats, ctx.outputs, table.schema)

    def close(self) -> None:
        self.pipeline.close()


@pytest.fixture
def harness(tmp_path: Path) -> Iterator[Any]:
    made: list[Harness] = []

    def make(schema: str, **options: Any) -> Harness:
        h = Harness(tmp_path, schema, **options)
        made.append(h)
        return h

    yield make
    for h in made:
        h.close()


def reasons(result: Result) -> list[tuple[int | None, str | None, str]]:
    return [(r["line"], r["column"], r["reason"]) for r in result.rejects]


def balanced(result: Result) -> bool:
    s = result.stats
    return s["rows_in"] == s["rows_out"] + s["rows_rejected"]


# --------------------------------------------------------------------------- types


def parse(type_spec: str, values: list[str | None]) -> tuple[list[Any], list[bool]]:
    schema = loads_schema(f"columns:\n  c: {type_spec}\n")
    parsed = schema.column("c").parse(pa.array(values, pa.string()))
    return parsed.values.to_pylist(), parsed.invalid.to_pylist()


def test_int_accepts_signs_and_padding_and_rejects_the_rest() -> None:
    values, invalid = parse(
        "int", ["1", "+2", "-3", " 4 ", "007", "", "x", "1.0", "99999999999999999999"]
    )
    assert values == [1, 2, -3, 4, 7, None, None, None, None]
    assert invalid == [False] * 6 + [True] * 3


def test_float_and_bool() -> None:
    assert parse("float", ["1.5", "-2e3", ".5", "x"]) == (
        [1.5, -2000.0, 0.5, None],
        [False, False, False, True],
    )
    values, invalid = parse("bool", ["true", "No", "Y", "0", "1", "maybe"])
    assert values == [True, False, True, False, True, None]
    assert invalid == [False] * 5 + [True]


def test_decimal_keeps_its_scale_and_refuses_to_round() -> None:
    values, invalid = parse('"decimal(6,2)"', ["1.5", "1.2300", "-0.01", "1.234", "12345.6", "x"])
    assert values == [Decimal("1.50"), Decimal("1.23"), Decimal("-0.01"), None, None, None]
    assert invalid == [False, False, False, True, True, True]
    column = loads_schema('columns:\n  c: "decimal(6,2)"\n').column("c")
    assert column.explain("1.234") == "more than 2 decimal places"
    assert column.explain("12345.6") == "more than 4 digits before the decimal point"
    assert column.explain("x") == "not a decimal number"


def test_dates_iso_by_default_or_in_a_format_and_never_bent() -> None:
    assert parse("date", ["2026-02-28", "2026-02-30", "28.02.2026"]) == (
        [dt.date(2026, 2, 28), None, None],
        [False, True, True],
    )
    # strptime alone would turn 30.02. into 02.03.; the round trip refuses it.
    values, invalid = parse(
        '{type: date, format: "%d.%m.%Y"}', ["28.02.2026", "1.3.2026", "30.02.2026"]
    )
    assert values == [dt.date(2026, 2, 28), dt.date(2026, 3, 1), None]
    assert invalid == [False, False, True]


def test_timestamp_with_format_and_timezone() -> None:
    spec = '{type: timestamp, format: "%d/%m/%Y %H:%M", timezone: Europe/Berlin}'
    values, invalid = parse(
        spec,
        [
            "15/01/2026 10:30",  # winter: UTC+1
            "15/07/2026 10:30",  # summer: UTC+2
            "29/03/2026 02:30",  # skipped by the spring clock change
            "25/10/2026 02:30",  # happens twice: the first one is taken
            "2026-01-15 10:30",  # not the format
        ],
    )
    assert invalid == [False, False, True, False, True]
    assert values[0] == dt.datetime(2026, 1, 15, 10, 30, tzinfo=BERLIN)
    assert values[0].utcoffset() == dt.timedelta(hours=1)
    assert values[1].utcoffset() == dt.timedelta(hours=2)
    assert values[3].astimezone(dt.UTC) == dt.datetime(2026, 10, 25, 0, 30, tzinfo=dt.UTC)
    column = loads_schema(f"columns:\n  c: {spec}\n").column("c")
    assert column.arrow == pa.timestamp("us", tz="Europe/Berlin")
    assert "does not exist in Europe/Berlin" in column.explain("29/03/2026 02:30")
    assert "not a valid timestamp" in column.explain("2026-01-15 10:30")


def test_timestamp_iso_default_and_offsets_in_the_format() -> None:
    values, invalid = parse("timestamp", ["2026-01-15 10:30:00", "2026-01-15T10:30:00.5", "x"])
    assert values[:2] == [
        dt.datetime(2026, 1, 15, 10, 30),
        dt.datetime(2026, 1, 15, 10, 30, 0, 500000),
    ]
    assert invalid == [False, False, True]
    values, invalid = parse(
        '{type: timestamp, format: "%Y-%m-%dT%H:%M:%S%z"}', ["2026-01-15T10:30:00+0200"]
    )
    assert values == [dt.datetime(2026, 1, 15, 8, 30, tzinfo=dt.UTC)]


# --------------------------------------------------------------------------- rules


SCHEMA = """
columns:
  id: {type: int, required: true, unique: true, min: 1, max: 1000}
  email: {type: string, required: true, regex: '[^@\\s]+@[^@\\s]+\\.[a-z]{2,}'}
  country: {enum: [DE, FR, NL]}
  amount: {type: "decimal(8,2)", min: 0}
  signup: {type: date, min: 2020-01-01, max: "2030-12-31"}
"""


def test_each_rule_rejects_with_line_column_and_reason(harness: Any) -> None:
    result = harness(SCHEMA).run(
        "id,email,country,amount,signup\n"
        "1,a@b.de,DE,1.50,2026-01-01\n"  # 2 good
        "2,not-an-email,DE,1,2026-01-01\n"  # 3 regex
        "0,c@d.de,DE,1,2026-01-01\n"  # 4 min
        "1001,c@d.de,DE,1,2026-01-01\n"  # 5 max
        "3,c@d.de,XX,1,2026-01-01\n"  # 6 enum
        "4,c@d.de,FR,-1,2026-01-01\n"  # 7 decimal min
        "5,c@d.de,FR,1,2019-12-31\n"  # 8 date min
        ",c@d.de,FR,1,2026-01-01\n"  # 9 required
        "6,,,,\n"  # 10 required email; optional empties are fine
        "seven,c@d.de,NL,1,2026-01-01\n"  # 11 type
        "8,e@f.nl,,,\n"  # 12 good, nulls where empty
    )
    assert reasons(result) == [
        (3, "email", "does not match the pattern '[^@\\\\s]+@[^@\\\\s]+\\\\.[a-z]{2,}'"),
        (4, "id", "less than the minimum 1"),
        (5, "id", "greater than the maximum 1000"),
        (6, "country", "not one of DE, FR, NL"),
        (7, "amount", "less than the minimum 0.00"),
        (8, "signup", "less than the minimum 2020-01-01"),
        (9, "id", "required value is missing"),
        (10, "email", "required value is missing"),
        (11, "id", "not an integer"),
    ]
    assert result.rows == [
        {
            "id": 1,
            "email": "a@b.de",
            "country": "DE",
            "amount": Decimal("1.50"),
            "signup": dt.date(2026, 1, 1),
        },
        {"id": 8, "email": "e@f.nl", "country": None, "amount": None, "signup": None},
    ]
    first = result.rejects[0]
    assert first["value"] == "not-an-email"
    assert first["row"] == {
        "id": "2",
        "email": "not-an-email",
        "country": "DE",
        "amount": "1",
        "signup": "2026-01-01",
    }
    assert result.stats == {"rows_in": 11, "rows_out": 2, "rows_rejected": 9, "rows_written": 2}
    assert balanced(result)


def test_every_failure_of_a_row_is_listed_first_one_on_top(harness: Any) -> None:
    result = harness(SCHEMA).run("id,email,country,amount,signup\nx,bad,XX,1.234,2026-02-30\n")
    [record] = result.rejects
    assert (record["line"], record["column"], record["value"]) == (2, "id", "x")
    assert [(e["column"], e["reason"]) for e in record["errors"]] == [
        ("id", "not an integer"),
        ("email", "does not match the pattern '[^@\\\\s]+@[^@\\\\s]+\\\\.[a-z]{2,}'"),
        ("country", "not one of DE, FR, NL"),
        ("amount", "more than 2 decimal places"),
        ("signup", "not a valid date in the form %Y-%m-%d"),
    ]


def test_regex_must_match_the_whole_value(harness: Any) -> None:
    h = harness("columns:\n  code: {regex: '[A-Z]{2}'}\n")
    result = h.run("code\nDE\nDEU\nxDE\n\n")
    assert [r["code"] for r in result.rows] == ["DE"]
    assert [r["line"] for r in result.rejects] == [3, 4]


def test_unique_holds_across_batches_of_one_file(harness: Any) -> None:
    h = harness("columns:\n  id: {type: int, unique: true}\n  pad: string\n", block_size=1024)
    pad = "x" * 60
    rows = [f"{i},{pad}" for i in range(200)] + ["5,late", "199,late", " 007 ,late"]
    result = h.run("id,pad\n" + "\n".join(rows) + "\n")
    assert len(result.rows) == 200  # the file spans many blocks
    assert reasons(result) == [
        (202, "id", "duplicate of line 7"),
        (203, "id", "duplicate of line 201"),
        (204, "id", "duplicate of line 9"),  # compared as integers, not as text
    ]
    # Another file starts afresh: uniqueness is per input file.
    assert h.run("id,pad\n5,again\n", key="other.csv").rejects == []


def test_unique_only_counts_rows_that_are_otherwise_good(harness: Any) -> None:
    h = harness("columns:\n  id: {type: int, unique: true}\n  v: {type: int, min: 0}\n")
    result = h.run("id,v\n1,-1\n1,5\n1,6\n2,1\n2,2\n")
    assert reasons(result) == [
        (2, "v", "less than the minimum 0"),
        (4, "id", "duplicate of line 3"),
        (6, "id", "duplicate of line 5"),
    ]
    assert result.rows == [{"id": 1, "v": 5}, {"id": 2, "v": 1}]


def test_rename_casts_and_orders_columns_like_the_schema(harness: Any) -> None:
    h = harness(
        """
        columns:
          Amount: {type: float, rename: amount}
          ID: {type: int, rename: id}
        """
    )
    result = h.run("ID,Other,Amount\n1,x,2.5\n")
    assert result.schema.names == ["amount", "id", "Other"]
    assert result.schema.field("id").type == pa.int64()
    assert result.rows == [{"amount": 2.5, "id": 1, "Other": "x"}]


def test_extra_columns_drop_and_reject(harness: Any) -> None:
    h = harness("extra_columns: drop\ncolumns:\n  a: int\n")
    assert h.run("a,b\n1,2\n").rows == [{"a": 1}]
    h.set_schema("extra_columns: reject\ncolumns:\n  a: int\n")
    h.runner = FunctionRunner(h.pipeline, "f")  # schemas are read when the step is built
    with pytest.raises(InputError) as exc:
        h.run("a,b,c\n1,2,3\n", key="extra.csv")
    assert "unexpected columns 'b', 'c'" in str(exc.value)
    assert exc.value.file == "bronze/extra.csv"


def test_a_missing_declared_column_fails_the_file_naming_it(harness: Any) -> None:
    h = harness("columns:\n  id: int\n  email: string\n")
    with pytest.raises(InputError) as exc:
        h.run("id,mail\n1,a@b.de\n")
    assert exc.value.field == "email"
    assert "missing column 'email'" in str(exc.value)
    assert "bronze/in.csv" in str(exc.value)


def test_values_stay_as_written_when_the_schema_says_string(harness: Any) -> None:
    # read_csv reads text when a validate step follows, so nothing is inferred.
    result = harness("columns:\n  zip: string\n  n: int\n").run("zip,n\n08123,1\n")
    assert result.rows == [{"zip": "08123", "n": 1}]


# --------------------------------------------------------------------------- malformed rows


def test_rows_with_too_many_or_too_few_fields_are_quarantined_with_their_lines(
    harness: Any,
) -> None:
    h = harness("columns:\n  a: int\n  b: string\n  c: string\n")
    result = h.run(
        'a,b,c\r\n1,"two\r\nlines",x\r\n\r\n'  # lines 1-4
        '2,y\r\n3,y,z,extra\r\n4,"q,""w",z\r\n5,"open\nquote"\r\n'  # lines 5-9
    )
    assert reasons(result) == [
        (5, None, "expected 3 fields, got 2"),
        (6, None, "expected 3 fields, got 4"),
        (8, None, "expected 3 fields, got 2"),
    ]
    assert [r["value"] for r in result.rejects] == ["2,y", "3,y,z,extra", '5,"open\nquote"']
    assert [r["a"] for r in result.rows] == [1, 4]
    assert result.stats["rows_in"] == 5 and balanced(result)


def test_fail_mode_keeps_malformed_rows_fatal_with_their_line(harness: Any) -> None:
    h = harness("columns:\n  a: int\n  b: string\n", on_invalid="fail")
    with pytest.raises(InputError) as exc:
        h.run("a,b\n1,x\n2\n")
    assert exc.value.line == 3 and "expected 2 fields, got 1" in str(exc.value)


def test_fail_mode_names_file_line_field_and_value(harness: Any) -> None:
    h = harness(SCHEMA, on_invalid="fail")
    with pytest.raises(InputError) as exc:
        h.run("id,email,country,amount,signup\n1,a@b.de,DE,1,2026-01-01\n2,a@b.de,DE,x,\n")
    err = exc.value
    assert (err.file, err.line, err.field) == ("bronze/in.csv", 3, "amount")
    assert (
        str(err) == "bronze/in.csv:line 3 (field 'amount'): invalid value 'x': not a decimal number"
    )


def test_every_row_rejected_gives_an_empty_output_not_a_failure(harness: Any) -> None:
    h = harness("columns:\n  a: {type: int, required: true}\n  b: string\n")
    result = h.run("a,b\n,1\nx,2\n3\n")
    assert result.rows == []
    assert result.schema.names == ["a", "b"]
    assert [r["line"] for r in result.rejects] == [2, 3, 4]
    assert result.stats["rows_in"] == 3 and balanced(result)


def test_only_malformed_rows_is_not_a_header_only_file(harness: Any) -> None:
    result = harness("columns:\n  a: int\n  b: int\n").run("a,b\n1\n2\n")
    assert result.rows == [] and [r["line"] for r in result.rejects] == [2, 3]


# --------------------------------------------------------------------------- the reject file


def test_reject_file_is_listed_rewritten_and_removed_when_clean(
    harness: Any, tmp_path: Path
) -> None:
    h = harness("columns:\n  a: {type: int}\n")
    result = h.run("a\n1\nx\n")
    path = tmp_path / "staging" / "_rejected" / "in.csv.jsonl"
    assert result.outputs[0] == {
        "bucket": "staging",
        "key": "_rejected/in.csv.jsonl",
        "rows": 1,
        "bytes": path.stat().st_size,
        "kind": "rejects",
    }
    first = path.read_bytes()
    h.run("a\n1\nx\n")  # a re-delivery writes the same bytes
    assert path.read_bytes() == first
    h.run("a\n1\n2\n")  # a new, clean version of the input leaves no stale rejects
    assert not path.exists()


def test_rejects_bucket_can_be_chosen(harness: Any, tmp_path: Path) -> None:
    h = harness("columns:\n  a: int\n", extra=", rejects: quarantine")
    h.run("a\nx\n", key="dir/in.csv")
    lines = (tmp_path / "quarantine" / "_rejected" / "dir" / "in.csv.jsonl").read_text()
    assert json.loads(lines)["reason"] == "not an integer"


# --------------------------------------------------------------------------- line numbers


def numbered(data: bytes, **options: Any) -> tuple[list[dict[str, Any]], list[Any]]:
    malformed: list[Any] = []
    opts = CsvOptions(all_strings=True, line_column="line", **options)
    rows: list[dict[str, Any]] = []
    for batch in read_csv_batches(
        io.BytesIO(data), name="x.csv", options=opts, on_malformed=malformed.extend
    ):
        rows += batch.to_pylist()
    return rows, malformed


@pytest.mark.parametrize("encoding", ["utf-8", "latin-1"])
def test_line_numbers_survive_blocks_quotes_and_transcoding(encoding: str) -> None:
    # Latin-1 grows when turned into UTF-8: blocks must still map to batches.
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["id", "text"])
    expected = {}
    line = 2
    for i in range(400):
        text = ["éééééé", "multi\nline é", 'quote "é"', ""][i % 4]
        writer.writerow([i, text])
        expected[str(i)] = line
        line += 1 + text.count("\n")
    rows, malformed = numbered(buf.getvalue().encode(encoding), encoding=encoding, block_size=1024)
    assert {r["id"]: r["line"] for r in rows} == expected
    assert malformed == []


@pytest.mark.parametrize("where", ["leading", "middle", "trailing", "only"])
def test_blocks_of_nothing_but_malformed_rows_are_placed(where: str) -> None:
    # pyarrow delivers no batch for leading blocks without rows: they are passed over.
    good = [f"{i},x" for i in range(100)]
    bad = [f"{i}" for i in range(1000, 1400)]
    body = {
        "leading": bad + good,
        "middle": good[:50] + bad + good[50:],
        "trailing": good + bad,
        "only": bad,
    }[where]
    rows, malformed = numbered(("a,b\n" + "\n".join(body) + "\n").encode(), block_size=1024)
    line_of = {text: n for n, text in enumerate(body, start=2)}
    assert [(r["line"]) for r in rows] == [line_of[f"{r['a']},{r['b']}"] for r in rows]
    assert len(rows) == (0 if where == "only" else 100)
    assert [m.line for m in malformed] == [line_of[m.text] for m in malformed]
    assert sorted(m.text for m in malformed) == sorted(bad)


def test_rows_of_an_unplaceable_block_get_null_lines_but_are_kept() -> None:
    # A lone CR ends records for pyarrow but not for the LF line counter.
    rows, malformed = numbered(b"a,b\r1,2\r3\r4,5\r")
    assert [(r["a"], r["line"]) for r in rows] == [("1", None), ("4", None)]
    assert [(m.line, m.text) for m in malformed] == [(None, "3")]


# --------------------------------------------------------------------------- schema errors


def schema_problems(text: str) -> list[str]:
    with pytest.raises(ConfigError) as exc:
        loads_schema(textwrap.dedent(text), "schemas/customer.yaml")
    return exc.value.problems


def test_schema_errors_name_file_line_and_key_all_at_once() -> None:
    problems = schema_problems(
        """\
        columns:
          id: {type: integer}
          email: {regex: "(?=lookahead)"}
          signup: {type: date, timezone: Europe/Berlin}
          seen: {type: timestamp, timezone: Mars/Olympus}
          amount: {type: "decimal(5,2)", min: 1.234}
          n: {type: int, min: 10, max: 1}
          flag: {type: bool, min: 1}
          kind: {enum: []}
          code: {type: int, enum: [1, two]}
          x: {type: string, rename: n}
          y: {typo: 1}
          z: {required: perhaps}
        extra_columns: sometimes
        """
    )
    assert problems == [
        "schemas/customer.yaml:2: columns.id.type: unknown column type 'integer'; expected one of "
        "string, int, float, bool, date, timestamp, decimal(p,s)",
        "schemas/customer.yaml:3: columns.email.regex: invalid regular expression (RE2 syntax): "
        "Invalid regular expression: invalid perl operator: (?=",
        "schemas/customer.yaml:4: columns.signup.timezone: timezone is for timestamp columns",
        "schemas/customer.yaml:5: columns.seen.timezone: unknown time zone 'Mars/Olympus'",
        "schemas/customer.yaml:6: columns.amount.min: 1.234 is not a valid decimal bound",
        "schemas/customer.yaml:7: columns.n.min: min 10 is greater than max 1",
        "schemas/customer.yaml:8: columns.flag.min: min and max are for int, float, decimal, "
        "date and timestamp columns",
        "schemas/customer.yaml:9: columns.kind.enum: List should have at least 1 item after "
        "validation, not 0",
        "schemas/customer.yaml:10: columns.code.enum.1: 'two' is not a valid int value",
        "schemas/customer.yaml:11: columns.x.rename: output column 'n' is already the name of "
        "column 'n'",
        "schemas/customer.yaml:12: columns.y.typo: unknown key (check the spelling)",
        "schemas/customer.yaml:13: columns.z.required: Input should be a valid boolean, unable "
        "to interpret input",
        "schemas/customer.yaml:14: extra_columns: Input should be 'keep', 'drop' or 'reject'",
    ]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("", "schemas/customer.yaml:1: (top level): a schema file is a mapping"),
        (
            "columns: [a, b]\n",
            "schemas/customer.yaml:1: columns: Input should be a valid dictionary",
        ),
        ("columns:\n  a: {type: int\n", "schemas/customer.yaml:3: not valid YAML"),
        ("columns:\n  a: int\n  a: string\n", "schemas/customer.yaml:3: not valid YAML"),
        (
            "columns:\n  d: {type: date, min: 01.01.2020}\n",
            "columns.d.min: '01.01.2020' is not a valid date bound (ISO 8601)",
        ),
    ],
)
def test_schema_file_mistakes(text: str, expected: str) -> None:
    [problem] = schema_problems(text)
    assert problem.startswith(expected) or expected in problem, problem


def pipeline_problems(
    tmp_path: Path, steps: str, schema: str | None = "columns:\n  a: int\n"
) -> list[str]:
    if schema is not None:
        (tmp_path / "schemas").mkdir(exist_ok=True)
        (tmp_path / "schemas" / "c.yaml").write_text(schema)
    text = (
        "pipeline: t\nbuckets: {bronze: ./b, staging: ./s}\nqueues: {q: {}}\n"
        "functions:\n  f:\n    queue: q\n    steps:\n"
        + textwrap.indent(textwrap.dedent(steps), "      ")
    )
    with pytest.raises(ConfigError) as exc:
        loads(text, source="sluiceway.yaml", base_dir=tmp_path)
    return exc.value.problems


def test_schema_errors_surface_at_pipeline_load_with_both_lines(tmp_path: Path) -> None:
    [problem] = pipeline_problems(
        tmp_path,
        "- read_csv\n- validate: {schema: schemas/c.yaml}\n- write_parquet: {bucket: staging}\n",
        schema="columns:\n  a: int\n  b: {type: date, format: 5}\n",
    )
    assert problem == (
        "sluiceway.yaml:9: functions.f.steps.1.validate.schema: "
        "schemas/c.yaml:3: columns.b.format: Input should be a valid string"
    )


@pytest.mark.parametrize(
    ("steps", "expected"),
    [
        (
            "- read_csv\n- validate: {schema: schemas/nope.yaml}\n"
            "- write_parquet: {bucket: staging}\n",
            "steps.1.validate.schema: schemas/nope.yaml: no such schema file",
        ),
        (
            "- read_csv\n- validate: {schema: schemas/c.yaml, rejects: nowhere}\n"
            "- write_parquet: {bucket: staging}\n",
            "steps.1.validate.rejects: unknown bucket 'nowhere'",
        ),
        (
            "- read_csv\n- validate: {schema: schemas/c.yaml}\n- call: builtins:print\n",
            "steps.1.validate: rejected rows go beside the output, but no later step writes to a "
            "bucket; give 'rejects: BUCKET'",
        ),
        (
            "- validate: {schema: schemas/c.yaml}\n- write_parquet: {bucket: staging}\n",
            "steps.0.validate: validate needs a step before it that reads the input",
        ),
        (
            "- read_csv: {columns: {a: int}}\n- validate: {schema: schemas/c.yaml}\n"
            "- write_parquet: {bucket: staging}\n",
            "steps.1.validate: read_csv before validate must not type columns",
        ),
        (
            "- read_csv\n- validate: {schema: schemas/c.yaml, on_invalid: shrug}\n"
            "- write_parquet: {bucket: staging}\n",
            "steps.1.validate.on_invalid: Input should be 'quarantine' or 'fail'",
        ),
    ],
)
def test_validate_step_mistakes_are_found_at_load(
    tmp_path: Path, steps: str, expected: str
) -> None:
    [problem] = pipeline_problems(tmp_path, steps)
    assert expected in problem, problem


def test_fail_mode_needs_no_rejects_bucket(tmp_path: Path) -> None:
    (tmp_path / "c.yaml").write_text("columns:\n  a: int\n")
    text = (
        "pipeline: t\nbuckets: {bronze: ./b}\nqueues: {q: {}}\nfunctions:\n  f:\n    queue: q\n"
        "    steps: [read_csv, {validate: {schema: c.yaml, on_invalid: fail}},"
        " {call: 'builtins:print'}]\n"
    )
    assert loads(text, base_dir=tmp_path).functions["f"].steps


# --------------------------------------------------------------------------- property


PROPERTY_SCHEMA = """
columns:
  seq: {type: string, required: true}
  id: {type: int, required: true, unique: true, min: 1, max: 40}
  email: {regex: '[a-z]+@[a-z]+\\.de'}
  note: string
"""

KINDS = [
    "good",
    "good",
    "good",
    "multiline",
    "email",
    "range",
    "type",
    "missing",
    "many",
    "few",
    "blank",
]


@pytest.fixture(scope="module")
def property_harness(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Harness]:
    h = Harness(tmp_path_factory.mktemp("prop"), PROPERTY_SCHEMA, block_size=1024)
    yield h
    h.close()


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    kinds=st.lists(st.sampled_from(KINDS), min_size=1, max_size=120),
    ids=st.lists(st.integers(1, 40), min_size=120, max_size=120),
    crlf=st.booleans(),
)
def test_no_row_is_lost_or_duplicated(
    property_harness: Harness, kinds: list[str], ids: list[int], crlf: bool
) -> None:
    """Random mixes of good and bad rows: every row is either out or rejected, once."""
    newline = "\r\n" if crlf else "\n"
    out = io.StringIO()
    out.write("seq,id,email,note" + newline)
    line = 2
    seen_ids: set[int] = set()
    good: dict[str, int] = {}  # seq -> line
    bad: dict[int, str] = {}  # line -> reason prefix
    records = 0
    writer = csv.writer(out, lineterminator=newline)
    for n, (kind, key) in enumerate(zip(kinds, ids, strict=False)):
        seq = f"s{n}"
        fields = [seq, str(key), "ana@example.de", "plain"]
        if kind == "blank":
            out.write(newline)
            line += 1
            continue
        records += 1
        if kind == "multiline":
            fields[3] = "two\nlines, quoted"
        elif kind == "email":
            fields[2] = "not an email"
        elif kind == "range":
            fields[1] = str(key + 100)
        elif kind == "type":
            fields[1] = "x"
        elif kind == "missing":
            fields[1] = ""
        elif kind == "many":
            fields.append("extra")
        elif kind == "few":
            fields.pop()
        writer.writerow(fields)
        valid = kind in ("good", "multiline")
        if kind in ("many", "few"):
            bad[line] = "expected 4 fields"
        elif not valid:
            bad[line] = kind
        elif key in seen_ids:
            bad[line] = "duplicate"
        else:
            seen_ids.add(key)
            good[seq] = line
        line += 1 + fields[3].count("\n") if len(fields) > 3 else 1
    assume(records > 0)  # a file of blank lines is "header only", an error of its own
    result = property_harness.run(out.getvalue())
    assert result.stats["rows_in"] == records
    assert balanced(result)
    assert [r["seq"] for r in result.rows] == list(good)
    assert [r["line"] for r in result.rejects] == sorted(bad)
    for record in result.rejects:
        if bad[record["line"]] == "duplicate":
            assert record["reason"].startswith("duplicate of line")
        elif bad[record["line"]].startswith("expected"):
            assert record["reason"].startswith("expected 4 fields")
    assert len(result.rows) + len(result.rejects) == records
