"""`sluiceway deploy terraform`: the module parses, and wires and limits what it should.

No terraform binary and no registry: the generated files are parsed with
python-hcl2 and the resources, their wiring and the IAM policies are checked
in the parsed form.
"""

from __future__ import annotations

import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

import sluiceway
from sluiceway import Pipeline
from sluiceway.aws.terraform import build_plan, dynamo_layouts, hcl, quote, write_module
from sluiceway.cli import app

hcl2 = pytest.importorskip("hcl2", reason="python-hcl2 (pip install -e '.[dev]')")

ROOT = Path(__file__).resolve().parents[1]

RICH = """
pipeline: shop
buckets:
  bronze: ./bronze
  staging: ./staging
  gold: ./gold
  audit: ./audit
topics:
  landed: {subscriptions: [to-parquet, to-table]}
  rows: {subscriptions: [row-events]}
queues:
  to-parquet: {visibility_timeout: 30s, max_receive_count: 4}
  to-table: {max_receive_count: 2}
  row-events: {}
  audits: {}
streams:
  clicks: {}
tables:
  customers: {key: [customer_id]}
rules:
  - name: new-csv
    pattern:
      detail-type: [Object Created]
      detail:
        bucket: {name: [bronze]}
        object: {key: [{prefix: in/}, {suffix: .csv}]}
    targets: [landed]
  - name: audit-everything
    pattern:
      source: [sluiceway.bucket]
      detail-type: [Object Created, Object Deleted]
    targets: [audits]
functions:
  csv-to-parquet:
    queue: to-parquet
    timeout: 2m
    batch_size: 5
    steps:
      - read_csv
      - validate: {schema: schema.yaml, on_invalid: quarantine}
      - write_parquet: {bucket: staging}
  csv-to-table:
    queue: to-table
    steps:
      - read_csv
      - write_table: {table: customers}
      - publish_json: {topic: rows}
  audit:
    queue: audits
    timeout: 30m
    handler: aws-tf-audit
  clicks-to-lake:
    stream: clicks
    steps:
      - write_dataset: {bucket: gold, prefix: clicks, partition_by: [event_name]}
profiles:
  aws:
    buckets:
      bronze: s3://acme-lake/bronze
      staging: s3://acme-lake/staging
      gold: s3://acme-gold
    broker: sqs://?region=eu-west-1&prefix=shop-prod-
    ledger: dynamodb://?region=eu-west-1&table_prefix=prod-
    tables: dynamodb://?region=eu-west-1&table_prefix=prod-
"""

SCHEMA = """
columns:
  customer_id: {type: int, required: true}
  name: string
"""


@sluiceway.handler("aws-tf-audit")
def _audit(event: sluiceway.Event, ctx: sluiceway.StepContext) -> None:
    pass


def parse(directory: Path) -> dict[str, Any]:
    """Every .tf file of a module, merged: {"resource": {type: {name: body}}, …}."""
    options = hcl2.SerializationOptions(
        strip_string_quotes=True, explicit_blocks=False, with_comments=False
    )
    merged: dict[str, Any] = {"resource": {}, "data": {}, "variable": {}, "output": {}}
    for path in sorted(directory.glob("*.tf")):
        with path.open() as f:
            doc = hcl2.load(f, serialization_options=options)
        for kind in ("resource", "data"):
            for entry in doc.get(kind, []):
                for type_, named in entry.items():
                    merged[kind].setdefault(type_, {}).update(named)
        for kind in ("variable", "output"):
            for entry in doc.get(kind, []):
                merged[kind].update(entry)
        for kind in ("terraform", "provider", "locals"):
            if kind in doc:
                merged.setdefault(kind, []).extend(doc[kind])
    return merged


def statements(doc: dict[str, Any], name: str) -> dict[str, dict[str, Any]]:
    return {s.get("sid", ""): s for s in doc["data"]["aws_iam_policy_document"][name]["statement"]}


@pytest.fixture
def rich(write_pipeline: Callable[..., Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.delenv("SLUICEWAY_PROFILE", raising=False)
    (tmp_path / "schema.yaml").write_text(SCHEMA)
    path = write_pipeline(textwrap.dedent(RICH))
    pipeline = Pipeline.from_file(path, profile="aws")
    plan, _ = write_module(pipeline.config, tmp_path / "infra")
    yield plan, parse(tmp_path / "infra")
    pipeline.close()


@pytest.fixture
def example(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.delenv("SLUICEWAY_PROFILE", raising=False)
    pipeline = Pipeline.from_file(ROOT / "examples/bronze-to-staging/sluiceway.yaml")
    plan, files = write_module(pipeline.config, tmp_path / "infra", region="eu-central-1")
    assert sorted(f.name for f in files) == ["main.tf", "outputs.tf", "variables.tf", "versions.tf"]
    yield plan, parse(tmp_path / "infra")
    pipeline.close()


# -- the example pipeline ------------------------------------------------------------------


def test_every_resource_kind_is_there(example: tuple[Any, dict[str, Any]]) -> None:
    _, doc = example
    res = doc["resource"]
    for type_, names in {
        "aws_s3_bucket": {"bronze", "staging", "artifacts"},
        "aws_s3_bucket_public_access_block": {"bronze", "staging", "artifacts"},
        "aws_s3_bucket_versioning": {"bronze", "staging"},
        "aws_s3_bucket_server_side_encryption_configuration": {"bronze", "staging"},
        "aws_s3_bucket_lifecycle_configuration": {"bronze", "staging"},
        "aws_s3_bucket_notification": {"bronze", "staging"},
        "aws_cloudwatch_event_rule": {"rule_new_csv"},
        "aws_cloudwatch_event_target": {"rule_new_csv_csv_landed"},
        "aws_sns_topic": {"csv_landed"},
        "aws_sns_topic_policy": {"csv_landed"},
        "aws_sns_topic_subscription": {"csv_landed_to_to_parquet"},
        "aws_sqs_queue": {"to_parquet", "to_parquet_dlq"},
        "aws_sqs_queue_policy": {"to_parquet"},
        "aws_lambda_function": {"csv_to_parquet"},
        "aws_lambda_event_source_mapping": {"csv_to_parquet"},
        "aws_cloudwatch_log_group": {"csv_to_parquet"},
        "aws_iam_role": {"csv_to_parquet"},
        "aws_iam_role_policy": {"csv_to_parquet", "csv_to_parquet_extra"},
        "aws_dynamodb_table": {"ledger_entries", "ledger_objects", "ledger_sent"},
    }.items():
        assert set(res.get(type_, {})) == names, type_
    assert doc["provider"][0]["aws"]["region"] == "${var.region}"
    assert "hashicorp/aws" in str(doc["terraform"])


def test_variables_and_outputs(example: tuple[Any, dict[str, Any]]) -> None:
    _, doc = example
    variables = doc["variable"]
    assert variables["region"]["default"] == "eu-central-1"
    assert variables["name_prefix"]["default"] == "bronze-to-staging-"
    assert variables["tags"]["type"] == "${map(string)}"
    assert variables["kms_key_arn"]["default"] is None
    assert variables["maximum_concurrency"]["validation"]
    outputs = doc["output"]
    assert outputs["bucket_names"]["value"] == {
        "bronze": "${aws_s3_bucket.bronze.bucket}",
        "staging": "${aws_s3_bucket.staging.bucket}",
    }
    assert outputs["queue_urls"]["value"] == {"to-parquet": "${aws_sqs_queue.to_parquet.url}"}
    assert outputs["dead_letter_queue_urls"]["value"] == {
        "to-parquet-dlq": "${aws_sqs_queue.to_parquet_dlq.url}"
    }


def test_buckets_are_private_versioned_encrypted_and_tell_eventbridge(
    example: tuple[Any, dict[str, Any]],
) -> None:
    _, doc = example
    res = doc["resource"]
    pab = res["aws_s3_bucket_public_access_block"]["bronze"]
    assert all(pab[k] is True for k in ("block_public_acls", "block_public_policy"))
    assert all(pab[k] is True for k in ("ignore_public_acls", "restrict_public_buckets"))
    versioning = res["aws_s3_bucket_versioning"]["staging"]["versioning_configuration"]
    assert versioning[0]["status"] == "Enabled"
    sse = res["aws_s3_bucket_server_side_encryption_configuration"]["bronze"]["rule"][0]
    algorithm = sse["apply_server_side_encryption_by_default"][0]["sse_algorithm"]
    assert "AES256" in algorithm and "aws:kms" in algorithm  # SSE-S3, or SSE-KMS with a key
    rules = {r["id"]: r for r in res["aws_s3_bucket_lifecycle_configuration"]["staging"]["rule"]}
    rejects = rules["expire-rejects-staging"]
    assert rejects["filter"][0]["prefix"] == "_rejected/"
    assert rejects["expiration"][0]["days"] == "${var.rejects_retention_days}"
    assert res["aws_s3_bucket_notification"]["bronze"]["eventbridge"] is True
    deny = statements(doc, "bronze_bucket")["DenyInsecureTransport"]
    assert deny["effect"] == "Deny" and deny["condition"][0]["values"] == ["false"]


def test_rule_pattern_is_translated_to_aws(example: tuple[Any, dict[str, Any]]) -> None:
    _, doc = example
    patterns = doc["locals"][0]["event_patterns"]
    assert patterns["new-csv"] == {
        "detail-type": ["Object Created"],
        "source": ["aws.s3"],
        "detail": {
            "bucket": {"name": ['${local.bucket_names["bronze"]}']},
            "object": {"key": [{"suffix": ".csv"}]},
        },
    }
    rule = doc["resource"]["aws_cloudwatch_event_rule"]["rule_new_csv"]
    assert rule["event_pattern"] == '${jsonencode(local.event_patterns["new-csv"])}'
    assert rule["name"] == "${var.name_prefix}new-csv"


def test_fan_out_is_wired_rule_to_topic_to_queue(example: tuple[Any, dict[str, Any]]) -> None:
    _, doc = example
    res = doc["resource"]
    target = res["aws_cloudwatch_event_target"]["rule_new_csv_csv_landed"]
    assert target["arn"] == "${aws_sns_topic.csv_landed.arn}"
    assert target["rule"] == "${aws_cloudwatch_event_rule.rule_new_csv.name}"
    sub = res["aws_sns_topic_subscription"]["csv_landed_to_to_parquet"]
    assert sub["endpoint"] == "${aws_sqs_queue.to_parquet.arn}"
    assert sub["protocol"] == "sqs" and sub["raw_message_delivery"] is True
    # The topic takes events from exactly that rule; the queue from exactly that topic.
    topic = statements(doc, "csv_landed_topic")["EventBridgeRules"]
    assert topic["principals"][0]["identifiers"] == ["events.amazonaws.com"]
    assert topic["actions"] == ["sns:Publish"]
    assert topic["condition"][0]["values"] == ["${aws_cloudwatch_event_rule.rule_new_csv.arn}"]
    queue = statements(doc, "to_parquet_queue")
    assert set(queue) == {"SnsTopics"}
    assert queue["SnsTopics"]["condition"][0]["values"] == ["${aws_sns_topic.csv_landed.arn}"]


def test_queue_has_dlq_sse_and_long_enough_visibility(example: tuple[Any, dict[str, Any]]) -> None:
    _, doc = example
    queue = doc["resource"]["aws_sqs_queue"]["to_parquet"]
    lam = doc["resource"]["aws_lambda_function"]["csv_to_parquet"]
    assert queue["visibility_timeout_seconds"] >= 6 * lam["timeout"]
    assert queue["redrive_policy"].startswith("${jsonencode(")
    assert "aws_sqs_queue.to_parquet_dlq.arn" in queue["redrive_policy"]
    assert '"maxReceiveCount" = 3' in queue["redrive_policy"]
    assert "true" in queue["sqs_managed_sse_enabled"]
    assert queue["kms_master_key_id"] == "${var.kms_key_arn}"
    allow = doc["resource"]["aws_sqs_queue_redrive_allow_policy"]["to_parquet_dlq"]
    assert "aws_sqs_queue.to_parquet.arn" in allow["redrive_allow_policy"]


def test_lambda_and_its_event_source_mapping(example: tuple[Any, dict[str, Any]]) -> None:
    _, doc = example
    res = doc["resource"]
    lam = res["aws_lambda_function"]["csv_to_parquet"]
    assert "sluiceway.aws.handler.handler" in lam["handler"]
    assert lam["role"] == "${aws_iam_role.csv_to_parquet.arn}"
    env = lam["environment"][0]["variables"]
    assert env["SLUICEWAY_FUNCTION"] == "csv-to-parquet"
    assert env["SLUICEWAY_PIPELINE"] == "pipeline/sluiceway.yaml"
    assert env["SLUICEWAY_DLQ_URL"] == "${aws_sqs_queue.to_parquet_dlq.url}"
    assert env["SLUICEWAY_LEDGER"] == "${local.dynamodb_url}"
    assert "SLUICEWAY_DESTINATIONS" not in env  # it publishes nothing
    esm = res["aws_lambda_event_source_mapping"]["csv_to_parquet"]
    assert esm["event_source_arn"] == "${aws_sqs_queue.to_parquet.arn}"
    assert esm["function_name"] == "${aws_lambda_function.csv_to_parquet.arn}"
    assert esm["function_response_types"] == ["ReportBatchItemFailures"]
    assert esm["batch_size"] == 1
    assert esm["scaling_config"][0]["maximum_concurrency"] == "${var.maximum_concurrency}"
    logs = res["aws_cloudwatch_log_group"]["csv_to_parquet"]
    assert logs["retention_in_days"] == "${var.log_retention_days}"
    assert (
        lam["logging_config"][0]["log_group"] == "${aws_cloudwatch_log_group.csv_to_parquet.name}"
    )


def test_ledger_tables_match_the_dynamodb_backend(example: tuple[Any, dict[str, Any]]) -> None:
    _, doc = example
    tables = doc["resource"]["aws_dynamodb_table"]
    entries = tables["ledger_entries"]
    assert entries["name"] == "${var.table_prefix}bronze-to-staging-ledger-entries"
    assert entries["billing_mode"] == "PAY_PER_REQUEST"
    assert entries["hash_key"] == "key"
    assert entries["point_in_time_recovery"][0]["enabled"] is True
    indexes = {i["name"]: i for i in entries["global_secondary_index"]}
    assert indexes["by_function"]["hash_key"] == "function"
    assert indexes["by_function"]["range_key"] == "key"
    assert indexes["by_function"]["non_key_attributes"] == ["status"]
    assert set(indexes) == {"by_function", "by_identity", "by_day"}
    objects = tables["ledger_objects"]
    assert (objects["hash_key"], objects["range_key"]) == ("object", "etag")
    sent = tables["ledger_sent"]
    assert sent["ttl"][0] == {"attribute_name": "expires", "enabled": True}

    # The layout is the backend's own: its class is asked, not copied.
    layouts = {t.purpose: t for t in dynamo_layouts("p", {"c": ["id"]})}
    assert layouts["table"].name == "p-table-c" and layouts["table"].hash_key == "_pk"
    assert layouts["ledger-sent"].ttl_attribute == "expires"


def test_role_grants_only_what_the_function_uses(example: tuple[Any, dict[str, Any]]) -> None:
    _, doc = example
    st = statements(doc, "csv_to_parquet_role")
    assert st["ReadBronze"]["actions"] == ["s3:GetObject"]
    assert st["ReadBronze"]["resources"] == ["${aws_s3_bucket.bronze.arn}/*"]
    assert "s3:PutObject" in st["WriteStaging"]["actions"]
    assert st["WriteStaging"]["resources"] == ["${aws_s3_bucket.staging.arn}/*"]
    assert st["ConsumeOwnQueue"]["resources"] == ["${aws_sqs_queue.to_parquet.arn}"]
    assert st["DeadLetters"] == {
        "sid": "DeadLetters",
        "effect": "Allow",
        "actions": ["sqs:SendMessage"],
        "resources": ["${aws_sqs_queue.to_parquet_dlq.arn}"],
    }
    # Nothing writes to bronze, nothing is granted on every resource (the start-up
    # probe is DescribeTable on the ledger's own tables).
    for sid, s in st.items():
        assert "*" not in s["resources"], sid
        assert not any(a.endswith(":*") for a in s["actions"]), sid
        if "bronze" in str(s["resources"]):
            assert set(s["actions"]) <= {"s3:GetObject", "s3:ListBucket"}, sid
    assert "DynamoProbe" not in st
    assert "dynamodb:DescribeTable" in st["LedgerEntries"]["actions"]
    # Sent ids are read and written only by functions that publish.
    assert st["LedgerSent"]["actions"] == ["dynamodb:DescribeTable", "dynamodb:DescribeTimeToLive"]


# -- a richer pipeline ----------------------------------------------------------------------


def test_profile_names_prefixes_and_shared_buckets(rich: tuple[Any, dict[str, Any]]) -> None:
    _, doc = rich
    variables = doc["variable"]
    assert variables["name_prefix"]["default"] == "shop-prod-"  # the sqs:// prefix
    assert variables["table_prefix"]["default"] == "prod-"
    assert variables["region"]["default"] == "eu-west-1"
    assert variables["bucket_names"]["default"] == {"bronze": "acme-lake", "gold": "acme-gold"}
    # bronze and staging share one S3 bucket, under their prefixes.
    assert set(doc["resource"]["aws_s3_bucket"]) == {"bronze", "gold", "audit", "artifacts"}
    urls = doc["locals"][0]["bucket_urls"]
    assert urls["bronze"] == "s3://${aws_s3_bucket.bronze.bucket}/bronze"
    assert urls["staging"] == "s3://${aws_s3_bucket.bronze.bucket}/staging"
    life = doc["resource"]["aws_s3_bucket_lifecycle_configuration"]["bronze"]["rule"]
    prefixes = sorted(r["filter"][0].get("prefix", "") for r in life)
    assert prefixes == ["", "bronze/_rejected/", "staging/_rejected/"]


def test_rich_patterns(rich: tuple[Any, dict[str, Any]]) -> None:
    plan, doc = rich
    patterns = doc["locals"][0]["event_patterns"]
    new_csv = patterns["new-csv"]
    # The bucket's key prefix goes in front of key matches; suffixes stay.
    assert new_csv["detail"]["object"]["key"] == [{"prefix": "bronze/in/"}, {"suffix": ".csv"}]
    audit = patterns["audit-everything"]
    assert audit["source"] == ["aws.s3"]  # sluiceway.bucket on AWS
    # No bucket named: only the pipeline's buckets, not every bucket of the account.
    assert audit["detail"]["bucket"]["name"] == [
        '${local.bucket_names["bronze"]}',
        '${local.bucket_names["gold"]}',
        '${local.bucket_names["audit"]}',
    ]
    assert any("different key prefixes" in w for w in plan.warnings)


def test_rich_roles(rich: tuple[Any, dict[str, Any]]) -> None:
    _, doc = rich
    parquet = statements(doc, "csv_to_parquet_role")
    # Reads bronze (under its prefix), writes staging (the sink, and its rejects).
    assert parquet["ReadBronze"]["resources"] == ["${aws_s3_bucket.bronze.arn}/bronze/*"]
    assert parquet["ListBronze"]["condition"][0]["values"] == ["bronze/*"]
    assert parquet["WriteStaging"]["resources"] == ["${aws_s3_bucket.bronze.arn}/staging/*"]
    assert not any(s.startswith("Table") for s in parquet)
    table = statements(doc, "csv_to_table_role")
    assert table["TableCustomers"]["actions"] == [
        "dynamodb:DescribeTable",
        "dynamodb:BatchWriteItem",
    ]
    assert table["TableCustomers"]["resources"] == ["${aws_dynamodb_table.table_customers.arn}"]
    assert table["PublishToRows"] == {
        "sid": "PublishToRows",
        "effect": "Allow",
        "actions": ["sns:Publish"],
        "resources": ["${aws_sns_topic.rows.arn}"],
    }
    assert "dynamodb:BatchWriteItem" in table["LedgerSent"]["actions"]  # it publishes
    assert not any(s.startswith("Write") for s in table)
    env = doc["resource"]["aws_lambda_function"]["csv_to_table"]["environment"][0]["variables"]
    assert "aws_sns_topic.rows.arn" in env["SLUICEWAY_DESTINATIONS"]
    assert env["SLUICEWAY_TABLES"] == "${local.dynamodb_url}"
    # The audit handler is routed every bucket's events: it may read them, not write.
    audit = statements(doc, "audit_role")
    reads = {s for s in audit if s.startswith("Read")}
    assert reads == {"ReadBronze", "ReadStaging", "ReadGold", "ReadAudit"}
    assert not any(s.startswith("Write") for s in audit)


def test_rich_functions_queues_and_tables(rich: tuple[Any, dict[str, Any]]) -> None:
    _, doc = rich
    res = doc["resource"]
    assert set(res["aws_lambda_function"]) == {
        "csv_to_parquet",
        "csv_to_table",
        "audit",
        "clicks_to_lake",  # a stream function, from the clicks stream
    }
    assert set(res["aws_kinesis_stream"]) == {"clicks"}
    assert res["aws_lambda_function"]["audit"]["timeout"] == 900  # Lambda's maximum
    assert res["aws_lambda_event_source_mapping"]["csv_to_parquet"]["batch_size"] == 5
    queues = res["aws_sqs_queue"]
    assert queues["to_parquet"]["visibility_timeout_seconds"] == 720  # 6 × 2m
    assert queues["audits"]["visibility_timeout_seconds"] == 5400
    assert queues["row_events"]["visibility_timeout_seconds"] == 60  # no Lambda: as the file
    # Rules send straight to the audits queue: EventBridge may, and only that rule.
    audits = statements(doc, "audits_queue")
    assert audits["EventBridgeRules"]["condition"][0]["values"] == [
        "${aws_cloudwatch_event_rule.rule_audit_everything.arn}"
    ]
    assert "aws_dynamodb_table" in res and "table_customers" in res["aws_dynamodb_table"]
    customers = res["aws_dynamodb_table"]["table_customers"]
    assert customers["name"] == "${var.table_prefix}shop-table-customers"
    assert customers["hash_key"] == "_pk"


def test_names_aws_refuses_are_reported(write_pipeline: Callable[..., Path]) -> None:
    path = write_pipeline(
        """
        pipeline: p
        queues: {a.b: {}}
        functions: {f: {queue: a.b, handler: aws-tf-audit}}
        """
    )
    pipeline = Pipeline.from_file(path)
    with pytest.raises(sluiceway.ConfigError, match=r"queue 'a\.b'"):
        build_plan(pipeline.config)
    pipeline.close()


def test_hcl_values() -> None:
    assert quote('a "b" ${c} %{d}\n') == '"a \\"b\\" $${c} %%{d}\\n"'
    assert hcl({"k": [1, True, None, "x"]}) == '{\n  "k" = [1, true, null, "x"]\n}'


def test_deploy_terraform_command(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("SLUICEWAY_PROFILE", raising=False)
    example = ROOT / "examples/bronze-to-staging/sluiceway.yaml"
    args = ["deploy", "terraform", "--pipeline", str(example), "--out", "infra"]
    result = CliRunner().invoke(app, [*args, "--region", "eu-west-1"])
    assert result.exit_code == 0, result.output
    assert "1 functions" in result.output and "terraform -chdir=infra" in result.output
    doc = parse(tmp_path / "infra")
    assert doc["variable"]["lambda_zip"]["default"] == "../dist/sluiceway-lambda.zip"
    assert doc["variable"]["region"]["default"] == "eu-west-1"


# -- a stream function: Kinesis → Lambda → S3 (examples/events-to-lake, unchanged) ---------


@pytest.fixture
def lake(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.delenv("SLUICEWAY_PROFILE", raising=False)
    pipeline = Pipeline.from_file(ROOT / "examples/events-to-lake/sluiceway.yaml")
    plan, _ = write_module(pipeline.config, tmp_path / "infra", region="eu-central-1")
    yield plan, parse(tmp_path / "infra")
    pipeline.close()


def test_stream_function_gets_a_kinesis_stream_and_its_mapping(
    lake: tuple[Any, dict[str, Any]],
) -> None:
    plan, doc = lake
    res = doc["resource"]
    assert not plan.warnings
    assert set(res["aws_lambda_function"]) == {"to_lake"}
    [stream] = res["aws_kinesis_stream"].values()
    assert stream["name"] == "${var.name_prefix}events"
    assert stream["retention_period"] == 168  # the file's 7d, in hours
    assert stream["encryption_type"] == "KMS"
    assert "alias/aws/kinesis" in stream["kms_key_id"]
    assert stream["stream_mode_details"][0]["stream_mode"] == "${var.kinesis_stream_mode}"
    assert "var.kinesis_shard_count" in stream["shard_count"]
    assert doc["variable"]["kinesis_stream_mode"]["default"] == "ON_DEMAND"

    esm = res["aws_lambda_event_source_mapping"]["to_lake"]
    assert esm["event_source_arn"] == "${aws_kinesis_stream.events.arn}"
    assert esm["function_name"] == "${aws_lambda_function.to_lake.arn}"
    assert esm["starting_position"] == "TRIM_HORIZON"
    # One batch is one flush: the sink's flush_records: 10000 and flush_seconds: 60s.
    assert (esm["batch_size"], esm["maximum_batching_window_in_seconds"]) == (10000, 60)
    assert esm["function_response_types"] == ["ReportBatchItemFailures"]
    assert esm["bisect_batch_on_function_error"] is True
    assert esm["parallelization_factor"] == 1
    assert esm["maximum_retry_attempts"] == "${var.stream_maximum_retry_attempts}"
    failed = esm["destination_config"][0]["on_failure"][0]["destination_arn"]
    assert failed == "${aws_sqs_queue.to_lake_failed.arn}"
    queue = res["aws_sqs_queue"]["to_lake_failed"]
    assert queue["sqs_managed_sse_enabled"] and "redrive_policy" not in queue
    assert "to_lake_failed" not in res.get("aws_sqs_queue_redrive_allow_policy", {})

    env = res["aws_lambda_function"]["to_lake"]["environment"][0]["variables"]
    assert env["SLUICEWAY_FUNCTION"] == "to-lake"
    assert env["SLUICEWAY_LEDGER"] == "${local.dynamodb_url}"
    assert env["SLUICEWAY_DLQ_URL"] == "${aws_sqs_queue.to_lake_failed.url}"
    assert doc["output"]["stream_names"]["value"] == {"events": "${aws_kinesis_stream.events.name}"}

    # The dedup and checkpoint table: the layout aws/streams.py creates.
    table = res["aws_dynamodb_table"]["stream_state"]
    assert table["name"] == "${var.table_prefix}events-to-lake-stream-state"
    assert table["billing_mode"] == "PAY_PER_REQUEST" and table["hash_key"] == "id"
    assert table["ttl"][0] == {"attribute_name": "expires", "enabled": True}
    assert table["point_in_time_recovery"][0]["enabled"] is True


def test_stream_function_role_is_least_privilege(lake: tuple[Any, dict[str, Any]]) -> None:
    _, doc = lake
    role = statements(doc, "to_lake_role")
    assert set(role) == {
        "Logs",
        "ReadStream",
        "Failures",
        "WriteLake",
        "ListLake",
        "StreamState",
        "LedgerEntries",
        "LedgerObjects",
        "LedgerSent",
    }
    read = role["ReadStream"]
    assert read["resources"] == ["${aws_kinesis_stream.events.arn}"]
    assert set(read["actions"]) == {
        "kinesis:DescribeStream",
        "kinesis:DescribeStreamSummary",
        "kinesis:GetRecords",
        "kinesis:GetShardIterator",
        "kinesis:ListShards",
    }
    assert role["Failures"] == {
        "sid": "Failures",
        "effect": "Allow",
        "actions": ["sqs:SendMessage"],
        "resources": ["${aws_sqs_queue.to_lake_failed.arn}"],
    }
    # Only under the dataset's prefix of the lake bucket.
    assert role["WriteLake"]["resources"] == ["${aws_s3_bucket.lake.arn}/events/*"]
    assert "s3:PutObject" in role["WriteLake"]["actions"]
    assert role["ListLake"]["condition"][0]["values"] == ["events/*"]
    state = role["StreamState"]
    assert state["resources"] == ["${aws_dynamodb_table.stream_state.arn}"]
    assert "dynamodb:PutItem" in state["actions"] and "dynamodb:Scan" not in state["actions"]
    every = {a for s in role.values() for a in s["actions"]}
    assert not {a for a in every if a.startswith("sqs:Receive") or a == "kinesis:PutRecords"}
    # Nothing on "*".
    assert [s for s, body in role.items() if "*" in body["resources"]] == []
