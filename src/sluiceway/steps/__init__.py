"""Built-in steps; importing this package registers them by name."""

from . import parquet, python, read_csv, sinks, validate  # noqa: F401 - registration side effects
from .base import STEPS, StepContext, StepSpecError, StepType, parse_step, register
from .python import handler, step

__all__ = [
    "STEPS",
    "StepContext",
    "StepSpecError",
    "StepType",
    "handler",
    "parse_step",
    "register",
    "step",
]

# Stream steps (registration side effects); after the rest, which they build on.
from . import dataset, dedup  # noqa: F401
