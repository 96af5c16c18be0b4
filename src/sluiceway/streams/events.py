"""What an event record is: checked on every way in, turned into Arrow on the way out.

Producers send ``{"event_uuid", "event_name", "created_at", "payload"}``.
Checking happens where the event enters (the HTTP endpoint, ``stream put``,
``Pipeline.append_events``), so a producer learns at once which record and
which field is wrong, and nothing half-valid reaches the stream where it
would have to be skipped later. ``created_at`` is stored normalised to UTC
(``2026-11-24T10:00:00.000000Z``) so every reader parses one format.
"""

from __future__ import annotations

import json
import json.encoder
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from ..errors import SluicewayError
from .base import Record

REQUIRED = ("event_uuid", "event_name", "created_at")
ALLOWED = frozenset((*REQUIRED, "payload"))
MAX_TEXT = 256  # event_uuid and event_name: ids and names, not documents
MAX_REPORTED = 20  # problems listed in one error; the rest are counted
# How records and payloads are written as JSON text: the C encoder that
# ``json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode`` uses,
# made once (the encoder makes it again on every call, two thirds of the cost
# of a small payload). The same text; only a circular structure differs (a
# RecursionError instead of a ValueError).
_JSON = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False)
_c_encoder = getattr(json.encoder, "c_make_encoder", None)
_encode_chunks = (
    None
    if _c_encoder is None
    else _c_encoder(
        None,
        _JSON.default,
        json.encoder.encode_basestring,  # ensure_ascii=False
        None,
        ":",
        ",",
        False,
        False,
        _JSON.allow_nan,
    )
)


def encode_json(value: Any) -> str:
    if _encode_chunks is None:  # a Python without the C accelerator
        return _JSON.encode(value)
    return "".join(_encode_chunks(value, 0))


# Columns a stream function's steps receive. ``payload`` stays JSON text so the
# schema is the same for every event name; the metadata tells JSON writers to
# embed it as JSON again. ``received_at`` is the stream's arrival time.
JSON_FIELD_META = {b"sluiceway.json": b"true"}
EVENT_SCHEMA = pa.schema(
    [
        pa.field("event_uuid", pa.string(), nullable=False),
        pa.field("event_name", pa.string(), nullable=False),
        pa.field("created_at", pa.timestamp("us", tz="UTC"), nullable=False),
        pa.field("payload", pa.string(), metadata=JSON_FIELD_META),
        pa.field("received_at", pa.timestamp("us", tz="UTC"), nullable=False),
    ]
)
# What a stream stores of an event (the arrival time is the stream's, per append).
EVENT_RECEIVED = EVENT_SCHEMA.field("received_at")
STORED_SCHEMA = EVENT_SCHEMA.remove(EVENT_SCHEMA.get_field_index("received_at"))


@dataclass(frozen=True)
class BadRecord:
    """One problem with one record: which (0-based index), which field, what."""

    index: int
    field: str | None
    message: str
    line: int | None = None  # 1-based, for JSON Lines input

    def __str__(self) -> str:
        where = f"line {self.line}" if self.line is not None else f"record {self.index}"
        field = f"{self.field}: " if self.field else ""
        return f"{where}: {field}{self.message}"

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"index": self.index, "field": self.field, "message": self.message}
        if self.line is not None:
            out["line"] = self.line
        return out


class EventError(SluicewayError):
    """Some records are not events; none of the batch was accepted."""

    def __init__(self, problems: list[BadRecord], total: int | None = None) -> None:
        self.problems = problems[:MAX_REPORTED]
        self.total = total if total is not None else len(problems)
        more = self.total - len(self.problems)
        text = "; ".join(str(p) for p in self.problems)
        super().__init__(text + (f" (and {more} more)" if more > 0 else ""))


def parse_created_at(value: Any) -> datetime:
    """An ISO 8601 timestamp → an aware UTC datetime (no offset means UTC)."""
    if not isinstance(value, str):
        raise ValueError(f"must be an ISO 8601 timestamp string, got {type(value).__name__}")
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        raise ValueError(
            f"not an ISO 8601 timestamp: {value[:64]!r} (e.g. 2026-11-24T10:00:00Z)"
        ) from None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=UTC)
    try:
        return parsed.astimezone(UTC)
    except OverflowError:
        raise ValueError(f"out of range: {value[:64]!r}") from None


def format_time(value: datetime) -> str:
    return value.astimezone(UTC).replace(tzinfo=None).isoformat(timespec="microseconds") + "Z"


def check_event(
    obj: Any, index: int, line: int | None = None
) -> tuple[dict[str, Any], list[BadRecord]]:
    """One record → (the normalised event, its problems); the event is valid if none."""
    if not isinstance(obj, dict):
        kind = "an array" if isinstance(obj, list) else type(obj).__name__
        return {}, [BadRecord(index, None, f"expected a JSON object, got {kind}", line)]
    problems: list[BadRecord] = []
    for name in REQUIRED:
        if name not in obj:
            problems.append(BadRecord(index, name, "missing", line))
    for name in ("event_uuid", "event_name"):
        value = obj.get(name)
        if name in obj and (not isinstance(value, str) or not value.strip()):
            problems.append(BadRecord(index, name, "must be a non-empty string", line))
        elif isinstance(value, str) and len(value) > MAX_TEXT:
            problems.append(BadRecord(index, name, f"longer than {MAX_TEXT} characters", line))
    event = dict(obj)
    if "created_at" in obj:
        try:
            event["created_at"] = format_time(parse_created_at(obj["created_at"]))
        except ValueError as e:
            problems.append(BadRecord(index, "created_at", str(e), line))
    for name in sorted(set(obj) - ALLOWED):
        problems.append(
            BadRecord(index, name, "unknown field (put extra data under 'payload')", line)
        )
    return event, problems


def check_events(objs: Sequence[Any], lines: Sequence[int] | None = None) -> list[dict[str, Any]]:
    """Every record checked; raises EventError naming each bad one, else the events."""
    events: list[dict[str, Any]] = []
    problems: list[BadRecord] = []
    for i, obj in enumerate(objs):
        event, bad = check_event(obj, i, lines[i] if lines is not None else None)
        events.append(event)
        problems.extend(bad)
    if problems:
        raise EventError(problems)
    return events


# An ISO 8601 time that ``parse_created_at`` reads as UTC and that Arrow can take
# apart the same way: seconds, 1 to 6 digits of fraction, then Z, +00:00 or nothing.
_PLAIN_TIME = r"^[1-9]\d{3}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d{1,6})?(Z|\+00:00)?$"


_FIELDS = ((pc.year, 0, 4), (pc.month, 5, 7), (pc.day, 8, 10), (pc.hour, 11, 13),
           (pc.minute, 14, 16), (pc.second, 17, 19))  # fmt: skip


def _seconds_of(text: pa.Array) -> pa.Array | None:
    """``YYYY-MM-DDTHH:MM:SS`` texts (digits where digits go) → timestamp[s], or None
    unless every one is a real time. strptime rolls 30 February over into March,
    so each field of the result must be the one written (cheaper than strftime)."""
    parsed = pc.strptime(text, format="%Y-%m-%dT%H:%M:%S", unit="s", error_is_null=True)
    if parsed.null_count:
        return None
    for field, start, stop in _FIELDS:
        written = pc.cast(pc.utf8_slice_codeunits(text, start, stop), pa.int64())
        if not pc.all(pc.equal(field(parsed), written)).as_py():
            return None
    return parsed


def _texts(values: list[Any]) -> pa.Array | None:
    """event_uuid or event_name values → their array, or None unless every one is a
    ``str`` that ``check_event`` accepts as is (see ``_plain_text``)."""
    if set(map(type, values)) != {str}:
        return None
    text = pa.array(values, pa.string())
    ok = pc.and_(
        pc.match_substring_regex(text, "[0-9A-Za-z]"),
        pc.less_equal(pc.utf8_length(text), MAX_TEXT),
    )
    return text if pc.all(ok).as_py() else None


def _times(values: list[Any]) -> pa.Array | None:
    """created_at values → UTC microseconds, or None unless every one has the plain
    form ``_PLAIN_TIME`` and is a real time (no 30 February, no hour 24)."""
    if set(map(type, values)) != {str}:
        return None
    text = pa.array(values, pa.string())
    if not pc.all(pc.match_substring_regex(text, _PLAIN_TIME)).as_py():
        return None
    parsed = _seconds_of(pc.utf8_slice_codeunits(text, 0, 19))
    if parsed is None:
        return None
    rest = pc.utf8_slice_codeunits(text, 19, 32)  # "", ".5Z", ".123456+00:00", …
    fraction = pc.struct_field(pc.extract_regex(rest, r"^\.?(?P<f>\d*)"), [0])
    micros = pc.cast(pc.utf8_rpad(fraction, 6, "0"), pa.int64())
    return pc.add(pc.multiply(pc.cast(parsed, pa.int64()), 1_000_000), micros)


def events_batch(objs: Sequence[Any], lines: Sequence[int] | None = None) -> pa.RecordBatch:
    """Every record checked, as one batch of ``STORED_SCHEMA``; raises EventError
    naming each bad record (index or line, field), as ``check_events`` does.

    Vectorised: the envelope is checked column by column with Arrow, and only
    when some value is not in the plain form (a time with an offset, a bad
    record) does ``check_events`` run record by record, to normalise it or to
    name the problem. Both give the same batch.
    """
    if set(map(type, objs)) == {dict} and all(map(ALLOWED.issuperset, objs)):
        try:
            uuids = _texts([o["event_uuid"] for o in objs])
            names = _texts([o["event_name"] for o in objs])
            created = _times([o["created_at"] for o in objs])
        except KeyError:
            uuids = names = created = None
        if uuids is not None and names is not None and created is not None:
            return _stored(uuids, names, created, objs)
    events = check_events(objs, lines)
    return _stored(
        pa.array([e["event_uuid"] for e in events], pa.string()),
        pa.array([e["event_name"] for e in events], pa.string()),
        pa.array([_micros(parse_created_at(e["created_at"])) for e in events], pa.int64()),
        events,
    )


def _stored(
    uuids: pa.Array, names: pa.Array, micros: pa.Array, events: Sequence[dict[str, Any]]
) -> pa.RecordBatch:
    payloads = [encode_json(e["payload"]) if "payload" in e else None for e in events]
    return pa.RecordBatch.from_arrays(
        [uuids, names, micros.cast(pa.timestamp("us", tz="UTC")), pa.array(payloads, pa.string())],
        schema=STORED_SCHEMA,
    )


def batch_events(batch: pa.RecordBatch) -> list[dict[str, Any]]:
    """A stored batch → the events as ``check_event`` normalises them (for ``read``)."""
    out: list[dict[str, Any]] = []
    created = batch.column("created_at").to_pylist()
    payloads = batch.column("payload").to_pylist()
    for uuid, name, at, payload in zip(
        batch.column("event_uuid").to_pylist(),
        batch.column("event_name").to_pylist(),
        created,
        payloads,
        strict=True,
    ):
        event = {"event_uuid": uuid, "event_name": name, "created_at": format_time(at)}
        if payload is not None:
            event["payload"] = json.loads(payload)
        out.append(event)
    return out


def parse_json_lines(text: str) -> tuple[list[Any], list[int]]:
    """JSON Lines → (objects, their 1-based line numbers); blank lines are skipped."""
    objs: list[Any] = []
    lines: list[int] = []
    problems: list[BadRecord] = []
    for n, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            objs.append(json.loads(line))
        except ValueError as e:
            problems.append(BadRecord(len(objs), None, f"not valid JSON: {e}", n))
            objs.append(None)
        lines.append(n)
    if problems:
        raise EventError(problems)
    return objs, lines


def _micros(value: datetime) -> int:
    delta = value - datetime(1970, 1, 1, tzinfo=UTC)
    return (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds


def records_to_batch(records: Sequence[Record]) -> tuple[pa.RecordBatch, list[dict[str, Any]]]:
    """Stream records → one batch in seq order, plus the records that are not events.

    Ingest checks every event, so a rejected record here was appended by code
    that skipped the check; it is reported (seq and reason), not retried
    forever.
    """
    uuids: list[str] = []
    names: list[str] = []
    created: list[int] = []
    payloads: list[str | None] = []
    received: list[int] = []
    rejected: list[dict[str, Any]] = []
    for rec in records:
        event, problems = check_event(rec.data, 0)
        if problems:
            rejected.append({"seq": rec.seq, "reason": "; ".join(str(p) for p in problems)})
            continue
        uuids.append(event["event_uuid"])
        names.append(event["event_name"])
        created.append(_micros(parse_created_at(event["created_at"])))
        payloads.append(encode_json(event["payload"]) if "payload" in event else None)
        received.append(round(rec.appended_at * 1_000_000))
    ts = pa.timestamp("us", tz="UTC")
    batch = pa.RecordBatch.from_arrays(
        [
            pa.array(uuids, pa.string()),
            pa.array(names, pa.string()),
            pa.array(created, pa.int64()).cast(ts),
            pa.array(payloads, pa.string()),
            pa.array(received, pa.int64()).cast(ts),
        ],
        schema=EVENT_SCHEMA,
    )
    return batch, rejected


@dataclass(frozen=True)
class EventChunk:
    """Consecutive stream records as one batch: seqs ``first..last``, ``count`` records.

    ``count`` includes the ``rejected`` records (not events), which the batch leaves out.
    """

    first_seq: int
    last_seq: int
    count: int
    batch: pa.RecordBatch
    rejected: list[dict[str, Any]]

    @staticmethod
    def of(records: Sequence[Record]) -> EventChunk | None:
        """The exact path, record by record (``check_event`` decides); None for no records."""
        if not records:
            return None
        batch, rejected = records_to_batch(records)
        return EventChunk(records[0].seq, records[-1].seq, len(records), batch, rejected)


# A stored created_at as ingest writes it (``format_time``), quotes included.
_NORMALISED_TIME = (
    r'^"[1-9]\d{3}-(0[1-9]|1[0-2])-(0[1-9]|[12]\d|3[01])T([01]\d|2[0-3]):[0-5]\d:[0-5]\d'
    r'\.\d{6}Z"$'
)


def _plain_text(fragment: pa.Array) -> pa.Array | None:
    """JSON string fragments (``"abc"``) → their text, or None unless every one is a
    string without escapes, 1 to MAX_TEXT characters, that ``str.strip`` cannot empty
    (it has an ASCII letter or digit): what ``check_event`` accepts as is."""
    if fragment.null_count:
        return None
    ok = pc.match_substring_regex(fragment, r'^"[^"\\]*[0-9A-Za-z][^"\\]*"$')
    text = pc.utf8_slice_codeunits(fragment, 1, -1)
    ok = pc.and_(ok, pc.less_equal(pc.utf8_length(text), MAX_TEXT))
    return text if pc.all(ok).as_py() else None


def fragments_to_batch(
    appended_at: Sequence[float],
    uuid: Sequence[str | None],
    name: Sequence[str | None],
    created_at: Sequence[str | None],
    payload: Sequence[str | None],
    only_known: Sequence[int | None],
) -> pa.RecordBatch | None:
    """Stored events, given as JSON fragments of their fields, → the batch, vectorised.

    ``only_known`` is 1 where the record is an object with no other fields (and
    no field twice). Returns None unless every record is an event as ingest
    stores it (checked, ``created_at`` normalised), so that the result is the
    one ``records_to_batch`` would give; the caller then takes that path. The
    payload fragment is used as it is stored: ingest wrote it with the same
    encoder that ``records_to_batch`` would use again.
    """
    if not all(only_known):
        return None
    uuids, names = (
        _plain_text(pa.array(uuid, pa.string())),
        _plain_text(pa.array(name, pa.string())),
    )
    if uuids is None or names is None:
        return None
    created = pa.array(created_at, pa.string())
    if (
        created.null_count
        or not pc.all(pc.match_substring_regex(created, _NORMALISED_TIME)).as_py()
    ):
        return None
    parsed = _seconds_of(pc.utf8_slice_codeunits(created, 1, 20))
    if parsed is None:
        return None
    micros = pc.cast(pc.utf8_slice_codeunits(created, 21, 27), pa.int64())
    ts = pa.timestamp("us", tz="UTC")
    created_us = pc.add(pc.multiply(pc.cast(parsed, pa.int64()), 1_000_000), micros)
    received = pc.round(pc.multiply(pa.array(appended_at, pa.float64()), 1_000_000.0))
    return pa.RecordBatch.from_arrays(
        [
            uuids,
            names,
            created_us.cast(ts),
            pa.array(payload, pa.string()),
            pc.cast(received, pa.int64()).cast(ts),
        ],
        schema=EVENT_SCHEMA,
    )
