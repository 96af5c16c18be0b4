"""``validate``: check every row against a schema file; quarantine or fail on bad ones.

.. code-block:: yaml

    steps:
      - read_csv
      - validate: {schema: schemas/customer.yaml, on_invalid: quarantine}
      - write_parquet: {bucket: staging}

The schema (``sluiceway/schema.py``) types the columns, so ``read_csv`` must
not: when it is called, this step asks the source (through the StepContext)
for every column as text, each row's physical line in a hidden column, and
for rows with the wrong number of fields to be handed over instead of failing
the file. Good rows go on typed and renamed; bad ones go to
``<bucket>/_rejected/<input key>.jsonl`` (see ``quarantine.py``) with their
line, the first failing column, its value and the reason, every failure, and
the row as written. With ``on_invalid: fail`` the first bad row of either kind
(by line) fails the message instead, naming file, line, field and value.

Rules run as Arrow compute kernels over whole batches; Python touches rows one
by one only to write the records of rejected rows. ``rows_rejected`` counts
what was quarantined, so ``rows_in = rows_out + rows_rejected`` for each file.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import pyarrow as pa
import pyarrow.compute as pc
from pydantic import Field

from ..config import DestinationConfig
from ..errors import ConfigError, InputError
from ..queues.base import OutgoingMessage
from ..schema import Column, Parsed, Schema, arange, load_schema, mask_of
from .base import (
    Batches,
    StepContext,
    StepFn,
    StepOptions,
    StepSpecError,
    StepType,
    parse_step,
    register,
)
from .quarantine import RejectFile

if TYPE_CHECKING:
    from ..config import PipelineConfig

#: The hidden column the source puts each row's physical line in; never output.
LINE_COLUMN = "__sluiceway_line__"

Reason = Callable[[Any, int], str]  # (value as written, row position) -> why it is bad


class ValidateOptions(StepOptions):
    schema_file: str = Field(alias="schema", min_length=1)
    on_invalid: Literal["quarantine", "fail"] = "quarantine"
    rejects: str | None = None  # bucket for the reject file; default: the sink's bucket
    # Also send each reject as a JSON message (to tell a partner, or a person).
    errors: DestinationConfig | None = None


@dataclass(frozen=True)
class _Plan:
    schema: Schema
    on_invalid: str
    rejects: str | None  # None with on_invalid: fail
    errors: DestinationConfig | None = None


@register
class Validate(StepType):
    name = "validate"
    Options = ValidateOptions

    def check(self, raw: Any, cfg: PipelineConfig) -> None:
        self._plan(raw, cfg)

    def build(self, raw: Any, cfg: PipelineConfig) -> StepFn:
        return _step(self._plan(raw, cfg))

    def _plan(self, raw: Any, cfg: PipelineConfig) -> _Plan:
        opts = self.options(raw)
        assert isinstance(opts, ValidateOptions)
        try:
            schema = load_schema(cfg.resolve_path(opts.schema_file), shown=opts.schema_file)
        except ConfigError as e:
            raise StepSpecError("\n  ".join(e.problems), (self.name, "schema")) from None
        around = _function_steps(raw, cfg)
        if around is not None:
            steps, index = around
            if index == 0:
                raise StepSpecError(
                    "validate needs a step before it that reads the input (e.g. read_csv)",
                    (self.name,),
                )
            for name, options in steps[:index]:
                if name == "read_csv" and isinstance(options, dict) and options.get("columns"):
                    raise StepSpecError(
                        "read_csv before validate must not type columns ('columns'): the "
                        "schema types them, so that bad values are quarantined, not fatal",
                        (self.name,),
                    )
        if opts.rejects is not None and opts.rejects not in cfg.buckets:
            raise StepSpecError(f"unknown bucket {opts.rejects!r}", (self.name, "rejects"))
        rejects = None
        if opts.on_invalid == "quarantine":
            rejects = opts.rejects or _sink_bucket(around)
            if rejects is None:
                raise StepSpecError(
                    "rejected rows go beside the output, but no later step writes to a "
                    "bucket; give 'rejects: BUCKET'",
                    (self.name,),
                )
        if opts.errors is not None:
            dest = opts.errors
            if (dest.queue is None) == (dest.topic is None):
                raise StepSpecError("give exactly one of 'queue' or 'topic'", (self.name, "errors"))
            if dest.queue is not None and dest.queue not in cfg.queues:
                raise StepSpecError(f"unknown queue {dest.queue!r}", (self.name, "errors", "queue"))
            if dest.topic is not None and dest.topic not in cfg.topics:
                raise StepSpecError(f"unknown topic {dest.topic!r}", (self.name, "errors", "topic"))
        return _Plan(schema, opts.on_invalid, rejects, opts.errors)


def _function_steps(raw: Any, cfg: PipelineConfig) -> tuple[list[tuple[str, Any]], int] | None:
    """The steps of the function this step belongs to, and its position among them.

    Steps are checked and built from the very option objects the loaded
    pipeline holds, so the function is found by identity. None if not found
    (then nothing about neighbours is assumed).
    """
    if not isinstance(raw, dict):
        return None
    for fn in cfg.functions.values():
        steps: list[tuple[str, Any]] = []
        for spec in fn.steps:
            try:
                steps.append(parse_step(spec))
            except StepSpecError:
                steps.append(("", None))
        for i, (_, options) in enumerate(steps):
            if options is raw:
                return steps, i
    return None


def _sink_bucket(around: tuple[list[tuple[str, Any]], int] | None) -> str | None:
    """The bucket of the last step after this one that writes to a bucket."""
    if around is None:
        return None
    steps, index = around
    for _, options in reversed(steps[index + 1 :]):
        if isinstance(options, dict) and isinstance(options.get("bucket"), str):
            return options["bucket"]
    return None


# --------------------------------------------------------------------------- running


def _step(plan: _Plan) -> StepFn:
    def validate(ctx: StepContext, batches: Batches | None) -> Batches:
        if batches is None:
            raise StepSpecError("validate needs a step before it that reads the input")
        # Asked now, before the sink pulls the first batch (see StepContext).
        # Malformed rows are taken over in both modes, so that with
        # on_invalid: fail the first bad row of any kind is the one reported.
        ctx.read_as_text = True
        ctx.line_column = LINE_COLUMN
        ctx.malformed_rows = []
        return _validated(ctx, batches, plan)

    return validate


def _validated(ctx: StepContext, batches: Batches, plan: _Plan) -> Iterator[pa.RecordBatch]:
    checker = _Checker(plan.schema, ctx.input_name)
    fail = plan.rejects is None
    yielded = False
    with contextlib.ExitStack() as stack:
        rejects = None if fail else stack.enter_context(RejectFile(ctx, plan.rejects))
        for batch in batches:
            good, rejected = checker.check(batch, first_only=fail)
            # The source hands over a block's malformed rows with its batch,
            # so sorting the two together keeps the file's line order.
            bad = _in_line_order(_malformed(ctx) + rejected)
            if bad and rejects is None:
                raise _as_error(bad[0], ctx.input_name)
            if rejects is not None:
                rejects.write(bad)
                _announce(ctx, plan, bad)
            if good.num_rows:
                yielded = True
                yield good
        rest = _malformed(ctx)  # rows the source could not place on a line
        if rest and rejects is None:
            raise _as_error(rest[0], ctx.input_name)
        if rejects is not None:
            rejects.write(rest)
            _announce(ctx, plan, rest)
    if not yielded:
        # Every row rejected: an empty output with the schema's columns still
        # says the input was processed (and keeps sinks from failing on it).
        yield checker.empty()


def _announce(ctx: StepContext, plan: _Plan, records: list[dict[str, Any]]) -> None:
    """Rejects as error messages, ids from the input and line: never sent twice."""
    if plan.errors is None or not records or ctx.publish is None:
        return
    identity = ctx.event.input_identity
    messages = [
        OutgoingMessage(
            json.dumps({"input": ctx.input_name, **r}, default=str, ensure_ascii=False),
            {"input": ctx.input_name, "kind": "reject"},
            f"{identity}#reject-{r.get('line') if r.get('line') is not None else i}",
        )
        for i, r in enumerate(records)
    ]
    sent = ctx.publish(messages, queue=plan.errors.queue, topic=plan.errors.topic)
    ctx.count("error_messages", sent)


def _malformed(ctx: StepContext) -> list[dict[str, Any]]:
    """Rows the source handed over (wrong number of fields), as reject records."""
    rows = ctx.malformed_rows or []
    records = [
        {
            "line": r["line"],
            "column": None,
            "value": r["text"],
            "reason": r["reason"],
            "errors": [{"column": None, "value": r["text"], "reason": r["reason"]}],
            "row": None,
        }
        for r in rows
    ]
    rows.clear()
    return records


def _in_line_order(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return sorted(records, key=lambda r: (r["line"] is None, r["line"] or 0))


def _as_error(record: dict[str, Any], file: str) -> InputError:
    if record["column"] is None:  # a malformed row: the value is the row's text
        message = f"{record['reason']} in row {record['value']!r}"
    else:
        message = f"invalid value {record['value']!r}: {record['reason']}"
    return InputError(
        message,
        file=file,
        line=record["line"],
        field=record["column"],
    )


@dataclass
class _Failure:
    column: Column
    mask: pa.Array
    reason: Reason


@dataclass
class _Checker:
    """The rules of one schema over the batches of one input file.

    Holds the per-file state: the values already seen in ``unique`` columns
    (with the line each first appeared on), so memory grows with the distinct
    keys of one file and is dropped with it.
    """

    schema: Schema
    input_name: str
    seen: dict[str, dict[Any, int | None]] = field(default_factory=dict)
    _checked: pa.Schema | None = None
    _extras: list[str] = field(default_factory=list)
    _output: pa.Schema | None = None

    def check(
        self, batch: pa.RecordBatch, *, first_only: bool = False
    ) -> tuple[pa.RecordBatch, list[dict[str, Any]]]:
        """The batch's good rows (typed, renamed) and reject records for the bad ones."""
        if LINE_COLUMN in batch.schema.names:
            lines = batch.column(LINE_COLUMN)
            data = batch.drop_columns([LINE_COLUMN])
        else:  # a source that cannot number lines
            lines, data = pa.nulls(batch.num_rows, pa.int64()), batch
        self._check_columns(data.schema)
        n = data.num_rows
        parsed: dict[str, Parsed] = {}
        failures: list[_Failure] = []
        bad = pc.is_valid(pa.nulls(n, pa.bool_()))  # all false
        for column in self.schema.columns:
            p = parsed[column.name] = column.parse(data.column(column.name))
            for mask, reason in _rules(column, p):
                mask = pc.fill_null(mask, False)
                if pc.any(mask).as_py():
                    failures.append(_Failure(column, mask, reason))
                    bad = pc.or_(bad, mask)
        # Uniqueness last, among rows that passed everything else: a rejected
        # row does not take a key, and the first good occurrence keeps it.
        for column in self.schema.columns:
            if column.unique:
                failure = self._duplicates(column, parsed[column.name].values, bad, lines)
                if failure is not None:
                    failures.append(failure)
                    bad = pc.or_(bad, failure.mask)
        rejected = self._records(data, lines, bad, failures, first_only) if failures else []
        good = pc.invert(bad)
        arrays = [parsed[c.name].values.filter(good) for c in self.schema.columns]
        arrays += [data.column(name).filter(good) for name in self._extras]
        assert self._output is not None
        return pa.RecordBatch.from_arrays(arrays, schema=self._output), rejected

    def empty(self) -> pa.RecordBatch:
        schema = self._output or pa.schema(
            [pa.field(c.output, c.arrow) for c in self.schema.columns]
        )
        return pa.RecordBatch.from_pylist([], schema=schema)

    def _check_columns(self, schema: pa.Schema) -> None:
        """Missing declared columns fail the file; others are kept, dropped or fatal."""
        if self._checked is not None and schema.equals(self._checked):
            return
        names = schema.names
        missing = [c.name for c in self.schema.columns if c.name not in names]
        if missing:
            raise InputError(
                f"missing column{'s' if len(missing) > 1 else ''} "
                f"{', '.join(repr(m) for m in missing)} (declared in {self.schema.path}); "
                f"the file has {', '.join(repr(n) for n in names)}",
                file=self.input_name,
                field=missing[0],
            )
        declared = {c.name for c in self.schema.columns}
        extras = [n for n in names if n not in declared]
        if extras and self.schema.extra_columns == "reject":
            raise InputError(
                f"unexpected column{'s' if len(extras) > 1 else ''} "
                f"{', '.join(repr(e) for e in extras)} ({self.schema.path} has "
                "extra_columns: reject)",
                file=self.input_name,
                field=extras[0],
            )
        self._extras = extras if self.schema.extra_columns == "keep" else []
        outputs = {c.output: c.name for c in self.schema.columns}
        for name in self._extras:
            if name in outputs:
                raise InputError(
                    f"column {name!r} of the file clashes with column {outputs[name]!r} "
                    f"renamed to {name!r} in {self.schema.path}",
                    file=self.input_name,
                    field=name,
                )
        self._output = pa.schema(
            [pa.field(c.output, c.arrow) for c in self.schema.columns]
            + [schema.field(name) for name in self._extras]
        )
        self._checked = schema

    def _duplicates(
        self, column: Column, values: pa.Array, bad: pa.Array, lines: pa.Array
    ) -> _Failure | None:
        """Rows whose value in ``column`` came before, in this batch or an earlier one."""
        where = pc.indices_nonzero(pc.and_(pc.invert(bad), pc.is_valid(values)))
        if not len(where):
            return None
        candidates = values.take(where)
        n = len(candidates)
        distinct = pc.unique(candidates)
        if len(distinct) == n:  # the usual case: no repeats within the batch
            firsts = arange(n)
            first_values = candidates.to_pylist()
        else:
            groups = pc.index_in(candidates, value_set=distinct)
            firsts = (
                pa.table({"g": groups, "i": arange(n)})
                .group_by("g")
                .aggregate([("i", "min")])
                .column("i_min")
                .combine_chunks()
            )
            first_values = candidates.take(firsts).to_pylist()
        first_lines = lines.take(where).take(firsts).to_pylist()
        seen = self.seen.setdefault(column.name, {})
        new = dict(zip(first_values, first_lines, strict=True))
        # dict operations run in C: no Python loop over the rows of a batch.
        earlier = set() if seen.keys().isdisjoint(new) else seen.keys() & new.keys()
        for value in earlier:
            del new[value]
        seen.update(new)
        dup = pc.invert(mask_of(firsts, n)) if len(distinct) != n else None
        if earlier:
            again = pc.is_in(candidates, value_set=pa.array(list(earlier), candidates.type))
            dup = again if dup is None else pc.or_(dup, again)
        if dup is None or not pc.any(dup).as_py():
            return None

        def reason(_: Any, position: int) -> str:
            line = seen.get(values[position].as_py())
            return f"duplicate of line {line}" if line is not None else "duplicate value"

        return _Failure(column, mask_of(where.filter(dup), len(values)), reason)

    def _records(
        self,
        data: pa.RecordBatch,
        lines: pa.Array,
        bad: pa.Array,
        failures: list[_Failure],
        first_only: bool,
    ) -> list[dict[str, Any]]:
        """Reject records of the bad rows: the only per-row Python work."""
        where = pc.indices_nonzero(bad)
        if first_only:
            where = where.slice(0, 1)
        positions = where.to_pylist()
        rows = data.take(where).to_pylist()
        row_lines = lines.take(where).to_pylist()
        index = {p: i for i, p in enumerate(positions)}
        errors: list[list[dict[str, Any]]] = [[] for _ in positions]
        for failure in failures:
            for position in pc.indices_nonzero(failure.mask).to_pylist():
                i = index.get(position)
                if i is None:
                    continue
                value = rows[i][failure.column.name]
                errors[i].append(
                    {
                        "column": failure.column.name,
                        "value": value,
                        "reason": failure.reason(value, position),
                    }
                )
        return [
            {"line": line, **errs[0], "errors": errs, "row": row}
            for line, errs, row in zip(row_lines, errors, rows, strict=True)
        ]


def _rules(column: Column, p: Parsed) -> Iterator[tuple[pa.Array, Reason]]:
    """(failing rows, reason) for each rule of a column, in the order they are reported."""
    if column.required:
        yield p.missing, _fixed("required value is missing")
    yield p.invalid, lambda value, _: column.explain(str(value))
    valid = pc.is_valid(p.values)
    if column.regex is not None:
        matches = pc.match_substring_regex(p.text, column.regex)
        shown = column.regex[4:-2]  # without the ^(?: )$ anchoring
        yield (
            pc.and_(pc.invert(p.missing), pc.invert(matches)),
            _fixed(f"does not match the pattern {shown!r}"),
        )
    if column.enum is not None:
        yield (
            pc.and_(valid, pc.invert(pc.is_in(p.values, value_set=column.enum))),
            _fixed(f"not one of {column.enum_text}"),
        )
    if column.min is not None:
        yield (
            pc.and_(valid, pc.less(p.values, column.min)),
            _fixed(f"less than the minimum {column.min.as_py()}"),
        )
    if column.max is not None:
        yield (
            pc.and_(valid, pc.greater(p.values, column.max)),
            _fixed(f"greater than the maximum {column.max.as_py()}"),
        )


def _fixed(text: str) -> Reason:
    return lambda _value, _position: text
