"""The ledger in Amazon DynamoDB: claims, seen object versions and sent ids, for every worker.

URL (credentials from the standard AWS chain, never from the URL)::

    dynamodb://?region=eu-central-1&table_prefix=prod-
    dynamodb://?endpoint_url=http://127.0.0.1:5000&region=us-east-1&table_prefix=t-&sent_ttl=30d

``table_prefix``
    Put before every table name. Default: none.
``sent_ttl``
    Let DynamoDB's TTL delete sent-message ids this long after they were
    sent (``30d``, ``12h``). Default: kept until ``forget_sent``; a re-run of
    an input after its ids expired sends its messages again (the consumers'
    ledger absorbs them).
``endpoint_url``, ``region``, ``max_attempts``
    See :mod:`sluiceway.aws_clients`.

Three tables per namespace (the pipeline's name), created at first start
with on-demand billing (``PREFIX`` is ``table_prefix`` + namespace):

``PREFIX-ledger-entries`` (hash key ``key``)
    One item per (function, input): function, status, owner, expires_at,
    attempts, created_at, updated_at, ``info`` as JSON (zlib-compressed into
    ``info_z`` when over 64 KiB, so a function with many outputs stays under
    DynamoDB's 400 KB item limit), the input ``identity`` (the key after
    ``function|``) and the UTC ``day`` of ``updated_at``. Three sparse
    global secondary indexes, projecting only keys (and the status) so a
    heartbeat's ``extend`` rewrites at most one index entry:
    ``by_function`` (function, key; with status) for ``other_versions``,
    ``by_identity`` (identity, created_at) for ``entries_for``, ``by_day``
    (day, updated_at) for ``entries_since``.
``PREFIX-ledger-objects`` (hash ``object`` = ``bucket/key``, range ``etag``)
    The object versions events were raised for.
``PREFIX-ledger-sent`` (hash ``id``; TTL attribute ``expires``)
    Sent message ids with their time.

Every state change is one conditional write, so it is atomic on the server:
``claim`` is an ``UpdateItem`` that succeeds only when
``attribute_not_exists(key) OR status = failed OR (status = in_progress AND
expires_at < now)``, and reports DONE or BUSY from the item returned on a
failed condition; ``extend``, ``complete``, ``fail`` and ``skip`` are
conditional on the owner and ``in_progress``; ``first_seen`` is a
``PutItem`` with ``attribute_not_exists``. Reads that decide something
(``get``, ``has_seen``, ``unsent``) are strongly consistent.

Time is the worker's clock (DynamoDB has no server time in expressions):
keep the machines' clocks synchronised (NTP), since a clock running ahead
takes over expired claims early. DynamoDB's TTL is not used for claims: it
deletes items, which would lose a done entry (and with it the dedup) or an
entry's attempt count; expiry is checked in the claim's condition instead.

Costs: the hot path (claim, extend, complete, ``other_versions`` on its
index, ``first_seen``, ``unsent``, ``mark_sent``) is a few single-item or
batched calls per message. ``function_counts`` and ``done_infos`` scan the
entries table, and ``forget_sent`` scans the sent table: they serve
``status`` and metrics, and cost a read of the whole table each (use
``sent_ttl`` instead of ``forget_sent`` on big pipelines).
``entries_since`` queries one ``by_day`` partition per day for spans up to 31
days and scans beyond. Index reads are eventually consistent: an entry
finished a moment ago can be missing from ``other_versions``,
``entries_for`` or ``entries_since`` for about a second.
"""

from __future__ import annotations

import json
import re
import time
import zlib
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

from ..aws_clients import DYNAMO_OPTIONS, Dynamo, error_code, parse_url
from ..errors import SluicewayError
from ..ledger import Claim, Entry, Ledger

INFO_INLINE_MAX = 64 * 1024
DAY_QUERY_SPAN = 31  # days; longer spans of entries_since scan instead

# Every attribute goes through a placeholder: key, status, owner... are reserved words.
NAMES = {
    "#k": "key",
    "#f": "function",
    "#s": "status",
    "#o": "owner",
    "#e": "expires_at",
    "#a": "attempts",
    "#c": "created_at",
    "#u": "updated_at",
    "#i": "info",
    "#z": "info_z",
    "#id": "identity",
    "#d": "day",
}


def _s(value: str) -> dict[str, str]:
    return {"S": value}


def _n(value: float) -> dict[str, str]:
    return {"N": str(Decimal(repr(value))) if isinstance(value, float) else str(value)}


def _day(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d")


def _identity(key: str) -> str:
    return key.split("|", 1)[1] if "|" in key else key


def _num(item: dict[str, Any], name: str) -> float | None:
    value = item.get(name)
    if value is None or "N" not in value:
        return None
    return float(value["N"])


class DynamoLedger(Ledger):
    """:class:`~sluiceway.ledger.Ledger` on DynamoDB (see the module docstring)."""

    def __init__(self, dynamo: Dynamo, namespace: str, sent_ttl: float | None = None) -> None:
        self.db = dynamo
        self.namespace = namespace
        self.sent_ttl = sent_ttl
        self.entries = dynamo.table_name(namespace, "ledger", "entries")
        self.objects = dynamo.table_name(namespace, "ledger", "objects")
        self.sent = dynamo.table_name(namespace, "ledger", "sent")
        self._create()

    @classmethod
    def from_url(cls, url: str, namespace: str) -> DynamoLedger:
        """``dynamodb://?region=…&table_prefix=…``: creates the tables now if missing."""
        target = parse_url(url, "dynamodb", DYNAMO_OPTIONS)
        return cls(Dynamo(target, "ledger"), namespace, target.duration("sent_ttl"))

    def __repr__(self) -> str:
        return f"DynamoLedger({self.db.target.display!r}, {self.namespace!r})"

    def _create(self) -> None:
        def index(name: str, hash_key: str, range_key: str, *extra: str) -> dict[str, Any]:
            projection: dict[str, Any] = {"ProjectionType": "KEYS_ONLY"}
            if extra:
                projection = {"ProjectionType": "INCLUDE", "NonKeyAttributes": list(extra)}
            return {
                "IndexName": name,
                "KeySchema": [
                    {"AttributeName": hash_key, "KeyType": "HASH"},
                    {"AttributeName": range_key, "KeyType": "RANGE"},
                ],
                "Projection": projection,
            }

        self.db.ensure_table(
            self.entries,
            [
                ("key", "HASH", "S"),
                ("function", "-", "S"),
                ("identity", "-", "S"),
                ("created_at", "-", "N"),
                ("day", "-", "S"),
                ("updated_at", "-", "N"),
            ],
            [
                index("by_function", "function", "key", "status"),
                index("by_identity", "identity", "created_at"),
                index("by_day", "day", "updated_at"),
            ],
        )
        self.db.ensure_table(self.objects, [("object", "HASH", "S"), ("etag", "RANGE", "S")])
        self.db.ensure_table(self.sent, [("id", "HASH", "S")], ttl_attribute="expires")

    # -- objects -------------------------------------------------------------------

    def first_seen(self, bucket: str, key: str, etag: str, size: int, event_id: str) -> bool:
        from botocore.exceptions import ClientError

        item = {
            "object": _s(f"{bucket}/{key}"),
            "etag": _s(etag),
            "size": _n(size),
            "seen_at": _n(time.time()),
            "event_id": _s(event_id),
        }
        try:
            self.db.call(
                lambda: self.db.client.put_item(
                    TableName=self.objects,
                    Item=item,
                    ConditionExpression="attribute_not_exists(#ob)",
                    ExpressionAttributeNames={"#ob": "object"},
                ),
                "first_seen",
            )
        except ClientError as e:
            if error_code(e) == "ConditionalCheckFailedException":
                return False
            raise
        return True

    def has_seen(self, bucket: str, key: str, etag: str) -> bool:
        reply = self.db.call(
            lambda: self.db.client.get_item(
                TableName=self.objects,
                Key={"object": _s(f"{bucket}/{key}"), "etag": _s(etag)},
                ConsistentRead=True,
                ProjectionExpression="#et",
                ExpressionAttributeNames={"#et": "etag"},
            ),
            "has_seen",
        )
        return "Item" in reply

    def versions(self, bucket: str, key: str) -> list[dict[str, Any]]:
        out = []
        for page in self.db.pages(
            "query",
            TableName=self.objects,
            KeyConditionExpression="#ob = :o",
            ExpressionAttributeNames={"#ob": "object"},
            ExpressionAttributeValues={":o": _s(f"{bucket}/{key}")},
            ConsistentRead=True,
        ):
            for item in page.get("Items", []):
                out.append(
                    {
                        "etag": item["etag"]["S"],
                        "size": int(float(item["size"]["N"])),
                        "seen_at": float(item["seen_at"]["N"]),
                        "event_id": item["event_id"]["S"],
                    }
                )
        return sorted(out, key=lambda v: v["seen_at"])

    # -- claims --------------------------------------------------------------------

    def claim(self, key: str, *, function: str, owner: str, ttl: float) -> Claim:
        from botocore.exceptions import ClientError

        now = time.time()
        try:
            self.db.call(
                lambda: self.db.client.update_item(
                    TableName=self.entries,
                    Key={"key": _s(key)},
                    UpdateExpression=(
                        "SET #s = :ip, #o = :owner, #e = :exp, #u = :now, #d = :day,"
                        " #f = :fn, #id = :ident, #c = if_not_exists(#c, :now),"
                        " #a = if_not_exists(#a, :zero) + :one,"
                        " #i = if_not_exists(#i, :empty)"
                    ),
                    ConditionExpression=(
                        "attribute_not_exists(#k) OR #s = :failed OR (#s = :ip AND #e < :now)"
                    ),
                    ExpressionAttributeNames=_names(
                        "#s", "#o", "#e", "#u", "#d", "#f", "#id", "#c", "#a", "#i", "#k"
                    ),
                    ExpressionAttributeValues={
                        ":ip": _s("in_progress"),
                        ":failed": _s("failed"),
                        ":owner": _s(owner),
                        ":exp": _n(now + ttl),
                        ":now": _n(now),
                        ":day": _s(_day(now)),
                        ":fn": _s(function),
                        ":ident": _s(_identity(key)),
                        ":zero": _n(0),
                        ":one": _n(1),
                        ":empty": _s("{}"),
                    },
                    ReturnValuesOnConditionCheckFailure="ALL_OLD",
                ),
                "claim",
            )
        except ClientError as e:
            if error_code(e) != "ConditionalCheckFailedException":
                raise
            old = e.response.get("Item")
            if old is None:  # an emulator that does not return it
                entry = self.get(key)
                status = entry.status if entry else "in_progress"
            else:
                status = old.get("status", {}).get("S", "")
            return Claim.BUSY if status == "in_progress" else Claim.DONE
        return Claim.ACQUIRED

    def _owned_update(self, key: str, owner: str, update: str, values: dict[str, Any]) -> bool:
        """An update that applies only while ``owner`` holds the claim; False otherwise."""
        from botocore.exceptions import ClientError

        placeholders = [*re.findall(r"#\w+", update), "#o", "#s"]
        try:
            self.db.call(
                lambda: self.db.client.update_item(
                    TableName=self.entries,
                    Key={"key": _s(key)},
                    UpdateExpression=update,
                    ConditionExpression="#o = :owner AND #s = :ip",
                    ExpressionAttributeNames=_names(*placeholders),
                    ExpressionAttributeValues={
                        ":owner": _s(owner),
                        ":ip": _s("in_progress"),
                        **values,
                    },
                ),
                "ledger update",
            )
        except ClientError as e:
            if error_code(e) == "ConditionalCheckFailedException":
                return False
            raise
        return True

    def extend(self, key: str, *, owner: str, ttl: float) -> bool:
        now = time.time()
        return self._owned_update(
            key,
            owner,
            "SET #e = :exp, #u = :now, #d = :day",
            {":exp": _n(now + ttl), ":now": _n(now), ":day": _s(_day(now))},
        )

    def _finish(self, key: str, owner: str, status: str, info: dict[str, Any]) -> None:
        now = time.time()
        values = {":st": _s(status), ":now": _n(now), ":day": _s(_day(now))}
        info_name, info_value, other = _encode_info(info, key)
        values[":info"] = info_value
        self._owned_update(
            key,
            owner,
            f"SET #s = :st, #u = :now, #d = :day, {info_name} = :info REMOVE #e, {other}",
            values,
        )  # done stays done: a stale owner changes nothing

    def complete(self, key: str, *, owner: str, info: dict[str, Any]) -> None:
        self._finish(key, owner, "done", info)

    def fail(self, key: str, *, owner: str, info: dict[str, Any]) -> None:
        self._finish(key, owner, "failed", info)

    def skip(self, key: str, *, owner: str, info: dict[str, Any]) -> None:
        self._finish(key, owner, "skipped", info)

    def supersede(self, key: str) -> None:
        from botocore.exceptions import ClientError

        now = time.time()
        try:
            self.db.call(
                lambda: self.db.client.update_item(
                    TableName=self.entries,
                    Key={"key": _s(key)},
                    UpdateExpression="SET #s = :sup, #u = :now, #d = :day",
                    ConditionExpression="attribute_exists(#k)",
                    ExpressionAttributeNames=_names("#s", "#u", "#d", "#k"),
                    ExpressionAttributeValues={
                        ":sup": _s("superseded"),
                        ":now": _n(now),
                        ":day": _s(_day(now)),
                    },
                ),
                "supersede",
            )
        except ClientError as e:
            if error_code(e) != "ConditionalCheckFailedException":
                raise

    # -- reading entries -------------------------------------------------------------

    def get(self, key: str) -> Entry | None:
        reply = self.db.call(
            lambda: self.db.client.get_item(
                TableName=self.entries, Key={"key": _s(key)}, ConsistentRead=True
            ),
            "get",
        )
        item = reply.get("Item")
        return None if item is None else _entry(item)

    def _entries(self, keys: Sequence[str]) -> list[Entry]:
        """Full entries for keys found on an index (strongly consistent), in the keys' order."""
        unique = list(dict.fromkeys(keys))
        items = self.db.batch_get(self.entries, [{"key": _s(k)} for k in unique])
        by_key = {i["key"]["S"]: _entry(i) for i in items}
        return [by_key[k] for k in unique if k in by_key]

    def function_counts(self) -> dict[str, dict[str, int]]:
        out: dict[str, dict[str, int]] = {}
        for page in self.db.pages(
            "scan",
            TableName=self.entries,
            ProjectionExpression="#f, #s",
            ExpressionAttributeNames=_names("#f", "#s"),
        ):
            for item in page.get("Items", []):
                fn, status = item["function"]["S"], item["status"]["S"]
                out.setdefault(fn, {}).setdefault(status, 0)
                out[fn][status] += 1
        return out

    def other_versions(self, function: str, input_prefix: str, current: str) -> list[Entry]:
        keys = []
        for page in self.db.pages(
            "query",
            TableName=self.entries,
            IndexName="by_function",
            KeyConditionExpression="#f = :fn AND begins_with(#k, :prefix)",
            FilterExpression="#s = :done",
            ExpressionAttributeNames=_names("#f", "#k", "#s"),
            ExpressionAttributeValues={
                ":fn": _s(function),
                ":prefix": _s(f"{function}|{input_prefix}"),
                ":done": _s("done"),
            },
        ):
            keys += [i["key"]["S"] for i in page.get("Items", []) if i["key"]["S"] != current]
        return [e for e in self._entries(keys) if e.status == "done"]

    def entries_for(self, identity: str) -> list[Entry]:
        keys = []
        for page in self.db.pages(
            "query",
            TableName=self.entries,
            IndexName="by_identity",
            KeyConditionExpression="#id = :ident",
            ExpressionAttributeNames=_names("#id"),
            ExpressionAttributeValues={":ident": _s(identity)},
        ):
            keys += [i["key"]["S"] for i in page.get("Items", [])]
        return sorted(self._entries(keys), key=lambda e: e.created_at)

    def entries_since(self, since: float) -> list[Entry]:
        now = time.time()
        keys: list[str] = []
        if now - since <= DAY_QUERY_SPAN * 86400:
            day = datetime.fromtimestamp(since, UTC).date()
            last = datetime.fromtimestamp(now, UTC).date() + timedelta(days=1)  # clocks ahead
            while day <= last:
                for page in self.db.pages(
                    "query",
                    TableName=self.entries,
                    IndexName="by_day",
                    KeyConditionExpression="#d = :day AND #u >= :since",
                    ExpressionAttributeNames=_names("#d", "#u"),
                    ExpressionAttributeValues={
                        ":day": _s(day.isoformat()),
                        ":since": _n(since),
                    },
                ):
                    keys += [i["key"]["S"] for i in page.get("Items", [])]
                day += timedelta(days=1)
        else:
            for page in self.db.pages(
                "scan",
                TableName=self.entries,
                ProjectionExpression="#k",
                FilterExpression="#u >= :since",
                ExpressionAttributeNames=_names("#k", "#u"),
                ExpressionAttributeValues={":since": _n(since)},
            ):
                keys += [i["key"]["S"] for i in page.get("Items", [])]
        entries = [e for e in self._entries(keys) if e.updated_at >= since]
        return sorted(entries, key=lambda e: e.updated_at)

    def done_infos(self) -> Iterator[tuple[str, dict[str, Any]]]:
        for page in self.db.pages(
            "scan",
            TableName=self.entries,
            ProjectionExpression="#f, #i, #z",
            FilterExpression="#s = :done",
            ExpressionAttributeNames=_names("#f", "#i", "#z", "#s"),
            ExpressionAttributeValues={":done": _s("done")},
        ):
            for item in page.get("Items", []):
                yield item["function"]["S"], _decode_info(item)

    # -- sent ids --------------------------------------------------------------------

    def mark_sent(self, ids: Sequence[str]) -> None:
        now = time.time()
        requests = []
        for i in dict.fromkeys(ids):
            item = {"id": _s(i), "sent_at": _n(now)}
            if self.sent_ttl is not None:
                item["expires"] = _n(int(now + self.sent_ttl))
            requests.append({"PutRequest": {"Item": item}})
        self.db.batch_write(self.sent, requests)

    def unsent(self, ids: Sequence[str]) -> list[str]:
        if not ids:
            return []
        unique = list(dict.fromkeys(ids))
        found = {
            i["id"]["S"] for i in self.db.batch_get(self.sent, [{"id": _s(i)} for i in unique])
        }
        return [i for i in ids if i not in found]

    def forget_sent(self, older_than: float) -> int:
        cutoff = time.time() - older_than
        old = []
        for page in self.db.pages(
            "scan",
            TableName=self.sent,
            ProjectionExpression="#sid",
            FilterExpression="#sat < :cut",
            ExpressionAttributeNames={"#sid": "id", "#sat": "sent_at"},
            ExpressionAttributeValues={":cut": _n(cutoff)},
        ):
            old += [i["id"]["S"] for i in page.get("Items", [])]
        self.db.batch_write(self.sent, [{"DeleteRequest": {"Key": {"id": _s(i)}}} for i in old])
        return len(old)

    def close(self) -> None:
        self.db.close()


def _names(*placeholders: str) -> dict[str, str]:
    return {p: NAMES[p] for p in dict.fromkeys(placeholders)}


def _encode_info(info: dict[str, Any], key: str) -> tuple[str, dict[str, Any], str]:
    """(attribute placeholder to set, its value, placeholder to remove) for ``info``."""
    text = json.dumps(info, default=str)
    if len(text) <= INFO_INLINE_MAX:
        return "#i", _s(text), "#z"
    packed = zlib.compress(text.encode(), 6)
    if len(packed) > 350_000:
        raise SluicewayError(
            f"ledger entry {key!r}: its info is {len(packed):,} bytes even compressed, over "
            "DynamoDB's 400 KB item limit (too many outputs for one input?)"
        )
    return "#z", {"B": packed}, "#i"


def _decode_info(item: dict[str, Any]) -> dict[str, Any]:
    if "info_z" in item:
        return json.loads(zlib.decompress(item["info_z"]["B"]))
    return json.loads(item.get("info", {}).get("S") or "{}")


def _entry(item: dict[str, Any]) -> Entry:
    return Entry(
        key=item["key"]["S"],
        function=item["function"]["S"],
        status=item["status"]["S"],
        owner=item.get("owner", {}).get("S"),
        expires_at=_num(item, "expires_at"),
        attempts=int(_num(item, "attempts") or 0),
        created_at=_num(item, "created_at") or 0.0,
        updated_at=_num(item, "updated_at") or 0.0,
        info=_decode_info(item),
    )
