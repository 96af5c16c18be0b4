"""What a step is, and the registry of step names the pipeline file may use.

A function is a chain of steps over a stream of Arrow record batches: the
first step (a *source*, such as ``read_csv``) turns the event into batches,
the middle ones transform batches, and a *sink* (such as ``write_parquet``)
consumes them and commits outputs. Streams are generators, so a batch flows
through every step before the next is read and memory stays flat.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import pyarrow as pa
from pydantic import BaseModel, ConfigDict, ValidationError

from ..buckets.base import Bucket
from ..events import Event
from ..tables.base import Table

if TYPE_CHECKING:
    from ..config import PipelineConfig

Batches = Iterator[pa.RecordBatch]
StepFn = Callable[["StepContext", Batches | None], Batches]


class StepSpecError(Exception):
    """A step in the pipeline file is wrong; ``path`` is relative to the step."""

    def __init__(self, message: str, path: tuple[Any, ...] = ()) -> None:
        super().__init__(message)
        self.message = message
        self.path = path


@dataclass
class StepContext:
    """What a step may know about the message it works on."""

    event: Event
    function: str
    buckets: Mapping[str, Bucket]
    attempt: int = 1
    outputs: list[dict[str, Any]] = field(default_factory=list)
    stats: dict[str, int] = field(default_factory=dict)
    log: logging.Logger = field(default_factory=lambda: logging.getLogger("sluiceway.step"))
    tables: Mapping[str, Table] = field(default_factory=dict)
    # publish(messages, queue=None, topic=None) -> how many were new; each
    # message id is sent at most once, however often the input is re-run.
    publish: Callable[..., int] | None = None
    # Requests a later step (``validate``) makes of the source. The worker
    # calls every step function before the sink pulls the first batch, so a
    # step can set these when called and the source sees them when it starts
    # reading; a source that cannot honour them ignores them.
    #   read_as_text: read every column as text (the later step casts);
    #   line_column: add each row's physical line number under this name;
    #   malformed_rows: a list instead of None means rows the source cannot
    #     split into the right fields are appended to it as
    #     {"line", "text", "reason"} (counted in rows_in) instead of failing.
    read_as_text: bool = False
    line_column: str | None = None
    malformed_rows: list[dict[str, Any]] | None = None

    def count(self, name: str, n: int = 1) -> None:
        self.stats[name] = self.stats.get(name, 0) + n

    @property
    def input_name(self) -> str:
        if self.event.bucket is not None:
            return f"{self.event.bucket}/{self.event.key}"
        return f"event {self.event.id}"

    def bucket(self, name: str) -> Bucket:
        return self.buckets[name]

    def table(self, name: str) -> Table:
        return self.tables[name]


class StepOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")


class StepType:
    """A kind of step. Subclasses give ``name``, ``Options`` and ``build``."""

    name: ClassVar[str]
    Options: ClassVar[type[StepOptions]] = StepOptions
    source: ClassVar[bool] = False  # makes batches out of the event

    def options(self, raw: Any) -> StepOptions:
        try:
            return self.Options.model_validate(raw if raw is not None else {})
        except ValidationError as err:
            e = err.errors()[0]
            msg = "unknown option" if e["type"] == "extra_forbidden" else e["msg"]
            raise StepSpecError(msg, (self.name, *e["loc"])) from None

    def check(self, raw: Any, cfg: PipelineConfig) -> None:
        """Everything that can be wrong with this step before anything runs."""
        self.options(raw)

    def build(self, raw: Any, cfg: PipelineConfig) -> StepFn:
        raise NotImplementedError


STEPS: dict[str, StepType] = {}


def register(step_type: type[StepType]) -> type[StepType]:
    STEPS[step_type.name] = step_type()
    return step_type


def parse_step(raw: dict[str, Any] | str) -> tuple[str, Any]:
    """``- read_csv`` or ``- read_csv: {…}`` → ``("read_csv", {…})``."""
    if isinstance(raw, str):
        name, options = raw, None
    elif len(raw) == 1:
        name, options = next(iter(raw.items()))
    else:
        raise StepSpecError(f"a step is one name with its options, got keys {sorted(raw)}")
    if name not in STEPS:
        known = ", ".join(sorted(STEPS))
        raise StepSpecError(f"unknown step {name!r} (known: {known})", (name,) if raw else ())
    return name, options
