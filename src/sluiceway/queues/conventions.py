"""What every broker backend does the same way, so a pipeline moves between them unchanged.

The names a broker creates (a prefix holding the pipeline's name), the check
that topics subscribe only queues the pipeline has, and the failure record of
a message dead-lettered for its receive count.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any


def broker_prefix(given: str | None, pipeline: str | None, default: str, per_pipeline: str) -> str:
    """The name prefix a broker puts before everything it creates.

    ``given`` (the URL's ``?prefix=``) always wins. Otherwise the pipeline's
    name goes into the default (``per_pipeline``, with ``{pipeline}`` in it), so
    two pipelines sharing one broker never share a queue by accident;
    ``default`` is left only for brokers built without a pipeline (tests, tools).
    """
    if given is not None:
        return given
    return per_pipeline.format(pipeline=pipeline) if pipeline else default


def max_receives_failure(receives: int) -> dict[str, Any]:
    """The failure record of a message dead-lettered for its receive count alone.

    Every broker writes the same one, so ``dlq list`` reads alike whatever the backend.
    """
    return {
        "error_type": "MaxReceiveCountExceeded",
        "message": (
            f"received {receives} times without being acked "
            "(the worker died or timed out each time)"
        ),
    }


def checked_subscriptions(
    subscriptions: Mapping[str, Sequence[str]] | None,
    specs: Mapping[str, object],
    error: type[Exception],
) -> dict[str, list[str]]:
    """The topics' subscriber lists, refusing (with ``error``) a queue there is no spec for."""
    out = {t: list(qs) for t, qs in (subscriptions or {}).items()}
    for topic, names in out.items():
        for name in names:
            if name not in specs:
                raise error(f"topic {topic!r} subscribes unknown queue {name!r}")
    return out
