"""Schema files for the ``validate`` step: a dataset's columns, their types and rules.

A schema is YAML beside the pipeline file, written by the people who know the
data, so mistakes in it are reported like those in the pipeline file: every
one at once, each as ``file:line: key.path: message``, before anything runs.

.. code-block:: yaml

    extra_columns: drop            # columns not listed: keep | drop | reject (fail the file)
    columns:
      customer_id: {type: int, required: true, unique: true, min: 1}
      email: {type: string, required: true, regex: '[^@ ]+@[^@ ]+\\.[a-z]+'}
      country: {type: string, enum: [DE, FR, NL]}
      balance: {type: "decimal(12,2)", min: 0}
      signup: {type: date, format: "%d.%m.%Y"}
      last_seen: {type: timestamp, format: "%Y-%m-%d %H:%M:%S", timezone: Europe/Berlin}
      Name: {rename: name}         # string unless given; `notes: string` = {type: string}

Loading gives a :class:`Schema` of :class:`Column` objects, whose
:meth:`Column.parse` turns a column of text into typed values and masks
(missing, invalid) with Arrow compute kernels, never a Python loop per row.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import decimal
import re
import zoneinfo
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import pyarrow as pa
import pyarrow.compute as pc
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from .errors import ConfigError
from .steps.csv import arrow_type
from .yamlfile import Problems, load_yaml, plain

__all__ = ["Column", "ColumnSpec", "Parsed", "Schema", "SchemaFile", "load_schema"]

#: Accepted spellings of booleans (compared lower-cased, after trimming).
TRUE_VALUES = ("true", "t", "yes", "y", "1")
FALSE_VALUES = ("false", "f", "no", "n", "0")

_ORDERED = ("int", "float", "decimal", "date", "timestamp")  # types that have min/max
_INT = r"^-?\d+$"
_FLOAT = r"(?i)^[+-]?(\d+\.?\d*|\.\d+)(e[+-]?\d+)?$|^[+-]?(inf|infinity|nan)$"
_DECIMAL = r"(?i)^-?(\d+\.?\d*|\.\d+)(e[+-]?\d+)?$"
_ISO_DATE = r"^\d{4}-\d{2}-\d{2}$"
_ISO_TIMESTAMP = r"^\d{4}-\d{2}-\d{2}([T ]\d{2}:\d{2}(:\d{2}(\.\d{1,9})?)?)?$"
_LEADING_ZEROS = r"(^|\D)0+(\d)"


# --------------------------------------------------------------------------- the file


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


Scalar = str | int | float | dt.datetime | dt.date


class ColumnSpec(_Model):
    """One column as the schema file gives it; checked further by :func:`_compile`."""

    type: str = "string"
    required: bool = False  # not null and not empty
    unique: bool = False  # within one input file, across all its batches
    enum: list[Scalar] | None = Field(None, min_length=1)
    regex: str | None = None  # RE2 syntax (Arrow's); the whole value must match
    min: Scalar | None = None
    max: Scalar | None = None
    format: str | None = None  # strptime-style, for date and timestamp
    timezone: str | None = None  # IANA name, for timestamp
    rename: str | None = Field(None, min_length=1)

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, data: Any) -> Any:
        """``email: string`` is ``email: {type: string}``; ``notes:`` is a string column."""
        if data is None:
            return {}
        if isinstance(data, str):
            return {"type": data}
        return data


class SchemaFile(_Model):
    columns: dict[str, ColumnSpec] = Field(min_length=1)
    extra_columns: Literal["keep", "drop", "reject"] = "keep"


# --------------------------------------------------------------------------- compiled


@dataclass(frozen=True)
class Parsed:
    """A column after :meth:`Column.parse`: typed values and what was wrong.

    ``text`` is what the rules that look at the written value (``regex``) see;
    ``values`` is null wherever ``missing`` or ``invalid`` is true.
    """

    text: pa.Array
    values: pa.Array
    missing: pa.Array
    invalid: pa.Array


@dataclass(frozen=True)
class Column:
    """A schema column ready to check Arrow arrays."""

    name: str
    output: str
    kind: str  # string | int | float | decimal | bool | date | timestamp
    arrow: pa.DataType
    required: bool = False
    unique: bool = False
    regex: str | None = None
    enum: pa.Array | None = None
    enum_text: str = ""
    min: pa.Scalar | None = None
    max: pa.Scalar | None = None
    format: str | None = None
    timezone: str | None = None

    # -- text → typed ------------------------------------------------------------

    def parse(self, raw: pa.Array | pa.ChunkedArray) -> Parsed:
        """Typed values for a column as read (normally text), vectorised.

        A value is missing when null or empty (for non-string types, after
        trimming surrounding whitespace, which those types ignore); missing
        values become null. Everything else either converts or is invalid.
        """
        if isinstance(raw, pa.ChunkedArray):
            raw = raw.combine_chunks()
        if raw.type == self.arrow and self.kind != "string":  # typed already (upstream)
            missing = pc.is_null(raw)
            return Parsed(pc.cast(raw, pa.string()), raw, missing, _falses(len(raw)))
        text = raw if _is_text(raw.type) else pc.cast(raw, pa.string())
        if self.kind != "string":
            text = pc.utf8_trim_whitespace(text)
        missing = pc.fill_null(pc.equal(pc.binary_length(text), 0), True)
        text = pc.if_else(missing, pa.scalar(None, text.type), text)
        values, invalid = self._convert(text)
        invalid = pc.fill_null(invalid, False)
        values = pc.if_else(invalid, pa.scalar(None, values.type), values)
        return Parsed(text, values, missing, invalid)

    def _convert(self, text: pa.Array) -> tuple[pa.Array, pa.Array]:
        """(values, invalid) for text whose missing values are already null."""
        if self.kind == "string":
            return pc.cast(text, pa.string()), _falses(len(text))
        if self.kind == "bool":
            lower = pc.utf8_lower(text)
            is_true = pc.is_in(lower, value_set=pa.array(TRUE_VALUES))
            is_false = pc.is_in(lower, value_set=pa.array(FALSE_VALUES))
            values = pc.if_else(
                is_true, True, pc.if_else(is_false, False, pa.scalar(None, pa.bool_()))
            )
            return values, pc.and_(pc.is_valid(text), pc.is_null(values))
        if self.kind == "int":
            text = pc.replace_substring_regex(text, pattern=r"^\+", replacement="")
            return _cast_checked(text, self.arrow, _INT)
        if self.kind == "float":
            return _cast_checked(text, self.arrow, _FLOAT)
        if self.kind == "decimal":
            text = pc.replace_substring_regex(text, pattern=r"^\+", replacement="")
            return _cast_checked(text, self.arrow, _DECIMAL)
        if self.kind == "date":
            if self.format is None:
                return _cast_checked(text, self.arrow, _ISO_DATE)
            stamps, invalid = self._strptime(text)
            return pc.cast(stamps, pa.date32()), invalid
        return self._timestamps(text)

    def _strptime(self, text: pa.Array) -> tuple[pa.Array, pa.Array]:
        """Parse with ``format``; invalid where it fails or the calendar was bent.

        Arrow's strptime turns 2026-02-30 into 2026-03-02 (and day 366 of a
        common year into January 1st). A bent date always lands on day 1 to 3
        of a month, so only those are rendered back with the format and
        compared with the value as written, ignoring leading zeros and case
        (``2026-2-3`` and ``FEB`` are fine); rendering is the slow part.
        Seconds are whole (strptime has no fractions), which also keeps
        strftime's ``%S`` free of them.
        """
        assert self.format is not None
        stamps = pc.strptime(text, format=self.format, unit="s", error_is_null=True)
        invalid = pc.and_(pc.is_valid(text), pc.is_null(stamps))
        if "%z" not in self.format and "%Z" not in self.format:
            suspect = pc.indices_nonzero(pc.fill_null(pc.less_equal(pc.day(stamps), 3), False))
            if len(suspect):
                written = text.take(suspect)
                shown = pc.strftime(stamps.take(suspect), format=self.format)
                same = pc.equal(shown, written)
                if not pc.all(same).as_py():
                    same = pc.or_(same, pc.equal(_canonical(shown), _canonical(written)))
                bent = suspect.filter(pc.invert(same))
                if len(bent):
                    invalid = pc.or_(invalid, mask_of(bent, len(text)))
        return pc.if_else(invalid, pa.scalar(None, stamps.type), stamps), invalid

    def _timestamps(self, text: pa.Array) -> tuple[pa.Array, pa.Array]:
        if self.format is None:
            stamps, invalid = _cast_checked(text, pa.timestamp("us"), _ISO_TIMESTAMP)
        else:
            stamps, invalid = self._strptime(text)
            stamps = pc.cast(stamps, pa.timestamp("us", tz=stamps.type.tz))
        if stamps.type.tz is not None:  # the format had %z: instants already
            return pc.cast(stamps, self.arrow), invalid
        if self.timezone is None:
            return stamps, invalid
        # Wall-clock times in `timezone`: a time skipped by a clock change does
        # not exist (rejected); a repeated one is taken at its first occurrence.
        local = pc.assume_timezone(
            stamps, timezone=self.timezone, ambiguous="earliest", nonexistent="earliest"
        )
        skipped = pc.fill_null(pc.not_equal(pc.local_timestamp(local), stamps), False)
        invalid = pc.or_(invalid, skipped)
        return pc.if_else(skipped, pa.scalar(None, local.type), local), invalid

    def explain(self, text: str) -> str:
        """Why ``text`` is not a valid value of this column (for bad rows only)."""
        value = text.strip()
        if self.kind == "int":
            if re.fullmatch(r"[+-]?\d+", value):
                return "does not fit in a 64-bit integer"
            return "not an integer"
        if self.kind == "float":
            return "not a number"
        if self.kind == "decimal":
            return _explain_decimal(value, self.arrow)
        if self.kind == "bool":
            return f"not a boolean ({'/'.join(TRUE_VALUES)} or {'/'.join(FALSE_VALUES)})"
        if self.kind == "date":
            return f"not a valid date in the form {self.format or '%Y-%m-%d'}"
        if self.timezone is not None:
            naive = Column(
                self.name, self.name, "timestamp", pa.timestamp("us"), format=self.format
            )
            if not pc.any(naive.parse(pa.array([value])).invalid).as_py():
                return f"this local time does not exist in {self.timezone} (clock change)"
        return f"not a valid timestamp in the form {self.format or 'YYYY-MM-DD HH:MM:SS'}"


@dataclass(frozen=True)
class Schema:
    """A loaded schema file: its columns in order, and what to do with others."""

    path: str
    columns: tuple[Column, ...]
    extra_columns: str

    def column(self, name: str) -> Column:
        return next(c for c in self.columns if c.name == name)


# --------------------------------------------------------------------------- vectorised helpers


def _is_text(t: pa.DataType) -> bool:
    return pa.types.is_string(t) or pa.types.is_large_string(t)


def _falses(n: int) -> pa.Array:
    return pc.is_valid(pa.nulls(n, pa.bool_()))


def arange(n: int) -> pa.Array:
    """0, 1, … n-1 as int64, without building Python ints."""
    ones = pc.fill_null(pa.nulls(n, pa.int64()), 1)
    return pc.subtract(pc.cumulative_sum(ones), 1)


def mask_of(positions: pa.Array, n: int) -> pa.Array:
    """A boolean array of length ``n``, true at ``positions``."""
    return pc.is_in(arange(n), value_set=pc.cast(positions, pa.int64()))


def _canonical(text: pa.Array) -> pa.Array:
    lowered = pc.utf8_lower(pc.utf8_trim_whitespace(text))
    return pc.replace_substring_regex(lowered, pattern=_LEADING_ZEROS, replacement=r"\1\2")


def _cast_checked(text: pa.Array, to: pa.DataType, shape: str) -> tuple[pa.Array, pa.Array]:
    """Cast text to ``to``; (values, invalid) with nulls where it fails.

    A regex of the type's shape weeds out most bad values in one pass; what
    is left (an integer too big, the 30th of February) Arrow refuses only for
    the whole array, so the failing values are found by halving, which costs
    a few casts per bad value and nothing on a clean batch.
    """
    invalid = pc.and_(pc.is_valid(text), pc.invert(pc.match_substring_regex(text, shape)))
    text = pc.if_else(invalid, pa.scalar(None, text.type), text)
    try:
        return pc.cast(text, to), invalid
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        pass
    failing = _failing(text, to, 0)
    bad = mask_of(pa.array(failing, pa.int64()), len(text))
    text = pc.if_else(bad, pa.scalar(None, text.type), text)
    return pc.cast(text, to), pc.or_(invalid, bad)


def _failing(text: pa.Array, to: pa.DataType, offset: int) -> list[int]:
    try:
        pc.cast(text, to)
        return []
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        if len(text) == 1:
            return [offset]
    half = len(text) // 2
    return _failing(text.slice(0, half), to, offset) + _failing(text.slice(half), to, offset + half)


def _explain_decimal(value: str, arrow: pa.DataType) -> str:
    try:
        number = decimal.Decimal(value)
    except decimal.InvalidOperation:
        return "not a decimal number"
    if not number.is_finite():
        return "not a decimal number"
    scale, integer_digits = arrow.scale, arrow.precision - arrow.scale
    exponent = number.normalize().as_tuple().exponent
    assert isinstance(exponent, int)
    if -exponent > scale:
        return f"more than {scale} decimal places"
    return f"more than {integer_digits} digits before the decimal point"


# --------------------------------------------------------------------------- loading


def load_schema(path: Path, shown: str | None = None) -> Schema:
    """Read and check a schema file; ConfigError lists every problem with its line.

    ``shown`` is how messages name the file (the path as the pipeline gives it).
    """
    source = shown or str(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError([f"{source}: no such schema file"]) from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError([f"{source}: cannot read the schema file: {e}"]) from None
    return loads_schema(text, source)


def loads_schema(text: str, source: str = "<schema>") -> Schema:
    doc = load_yaml(text, source)
    problems = Problems(source, doc)
    if not isinstance(doc, dict):
        problems.add((), "a schema file is a mapping with 'columns:' (and 'extra_columns:')")
        problems.raise_if_any()
    data = plain(doc)
    try:
        spec = SchemaFile.model_validate(data)
    except ValidationError as err:
        _pydantic_problems(problems, err, ())
        # Check the columns that are well-formed too, so every mistake shows at once.
        raw_columns = data.get("columns")
        if isinstance(raw_columns, dict):
            _compile(_valid_columns(raw_columns), problems)
        problems.raise_if_any()
        raise  # unreachable: there was at least one error
    columns = _compile(spec.columns, problems)
    problems.raise_if_any()
    return Schema(path=source, columns=tuple(columns), extra_columns=spec.extra_columns)


def _pydantic_problems(problems: Problems, err: ValidationError, prefix: tuple[Any, ...]) -> None:
    seen: set[tuple[Any, ...]] = set()
    for e in err.errors():
        path, union = _error_path((*prefix, *e["loc"]))
        if path in seen:
            continue  # one message per place (a union reports once per member)
        seen.add(path)
        if e["type"] == "extra_forbidden":
            msg = "unknown key (check the spelling)"
        elif union:
            msg = "expected a single value: text, a number or a date"
        else:
            msg = e["msg"]
        problems.add(path, msg)


def _valid_columns(raw: dict[str, Any]) -> dict[str, ColumnSpec]:
    out: dict[str, ColumnSpec] = {}
    for name, value in raw.items():
        try:
            out[name] = ColumnSpec.model_validate(value)
        except ValidationError:
            continue  # already reported
    return out


def _error_path(loc: tuple[Any, ...]) -> tuple[tuple[Any, ...], bool]:
    """The location without the type names a union adds (``min.int``), and whether it did."""
    if len(loc) < 4 or loc[0] != "columns" or loc[2] not in ("enum", "min", "max"):
        return tuple(loc), False
    head, tail = tuple(loc[:3]), tuple(loc[3:])
    kept = tuple(p for p in tail if not isinstance(p, str))
    return head + kept, kept != tail


def _compile(specs: dict[str, ColumnSpec], problems: Problems) -> list[Column]:
    """Columns ready to use; what pydantic cannot see (types, regexes, bounds) as problems."""
    columns: list[Column] = []
    outputs: dict[str, str] = {}
    for name, col in specs.items():
        at = ("columns", name)
        if not name:
            problems.add(at, "a column needs a name")
            continue
        try:
            arrow = arrow_type(col.type)
        except ValueError as e:
            problems.add((*at, "type"), str(e))
            continue
        kind = col.type.strip().lower().split("(")[0]
        output = col.rename or name
        if output in outputs:
            problems.add(
                (*at, "rename") if col.rename else at,
                f"output column {output!r} is already the name of column {outputs[output]!r}",
            )
        outputs[output] = name
        ok = True
        if col.format is not None and kind not in ("date", "timestamp"):
            problems.add((*at, "format"), "format is for date and timestamp columns")
            ok = False
        if col.timezone is not None:
            if kind != "timestamp":
                problems.add((*at, "timezone"), "timezone is for timestamp columns")
                ok = False
            elif not _known_timezone(col.timezone):
                problems.add((*at, "timezone"), f"unknown time zone {col.timezone!r}")
                ok = False
        if kind == "timestamp" and col.timezone is not None:
            arrow = pa.timestamp("us", tz=col.timezone)
        elif kind == "timestamp" and col.format is not None and "%z" in col.format:
            arrow = pa.timestamp("us", tz="UTC")
        regex = None
        if col.regex is not None:
            regex = f"^(?:{col.regex})$"
            try:
                pc.match_substring_regex(pa.array([""]), regex)
            except pa.ArrowException as e:
                problems.add((*at, "regex"), f"invalid regular expression (RE2 syntax): {e}")
                ok = False
        if not ok:
            continue
        column = Column(
            name=name,
            output=output,
            kind=kind,
            arrow=arrow,
            required=col.required,
            unique=col.unique,
            regex=regex,
            format=col.format,
            timezone=col.timezone,
        )
        enum, enum_text = _enum(column, col.enum, at, problems)
        low = _bound(column, col.min, (*at, "min"), problems)
        high = _bound(column, col.max, (*at, "max"), problems)
        if low is not None and high is not None and pc.greater(low, high).as_py():
            problems.add((*at, "min"), f"min {col.min} is greater than max {col.max}")
        columns.append(
            dataclasses.replace(column, enum=enum, enum_text=enum_text, min=low, max=high)
        )
    return columns


def _known_timezone(name: str) -> bool:
    try:
        zoneinfo.ZoneInfo(name)
        pc.assume_timezone(pa.array([0], pa.timestamp("s")), timezone=name)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError, pa.ArrowException):
        return False
    return True


def _enum(
    column: Column, values: list[Any] | None, at: tuple[Any, ...], problems: Problems
) -> tuple[pa.Array | None, str]:
    """Allowed values, typed like the column by the same parser as the data."""
    if values is None:
        return None, ""
    texts = [_as_text(v) for v in values]
    parsed = column.parse(pa.array(texts, pa.string()))
    bad = pc.indices_nonzero(pc.or_(parsed.invalid, parsed.missing)).to_pylist()
    for i in bad:
        problems.add((*at, "enum", i), f"{values[i]!r} is not a valid {column.kind} value")
    if bad:
        return None, ""
    return parsed.values, ", ".join(texts)


def _as_text(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dt.date | dt.datetime):
        return value.isoformat()
    return str(value)


def _bound(column: Column, value: Any, at: tuple[Any, ...], problems: Problems) -> pa.Scalar | None:
    """min/max as an Arrow scalar of the column's type.

    Dates and timestamps are written in ISO 8601 whatever the column's
    ``format`` (a bound is config, not data); a timestamp bound without an
    offset is wall-clock time in the column's time zone.
    """
    if value is None:
        return None
    if column.kind not in _ORDERED:
        problems.add(at, "min and max are for int, float, decimal, date and timestamp columns")
        return None
    if isinstance(value, bool):
        problems.add(at, f"{value!r} is not a valid {column.kind} bound")
        return None
    try:
        if column.kind == "int":
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            return pa.scalar(int(value), column.arrow)
        if column.kind == "float":
            return pa.scalar(float(value), column.arrow)
        if column.kind == "decimal":
            number = decimal.Decimal(str(value))
            return pc.cast(pa.scalar(number), column.arrow)
        if column.kind == "date":
            day = value if isinstance(value, dt.date) else dt.date.fromisoformat(str(value))
            if isinstance(day, dt.datetime):
                raise ValueError
            return pa.scalar(day, pa.date32())
        stamp = value if isinstance(value, dt.datetime) else _iso_datetime(value)
        tz = column.arrow.tz
        if stamp.tzinfo is None and tz is not None:
            stamp = stamp.replace(tzinfo=zoneinfo.ZoneInfo(tz))
        elif stamp.tzinfo is not None and tz is None:
            raise ValueError
        return pa.scalar(stamp, column.arrow)
    except (ValueError, TypeError, decimal.InvalidOperation, pa.ArrowException):
        hint = " (ISO 8601)" if column.kind in ("date", "timestamp") else ""
        problems.add(at, f"{value!r} is not a valid {column.kind} bound{hint}")
        return None


def _iso_datetime(value: Any) -> dt.datetime:
    if isinstance(value, dt.date):
        return dt.datetime(value.year, value.month, value.day)
    return dt.datetime.fromisoformat(str(value))
