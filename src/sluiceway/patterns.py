"""Amazon EventBridge event patterns: checked once, then matched against many events.

Rules filter events with the EventBridge pattern language, so a rule copied from
AWS behaves the same on a laptop. ``compile_pattern`` validates the whole pattern
up front -- a typo must fail when the pipeline file loads, not when the first
event arrives -- and turns it into a small tree of precompiled tests (sets of
exact values, parsed networks, split wildcards, numeric bounds), so that
``Pattern.matches`` only looks values up and compares them.

How an event is seen, following EventBridge (the tests hold this module to
EventBridge's own ``TestEventPattern`` answers in the shared conformance data):

* An event is a set of *leaf* values (string, number, boolean, null) at paths of
  keys joined with ".": ``{"a": {"b": 1}}`` and ``{"a.b": 1}`` are the same field,
  in events and in patterns alike. Objects and empty arrays are not values, which
  is why ``exists`` only sees leaves.
* Arrays are see-through: a field matches when any element matches. Fields that
  sit in objects inside the same array must match in the *same* element (AWS's
  "array consistency"), so ``{"a": {"x": [1], "y": [2]}}`` does not match
  ``{"a": [{"x": 1}, {"y": 2}]}``.
* A field missing from the event matches nothing, except ``{"exists": false}``,
  which holds when the event has no leaf value at that path at all.
"""

from __future__ import annotations

import ipaddress
import json
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Final, TypeAlias, TypeGuard

from sluiceway.errors import PatternError

__all__ = ["Pattern", "compile_pattern"]

KeyPath: TypeAlias = tuple[str | int, ...]
"""Keys and indexes leading to a part of a pattern, for errors."""
Test: TypeAlias = Callable[[object], bool]
"""A precompiled check of one event leaf value."""
Location: TypeAlias = tuple[object, ...]
"""A place in an event as nested ``(parent, key)`` pairs: built in O(1) per step, hashable."""
Where: TypeAlias = tuple[tuple[Location, int], ...]
"""The array elements an event value sits in, outermost first: (array's location, index)."""
Bound: TypeAlias = dict[Location, int]
"""Array elements already chosen while matching, so later fields stay in the same element."""
Tag: TypeAlias = tuple[str, object]

_WILDCARD_LIMIT: Final = 10
_WILDCARD_SEARCH_LIMIT: Final = 20_000


# ---------------------------------------------------------------------------
# The compiled form
# ---------------------------------------------------------------------------


class Pattern:
    """A validated event pattern; build one with ``compile_pattern``.

    ``source`` keeps the pattern as written, for messages and for writing it back out.
    """

    __slots__ = ("_root", "source")

    def __init__(self, source: object, root: _All) -> None:
        self.source = source
        self._root = root

    def matches(self, event: Mapping[str, object]) -> bool:
        """Whether the event matches, as EventBridge would decide it.

        A cheap pass that ignores array consistency decides most events; only
        when it matched using values inside arrays is an array-consistent match
        searched for.
        """
        seen = _Event(event)
        root = self._root
        if not root.possible(seen):
            return False
        return not seen.in_arrays or next(root.solve(seen, {}), None) is not None

    def may_match_with(self, path: str, value: str | float | bool | None) -> bool:
        """False only if no event whose one value at ``path`` is ``value`` can match.

        For events whose shape is known in part, e.g. the watcher's "Object
        Created" events, whose ``detail.bucket.name`` is a single string
        outside any array: a field at ``path`` is decided by testing the
        value; every other field counts as "may match", so the answer is never
        a wrong "no". ``$or`` needs only one alternative that may match.
        """
        return self._root.may_match_with(path, value)

    def __repr__(self) -> str:
        return f"Pattern({self.source!r})"


@dataclass(frozen=True, slots=True)
class _Field:
    """One pattern array: the values it accepts at one flattened event path."""

    path: str
    exact: frozenset[Tag]
    tests: tuple[Test, ...]
    any_value: bool  # the array holds {"exists": true}
    absent_ok: bool  # the array holds {"exists": false}

    def accepts(self, value: object) -> bool:
        return (
            self.any_value or _tag(value) in self.exact or any(test(value) for test in self.tests)
        )

    def possible(self, event: _Event) -> bool:
        return bool(event.accepted(self)) or (self.absent_ok and not event.values(self.path))

    def may_match_with(self, path: str, value: object) -> bool:
        # The value is there, so {"exists": false} alone cannot accept it.
        return path != self.path or self.accepts(value)

    def solve(self, event: _Event, bound: Bound) -> Iterator[Bound]:
        if self.absent_ok and not event.values(self.path):
            yield bound
        for where in event.accepted(self):
            merged = _merge(bound, where)
            if merged is not None:
                yield merged


@dataclass(frozen=True, slots=True)
class _All:
    """Fields of one pattern object: every part must match (with consistent array elements)."""

    parts: tuple[_Node, ...]

    def possible(self, event: _Event) -> bool:
        return all(part.possible(event) for part in self.parts)

    def may_match_with(self, path: str, value: object) -> bool:
        return all(part.may_match_with(path, value) for part in self.parts)

    def solve(self, event: _Event, bound: Bound, start: int = 0) -> Iterator[Bound]:
        if start == len(self.parts):
            yield bound
            return
        for partial in self.parts[start].solve(event, bound):
            yield from self.solve(event, partial, start + 1)


@dataclass(frozen=True, slots=True)
class _Any:
    """A ``$or``: any one alternative must match."""

    parts: tuple[_All, ...]

    def possible(self, event: _Event) -> bool:
        return any(part.possible(event) for part in self.parts)

    def may_match_with(self, path: str, value: object) -> bool:
        return any(part.may_match_with(path, value) for part in self.parts)

    def solve(self, event: _Event, bound: Bound) -> Iterator[Bound]:
        for part in self.parts:
            yield from part.solve(event, bound)


_Node: TypeAlias = "_Field | _All | _Any"


def _merge(bound: Bound, where: Where) -> Bound | None:
    """``bound`` plus the array elements a value sits in; None if that breaks consistency."""
    if not where:
        return bound
    merged = dict(bound)
    for array, index in where:
        if merged.setdefault(array, index) != index:
            return None
    return merged


class _Event:
    """One event being matched, with its lookups cached.

    ``$or`` branches often share paths, and the search for an array-consistent
    match revisits fields; caching which values a field accepts keeps that
    search to comparing array positions instead of re-testing values.
    """

    __slots__ = ("_accepted", "_root", "_values", "in_arrays")

    def __init__(self, root: Mapping[str, object]) -> None:
        self._root = root
        self.in_arrays = False  # some value looked up so far sits inside an array
        self._values: dict[str, list[tuple[object, Where]]] = {}
        self._accepted: dict[int, list[Where]] = {}

    def values(self, path: str) -> list[tuple[object, Where]]:
        """The leaf values at a dotted path, each with the array elements it sits in."""
        found = self._values.get(path)
        if found is None:
            found = []
            _collect(self._root, path, (), (), found)
            self._values[path] = found
            self.in_arrays = self.in_arrays or any(where for _, where in found)
        return found

    def accepted(self, field: _Field) -> list[Where]:
        """Where the values that ``field`` accepts sit (keyed by identity: fields outlive this)."""
        found = self._accepted.get(id(field))
        if found is None:
            values = self.values(field.path)
            if len(values) == 1:  # the usual case: skip building a de-duplicated list
                found = [values[0][1]] if field.accepts(values[0][0]) else []
            else:
                found = list(
                    dict.fromkeys(where for value, where in values if field.accepts(value))
                )
            self._accepted[id(field)] = found
        return found


def _collect(
    node: object, rest: str | None, at: Location, where: Where, out: list[tuple[object, Where]]
) -> None:
    """Append the leaf values found at dotted path ``rest`` below ``node``.

    A dotted path can be split into keys in several ways (``a.b.c`` may be
    ``a`` → ``b.c`` or ``a.b`` → ``c``); EventBridge joins keys with "." before
    comparing, so every split that exists in the event counts.
    """
    if isinstance(node, list | tuple):
        for index, item in enumerate(node):
            element = (at, index)
            _collect(item, rest, element, (*where, element), out)
    elif _is_object(node):
        if rest is None:  # objects are not values
            return
        dot = -1
        while True:
            dot = rest.find(".", dot + 1)
            key = rest if dot < 0 else rest[:dot]
            if key in node:
                child = node[key]
                if dot < 0 and (child is None or isinstance(child, str | int | float)):
                    out.append((child, where))  # a leaf ends the path: the usual case, inline
                else:
                    _collect(child, None if dot < 0 else rest[dot + 1 :], (at, key), where, out)
            if dot < 0:
                return
    elif rest is None:
        out.append((node, where))


def _is_object(value: object) -> TypeGuard[Mapping[str, object]]:
    """Whether an event value is a JSON object; dict first, as the Mapping ABC check is slow."""
    return isinstance(value, dict) or (
        not isinstance(value, str | int | float) and isinstance(value, Mapping)
    )


def _tag(value: object) -> Tag | None:
    """Type-tag a JSON scalar so "1", 1 and true never compare equal, while 300 and 300.0 do."""
    if value is None:
        return ("null", None)
    if isinstance(value, bool):
        return ("boolean", value)
    if isinstance(value, str):
        return ("string", value)
    if isinstance(value, int | float):
        return ("number", value)
    return None


# ---------------------------------------------------------------------------
# Compiling and validating
# ---------------------------------------------------------------------------


def compile_pattern(pattern: object) -> Pattern:
    """Validate an EventBridge event pattern and precompile it for fast matching.

    Raises ``PatternError`` for anything EventBridge would reject; its ``path``
    leads to the offending part, e.g. ``("detail", "object", "key", 0, "suffix")``.
    """
    if not isinstance(pattern, Mapping):
        raise PatternError(f"an event pattern must be a JSON object, got {_describe(pattern)}")
    return Pattern(pattern, _compile_object(pattern, None, ()))


def _compile_object(obj: Mapping[object, object], prefix: str | None, at: KeyPath) -> _All:
    if not obj:
        raise PatternError("empty object: name at least one field to match", at)
    parts: list[_Node] = []
    for key, value in obj.items():
        here = (*at, key) if isinstance(key, str | int) else at
        if not isinstance(key, str):
            raise PatternError(f"field names must be strings, got {_describe(key)}", here)
        if key == "$or":
            parts.append(_compile_or(value, prefix, here))
            continue
        path = key if prefix is None else f"{prefix}.{key}"
        if isinstance(value, Mapping):
            parts.extend(_compile_object(value, path, here).parts)
        elif _is_array(value):
            parts.append(_compile_field(value, path, here))
        else:
            raise PatternError(
                f"expected an array of values to match (like [{_show(value)}]) or an object, "
                f"got {_describe(value)}",
                here,
            )
    return _All(tuple(parts))


def _compile_or(value: object, prefix: str | None, at: KeyPath) -> _Any:
    if not _is_array(value) or len(value) < 2:
        raise PatternError(
            f'"$or" takes an array of at least two pattern objects, got {_describe(value)}', at
        )
    alternatives = []
    for index, alternative in enumerate(value):
        here = (*at, index)
        if not isinstance(alternative, Mapping):
            raise PatternError(
                f'each "$or" alternative must be an object, got {_describe(alternative)}', here
            )
        alternatives.append(_compile_object(alternative, prefix, here))
    return _Any(tuple(alternatives))


def _compile_field(values: Sequence[object], path: str, at: KeyPath) -> _Field:
    if not values:
        raise PatternError("empty array matches nothing: list at least one value", at)
    exact: set[Tag] = set()
    tests: list[Test] = []
    wildcards: list[list[str | None]] = []
    any_value = absent_ok = False
    for index, item in enumerate(values):
        here = (*at, index)
        if _is_array(item):
            raise PatternError("arrays cannot be nested: put the values in the outer array", here)
        if not isinstance(item, Mapping):
            exact.add(_exact(item, here))
            continue
        name, operand = _single_operator(item, here)
        here = (*here, name)
        if name == "exists":
            if not isinstance(operand, bool):
                raise PatternError(f'"exists" takes true or false, got {_describe(operand)}', here)
            any_value, absent_ok = any_value or operand, absent_ok or not operand
            continue
        compiler = _OPERATORS.get(name)
        if compiler is None:
            raise _unknown_operator(name, here)
        tests.append(compiler(operand, here))
        added = _wildcard_operands(name, operand)
        if added:
            wildcards.extend(_wildcard_tokens(text, here) for text in added)
            if _wildcard_width(wildcards) > _WILDCARD_LIMIT:
                raise PatternError(
                    "wildcard rule is too complex (EventBridge rejects it too): use fewer '*' "
                    "or fewer repeating character sequences after a '*'",
                    here,
                )
    return _Field(path, frozenset(exact), tuple(tests), any_value, absent_ok)


def _single_operator(item: Mapping[object, object], at: KeyPath) -> tuple[str, object]:
    if len(item) != 1:
        raise PatternError(
            'a matcher object holds exactly one operator, like {"prefix": "abc"}; '
            "put alternatives in separate array entries",
            at,
        )
    ((name, operand),) = item.items()
    if not isinstance(name, str):
        raise PatternError(f"operator names must be strings, got {_describe(name)}", at)
    return name, operand


def _unknown_operator(name: str, at: KeyPath) -> PatternError:
    known = {*_OPERATORS, "exists"}
    if name.lower() in known:
        hint = f'operators are lower-case: did you mean "{name.lower()}"?'
    else:
        hint = f"known operators: {', '.join(sorted(known))}"
    return PatternError(f'unknown operator "{name}"; {hint}', at)


def _exact(value: object, at: KeyPath) -> Tag:
    if isinstance(value, int | float) and not isinstance(value, bool):
        _number(value, at)
    tag = _tag(value)
    if tag is None:
        raise PatternError(
            f"expected a string, number, boolean, null or operator object, got {_describe(value)}",
            at,
        )
    return tag


# --- operators -------------------------------------------------------------


def _prefix(operand: object, at: KeyPath) -> Test:
    text, ignore_case = _affix(operand, at, "prefix")
    if ignore_case:
        return lambda value: isinstance(value, str) and value.casefold().startswith(text)
    return lambda value: isinstance(value, str) and value.startswith(text)


def _suffix(operand: object, at: KeyPath) -> Test:
    text, ignore_case = _affix(operand, at, "suffix")
    if ignore_case:
        return lambda value: isinstance(value, str) and value.casefold().endswith(text)
    return lambda value: isinstance(value, str) and value.endswith(text)


def _affix(operand: object, at: KeyPath, name: str) -> tuple[str, bool]:
    """A prefix/suffix operand: a string, or ``{"equals-ignore-case": string}`` (casefolded)."""
    if isinstance(operand, str):
        return operand, False
    if isinstance(operand, Mapping) and list(operand) == ["equals-ignore-case"]:
        text = _string(operand["equals-ignore-case"], (*at, "equals-ignore-case"), name)
        return text.casefold(), True
    raise PatternError(
        f'"{name}" takes a string or {{"equals-ignore-case": string}}, got {_describe(operand)}',
        at,
    )


def _equals_ignore_case(operand: object, at: KeyPath) -> Test:
    text = _string(operand, at, "equals-ignore-case").casefold()
    return lambda value: isinstance(value, str) and value.casefold() == text


def _wildcard(operand: object, at: KeyPath) -> Test:
    return _glob(_wildcard_tokens(_string(operand, at, "wildcard"), at))


def _numeric(operand: object, at: KeyPath) -> Test:
    usage = '[operator, number] or [">"|">=", low, "<"|"<=", high], like [">", 0, "<=", 5]'
    if not _is_array(operand) or len(operand) not in (2, 4):
        raise PatternError(f'"numeric" takes {usage}, got {_describe(operand)}', at)
    for index in range(0, len(operand), 2):
        if operand[index] not in ("<", "<=", "=", ">", ">="):
            raise PatternError(
                f'expected one of "<", "<=", "=", ">", ">=", got {_describe(operand[index])}',
                (*at, index),
            )
    first, x = operand[0], _number(operand[1], (*at, 1))
    if len(operand) == 2:
        if first == "=":
            return _between(x, True, x, True)
        if first in (">", ">="):
            return _between(x, first == ">=", None, False)
        return _between(None, False, x, first == "<=")
    second, y = operand[2], _number(operand[3], (*at, 3))
    if first not in (">", ">="):
        raise PatternError(f'a range starts with its lower bound (">" or ">="): {usage}', (*at, 0))
    if second not in ("<", "<="):
        raise PatternError(f'a range ends with its upper bound ("<" or "<="): {usage}', (*at, 2))
    if not x < y:
        raise PatternError(f"the lower bound {x} must be less than the upper bound {y}", at)
    return _between(x, first == ">=", y, second == "<=")


def _between(low: float | None, low_in: bool, high: float | None, high_in: bool) -> Test:
    """A numeric range test; only JSON numbers match (not numeric strings, not booleans)."""

    def test(value: object) -> bool:
        if not isinstance(value, int | float) or isinstance(value, bool) or math.isnan(value):
            return False
        if low is not None and (value < low or (value == low and not low_in)):
            return False
        return high is None or value < high or (value == high and high_in)

    return test


def _cidr(operand: object, at: KeyPath) -> Test:
    text = _string(operand, at, "cidr")
    try:
        network = ipaddress.ip_network(text, strict=False)
    except ValueError as error:
        raise PatternError(
            f'"cidr" takes an IPv4 or IPv6 network like "10.0.0.0/24": {error}', at
        ) from None

    def test(value: object) -> bool:
        if not isinstance(value, str):
            return False
        try:
            return ipaddress.ip_address(value) in network
        except ValueError:  # not an IP address: simply no match, as in EventBridge
            return False

    return test


def _anything_but(operand: object, at: KeyPath) -> Test:
    """Matches any present value except those listed (so never a missing field).

    A value of another type than the excluded ones always matches: null, a
    number, or a boolean is "anything but" a string prefix.
    """
    if isinstance(operand, Mapping):
        return _anything_but_matching(operand, at)
    values = list(operand) if _is_array(operand) else [operand]
    if not values:
        raise PatternError('"anything-but" needs at least one value to exclude', at)
    kinds = set()
    for index, value in enumerate(values):
        here = (*at, index) if _is_array(operand) else at
        if isinstance(value, str):
            kinds.add("string")
        elif isinstance(value, int | float) and not isinstance(value, bool):
            kinds.add("number")
            _number(value, here)
        else:
            raise PatternError(
                f'"anything-but" excludes strings or numbers, not {_describe(value)}', here
            )
    if len(kinds) > 1:
        raise PatternError('"anything-but" lists hold only strings or only numbers', at)
    excluded = frozenset(_tag(value) for value in values)
    return lambda value: _tag(value) not in excluded


def _anything_but_matching(operand: Mapping[object, object], at: KeyPath) -> Test:
    """``anything-but`` with prefix, suffix, wildcard or equals-ignore-case: excludes strings."""
    name, inner = _single_operator(operand, at)
    here = (*at, name)
    compiler = _NEGATABLE.get(name)
    if compiler is None:
        raise PatternError(
            f'"anything-but" objects take one of {", ".join(_NEGATABLE)}, got "{name}"', here
        )
    texts = [inner] if isinstance(inner, str) else inner
    if not _is_array(texts) or not texts:
        raise PatternError(
            f'"{name}" inside "anything-but" takes a string or an array of strings, '
            f"got {_describe(inner)}",
            here,
        )
    tests = []
    for index, text in enumerate(texts):
        spot = here if isinstance(inner, str) else (*here, index)
        if not isinstance(text, str):
            raise PatternError(f'"{name}" takes strings, got {_describe(text)}', spot)
        if not text and name in ("prefix", "suffix"):
            raise PatternError(f'an empty "{name}" would exclude every string', spot)
        tests.append(compiler(text, spot))
    return lambda value: not (isinstance(value, str) and any(test(value) for test in tests))


_OPERATORS: Final[dict[str, Callable[[object, KeyPath], Test]]] = {
    "anything-but": _anything_but,
    "cidr": _cidr,
    "equals-ignore-case": _equals_ignore_case,
    "numeric": _numeric,
    "prefix": _prefix,
    "suffix": _suffix,
    "wildcard": _wildcard,
}
_NEGATABLE: Final[dict[str, Callable[[object, KeyPath], Test]]] = {
    "prefix": _prefix,
    "suffix": _suffix,
    "wildcard": _wildcard,
    "equals-ignore-case": _equals_ignore_case,
}


# --- wildcards -------------------------------------------------------------


def _wildcard_tokens(text: str, at: KeyPath) -> list[str | None]:
    """Split a wildcard into characters and ``None`` for each unescaped ``*``.

    Only ``\\*`` (a literal star) and ``\\\\`` (a backslash) are escapes, and
    ``**`` is rejected, as in EventBridge.
    """
    tokens: list[str | None] = []
    chars = iter(text)
    for char in chars:
        if char == "\\":
            escaped = next(chars, None)
            if escaped not in ("*", "\\"):
                raise PatternError(
                    'in a wildcard "\\" may only escape "*" or another "\\" '
                    '(write "\\\\" for a literal backslash)',
                    at,
                )
            tokens.append(escaped)
        elif char == "*":
            if tokens and tokens[-1] is None:
                raise PatternError('consecutive "*" are not allowed in a wildcard', at)
            tokens.append(None)
        else:
            tokens.append(char)
    return tokens


def _glob(tokens: Sequence[str | None]) -> Test:
    """Compile wildcard tokens into a linear-time test (no regex, so no catastrophic backtracking).

    With only ``*`` as a metacharacter, taking each literal segment at its
    leftmost possible place is always right, so ``str.find`` does the work.
    """
    segments = [""]
    for token in tokens:
        if token is None:
            segments.append("")
        else:
            segments[-1] += token
    if len(segments) == 1:
        whole = segments[0]
        return lambda value: isinstance(value, str) and value == whole
    head, *middle, tail = segments
    least = sum(map(len, segments))

    def test(value: object) -> bool:
        if not isinstance(value, str) or len(value) < least:
            return False
        if not (value.startswith(head) and value.endswith(tail)):
            return False
        start, end = len(head), len(value) - len(tail)
        for part in middle:
            found = value.find(part, start, end)
            if found < 0:
                return False
            start = found + len(part)
        return True

    return test


def _wildcard_operands(name: str, operand: object) -> list[str]:
    """The wildcard strings an (already validated) operator uses, for the complexity check."""
    if name == "anything-but" and isinstance(operand, Mapping):
        ((name, operand),) = operand.items()
    if name != "wildcard":
        return []
    return [operand] if isinstance(operand, str) else list(operand)  # type: ignore[arg-type]


def _wildcard_width(patterns: Sequence[Sequence[str | None]]) -> int:
    """The most partial matches one field's wildcards may need to track at once, on any input.

    EventBridge rejects wildcard rules whose matching this "complexity" makes
    slow (``*:*:*:*:*:event-bus/*`` is refused, ``arn:*:event-bus/*`` is not).
    We measure it by running every pattern as an automaton over all inputs that
    matter (the characters the patterns mention, plus one standing for all
    others) and counting the distinct states alive together. States before a
    pattern's first ``*`` are deterministic and shared by patterns with the same
    beginning, as in a trie, so they count once per distinct prefix.
    """
    if not any(None in tokens for tokens in patterns):
        return 1
    firsts = [tokens.index(None) if None in tokens else len(tokens) for tokens in patterns]

    def identity(state: tuple[int, int]) -> object:
        k, i = state
        if i < firsts[k] or None not in patterns[k]:
            return ("prefix", "".join(patterns[k][:i]))  # type: ignore[arg-type]
        if i == firsts[k]:
            return ("star", "".join(patterns[k][:i]))  # type: ignore[arg-type]
        return state

    def close(states: set[tuple[int, int]]) -> frozenset[tuple[int, int]]:
        todo = list(states)
        while todo:
            k, i = todo.pop()
            if i < len(patterns[k]) and patterns[k][i] is None and (k, i + 1) not in states:
                states.add((k, i + 1))
                todo.append((k, i + 1))
        return frozenset(states)

    start = close({(k, 0) for k in range(len(patterns))})
    seen, todo, widest = {start}, [start], 0
    while todo:
        states = todo.pop()
        widest = max(widest, len({identity(state) for state in states}))
        if widest > _WILDCARD_LIMIT or len(seen) > _WILDCARD_SEARCH_LIMIT:
            return _WILDCARD_LIMIT + 1
        pending = [patterns[k][i] for k, i in states if i < len(patterns[k])]
        for char in {*(c for c in pending if c is not None), ""}:  # "" stands for any other char
            after: set[tuple[int, int]] = set()
            for k, i in states:
                token = patterns[k][i] if i < len(patterns[k]) else ""
                if token is None:
                    after.add((k, i))
                elif token and token == char:
                    after.add((k, i + 1))
            reached = close(after)
            if reached and reached not in seen:
                seen.add(reached)
                todo.append(reached)
    return widest


# --- small helpers ---------------------------------------------------------


def _is_array(value: object) -> bool:
    return isinstance(value, list | tuple)


def _string(value: object, at: KeyPath, name: str) -> str:
    if not isinstance(value, str):
        raise PatternError(f'"{name}" takes a string, got {_describe(value)}', at)
    return value


def _number(value: object, at: KeyPath) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise PatternError(f"expected a number, got {_describe(value)}", at)
    if not math.isfinite(value):
        raise PatternError(f"numbers must be finite, got {value}", at)
    return value


def _show(value: object) -> str:
    """A pattern fragment as JSON, shortened: messages should read like the file."""
    text = json.dumps(value, ensure_ascii=False, default=repr)
    return text if len(text) <= 40 else text[:37] + "..."


def _describe(value: object) -> str:
    if value is None:
        return "null"
    kind = (
        "boolean"
        if isinstance(value, bool)
        else "string"
        if isinstance(value, str)
        else "number"
        if isinstance(value, int | float)
        else "array"
        if _is_array(value)
        else "object"
        if isinstance(value, Mapping)
        else type(value).__name__
    )
    return f"{kind} {_show(value)}"
