"""EventBridge event patterns: AWS's own verdicts, general properties, and error paths.

The conformance files are EventBridge ``TestEventPattern`` results, so they are
the ground truth; the property tests cover what a fixed list of cases cannot.
"""

from __future__ import annotations

import ipaddress
import json
import operator
import os
import re
import string
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from types import MappingProxyType

import json5
import pytest
from hypothesis import assume, given, reject, settings
from hypothesis import strategies as st

from sluiceway.errors import PatternError
from sluiceway.patterns import compile_pattern

CONFORMANCE = (
    Path(__file__).resolve().parents[2] / "shared" / "conformance" / "eventbridge-patterns"
)
MULTI_KEY = "complex_multi_key_event"  # the one case split into an event and a pattern .json
PROPERTY = settings(deadline=None, max_examples=200)


# ---------------------------------------------------------------------------
# Conformance data, read in place
# ---------------------------------------------------------------------------


def _require_conformance() -> None:
    """Skip when the shared data is absent, unless the run demands every service and dataset."""
    if CONFORMANCE.is_dir():
        return
    reason = f"EventBridge conformance data not found at {CONFORMANCE}"
    if os.environ.get("SLUICEWAY_REQUIRE_SERVICES") == "1":
        pytest.fail(f"{reason} (and SLUICEWAY_REQUIRE_SERVICES=1)")
    pytest.skip(reason)


def _case_names() -> list[str]:
    if not CONFORMANCE.is_dir():
        return []
    names = {path.stem for path in CONFORMANCE.glob("*.json5")}
    if (CONFORMANCE / f"{MULTI_KEY}.json").exists():
        names.add(MULTI_KEY)
    return sorted(names)


def _last_key_wins(pairs: list[tuple[str, object]]) -> dict[str, object]:
    """Build a JSON object keeping the last of any repeated keys.

    ``complex_multi_key_event_pattern.json`` gives "location" twice: first
    ``[{"prefix": "us-"}]``, then ``[{"anything-but": "us-east"}]``. EventBridge
    says the event (location "eu-central-1") matches. Keeping the first would
    not match, and neither would requiring both; keeping the last does. That is
    also what JSON parsers do by default (Python's ``json``, the Jackson parser
    behind EventBridge); merging the two arrays into alternatives would match
    too, but invents a rule no parser applies. So: last key wins, said out loud.
    """
    return dict(pairs)


def _load_case(name: str) -> tuple[dict[str, object], object]:
    """(event, pattern) of a conformance case."""
    if name == MULTI_KEY:
        event = json.loads((CONFORMANCE / f"{name}.json").read_text(encoding="utf-8"))
        text = (CONFORMANCE / f"{name}_pattern.json").read_text(encoding="utf-8")
        return event, json.loads(text, object_pairs_hook=_last_key_wins)
    document = json5.loads((CONFORMANCE / f"{name}.json5").read_text(encoding="utf-8"))
    return document["Event"], document["EventPattern"]


@pytest.mark.parametrize("name", _case_names() or [pytest.param(None, id="no-conformance-data")])
def test_conformance(name: str | None) -> None:
    """File name says the verdict: no suffix = match, _NEG = no match, _EXC = invalid."""
    if name is None:
        _require_conformance()
        pytest.fail(f"no conformance cases found in {CONFORMANCE}")
    event, pattern = _load_case(name)
    if name.endswith("_EXC"):
        with pytest.raises(PatternError) as caught:
            compile_pattern(pattern)
        assert caught.value.message
        return
    assert compile_pattern(pattern).matches(event) is (not name.endswith("_NEG"))


def test_every_conformance_file_is_a_case() -> None:
    """A new file in an unexpected shape must not go silently untested."""
    _require_conformance()
    data = {
        path.name
        for path in CONFORMANCE.iterdir()
        if path.is_file() and not path.name.startswith(".") and path.suffix not in (".md", ".txt")
    }
    names = _case_names()
    covered = {f"{name}.json5" for name in names if name != MULTI_KEY}
    covered |= {f"{MULTI_KEY}.json", f"{MULTI_KEY}_pattern.json"}
    assert data == covered
    assert len(names) > 100


def test_multi_key_pattern_really_repeats_a_key() -> None:
    """The special case only tests last-key-wins if the key is indeed repeated."""
    _require_conformance()
    repeated: list[str] = []

    def spot(pairs: list[tuple[str, object]]) -> dict[str, object]:
        repeated.extend(key for key, count in Counter(key for key, _ in pairs).items() if count > 1)
        return _last_key_wins(pairs)

    json.loads((CONFORMANCE / f"{MULTI_KEY}_pattern.json").read_text(), object_pairs_hook=spot)
    assert repeated == ["location"]


# ---------------------------------------------------------------------------
# Properties
# ---------------------------------------------------------------------------

KEYS = st.text(alphabet=string.ascii_letters + string.digits + "-_.", min_size=1, max_size=5)
NUMBERS = (
    st.integers(-20, 20)
    | st.integers(-20, 20).map(float)
    | st.floats(-1e6, 1e6, allow_nan=False)
    | st.integers(-(10**12), 10**12)
)
SCALARS = st.none() | st.booleans() | NUMBERS | st.text(max_size=8)
JSON_VALUES = st.recursive(
    SCALARS | st.lists(SCALARS, max_size=4),
    lambda inner: st.dictionaries(KEYS, inner, max_size=4),
    max_leaves=12,
)
EVENTS = st.dictionaries(KEYS, JSON_VALUES, min_size=1, max_size=5)
COMPARE: dict[str, Callable[[float, float], bool]] = {
    "<": operator.lt,
    "<=": operator.le,
    "=": operator.eq,
    ">": operator.gt,
    ">=": operator.ge,
}


def _exact_pattern(event: dict[str, object]) -> dict[str, object]:
    """The pattern accepting exactly each leaf value ``event`` has (empty parts left out)."""
    pattern: dict[str, object] = {}
    for key, value in event.items():
        if isinstance(value, dict):
            if inner := _exact_pattern(value):
                pattern[key] = inner
        elif isinstance(value, list):
            if value:
                pattern[key] = list(value)
        else:
            pattern[key] = [value]
    return pattern


def _same_json_value(a: object, b: object) -> bool:
    """JSON equality: numbers by value (1 == 1.0), but never across types (1 != true != "1")."""

    def kind(value: object) -> str:
        number = isinstance(value, int | float) and not isinstance(value, bool)
        return "number" if number else type(value).__name__

    return kind(a) == kind(b) and a == b


def _escape_wildcard(text: str) -> str:
    return text.replace("\\", "\\\\").replace("*", "\\*")


@PROPERTY
@given(EVENTS)
def test_exact_pattern_built_from_an_event_matches_it(event: dict[str, object]) -> None:
    pattern = _exact_pattern(event)
    assume(pattern)
    assert compile_pattern(pattern).matches(event)


@PROPERTY
@given(st.text(), st.text())
def test_prefix_and_suffix_agree_with_str_methods(affix: str, value: str) -> None:
    prefix = compile_pattern({"k": [{"prefix": affix}]})
    suffix = compile_pattern({"k": [{"suffix": affix}]})
    assert prefix.matches({"k": value}) is value.startswith(affix)
    assert suffix.matches({"k": value}) is value.endswith(affix)
    assert prefix.matches({"k": affix + value})
    assert suffix.matches({"k": value + affix})


@PROPERTY
@given(st.text(alphabet=string.ascii_letters, max_size=6), st.text(max_size=6))
def test_ignore_case_prefix_and_suffix_ignore_case(affix: str, rest: str) -> None:
    flipped = affix.swapcase()
    prefix = compile_pattern({"k": [{"prefix": {"equals-ignore-case": affix}}]})
    suffix = compile_pattern({"k": [{"suffix": {"equals-ignore-case": affix}}]})
    equals = compile_pattern({"k": [{"equals-ignore-case": affix}]})
    assert prefix.matches({"k": flipped + rest})
    assert suffix.matches({"k": rest + flipped})
    assert equals.matches({"k": flipped})


@PROPERTY
@given(
    st.none() | st.booleans() | NUMBERS,
    st.sampled_from(
        [
            {"prefix": ""},
            {"suffix": ""},
            {"wildcard": "*"},
            {"prefix": {"equals-ignore-case": ""}},
            {"cidr": "0.0.0.0/0"},
        ]
    ),
)
def test_string_operators_never_match_other_types(value: object, matcher: object) -> None:
    """Even operators that accept every string must not accept null, booleans or numbers."""
    assert not compile_pattern({"k": [matcher]}).matches({"k": value})


@PROPERTY
@given(st.text(max_size=6) | NUMBERS, SCALARS)
def test_anything_but_excludes_exactly_its_value(excluded: object, value: object) -> None:
    single = compile_pattern({"k": [{"anything-but": excluded}]})
    listed = compile_pattern({"k": [{"anything-but": [excluded]}]})
    assert not single.matches({"k": excluded})
    assert not listed.matches({"k": excluded})
    assert single.matches({"k": value}) is not _same_json_value(value, excluded)
    assert not single.matches({})  # a missing field is not "anything"


@PROPERTY
@given(st.sampled_from(sorted(COMPARE)), NUMBERS, NUMBERS)
def test_numeric_comparison_agrees_with_python(op: str, bound: float, value: float) -> None:
    pattern = compile_pattern({"k": [{"numeric": [op, bound]}]})
    assert pattern.matches({"k": value}) is COMPARE[op](value, bound)
    assert not pattern.matches({"k": str(value)})


@PROPERTY
@given(st.sampled_from([">", ">="]), NUMBERS, st.sampled_from(["<", "<="]), NUMBERS, NUMBERS)
def test_numeric_range_agrees_with_python(
    low_op: str, low: float, high_op: str, high: float, value: float
) -> None:
    assume(low < high)
    pattern = compile_pattern({"k": [{"numeric": [low_op, low, high_op, high]}]})
    expected = COMPARE[low_op](value, low) and COMPARE[high_op](value, high)
    assert pattern.matches({"k": value}) is expected


SUB_PATTERNS = st.dictionaries(
    st.sampled_from(["a", "b", "c"]),
    st.sampled_from(
        [
            ["x"],
            [1],
            [None],
            [{"prefix": "x"}],
            [{"numeric": [">", 0]}],
            [{"exists": True}],
            [{"exists": False}],
            [{"anything-but": "x"}],
            ["y", {"suffix": "y"}],
        ]
    ),
    min_size=1,
    max_size=2,
)
SMALL_EVENTS = st.dictionaries(
    st.sampled_from(["a", "b", "c"]),
    st.sampled_from(["x", "xy", "y", 0, 1, 2, None, True, ["x", 1], {"x": 1}]),
    max_size=3,
)


@PROPERTY
@given(SUB_PATTERNS, SUB_PATTERNS, SMALL_EVENTS)
def test_or_matches_when_either_side_does(
    p: dict[str, object], q: dict[str, object], event: dict[str, object]
) -> None:
    either = compile_pattern(p).matches(event) or compile_pattern(q).matches(event)
    assert compile_pattern({"$or": [p, q]}).matches(event) is either
    assert compile_pattern({"d": {"$or": [p, q]}}).matches({"d": event}) is either


@PROPERTY
@given(st.text(), st.text())
def test_wildcard_without_star_is_equality(text: str, other: str) -> None:
    plain = text.replace("*", "").replace("\\", "")
    assert compile_pattern({"k": [{"wildcard": plain}]}).matches({"k": other}) is (other == plain)
    escaped = compile_pattern({"k": [{"wildcard": _escape_wildcard(text)}]})
    assert escaped.matches({"k": text})
    assert escaped.matches({"k": other}) is (other == text)


@PROPERTY
@given(
    st.text(alphabet="ab*", max_size=8).filter(lambda w: "**" not in w),
    st.text(alphabet="abc", max_size=10),
)
def test_wildcard_agrees_with_a_regex(wildcard: str, value: str) -> None:
    try:
        pattern = compile_pattern({"k": [{"wildcard": wildcard}]})
    except PatternError:  # too complex for EventBridge; covered by the conformance data
        reject()
    regex = ".*".join(re.escape(part) for part in wildcard.split("*"))
    assert pattern.matches({"k": value}) is (re.fullmatch(regex, value, re.DOTALL) is not None)


@PROPERTY
@given(st.lists(st.text(max_size=3), max_size=5), st.text(max_size=3))
def test_event_array_matches_when_any_element_does(values: list[str], wanted: str) -> None:
    assert compile_pattern({"k": [wanted]}).matches({"k": values}) is (wanted in values)


@PROPERTY
@given(st.integers(0, 2**32 - 1), st.integers(0, 2**32 - 1), st.integers(0, 32))
def test_cidr_agrees_with_bit_masks(network: int, address: int, bits: int) -> None:
    cidr = f"{ipaddress.IPv4Address(network)}/{bits}"
    inside = network >> (32 - bits) == address >> (32 - bits)
    pattern = compile_pattern({"ip": [{"cidr": cidr}]})
    assert pattern.matches({"ip": str(ipaddress.IPv4Address(address))}) is inside


# ---------------------------------------------------------------------------
# Errors name the offending part of the pattern
# ---------------------------------------------------------------------------


def _error(pattern: object, path: tuple[str | int, ...], fragment: str, id: str) -> object:
    return pytest.param(pattern, path, fragment, id=id)


@pytest.mark.parametrize(
    ("pattern", "path", "fragment"),
    [
        _error(
            {"detail": {"object": {"key": [{"suffix": 123}]}}},
            ("detail", "object", "key", 0, "suffix"),
            '"suffix" takes a string',
            "suffix-not-a-string",
        ),
        _error({"source": "aws.s3"}, ("source",), 'like ["aws.s3"]', "leaf-not-an-array"),
        _error({"source": []}, ("source",), "empty array", "empty-array"),
        _error({"detail": {}}, ("detail",), "empty object", "empty-object"),
        _error(["aws.s3"], (), "must be a JSON object", "pattern-not-an-object"),
        _error({"a": [["x"]]}, ("a", 0), "cannot be nested", "nested-array"),
        _error({"a": [{"EXISTS": True}]}, ("a", 0, "EXISTS"), '"exists"?', "operator-casing"),
        _error({"a": [{"contains": "x"}]}, ("a", 0, "contains"), "unknown", "unknown-operator"),
        _error({"a": [{"prefix": "x", "suffix": "y"}]}, ("a", 0), "exactly one", "two-operators"),
        _error({"a": [{"exists": "yes"}]}, ("a", 0, "exists"), "true or false", "exists-string"),
        _error({"a": [float("nan")]}, ("a", 0), "finite", "nan-value"),
        _error(
            {"a": [{"numeric": [">", 0, "<"]}]},
            ("a", 0, "numeric"),
            '"numeric" takes',
            "numeric-odd-length",
        ),
        _error(
            {"a": [{"numeric": [">", 0, ">", 5]}]},
            ("a", 0, "numeric", 2),
            "upper bound",
            "numeric-two-lower-bounds",
        ),
        _error(
            {"a": [{"numeric": ["<", 5, ">", 0]}]},
            ("a", 0, "numeric", 0),
            "lower bound",
            "numeric-bounds-reversed",
        ),
        _error(
            {"a": [{"numeric": [">", 5, "<", 1]}]},
            ("a", 0, "numeric"),
            "less than",
            "numeric-empty-range",
        ),
        _error(
            {"a": [{"numeric": ["==", 5]}]},
            ("a", 0, "numeric", 0),
            "expected one of",
            "numeric-bad-operator",
        ),
        _error(
            {"a": [{"numeric": [">", "5"]}]},
            ("a", 0, "numeric", 1),
            "expected a number",
            "numeric-string-bound",
        ),
        _error({"a": [{"wildcard": "a**"}]}, ("a", 0, "wildcard"), "consecutive", "double-star"),
        _error({"a": [{"wildcard": "a\\b"}]}, ("a", 0, "wildcard"), "escape", "bad-escape"),
        _error(
            {"a": ["x", {"wildcard": "*:*:*:*:*:x/*"}]},
            ("a", 1, "wildcard"),
            "too complex",
            "wildcard-too-complex",
        ),
        _error({"a": [{"cidr": "10.0.0.0/33"}]}, ("a", 0, "cidr"), "IPv4 or IPv6", "cidr-mask"),
        _error(
            {"a": [{"anything-but": ["x", None]}]},
            ("a", 0, "anything-but", 1),
            "strings or numbers",
            "anything-but-null",
        ),
        _error(
            {"a": [{"anything-but": ["x", 1]}]},
            ("a", 0, "anything-but"),
            "only strings or only numbers",
            "anything-but-mixed",
        ),
        _error(
            {"a": [{"anything-but": {"prefix": ""}}]},
            ("a", 0, "anything-but", "prefix"),
            "exclude every string",
            "anything-but-empty-prefix",
        ),
        _error(
            {"a": [{"anything-but": {"numeric": [">", 1]}}]},
            ("a", 0, "anything-but", "numeric"),
            "prefix, suffix, wildcard, equals-ignore-case",
            "anything-but-numeric",
        ),
        _error(
            {"a": [{"prefix": {"equals-ignore-case": 1}}]},
            ("a", 0, "prefix", "equals-ignore-case"),
            "takes a string",
            "prefix-ignore-case-number",
        ),
        _error({"$or": [{"a": ["x"]}]}, ("$or",), "at least two", "or-single"),
        _error({"$or": [{"a": ["x"]}, "b"]}, ("$or", 1), "must be an object", "or-not-object"),
        _error(
            {"d": {"$or": [{"a": ["x"]}, {"b": "y"}]}},
            ("d", "$or", 1, "b"),
            "expected an array",
            "or-bad-alternative",
        ),
    ],
)
def test_errors_point_at_the_problem(
    pattern: object, path: tuple[str | int, ...], fragment: str
) -> None:
    with pytest.raises(PatternError) as caught:
        compile_pattern(pattern)
    assert caught.value.path == path
    assert fragment in caught.value.message


def test_error_text_starts_with_the_dotted_path() -> None:
    with pytest.raises(PatternError, match=r"^detail\.object\.key\.0\.suffix: "):
        compile_pattern({"detail": {"object": {"key": [{"suffix": 1}]}}})


# ---------------------------------------------------------------------------
# Behaviour worth pinning down by example
# ---------------------------------------------------------------------------


def test_pattern_keeps_its_source() -> None:
    source = {"source": ["aws.s3"]}
    pattern = compile_pattern(source)
    assert pattern.source is source
    assert "aws.s3" in repr(pattern)


def test_fields_in_one_array_element_must_match_together() -> None:
    """EventBridge's array consistency (the example from AWS's event-ruler README)."""
    event = {
        "employees": [
            [{"firstName": "John", "lastName": "Doe"}, {"firstName": "Anna", "lastName": "Smith"}],
            [{"firstName": "Peter", "lastName": "Jones"}],
        ]
    }
    assert compile_pattern({"employees": {"firstName": ["Anna"]}}).matches(event)
    assert compile_pattern({"employees": {"firstName": ["Anna"], "lastName": ["Smith"]}}).matches(
        event
    )
    assert not compile_pattern(
        {"employees": {"firstName": ["Anna"], "lastName": ["Jones"]}}
    ).matches(event)
    split_by_or = {
        "employees": {"firstName": ["Anna"]},
        "$or": [{"employees": {"lastName": ["Jones"]}}, {"other": ["x"]}],
    }
    assert not compile_pattern(split_by_or).matches(event)


def test_exists_sees_only_leaf_values() -> None:
    present = compile_pattern({"a": [{"exists": True}]})
    absent = compile_pattern({"a": [{"exists": False}]})
    for event, has_leaf in [
        ({"a": None}, True),
        ({"a": [1]}, True),
        ({"a": []}, False),
        ({"a": {"b": 1}}, False),
        ({}, False),
    ]:
        assert present.matches(event) is has_leaf
        assert absent.matches(event) is not has_leaf


def test_wildcard_escapes() -> None:
    star = compile_pattern({"k": [{"wildcard": "a\\*b*"}]})
    assert star.matches({"k": "a*b"})
    assert star.matches({"k": "a*bc"})
    assert not star.matches({"k": "axb"})
    backslash = compile_pattern({"k": [{"wildcard": "a\\\\*"}]})
    assert backslash.matches({"k": "a\\"})
    assert backslash.matches({"k": "a\\b"})
    assert not backslash.matches({"k": "ab"})


def test_many_wildcards_with_a_shared_start_are_not_too_complex() -> None:
    buckets = [{"wildcard": f"arn:aws:s3:::bucket-{i}/*"} for i in range(30)]
    pattern = compile_pattern({"resources": buckets})
    assert pattern.matches({"resources": ["arn:aws:s3:::bucket-7/key"]})
    assert not pattern.matches({"resources": ["arn:aws:s3:::bucket-70/key"]})


def test_events_may_be_any_mapping() -> None:
    pattern = compile_pattern({"detail": {"state": ["running"]}})
    assert pattern.matches(MappingProxyType({"detail": MappingProxyType({"state": "running"})}))


def test_matching_does_not_mutate_pattern_or_event() -> None:
    source = {"detail": {"k": [{"anything-but": ["x"]}], "$or": [{"a": [1]}, {"b": [2]}]}}
    event = {"detail": {"k": ["y", "x"], "a": [1, 3]}}
    before = (json.dumps(source), json.dumps(event))
    assert compile_pattern(source).matches(event)
    assert (json.dumps(source), json.dumps(event)) == before


# ---------------------------------------------------------------------------
# Deciding from the pattern alone whether a bucket's events may match
# ---------------------------------------------------------------------------

BUCKET_NAMES = st.sampled_from(["bronze", "BRONZE", "staging", "bronze-2", "b.r", ""])
NAME_MATCHERS = st.one_of(
    BUCKET_NAMES,
    st.builds(lambda v: {"prefix": v}, BUCKET_NAMES),
    st.builds(lambda v: {"suffix": v}, BUCKET_NAMES.filter(bool)),
    st.builds(lambda v: {"equals-ignore-case": v}, BUCKET_NAMES.filter(bool)),
    st.builds(lambda v: {"wildcard": v}, st.sampled_from(["bro*", "*ing", "*", "b*e"])),
    st.builds(lambda v: {"anything-but": v}, BUCKET_NAMES | st.lists(BUCKET_NAMES, min_size=1)),
    st.builds(lambda v: {"anything-but": {"prefix": v}}, BUCKET_NAMES.filter(bool)),
    st.builds(lambda v: {"exists": v}, st.booleans()),
)


def _name_part(matchers: list[object], dotted: bool) -> dict[str, object]:
    """The same constraint on the bucket name, spelled nested or with a dotted key."""
    if dotted:
        return {"detail.bucket.name": matchers}
    return {"detail": {"bucket": {"name": matchers}}}


BUCKET_PATTERNS = st.recursive(
    st.builds(_name_part, st.lists(NAME_MATCHERS, min_size=1, max_size=3), st.booleans())
    | st.just({"detail": {"object": {"key": [{"suffix": ".csv"}]}}})
    | st.just({"resources": ["bucket:staging"]})
    | st.just({"source": ["sluiceway.bucket"]}),
    lambda inner: (
        st.builds(lambda a, b: {"$or": [a, b]}, inner, inner)
        | st.builds(lambda a, b: {**a, **b}, inner, inner)
    ),
    max_leaves=4,
)


@PROPERTY
@given(BUCKET_PATTERNS, BUCKET_NAMES, st.sampled_from(["a.csv", "x/y.json"]))
def test_may_match_with_never_says_no_to_an_event_that_matches(
    pattern: dict[str, object], bucket: str, key: str
) -> None:
    from sluiceway.events import object_created

    event = object_created(bucket, key, size=1, etag="e", sequencer="0").to_dict()
    compiled = compile_pattern(pattern)
    if compiled.matches(event):
        assert compiled.may_match_with("detail.bucket.name", bucket)


def test_may_match_with_rules_out_only_buckets_the_name_field_excludes() -> None:
    rule = compile_pattern(
        {"detail-type": ["Object Created"], "detail": {"bucket": {"name": ["bronze"]}}}
    )
    assert rule.may_match_with("detail.bucket.name", "bronze")
    assert not rule.may_match_with("detail.bucket.name", "staging")
    either = compile_pattern(
        {"$or": [{"detail.bucket.name": [{"prefix": "raw-"}]}, {"detail": {"size": [1]}}]}
    )
    assert either.may_match_with("detail.bucket.name", "staging")  # the other branch may
    both = compile_pattern(
        {"$or": [{"detail.bucket.name": [{"prefix": "raw-"}]}, {"detail.bucket.name": ["x"]}]}
    )
    assert not both.may_match_with("detail.bucket.name", "staging")
    not_staging = compile_pattern({"detail": {"bucket": {"name": [{"anything-but": "staging"}]}}})
    assert not not_staging.may_match_with("detail.bucket.name", "staging")
    assert not_staging.may_match_with("detail.bucket.name", "bronze")
    # A name that must be absent: never so in a bucket event.
    assert not compile_pattern({"detail.bucket.name": [{"exists": False}]}).may_match_with(
        "detail.bucket.name", "bronze"
    )
    # Unconstrained names, or constrained only elsewhere: may match.
    assert compile_pattern({"resources": ["bucket:bronze"]}).may_match_with(
        "detail.bucket.name", "staging"
    )
