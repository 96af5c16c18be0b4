"""Tables in Amazon DynamoDB: one DynamoDB table per Sluiceway table, items as native attributes.

URL (credentials from the standard AWS chain, never from the URL)::

    dynamodb://?region=eu-central-1&table_prefix=prod-
    dynamodb://?endpoint_url=http://127.0.0.1:5000&region=us-east-1&table_prefix=t-

``table_prefix``, ``endpoint_url``, ``region``, ``max_attempts``: see
:mod:`sluiceway.ledgers.dynamodb` and :mod:`sluiceway.aws_clients`.

Table ``NAME`` of pipeline ``P`` is the DynamoDB table
``<table_prefix>P-table-NAME``, created at first use with on-demand billing.

The key
-------
Its hash key ``_pk`` is the item's key values as compact JSON (``[1]``,
``["c1",2]``), whatever the number of key fields. Why one encoded string and
not HASH + RANGE with native types: a DynamoDB key attribute has one fixed
type (S, N or B) chosen when the table is made, but a Sluiceway key field
has no declared type, and keys of three or more fields need an encoding
anyway; one rule covers them all. As with PostgreSQL's JSON keys, ``1`` and
``"1"`` are different keys. The key fields are also stored as ordinary
attributes, so a global secondary index on one of them (say all orders of
a customer) can be added by hand. ``_pk`` cannot be an item field.

Values
------
Items are stored as native DynamoDB attributes (maps, lists, strings,
booleans, null, numbers), readable by any DynamoDB tool. DynamoDB has one
number type, a decimal: floats go in as their shortest exact decimal and
come back as floats, integers come back as ints. An integral float such as
``2.0`` may come back as ``2`` (DynamoDB normalises numbers), which compares
equal. NaN and infinities cannot be stored and are refused with the field's
name. DynamoDB's limits apply: 400 KB per item, 38 digits per number.

Writes
------
``upsert`` is ``BatchWriteItem`` in 25s, repeating what DynamoDB leaves
unprocessed with backoff. It is not one transaction (DynamoDB's transactions
take 100 items and cost double): a batch cut short by a crash is completed
when the message is retried, since upserting the same items again leaves the
same table. Within one call, the last item with a key wins. ``count`` and
``scan`` read the whole table (strongly consistent), ``get`` and ``delete``
one item.
"""

from __future__ import annotations

import json
import math
import os
import threading
from collections.abc import Iterator, Sequence
from decimal import Decimal
from typing import Any

from ..aws_clients import DYNAMO_OPTIONS, Dynamo, parse_url
from ..errors import SluicewayError
from .base import Table

PK = "_pk"

_shared: dict[tuple[str, int], Dynamo] = {}
_shared_lock = threading.Lock()


def encode_key(values: Sequence[Any]) -> str:
    """The ``_pk`` of a key: compact JSON of its values (``[1]``, ``["c1",2]``)."""
    return json.dumps(list(values), separators=(",", ":"), ensure_ascii=False, default=str)


def to_dynamo(value: Any, where: str) -> Any:
    """A JSON-like value as boto3's serializer takes it: floats as Decimal."""
    if isinstance(value, bool) or value is None or isinstance(value, str | int | Decimal):
        return value
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"{where}: DynamoDB cannot store {value!r}")
        return Decimal(repr(value))
    if isinstance(value, dict):
        return {str(k): to_dynamo(v, f"{where}.{k}") for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [to_dynamo(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, bytes | bytearray):
        return bytes(value)
    return str(value)  # dates and the like, as JSON-encoding tables store them


def from_dynamo(value: Any) -> Any:
    """Back from boto3's deserializer: Decimal as int or float, Binary as bytes."""
    if isinstance(value, Decimal):
        return int(value) if value.as_tuple().exponent >= 0 else float(value)  # type: ignore[operator]
    if isinstance(value, dict):
        return {k: from_dynamo(v) for k, v in value.items()}
    if isinstance(value, list):
        return [from_dynamo(v) for v in value]
    if isinstance(value, set):
        return [from_dynamo(v) for v in sorted(value)]
    value_attr = getattr(value, "value", None)
    if isinstance(value_attr, bytes):  # boto3's Binary
        return value_attr
    return value


class DynamoTable(Table):
    """:class:`~sluiceway.tables.base.Table` on DynamoDB (see the module docstring)."""

    def __init__(self, dynamo: Dynamo, name: str, key: Sequence[str], namespace: str) -> None:
        from boto3.dynamodb.types import TypeDeserializer, TypeSerializer

        self.db = dynamo
        self.name = name
        self.key = tuple(key)
        if PK in self.key:
            raise SluicewayError(f"table {name!r}: {PK!r} cannot be a key field")
        self.table = dynamo.table_name(namespace, "table", name)
        self._ser = TypeSerializer()
        self._de = TypeDeserializer()
        dynamo.ensure_table(self.table, [(PK, "HASH", "S")])

    @classmethod
    def from_url(cls, url: str, name: str, key: list[str], namespace: str) -> DynamoTable:
        """``dynamodb://?region=…&table_prefix=…``: creates the table now if missing.

        The tables of one URL share one client (and one reachability check)
        per process: boto3 clients are thread-safe, and a pipeline with ten
        tables should not open ten connection pools.
        """
        with _shared_lock:
            dynamo = _shared.get((url, os.getpid()))
            if dynamo is None:
                dynamo = Dynamo(parse_url(url, "dynamodb", DYNAMO_OPTIONS), "tables")
                _shared[(url, os.getpid())] = dynamo
        return cls(dynamo, name, key, namespace)

    def __repr__(self) -> str:
        return f"DynamoTable({self.name!r}, {self.table!r})"

    def _item(self, item: dict[str, Any]) -> tuple[str, dict[str, Any]]:
        pk = encode_key(self.key_of(item))
        if PK in item:
            raise SluicewayError(f"table {self.name!r}: items cannot have a field named {PK!r}")
        try:
            native = to_dynamo(item, "item")
        except ValueError as e:
            raise SluicewayError(f"table {self.name!r}, key {pk}: {e}") from None
        native[PK] = pk
        return pk, {k: self._ser.serialize(v) for k, v in native.items()}

    def _plain(self, item: dict[str, Any]) -> dict[str, Any]:
        return {k: from_dynamo(self._de.deserialize(v)) for k, v in item.items() if k != PK}

    def upsert(self, items: Sequence[dict[str, Any]]) -> int:
        # Every item is checked before anything is written: a bad key writes nothing.
        by_pk: dict[str, dict[str, Any]] = {}
        for item in items:
            pk, native = self._item(item)
            by_pk.pop(pk, None)  # the last one wins, and takes the later place
            by_pk[pk] = native
        self.db.batch_write(self.table, [{"PutRequest": {"Item": i}} for i in by_pk.values()])
        return len(items)

    def get(self, *key: Any) -> dict[str, Any] | None:
        reply = self.db.call(
            lambda: self.db.client.get_item(
                TableName=self.table, Key={PK: {"S": encode_key(key)}}, ConsistentRead=True
            ),
            f"get from {self.table}",
        )
        item = reply.get("Item")
        return None if item is None else self._plain(item)

    def scan(self, limit: int | None = None) -> Iterator[dict[str, Any]]:
        if limit is not None and limit <= 0:
            return
        n = 0
        extra = {} if limit is None else {"Limit": min(limit, 1000)}
        for page in self.db.pages("scan", TableName=self.table, ConsistentRead=True, **extra):
            for item in page.get("Items", []):
                yield self._plain(item)
                n += 1
                if limit is not None and n >= limit:
                    return

    def count(self) -> int:
        return sum(
            int(page.get("Count", 0))
            for page in self.db.pages(
                "scan", TableName=self.table, Select="COUNT", ConsistentRead=True
            )
        )

    def delete(self, *key: Any) -> bool:
        reply = self.db.call(
            lambda: self.db.client.delete_item(
                TableName=self.table, Key={PK: {"S": encode_key(key)}}, ReturnValues="ALL_OLD"
            ),
            f"delete from {self.table}",
        )
        return bool(reply.get("Attributes"))
