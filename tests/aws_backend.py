"""SQS/SNS and DynamoDB for tests: one moto server per session, reset before each test.

The contract suites (tests/contract) call :func:`sqs_broker`,
:func:`dynamo_ledger` and :func:`dynamo_table` through their ``BACKENDS``
dicts; the AWS tests use :func:`sqs_url` and :func:`dynamodb_url` directly, and the
Lambda tests :func:`kinesis_record` for what an event source mapping hands over.
Each factory asks for the ``aws`` fixture (tests/conftest.py): the session's
moto server, reset (so every test starts with no queues, topics or tables),
with dummy credentials in the environment the way users give real ones.
A per-test prefix on top keeps names unique even without the reset.

boto3 and the AWS backends are imported inside the functions, so collecting
the contract suites works where boto3 is not installed.
"""

from __future__ import annotations

import base64
import json
import uuid
from pathlib import Path
from typing import Any

import pytest

from sluiceway.ledger import Ledger
from sluiceway.queues.base import Broker
from sluiceway.tables.base import Table

REGION = "us-east-1"
STREAM_ARN = "arn:aws:kinesis:us-east-1:123456789012:stream/events"


def kinesis_record(
    seq: int,
    data: Any,
    *,
    shard: int = 0,
    arrival: float = 1_700_000_000.5,
    stream_arn: str = STREAM_ARN,
) -> dict[str, Any]:
    """One Kinesis record as the event source mapping hands it to Lambda.

    ``data``: bytes as they are, anything else as JSON; the partition key is
    its ``event_uuid`` when it has one.
    """
    raw = data if isinstance(data, bytes) else json.dumps(data).encode()
    return {
        "kinesis": {
            "kinesisSchemaVersion": "1.0",
            "partitionKey": str(data.get("event_uuid", "k")) if isinstance(data, dict) else "k",
            "sequenceNumber": str(seq),
            "data": base64.b64encode(raw).decode(),
            "approximateArrivalTimestamp": arrival,
        },
        "eventSource": "aws:kinesis",
        "eventVersion": "1.0",
        "eventID": f"shardId-00000000000{shard}:{seq}",
        "eventName": "aws:kinesis:record",
        "invokeIdentityArn": "arn:aws:iam::123456789012:role/lake",
        "awsRegion": REGION,
        "eventSourceARN": stream_arn,
    }


def moto(request: pytest.FixtureRequest) -> str:
    """The reset moto server's URL (skips, or fails in CI, when moto is missing)."""
    pytest.importorskip("boto3", reason="boto3 (pip install 'sluiceway[aws]')")
    return str(request.getfixturevalue("aws"))


def sqs_url(endpoint: str, prefix: str | None = "", **options: str) -> str:
    """An ``sqs://`` broker URL on the moto endpoint (``prefix=None``: the default prefix)."""
    given = {} if prefix is None else {"prefix": prefix}
    query = "&".join(
        f"{k}={v}"
        for k, v in {"endpoint_url": endpoint, "region": REGION, **given, **options}.items()
    )
    return f"sqs://?{query}"


def dynamodb_url(endpoint: str, table_prefix: str = "", **options: str) -> str:
    """A ``dynamodb://`` ledger/tables URL on the moto endpoint."""
    query = "&".join(
        f"{k}={v}"
        for k, v in {
            "endpoint_url": endpoint,
            "region": REGION,
            "table_prefix": table_prefix,
            **options,
        }.items()
    )
    return f"dynamodb://?{query}"


def fresh_prefix(stem: str = "t") -> str:
    return f"{stem}{uuid.uuid4().hex[:8]}-"


def client(service: str, endpoint: str) -> Any:
    """A plain boto3 client on moto (for assertions: "another program")."""
    import boto3

    return boto3.client(service, endpoint_url=endpoint, region_name=REGION)


def sqs_broker(request: pytest.FixtureRequest, tmp_path: Path) -> Broker:
    """The queue contract's broker (its SPECS and SUBSCRIPTIONS) on fresh SQS queues."""
    from sluiceway.queues.sqs import SqsBroker

    from .contract.test_queues import SPECS, SUBSCRIPTIONS

    return SqsBroker.from_url(sqs_url(moto(request), fresh_prefix()), SPECS, SUBSCRIPTIONS)


def sqs_pipeline_broker(request: pytest.FixtureRequest, pipeline: str) -> Broker:
    """The contract suite's broker for pipeline ``pipeline``, on the default prefix."""
    from sluiceway.queues.sqs import SqsBroker

    from .contract.test_queues import SPECS, SUBSCRIPTIONS

    url = sqs_url(moto(request), None)
    return SqsBroker.from_url(url, SPECS, SUBSCRIPTIONS, pipeline=pipeline)


def dynamo_ledger(request: pytest.FixtureRequest, tmp_path: Path) -> Ledger:
    """An empty DynamoDB ledger: fresh tables, namespace ``contract``."""
    from sluiceway.ledgers.dynamodb import DynamoLedger

    return DynamoLedger.from_url(dynamodb_url(moto(request), fresh_prefix()), "contract")


def dynamo_table(
    request: pytest.FixtureRequest, tmp_path: Path, name: str, key: list[str]
) -> Table:
    """An empty DynamoDB table; tables of one test share its prefix, like one database."""
    from sluiceway.tables.dynamodb import DynamoTable

    node = request.node
    prefix = getattr(node, "_sluiceway_dynamo_prefix", None)
    if prefix is None:
        prefix = fresh_prefix()
        node._sluiceway_dynamo_prefix = prefix
    return DynamoTable.from_url(dynamodb_url(moto(request), prefix), name, key, "contract")
