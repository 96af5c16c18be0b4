"""Streaming CSV reader behind the ``read_csv`` step.

CSV files landing in a bucket can be many gigabytes, arrive compressed, in
Latin-1, with a BOM, or over a network stream that cannot seek.  This module
turns such a byte stream into Arrow record batches with flat memory use, and
turns every way a file can be broken into an :class:`InputError` that names the
file, the physical line (1-based, as an editor shows it) and, where relevant,
the field, so whoever dropped the file can fix it without guessing.

How it is put together, from the bytes up::

    source (BinaryIO, maybe not seekable)
      -> decompression: none / gzip (Python ``gzip``) / zip (first and only member)
      -> _Utf8Source: BOM stripped, UTF-8 validated, or other encodings transcoded
      -> _BlockFeeder: cuts record-aligned blocks, counts lines, keeps the blocks
         pyarrow has not turned into batches yet
      -> pyarrow.csv.open_csv (use_threads=True) -> record batches

Why the feeder: with ``use_threads=True`` pyarrow reports neither row nor line
numbers in its errors.  Because every block the feeder hands out ends on a
record boundary and the feeder knows the line each block starts on, an error
can be pinned down afterwards by re-scanning only the few blocks pyarrow had
read but not yet delivered, without the source ever having to be seekable.

The feeder is Python and runs under the GIL, which makes it the slowest part of
a conversion (about half of pyarrow's own speed).  Most files are fine, and
for those its precision buys nothing, so a seekable, uncompressed UTF-8 source
that needs neither line numbers nor malformed-row handling is read optimistically
(the *fast pass*): pyarrow's native reader straight on the file, after checking
that the first block (the one pyarrow infers types from) is valid UTF-8, which
together with ``check_utf8`` leaves no text unchecked.  A file larger than a
block is cut into blocks where records end, parsed on every core at once
(``_parallel_batches``; pyarrow's streaming reader uses one).  If pyarrow
fails, or finds no rows, the file is rewound and read again with the feeder (the *precise
pass*), which turns the failure into the same error with file, line and field
as if it had been read that way from the start.  Rows the fast pass already
yielded are skipped, and the precise pass is given the fast pass's column types,
so a consumer sees one consistent stream whichever way it ended.
"""

from __future__ import annotations

import codecs
import contextlib
import csv
import gzip
import io
import os
import re
import shutil
import sys
import tempfile
import threading
import zipfile
import zlib
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import IO, Any, BinaryIO, Protocol

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv

from sluiceway.errors import InputError

__all__ = [
    "COMPRESSIONS",
    "TYPE_NAMES",
    "CsvOptions",
    "MalformedRow",
    "arrow_type",
    "read_csv_batches",
]

#: Values accepted for :attr:`CsvOptions.compression`.
COMPRESSIONS = ("auto", "none", "gzip", "zip")

_SIMPLE_TYPES: dict[str, pa.DataType] = {
    "string": pa.string(),
    "int": pa.int64(),
    "float": pa.float64(),
    "bool": pa.bool_(),
    "date": pa.date32(),
    # Naive (no time zone): values with an offset such as "Z" are rejected by
    # pyarrow, which is the honest outcome for a column declared as local time.
    "timestamp": pa.timestamp("us"),
}

#: Type names accepted in :attr:`CsvOptions.column_types` (plus ``decimal(p,s)``).
TYPE_NAMES = (*_SIMPLE_TYPES, "decimal(p,s)")

_DECIMAL = re.compile(r"decimal\(\s*(\d+)\s*,\s*(\d+)\s*\)")
_COLUMN_COUNT = re.compile(r"Expected (\d+) columns, got (\d+)")
_CONVERSION = re.compile(r"In CSV column #(\d+): (?:Row #\d+: )?(.*)", re.S)
_INVALID_VALUE = re.compile(r"CSV conversion error to (.+?): invalid value '(.*)'$", re.S)

_UTF8_BOM = codecs.BOM_UTF8
_WHITESPACE = b" \t\r\n\f\v"
_COPY_CHUNK = 1 << 20
_INT32_MAX = (1 << 31) - 1


def arrow_type(name: str) -> pa.DataType:
    """Return the Arrow type for a pipeline type name.

    Pipeline files speak a small vocabulary (``string, int, float, bool, date,
    timestamp, decimal(p,s)``) rather than Arrow's, so config stays portable
    across output formats.  Raises ``ValueError`` for anything else.
    """
    key = name.strip().lower()
    if key in _SIMPLE_TYPES:
        return _SIMPLE_TYPES[key]
    match = _DECIMAL.fullmatch(key)
    if match:
        precision, scale = int(match.group(1)), int(match.group(2))
        if not 1 <= precision <= 76 or scale > precision:
            raise ValueError(f"invalid decimal type {name!r}: need 1 <= p <= 76 and s <= p")
        factory = pa.decimal128 if precision <= 38 else pa.decimal256
        return factory(precision, scale)
    raise ValueError(f"unknown column type {name!r}; expected one of {', '.join(TYPE_NAMES)}")


@dataclass(frozen=True)
class CsvOptions:
    """How to read one CSV file.

    ``column_types`` maps column names to pipeline type names (see
    :func:`arrow_type`); other columns are inferred by pyarrow from the first
    block.  ``all_strings`` reads every column not named in ``column_types`` as
    a string, exactly as written in the file (no "08123" -> 8123), which is what
    a byte-faithful landing zone or a conformance test wants.

    ``null_values``: when ``None`` pyarrow's defaults apply ("", "NULL", "NA",
    ...) and string columns never become null; when given, exactly these values
    are null, in string columns too.

    ``line_column`` adds an ``int64`` column of that name holding the physical
    line (1-based) each row starts on, so a later step can name the line of a
    bad value; it is null for the rows of a block whose lines could not be
    worked out (line endings other than LF or CRLF).

    Invalid options raise ``ValueError`` at construction, before any file is
    touched, because they are configuration mistakes rather than bad input.
    """

    delimiter: str = ","
    encoding: str = "utf-8"
    compression: str = "auto"
    header: bool = True
    column_types: dict[str, str] | None = None
    block_size: int = 4 << 20
    null_values: list[str] | None = None
    all_strings: bool = False
    line_column: str | None = None

    def __post_init__(self) -> None:
        if len(self.delimiter) != 1 or self.delimiter in '"\r\n':
            raise ValueError(
                f"delimiter must be one character other than a quote or newline, "
                f"got {self.delimiter!r}"
            )
        try:
            codecs.lookup(self.encoding)
        except LookupError:
            raise ValueError(f"unknown encoding {self.encoding!r}") from None
        if self.compression not in COMPRESSIONS:
            raise ValueError(
                f"compression must be one of {', '.join(COMPRESSIONS)}, got {self.compression!r}"
            )
        if self.block_size < 1024:
            raise ValueError(f"block_size must be at least 1024 bytes, got {self.block_size}")
        for column, type_name in (self.column_types or {}).items():
            try:
                arrow_type(type_name)
            except ValueError as exc:
                raise ValueError(f"column_types[{column!r}]: {exc}") from None
        if self.line_column is not None and not self.line_column:
            raise ValueError("line_column must be a non-empty column name")


@dataclass(frozen=True)
class MalformedRow:
    """A row with the wrong number of fields, skipped instead of failing the file.

    ``line`` is the physical line the row starts on, or ``None`` when it could
    not be placed; ``text`` is the row as written, without its line ending.
    """

    line: int | None
    text: str
    expected: int
    actual: int

    @property
    def reason(self) -> str:
        return f"expected {self.expected} fields, got {self.actual}"


class _Readable(Protocol):
    def read(self, size: int = -1, /) -> bytes: ...


def read_csv_batches(
    source: BinaryIO,
    *,
    name: str,
    options: CsvOptions = CsvOptions(),
    on_malformed: Callable[[list[MalformedRow]], None] | None = None,
) -> Iterator[pa.RecordBatch]:
    """Yield the rows of a CSV file as Arrow record batches, one per block.

    ``source`` is read sequentially and never seeked (except to rewind a
    seekable zip file, or a seekable file whose fast pass failed: see the
    module docstring), so a network stream works; it is not closed.  ``name``
    is how errors refer to the file.  Batches with no rows are not yielded.

    This is a generator: nothing is read until the first batch is asked for,
    and problems with the file surface as :class:`InputError` during iteration
    (possibly after earlier batches were yielded, so callers must treat output
    as incomplete until iteration ends).  Empty files, header-only files,
    invalid text, rows with the wrong number of fields and values that do not
    convert to a declared type are all reported this way.

    With ``on_malformed``, rows with the wrong number of fields are not an
    error: they are left out of the batches and handed to ``on_malformed``
    with their line numbers, each list before the batch of the block they were
    in is yielded (and any that could not be placed, at the end).  A file
    whose every row is malformed then yields nothing rather than failing.
    """
    fast = None
    if on_malformed is None and options.line_column is None:
        fast = _fast_pass_start(source, name, options)
    if fast is None:
        yield from _precise_batches(source, name, options, on_malformed)
        return
    origin, names, first, whole = fast
    delivered = 0
    schema: pa.Schema | None = None
    try:
        batches = (
            _native_batches(pa.BufferReader(first), options, names)
            if whole
            else _parallel_batches(source, options, names, first)
        )
        for batch in batches:
            schema = batch.schema
            delivered += batch.num_rows
            yield batch
    except (pa.ArrowException, _NotFast):
        pass
    else:
        if delivered:
            return
    # The file is broken somewhere (or holds no rows): the precise pass finds
    # out where, and says so exactly as if it had read the file from the start.
    source.seek(origin)
    precise = _precise_batches(source, name, options, None, pinned=schema)
    yield from _skip_rows(precise, delivered, name)


class _NotFast(Exception):
    """The fast pass cannot vouch for what pyarrow made of the file."""


def _fast_pass_start(
    source: BinaryIO, name: str, options: CsvOptions
) -> tuple[int, list[str] | None, bytes, bool] | None:
    """Whether the fast pass may read ``source``: (rewind to, names, first, whole), or None.

    It may for a seekable, uncompressed, UTF-8 source whose first block (the
    one pyarrow infers types from) is valid UTF-8 and not blank; the stream is
    left just after any BOM.  Anything else goes to the precise pass directly,
    as do files whose blank start or compression it would have to guess at.
    ``names`` are the column names when ``all_strings`` needs them up front.
    ``first`` is the first block after any BOM; ``whole`` says it is the whole
    file, as for most files: checked already, it is parsed from memory instead
    of read twice.
    """
    if not _is_utf8(options.encoding) or options.compression not in ("auto", "none"):
        return None
    if options.compression == "auto" and name.lower().endswith((".gz", ".gzip", ".zip")):
        return None
    if not _seekable(source):
        return None
    try:
        origin = source.tell()
        head = _read_full(source, options.block_size + len(_UTF8_BOM))
        source.seek(origin)
    except OSError:
        return None
    if options.compression == "auto" and head.startswith(
        (b"\x1f\x8b", b"PK\x03\x04", b"PK\x05\x06")
    ):
        return None
    skip = len(_UTF8_BOM) if head.startswith(_UTF8_BOM) else 0
    first = head[skip : skip + options.block_size]
    if not first.strip(_WHITESPACE):
        return None
    try:
        codecs.getincrementaldecoder("utf-8")(errors="strict").decode(first, final=False)
    except UnicodeDecodeError:
        return None
    # Fewer bytes than asked for: the stream ended, and within the first block.
    whole = len(head) < options.block_size + len(_UTF8_BOM) and len(first) == len(head) - skip
    names = None
    if options.all_strings:
        cut = len(first) if whole else _last_record_end(first, first.count(b'"'), False)
        names = _column_names(first[:cut], options) if cut else []
        if not names:
            return None
    source.seek(origin + skip)
    return origin, names, first, whole


def _native_batches(
    source: Any, options: CsvOptions, names: list[str] | None
) -> Iterator[pa.RecordBatch]:
    """pyarrow's own streaming reader on the source, with the precise pass's options."""
    reader = _open_native(source, options, names)
    try:
        while True:
            try:
                batch = reader.read_next_batch()
            except StopIteration:
                return
            if batch.num_rows:
                yield batch
    finally:
        _close_reader(reader)


def _open_native(
    source: Any, options: CsvOptions, names: list[str] | None, *, ahead: bool = True
) -> Any:
    """pyarrow's streaming reader, its column types inferred from the first block.

    Without ``ahead`` it parses nothing beyond what is asked for (no threads
    reading ahead), for a reader that is only asked for its schema.
    """
    read_options = _read_options(options)
    read_options.use_threads = ahead
    reader = pacsv.open_csv(
        source,
        read_options=read_options,
        parse_options=_parse_options(options),
        convert_options=_convert_options(options, names or []),
    )
    # Invalid UTF-8 in a column pyarrow infers from the first block would
    # make it binary rather than fail; the first block was checked, so this
    # cannot happen, but a binary column would be wrong output, not slow.
    if any(pa.types.is_binary(field.type) for field in reader.schema):
        _close_reader(reader)
        raise _NotFast("a column was inferred as binary")
    return reader


#: A record longer than this many blocks ends the parallel fast pass (the
#: precise pass reads it): a block is held in memory whole until it ends.
_LONGEST_RECORD_BLOCKS = 16
#: How much nicer the parallel pass's parse threads are than the thread that
#: started them (Linux; see _read_ahead_priority).
READ_AHEAD_NICENESS = 5


def _read_ahead_priority() -> None:
    """Lower the calling parse thread's priority, so that what consumes its batches runs first.

    The parse threads read ahead of a consumer that is slower than all of them
    together: converting to Parquet, PyArrow's encoder (one thread, a row
    group at a time) is the conversion's bottleneck. At equal priority two
    parse threads and the encoder shared two cores three ways and the encoder
    got two thirds of one; five steps nicer, the parse threads leave it a
    whole core whenever it can run and take the rest (1 GB to Parquet on 2
    cores: 3.5 s instead of 4.0 s, medians of 5). On a machine busy with
    other work they yield to it as well: the reading of a large file then
    waits for the others, never the other way round. Linux only (a thread's
    niceness is its own there); elsewhere, and where refused, the threads
    keep the default.
    """
    if not sys.platform.startswith("linux"):
        return
    thread = threading.get_native_id()
    with contextlib.suppress(OSError):
        # A new thread starts with its creator's niceness.
        inherited = os.getpriority(os.PRIO_PROCESS, thread)
        os.setpriority(os.PRIO_PROCESS, thread, min(inherited + READ_AHEAD_NICENESS, 19))


def _parallel_batches(
    source: BinaryIO, options: CsvOptions, names: list[str] | None, first: bytes
) -> Iterator[pa.RecordBatch]:
    """The fast pass on a file of several blocks: the blocks parsed on every core at once.

    pyarrow's streaming reader parses one block after the other, on one core
    (about 200 MB/s here), which made reading the slowest stage of converting a
    large file. Cut where a record ends, the blocks are independent CSV texts
    once the column types are fixed, so each is parsed by ``read_csv`` in a
    thread (pyarrow releases the GIL) and the batches are yielded in order. The
    types are exactly what the streaming reader infers: it is run on the first
    block to get them.

    A cut is made after the last newline with an even number of quotes before
    it (as the feeder's). A quote inside an unquoted field, which pyarrow takes
    literally, would put such a cut inside a quoted value; pyarrow closes a
    quote left open at the end of its input, so that block would end in a row
    whose last field holds the rest of the block (fewer fields than the header
    fail on their own). A block whose last value ends with a newline is
    therefore not trusted: the file goes to the precise pass, which also takes
    a legitimate quoted value ending in a newline at a block's end.
    """
    quotes = _quotes(first)
    if _last_record_end(first, quotes, False) is None:
        # The first record is longer than a block: the streaming reader copes.
        yield from _native_batches(pa.PythonFile(source, mode="r"), options, names)
        return
    source.seek(source.tell() + len(first))
    more = _read_full(source, options.block_size)
    # The streaming reader infers from its first block: the first block_size
    # bytes, cut where it finds the last record end. Given what follows too, it
    # cuts and infers exactly as on the file.
    schema_reader = _open_native(pa.BufferReader(first + more), options, names, ahead=False)
    schema = schema_reader.schema
    _close_reader(schema_reader)
    parse = _parse_options(options)
    convert = _convert_options(options, names or [], schema)

    def read(block: memoryview, index: int, last: bool) -> pa.Table:
        # One chunk per block (no splitting it again, nor threads of its own);
        # the first has the header, if any, and the later ones are named alike.
        read_options = _read_options(options)
        read_options.use_threads = False
        read_options.block_size = len(block) + 1
        if index:
            read_options.column_names = schema.names
            read_options.autogenerate_column_names = False
        table = pacsv.read_csv(
            pa.BufferReader(block),
            read_options=read_options,
            parse_options=parse,
            convert_options=convert,
        )
        if not last and table.num_rows:
            value = table.column(table.num_columns - 1)[-1].as_py()
            if isinstance(value, str) and value.endswith("\n"):
                raise _NotFast("a block may end inside a quoted value")
        return table

    workers = max(1, min(os.cpu_count() or 1, 8))
    pool = ThreadPoolExecutor(
        workers, thread_name_prefix="sluiceway-csv", initializer=_read_ahead_priority
    )
    pending: deque[Future[pa.Table]] = deque()
    try:
        blocks = _record_blocks(source, first, quotes, more, options.block_size)
        for index, (block, last) in enumerate(blocks):
            pending.append(pool.submit(read, block, index, last))
            while len(pending) > workers:
                yield from _rows_of(pending.popleft().result())
        while pending:
            yield from _rows_of(pending.popleft().result())
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _rows_of(table: pa.Table) -> Iterator[pa.RecordBatch]:
    return (batch for batch in table.to_batches() if batch.num_rows)


def _record_blocks(
    source: BinaryIO, buf: bytes, quotes: int, more: bytes, block_size: int
) -> Iterator[tuple[memoryview, bool]]:
    """``buf`` (holding ``quotes`` quotes), ``more`` and the rest of ``source``, cut
    where records end: (block, is it the last)."""
    while True:
        if not more:
            if buf:
                yield memoryview(buf), True
            return
        cut = _last_record_end(buf, quotes, False)
        if cut is None:
            if len(buf) > _LONGEST_RECORD_BLOCKS * block_size:
                raise _NotFast("a record longer than the parallel pass holds")
            buf += more
            quotes += _quotes(more)
        else:
            yield memoryview(buf)[:cut], False
            rest = buf[cut:]
            buf = rest + more
            quotes = rest.count(b'"') + _quotes(more)
        more = _read_full(source, block_size)


def _quotes(data: bytes) -> int:
    """How many quote characters ``data`` holds (numpy counts at thrice bytes.count's speed)."""
    return int(np.count_nonzero(np.frombuffer(data, np.uint8) == ord('"')))


def _skip_rows(batches: Iterator[pa.RecordBatch], rows: int, name: str) -> Iterator[pa.RecordBatch]:
    """``batches`` without their first ``rows`` rows (those the fast pass yielded)."""
    for batch in batches:
        if rows >= batch.num_rows:
            rows -= batch.num_rows
            continue
        yield batch.slice(rows) if rows else batch
        rows = 0
    if rows:
        # Both passes run the same parser with the same options on the same
        # bytes, so this is a bug, not bad input: fail loudly rather than lose rows.
        raise RuntimeError(
            f"{name}: the precise CSV pass found {rows} fewer rows than the fast pass"
        )


def _precise_batches(
    source: BinaryIO,
    name: str,
    options: CsvOptions,
    on_malformed: Callable[[list[MalformedRow]], None] | None,
    *,
    pinned: pa.Schema | None = None,
) -> Iterator[pa.RecordBatch]:
    """The feeder-based reader (module docstring); ``pinned`` fixes every column's type."""
    with contextlib.ExitStack() as stack:
        raw = _open_decompressed(source, name, options.compression, stack)
        utf8 = _Utf8Source(raw, name=name, encoding=options.encoding)
        feeder = _BlockFeeder(utf8, block_size=options.block_size)
        stack.callback(feeder.close)
        if not feeder.prime():
            raise InputError("empty file", file=name)
        first = feeder.take_first_block()
        # Names are needed up front only to type every column as text; otherwise
        # the reader's schema has them, and small files are not parsed twice.
        names = _column_names(first, options) if options.all_strings else None
        context = _ErrorContext(name=name, options=options, names=names or [], feeder=feeder)
        skipped = _SkippedRows() if on_malformed is not None else None
        numbering = (
            _RowNumbering(feeder, options, skipped)
            if skipped is not None or options.line_column is not None
            else None
        )
        try:
            reader = pacsv.open_csv(
                feeder,
                read_options=_read_options(options),
                parse_options=_parse_options(options, skipped),
                convert_options=_convert_options(options, names or [], pinned),
            )
        except pa.ArrowException as exc:
            if names is None:
                context.names = _column_names(first, options)
            raise context.translate(exc) from exc
        del first
        stack.callback(_close_reader, reader)
        context.schema = reader.schema
        if names is None:
            context.names = list(reader.schema.names)
        rows = 0
        batches = 0
        while True:
            try:
                batch = reader.read_next_batch()
            except StopIteration:
                break
            except pa.ArrowException as exc:
                raise context.translate(exc) from exc
            batches += 1
            # pyarrow turns block i into batch i, so once a batch is out the
            # blocks before it can no longer hold an undiscovered error.
            feeder.release_before(batches - 1)
            if numbering is not None:
                batch, malformed = numbering.number(batch)
                if malformed and on_malformed is not None:
                    on_malformed(malformed)
            if batch.num_rows:
                rows += batch.num_rows
                yield batch
        if numbering is not None and on_malformed is not None:
            malformed = numbering.finish()
            if malformed:
                on_malformed(malformed)
        if options.header and rows == 0 and (skipped is None or skipped.total == 0):
            raise InputError("header only, no data rows", file=name)


def _close_reader(reader: Any) -> None:
    close = getattr(reader, "close", None)
    if close is not None:
        with contextlib.suppress(Exception):
            close()


# --------------------------------------------------------------------------- pyarrow options


def _read_options(options: CsvOptions) -> pacsv.ReadOptions:
    # The feeder already hands out UTF-8, so pyarrow never transcodes.
    return pacsv.ReadOptions(
        use_threads=True,
        block_size=options.block_size,
        autogenerate_column_names=not options.header,
        encoding="utf8",
    )


def _parse_options(
    options: CsvOptions, invalid_rows: Callable[[Any], str] | None = None
) -> pacsv.ParseOptions:
    # Without an invalid_row_handler a row with the wrong number of fields
    # fails the whole file; with one (read_csv_batches' on_malformed) it is
    # skipped and reported.
    return pacsv.ParseOptions(
        delimiter=options.delimiter,
        quote_char='"',
        double_quote=True,
        escape_char=False,
        newlines_in_values=True,
        ignore_empty_lines=True,
        invalid_row_handler=invalid_rows,
    )


def _convert_options(
    options: CsvOptions, names: list[str], pinned: pa.Schema | None = None
) -> pacsv.ConvertOptions:
    column_types: dict[str, pa.DataType] = {}
    if options.all_strings:
        column_types.update((column, pa.string()) for column in names)
    for column, type_name in (options.column_types or {}).items():
        column_types[column] = arrow_type(type_name)
    if pinned is not None:
        column_types.update(zip(pinned.names, pinned.types, strict=True))
    kwargs: dict[str, Any] = {"column_types": column_types, "check_utf8": True}
    if options.null_values is not None:
        kwargs["null_values"] = list(options.null_values)
        kwargs["strings_can_be_null"] = True
    return pacsv.ConvertOptions(**kwargs)


# --------------------------------------------------------------------------- decompression


def _read_full(stream: _Readable, size: int) -> bytes:
    """Read ``size`` bytes unless the stream ends first; network reads come short."""
    parts: list[bytes] = []
    missing = size
    while missing > 0:
        chunk = stream.read(missing)
        if not chunk:
            break
        parts.append(chunk)
        missing -= len(chunk)
    return b"".join(parts)


def _seekable(stream: Any) -> bool:
    try:
        return bool(stream.seekable())
    except Exception:
        return False


class _Prefixed:
    """A stream that first replays bytes already read for sniffing, then the rest."""

    def __init__(self, head: bytes, rest: _Readable) -> None:
        self._head = head
        self._rest = rest

    def read(self, size: int = -1, /) -> bytes:
        if self._head:
            if size is None or size < 0:
                data, self._head = self._head + (self._rest.read() or b""), b""
                return data
            data, self._head = self._head[:size], self._head[size:]
            return data
        return self._rest.read(size) or b""


class _Guarded:
    """Turn a decompressor's complaints about corrupt data into InputError."""

    def __init__(self, stream: _Readable, *, name: str, what: str) -> None:
        self._stream = stream
        self._name = name
        self._what = what

    def read(self, size: int = -1, /) -> bytes:
        try:
            return self._stream.read(size)
        except (gzip.BadGzipFile, zipfile.BadZipFile, zlib.error, EOFError) as exc:
            raise InputError(f"corrupt {self._what} data: {exc}", file=self._name) from exc


def _open_decompressed(
    source: BinaryIO, name: str, compression: str, stack: contextlib.ExitStack
) -> _Readable:
    """Return a stream of the decompressed bytes of ``source``."""
    start: int | None = None
    if _seekable(source):
        try:
            start = source.tell()
        except OSError:
            start = None
    head = b""
    if compression == "auto":
        lowered = name.lower()
        if lowered.endswith((".gz", ".gzip")):
            compression = "gzip"
        elif lowered.endswith(".zip"):
            compression = "zip"
        else:
            head = _read_full(source, 4)
            if head.startswith(b"\x1f\x8b"):
                compression = "gzip"
            elif head.startswith((b"PK\x03\x04", b"PK\x05\x06")):
                compression = "zip"
            else:
                compression = "none"
    stream: _Readable = _Prefixed(head, source) if head else source
    if compression == "none":
        return stream
    if compression == "gzip":
        # GzipFile only reads forward, so a non-seekable source is fine.
        gz = stack.enter_context(gzip.GzipFile(fileobj=stream, mode="rb"))  # type: ignore[arg-type]
        return _Guarded(gz, name=name, what="gzip")
    return _open_zip_member(source, stream, start, head, name, stack)


def _open_zip_member(
    source: BinaryIO,
    stream: _Readable,
    start: int | None,
    head: bytes,
    name: str,
    stack: contextlib.ExitStack,
) -> _Readable:
    """Open the single CSV member of a zip archive as a stream.

    Zip keeps its directory at the end, so the archive must be seekable: a
    seekable source is rewound, anything else is spooled to a temporary file
    on disk (never into memory).
    """
    archive: IO[bytes]
    if start is not None:
        source.seek(start)
        archive = source
    else:
        archive = stack.enter_context(tempfile.TemporaryFile())  # noqa: SIM115 (the stack closes it)
        shutil.copyfileobj(stream, archive, _COPY_CHUNK)  # type: ignore[misc]
        archive.seek(0)
    try:
        zf = stack.enter_context(zipfile.ZipFile(archive))
    except zipfile.BadZipFile as exc:
        raise InputError(f"not a valid zip archive: {exc}", file=name) from exc
    members = [
        info
        for info in zf.infolist()
        if not info.is_dir()
        and not info.filename.startswith("__MACOSX/")
        and not info.filename.rsplit("/", 1)[-1].startswith(".")
    ]
    if len(members) > 1:
        csvs = [m for m in members if m.filename.lower().endswith((".csv", ".tsv", ".txt"))]
        if len(csvs) != 1:
            listed = ", ".join(m.filename for m in (csvs or members))
            raise InputError(
                f"zip archive holds {len(csvs or members)} CSV members ({listed}); "
                "expected exactly one",
                file=name,
            )
        members = csvs
    if not members:
        raise InputError("empty file (zip archive has no members)", file=name)
    try:
        member = stack.enter_context(zf.open(members[0]))
    except (RuntimeError, NotImplementedError, zipfile.BadZipFile) as exc:
        raise InputError(
            f"cannot open zip member {members[0].filename!r}: {exc}", file=name
        ) from exc
    return _Guarded(member, name=name, what="zip")


# --------------------------------------------------------------------------- text decoding


def _is_utf8(encoding: str) -> bool:
    return codecs.lookup(encoding).name in ("utf-8", "utf-8-sig")


class _Utf8Source:
    """Deliver the file as UTF-8 bytes, whatever encoding it is in.

    UTF-8 input passes through untouched (after stripping a BOM) but is
    validated here, because pyarrow would otherwise quietly infer a ``binary``
    column for invalid text instead of failing, and could not say on which line
    the bad byte is.  Other encodings are transcoded with Python's incremental
    codecs, which fail with the exact byte position of undecodable input.
    """

    def __init__(self, raw: _Readable, *, name: str, encoding: str) -> None:
        self._raw = raw
        self._name = name
        self._passthrough = _is_utf8(encoding)
        codec = "utf-8" if self._passthrough else encoding
        self._encoding = codec
        self._decoder = codecs.getincrementaldecoder(codec)(errors="strict")
        self._at_start = True
        self._newlines = 0  # newlines in everything returned so far
        self._offset = 0  # raw bytes consumed so far (after decompression)
        self.eof = False

    def read(self, size: int) -> bytes:
        """Return up to about ``size`` bytes of UTF-8; ``b""`` only at the end."""
        while not self.eof:
            want = max(size, len(_UTF8_BOM)) if self._at_start else size
            chunk = _read_full(self._raw, want)
            final = len(chunk) < want  # _read_full only comes back short at the end
            if self._at_start and self._passthrough and chunk.startswith(_UTF8_BOM):
                chunk = chunk[len(_UTF8_BOM) :]
                self._offset += len(_UTF8_BOM)
            self._at_start = False
            self.eof = final
            out = self._decode(chunk, final)
            self._offset += len(chunk)
            if out:
                self._newlines += out.count(b"\n")
                return out
        return b""

    def _decode(self, chunk: bytes, final: bool) -> bytes:
        pending = len(self._decoder.getstate()[0])
        try:
            if self._passthrough:
                if pending or not chunk.isascii():
                    self._decoder.decode(chunk, final)
                return chunk
            return self._decoder.decode(chunk, final).encode("utf-8")
        except UnicodeDecodeError as exc:
            raise self._error(exc, chunk, pending) from exc

    def _error(self, exc: UnicodeDecodeError, chunk: bytes, pending: int) -> InputError:
        # exc.start counts from the bytes the decoder still held from the last chunk.
        position = max(0, exc.start - pending)
        line = self._newlines + chunk.count(b"\n", 0, position) + 1
        bad = exc.object[exc.start : exc.end].hex(" ")
        offset = self._offset + position
        if self._passthrough:
            return InputError(
                f"invalid UTF-8 (bytes {bad} at byte offset {offset}); if the file is "
                "not UTF-8, set its encoding (e.g. latin-1 or cp1252)",
                file=self._name,
                line=line,
            )
        return InputError(
            f"cannot decode bytes {bad} at byte offset {offset} as {self._encoding}",
            file=self._name,
            line=line,
        )


# --------------------------------------------------------------------------- block feeder


@dataclass(frozen=True)
class _Block:
    index: int  # position among the blocks handed to pyarrow, = batch index
    first_line: int  # physical line the block starts on
    data: bytes
    aligned: bool  # starts on a record boundary, so it can be re-parsed alone


class _BlockFeeder:
    """The file object pyarrow reads: record-aligned blocks with line numbers.

    Each ``read`` returns one block that ends on a record boundary, found by
    counting quote characters: with RFC 4180 quoting a newline ends a record
    exactly when an even number of quotes precede it.  A record that does not
    fit in a block is handed out whole-block-unaligned (pyarrow will then
    complain that the row is bigger than the block), and a file with lone CR
    line endings is simply never cut; both only cost precise error lines.

    Blocks stay in memory until the batch made from them has been delivered,
    which is bounded by pyarrow's own read-ahead and shares the same bytes
    objects pyarrow holds, so memory stays flat.  pyarrow reads from its I/O
    thread, hence the locks.
    """

    def __init__(self, source: _Utf8Source, *, block_size: int) -> None:
        self._source = source
        self._block_size = block_size
        self._carry = b""  # bytes after the last record boundary handed out
        self._odd_quotes = False  # quote parity at the start of _carry
        self._next_aligned = True
        self._aligned_start = True
        self._newlines = 0  # newlines in blocks already cut
        self._index = 0
        self._out = b""  # rest of the current block, for callers asking less
        self._first: bytes | None = None  # until take_first_block()
        self._retained: deque[_Block] = deque()
        self._read_lock = threading.Lock()
        self._retain_lock = threading.Lock()
        self._closed = False

    @property
    def closed(self) -> bool:
        return self._closed

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return False

    def writable(self) -> bool:
        return False

    def close(self) -> None:
        with self._read_lock:
            self._closed = True
            self._out = b""

    def prime(self) -> bool:
        """Cut the first block now; False if the file holds nothing but whitespace.

        Whole blocks of leading whitespace are skipped rather than kept, so a
        huge blank file cannot fill memory.
        """
        with self._read_lock:
            while True:
                block = self._cut()
                if block is None:
                    return False
                if block.strip(_WHITESPACE):
                    self._out = self._register(block)
                    self._first = self._out
                    return True
                self._newlines += block.count(b"\n")

    def take_first_block(self) -> bytes:
        """The block prime() cut, handed over once so it is not kept all along."""
        data, self._first = self._first or b"", None
        return data

    def read(self, size: int = -1, /) -> bytes:
        with self._read_lock:
            if self._closed:
                return b""
            if size is None or size < 0:
                parts = [self._out]
                self._out = b""
                while (block := self._cut()) is not None:
                    parts.append(self._register(block))
                return b"".join(parts)
            if not self._out:
                block = self._cut()
                if block is None:
                    return b""
                self._out = self._register(block)
            data, self._out = self._out[:size], self._out[size:]
            return data

    def _register(self, data: bytes) -> bytes:
        block = _Block(self._index, self._newlines + 1, data, self._aligned_start)
        self._index += 1
        self._newlines += data.count(b"\n")
        with self._retain_lock:
            self._retained.append(block)
        return data

    def _cut(self) -> bytes | None:
        """Produce the next block, or None at the end of the file.

        A block is never longer than ``block_size``, the size pyarrow asks for
        in each read: a longer one (transcoding can grow the text; a final
        newline may be added) would reach pyarrow in two reads and become two
        batches, and batch i would no longer be block i.
        """
        parts = [self._carry]
        have = len(self._carry)
        while have < self._block_size and not self._source.eof:
            chunk = self._source.read(self._block_size - have)
            parts.append(chunk)
            have += len(chunk)
        buf = b"".join(parts)
        self._aligned_start = self._next_aligned
        if not buf:
            self._carry = b""
            return None
        quotes = buf.count(b'"')
        # A final record without a newline confuses pyarrow on a header-only
        # file ("cannot infer number of columns"), so the last block gets one.
        add_newline = not buf.endswith((b"\n", b"\r")) and (quotes + self._odd_quotes) % 2 == 0
        if self._source.eof and len(buf) + add_newline <= self._block_size:
            cut = len(buf)
            if add_newline:
                buf += b"\n"
                cut += 1
        else:
            head = buf[: self._block_size]
            head_quotes = quotes if len(head) == len(buf) else head.count(b'"')
            found = _last_record_end(head, head_quotes, self._odd_quotes)
            cut = len(head) if found is None else found
            self._next_aligned = found is not None
        block, self._carry = buf[:cut], buf[cut:]
        block_quotes = quotes - self._carry.count(b'"') if self._carry else quotes
        self._odd_quotes = (self._odd_quotes + block_quotes) % 2 == 1
        return block

    def release_before(self, index: int) -> None:
        """Forget blocks whose batches have been delivered (all before ``index``)."""
        with self._retain_lock:
            while self._retained and self._retained[0].index < index:
                self._retained.popleft()

    def pending_blocks(self) -> list[_Block]:
        """Blocks pyarrow has taken but not yet delivered as batches."""
        with self._retain_lock:
            return list(self._retained)

    def block(self, index: int) -> _Block | None:
        """The retained block with this index (that of the batch just delivered)."""
        with self._retain_lock:
            return next((b for b in self._retained if b.index == index), None)


def _last_record_end(buf: bytes, quotes: int, odd_start: bool) -> int | None:
    """Offset just past the last newline in ``buf`` that is outside quotes."""
    end = len(buf)
    quotes_after = 0
    pos = buf.rfind(b"\n")
    while pos != -1:
        quotes_after += buf.count(b'"', pos + 1, end)
        if (odd_start + quotes - quotes_after) % 2 == 0:
            return pos + 1
        end = pos
        pos = buf.rfind(b"\n", 0, end)
    return None


def _lines(blocks: Iterable[_Block]) -> Iterator[str]:
    """Physical lines (split on LF only, like the line counter) of consecutive blocks."""
    partial = ""
    for block in blocks:
        text = partial + block.data.decode("utf-8", errors="replace")
        lines = io.StringIO(text, newline="\n").readlines()
        partial = lines.pop() if lines and not lines[-1].endswith("\n") else ""
        yield from lines
    if partial:
        yield partial


def _column_names(first_block: bytes, options: CsvOptions) -> list[str]:
    """Column names exactly as pyarrow will see them, read from the first block.

    ``all_strings`` and error messages need the names before the real reader
    exists; asking pyarrow to parse just the header (skipping every row after
    it unchecked) avoids any disagreement with a second CSV parser.
    """
    try:
        table = pacsv.read_csv(
            pa.BufferReader(first_block),
            read_options=pacsv.ReadOptions(
                use_threads=False,
                block_size=len(first_block) + 1,
                skip_rows_after_names=_INT32_MAX,
                autogenerate_column_names=not options.header,
                encoding="utf8",
            ),
            parse_options=_parse_options(options),
        )
    except pa.ArrowException:
        return []  # the real reader will fail on the same bytes and say why
    return table.schema.names


@contextlib.contextmanager
def _big_fields() -> Iterator[None]:
    """Let Python's csv module read fields as large as pyarrow does."""
    previous = csv.field_size_limit()
    csv.field_size_limit(max(previous, _INT32_MAX))
    try:
        yield
    finally:
        csv.field_size_limit(previous)


# --------------------------------------------------------------------------- row numbering


class _SkippedRows:
    """pyarrow's ``invalid_row_handler``: keeps the rows it skips until they are placed.

    With ``use_threads=True`` pyarrow calls the handler from its parser
    threads, without a row number, and possibly for blocks ahead of the batch
    being delivered.  So rows are kept by text and placed when the batch of
    their block comes out (:class:`_RowNumbering`): whether a record has the
    wrong number of fields depends on its text alone, so every record of the
    block whose text is that of a skipped row is one of the skipped rows.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pending: Counter[str] = Counter()
        self._fields: dict[str, tuple[int, int]] = {}
        self.total = 0

    def __call__(self, row: Any) -> str:
        with self._lock:
            self._pending[row.text] += 1
            self._fields[row.text] = (row.expected_columns, row.actual_columns)
            self.total += 1
        return "skip"

    def texts(self) -> list[str]:
        with self._lock:
            return list(self._pending)

    def take(self, found: list[tuple[int, str]]) -> list[MalformedRow] | None:
        """Place these (line, text) records; None (and nothing taken) if they were not skipped."""
        wanted = Counter(text for _, text in found)
        with self._lock:
            if any(self._pending[text] < n for text, n in wanted.items()):
                return None
            rows = [MalformedRow(line, text, *self._fields[text]) for line, text in found]
            for text, n in wanted.items():
                self._pending[text] -= n
                if not self._pending[text]:
                    del self._pending[text], self._fields[text]
            return rows

    def unplaced(self) -> list[MalformedRow]:
        """Skipped rows never placed on a line (so that none is ever lost)."""
        with self._lock:
            rows = [
                MalformedRow(None, text, *self._fields[text])
                for text, n in self._pending.items()
                for _ in range(n)
            ]
            self._pending.clear()
            return rows


def _block_records(block: _Block, skip_header: bool) -> tuple[pa.Array, pa.Array]:
    """(text, first physical line) of each data record in ``block``, vectorised.

    Lines are split on LF; a line ends a record when the quotes before its end
    are balanced (RFC 4180, as the feeder cuts blocks).  Empty records are
    dropped, as pyarrow drops empty lines, and so is the header.  Texts lose
    a final CR, as in the rows pyarrow's invalid_row_handler reports.
    """
    lines = pc.split_pattern(pa.array([block.data], pa.string()), pattern="\n").values
    if block.data.endswith(b"\n"):
        lines = lines.slice(0, len(lines) - 1)
    first = pc.cast(pc.indices_nonzero(pc.is_valid(lines)), pa.int64())
    if b'"' in block.data and len(lines):
        balanced = pc.equal(
            pc.bit_wise_and(pc.cumulative_sum(pc.count_substring(lines, '"')), 1), 0
        )
        if not pc.all(balanced).as_py():
            starts = pc.indices_nonzero(
                pa.concat_arrays([pa.array([True]), balanced.slice(0, len(balanced) - 1)])
            )
            offsets = pa.concat_arrays(
                [pc.cast(starts, pa.int32()), pa.array([len(lines)], pa.int32())]
            )
            lines = pc.binary_join(pa.ListArray.from_arrays(offsets, lines), "\n")
            first = first.take(starts)
    texts = lines
    if b"\r" in block.data:
        texts = pc.if_else(pc.ends_with(lines, "\r"), pc.utf8_slice_codeunits(lines, 0, -1), lines)
    present = pc.not_equal(pc.binary_length(texts), 0)
    texts, first = texts.filter(present), first.filter(present)
    if skip_header and len(texts):
        texts, first = texts.slice(1), first.slice(1)
    return texts, pc.add(first, block.first_line)


class _RowNumbering:
    """Maps each batch to its block, to give it line numbers and place skipped rows.

    pyarrow turns block i into batch i, except that it does not deliver the
    empty batches of leading blocks (say, the header and rows that were all
    skipped). So a block whose records were all skipped may be passed over
    for the next one. Lines are only trusted when the records found in the
    block, less the skipped ones, are exactly the batch's rows; otherwise (a
    lone CR line ending, a block not starting on a record) the batch gets
    null lines and the rows skipped in it are reported at the end without one.
    """

    def __init__(
        self, feeder: _BlockFeeder, options: CsvOptions, skipped: _SkippedRows | None
    ) -> None:
        self.feeder = feeder
        self.options = options
        self.skipped = skipped
        self.next = 0  # index of the next block to map

    def number(self, batch: pa.RecordBatch) -> tuple[pa.RecordBatch, list[MalformedRow]]:
        lines: pa.Array | None = None
        malformed: list[MalformedRow] = []
        while (block := self.feeder.block(self.next)) is not None:
            self.next += 1
            placed = self._place(block)
            if placed is None:
                break
            good, skipped = placed
            malformed += skipped  # taken from the pending ones: never dropped
            if len(good) == batch.num_rows:
                lines = good
                break
            if len(good) or not batch.num_rows:
                break  # not the block of this batch after all: lines stay unknown
            # else a block without rows, which pyarrow passed over: try the next
        self.feeder.release_before(self.next - 1)
        if self.options.line_column is not None:
            if lines is None:
                lines = pa.nulls(batch.num_rows, pa.int64())
            batch = batch.append_column(self.options.line_column, lines)
        return batch, malformed

    def finish(self) -> list[MalformedRow]:
        """Skipped rows of trailing blocks without rows, then any never placed."""
        malformed: list[MalformedRow] = []
        while (block := self.feeder.block(self.next)) is not None:
            self.next += 1
            placed = self._place(block)
            if placed is not None:
                malformed += placed[1]
        if self.skipped is not None:
            malformed += self.skipped.unplaced()
        return malformed

    def _place(self, block: _Block) -> tuple[pa.Array, list[MalformedRow]] | None:
        """(lines of the rows pyarrow kept, the rows it skipped) of one block, or None."""
        if not block.aligned:
            return None
        texts, first = _block_records(block, self.options.header and block.index == 0)
        pending = self.skipped.texts() if self.skipped is not None else []
        flagged = pc.is_in(texts, value_set=pa.array(pending, pa.string()))
        where = pc.indices_nonzero(flagged)
        if not len(where):
            return first, []
        assert self.skipped is not None
        found = list(zip(first.take(where).to_pylist(), texts.take(where).to_pylist(), strict=True))
        taken = self.skipped.take(found)
        if taken is None:
            return None
        return first.filter(pc.invert(flagged)), taken


# --------------------------------------------------------------------------- error reporting


@dataclass
class _ErrorContext:
    """Everything needed to turn a pyarrow error into a precise InputError."""

    name: str
    options: CsvOptions
    names: list[str]
    feeder: _BlockFeeder
    schema: pa.Schema | None = None

    def translate(self, exc: pa.ArrowException) -> InputError:
        message = str(exc)
        if "Empty CSV file" in message:
            return InputError("empty file", file=self.name)
        match = _COLUMN_COUNT.search(message)
        if match:
            expected, got = int(match.group(1)), int(match.group(2))
            found = self._scan(lambda fields: len(fields) != expected)
            return InputError(
                f"expected {expected} fields, got {got}",
                file=self.name,
                line=found[0] if found else None,
            )
        match = _CONVERSION.search(message)
        if match:
            return self._conversion_error(int(match.group(1)), match.group(2))
        if "straddl" in message:
            return InputError(
                f"a row is longer than block_size ({self.options.block_size} bytes), "
                "or a quote is never closed; raise block_size or fix the quoting",
                file=self.name,
                line=self._first_pending_line(),
            )
        return InputError(f"cannot read CSV: {message}", file=self.name)

    def _first_pending_line(self) -> int | None:
        blocks = self.feeder.pending_blocks()
        return blocks[0].first_line if blocks else None

    def _records(self) -> Iterator[tuple[int, list[str]]]:
        """(first physical line, fields) of each data record pyarrow has not delivered."""
        blocks = self.feeder.pending_blocks()
        if not blocks or not blocks[0].aligned:
            # Re-parsing from mid-record would point at the wrong line; better none.
            return
        skip_header = self.options.header and blocks[0].index == 0
        lines = _lines(blocks)
        reader = csv.reader(lines, delimiter=self.options.delimiter, strict=False)
        consumed = 0
        with _big_fields():
            for fields in reader:
                start = blocks[0].first_line + consumed
                consumed = reader.line_num
                if not fields:  # pyarrow ignores empty lines
                    continue
                if skip_header:
                    skip_header = False
                    continue
                yield start, fields

    def _scan(self, bad: Callable[[list[str]], bool]) -> tuple[int, list[str]] | None:
        try:
            for line, fields in self._records():
                if bad(fields):
                    return line, fields
        except csv.Error:
            pass
        return None

    def _conversion_error(self, column: int, detail: str) -> InputError:
        field = self.names[column] if column < len(self.names) else f"#{column + 1}"
        invalid = _INVALID_VALUE.match(detail)
        if invalid:
            type_name, value = invalid.group(1), invalid.group(2)
            found = self._scan(lambda fields: len(fields) > column and fields[column] == value)
            return InputError(
                f"cannot convert {value!r} to {type_name}",
                file=self.name,
                line=found[0] if found else None,
                field=field,
            )
        # Some failures (e.g. decimal rescaling) do not quote the value: find
        # it by converting the column's pending values with the same options.
        found = self._first_unconvertible(column, field)
        if found is None:
            return InputError(detail, file=self.name, field=field)
        line, value = found
        return InputError(
            f"cannot convert {value!r}: {detail}", file=self.name, line=line, field=field
        )

    def _first_unconvertible(self, column: int, field: str) -> tuple[int, str] | None:
        arrow = self._declared_type(field)
        if arrow is None:
            return None
        try:
            cells = [(line, f[column]) for line, f in self._records() if len(f) > column]
        except csv.Error:
            return None
        convert = _convert_options(self.options, [])
        convert.column_types = {"v": arrow}

        def fails(upto: int) -> bool:
            out = io.StringIO()
            writer = csv.writer(out, lineterminator="\n")
            writer.writerow(["v"])
            writer.writerows([value] for _, value in cells[:upto])
            try:
                pacsv.read_csv(
                    io.BytesIO(out.getvalue().encode("utf-8")),
                    parse_options=pacsv.ParseOptions(newlines_in_values=True),
                    convert_options=convert,
                )
            except pa.ArrowException:
                return True
            return False

        if not cells or not fails(len(cells)):
            return None
        low, high = 1, len(cells)  # smallest prefix that fails lies in [low, high]
        while low < high:
            middle = (low + high) // 2
            if fails(middle):
                high = middle
            else:
                low = middle + 1
        return cells[low - 1]

    def _declared_type(self, field: str) -> pa.DataType | None:
        declared = (self.options.column_types or {}).get(field)
        if declared is not None:
            return arrow_type(declared)
        if self.schema is not None and field in self.schema.names:
            return self.schema.field(field).type
        return pa.string() if self.options.all_strings else None
