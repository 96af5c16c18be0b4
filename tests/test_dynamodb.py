"""What the DynamoDB ledger and tables do beyond their contracts (tests/contract).

The tables they create (on-demand, indexes, TTL), claims racing from many
threads, large ``info`` records, the day index behind ``entries_since``,
numbers and nesting in table items, a table in a pipeline run, and the one
clear error for a wrong URL. All against moto, reset before each test.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from sluiceway import Pipeline, Runtime
from sluiceway.errors import ConfigError, SluicewayError
from sluiceway.ledger import Claim
from sluiceway.tables.base import MissingKey

from .aws_backend import client, dynamodb_url, fresh_prefix, sqs_url
from .services import free_port

pytest.importorskip("boto3")


def ledger(aws: str, prefix: str = "p-", **options: str) -> Any:
    from sluiceway.ledgers.dynamodb import DynamoLedger

    return DynamoLedger.from_url(dynamodb_url(aws, prefix, **options), "pipe")


def table(aws: str, name: str = "customers", key: tuple[str, ...] = ("id",)) -> Any:
    from sluiceway.tables.dynamodb import DynamoTable

    return DynamoTable.from_url(dynamodb_url(aws, "p-"), name, list(key), "pipe")


def test_the_ledger_creates_its_tables_on_demand_with_indexes_and_ttl(aws: str) -> None:
    led = ledger(aws)
    ddb = client("dynamodb", aws)
    entries = ddb.describe_table(TableName="p-pipe-ledger-entries")["Table"]
    assert entries["BillingModeSummary"]["BillingMode"] == "PAY_PER_REQUEST"
    assert sorted(i["IndexName"] for i in entries["GlobalSecondaryIndexes"]) == [
        "by_day",
        "by_function",
        "by_identity",
    ]
    assert ddb.describe_table(TableName="p-pipe-ledger-objects")["Table"]["KeySchema"] == [
        {"AttributeName": "object", "KeyType": "HASH"},
        {"AttributeName": "etag", "KeyType": "RANGE"},
    ]
    ttl = ddb.describe_time_to_live(TableName="p-pipe-ledger-sent")["TimeToLiveDescription"]
    assert (ttl["TimeToLiveStatus"], ttl["AttributeName"]) == ("ENABLED", "expires")
    ledger(aws).close()  # a second start finds them and changes nothing
    led.close()


def test_sent_ttl_lets_dynamodb_expire_sent_ids(aws: str) -> None:
    led = ledger(aws, sent_ttl="1h")
    led.mark_sent(["a"])
    item = client("dynamodb", aws).get_item(TableName="p-pipe-ledger-sent", Key={"id": {"S": "a"}})
    assert float(item["Item"]["expires"]["N"]) == pytest.approx(time.time() + 3600, abs=60)
    with pytest.raises(ConfigError, match="sent_ttl"):
        ledger(aws, sent_ttl="soon")


def test_one_claim_wins_across_ledger_instances(aws: str) -> None:
    # Sequential on purpose: moto's server is threaded and its DynamoDB has no
    # locks, so truly concurrent conditional writes can both pass there (real
    # DynamoDB serialises writes to one item). What moto can check: every
    # instance sees the one claim, whoever holds it.
    leds = [ledger(aws) for _ in range(2)]
    results = [
        leds[i % 2].claim("fn|b/k@e", function="fn", owner=f"w{i}", ttl=60) for i in range(8)
    ]
    assert results == [Claim.ACQUIRED] + [Claim.BUSY] * 7
    entry = leds[1].get("fn|b/k@e")
    assert entry is not None and entry.owner == "w0" and entry.attempts == 1
    assert not leds[1].extend("fn|b/k@e", owner="w1", ttl=60)
    leds[1].complete("fn|b/k@e", owner="w0", info={"ok": True})
    assert leds[0].claim("fn|b/k@e", function="fn", owner="w9", ttl=60) is Claim.DONE


def test_large_info_is_compressed_and_comes_back_whole(aws: str) -> None:
    led = ledger(aws)
    outputs = [
        {"bucket": "lake", "key": f"part/{i:06d}/data.parquet", "rows": i} for i in range(6000)
    ]
    led.claim("fn|big", function="fn", owner="w", ttl=60)
    led.complete("fn|big", owner="w", info={"outputs": outputs})
    raw = client("dynamodb", aws).get_item(
        TableName="p-pipe-ledger-entries", Key={"key": {"S": "fn|big"}}
    )
    assert "info_z" in raw["Item"] and "info" not in raw["Item"]
    assert led.get("fn|big").info["outputs"] == outputs  # type: ignore[union-attr]
    assert [info["outputs"][-1] for _, info in led.done_infos()] == [outputs[-1]]


def test_entries_since_and_for_by_index_and_by_scan(aws: str) -> None:
    led = ledger(aws)
    before = time.time()
    for fn in ("a", "b"):
        led.claim(f"{fn}|bucket/x@1", function=fn, owner="w", ttl=60)
        led.complete(f"{fn}|bucket/x@1", owner="w", info={})
    led.claim("a|bucket/y@1", function="a", owner="w", ttl=60)
    recent = [e.key for e in led.entries_since(before - 1)]  # one day partition
    everything = [e.key for e in led.entries_since(0)]  # a scan
    assert recent == everything == ["a|bucket/x@1", "b|bucket/x@1", "a|bucket/y@1"]
    assert led.entries_since(time.time() + 5) == []
    assert [e.function for e in led.entries_for("bucket/x@1")] == ["a", "b"]
    assert led.function_counts() == {"a": {"done": 1, "in_progress": 1}, "b": {"done": 1}}


def test_unreachable_endpoint_is_one_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    from sluiceway.aws_clients import AwsUnavailable

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    url = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(AwsUnavailable) as e:
        ledger(url)
    assert f"dynamodb://?endpoint_url={url}" in str(e.value) and "DescribeTable" in str(e.value)
    from sluiceway.ledgers.dynamodb import DynamoLedger

    with pytest.raises(ConfigError, match="credentials never go in the URL") as bad:
        DynamoLedger.from_url("dynamodb://AKIA:s3cret@?region=us-east-1", "pipe")
    assert "s3cret" not in str(bad.value)
    with pytest.raises(ConfigError, match="unknown option 'prefix'"):
        DynamoLedger.from_url("dynamodb://?prefix=x", "pipe")


def test_items_are_native_attributes_and_numbers_round_trip(aws: str) -> None:
    t = table(aws, "orders", ("customer", "order"))
    item = {
        "customer": "c1",
        "order": 7,
        "small": 0.1,
        "tiny": 1e-7,
        "big": 10**30,
        "negative": -2.5,
        "flags": [True, False, None],
        "nested": {"list": [1, 2.25, {"deep": "ü"}], "empty": ""},
    }
    t.upsert([item])
    assert t.get("c1", 7) == item
    raw = client("dynamodb", aws).get_item(
        TableName="p-pipe-table-orders", Key={"_pk": {"S": '["c1",7]'}}
    )["Item"]
    assert raw["order"] == {"N": "7"} and raw["nested"]["M"]["empty"] == {"S": ""}
    with pytest.raises(SluicewayError, match=r"item\.bad"):
        t.upsert([{"customer": "c2", "order": 1, "bad": float("nan")}])
    with pytest.raises(SluicewayError, match="_pk"):
        t.upsert([{"customer": "c2", "order": 1, "_pk": "x"}])
    with pytest.raises(MissingKey):
        t.upsert([{"customer": "c3"}])
    assert t.count() == 1


def test_big_upserts_are_batched_and_the_last_item_of_a_key_wins(aws: str) -> None:
    t = table(aws)
    items = [{"id": i % 40, "v": i} for i in range(60)]  # 60 items, 40 keys
    assert t.upsert(items) == 60
    assert t.count() == 40
    assert t.get(5) == {"id": 5, "v": 45} and t.get(39) == {"id": 39, "v": 39}
    assert len(list(t.scan(limit=7))) == 7
    assert sorted(i["id"] for i in t.scan()) == list(range(40))
    assert table(aws, "customers").get("5") is None  # "5" and 5 are different keys


PIPELINE = """
pipeline: ddb-e2e
buckets:
  bronze: ./bronze
tables:
  customers: {key: [id]}
queues:
  work: {visibility_timeout: 10s, max_receive_count: 3, backoff_base: 0.01s, backoff_max: 0.05s}
rules:
  - name: csv
    pattern: {detail: {bucket: {name: [bronze]}, object: {key: [{suffix: .csv}]}}}
    targets: [work]
functions:
  load:
    queue: work
    steps:
      - read_csv: {columns: {id: int, amount: float}}
      - write_table: {table: customers}
"""


def test_a_pipeline_upserts_rows_into_a_dynamodb_table(
    aws: str,
    write_pipeline: Callable[..., Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("SLUICEWAY_PROFILE", "aws")
    prefix = fresh_prefix()
    url = dynamodb_url(aws, prefix)
    profile = (
        f'\nprofiles:\n  aws:\n    broker: "{sqs_url(aws, prefix)}"\n'
        f'    ledger: "{url}"\n    tables: "{url}"\n'
    )
    path = write_pipeline(PIPELINE + profile)
    (tmp_path / "bronze").mkdir()
    (tmp_path / "bronze" / "a.csv").write_text("id,name,amount\n1,Ana,1.5\n2,Zoë,-3\n")
    (tmp_path / "bronze" / "b.csv").write_text("id,name,amount\n2,Zoë B.,4.25\n3,Li,0\n")

    summary = Runtime(path, workers=0, watch=False, profile="aws").drain(timeout=60)

    assert summary.done == 2
    p = Pipeline.from_file(path, profile="aws")
    t = p.tables["customers"]
    assert type(t).__name__ == "DynamoTable" and t.count() == 3
    assert t.get(1) == {"id": 1, "name": "Ana", "amount": 1.5}
    assert t.get(2)["name"] in ("Zoë", "Zoë B.")  # type: ignore[index]
    p.broker.close()
    p.ledger.close()
    p.close()
