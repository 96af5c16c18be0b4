"""Sluiceway: event-driven data pipelines, the same on a laptop and on real infrastructure."""

from .config import PipelineConfig, load, loads
from .errors import ConfigError, InputError, PatternError, SluicewayError
from .events import Event, object_created
from .pipeline import Pipeline
from .runtime import RunSummary, Runtime
from .steps import StepContext, handler, step
from .worker import Worker

__version__ = "0.1.0"

__all__ = [
    "ConfigError",
    "Event",
    "InputError",
    "PatternError",
    "Pipeline",
    "PipelineConfig",
    "RunSummary",
    "Runtime",
    "SluicewayError",
    "StepContext",
    "Worker",
    "handler",
    "load",
    "loads",
    "object_created",
    "step",
]
