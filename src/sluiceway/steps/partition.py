"""Hive partitioning shared by the Parquet writer and the stream dataset writer.

``partition_by: [country, {date: created_at}]`` names plain columns and
values derived from a date or timestamp column. Both writers parse and derive
them here, so a pipeline means the same layout whichever step writes it.
"""

from __future__ import annotations

import re

import pyarrow as pa
import pyarrow.compute as pc

from ..errors import InputError

DERIVED = {"date": "%Y-%m-%d", "year": "%Y", "month": "%m", "day": "%d", "hour": "%H"}

PartitionBy = list[str | dict[str, str]]


def check_partition_by(parts: PartitionBy) -> PartitionBy:
    """A pydantic field validator body: every derived part is known and single."""
    for part in parts:
        if isinstance(part, dict) and (len(part) != 1 or next(iter(part)) not in DERIVED):
            raise ValueError(f"a derived partition is one of {sorted(DERIVED)}: COLUMN, got {part}")
    return parts


def partition_spec(parts: PartitionBy) -> list[tuple[str, str, str | None]]:
    """``[country, {date: created_at}]`` → ``[(country, country, None), (date, created_at, fmt)]``

    (the partition's name, the column it comes from, a strftime format when derived).
    """
    out: list[tuple[str, str, str | None]] = []
    for part in parts:
        if isinstance(part, str):
            out.append((part, part, None))
        else:
            name, column = next(iter(part.items()))
            out.append((name, column, DERIVED[name]))
    return out


def derive(
    data: pa.Table | pa.RecordBatch, name: str, column: str, fmt: str, where: str
) -> pa.Array | pa.ChunkedArray:
    """A partition value computed from a date or timestamp column.

    Text is read as ISO 8601; a value without an offset is taken as UTC.
    """
    values = data.column(column)
    if pa.types.is_string(values.type) or pa.types.is_large_string(values.type):
        try:
            values = pc.cast(values, pa.timestamp("us", tz="UTC"))
        except pa.ArrowInvalid as e:
            raise InputError(
                f"cannot derive partition {name!r} from column {column!r}: {e}",
                file=where,
                field=column,
            ) from None
    if pa.types.is_date(values.type):
        values = pc.cast(values, pa.timestamp("s"))
    if not pa.types.is_timestamp(values.type):
        raise InputError(
            f"partition {name!r} needs a date or timestamp column; {column!r} is {values.type}",
            file=where,
            field=column,
        )
    return _strftime(values, fmt)


def _strftime(values: pa.Array | pa.ChunkedArray, fmt: str) -> pa.Array | pa.ChunkedArray:
    """``pc.strftime(values, fmt)`` for the DERIVED formats, formatting each distinct
    day (or hour) once: strftime costs microseconds a row, and a flush holds
    thousands of rows of a few days. Only for UTC or naive times, where flooring
    to the day or hour cannot cross a change of offset."""
    if values.type.tz not in (None, "UTC", "Etc/UTC", "+00:00") or "%" in re.sub(
        "%[YmdH]", "", fmt
    ):
        return pc.strftime(values, format=fmt)
    if isinstance(values, pa.ChunkedArray):
        values = values.combine_chunks()
    floored = pc.floor_temporal(values, unit="hour" if "%H" in fmt else "day")
    encoded = pc.dictionary_encode(floored)
    return pc.take(pc.strftime(encoded.dictionary, format=fmt), encoded.indices)
