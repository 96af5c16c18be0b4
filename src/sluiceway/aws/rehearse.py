"""``sluiceway deploy rehearse``: the AWS deployment, end to end, against an AWS-compatible API.

It creates what ``sluiceway deploy terraform`` would (the same :class:`Plan
<sluiceway.aws.terraform.Plan>`, through boto3): buckets with EventBridge
notifications, versioning, encryption, lifecycle and public access blocked;
DynamoDB tables for the ledger and the pipeline's tables; queues with their
DLQs and policies; topics and subscriptions; EventBridge rules and targets;
the functions' IAM roles and log groups. Then it puts the given files into
their buckets and plays Lambda's event source mapping: it receives what
arrives in each function's queue, invokes the handler in this process with
an SQS event of those messages, deletes the messages the handler did not
report as failed, and goes on until everything has settled (outputs raise
events of their own, so chained functions run too). Last, it checks: every
input finished in the ledger, every output object is there (Parquet read back
and its rows counted), the tables have their items, the DLQs are empty, and
the resources have the settings the plan gave them.

Stream functions (Kinesis → Lambda → S3): the rehearsal creates the Kinesis
stream (two provisioned shards, so events spread), the stream-state table
and the failure queue, puts the given JSON Lines events with PutRecords
(partition key: the dedup key, as producers should), reads each shard back
with GetShardIterator/GetRecords in batches of the mapping's size and invokes
the handler with Kinesis events shaped as the mapping delivers them, going on
from the first failed record when it reports one. Each batch is delivered
again after it succeeded, whole and bisected, as Lambda does when an
invocation's answer is lost (the lake must not change), and each shard's
first invocation runs out of time (the handler must name its first record,
from where the batch is read again). Last it reads the
dataset back: every event exactly once, the duplicates dropped, the failure
queue empty.

What it does not do: create Lambda functions and event source mappings (the
handler runs here, so the test needs no container runtime) or enforce IAM
(emulators do not).

Where the endpoint does not deliver an event the way AWS would (moto
delivers S3 → EventBridge → SQS, but not EventBridge → SNS), the rehearsal
falls back after ``deliver_wait`` seconds: it builds the EventBridge event
from the object (HEAD) and publishes it to the rule's topic, or sends it to
the rule's queue, itself. Each fallback is listed in the report, so a
rehearsal against real AWS (or an endpoint that delivers everything) shows
none.
"""

from __future__ import annotations

import base64
import contextlib
import io
import json
import logging
import tempfile
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from ..config import PipelineConfig
from ..events import object_created
from ..router import Router
from ..steps import STEPS, parse_step
from ..steps.dedup import DedupOptions
from .handler import LambdaApp, _NoBroker, load_pipeline
from .terraform import (
    RETENTION,
    Plan,
    Ref,
    build_plan,
    policy_json,
    resolve,
)

log = logging.getLogger("sluiceway.aws.rehearse")

ACCOUNT = "123456789012"  # what emulators answer; AWS's own ARNs carry the real one
SHARDS = 2  # Kinesis shards of a rehearsal's streams
PUT_RECORDS_MAX = 500  # records per PutRecords call


@dataclass
class Check:
    name: str
    ok: bool
    detail: str = ""


@dataclass
class RehearsalReport:
    """What was created, what ran, what fell back, and what was checked."""

    endpoint: str
    prefix: str
    created: list[str] = field(default_factory=list)
    fallbacks: list[str] = field(default_factory=list)
    invocations: list[dict[str, Any]] = field(default_factory=list)
    checks: list[Check] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return bool(self.checks) and all(c.ok for c in self.checks)

    def check(self, name: str, ok: bool, detail: str = "") -> None:
        self.checks.append(Check(name, bool(ok), detail))

    def to_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "endpoint": self.endpoint,
            "prefix": self.prefix,
            "created": self.created,
            "fallbacks": self.fallbacks,
            "invocations": self.invocations,
            "checks": [c.__dict__ for c in self.checks],
            "notes": self.notes,
            "seconds": round(self.seconds, 3),
        }


@dataclass
class _Expected:
    """An object whose event should reach some queues: an input put, or an output written."""

    s3_bucket: str
    key: str  # the S3 key
    event: dict[str, Any]  # the EventBridge event AWS would send for it
    queues: dict[str, str | None]  # pipeline queue → the topic it comes through (or None)
    since: float
    seen: set[str] = field(default_factory=set)
    fallen_back: set[str] = field(default_factory=set)


class Rehearsal:
    """One rehearsal: resources, drive, checks (see the module docstring)."""

    def __init__(
        self,
        path: Path,
        cfg: PipelineConfig,
        endpoint: str,
        *,
        region: str = "us-east-1",
        prefix: str | None = None,
        deliver_wait: float = 3.0,
        timeout: float = 120.0,
    ) -> None:
        self.path = path
        self.cfg = cfg
        self.endpoint = endpoint.rstrip("/")
        self.region = region
        self.prefix = prefix or f"rh{uuid.uuid4().hex[:6]}-"
        self.deliver_wait = deliver_wait
        self.timeout = timeout
        self.plan: Plan = build_plan(cfg, name_prefix=self.prefix, region=region)
        self.plan.table_prefix = self.prefix
        self.report = RehearsalReport(endpoint=self.endpoint, prefix=self.prefix)
        self.report.notes += self.plan.warnings
        self.refs: dict[tuple[str, str, str], str] = {}
        self.apps: dict[str, LambdaApp] = {}
        self.expected: list[_Expected] = []
        self.delivered_from: set[str] = set()  # buckets whose events the endpoint delivered
        self.events_put: dict[str, list[dict[str, Any]]] = {}  # stream → the events put
        self.replays: dict[str, list[str]] = {}  # stream function → replays that changed the lake
        self.not_events: dict[str, int] = {}  # stream function → records put that are no events
        self._scratch = tempfile.TemporaryDirectory(prefix="sluiceway-rehearse-")
        from ..aws_clients import session

        sess = session()
        self.clients = {
            name: sess.client(name, endpoint_url=self.endpoint, region_name=region)
            for name in ("s3", "sqs", "sns", "events", "dynamodb", "iam", "logs", "kinesis")
        }
        self.router = Router.from_config(cfg.rules, _NoBroker(), set(cfg.topics))

    # -- names and references ----------------------------------------------------------

    def bucket_name(self, label: str) -> str:
        return f"{self.prefix}{label}".lower().replace("_", "-")[:63]

    def lookup(self, ref: Ref) -> str:
        return self.refs[(ref.kind, ref.name, ref.attr)]

    def _resolve(self, value: Any) -> Any:
        return resolve(value, self.lookup, self.bucket_name)

    def _created(self, what: str) -> None:
        self.report.created.append(what)
        log.info("created %s", what)

    # -- resources ---------------------------------------------------------------------

    def create(self) -> None:
        """Every resource of the plan, in dependency order."""
        self._buckets()
        self._tables()
        self._queues()
        self._streams()
        self._topics()
        self._rules()
        self._policies()
        self._roles()
        self.report.notes.append(
            "Lambda functions and event source mappings are not created: the handler runs "
            "in this process with the messages the mapping would deliver"
        )

    def _buckets(self) -> None:
        s3 = self.clients["s3"]
        tls_only = urlsplit(self.endpoint).scheme == "https"
        for b in self.plan.buckets:
            name = self.bucket_name(b.label)
            kwargs: dict[str, Any] = {"Bucket": name}
            if self.region != "us-east-1":
                kwargs["CreateBucketConfiguration"] = {"LocationConstraint": self.region}
            s3.create_bucket(**kwargs)
            s3.put_public_access_block(
                Bucket=name,
                PublicAccessBlockConfiguration={
                    "BlockPublicAcls": True,
                    "IgnorePublicAcls": True,
                    "BlockPublicPolicy": True,
                    "RestrictPublicBuckets": True,
                },
            )
            s3.put_bucket_versioning(Bucket=name, VersioningConfiguration={"Status": "Enabled"})
            s3.put_bucket_encryption(
                Bucket=name,
                ServerSideEncryptionConfiguration={
                    "Rules": [{"ApplyServerSideEncryptionByDefault": {"SSEAlgorithm": "AES256"}}]
                },
            )
            rules = [
                {
                    "ID": f"expire-rejects-{member}",
                    "Status": "Enabled",
                    "Filter": {"Prefix": f"{prefix}_rejected/"},
                    "Expiration": {"Days": 30},
                }
                for member, prefix in b.members.items()
            ]
            rules.append(
                {
                    "ID": "old-versions-and-uploads",
                    "Status": "Enabled",
                    "Filter": {"Prefix": ""},
                    "NoncurrentVersionExpiration": {"NoncurrentDays": 30},
                    "AbortIncompleteMultipartUpload": {"DaysAfterInitiation": 7},
                }
            )
            s3.put_bucket_lifecycle_configuration(
                Bucket=name, LifecycleConfiguration={"Rules": rules}
            )
            if tls_only:
                s3.put_bucket_policy(Bucket=name, Policy=json.dumps(_deny_insecure(name)))
            s3.put_bucket_notification_configuration(
                Bucket=name, NotificationConfiguration={"EventBridgeConfiguration": {}}
            )
            for attr in ("bucket", "id"):
                self.refs[("bucket", b.label, attr)] = name
            self.refs[("bucket", b.label, "arn")] = f"arn:aws:s3:::{name}"
            self._created(f"S3 bucket {name} ({', '.join(b.members)})")
        if not tls_only:
            self.report.notes.append(
                "the TLS-only bucket policy is left out: the endpoint is plain http"
            )

    def _tables(self) -> None:
        ddb = self.clients["dynamodb"]
        for t in self.plan.tables:
            name = f"{self.plan.table_prefix}{t.name}"
            args: dict[str, Any] = {
                "TableName": name,
                "BillingMode": "PAY_PER_REQUEST",
                "KeySchema": [
                    {"AttributeName": a, "KeyType": role}
                    for a, role, _ in t.keys
                    if role in ("HASH", "RANGE")
                ],
                "AttributeDefinitions": [
                    {"AttributeName": a, "AttributeType": kind} for a, _, kind in t.keys
                ],
            }
            if t.indexes:
                args["GlobalSecondaryIndexes"] = t.indexes
            ddb.create_table(**args)
            ddb.get_waiter("table_exists").wait(
                TableName=name, WaiterConfig={"Delay": 1, "MaxAttempts": 60}
            )
            if t.ttl_attribute:
                ddb.update_time_to_live(
                    TableName=name,
                    TimeToLiveSpecification={"Enabled": True, "AttributeName": t.ttl_attribute},
                )
            ddb.update_continuous_backups(
                TableName=name,
                PointInTimeRecoverySpecification={"PointInTimeRecoveryEnabled": True},
            )
            arn = ddb.describe_table(TableName=name)["Table"]["TableArn"]
            self.refs[("table", t.label, "arn")] = arn
            self.refs[("table", t.label, "name")] = name
            self._created(f"DynamoDB table {name}")

    def _queues(self) -> None:
        sqs = self.clients["sqs"]
        order = sorted(self.plan.queues.values(), key=lambda q: not q.is_dlq)  # DLQs first
        for q in order:
            attrs = {
                "VisibilityTimeout": str(q.visibility_timeout),
                "MessageRetentionPeriod": str(RETENTION),
                "DelaySeconds": str(q.delay),
                "SqsManagedSseEnabled": "true",
            }
            if q.dead_letter_queue:
                attrs["RedrivePolicy"] = json.dumps(
                    {
                        "deadLetterTargetArn": self.refs[("queue", q.dead_letter_queue, "arn")],
                        "maxReceiveCount": q.max_receive_count,
                    }
                )
            if self.plan.fifo:
                attrs.update({"FifoQueue": "true", "ContentBasedDeduplication": "true"})
            name = self.plan.queue_name(q.name)
            url = sqs.create_queue(QueueName=name, Attributes=attrs)["QueueUrl"]
            arn = sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["QueueArn"])["Attributes"][
                "QueueArn"
            ]
            self.refs[("queue", q.name, "arn")] = arn
            self.refs[("queue", q.name, "url")] = url
            self.refs[("queue", q.name, "id")] = url
            self._created(f"SQS queue {name} (visibility {q.visibility_timeout}s)")

    def _streams(self) -> None:
        kinesis = self.clients["kinesis"]
        for st in self.plan.streams.values():
            name = f"{self.prefix}{st.name}"
            kinesis.create_stream(
                StreamName=name, ShardCount=SHARDS, StreamModeDetails={"StreamMode": "PROVISIONED"}
            )
            kinesis.get_waiter("stream_exists").wait(
                StreamName=name, WaiterConfig={"Delay": 1, "MaxAttempts": 60}
            )
            if st.retention_hours > 24:
                kinesis.increase_stream_retention_period(
                    StreamName=name, RetentionPeriodHours=st.retention_hours
                )
            kinesis.start_stream_encryption(
                StreamName=name, EncryptionType="KMS", KeyId="alias/aws/kinesis"
            )
            summary = kinesis.describe_stream_summary(StreamName=name)["StreamDescriptionSummary"]
            self.refs[("stream", st.name, "arn")] = summary["StreamARN"]
            self.refs[("stream", st.name, "name")] = name
            self._created(
                f"Kinesis stream {name} ({SHARDS} shards, {st.retention_hours}h, KMS) → "
                + ", ".join(st.consumers)
            )
        if self.plan.streams:
            self.report.notes.append(
                f"Kinesis streams are made with {SHARDS} provisioned shards (the module's "
                "default is on-demand) so that events spread over shards"
            )

    def _topics(self) -> None:
        sns = self.clients["sns"]
        for t in self.plan.topics.values():
            attrs = (
                {"FifoTopic": "true", "ContentBasedDeduplication": "true"} if self.plan.fifo else {}
            )
            arn = sns.create_topic(Name=self.plan.queue_name(t.name), Attributes=attrs)["TopicArn"]
            self.refs[("topic", t.name, "arn")] = arn
            for q in t.subscriptions:
                sns.subscribe(
                    TopicArn=arn,
                    Protocol="sqs",
                    Endpoint=self.refs[("queue", q, "arn")],
                    Attributes={"RawMessageDelivery": "true"},
                )
            self._created(f"SNS topic {arn.rsplit(':', 1)[-1]} → {', '.join(t.subscriptions)}")

    def _rules(self) -> None:
        events = self.clients["events"]
        for r in self.plan.rules:
            name = f"{self.prefix}{r.name}"[:64]
            pattern = self._resolve(r.pattern)
            arn = events.put_rule(Name=name, EventPattern=json.dumps(pattern))["RuleArn"]
            self.refs[("rule", r.name, "arn")] = arn
            targets = []
            for target in r.targets:
                kind = "topic" if target in self.plan.topics else "queue"
                entry: dict[str, Any] = {"Id": target[:64], "Arn": self.refs[(kind, target, "arn")]}
                if self.plan.fifo and kind == "queue":
                    entry["SqsParameters"] = {"MessageGroupId": r.name}
                targets.append(entry)
            events.put_targets(Rule=name, Targets=targets)
            self._created(f"EventBridge rule {name} → {', '.join(r.targets)}")

    def _policies(self) -> None:
        for q in self.plan.queues.values():
            statements = self.plan.queue_statements(q)
            if statements:
                self.clients["sqs"].set_queue_attributes(
                    QueueUrl=self.refs[("queue", q.name, "url")],
                    Attributes={"Policy": json.dumps(policy_json(statements, self.lookup))},
                )
        for t in self.plan.topics.values():
            statements = self.plan.topic_statements(t)
            if statements:
                self.clients["sns"].set_topic_attributes(
                    TopicArn=self.refs[("topic", t.name, "arn")],
                    AttributeName="Policy",
                    AttributeValue=json.dumps(policy_json(statements, self.lookup)),
                )

    def _roles(self) -> None:
        logs, iam = self.clients["logs"], self.clients["iam"]
        assume = {
            "Version": "2012-10-17",
            "Statement": [
                {
                    "Effect": "Allow",
                    "Principal": {"Service": "lambda.amazonaws.com"},
                    "Action": "sts:AssumeRole",
                }
            ],
        }
        functions: list[Any] = [*self.plan.functions.values(), *self.plan.stream_functions.values()]
        for f in functions:
            group = f"/aws/lambda/{self.prefix}{f.name}"
            logs.create_log_group(logGroupName=group)
            logs.put_retention_policy(logGroupName=group, retentionInDays=30)
            found = logs.describe_log_groups(logGroupNamePrefix=group)["logGroups"]
            arn = found[0].get("arn") or f"arn:aws:logs:{self.region}:{ACCOUNT}:log-group:{group}"
            self.refs[("log_group", f.name, "arn")] = arn.removesuffix(":*")
            role = f"{self.prefix}{f.name}"[:64]
            iam.create_role(RoleName=role, AssumeRolePolicyDocument=json.dumps(assume))
            statements = (
                self.plan.stream_function_statements(f)
                if f.name in self.plan.stream_functions
                else self.plan.function_statements(f)
            )
            policy = policy_json(statements, self.lookup)
            iam.put_role_policy(
                RoleName=role, PolicyName="sluiceway", PolicyDocument=json.dumps(policy)
            )
            self._created(
                f"IAM role {role} ({len(policy['Statement'])} statements), log group {group}"
            )

    # -- the functions, as Lambda would run them ---------------------------------------

    def _app(self, function: str) -> LambdaApp:
        if function not in self.apps:
            opts = f"endpoint_url={self.endpoint}&region={self.region}&path_style=true"
            buckets = {}
            for b in self.plan.buckets:
                for member, prefix in b.members.items():
                    path = f"/{prefix.rstrip('/')}" if prefix else ""
                    buckets[member] = f"s3://{self.bucket_name(b.label)}{path}?{opts}"
            dynamo = (
                f"dynamodb://?endpoint_url={self.endpoint}&region={self.region}"
                f"&table_prefix={self.plan.table_prefix}"
            )
            pipeline = load_pipeline(
                self.path,
                buckets=buckets,
                ledger=dynamo,
                tables=dynamo,
                state_dir=str(Path(self._scratch.name) / function),
            )
            if function in self.plan.stream_functions:
                dlq: str | None = self.plan.stream_functions[function].failures
                destinations = {}
            else:
                fn = self.plan.functions[function]
                dlq = self.plan.queues[fn.queue].dead_letter_queue
                destinations = {k: self.lookup(v) for k, v in self.plan.destinations(fn).items()}
            self.apps[function] = LambdaApp(
                pipeline,
                function=function,
                dlq_url=self.refs[("queue", dlq, "url")] if dlq else None,
                queue_prefix=self.prefix,
                destinations=destinations,
                sqs_client=self.clients["sqs"],
                sns_client=self.clients["sns"],
                worker_id=f"rehearsal:{function}",
            )
        return self.apps[function]

    def put(self, source: Path, bucket: str, key: str) -> None:
        """Put a local file where the pipeline bucket ``bucket`` keeps ``key``."""
        if bucket not in self.cfg.buckets:
            known = ", ".join(self.cfg.buckets)
            raise ValueError(f"unknown bucket {bucket!r} (buckets: {known})")
        s3b = self.plan.s3_of(bucket)
        real, s3_key = self.bucket_name(s3b.label), s3b.members[bucket] + key
        self.clients["s3"].put_object(Bucket=real, Key=s3_key, Body=source.read_bytes())
        self.report.created.append(f"put {source.name} → s3://{real}/{s3_key}")
        self._expect(bucket, key)

    def put_events(self, source: Path, stream: str) -> None:
        """Put a JSON Lines file's events into a stream with PutRecords, as a producer would.

        The partition key is the stream's dedup key (else the event name), so
        a re-sent event lands on the shard of its first copy, in order.
        """
        if stream not in self.plan.streams:
            known = ", ".join(self.plan.streams) or "none"
            raise ValueError(f"{stream!r} is no stream of a stream function (streams: {known})")
        key = self._dedup_key(stream) or "event_name"
        events = [json.loads(line) for line in source.read_text().splitlines() if line.strip()]
        name = self.refs[("stream", stream, "name")]
        kinesis = self.clients["kinesis"]
        for i in range(0, len(events), PUT_RECORDS_MAX):
            chunk = events[i : i + PUT_RECORDS_MAX]
            entries = [
                {
                    "Data": json.dumps(e, separators=(",", ":")).encode(),
                    "PartitionKey": str(e.get(key) if isinstance(e, dict) else "") or "-",
                }
                for e in chunk
            ]
            for _ in range(8):  # PutRecords may take part of a batch: send the rest again
                reply = kinesis.put_records(StreamName=name, Records=entries)
                if not reply.get("FailedRecordCount"):
                    break
                entries = [
                    e for e, r in zip(entries, reply["Records"], strict=True) if r.get("ErrorCode")
                ]
            else:
                raise RuntimeError(f"PutRecords to {name}: {len(entries)} records not taken")
        self.events_put.setdefault(stream, []).extend(events)
        self.report.created.append(f"put {len(events)} events of {source.name} → Kinesis {name}")

    def _dedup_key(self, stream: str) -> str | None:
        for function in self.plan.streams[stream].consumers:
            for raw in self.cfg.functions[function].steps:
                name, options = parse_step(raw)
                if name == "dedup":
                    opts = STEPS["dedup"].options(options)
                    assert isinstance(opts, DedupOptions)
                    return opts.key
        return None

    def _drive_streams(self, deadline: float) -> bool:
        """Each stream function reads each shard as its event source mapping would."""
        for sf in self.plan.stream_functions.values():
            kinesis = self.clients["kinesis"]
            name = self.refs[("stream", sf.stream, "name")]
            shards = kinesis.list_shards(StreamName=name)["Shards"]
            for shard in shards:
                if not self._drive_shard(sf, name, shard["ShardId"], deadline):
                    return False
        return True

    def _drive_shard(self, sf: Any, stream: str, shard: str, deadline: float) -> bool:
        kinesis = self.clients["kinesis"]
        arn = self.refs[("stream", sf.stream, "arn")]
        iterator = kinesis.get_shard_iterator(
            StreamName=stream, ShardId=shard, ShardIteratorType="TRIM_HORIZON"
        )["ShardIterator"]
        # The shard's first invocation runs out of time before it starts: the
        # handler must answer its first record, and the mapping read on from it.
        context: Any = _OutOfTime()
        while time.monotonic() < deadline:
            got = kinesis.get_records(ShardIterator=iterator, Limit=sf.batch_size)
            records = got.get("Records", [])
            if not records and not got.get("MillisBehindLatest"):
                return True  # caught up (nothing more is put while we read)
            if not records:  # an empty stretch of the shard: read on
                iterator = got["NextShardIterator"]
                continue
            event = {"Records": [self._kinesis_record(r, shard, arn, sf.name) for r in records]}
            result = self._app(sf.name).handle(event, context)
            failed = [f["itemIdentifier"] for f in result.response()["batchItemFailures"]]
            if context is not None:
                ok = failed == [records[0]["SequenceNumber"]]
                self.report.check(
                    f"{sf.name} on {shard}: an invocation out of time answers its first record",
                    ok,
                    f"batchItemFailures {failed}",
                )
                context = None
            self.report.invocations.append(
                {
                    "function": sf.name,
                    "messages": len(records),
                    "shard": shard,
                    "statuses": result.statuses(),
                    "failed": failed,
                }
            )
            if failed:  # Lambda checkpoints before the failed record and reads on from it
                iterator = kinesis.get_shard_iterator(
                    StreamName=stream,
                    ShardId=shard,
                    ShardIteratorType="AT_SEQUENCE_NUMBER",
                    StartingSequenceNumber=failed[0],
                )["ShardIterator"]
                time.sleep(0.2)
                continue
            self._replay(sf.name, event)
            iterator = got["NextShardIterator"]
        return False

    def _replay(self, function: str, event: dict[str, Any]) -> None:
        """Deliver a finished batch again, whole and halved: the lake must stay as it is."""
        before = self._lake_objects(function)
        records = event["Records"]
        for again in (records, records[: max(1, len(records) // 2)]):
            result = self._app(function).handle({"Records": again})
            if result.failures or set(result.statuses()) != {"duplicate"}:
                self.replays.setdefault(function, []).append(
                    f"{len(again)} records: {', '.join(result.statuses())}"
                )
        if self._lake_objects(function) != before:
            self.replays.setdefault(function, []).append("the replay changed the lake")

    def _kinesis_record(
        self, r: dict[str, Any], shard: str, arn: str, function: str
    ) -> dict[str, Any]:
        """A GetRecords record as Lambda's Kinesis event source mapping hands it over."""
        arrived = r["ApproximateArrivalTimestamp"]
        return {
            "kinesis": {
                "kinesisSchemaVersion": "1.0",
                "partitionKey": r["PartitionKey"],
                "sequenceNumber": r["SequenceNumber"],
                "data": base64.b64encode(r["Data"]).decode(),
                "approximateArrivalTimestamp": arrived.timestamp()
                if isinstance(arrived, datetime)
                else float(arrived),
            },
            "eventSource": "aws:kinesis",
            "eventVersion": "1.0",
            "eventID": f"{shard}:{r['SequenceNumber']}",
            "eventName": "aws:kinesis:record",
            "invokeIdentityArn": f"arn:aws:iam::{ACCOUNT}:role/{self.prefix}{function}",
            "awsRegion": self.region,
            "eventSourceARN": arn,
        }

    def _lake_objects(self, function: str) -> dict[str, str]:
        """Every object a stream function writes → its ETag."""
        out: dict[str, str] = {}
        s3 = self.clients["s3"]
        for bucket, prefix in self.plan.stream_functions[function].writes:
            s3b = self.plan.s3_of(bucket)
            under = s3b.members[bucket] + (f"{prefix}/" if prefix else "")
            pages = s3.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket_name(s3b.label), Prefix=under
            )
            for page in pages:
                out.update({f"{bucket}/{o['Key']}": o["ETag"] for o in page.get("Contents", [])})
        return out

    def _verify_streams(self) -> None:
        import pyarrow.parquet as pq

        from ..streams.events import check_event

        r, s3 = self.report, self.clients["s3"]
        for sf in self.plan.stream_functions.values():
            events = self.events_put.get(sf.stream, [])
            valid = [e for e in events if not check_event(e, 0)[1]]
            self.not_events[sf.name] = len(events) - len(valid)
            key = self._dedup_key(sf.stream)
            expected: dict[str, int] = {}
            for e in valid:
                ident = str(e.get(key or "event_uuid"))
                expected[ident] = 1 if key else expected.get(ident, 0) + 1
            seen: dict[str, int] = {}
            files = 0
            for where in self._lake_objects(sf.name):
                bucket, _, s3_key = where.partition("/")
                body = s3.get_object(
                    Bucket=self.bucket_name(self.plan.s3_of(bucket).label), Key=s3_key
                )["Body"].read()
                files += 1
                if s3_key.endswith(".parquet"):
                    rows = pq.read_table(io.BytesIO(body)).to_pylist()
                else:
                    rows = [json.loads(line) for line in body.decode().splitlines() if line]
                for row in rows:
                    ident = str(row.get(key or "event_uuid"))
                    seen[ident] = seen.get(ident, 0) + 1
            twice = sorted(k for k, n in seen.items() if n > expected.get(k, 0))
            missing = sorted(k for k, n in expected.items() if seen.get(k, 0) < n)
            r.check(
                f"{sf.name}: every event in the lake exactly once",
                bool(events) and not twice and not missing,
                f"{sum(seen.values())} rows in {files} files from {len(events)} events put "
                f"({len(events) - len(valid)} not events, "
                f"{len(valid) - sum(expected.values())} duplicates dropped); "
                f"missing {missing[:3]}, more than once {twice[:3]}",
            )
            changed = self.replays.get(sf.name, [])
            r.check(
                f"{sf.name}: replayed batches (whole and bisected) changed nothing",
                not changed,
                "; ".join(changed[:3]),
            )
        kinesis = self.clients["kinesis"]
        for st in self.plan.streams.values():
            summary = kinesis.describe_stream_summary(
                StreamName=self.refs[("stream", st.name, "name")]
            )
            d = summary["StreamDescriptionSummary"]
            ok = (
                d.get("EncryptionType") == "KMS" and d["RetentionPeriodHours"] == st.retention_hours
            )
            r.check(
                f"stream {st.name} settings",
                ok,
                f"encryption {d.get('EncryptionType')}, retention {d['RetentionPeriodHours']}h",
            )

    def _expect(self, bucket: str, key: str) -> None:
        """Remember which queues the object's event should reach, as the rules say."""
        s3b = self.plan.s3_of(bucket)
        real, s3_key = self.bucket_name(s3b.label), s3b.members[bucket] + key
        head = self.clients["s3"].head_object(Bucket=real, Key=s3_key)
        etag, size = head["ETag"].strip('"'), int(head["ContentLength"])
        local = object_created(bucket, key, size=size, etag=etag, sequencer="0")
        queues: dict[str, str | None] = {}
        for _, target in self.router.targets_for(local):
            if target in self.cfg.topics:
                for q in self.cfg.topics[target].subscriptions:
                    queues.setdefault(q, target)
            else:
                queues.setdefault(target, None)
        queues = {
            q: t for q, t in queues.items() if self.plan.queues[q].consumer in self.plan.functions
        }
        if not queues:
            return
        event = {
            "version": "0",
            "id": str(uuid.uuid4()),
            "detail-type": "Object Created",
            "source": "aws.s3",
            "account": ACCOUNT,
            "time": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "region": self.region,
            "resources": [f"arn:aws:s3:::{real}"],
            "detail": {
                "version": "0",
                "bucket": {"name": real},
                "object": {"key": s3_key, "size": size, "etag": etag, "sequencer": "0"},
                "reason": "PutObject",
            },
        }
        self.expected.append(_Expected(real, s3_key, event, queues, time.monotonic()))

    def _arrived(self, queue: str, body: str) -> None:
        try:
            doc = json.loads(body)
            if isinstance(doc, dict) and doc.get("Type") == "Notification":
                doc = json.loads(doc.get("Message") or "{}")
        except ValueError:
            return
        if not isinstance(doc, dict):
            return
        detail = doc.get("detail") or {}
        bucket = (detail.get("bucket") or {}).get("name")
        key = (detail.get("object") or {}).get("key")
        for e in self.expected:
            if (e.s3_bucket, e.key) == (bucket, key) and queue in e.queues:
                e.seen.add(queue)
                if doc.get("id") != e.event["id"]:  # not one of our fallbacks
                    self.delivered_from.add(str(bucket))

    def _fall_back(self) -> None:
        """Deliver what the endpoint has not, as EventBridge would have (see the docstring)."""
        now = time.monotonic()
        for e in self.expected:
            if now - e.since < self.deliver_wait:
                continue
            missing = [q for q in e.queues if q not in e.seen and q not in e.fallen_back]
            published: set[str] = set()
            for q in missing:
                topic = e.queues[q]
                where = f"s3://{e.s3_bucket}/{e.key}"
                body = json.dumps(e.event)
                if topic is not None:
                    if topic not in published:
                        self.clients["sns"].publish(
                            TopicArn=self.refs[("topic", topic, "arn")], Message=body
                        )
                        published.add(topic)
                        self.report.fallbacks.append(
                            f"{where}: EventBridge did not deliver to topic {topic} within "
                            f"{self.deliver_wait:g}s; published the event it would have sent "
                            "to the topic directly"
                        )
                    e.fallen_back |= {x for x, t in e.queues.items() if t == topic}
                else:
                    kwargs: dict[str, Any] = {}
                    if self.plan.fifo:
                        kwargs = {
                            "MessageGroupId": "rehearsal",
                            "MessageDeduplicationId": e.event["id"],
                        }
                    self.clients["sqs"].send_message(
                        QueueUrl=self.refs[("queue", q, "url")], MessageBody=body, **kwargs
                    )
                    e.fallen_back.add(q)
                    self.report.fallbacks.append(
                        f"{where}: EventBridge did not deliver to queue {q} within "
                        f"{self.deliver_wait:g}s; sent the event it would have sent directly"
                    )

    def _invoke(self, function: str) -> int:
        """One receive from the function's queue and, if it got messages, one invocation."""
        fn = self.plan.functions[function]
        sqs = self.clients["sqs"]
        url = self.refs[("queue", fn.queue, "url")]
        reply = sqs.receive_message(
            QueueUrl=url,
            MaxNumberOfMessages=min(10, fn.batch_size),
            WaitTimeSeconds=0,
            MessageAttributeNames=["All"],
            MessageSystemAttributeNames=["All"],
        )
        messages = reply.get("Messages", [])
        if not messages:
            return 0
        arn = self.refs[("queue", fn.queue, "arn")]
        records = [_sqs_record(m, arn, self.region) for m in messages]
        for m in messages:
            self._arrived(fn.queue, m["Body"])
        result = self._app(function).handle({"Records": records})
        failed = {f["itemIdentifier"] for f in result.response()["batchItemFailures"]}
        done = [m for m in messages if m["MessageId"] not in failed]
        if done:
            sqs.delete_message_batch(
                QueueUrl=url,
                Entries=[
                    {"Id": str(i), "ReceiptHandle": m["ReceiptHandle"]} for i, m in enumerate(done)
                ],
            )
        self.report.invocations.append(
            {
                "function": function,
                "messages": len(messages),
                "statuses": result.statuses(),
                "failed": sorted(failed),
            }
        )
        for r in result.results:
            for out in r.detail.get("outputs", []) if r.status == "done" else []:
                if "bucket" in out and "key" in out:
                    self._expect(out["bucket"], out["key"])
        return len(messages)

    def _pending(self) -> int:
        total = 0
        for f in self.plan.functions.values():
            a = self.clients["sqs"].get_queue_attributes(
                QueueUrl=self.refs[("queue", f.queue, "url")],
                AttributeNames=[
                    "ApproximateNumberOfMessages",
                    "ApproximateNumberOfMessagesNotVisible",
                    "ApproximateNumberOfMessagesDelayed",
                ],
            )["Attributes"]
            total += sum(int(v) for v in a.values())
        return total

    def drive(self) -> bool:
        """Play the event source mappings until everything settled; False on timeout."""
        deadline = time.monotonic() + self.timeout
        if not self._drive_streams(deadline):
            return False
        while time.monotonic() < deadline:
            received = sum(self._invoke(f) for f in self.plan.functions)
            self._fall_back()
            if received:
                continue
            delivered = all(set(e.queues) <= e.seen for e in self.expected)
            if delivered and self._pending() == 0:
                return True
            time.sleep(0.2)
        return False

    # -- checks ------------------------------------------------------------------------

    def verify(self, settled: bool) -> None:
        r = self.report
        r.check("everything settled", settled, "" if settled else f"not within {self.timeout:g}s")
        self._verify_resources()
        self._verify_streams()
        if not self.apps:
            r.check("some function ran", False, "no message reached any function's queue")
            return
        ledger = next(iter(self.apps.values())).pipeline.ledger
        for e in self.expected:
            where = self._pipeline_location(e.s3_bucket, e.key)
            if where is None:
                continue
            identity = f"{where[0]}/{where[1]}@{e.event['detail']['object']['etag']}"
            entries = {x.function: x for x in ledger.entries_for(identity)}
            for q in e.queues:
                function = self.plan.queues[q].consumer
                entry = entries.get(str(function))
                ok = entry is not None and entry.status == "done"
                status = entry.status if entry else "no ledger entry"
                r.check(f"{function} processed {where[0]}/{where[1]}", ok, status)
                if entry is not None and ok:
                    self._verify_outputs(str(function), entry.info)
        sqs = self.clients["sqs"]
        for q in self.plan.queues.values():
            if q.is_dlq:
                a = sqs.get_queue_attributes(
                    QueueUrl=self.refs[("queue", q.name, "url")],
                    AttributeNames=["ApproximateNumberOfMessages"],
                )["Attributes"]
                n = int(a.get("ApproximateNumberOfMessages", 0))
                if q.failures_of is None:
                    r.check(f"dead-letter queue {q.name} is empty", n == 0, f"{n} messages")
                    continue
                # A stream function's: no failed batch, only the records that are no events.
                bad = self.not_events.get(q.failures_of, 0)
                r.check(
                    f"failure queue {q.name} holds only the {bad} records that are no events",
                    n == bad,
                    f"{n} messages",
                )

    def _pipeline_location(self, s3_bucket: str, key: str) -> tuple[str, str] | None:
        for b in self.plan.buckets:
            if self.bucket_name(b.label) != s3_bucket:
                continue
            for member, prefix in sorted(b.members.items(), key=lambda m: -len(m[1])):
                if key.startswith(prefix):
                    return member, key[len(prefix) :]
        return None

    def _verify_outputs(self, function: str, info: dict[str, Any]) -> None:
        import pyarrow.parquet as pq

        app = self.apps.get(function) or self._app(function)
        for out in info.get("outputs", []):
            if "bucket" not in out or "key" not in out:
                continue
            name = f"output {out['bucket']}/{out['key']}"
            bucket = app.pipeline.bucket(out["bucket"])
            try:
                head = bucket.head(out["key"])
            except Exception as e:
                self.report.check(name, False, f"missing: {e}")
                continue
            if out["key"].endswith(".parquet"):
                with bucket.open_read(out["key"]) as f:
                    rows = pq.ParquetFile(io.BytesIO(f.read())).metadata.num_rows
                ok = rows == out.get("rows", rows)
                self.report.check(name, ok, f"Parquet, {rows} rows, {head.size} bytes")
            else:
                self.report.check(name, True, f"{head.size} bytes")
        upserted = int(info.get("stats", {}).get("rows_upserted", 0))
        for table in self.plan.functions[function].tables:
            count = app.pipeline.tables[table].count()
            ok = count >= 1 if upserted else True
            self.report.check(f"table {table}", ok, f"{count} items ({upserted} rows upserted)")

    def _verify_resources(self) -> None:
        r, s3 = self.report, self.clients["s3"]
        for b in self.plan.buckets:
            name = self.bucket_name(b.label)
            versioned = s3.get_bucket_versioning(Bucket=name).get("Status") == "Enabled"
            blocked = all(
                s3.get_public_access_block(Bucket=name)["PublicAccessBlockConfiguration"].values()
            )
            config = s3.get_bucket_notification_configuration(Bucket=name)
            # moto does not report the setting back (but delivers): then say what was seen.
            if "EventBridgeConfiguration" in config:
                notify = "on"
            elif name in self.delivered_from:
                notify = "on (events delivered)"
            else:
                notify = "set, not reported back by the endpoint"
            r.check(
                f"bucket {name} settings",
                versioned and blocked,
                f"versioning={versioned} public-access-blocked={blocked} eventbridge={notify}",
            )
        sqs = self.clients["sqs"]
        for f in self.plan.functions.values():
            a = sqs.get_queue_attributes(
                QueueUrl=self.refs[("queue", f.queue, "url")],
                AttributeNames=["VisibilityTimeout", "RedrivePolicy"],
            )["Attributes"]
            visibility = int(a.get("VisibilityTimeout", 0))
            ok = visibility >= 6 * f.timeout and "deadLetterTargetArn" in a.get("RedrivePolicy", "")
            r.check(
                f"queue {f.queue} settings", ok, f"visibility {visibility}s, timeout {f.timeout}s"
            )
        ddb = self.clients["dynamodb"]
        for t in self.plan.tables:
            name = self.refs[("table", t.label, "name")]
            pitr = ddb.describe_continuous_backups(TableName=name)["ContinuousBackupsDescription"]
            on = pitr.get("PointInTimeRecoveryDescription", {}).get("PointInTimeRecoveryStatus")
            r.check(f"table {name} point-in-time recovery", on == "ENABLED", str(on))

    # -- the end -----------------------------------------------------------------------

    def teardown(self) -> None:
        """Delete what was created (best effort: an emulator may be gone already)."""
        for app in self.apps.values():
            with contextlib.suppress(Exception):
                app.pipeline.close()
        c = self.clients
        for r in self.plan.rules:
            name = f"{self.prefix}{r.name}"[:64]
            with contextlib.suppress(Exception):
                c["events"].remove_targets(Rule=name, Ids=[t[:64] for t in r.targets])
                c["events"].delete_rule(Name=name)
        for t in self.plan.topics.values():
            with contextlib.suppress(Exception):
                c["sns"].delete_topic(TopicArn=self.refs[("topic", t.name, "arn")])
        for q in self.plan.queues.values():
            with contextlib.suppress(Exception):
                c["sqs"].delete_queue(QueueUrl=self.refs[("queue", q.name, "url")])
        for t in self.plan.tables:
            with contextlib.suppress(Exception):
                c["dynamodb"].delete_table(TableName=self.refs[("table", t.label, "name")])
        for st in self.plan.streams.values():
            with contextlib.suppress(Exception):
                c["kinesis"].delete_stream(
                    StreamName=self.refs[("stream", st.name, "name")], EnforceConsumerDeletion=True
                )
        for f in [*self.plan.functions.values(), *self.plan.stream_functions.values()]:
            role = f"{self.prefix}{f.name}"[:64]
            with contextlib.suppress(Exception):
                c["iam"].delete_role_policy(RoleName=role, PolicyName="sluiceway")
                c["iam"].delete_role(RoleName=role)
            with contextlib.suppress(Exception):
                c["logs"].delete_log_group(logGroupName=f"/aws/lambda/{self.prefix}{f.name}")
        for b in self.plan.buckets:
            name = self.bucket_name(b.label)
            with contextlib.suppress(Exception):
                _empty_bucket(c["s3"], name)
                c["s3"].delete_bucket(Bucket=name)
        self._scratch.cleanup()


class _OutOfTime:
    """A Lambda context with a second left: the handler starts nothing."""

    def get_remaining_time_in_millis(self) -> int:
        return 1_000


def _deny_insecure(bucket: str) -> dict[str, Any]:
    return {
        "Version": "2012-10-17",
        "Statement": [
            {
                "Sid": "DenyInsecureTransport",
                "Effect": "Deny",
                "Principal": "*",
                "Action": "s3:*",
                "Resource": [f"arn:aws:s3:::{bucket}", f"arn:aws:s3:::{bucket}/*"],
                "Condition": {"Bool": {"aws:SecureTransport": "false"}},
            }
        ],
    }


def _empty_bucket(s3: Any, name: str) -> None:
    for page in s3.get_paginator("list_object_versions").paginate(Bucket=name):
        keys = [
            {"Key": v["Key"], "VersionId": v["VersionId"]}
            for v in page.get("Versions", []) + page.get("DeleteMarkers", [])
        ]
        if keys:
            s3.delete_objects(Bucket=name, Delete={"Objects": keys})


def _sqs_record(m: dict[str, Any], arn: str, region: str) -> dict[str, Any]:
    """A received SQS message as Lambda's event source mapping hands it over."""
    attrs = {}
    for name, v in (m.get("MessageAttributes") or {}).items():
        attrs[name] = {
            "stringValue": v.get("StringValue"),
            "binaryValue": v.get("BinaryValue"),
            "dataType": v.get("DataType", "String"),
        }
    return {
        "messageId": m["MessageId"],
        "receiptHandle": m["ReceiptHandle"],
        "body": m["Body"],
        "attributes": dict(m.get("Attributes") or {}),
        "messageAttributes": attrs,
        "md5OfBody": m.get("MD5OfBody", ""),
        "eventSource": "aws:sqs",
        "eventSourceARN": arn,
        "awsRegion": region,
    }


def rehearse(
    path: str | Path,
    endpoint: str,
    puts: Sequence[tuple[Path, str, str]],
    *,
    events: Sequence[tuple[Path, str]] = (),
    region: str = "us-east-1",
    prefix: str | None = None,
    deliver_wait: float = 3.0,
    timeout: float = 120.0,
    keep: bool = False,
    on_step: Callable[[str], None] | None = None,
) -> RehearsalReport:
    """Create, drive and check a pipeline's AWS deployment at ``endpoint`` (see the docstring).

    ``puts`` are ``(local file, pipeline bucket, key)``; ``events`` are
    ``(JSON Lines file, pipeline stream)``, put with PutRecords. With ``keep`` the
    resources stay for a look afterwards (their names start with the
    report's ``prefix``).
    """
    from ..pipeline import Pipeline

    started = time.monotonic()
    pipeline = Pipeline.from_file(path)
    step = on_step or (lambda _: None)
    r = Rehearsal(
        Path(path).resolve(),
        pipeline.config,
        endpoint,
        region=region,
        prefix=prefix,
        deliver_wait=deliver_wait,
        timeout=timeout,
    )
    try:
        step("creating resources")
        r.create()
        step("putting files")
        for source, bucket, key in puts:
            r.put(Path(source), bucket, key)
        for source, stream in events:
            r.put_events(Path(source), stream)
        step("running the functions")
        settled = r.drive()
        step("checking")
        r.verify(settled)
    finally:
        if not keep:
            r.teardown()
        pipeline.close()
    r.report.seconds = time.monotonic() - started
    return r.report


def parse_puts(values: Iterable[str]) -> list[tuple[Path, str, str]]:
    """``FILE=BUCKET/KEY`` (the CLI's ``--put``) into ``(file, bucket, key)``."""
    out = []
    for value in values:
        source, sep, target = value.partition("=")
        bucket, _, key = target.partition("/")
        if not sep or not bucket or not key:
            raise ValueError(f"{value!r}: give --put FILE=BUCKET/KEY")
        out.append((Path(source), bucket, key))
    return out


def parse_events(values: Iterable[str]) -> list[tuple[Path, str]]:
    """``FILE=STREAM`` (the CLI's ``--put-events``) into ``(file, stream)``."""
    out = []
    for value in values:
        source, sep, stream = value.partition("=")
        if not sep or not source or not stream or "/" in stream:
            raise ValueError(f"{value!r}: give --put-events FILE=STREAM")
        out.append((Path(source), stream))
    return out
