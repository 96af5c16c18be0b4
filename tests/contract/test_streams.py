"""The stream contract: ordered, durable, never-reused seqs and consumer checkpoints.

Every backend of ``sluiceway.streams.base.Stream`` must pass this suite.
"""

from __future__ import annotations

import itertools
import json
import threading
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sluiceway.state import StateDB
from sluiceway.streams.base import CheckpointConflict, Stream
from sluiceway.streams.events import EventChunk, check_event, check_events, fragments_to_batch
from sluiceway.streams.sqlite import SqliteStream


class Clock:
    def __init__(self, t: float = 1_000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def _sqlite(tmp_path: Path, name: str, clock: Clock) -> Stream:
    return SqliteStream(StateDB(tmp_path / "state.db"), name, clock=clock)


BACKENDS: dict[str, Callable[[Path, str, Clock], Stream]] = {"sqlite": _sqlite}


@pytest.fixture(params=sorted(BACKENDS))
def make(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Callable[..., Stream]]:
    opened: list[Stream] = []

    def make(name: str = "s", clock: Clock | None = None) -> Stream:
        s = BACKENDS[request.param](tmp_path, name, clock or Clock())
        opened.append(s)
        return s

    yield make
    for s in opened:
        s.close()


def test_append_assigns_consecutive_seqs_from_one(make: Callable[..., Stream]) -> None:
    s = make()
    assert s.last_seq() == 0 and s.length() == 0
    assert s.append([{"a": 1}, {"a": 2}]) == [1, 2]
    assert s.append([{"a": 3}]) == [3]
    assert s.append([]) == []
    assert s.last_seq() == 3 and s.length() == 3


def test_read_is_inclusive_ordered_and_bounded(make: Callable[..., Stream]) -> None:
    s = make()
    s.append([{"i": i, "nested": {"x": [i, "ü"]}} for i in range(10)])
    got = s.read(4, 3)
    assert [r.seq for r in got] == [4, 5, 6]
    assert [r.data for r in got] == [{"i": i, "nested": {"x": [i, "ü"]}} for i in (3, 4, 5)]
    assert [r.seq for r in s.read(9, 100)] == [9, 10]
    assert s.read(11, 10) == []
    assert s.read(1, 0) == []


def test_arrival_times_never_go_backwards(make: Callable[..., Stream]) -> None:
    clock = Clock(100.0)
    s = make(clock=clock)
    s.append([{"i": 1}])
    clock.t = 50.0  # the wall clock stepped back
    s.append([{"i": 2}])
    clock.t = 200.0
    s.append([{"i": 3}])
    assert [r.appended_at for r in s.read(1, 10)] == [100.0, 100.0, 200.0]


def test_streams_are_independent(make: Callable[..., Stream]) -> None:
    a, b = make("a"), make("b")
    a.append([{"x": 1}, {"x": 2}])
    assert b.append([{"y": 1}]) == [1]
    assert [r.data for r in b.read(1, 10)] == [{"y": 1}]
    a.set_checkpoint("f", 2)
    assert b.checkpoint("f") == 0


def test_checkpoints_per_consumer_with_compare_and_set(make: Callable[..., Stream]) -> None:
    s = make()
    s.append([{"i": i} for i in range(5)])
    assert s.checkpoint("f") == 0
    s.set_checkpoint("f", 3, expect=0)
    assert s.checkpoint("f") == 3 and s.checkpoint("g") == 0
    with pytest.raises(CheckpointConflict):
        s.set_checkpoint("f", 5, expect=0)  # a stale consumer is fenced off
    assert s.checkpoint("f") == 3
    s.set_checkpoint("f", 5, expect=3)
    assert s.checkpoint("f") == 5


def test_records_and_checkpoints_are_durable(tmp_path: Path, make: Callable[..., Stream]) -> None:
    s = make()
    s.append([{"i": 1}, {"i": 2}])
    s.set_checkpoint("f", 1)
    again = make()  # a new connection, as after a restart
    assert [r.data for r in again.read(1, 10)] == [{"i": 1}, {"i": 2}]
    assert again.checkpoint("f") == 1


def test_trim_keeps_newer_records_and_never_reuses_seqs(make: Callable[..., Stream]) -> None:
    clock = Clock(10.0)
    s = make(clock=clock)
    s.append([{"i": i} for i in range(3)])  # seqs 1..3 at t=10
    clock.t = 20.0
    s.append([{"i": i} for i in range(3, 6)])  # seqs 4..6 at t=20
    assert s.trim(5, older_than=15.0) == 3  # only the old ones, even below upto
    assert [r.seq for r in s.read(1, 10)] == [4, 5, 6]
    assert s.trim(4, limit=10) == 1
    assert s.trim(100) == 2
    assert s.length() == 0 and s.last_seq() == 6
    assert s.append([{"i": 6}]) == [7]


def test_concurrent_appenders_get_unique_gapless_seqs(make: Callable[..., Stream]) -> None:
    s = make()
    writers, per_writer = 4, 25
    errors: list[BaseException] = []

    def write(w: int) -> None:
        try:
            for i in range(per_writer):
                s.append([{"w": w, "i": i}, {"w": w, "i": i, "second": True}])
        except BaseException as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=write, args=(w,)) for w in range(writers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors
    records = s.read(1, 10_000)
    assert [r.seq for r in records] == list(range(1, writers * per_writer * 2 + 1))
    for w in range(writers):  # each writer's records in its own order, batches kept together
        mine = [r for r in records if r.data["w"] == w]
        assert [r.data["i"] for r in mine[::2]] == list(range(per_writer))
        for first, second in zip(mine[::2], mine[1::2], strict=True):
            assert second.seq == first.seq + 1 and second.data.get("second")


_text = (
    st.from_regex(r"[0-9A-Za-z][\w\-. é]{0,12}", fullmatch=True)
    | st.text(st.characters(codec="utf-8", exclude_categories=["Cs"]), min_size=1, max_size=12)
    | st.sampled_from([" padded ", "\u2028x", 'q"uote', "back\\slash", "\t", "x" * 257])
)
_json = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=False) | _text,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(_text, inner, max_size=3),
    max_leaves=8,
)
_events = st.fixed_dictionaries(
    {
        "event_uuid": _text,
        "event_name": _text,
        "created_at": st.datetimes(timezones=st.sampled_from([UTC, timezone(timedelta(hours=-5))]))
        .filter(lambda d: d.astimezone(UTC).year >= 1000)
        .map(lambda d: d.isoformat()),
    },
    optional={"payload": _json},
)


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(events=st.lists(_events, min_size=1, max_size=8), raw=st.lists(_json, max_size=2))
def test_read_events_is_read_turned_into_events(
    make: Callable[..., Stream], events: list[dict[str, Any]], raw: list[Any]
) -> None:
    """A backend's own read_events gives exactly the batch and rejections that the
    record-by-record path gives: for events as ingest stores them (checked and
    normalised), and for anything appended without the check."""
    stream = make(f"s{uuid.uuid4().hex[:8]}")
    good = [e for e in events if not check_event(e, 0)[1]]
    stream.append(check_events(good))
    stream.append([r if isinstance(r, dict) else {"not": r} for r in raw])
    stream.append(good[:1])  # valid, but not normalised
    last = stream.last_seq()
    for start, size in itertools.product(range(1, last + 1), (1, 2, last)):
        assert_same_chunk(stream.read_events(start, size), EventChunk.of(stream.read(start, size)))


def test_read_events_of_plain_events_is_vectorised() -> None:
    """The fast path is taken for ordinary events (else the test above proves nothing)."""
    events = check_events(
        [
            {
                "event_uuid": f"u{i}",
                "event_name": "x",
                "created_at": "2026-11-24T10:00:00Z",
                "payload": {"n": i, "s": "é\n"},
            }
            for i in range(3)
        ]
    )
    encode = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode
    batch = fragments_to_batch(
        [1.5] * 3,
        [encode(e["event_uuid"]) for e in events],
        [encode(e["event_name"]) for e in events],
        [encode(e["created_at"]) for e in events],
        [encode(e["payload"]) for e in events],
        [1] * 3,
    )
    assert batch is not None and batch.column("payload")[2].as_py() == '{"n":2,"s":"é\\n"}'
    assert fragments_to_batch([1.5], ['"u"'], ['"x"'], ['"2026-02-30T10:00:00.000000Z"'],
                              [None], [1]) is None  # fmt: skip


# created_at as producers write it: the plain forms events_batch reads column by
# column, and the ones it must leave to check_events (offsets, other separators,
# 7 digits of fraction, impossible dates, year 0999).
_created_text = st.one_of(
    st.builds(
        lambda d, digits, zone: (
            d.strftime("%Y-%m-%dT%H:%M:%S")
            + (f".{d.microsecond:06d}"[: digits + 1] if digits else "")
            + zone
        ),
        st.datetimes(),
        st.integers(0, 7),
        st.sampled_from(["", "Z", "+00:00", "+02:00", "z"]),
    ),
    st.sampled_from(
        [
            "2026-02-30T10:00:00Z",
            "2026-11-24T24:00:00Z",
            "2026-11-24T10:00:60Z",
            "0999-01-01T00:00:00Z",
            "0000-01-01T00:00:00Z",
            "2026-11-24 10:00:00",
            "2026-11-24",
            "nope",
        ]
    ),
)
_raw_events = st.fixed_dictionaries(
    {
        "event_uuid": _text | st.just(b"bytes") | st.integers(),
        "event_name": _text,
        "created_at": _created_text,
    },
    optional={"payload": _json, "extra": st.integers()},
)


def _precise(objs: list[Any]) -> Any:
    """What check_events and records_to_batch make of ``objs``, without received_at."""
    from sluiceway.streams.base import Record
    from sluiceway.streams.events import records_to_batch

    batch, rejected = records_to_batch(
        [Record(i, 0.0, e) for i, e in enumerate(check_events(objs))]
    )
    assert not rejected
    return batch.drop_columns(["received_at"])


@settings(max_examples=300, deadline=None)
@given(objs=st.lists(_raw_events | st.sampled_from([None, [], "x"]), min_size=1, max_size=6))
def test_events_batch_is_check_events_column_by_column(objs: list[Any]) -> None:
    """The vectorised check accepts exactly what check_event accepts, stores what it
    normalises, and names the same records and fields when it refuses."""
    from sluiceway.streams.events import EventError, events_batch

    try:
        want = _precise(objs)
    except EventError as e:
        with pytest.raises(EventError) as got:
            events_batch(objs)
        assert str(got.value) == str(e) and got.value.total == e.total
        return
    got_batch = events_batch(objs)
    assert got_batch.schema.equals(want.schema, check_metadata=True)
    assert got_batch.equals(want)


def test_events_batch_of_plain_events_is_vectorised(monkeypatch: pytest.MonkeyPatch) -> None:
    """Plain events never take the record-by-record check (else the test above proves
    nothing about the fast path)."""
    from sluiceway.streams import events as module

    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("check_events was called")

    monkeypatch.setattr(module, "check_events", refuse)
    batch = module.events_batch(
        [
            {"event_uuid": "u1", "event_name": "x", "created_at": "2026-11-24T10:00:00.5Z"},
            {"event_uuid": "u2", "event_name": "y", "created_at": "2026-11-24T10:00:00+00:00"},
            {
                "event_uuid": "u3",
                "event_name": "z",
                "created_at": "2026-11-24T10:00:00.123456",
                "payload": {"n": 1},
            },
        ]
    )
    assert batch.column("created_at").cast("int64").to_pylist() == [
        1_795_514_400_500_000,
        1_795_514_400_000_000,
        1_795_514_400_123_456,
    ]
    assert batch.column("payload").to_pylist() == [None, None, '{"n":1}']


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    appends=st.lists(
        st.tuples(st.booleans(), st.lists(_events, min_size=1, max_size=5)), min_size=1, max_size=4
    )
)
def test_appended_events_read_as_if_appended_as_json(
    make: Callable[..., Stream], appends: list[tuple[bool, list[dict[str, Any]]]]
) -> None:
    """append_events (segments) and append of the checked events (JSON rows, and every
    stream written before segments) read the same, however the two are mixed and
    wherever a read starts or stops."""
    from sluiceway.streams.events import events_batch

    tag = uuid.uuid4().hex[:8]
    mixed, plain = make(f"m{tag}"), make(f"p{tag}")
    for as_batch, objs in appends:
        events = [e for e in objs if not check_event(e, 0)[1]]
        if not events:
            continue
        if as_batch:
            seqs = list(mixed.append_events(events_batch(events)))
        else:
            seqs = mixed.append(check_events(events))
        assert seqs == plain.append(check_events(events))
    last = plain.last_seq()
    assert mixed.last_seq() == last and mixed.length() == plain.length()
    for start, size in itertools.product(range(1, last + 1), (1, 2, 3, last)):
        got, want = mixed.read(start, size), plain.read(start, size)
        assert [(r.seq, r.data) for r in got] == [(r.seq, r.data) for r in want]
        assert_same_chunk(mixed.read_events(start, size), EventChunk.of(want))


def test_trim_cuts_segments_to_the_record(make: Callable[..., Stream]) -> None:
    """A trim removes exactly the records asked, also from inside a segment."""
    from sluiceway.streams.events import events_batch

    s = make()
    for n in (3, 4, 5):  # seqs 1-3, 4-7, 8-12
        base = s.last_seq()
        s.append_events(
            events_batch(
                [
                    {"event_uuid": f"u{base + i}", "event_name": "x", "created_at": "2026-11-24"}
                    for i in range(n)
                ]
            )
        )
    assert s.trim(5, limit=10) == 5 and s.length() == 7
    assert [r.seq for r in s.read(1, 100)] == list(range(6, 13))
    assert s.trim(12, limit=4) == 4 and [r.seq for r in s.read(1, 100)] == [10, 11, 12]
    assert s.read(1, 1)[0].data["event_uuid"] == "u9"
    assert s.trim(12) == 3 and s.length() == 0 and s.read_events(1) is None
    assert s.last_seq() == 12


def assert_same_chunk(got: EventChunk | None, want: EventChunk | None) -> None:
    """The vectorised read gives what the exact, record-by-record one gives."""
    assert got is not None and want is not None
    assert (got.first_seq, got.last_seq, got.count) == (want.first_seq, want.last_seq, want.count)
    assert got.batch.equals(want.batch) and got.rejected == want.rejected
