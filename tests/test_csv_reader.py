"""Tests for the streaming CSV reader behind the read_csv step.

Besides the happy paths, most of the value is in the error tests: a user who
drops a broken file must be told which file, which line and which field, and a
raw pyarrow error must never reach them.
"""

from __future__ import annotations

import codecs
import csv
import datetime
import decimal
import gzip
import io
import json
import os
import sys
import threading
import zipfile
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.csv as pacsv
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sluiceway.errors import InputError
from sluiceway.steps.csv import READ_AHEAD_NICENESS, CsvOptions, arrow_type, read_csv_batches

NAME = "bronze/in/customers.csv"
SMALL_BLOCK = 1024  # the smallest block CsvOptions allows, to force many batches

SPECTRUM = Path(__file__).resolve().parents[2] / "shared" / "conformance" / "csv-spectrum"
REQUIRE_SERVICES = os.environ.get("SLUICEWAY_REQUIRE_SERVICES") == "1"
SPECTRUM_CASES = sorted((SPECTRUM / "csvs").glob("*.csv")) if SPECTRUM.is_dir() else []


class OnlyRead:
    """A network-like stream: no seek, no tell, and reads that come back short."""

    def __init__(self, data: bytes, chunk: int = 7) -> None:
        self._buffer = io.BytesIO(data)
        self._chunk = chunk

    def read(self, size: int = -1) -> bytes:
        if size is None or size < 0:
            size = self._chunk
        return self._buffer.read(min(size, self._chunk))


def batches(data: bytes | Any, name: str = NAME, **options: Any) -> list[pa.RecordBatch]:
    source = io.BytesIO(data) if isinstance(data, bytes) else data
    return list(read_csv_batches(source, name=name, options=CsvOptions(**options)))


def read(data: bytes | Any, name: str = NAME, **options: Any) -> pa.Table:
    return pa.Table.from_batches(batches(data, name, **options))


def rows(data: bytes | Any, name: str = NAME, **options: Any) -> list[dict[str, Any]]:
    return read(data, name, **options).to_pylist()


def error(data: bytes | Any, name: str = NAME, **options: Any) -> InputError:
    with pytest.raises(InputError) as info:
        batches(data, name, **options)
    assert info.value.file == name
    assert name in str(info.value)
    return info.value


def line_of(data: bytes, needle: bytes) -> int:
    """Physical (1-based) line on which ``needle`` starts in ``data``."""
    return data.count(b"\n", 0, data.index(needle)) + 1


def zipped(members: dict[str, bytes]) -> bytes:
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as zf:
        for member, content in members.items():
            zf.writestr(member, content)
    return out.getvalue()


def quoted_table(n: int) -> bytes:
    """A file whose rows contain commas, doubled quotes and quoted newlines."""
    lines = [b"id,text,amount"]
    for i in range(n):
        lines.append(b'%d,"row %d, says ""hi""\nand more",%d.25' % (i, i, i))
    return b"\n".join(lines) + b"\n"


# --------------------------------------------------------------------------- conformance


@pytest.mark.parametrize("case", SPECTRUM_CASES or [None], ids=lambda p: p.stem if p else "absent")
def test_csv_spectrum(case: Path | None) -> None:
    """Every csv-spectrum case parses to its JSON, all columns read as strings.

    csv-spectrum's ``empty*`` cases are files with empty *fields*, not empty
    files, so every case is expected to parse; empty files are covered below.
    The ``*_crlf`` files in the shared checkout have had their CRLFs turned
    into LFs (the JSON still expects "\\r\\n" inside quoted values), so when a
    ``*_crlf`` file holds no CR its upstream bytes are restored first.
    """
    if case is None:
        message = f"csv-spectrum conformance files not found under {SPECTRUM}"
        if REQUIRE_SERVICES:
            pytest.fail(message)
        pytest.skip(message)
    data = case.read_bytes()
    if case.stem.endswith("_crlf") and b"\r" not in data:
        data = data.replace(b"\n", b"\r\n")
    expected = json.loads((SPECTRUM / "json" / f"{case.stem}.json").read_text("utf-8"))
    assert rows(data, name=case.name, all_strings=True) == expected
    # The same with tiny non-seekable reads, so BOM/line handling is chunk-proof.
    assert rows(OnlyRead(data, chunk=1), name=case.name, all_strings=True) == expected


# --------------------------------------------------------------------------- formats


def test_reads_and_infers_types() -> None:
    table = read(b"id,name,score\n1,Ann,1.5\n2,Bob,2.0\n")
    assert table.schema.names == ["id", "name", "score"]
    assert table.schema.types == [pa.int64(), pa.string(), pa.float64()]
    assert table.to_pylist()[1] == {"id": 2, "name": "Bob", "score": 2.0}


def test_all_strings_keeps_values_as_written() -> None:
    table = read(b"zip,flag\n08123,true\n", all_strings=True)
    assert table.schema.types == [pa.string(), pa.string()]
    assert table.to_pylist() == [{"zip": "08123", "flag": "true"}]


def test_column_types_override_all_strings_and_inference() -> None:
    data = b"i,f,b,d,t,m,s\n1,1.5,true,2024-02-29,2024-02-29 12:30:00,12.34,007\n,,false,,,,\n"
    types = {
        "i": "int",
        "f": "float",
        "b": "bool",
        "d": "date",
        "t": "timestamp",
        "m": "decimal(10,2)",
        "s": "string",
    }
    table = read(data, column_types=types)
    assert table.schema.types == [
        pa.int64(),
        pa.float64(),
        pa.bool_(),
        pa.date32(),
        pa.timestamp("us"),
        pa.decimal128(10, 2),
        pa.string(),
    ]
    first, second = table.to_pylist()
    assert first == {
        "i": 1,
        "f": 1.5,
        "b": True,
        "d": datetime.date(2024, 2, 29),
        "t": datetime.datetime(2024, 2, 29, 12, 30),
        "m": decimal.Decimal("12.34"),
        "s": "007",
    }
    assert second == {"i": None, "f": None, "b": False, "d": None, "t": None, "m": None, "s": ""}
    # all_strings applies only to columns column_types does not name.
    mixed = read(b"a,b\n1,2\n", all_strings=True, column_types={"b": "int"})
    assert mixed.schema.types == [pa.string(), pa.int64()]


def test_null_values_apply_to_string_columns_too() -> None:
    table = read(b"a,b\n-,x\n1,-\n", null_values=["-"], column_types={"a": "int"})
    assert table.to_pylist() == [{"a": None, "b": "x"}, {"a": 1, "b": None}]


def test_bom_is_stripped() -> None:
    assert rows(b"\xef\xbb\xbfname,age\n\xc3\xa9mile,3\n") == [{"name": "émile", "age": 3}]
    # An explicit utf-8-sig behaves the same.
    assert rows(b"\xef\xbb\xbfa\nx\n", encoding="utf-8-sig") == [{"a": "x"}]


def test_crlf_line_endings() -> None:
    data = b'a,b\r\n1,"two\r\nlines"\r\n3,x\r\n'
    assert rows(data, all_strings=True) == [
        {"a": "1", "b": "two\r\nlines"},
        {"a": "3", "b": "x"},
    ]


@pytest.mark.parametrize("encoding", ["latin-1", "iso-8859-1", "cp1252"])
def test_single_byte_encodings_are_transcoded(encoding: str) -> None:
    text = "name;city\nJosé;Zürich\nRenée;Orléans\n"
    data = text.encode(encoding)
    assert rows(data, encoding=encoding, delimiter=";") == [
        {"name": "José", "city": "Zürich"},
        {"name": "Renée", "city": "Orléans"},
    ]


def test_cp1252_specific_characters() -> None:
    data = "item,price\nbook,€5 – “cheap”\n".encode("cp1252")
    assert rows(data, encoding="cp1252") == [{"item": "book", "price": "€5 – “cheap”"}]


def test_latin1_across_many_blocks() -> None:
    lines = ["n;v"] + [f"{i};çà{i}" for i in range(3000)]
    data = ("\n".join(lines) + "\n").encode("latin-1")
    table = read(OnlyRead(data, chunk=333), encoding="latin-1", delimiter=";", block_size=1024)
    assert table.column("v").to_pylist() == [f"çà{i}" for i in range(3000)]


@pytest.mark.parametrize("delimiter", [";", "\t", "|"])
def test_delimiters(delimiter: str) -> None:
    d = delimiter.encode()
    data = b"a" + d + b"b" + d + b"c\n1" + d + b'"x' + d + b'y"' + d + b"3\n"
    assert rows(data, delimiter=delimiter, all_strings=True) == [
        {"a": "1", "b": f"x{delimiter}y", "c": "3"}
    ]


def test_trailing_empty_lines_are_ignored() -> None:
    assert rows(b"a,b\n1,2\n\n\n\n") == [{"a": 1, "b": 2}]
    assert rows(b"a,b\r\n1,2\r\n\r\n\r\n") == [{"a": 1, "b": 2}]
    assert rows(b"a,b\n1,2\n\n3,4\n\n") == [{"a": 1, "b": 2}, {"a": 3, "b": 4}]


def test_missing_final_newline() -> None:
    assert rows(b"a,b\n1,2") == [{"a": 1, "b": 2}]
    assert rows(b'a,b\n1,"x\ny"', all_strings=True) == [{"a": "1", "b": "x\ny"}]


def test_no_header_autogenerates_names() -> None:
    assert rows(b"1,x\n2,y\n", header=False) == [{"f0": 1, "f1": "x"}, {"f0": 2, "f1": "y"}]


@pytest.mark.parametrize(
    ("name", "compression"),
    [
        ("in/data.csv.gz", "auto"),  # by suffix
        ("in/data.csv", "auto"),  # by magic bytes
        ("in/data", "gzip"),  # explicit
    ],
)
def test_gzip(name: str, compression: str) -> None:
    data = gzip.compress(quoted_table(50))
    expected = rows(quoted_table(50))
    assert rows(data, name=name, compression=compression) == expected
    assert rows(OnlyRead(data), name=name, compression=compression) == expected


def test_multi_member_gzip() -> None:
    data = gzip.compress(b"a,b\n1,2\n") + gzip.compress(b"3,4\n")
    assert rows(data, name="x.gz") == [{"a": 1, "b": 2}, {"a": 3, "b": 4}]


@pytest.mark.parametrize("name", ["in/data.zip", "in/data.csv"])
def test_zip_single_member(name: str) -> None:
    data = zipped({"customers.csv": quoted_table(40)})
    expected = rows(quoted_table(40))
    assert rows(data, name=name) == expected
    assert rows(OnlyRead(data, chunk=4096), name=name) == expected  # spooled to disk
    assert rows(data, name=name, compression="zip") == expected


def test_zip_ignores_directories_and_macos_junk() -> None:
    data = zipped(
        {
            "export/": b"",
            "export/customers.csv": b"a\n1\n",
            "__MACOSX/export/._customers.csv": b"junk",
            "export/.DS_Store": b"junk",
        }
    )
    assert rows(data, name="x.zip") == [{"a": 1}]


def test_zip_prefers_the_one_csv_member() -> None:
    data = zipped({"README.md": b"# hi\n", "data.csv": b"a\n1\n"})
    assert rows(data, name="x.zip") == [{"a": 1}]


def test_none_compression_reads_gzip_magic_as_text() -> None:
    # "none" means exactly that: no sniffing. Gzip bytes are then not UTF-8.
    err = error(gzip.compress(b"a\n1\n"), compression="none")
    assert "UTF-8" in err.message


def test_non_seekable_source() -> None:
    data = quoted_table(200)
    assert rows(OnlyRead(data, chunk=1)) == rows(data)


def test_seekable_source_is_not_rewound_or_closed() -> None:
    source = io.BytesIO(b"junk-prefix" + b"a,b\n1,2\n")
    source.seek(len(b"junk-prefix"))
    assert [b.to_pylist() for b in read_csv_batches(source, name=NAME)] == [[{"a": 1, "b": 2}]]
    assert not source.closed


def test_multi_batch_concatenation_equals_input() -> None:
    data = quoted_table(2000)
    parts = batches(OnlyRead(data, chunk=1000), block_size=SMALL_BLOCK, all_strings=True)
    assert len(parts) > 50
    assert all(b.num_rows > 0 for b in parts)
    expected = list(csv.DictReader(io.StringIO(data.decode(), newline="")))
    assert pa.Table.from_batches(parts).to_pylist() == expected


@pytest.mark.parametrize("bom", [b"", codecs.BOM_UTF8])
@pytest.mark.parametrize("all_strings", [False, True])
def test_files_around_one_block_are_read_to_the_end(bom: bytes, all_strings: bool) -> None:
    """A file within its first block is parsed from the bytes the fast pass checked;
    one a byte longer (with or without a BOM) must still be read to its last row."""
    header = b"n,text\n"
    for size in range(SMALL_BLOCK - 3, SMALL_BLOCK + 6):
        rest = size - len(header)
        full = (rest - 7) // 16
        last = rest - 16 * full  # 7..22 bytes
        body = b"".join(b"%04d,abcdefghij\n" % i for i in range(full))
        data = bom + header + body + b"%04d," % full + b"y" * (last - 6) + b"\n"
        assert len(data) == size + len(bom)
        got = rows(data, block_size=SMALL_BLOCK, all_strings=all_strings)
        assert len(got) == full + 1, size
        assert got[-1] == {"n": f"{full:04d}" if all_strings else full, "text": "y" * (last - 6)}


def test_reading_can_stop_early() -> None:
    data = gzip.compress(quoted_table(5000))
    iterator = read_csv_batches(
        OnlyRead(data, 4096), name="x.gz", options=CsvOptions(block_size=1024)
    )
    first = next(iterator)
    assert first.num_rows > 0
    iterator.close()  # must not hang or complain from pyarrow's read-ahead thread


# --------------------------------------------------------------------------- options


@pytest.mark.parametrize(
    "options",
    [
        {"delimiter": ",,"},
        {"delimiter": '"'},
        {"encoding": "no-such-encoding"},
        {"compression": "bzip2"},
        {"block_size": 10},
        {"column_types": {"a": "integer128"}},
        {"column_types": {"a": "decimal(2,5)"}},
    ],
)
def test_invalid_options_fail_at_construction(options: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        CsvOptions(**options)


def test_arrow_type_names() -> None:
    assert arrow_type(" Decimal(5, 2) ") == pa.decimal128(5, 2)
    assert arrow_type("decimal(40,2)") == pa.decimal256(40, 2)
    assert arrow_type("INT") == pa.int64()


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize("data", [b"", b" ", b"\n\n\n", b" \t\r\n  \n"])
def test_empty_file(data: bytes) -> None:
    err = error(data)
    assert err.message == "empty file"
    assert str(err) == f"{NAME}: empty file"


def test_empty_compressed_files() -> None:
    assert error(gzip.compress(b""), name="x.csv.gz").message == "empty file"
    assert error(zipped({"x.csv": b"\n"}), name="x.zip").message == "empty file"
    assert "empty file" in error(zipped({}), name="x.zip").message


def test_large_whitespace_prefix_is_skipped_not_kept() -> None:
    assert error(b" \n" * 5000, block_size=SMALL_BLOCK).message == "empty file"
    assert rows(b"\n" * 5000 + b"a\n1\n", block_size=SMALL_BLOCK) == [{"a": 1}]


@pytest.mark.parametrize("data", [b"a,b\n", b"a,b", b"a,b\r\n\r\n\n", b"\xef\xbb\xbfa,b\n"])
def test_header_only(data: bytes) -> None:
    assert error(data).message == "header only, no data rows"


def test_invalid_utf8_names_the_line() -> None:
    err = error(b"a,b\n1,ok\n2,caf\xe9\n3,ok\n")
    assert err.line == 3
    assert f"{NAME}:line 3:" in str(err)
    assert "UTF-8" in err.message and "latin-1" in err.message


def test_invalid_utf8_inside_quoted_newlines_counts_physical_lines() -> None:
    data = b'a,b\n1,"x\ny\nz"\n2,\xff\n'
    assert error(data).line == 5


@pytest.mark.parametrize("source", ["bytes", "stream"])
def test_invalid_utf8_deep_in_a_stream(source: str) -> None:
    data = quoted_table(3000)
    bad_at = data.index(b"row 2500,")
    data = data[:bad_at] + b"\xc3\x28" + data[bad_at:]
    err = error(data if source == "bytes" else OnlyRead(data, chunk=999), block_size=SMALL_BLOCK)
    assert err.line == line_of(data, b"\xc3\x28")


def test_invalid_utf8_split_across_reads() -> None:
    # A valid two-byte character split by a short read must not be an error...
    assert rows(OnlyRead(b"a\n\xc3\xa9\n", chunk=3)) == [{"a": "é"}]
    # ...but a truncated one at the very end is.
    err = error(b"a\nx\n\xc3")
    assert err.line == 3


def test_undecodable_byte_in_declared_encoding() -> None:
    err = error(b"a\nx\n\x81\n", encoding="cp1252")
    assert err.line == 3
    assert "cp1252" in err.message


@pytest.mark.parametrize(
    ("data", "line", "message"),
    [
        (b"a,b,c\n1,2,3\n4,5\n", 3, "expected 3 fields, got 2"),
        (b"a,b\n1,2\n3,4,5\n6,7\n", 3, "expected 2 fields, got 3"),
        (b'a,b\n1,"multi\nline"\n\n2\n', 5, "expected 2 fields, got 1"),
        (b"a,b\r\n1,2\r\n3\r\n", 3, "expected 2 fields, got 1"),
    ],
)
def test_wrong_number_of_fields(data: bytes, line: int, message: str) -> None:
    err = error(data)
    assert err.line == line
    assert err.message == message
    assert f"{NAME}:line {line}: {message}" == str(err)


@pytest.mark.parametrize("source", ["bytes", "stream"])
def test_wrong_number_of_fields_deep_in_a_multi_block_file(source: str) -> None:
    data = quoted_table(3000)
    bad_at = data.index(b"2718,")
    data = data[:bad_at] + b"oops\n" + data[bad_at:]
    stream = data if source == "bytes" else OnlyRead(data, chunk=4000)
    err = error(stream, block_size=SMALL_BLOCK)
    assert err.line == line_of(data, b"oops\n")
    assert err.message == "expected 3 fields, got 1"


def test_declared_type_conversion_names_field_and_line() -> None:
    data = b'id,amount\n1,"x\ny"\n2,3.5\n3,lots\n'
    err = error(data, column_types={"id": "int", "amount": "float"}, header=True)
    assert err.field == "amount"
    assert err.line == 2  # the quoted "x\ny" comes first
    assert str(err).startswith(f"{NAME}:line 2 (field 'amount'):")
    err = error(b"id,amount\n1,2\n2,3.5\n3,lots\n", column_types={"amount": "float"})
    assert (err.line, err.field) == (4, "amount")
    assert "'lots'" in err.message and "double" in err.message


def test_conversion_error_without_value_in_pyarrow_message() -> None:
    # pyarrow's decimal rescaling error does not quote the value; it is found anyway.
    err = error(b"a,price\n1,2.50\n2,2.505\n", column_types={"price": "decimal(6,2)"})
    assert (err.line, err.field) == (3, "price")
    assert "'2.505'" in err.message


@pytest.mark.parametrize("source", ["bytes", "stream"])
def test_inferred_type_broken_in_a_later_block(source: str) -> None:
    lines = [b"n,code"] + [b"%d,%d" % (i, i) for i in range(2000)]
    lines.insert(1500, b"1,A17")
    data = b"\n".join(lines) + b"\n"
    err = error(data if source == "bytes" else OnlyRead(data, chunk=500), block_size=SMALL_BLOCK)
    assert (err.line, err.field) == (1501, "code")  # list index 1500 is line 1501
    assert "'A17'" in err.message


@pytest.mark.parametrize("source", ["bytes", "stream"])
def test_rows_before_a_late_error_are_yielded_once_and_in_order(source: str) -> None:
    """A seekable file is read by the fast pass and, when that fails, again by the
    precise pass; the consumer must still see one stream: each good row once, in
    file order, with one schema, then the precise error."""
    lines = [b"n,word"] + [b"%d,w%d" % (i, i) for i in range(3000)]
    lines.insert(2601, b"2600,too,many")
    data = b"\n".join(lines) + b"\n"
    stream = io.BytesIO(data) if source == "bytes" else OnlyRead(data, chunk=800)
    seen: list[pa.RecordBatch] = []
    with pytest.raises(InputError) as info:
        for batch in read_csv_batches(stream, name=NAME, options=CsvOptions(block_size=1024)):
            seen.append(batch)
    assert (info.value.line, info.value.message) == (2602, "expected 2 fields, got 3")
    assert len(seen) > 10 and len({b.schema for b in seen}) == 1
    got = pa.Table.from_batches(seen).column("n").to_pylist()
    assert got == list(range(len(got))) and len(got) > 2000


def test_row_longer_than_block_is_an_input_error() -> None:
    data = b"a,b\n1,2\n" + b'3,"' + b"x" * 5000 + b'"\n'
    err = error(data, block_size=SMALL_BLOCK)
    assert "block_size" in err.message


def test_corrupt_gzip() -> None:
    data = gzip.compress(quoted_table(100))
    assert "gzip" in error(data[:-30], name="x.csv.gz").message  # truncated
    assert "gzip" in error(b"\x1f\x8bnot really gzip", name="x.csv.gz").message
    assert "gzip" in error(b"a,b\n1,2\n", name="x.csv.gz").message  # suffix lies


def test_corrupt_zip() -> None:
    assert "zip" in error(b"PK\x03\x04 garbage", name="x.zip").message
    assert "zip" in error(OnlyRead(b"PK\x03\x04 garbage"), name="x.zip").message


def test_zip_with_several_csv_members() -> None:
    data = zipped({"a.csv": b"a\n1\n", "b.csv": b"b\n2\n"})
    err = error(data, name="x.zip")
    assert "a.csv" in err.message and "b.csv" in err.message


# --------------------------------------------------------------------------- properties

_text = st.text(
    alphabet=st.one_of(
        st.sampled_from([",", '"', "\n", "\r", " ", ";", "'", "é", "😀", "\t"]),
        st.characters(exclude_categories=("Cs",), exclude_characters="\x00\ufeff"),
    ),
    max_size=40,
)


@st.composite
def _tables(draw: st.DrawFn, min_width: int = 1) -> tuple[list[str], list[list[str]]]:
    width = draw(st.integers(min_width, 4))
    header = draw(
        st.lists(
            _text.filter(lambda s: s.strip() != ""), min_size=width, max_size=width, unique=True
        )
    )
    body = draw(st.lists(st.lists(_text, min_size=width, max_size=width), min_size=1, max_size=30))
    return header, body


def _write(header: list[str] | None, body: list[list[str]], terminator: str) -> bytes:
    """Write rows with Python's csv module, the way most producers do.

    Python 3.11's writer quotes a field with a lone CR only if CR is part of
    the line terminator; left bare, CR is a line break to every CSV reader, so
    rows holding one are written fully quoted instead.
    """
    out = io.StringIO()
    minimal = csv.writer(out, lineterminator=terminator)
    quote_all = csv.writer(out, lineterminator=terminator, quoting=csv.QUOTE_ALL)
    for row in ([header] if header is not None else []) + body:
        lone_cr = "\r" not in terminator and any("\r" in value for value in row)
        (quote_all if lone_cr else minimal).writerow(row)
    return out.getvalue().encode("utf-8")


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    table=_tables(),
    terminator=st.sampled_from(["\n", "\r\n"]),
    block_size=st.sampled_from([SMALL_BLOCK, 1 << 20]),
    gzipped=st.booleans(),
    seekable=st.booleans(),
)
def test_round_trip_of_python_csv(
    table: tuple[list[str], list[list[str]]],
    terminator: str,
    block_size: int,
    gzipped: bool,
    seekable: bool,
) -> None:
    header, body = table
    data = _write(header, body, terminator)
    if gzipped:
        data = gzip.compress(data)
    source = io.BytesIO(data) if seekable else OnlyRead(data, chunk=500)
    got = read(source, name="x.csv", all_strings=True, block_size=block_size)
    assert got.schema.names == header
    assert [list(row.values()) for row in got.to_pylist()] == body


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    table=_tables(min_width=2),
    padding=st.integers(0, 120),
    where=st.floats(0, 1),
    seekable=st.booleans(),
)
def test_bad_row_line_number_matches_physical_line(
    table: tuple[list[str], list[list[str]]], padding: int, where: float, seekable: bool
) -> None:
    header, body = table
    # Pad with rows holding quoted newlines so the file spans several blocks.
    body = body + [["multi\nline", *[f"p{i}"] * (len(header) - 1)] for i in range(padding)]
    cut = int(where * len(body))
    before = _write(header, body[:cut], "\n")
    after = _write(None, body[cut:], "\n")
    bad = b"B0D," * len(header) + b"B0D\n"  # one field too many
    data = before + bad + after
    source = io.BytesIO(data) if seekable else OnlyRead(data, chunk=700)
    err = error(source, name="x.csv", all_strings=True, block_size=SMALL_BLOCK)
    assert err.line == line_of(data, bad)
    assert err.message == f"expected {len(header)} fields, got {len(header) + 1}"


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    notes=st.lists(_text, min_size=1, max_size=200),
    bad=st.data(),
    bad_value=st.sampled_from(["x", "1.5", "1e3", "--1", "12a"]),
    seekable=st.booleans(),
)
def test_bad_value_line_number_matches_physical_line(
    notes: list[str], bad: st.DataObject, bad_value: str, seekable: bool
) -> None:
    index = bad.draw(st.integers(0, len(notes) - 1))
    body = [[str(i) if i != index else bad_value, note] for i, note in enumerate(notes)]
    data = _write(["n", "note"], body, "\n")
    err = error(
        io.BytesIO(data) if seekable else OnlyRead(data, chunk=900),
        name="x.csv",
        column_types={"n": "int", "note": "string"},
        block_size=SMALL_BLOCK,
    )
    out = io.StringIO()
    csv.writer(out, lineterminator="\n").writerows(body[:index])
    assert err.line == 2 + out.getvalue().count("\n")
    assert err.field == "n"
    assert repr(bad_value) in err.message


# -- the parallel fast pass -------------------------------------------------------------


def _streaming(data: bytes, options: CsvOptions) -> pa.Table:
    """What the fast pass was before it went parallel: pyarrow's streaming reader."""
    from sluiceway.steps.csv import _convert_options, _parse_options, _read_options

    names = data.split(b"\n", 1)[0].decode().split(",") if options.all_strings else []
    reader = pacsv.open_csv(
        pa.BufferReader(data),
        read_options=_read_options(options),
        parse_options=_parse_options(options),
        convert_options=_convert_options(options, names),
    )
    return reader.read_all()


def _same_as_streaming(data: bytes, **options: Any) -> None:
    """The parallel pass yields what the streaming reader does, or the file's error."""
    csv_options = CsvOptions(**options)
    try:
        want = _streaming(data, csv_options)
    except pa.ArrowInvalid:
        with pytest.raises(InputError):
            read(data, **options)
        return
    got = read(data, **options)
    assert got.schema == want.schema
    assert got.to_pylist() == want.to_pylist()


def test_parallel_pass_matches_the_streaming_reader_across_many_blocks() -> None:
    # Quoted newlines, commas and doubled quotes at every distance from a block's end.
    body = b"".join(
        b'%d,"note %d\nline, ""two""",%d.5,2024-01-%02d\r\n' % (i, i, i, i % 28 + 1)
        for i in range(3000)
    )
    _same_as_streaming(b"n,note,x,day\n" + body, block_size=SMALL_BLOCK)
    _same_as_streaming(b"n,note,x,day\n" + body, block_size=1 << 14, all_strings=True)


def test_stray_quote_in_an_unquoted_field_does_not_misplace_a_cut() -> None:
    """pyarrow takes ``5'11"`` literally; counted as a quote it would shift every cut after it."""
    rows = [b"%d,5'11\",x" % i if i % 97 == 0 else b'%d,"a\nb",y' % i for i in range(2000)]
    data = b"n,height,z\n" + b"\n".join(rows) + b"\n"
    _same_as_streaming(data, block_size=SMALL_BLOCK)
    # The stray quote in the last column: a wrong cut would merge rows silently.
    rows = [b"%d,x,5'11\"" % i if i % 89 == 0 else b'%d,"a\nb",y' % i for i in range(2000)]
    _same_as_streaming(b"n,z,height\n" + b"\n".join(rows) + b"\n", block_size=SMALL_BLOCK)


_cells = st.one_of(
    st.integers(-(10**6), 10**6).map(str),
    st.text(alphabet="ab,\"\n 5'", max_size=8),
    st.text(alphabet="ab,\"\n 5'", max_size=8).map(lambda s: '"' + s.replace('"', '""') + '"'),
)


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    rows=st.lists(st.lists(_cells, min_size=3, max_size=3), min_size=100, max_size=600),
    terminator=st.sampled_from(["\n", "\r\n"]),
)
def test_parallel_pass_on_raw_text_matches_the_streaming_reader(
    rows: list[list[str]], terminator: str
) -> None:
    # Written raw, not by a CSV writer: stray quotes, ragged rows and broken
    # quoting included, wherever the blocks happen to be cut.
    text = terminator.join(["a,b,c", *(",".join(r) for r in rows)]) + terminator
    _same_as_streaming(text.encode(), block_size=SMALL_BLOCK)


def test_records_longer_than_blocks_in_the_parallel_pass() -> None:
    huge = b'"' + b"x\n" * 20_000 + b'"'  # 40 KB: many 1 KiB blocks, then more than it holds
    rows = b"".join(b"%d,v%d\n" % (i, i) for i in range(500))
    _same_as_streaming(b"n,v\n" + rows + b"501," + huge + b"\n" + rows, block_size=SMALL_BLOCK)
    # The first record alone is longer than the first block.
    _same_as_streaming(b"n,v\n1," + huge + b"\n" + rows, block_size=SMALL_BLOCK)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="a thread's niceness is Linux's")
def test_parse_threads_yield_to_the_thread_consuming_their_batches(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The parallel pass parses at a lower priority than its caller, whose own is unchanged."""

    def niceness() -> int:
        return os.getpriority(os.PRIO_PROCESS, threading.get_native_id())

    seen: list[tuple[str, int]] = []
    real = pacsv.read_csv

    def recording(*args: Any, **kwargs: Any) -> pa.Table:
        seen.append((threading.current_thread().name, niceness()))
        return real(*args, **kwargs)

    monkeypatch.setattr(pacsv, "read_csv", recording)
    before = niceness()
    body = b"".join(b"%d,row %d\n" % (i, i) for i in range(3000))
    assert read(b"n,v\n" + body, block_size=SMALL_BLOCK).num_rows == 3000
    parsed = [n for name, n in seen if name.startswith("sluiceway-csv")]
    assert len(parsed) > 10  # many blocks, each parsed in the pool
    assert set(parsed) == {min(before + READ_AHEAD_NICENESS, 19)}
    assert niceness() == before
