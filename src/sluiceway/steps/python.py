"""Users' own Python, as a batch step or as a whole-event handler.

Two ways in, both resolved before anything runs: ``module:function`` in the
pipeline file (imported with the pipeline's folder on ``sys.path``), or a
name registered with the ``@step`` / ``@handler`` decorators in a module the
pipeline lists under ``imports``. Worker processes import the same modules,
so a decorated function exists wherever the work happens.
"""

from __future__ import annotations

import importlib
import inspect
import sys
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pyarrow as pa

from ..events import Event
from .base import Batches, StepContext, StepFn, StepSpecError, StepType, register

if TYPE_CHECKING:
    from ..config import PipelineConfig

BatchFn = Callable[[pa.RecordBatch, StepContext], Any]
HandlerFn = Callable[[Event, StepContext], Any]

HANDLERS: dict[str, HandlerFn] = {}


def import_module(module_name: str, base_dir: Path | None = None) -> Any:
    """Import a user module, the pipeline's folder first on the path."""
    if base_dir is not None and str(base_dir) not in sys.path:
        sys.path.insert(0, str(base_dir))
    try:
        return importlib.import_module(module_name)
    except ImportError as e:
        raise ValueError(f"cannot import module {module_name!r}: {e}") from None
    except Exception as e:
        raise ValueError(f"module {module_name!r} failed on import: {e!r}") from None


def import_target(spec: str, base_dir: Path | None = None) -> Callable[..., Any]:
    """``package.module:function`` → the function; ValueError says what is missing."""
    module_name, _, attr = spec.partition(":")
    module = import_module(module_name, base_dir)
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise ValueError(f"module {module_name!r} has no function {attr!r}")
    return fn


def _as_batches(result: Any, ctx: StepContext) -> Iterable[pa.RecordBatch]:
    """Steps may return a batch, a table, None (drop it) or an iterable of batches."""
    if result is None:
        return ()
    if isinstance(result, pa.RecordBatch):
        return (result,)
    if isinstance(result, pa.Table):
        return result.to_batches()
    if isinstance(result, Iterable):
        return result
    raise TypeError(
        f"a step of function {ctx.function!r} returned {type(result).__name__}; "
        "return a RecordBatch, a Table, None or an iterable of batches"
    )


def batch_step(fn: BatchFn) -> StepFn:
    takes_ctx = len(inspect.signature(fn).parameters) >= 2

    def run(ctx: StepContext, batches: Batches | None) -> Batches:
        if batches is None:
            raise StepSpecError(f"step {fn.__name__} needs a source step before it")
        for batch in batches:
            result = fn(batch, ctx) if takes_ctx else fn(batch)  # type: ignore[call-arg]
            yield from _as_batches(result, ctx)

    return run


@register
class Call(StepType):
    """``- call: module:function``: the function gets each batch (and the context)."""

    name = "call"

    def _resolve(self, raw: Any, cfg: PipelineConfig) -> BatchFn:
        if not isinstance(raw, str) or ":" not in raw:
            raise StepSpecError("give the function as 'module:function'", (self.name,))
        try:
            return import_target(raw, cfg.base_dir)
        except ValueError as e:
            raise StepSpecError(str(e), (self.name,)) from None

    def check(self, raw: Any, cfg: PipelineConfig) -> None:
        self._resolve(raw, cfg)

    def build(self, raw: Any, cfg: PipelineConfig) -> StepFn:
        return batch_step(self._resolve(raw, cfg))


def step(name: str) -> Callable[[BatchFn], BatchFn]:
    """Register ``fn(batch, ctx)`` as a step usable by name in the pipeline file."""

    def decorate(fn: BatchFn) -> BatchFn:
        step_type = type(
            f"UserStep_{name}",
            (StepType,),
            {"name": name, "build": lambda self, raw, cfg: batch_step(fn)},
        )
        register(step_type)
        return fn

    return decorate


def handler(name: str) -> Callable[[HandlerFn], HandlerFn]:
    """Register ``fn(event, ctx)`` as a handler usable by name: ``handler: NAME``."""

    def decorate(fn: HandlerFn) -> HandlerFn:
        HANDLERS[name] = fn
        return fn

    return decorate


def resolve_handler(spec: str, base_dir: Path | None) -> HandlerFn:
    if spec in HANDLERS:
        return HANDLERS[spec]
    if ":" not in spec:
        raise ValueError(f"no handler registered as {spec!r}; use @sluiceway.handler or mod:fn")
    return import_target(spec, base_dir)
