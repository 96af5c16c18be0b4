from hypothesis import given
from hypothesis import strategies as st

from sluiceway.events import OBJECT_CREATED, Event, object_created


def test_object_created_has_the_eventbridge_s3_shape() -> None:
    e = object_created("bronze", "in/a.csv", size=12, etag="abc", sequencer="0001")
    d = e.to_dict()
    assert d["detail-type"] == OBJECT_CREATED
    assert d["detail"]["bucket"] == {"name": "bronze"}
    assert d["detail"]["object"] == {
        "key": "in/a.csv",
        "size": 12,
        "etag": "abc",
        "sequencer": "0001",
    }
    assert {"id", "time", "source", "version", "account", "region", "resources"} <= set(d)
    assert e.input_identity == "bronze/in/a.csv@abc"


def test_event_without_bucket_is_identified_by_its_id() -> None:
    e = Event(source="app", detail_type="signup", detail={"user": 1})
    assert e.input_identity == f"event:{e.id}"


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(), inner, max_size=3),
    max_leaves=10,
)


@given(
    source=st.text(min_size=1),
    detail_type=st.text(min_size=1),
    detail=st.dictionaries(st.text(), json_values, max_size=4),
)
def test_events_round_trip_through_json(source: str, detail_type: str, detail: dict) -> None:
    e = Event(source=source, detail_type=detail_type, detail=detail)
    assert Event.from_json(e.to_json()) == e


def test_not_an_envelope_is_rejected() -> None:
    import pytest

    with pytest.raises(ValueError, match="missing"):
        Event.from_json('{"hello": 1}')


def test_event_ids_are_version_4_uuids_and_times_utc_microseconds() -> None:
    import re
    import uuid
    from datetime import UTC, datetime

    ids = {Event(source="s", detail_type="t", detail={}).id for _ in range(500)}
    assert len(ids) == 500
    for text in ids:
        parsed = uuid.UUID(text)
        assert (parsed.version, parsed.variant, str(parsed)) == (4, uuid.RFC_4122, text)
    e = object_created("b", "k", size=1, etag="e", sequencer="0")
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z", e.time)
    assert abs(e.timestamp - datetime.now(UTC).timestamp()) < 60
    assert re.fullmatch(r"[0-9A-F]{16}", e.detail["request-id"])
