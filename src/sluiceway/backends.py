"""Backend URLs → backend objects, by scheme, imported only when used.

The pipeline file names *what* (buckets, queues, tables); a profile names
*where* (``s3://…``, ``redis://…``, ``postgresql://…``). This module is the one
place that maps a scheme to the class implementing the interface, so adding
a backend is one line here plus its module, and a pipeline that never uses
RabbitMQ never imports its client.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from typing import Any
from urllib.parse import urlsplit

from .connections import redact
from .errors import ConfigError

# scheme → "module:factory". Factories:
#   bucket(name, url) -> Bucket
#   broker(url, specs: dict[str, QueueSpec], subscriptions: dict[str, list[str]],
#          *, pipeline: str) -> Broker  (the pipeline's name goes into the default prefix)
#   ledger(url, namespace: str) -> Ledger
#   table(url, name: str, key: list[str], namespace: str) -> Table
BUCKETS: dict[str, str] = {
    "s3": "sluiceway.buckets.s3:S3Bucket.from_url",
}
BROKERS: dict[str, str] = {
    "redis": "sluiceway.queues.redis:RedisBroker.from_url",
    "rediss": "sluiceway.queues.redis:RedisBroker.from_url",
    "amqp": "sluiceway.queues.rabbitmq:RabbitBroker.from_url",
    "amqps": "sluiceway.queues.rabbitmq:RabbitBroker.from_url",
    "nats": "sluiceway.queues.nats:NatsBroker.from_url",
    "sqs": "sluiceway.queues.sqs:SqsBroker.from_url",
}
LEDGERS: dict[str, str] = {
    "postgresql": "sluiceway.ledgers.postgres:PostgresLedger.from_url",
    "postgres": "sluiceway.ledgers.postgres:PostgresLedger.from_url",
    "redis": "sluiceway.ledgers.redis:RedisLedger.from_url",
    "dynamodb": "sluiceway.ledgers.dynamodb:DynamoLedger.from_url",
}
TABLES: dict[str, str] = {
    "postgresql": "sluiceway.tables.postgres:PostgresTable.from_url",
    "postgres": "sluiceway.tables.postgres:PostgresTable.from_url",
    "dynamodb": "sluiceway.tables.dynamodb:DynamoTable.from_url",
}


def scheme_of(url: str) -> str:
    return urlsplit(url).scheme.lower()


def factory(kind: str, registry: Mapping[str, str], url: str) -> Callable[..., Any]:
    """The factory for ``url``'s scheme; a ConfigError names the known schemes."""
    scheme = scheme_of(url)
    target = registry.get(scheme)
    if target is None:
        known = ", ".join(f"{s}://" for s in sorted(registry))
        raise ConfigError([f"{kind} {redact(url)!r}: unknown scheme {scheme!r} (known: {known})"])
    module_name, _, attr = target.partition(":")
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError as e:
        raise ConfigError(
            [f"{kind} {redact(url)!r}: the {scheme} backend is not available here: {e}"]
        ) from None
    for part in attr.split("."):
        obj = getattr(obj, part)
    return obj
