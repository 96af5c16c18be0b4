"""``sluiceway deploy terraform``: a Terraform module for a pipeline on AWS serverless.

The module is derived from the pipeline file, so nothing in it is written by
hand twice. First a :class:`Plan` says what the pipeline needs on AWS, in
terms of the pipeline (buckets, queues, topics, rules, functions, tables, and
which function may do what to which of them); then :func:`render` writes it
as HCL, and ``rehearse.py`` creates the very same plan through boto3.

What the plan holds, and why:

- **S3 buckets**, one per S3 bucket the profile names (several pipeline
  buckets may share one under prefixes): public access blocked, ACLs off,
  TLS only, versioning, SSE-S3 (or SSE-KMS with ``kms_key_arn``), a lifecycle
  that expires quarantined rows (``_rejected/``), old versions and abandoned
  multipart uploads, and **EventBridge notifications** on, which is how
  objects become events on AWS.
- **EventBridge rules**, one per pipeline rule, with the pattern translated:
  pipeline bucket names become the real bucket names, ``sluiceway.bucket``
  becomes ``aws.s3`` (added when the pattern is about objects and names no
  source), a bucket's key prefix is put in front of key matches, and a rule
  about objects that names no bucket is kept to the pipeline's buckets (on
  AWS, every bucket of the account with notifications on sends to the same
  bus).
- **SNS topics** where the pipeline fans out, with a policy that lets exactly
  the rules targeting them publish, and raw-delivery subscriptions (the
  ``sqs://`` broker's convention).
- **SQS queues** with their DLQ (redrive policy, redrive-allow policy),
  server-side encryption, and a visibility timeout of at least six times the
  timeout of the Lambda function that consumes them (AWS's advice for event
  source mappings); queue policies let exactly the pipeline's rules and
  topics send.
- **Lambda functions**, one per queue function, each with an event source
  mapping (batch size from the file, ``ReportBatchItemFailures``, maximum
  concurrency), a log group with retention, and an **IAM role** whose policy
  names only the actions its steps use, on only the resources it uses.
- **DynamoDB tables** for the ledger and for the pipeline's tables, in
  exactly the layout :mod:`sluiceway.ledgers.dynamodb` and
  :mod:`sluiceway.tables.dynamodb` create (the plan asks those classes which
  tables they make, so the two cannot drift): on-demand, point-in-time
  recovery, TTL where the layout has a TTL attribute.

- **Stream functions** (``stream:``, the Kinesis → Lambda → S3 design; see
  :mod:`sluiceway.aws.streams`): a **Kinesis stream** per pipeline stream
  (on-demand or provisioned shards, KMS encryption, retention from the
  file), and per function a Lambda with an event source mapping from it
  (``TRIM_HORIZON``; batch size and batching window from the sink's
  ``flush_records``/``flush_seconds``, since one batch is one flush;
  ``ReportBatchItemFailures``, bisect on error, bounded retries, one batch
  per shard at a time, an SQS **on-failure destination**), the DynamoDB
  **stream-state table** (dedup keys and shard checkpoints; on-demand, TTL,
  point-in-time recovery) and a role that may read only that stream, write
  only under the dataset's prefix, use only that table and send only to its
  failure queue.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

from ..backends import scheme_of
from ..config import PipelineConfig, expand_env
from ..errors import ConfigError
from ..steps import parse_step

HANDLER = "sluiceway.aws.handler.handler"
LAMBDA_MAX_TIMEOUT = 900
VISIBILITY_FACTOR = 6  # SQS visibility ≥ 6 × the Lambda timeout (AWS's advice)
SQS_MAX_VISIBILITY = 43_200
RETENTION = 1_209_600  # 14 days
PIPELINE_DIR = "pipeline"  # where `sluiceway package` puts the pipeline's folder
DEFAULT_ZIP = "../dist/sluiceway-lambda.zip"
BUCKET_SOURCE = "sluiceway.bucket"
OBJECT_DETAIL_TYPES = {"Object Created", "Object Deleted", "Object Restore Completed"}
SQS_NAME = re.compile(r"^[A-Za-z0-9_-]{1,80}$")

# What a function's role may do with each kind of resource.
S3_READ = ["s3:GetObject"]
S3_WRITE = ["s3:GetObject", "s3:PutObject", "s3:DeleteObject", "s3:AbortMultipartUpload"]
# What a Kinesis event source mapping reads with the function's role (no
# ListStreams: it names one stream; no SubscribeToShard: no enhanced fan-out).
KINESIS_READ = [
    "kinesis:DescribeStream",
    "kinesis:DescribeStreamSummary",
    "kinesis:GetRecords",
    "kinesis:GetShardIterator",
    "kinesis:ListShards",
]
KINESIS_MIN_HOURS, KINESIS_MAX_HOURS = 24, 8760
SQS_CONSUME = [
    "sqs:ReceiveMessage",
    "sqs:DeleteMessage",
    "sqs:ChangeMessageVisibility",
    "sqs:GetQueueAttributes",
    "sqs:GetQueueUrl",
]


# -- references that each renderer resolves its own way --------------------------------


@dataclass(frozen=True)
class Ref:
    """A resource attribute: ``aws_sqs_queue.x.arn`` in HCL, the real ARN in a rehearsal.

    ``kind`` is bucket | queue | topic | table | rule | log_group | function;
    ``name`` the plan's name for it (S3 label, queue, topic, table label,
    rule, function); ``suffix`` is appended text (``/*``, ``/index/*``).
    """

    kind: str
    name: str
    attr: str = "arn"
    suffix: str = ""

    def __add__(self, suffix: str) -> Ref:
        return Ref(self.kind, self.name, self.attr, self.suffix + suffix)


@dataclass(frozen=True)
class BucketName:
    """Where a pattern names a pipeline bucket: the real S3 bucket's name goes there."""

    bucket: str  # the S3 label


@dataclass(frozen=True)
class Joined:
    """Text made of literal parts and markers (``arn:aws:s3:::`` + a bucket's name)."""

    parts: tuple[Any, ...]


@dataclass(frozen=True)
class Statement:
    """One IAM policy statement, renderer-neutral."""

    sid: str
    actions: tuple[str, ...]
    resources: tuple[Ref | str, ...]
    conditions: tuple[tuple[str, str, tuple[Ref | str, ...]], ...] = ()
    principal: tuple[str, str] | None = None  # ("Service", "events.amazonaws.com")


# -- the plan --------------------------------------------------------------------------------


@dataclass
class S3BucketPlan:
    label: str
    default_name: str | None  # the profile's S3 bucket name, if it gives one
    members: dict[str, str]  # pipeline bucket → key prefix inside the S3 bucket ("" or "p/")


@dataclass
class QueuePlan:
    name: str
    label: str
    is_dlq: bool
    dead_letter_queue: str | None
    max_receive_count: int
    visibility_timeout: int
    delay: int
    rules: list[str] = field(default_factory=list)  # rules that target it directly
    topics: list[str] = field(default_factory=list)  # topics it is subscribed to
    consumer: str | None = None  # the function it feeds
    failures_of: str | None = None  # the stream function whose failed batches it gets


@dataclass
class TopicPlan:
    name: str
    label: str
    subscriptions: list[str]
    rules: list[str] = field(default_factory=list)


@dataclass
class RulePlan:
    name: str
    label: str
    pattern: dict[str, Any]  # with BucketName markers
    targets: list[str]  # topics or queues
    buckets: list[str]  # pipeline buckets whose objects it can match
    notes: list[str] = field(default_factory=list)


@dataclass
class TablePlan:
    label: str
    name: str  # without the table prefix
    keys: list[tuple[str, str, str]]  # (attribute, HASH | RANGE | -, S | N | B)
    indexes: list[dict[str, Any]]
    ttl_attribute: str | None
    table: str | None  # the pipeline table, or None for a ledger table
    purpose: str  # ledger-entries | ledger-objects | ledger-sent | table

    @property
    def hash_key(self) -> str:
        return next(a for a, role, _ in self.keys if role == "HASH")

    @property
    def range_key(self) -> str | None:
        return next((a for a, role, _ in self.keys if role == "RANGE"), None)


@dataclass
class FunctionPlan:
    name: str
    label: str
    queue: str
    timeout: int
    batch_size: int
    reads: list[str]  # pipeline buckets whose objects its events point at
    writes: list[str]  # pipeline buckets its steps write to
    tables: list[str]  # pipeline tables it upserts into
    publishes: list[tuple[str, str]]  # ("queue" | "topic", name)
    handler: bool  # user code: the policy cannot know what else it touches


@dataclass
class StreamPlan:
    """A pipeline stream as a Kinesis stream."""

    name: str
    label: str
    retention_hours: int
    consumers: list[str] = field(default_factory=list)


@dataclass
class StreamFunctionPlan:
    """A stream function: its Lambda reads a Kinesis stream through an event source mapping."""

    name: str
    label: str
    stream: str
    timeout: int
    batch_size: int  # the sink's flush_records (Kinesis: at most 10,000)
    batching_window: int  # the sink's flush_seconds (at most 300)
    failures: str  # its on-failure queue (also for records that are no events)
    writes: list[tuple[str, str]]  # (pipeline bucket, dataset prefix) it writes under


@dataclass
class Plan:
    """What a pipeline needs on AWS, before any of it is written as HCL or created."""

    pipeline: str
    pipeline_file: str  # its name inside the package's pipeline/ folder
    name_prefix: str
    table_prefix: str
    region: str | None
    fifo: bool
    buckets: list[S3BucketPlan]
    queues: dict[str, QueuePlan]
    topics: dict[str, TopicPlan]
    rules: list[RulePlan]
    functions: dict[str, FunctionPlan]
    tables: list[TablePlan]
    warnings: list[str] = field(default_factory=list)
    streams: dict[str, StreamPlan] = field(default_factory=dict)
    stream_functions: dict[str, StreamFunctionPlan] = field(default_factory=dict)

    def s3_of(self, bucket: str) -> S3BucketPlan:
        """The S3 bucket a pipeline bucket lives in."""
        return next(b for b in self.buckets if bucket in b.members)

    def prefix_of(self, bucket: str) -> str:
        return self.s3_of(bucket).members[bucket]

    def table_for(self, purpose: str, table: str | None = None) -> TablePlan:
        return next(t for t in self.tables if t.purpose == purpose and t.table == table)

    def queue_name(self, name: str) -> str:
        """The SQS/SNS name of a pipeline queue or topic (what the sqs:// broker uses too)."""
        return f"{self.name_prefix}{name}{'.fifo' if self.fifo else ''}"

    # -- policies ------------------------------------------------------------------------

    def function_statements(self, fn: FunctionPlan) -> list[Statement]:
        """Everything ``fn``'s role may do; nothing else (see the module docstring)."""
        out: list[Statement] = [
            _logs(fn.name),
            Statement("ConsumeOwnQueue", tuple(SQS_CONSUME), (Ref("queue", fn.queue),)),
        ]
        dlq = self.queues[fn.queue].dead_letter_queue
        if dlq is not None:
            out.append(Statement("DeadLetters", ("sqs:SendMessage",), (Ref("queue", dlq),)))
        written = set(fn.writes)
        for kind, buckets, actions in (
            ("Read", [b for b in fn.reads if b not in written], S3_READ),
            ("Write", fn.writes, S3_WRITE),
        ):
            for bucket in buckets:
                out += self.bucket_statements(kind, bucket, actions)
        out += self.ledger_statements(publishes=bool(fn.publishes))
        for table in fn.tables:
            t = self.table_for("table", table)
            out.append(
                Statement(
                    f"Table{_sid(table)}",
                    ("dynamodb:DescribeTable", "dynamodb:BatchWriteItem"),
                    (Ref("table", t.label),),
                )
            )
        for kind, name in fn.publishes:
            if kind == "queue":
                out.append(
                    Statement(f"SendTo{_sid(name)}", ("sqs:SendMessage",), (Ref("queue", name),))
                )
            else:
                out.append(
                    Statement(f"PublishTo{_sid(name)}", ("sns:Publish",), (Ref("topic", name),))
                )
        return out

    def bucket_statements(
        self, kind: str, bucket: str, actions: Sequence[str], under: str = ""
    ) -> list[Statement]:
        """``actions`` on a pipeline bucket's objects (below ``under`` in it), and listing them."""
        s3 = self.s3_of(bucket)
        prefix = s3.members[bucket] + under
        sid = _sid(bucket)
        # ListBucket makes a missing object a 404 (skipped), not a 403 (retried).
        cond = (("StringLike", "s3:prefix", (f"{prefix}*",)),) if prefix else ()
        return [
            Statement(f"{kind}{sid}", tuple(actions), (Ref("bucket", s3.label) + f"/{prefix}*",)),
            Statement(f"List{sid}", ("s3:ListBucket",), (Ref("bucket", s3.label),), cond),
        ]

    def ledger_statements(self, *, publishes: bool) -> list[Statement]:
        """The ledger's tables, as the DynamoDB ledger uses them (and its start-up probe)."""
        out: list[Statement] = []
        entries = self.table_for("ledger-entries")
        out.append(
            Statement(
                "LedgerEntries",
                (
                    "dynamodb:DescribeTable",
                    "dynamodb:GetItem",
                    "dynamodb:UpdateItem",
                    "dynamodb:BatchGetItem",
                    "dynamodb:Query",
                ),
                (Ref("table", entries.label), Ref("table", entries.label) + "/index/*"),
            )
        )
        objects = self.table_for("ledger-objects")
        out.append(
            Statement("LedgerObjects", ("dynamodb:DescribeTable",), (Ref("table", objects.label),))
        )
        sent = self.table_for("ledger-sent")
        sent_actions = ["dynamodb:DescribeTable", "dynamodb:DescribeTimeToLive"]
        if publishes:
            sent_actions += ["dynamodb:BatchGetItem", "dynamodb:BatchWriteItem"]
        out.append(Statement("LedgerSent", tuple(sent_actions), (Ref("table", sent.label),)))
        # The start-up probe is DescribeTable on the first table, granted above.
        return out

    def stream_function_statements(self, fn: StreamFunctionPlan) -> list[Statement]:
        """What a stream function's role may do: read its stream, write its dataset, …"""
        out: list[Statement] = [
            _logs(fn.name),
            # What the event source mapping needs to read the stream, nothing more.
            Statement("ReadStream", tuple(KINESIS_READ), (Ref("stream", fn.stream),)),
            # The mapping's on-failure destination, and records that are no events.
            Statement("Failures", ("sqs:SendMessage",), (Ref("queue", fn.failures),)),
        ]
        for bucket, prefix in fn.writes:  # only below the dataset's prefix
            out += self.bucket_statements("Write", bucket, S3_WRITE, f"{prefix}/" if prefix else "")
        state = self.table_for("stream-state")
        out.append(
            Statement(
                "StreamState",
                (
                    "dynamodb:DescribeTable",
                    "dynamodb:DescribeTimeToLive",
                    "dynamodb:GetItem",
                    "dynamodb:PutItem",
                    "dynamodb:UpdateItem",
                    "dynamodb:BatchGetItem",
                    "dynamodb:BatchWriteItem",
                ),
                (Ref("table", state.label),),
            )
        )
        return out + self.ledger_statements(publishes=False)

    def queue_statements(self, q: QueuePlan) -> list[Statement]:
        """Who may send to a queue: the rules that target it and the topics it follows."""
        out = []
        if q.rules:
            out.append(
                Statement(
                    "EventBridgeRules",
                    ("sqs:SendMessage",),
                    (Ref("queue", q.name),),
                    (("ArnEquals", "aws:SourceArn", tuple(Ref("rule", r) for r in q.rules)),),
                    ("Service", "events.amazonaws.com"),
                )
            )
        if q.topics:
            out.append(
                Statement(
                    "SnsTopics",
                    ("sqs:SendMessage",),
                    (Ref("queue", q.name),),
                    (("ArnEquals", "aws:SourceArn", tuple(Ref("topic", t) for t in q.topics)),),
                    ("Service", "sns.amazonaws.com"),
                )
            )
        return out

    def topic_statements(self, t: TopicPlan) -> list[Statement]:
        if not t.rules:
            return []
        return [
            Statement(
                "EventBridgeRules",
                ("sns:Publish",),
                (Ref("topic", t.name),),
                (("ArnEquals", "aws:SourceArn", tuple(Ref("rule", r) for r in t.rules)),),
                ("Service", "events.amazonaws.com"),
            )
        ]

    def destinations(self, fn: FunctionPlan) -> dict[str, Ref]:
        """``SLUICEWAY_DESTINATIONS`` of a function: where it publishes, by URL or ARN."""
        return {
            f"{kind}:{name}": Ref(kind, name, "url" if kind == "queue" else "arn")
            for kind, name in fn.publishes
        }


def _logs(function: str) -> Statement:
    return Statement(
        "Logs",
        ("logs:CreateLogStream", "logs:PutLogEvents"),
        (Ref("log_group", function) + ":*",),
    )


def _sid(name: str) -> str:
    """An IAM statement id part: letters and digits only."""
    return "".join(p[:1].upper() + p[1:] for p in re.split(r"[^A-Za-z0-9]+", name) if p)


def label(name: str) -> str:
    """A Terraform identifier for a pipeline name (``to-parquet`` → ``to_parquet``)."""
    out = re.sub(r"[^A-Za-z0-9_]", "_", name)
    return out if re.match(r"^[A-Za-z_]", out) else f"_{out}"


# -- building the plan -------------------------------------------------------------------


def _query(url: str | None) -> dict[str, str]:
    if not url:
        return {}
    return {k: v[-1] for k, v in parse_qs(urlsplit(expand_env(url)).query).items()}


def _region(cfg: PipelineConfig) -> str | None:
    b = cfg.backends
    for url in [b.ledger, b.tables, b.broker, *b.buckets.values()]:
        region = _query(url).get("region")
        if region:
            return region
    return None


class _RecordingDynamo:
    """Stands in for ``aws_clients.Dynamo``: records the tables a backend would create."""

    table_prefix = ""

    def __init__(self) -> None:
        self.made: list[
            tuple[str, list[tuple[str, str, str]], list[dict[str, Any]], str | None]
        ] = []

    def table_name(self, *parts: str) -> str:
        return "-".join(parts)

    def ensure_table(
        self,
        name: str,
        keys: Sequence[tuple[str, str, str]],
        indexes: Sequence[Mapping[str, Any]] = (),
        ttl_attribute: str | None = None,
        timeout: float = 300.0,
    ) -> None:
        self.made.append((name, list(keys), [dict(i) for i in indexes], ttl_attribute))


def dynamo_layouts(
    pipeline: str, tables: Mapping[str, Sequence[str]], *, streams: bool = False
) -> list[TablePlan]:
    """The DynamoDB tables the ledger and the tables backends make, asked of those classes.

    They are constructed with a recording stand-in for their DynamoDB client,
    so the layout here is always theirs: same names, keys, indexes and TTL.
    """
    from ..ledgers.dynamodb import DynamoLedger
    from ..tables.dynamodb import DynamoTable

    rec = _RecordingDynamo()
    DynamoLedger(rec, pipeline)  # type: ignore[arg-type]
    ledger_made = list(rec.made)
    out = []
    for name, keys, indexes, ttl in ledger_made:
        purpose = name.removeprefix(f"{pipeline}-")  # ledger-entries, ledger-objects, …
        out.append(TablePlan(label(purpose), name, keys, indexes, ttl, None, purpose))
    if streams:  # stream functions on Lambda: their state table, as aws/streams.py makes it
        from .streams import StreamState

        rec.made.clear()
        StreamState(rec, pipeline)  # type: ignore[arg-type]
        for name, keys, indexes, ttl in rec.made:
            purpose = name.removeprefix(f"{pipeline}-")
            out.append(TablePlan(label(purpose), name, keys, indexes, ttl, None, purpose))
    for table, key in tables.items():
        rec.made.clear()
        DynamoTable(rec, table, list(key), pipeline)  # type: ignore[arg-type]
        for name, keys, indexes, ttl in rec.made:
            out.append(TablePlan(label(f"table_{table}"), name, keys, indexes, ttl, table, "table"))
    return out


def _step_options(raw: Any) -> tuple[str, dict[str, Any]]:
    name, options = parse_step(raw)
    return name, options if isinstance(options, dict) else {}


def _bucket_values(values: Any, buckets: Iterable[str]) -> tuple[list[str], bool]:
    """Pipeline buckets named exactly in a pattern's bucket-name list; False if others match too."""
    known = set(buckets)
    exact: list[str] = []
    only_exact = isinstance(values, list)
    for v in values if isinstance(values, list) else []:
        if isinstance(v, str) and v in known:
            exact.append(v)
        else:
            only_exact = False
    return exact, only_exact


def _is_about_objects(pattern: Mapping[str, Any]) -> bool:
    detail = pattern.get("detail")
    types = pattern.get("detail-type")
    if isinstance(detail, Mapping) and ("bucket" in detail or "object" in detail):
        return True
    return isinstance(types, list) and any(t in OBJECT_DETAIL_TYPES for t in types)


def translate_pattern(
    pattern: Mapping[str, Any], plan_buckets: Mapping[str, S3BucketPlan]
) -> tuple[dict[str, Any], list[str], list[str]]:
    """A pipeline rule's pattern as EventBridge must see it on AWS.

    Returns the pattern (with :class:`BucketName` markers), the pipeline
    buckets whose objects it can match, and notes on what could not be
    translated exactly (those over-match; the handler filters by bucket).
    """
    out: dict[str, Any] = json.loads(json.dumps(pattern))  # a deep copy
    notes: list[str] = []
    if not _is_about_objects(out):
        return out, [], notes
    source = out.get("source")
    if isinstance(source, list):
        out["source"] = ["aws.s3" if s == BUCKET_SOURCE else s for s in source]
    elif source is None:
        out["source"] = ["aws.s3"]
    detail = out.setdefault("detail", {})
    bucket = detail.setdefault("bucket", {}) if isinstance(detail, dict) else {}
    names = bucket.get("name") if isinstance(bucket, dict) else None
    exact, only_exact = _bucket_values(names, plan_buckets)
    if names is None:
        matched = list(plan_buckets)
    elif only_exact:
        matched = exact
    else:
        matched = list(plan_buckets)
        notes.append("bucket names matched by other than exact names are not translated")
    if isinstance(bucket, dict):
        if names is None or only_exact:
            labels = list(dict.fromkeys(plan_buckets[b].label for b in matched))
            bucket["name"] = [BucketName(lbl) for lbl in labels]
        elif isinstance(names, list):
            bucket["name"] = [
                BucketName(plan_buckets[v].label) if isinstance(v, str) and v in plan_buckets else v
                for v in names
            ]
    prefixes = {plan_buckets[b].members[b] for b in matched}
    if len(prefixes) == 1 and (prefix := next(iter(prefixes))):
        obj = detail.setdefault("object", {})
        keys = obj.get("key")
        if keys is None:
            obj["key"] = [{"prefix": prefix}]
        elif isinstance(keys, list):
            obj["key"] = [_prefixed(k, prefix, notes) for k in keys]
    elif len(prefixes) > 1:
        notes.append("buckets with different key prefixes: keys are matched without them")
    resources = out.get("resources")
    if isinstance(resources, list):
        out["resources"] = [
            Joined(("arn:aws:s3:::", BucketName(plan_buckets[r[7:]].label)))
            if isinstance(r, str) and r.startswith("bucket:") and r[7:] in plan_buckets
            else r
            for r in resources
        ]
    return out, matched, notes


def _prefixed(match: Any, prefix: str, notes: list[str]) -> Any:
    if isinstance(match, str):
        return prefix + match
    if isinstance(match, dict) and len(match) == 1:
        ((op, value),) = match.items()
        if op in ("prefix", "wildcard") and isinstance(value, str):
            return {op: prefix + value}
        if op == "suffix":
            return match
    notes.append(f"key match {json.dumps(match)} kept without the bucket's prefix")
    return match


def build_plan(
    cfg: PipelineConfig,
    *,
    pipeline_file: str = "sluiceway.yaml",
    name_prefix: str | None = None,
    region: str | None = None,
) -> Plan:
    """The plan for a loaded pipeline; its active profile gives names and region."""
    problems: list[str] = []
    warnings: list[str] = []
    profile = cfg.backends
    broker = _query(profile.broker) if profile.broker and scheme_of(profile.broker) == "sqs" else {}
    fifo = broker.get("fifo", "").lower() in ("1", "true", "yes", "on")
    prefix = name_prefix if name_prefix is not None else broker.get("prefix", f"{cfg.pipeline}-")
    table_prefix = _query(profile.ledger).get("table_prefix") or _query(profile.tables).get(
        "table_prefix", ""
    )

    # Buckets, grouped by the S3 bucket the profile puts them in.
    s3: dict[str, S3BucketPlan] = {}
    of: dict[str, S3BucketPlan] = {}
    for name in cfg.buckets:
        url = profile.buckets.get(name)
        real, key_prefix = None, ""
        if url and scheme_of(url) == "s3":
            parts = urlsplit(expand_env(url))
            real = parts.netloc or None
            key_prefix = parts.path.strip("/")
            key_prefix = f"{key_prefix}/" if key_prefix else ""
        group = real or f"\0{name}"
        if group not in s3:
            s3[group] = S3BucketPlan(label(name), real, {})
        s3[group].members[name] = key_prefix
        of[name] = s3[group]

    # Queues: the file's, each with its DLQ.
    queues: dict[str, QueuePlan] = {}
    for name in cfg.all_queue_names():
        q = cfg.queue_config(name)
        is_dlq = name not in cfg.queues
        queues[name] = QueuePlan(
            name=name,
            label=label(name),
            is_dlq=is_dlq,
            dead_letter_queue=None if is_dlq else cfg.dead_letter_queue(name),
            max_receive_count=q.max_receive_count,
            visibility_timeout=min(SQS_MAX_VISIBILITY, max(1, math.ceil(q.visibility_timeout))),
            delay=min(900, math.ceil(q.delay)),
        )
        if not SQS_NAME.match(f"{prefix}{name}"):
            problems.append(
                f"queue {name!r}: SQS needs names of up to 80 letters, digits, '-' and '_' "
                f"(with the prefix {prefix!r}: {prefix}{name!r})"
            )
    topics = {
        name: TopicPlan(name, label(name), list(t.subscriptions)) for name, t in cfg.topics.items()
    }
    for name, t in topics.items():
        if not SQS_NAME.match(f"{prefix}{name}"):
            problems.append(f"topic {name!r}: SNS needs letters, digits, '-' and '_' only")
        for q in t.subscriptions:
            queues[q].topics.append(name)

    rules = []
    for rule in cfg.rules:
        pattern, matched, notes = translate_pattern(rule.pattern, of)
        rp = RulePlan(
            rule.name, label(f"rule_{rule.name}"), pattern, list(rule.targets), matched, notes
        )
        rules.append(rp)
        warnings += [f"rule {rule.name!r}: {n}" for n in notes]
        for target in rule.targets:
            if target in topics:
                topics[target].rules.append(rule.name)
            else:
                queues[target].rules.append(rule.name)

    functions: dict[str, FunctionPlan] = {}
    streams: dict[str, StreamPlan] = {}
    stream_functions: dict[str, StreamFunctionPlan] = {}
    for name, fn in cfg.functions.items():
        if fn.stream is not None:
            sf = _stream_function(cfg, name, fn.stream, streams, queues, problems)
            stream_functions[name] = sf
            if fifo:
                problems.append(
                    f"function {name!r}: a stream function's failure queue must be a standard "
                    "queue, and this pipeline's broker is FIFO"
                )
            continue
        if fn.queue is None:
            continue
        timeout = min(LAMBDA_MAX_TIMEOUT, max(1, math.ceil(fn.timeout)))
        if fn.timeout > LAMBDA_MAX_TIMEOUT:
            warnings.append(f"function {name!r}: timeout {fn.timeout:g}s cut to Lambda's 900s")
        queue = queues[fn.queue]
        queue.consumer = name
        queue.visibility_timeout = min(
            SQS_MAX_VISIBILITY, max(queue.visibility_timeout, VISIBILITY_FACTOR * timeout)
        )
        reads = _event_buckets(cfg, rules, fn.queue)
        writes: list[str] = []
        tables: list[str] = []
        publishes: list[tuple[str, str]] = []
        for raw in fn.steps:
            step, options = _step_options(raw)
            for key in ("bucket", "rejects"):
                value = options.get(key)
                if isinstance(value, str) and value in cfg.buckets and value not in writes:
                    writes.append(value)
            if step == "write_table" and options.get("table") in cfg.tables:
                tables.append(options["table"])
            for kind in ("queue", "topic"):
                if step == "publish_json" and isinstance(options.get(kind), str):
                    publishes.append((kind, options[kind]))
        for dest in (fn.on_success, fn.on_error):
            if dest is not None:
                kind, target = ("queue", dest.queue) if dest.queue else ("topic", dest.topic)
                if (kind, target) not in publishes:
                    publishes.append((kind, str(target)))
        if fn.handler:
            warnings.append(
                f"function {name!r} runs user code: its role may read the buckets its events "
                "name; give it more with the variable extra_policy_json"
            )
        batch = min(fn.batch_size, 10) if fifo else fn.batch_size
        functions[name] = FunctionPlan(
            name=name,
            label=label(name),
            queue=fn.queue,
            timeout=timeout,
            batch_size=batch,
            reads=reads,
            writes=writes,
            tables=tables,
            publishes=publishes,
            handler=bool(fn.handler),
        )
    for name in [*functions, *stream_functions]:
        if len(f"{prefix}{name}") > 64:
            problems.append(f"function {name!r}: Lambda names are 64 characters at most")
    if problems:
        raise ConfigError(problems)
    return Plan(
        pipeline=cfg.pipeline,
        pipeline_file=pipeline_file,
        name_prefix=prefix,
        table_prefix=table_prefix,
        region=region or _region(cfg),
        fifo=fifo,
        buckets=list(s3.values()),
        queues=queues,
        topics=topics,
        rules=rules,
        functions=functions,
        tables=dynamo_layouts(
            cfg.pipeline, {n: t.key for n, t in cfg.tables.items()}, streams=bool(streams)
        ),
        warnings=warnings,
        streams=streams,
        stream_functions=stream_functions,
    )


def _stream_function(
    cfg: PipelineConfig,
    name: str,
    stream: str,
    streams: dict[str, StreamPlan],
    queues: dict[str, QueuePlan],
    problems: list[str],
) -> StreamFunctionPlan:
    """A stream function's plan, and its stream's and failure queue's."""
    from .streams import check_function, esm_settings

    try:
        check_function(cfg, name)
    except ConfigError as e:
        problems += e.problems
    if stream not in streams:
        retention = cfg.stream_config(stream).retention
        hours = KINESIS_MAX_HOURS if retention is None else math.ceil(retention / 3600)
        streams[stream] = StreamPlan(
            stream, label(stream), max(KINESIS_MIN_HOURS, min(KINESIS_MAX_HOURS, hours))
        )
    streams[stream].consumers.append(name)
    failures = f"{name}-failed"
    if failures in queues:
        problems.append(f"function {name!r}: its failure queue {failures!r} is a pipeline queue")
    fn = cfg.functions[name]
    timeout = min(LAMBDA_MAX_TIMEOUT, max(1, math.ceil(fn.timeout)))
    queues[failures] = QueuePlan(
        name=failures,
        label=label(failures),
        is_dlq=True,
        dead_letter_queue=None,
        max_receive_count=1,
        visibility_timeout=VISIBILITY_FACTOR * timeout,
        delay=0,
        failures_of=name,
    )
    writes: list[tuple[str, str]] = []
    for raw in fn.steps:
        step, options = _step_options(raw)
        if step == "write_dataset" and options.get("bucket") in cfg.buckets:
            writes.append((options["bucket"], str(options.get("prefix") or "").strip("/")))
    esm = esm_settings(cfg, name)
    return StreamFunctionPlan(
        name=name,
        label=label(name),
        stream=stream,
        timeout=timeout,
        batch_size=esm["batch_size"],
        batching_window=esm["maximum_batching_window_in_seconds"],
        failures=failures,
        writes=writes,
    )


def _event_buckets(cfg: PipelineConfig, rules: list[RulePlan], queue: str) -> list[str]:
    """Pipeline buckets whose object events reach ``queue`` (through topics too)."""
    found: list[str] = []
    for rule in rules:
        reached = set()
        for target in rule.targets:
            reached |= set(cfg.topics[target].subscriptions) if target in cfg.topics else {target}
        if queue in reached:
            found += [b for b in rule.buckets if b not in found]
    return found


# -- HCL ------------------------------------------------------------------------------------


class Expr(str):
    """Raw HCL, written as it is (a reference, a function call, a template)."""


def quote(text: str) -> str:
    """An HCL string literal: escapes, and ``${``/``%{`` kept literal."""
    body = json.dumps(text, ensure_ascii=False)[1:-1]
    return '"' + body.replace("${", "$${").replace("%{", "%%{") + '"'


def template(*parts: str | Expr) -> Expr:
    """A quoted template: literal text and ``${expr}`` parts."""
    out = []
    for p in parts:
        out.append("${" + p + "}" if isinstance(p, Expr) else quote(p)[1:-1])
    return Expr('"' + "".join(out) + '"')


_IDENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_-]*$")


def hcl(value: Any, indent: int = 0) -> str:
    """A Python value (dicts, lists, strings, numbers, Expr) as an HCL expression."""
    pad = "  " * indent
    if isinstance(value, Expr):
        return str(value)
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return json.dumps(value)
    if isinstance(value, str):
        return quote(value)
    if isinstance(value, Mapping):
        if not value:
            return "{}"
        lines = [f"{pad}  {quote(str(k))} = {hcl(v, indent + 1)}" for k, v in value.items()]
        return "{\n" + "\n".join(lines) + f"\n{pad}}}"
    if isinstance(value, list | tuple):
        items = [hcl(v, indent + 1) for v in value]
        flat = "[" + ", ".join(items) + "]"
        if len(flat) <= 80 and "\n" not in flat:
            return flat
        return "[\n" + ",\n".join(f"{pad}  {i}" for i in items) + f",\n{pad}]"
    raise TypeError(f"cannot write {type(value).__name__} as HCL")


@dataclass
class Block:
    """An HCL block: ``type "label" "label" { attributes and blocks }``."""

    type: str
    labels: tuple[str, ...] = ()
    body: list[Any] = field(default_factory=list)  # (name, value) pairs, Blocks, or "# comments"

    def add(self, name: str, value: Any) -> Block:
        self.body.append((name, value))
        return self

    def block(self, type_: str, *labels: str) -> Block:
        child = Block(type_, labels)
        self.body.append(child)
        return child

    def render(self, indent: int = 0) -> str:
        pad = "  " * indent
        head = " ".join([self.type, *(quote(lbl) for lbl in self.labels)])
        lines = [f"{pad}{head} {{"]
        width = max((len(n) for n, *_ in self._attrs()), default=0)
        for item in self.body:
            if isinstance(item, Block):
                lines.append(item.render(indent + 1))
            elif isinstance(item, str):
                lines.append(f"{pad}  {item}")
            else:
                name, value = item
                lines.append(f"{pad}  {name.ljust(width)} = {hcl(value, indent + 1)}")
        lines.append(f"{pad}}}")
        return "\n".join(lines)

    def _attrs(self) -> list[tuple[str, Any]]:
        return [i for i in self.body if isinstance(i, tuple)]


# -- rendering the plan ------------------------------------------------------------------

_TYPES = {
    "bucket": "aws_s3_bucket",
    "queue": "aws_sqs_queue",
    "topic": "aws_sns_topic",
    "table": "aws_dynamodb_table",
    "rule": "aws_cloudwatch_event_rule",
    "log_group": "aws_cloudwatch_log_group",
    "function": "aws_lambda_function",
    "stream": "aws_kinesis_stream",
}


class _Terraform:
    """Writes a :class:`Plan` as the files of one Terraform module."""

    def __init__(self, plan: Plan, lambda_zip: str) -> None:
        self.plan = plan
        self.lambda_zip = lambda_zip
        self.labels = self._labels()

    def _labels(self) -> dict[tuple[str, str], str]:
        p = self.plan
        out: dict[tuple[str, str], str] = {}
        taken: set[tuple[str, str]] = set()

        def take(kind: str, name: str, wanted: str) -> None:
            lbl, n = wanted, 2
            while (kind, lbl) in taken:
                lbl, n = f"{wanted}_{n}", n + 1
            taken.add((kind, lbl))
            out[(kind, name)] = lbl

        for b in p.buckets:
            take("bucket", b.label, b.label)
        for q in p.queues.values():
            take("queue", q.name, q.label)
        for t in p.topics.values():
            take("topic", t.name, t.label)
        for r in p.rules:
            take("rule", r.name, r.label)
        for t in p.tables:
            take("table", t.label, t.label)
        for s in p.streams.values():
            take("stream", s.name, s.label)
        for f in [*p.functions.values(), *p.stream_functions.values()]:
            for kind in ("function", "log_group", "role"):
                take(kind, f.name, f.label)
        return out

    def ref(self, r: Ref) -> Expr:
        lbl = self.labels[(r.kind, r.name)]
        return Expr(f"{_TYPES[r.kind]}.{lbl}.{r.attr}")

    def value(self, v: Any) -> Any:
        """Markers in a value as HCL expressions."""
        if isinstance(v, Ref):
            return template(self.ref(v), v.suffix) if v.suffix else self.ref(v)
        if isinstance(v, BucketName):
            return Expr(f"local.bucket_names[{quote(v.bucket)}]")
        if isinstance(v, Mapping):
            return {k: self.value(x) for k, x in v.items()}
        if isinstance(v, Joined):
            return template(
                *(Expr(self.value(x)) if not isinstance(x, str) else x for x in v.parts)
            )
        if isinstance(v, list | tuple):
            return [self.value(x) for x in v]
        return v

    def name(self, name: str, fifo: bool = False) -> Expr:
        return template(Expr("var.name_prefix"), name + (".fifo" if fifo else ""))

    # -- files ----------------------------------------------------------------------

    def files(self) -> dict[str, str]:
        header = (
            f"# Generated by `sluiceway deploy terraform` from pipeline {self.plan.pipeline!r}.\n"
            "# Regenerate instead of editing: the pipeline file is the source.\n\n"
        )
        return {
            "versions.tf": header + self.versions(),
            "variables.tf": header + self.variables(),
            "main.tf": header + self.main(),
            "outputs.tf": header + self.outputs(),
        }

    def versions(self) -> str:
        tf = Block("terraform")
        tf.add("required_version", ">= 1.5.0")
        tf.block("required_providers").add(
            "aws", {"source": "hashicorp/aws", "version": ">= 5.40, < 7.0"}
        )
        provider = Block("provider", ("aws",))
        provider.add("region", Expr("var.region"))
        provider.block("default_tags").add("tags", Expr("var.tags"))
        return tf.render() + "\n\n" + provider.render() + "\n"

    def variables(self) -> str:
        p = self.plan

        def var(
            name: str, type_: str, default: Any, doc: str, validation: tuple[str, str] | None = None
        ) -> str:
            b = Block("variable", (name,))
            b.add("description", doc)
            b.add("type", Expr(type_))
            if default is not _REQUIRED:
                b.add("default", default)
            if validation:
                v = b.block("validation")
                v.add("condition", Expr(validation[0]))
                v.add("error_message", validation[1])
            return b.render()

        default_names = {b.label: b.default_name for b in p.buckets if b.default_name}
        blocks = [
            var(
                "region", "string", p.region if p.region else _REQUIRED, "AWS region to deploy to."
            ),
            var(
                "name_prefix",
                "string",
                p.name_prefix,
                "Put before every queue, topic, rule, function and role name (the sqs:// "
                "broker's prefix).",
            ),
            var(
                "tags",
                "map(string)",
                {"ManagedBy": "sluiceway", "SluicewayPipeline": p.pipeline},
                "Tags on every resource.",
            ),
            var(
                "bucket_names",
                "map(string)",
                default_names,
                "S3 bucket names by bucket ("
                + ", ".join(b.label for b in p.buckets)
                + "); the rest are name_prefix + bucket.",
            ),
            var(
                "table_prefix",
                "string",
                p.table_prefix,
                "Put before every DynamoDB table name (the dynamodb:// table_prefix).",
            ),
            var(
                "kms_key_arn",
                "string",
                None,
                "A KMS key for SSE-KMS; null: SSE-S3 / SSE-SQS / AWS-owned keys.",
            ),
            var(
                "lambda_zip",
                "string",
                self.lambda_zip,
                "The zip from `sluiceway package` (relative to this module).",
            ),
            var(
                "image_uri",
                "string",
                None,
                "A container image instead of the zip (`sluiceway package --image`).",
            ),
            var(
                "lambda_architecture",
                "string",
                "x86_64",
                "x86_64 or arm64: the one the package was built for.",
                ('contains(["x86_64", "arm64"], var.lambda_architecture)', "x86_64 or arm64."),
            ),
            var(
                "lambda_runtime",
                "string",
                "python3.12",
                "The Lambda runtime the package was built for.",
            ),
            var("lambda_memory_mb", "number", 1024, "Memory per function (CPU grows with it)."),
            var(
                "lambda_ephemeral_storage_mb",
                "number",
                2048,
                "/tmp per function: S3 writes spool there.",
            ),
            var(
                "maximum_concurrency",
                "number",
                10,
                "At most this many instances of a function per event source mapping.",
                ("var.maximum_concurrency >= 2 && var.maximum_concurrency <= 1000", "2 to 1000."),
            ),
            var("log_retention_days", "number", 30, "CloudWatch log retention."),
            var(
                "rejects_retention_days",
                "number",
                30,
                "Quarantined rows (_rejected/) expire after this.",
            ),
            var(
                "noncurrent_version_retention_days",
                "number",
                30,
                "Replaced object versions expire after this.",
            ),
            var(
                "deletion_protection",
                "bool",
                True,
                "DynamoDB deletion protection (ledger and tables).",
            ),
            var(
                "force_destroy", "bool", False, "Let `terraform destroy` delete non-empty buckets."
            ),
            var(
                "extra_policy_json",
                "map(string)",
                {},
                "More IAM policy (JSON) by function, for user code that touches other resources.",
            ),
        ]
        if p.streams:
            blocks += [
                var(
                    "kinesis_stream_mode",
                    "string",
                    "ON_DEMAND",
                    "ON_DEMAND (shards follow the traffic) or PROVISIONED (kinesis_shard_count).",
                    (
                        'contains(["ON_DEMAND", "PROVISIONED"], var.kinesis_stream_mode)',
                        "ON_DEMAND or PROVISIONED.",
                    ),
                ),
                var(
                    "kinesis_shard_count",
                    "number",
                    1,
                    "Shards of each stream when PROVISIONED (one Lambda batch per shard at a "
                    "time: the parallelism of a stream function).",
                ),
                var(
                    "stream_maximum_retry_attempts",
                    "number",
                    -1,
                    "Retries of a failed stream batch before its range goes to the function's "
                    "failure queue; -1: until its records leave the stream (a failure is S3 or "
                    "DynamoDB, not the data: records that are no events are set aside at once).",
                    (
                        "var.stream_maximum_retry_attempts >= -1 && "
                        "var.stream_maximum_retry_attempts <= 10000",
                        "-1 to 10000.",
                    ),
                ),
            ]
        return "\n\n".join(blocks) + "\n"

    def main(self) -> str:
        p = self.plan
        parts = [self.locals_block().render()]
        parts += [b.render() for b in self.artifact_blocks()]
        for b in p.buckets:
            parts += [x.render() for x in self.bucket_blocks(b)]
        for t in p.tables:
            parts.append(self.table_block(t).render())
        for q in p.queues.values():
            parts += [x.render() for x in self.queue_blocks(q)]
        for t in p.topics.values():
            parts += [x.render() for x in self.topic_blocks(t)]
        for r in p.rules:
            parts += [x.render() for x in self.rule_blocks(r)]
        for f in p.functions.values():
            parts += [x.render() for x in self.function_blocks(f)]
        for s in p.streams.values():
            parts.append(self.stream_block(s).render())
        for sf in p.stream_functions.values():
            parts += [x.render() for x in self.stream_function_blocks(sf)]
        return "\n\n".join(parts) + "\n"

    def locals_block(self) -> Block:
        p = self.plan
        defaults = {
            b.label: Expr(f'lower(replace({template(Expr("var.name_prefix"), b.label)}, "_", "-"))')
            for b in p.buckets
        }
        urls = {}
        for b in p.buckets:
            for member, prefix in b.members.items():
                real = Expr(f"aws_s3_bucket.{self.labels[('bucket', b.label)]}.bucket")
                urls[member] = template("s3://", real, f"/{prefix.rstrip('/')}" if prefix else "")
        loc = Block("locals")
        loc.add("bucket_names", Expr(f"merge({hcl(defaults, 1)}, var.bucket_names)"))
        loc.add("bucket_urls", urls)
        loc.add(
            "lambda_zip",
            Expr(
                'startswith(var.lambda_zip, "/") ? var.lambda_zip : '
                '"${path.module}/${var.lambda_zip}"'
            ),
        )
        loc.add(
            "dynamodb_url",
            Expr('"dynamodb://?region=${var.region}&table_prefix=${var.table_prefix}"'),
        )
        loc.add("event_patterns", {r.name: self.value(r.pattern) for r in p.rules})
        return loc

    def artifact_blocks(self) -> list[Block]:
        """An S3 bucket for the package: Lambda takes zips over 50 MB only from S3."""
        bucket = Block("resource", ("aws_s3_bucket", "artifacts"))
        bucket.add(
            "bucket_prefix",
            Expr('substr(lower(replace("${var.name_prefix}artifacts-", "_", "-")), 0, 37)'),
        )
        bucket.add("force_destroy", True)
        pab = Block("resource", ("aws_s3_bucket_public_access_block", "artifacts"))
        pab.add("bucket", Expr("aws_s3_bucket.artifacts.id"))
        for k in (
            "block_public_acls",
            "block_public_policy",
            "ignore_public_acls",
            "restrict_public_buckets",
        ):
            pab.add(k, True)
        obj = Block("resource", ("aws_s3_object", "lambda_package"))
        obj.add("count", Expr("var.image_uri == null ? 1 : 0"))
        obj.add("bucket", Expr("aws_s3_bucket.artifacts.id"))
        obj.add("key", Expr('"sluiceway-lambda-${filemd5(local.lambda_zip)}.zip"'))
        obj.add("source", Expr("local.lambda_zip"))
        obj.add("etag", Expr("filemd5(local.lambda_zip)"))
        return [bucket, pab, obj]

    def bucket_blocks(self, b: S3BucketPlan) -> list[Block]:
        lbl = self.labels[("bucket", b.label)]
        ref = f"aws_s3_bucket.{lbl}"
        bucket = Block("resource", ("aws_s3_bucket", lbl))
        bucket.add("bucket", Expr(f"local.bucket_names[{quote(b.label)}]"))
        bucket.add("force_destroy", Expr("var.force_destroy"))
        own = Block("resource", ("aws_s3_bucket_ownership_controls", lbl))
        own.add("bucket", Expr(f"{ref}.id"))
        own.block("rule").add("object_ownership", "BucketOwnerEnforced")
        pab = Block("resource", ("aws_s3_bucket_public_access_block", lbl))
        pab.add("bucket", Expr(f"{ref}.id"))
        for k in (
            "block_public_acls",
            "block_public_policy",
            "ignore_public_acls",
            "restrict_public_buckets",
        ):
            pab.add(k, True)
        ver = Block("resource", ("aws_s3_bucket_versioning", lbl))
        ver.add("bucket", Expr(f"{ref}.id"))
        ver.block("versioning_configuration").add("status", "Enabled")
        sse = Block("resource", ("aws_s3_bucket_server_side_encryption_configuration", lbl))
        sse.add("bucket", Expr(f"{ref}.id"))
        rule = sse.block("rule")
        default = rule.block("apply_server_side_encryption_by_default")
        default.add("sse_algorithm", Expr('var.kms_key_arn == null ? "AES256" : "aws:kms"'))
        default.add("kms_master_key_id", Expr("var.kms_key_arn"))
        rule.add("bucket_key_enabled", Expr("var.kms_key_arn != null"))
        life = Block("resource", ("aws_s3_bucket_lifecycle_configuration", lbl))
        life.add("bucket", Expr(f"{ref}.id"))
        for member, prefix in b.members.items():
            r = life.block("rule")
            r.add("id", f"expire-rejects-{member}")
            r.add("status", "Enabled")
            r.block("filter").add("prefix", f"{prefix}_rejected/")
            r.block("expiration").add("days", Expr("var.rejects_retention_days"))
        r = life.block("rule")
        r.add("id", "old-versions-and-uploads")
        r.add("status", "Enabled")
        r.block("filter")
        r.block("noncurrent_version_expiration").add(
            "noncurrent_days", Expr("var.noncurrent_version_retention_days")
        )
        r.block("abort_incomplete_multipart_upload").add("days_after_initiation", 7)
        life.add("depends_on", [Expr(f"aws_s3_bucket_versioning.{lbl}")])
        tls = Block("data", ("aws_iam_policy_document", f"{lbl}_bucket"))
        st = tls.block("statement")
        st.add("sid", "DenyInsecureTransport")
        st.add("effect", "Deny")
        st.add("actions", ["s3:*"])
        st.add("resources", [Expr(f"{ref}.arn"), template(Expr(f"{ref}.arn"), "/*")])
        pr = st.block("principals")
        pr.add("type", "*")
        pr.add("identifiers", ["*"])
        cond = st.block("condition")
        cond.add("test", "Bool")
        cond.add("variable", "aws:SecureTransport")
        cond.add("values", ["false"])
        pol = Block("resource", ("aws_s3_bucket_policy", lbl))
        pol.add("bucket", Expr(f"{ref}.id"))
        pol.add("policy", Expr(f"data.aws_iam_policy_document.{lbl}_bucket.json"))
        pol.add("depends_on", [Expr(f"aws_s3_bucket_public_access_block.{lbl}")])
        note = Block("resource", ("aws_s3_bucket_notification", lbl))
        note.body.append(
            "# Every object change goes to EventBridge; the rules pick what they need."
        )
        note.add("bucket", Expr(f"{ref}.id"))
        note.add("eventbridge", True)
        return [bucket, own, pab, ver, sse, life, tls, pol, note]

    def table_block(self, t: TablePlan) -> Block:
        lbl = self.labels[("table", t.label)]
        b = Block("resource", ("aws_dynamodb_table", lbl))
        what = f"table {t.table}" if t.table else t.purpose
        b.body.append(f"# {what}: the layout sluiceway's DynamoDB backend creates")
        b.add("name", template(Expr("var.table_prefix"), t.name))
        b.add("billing_mode", "PAY_PER_REQUEST")
        b.add("hash_key", t.hash_key)
        if t.range_key:
            b.add("range_key", t.range_key)
        b.add("deletion_protection_enabled", Expr("var.deletion_protection"))
        for attr, _, type_ in t.keys:
            a = b.block("attribute")
            a.add("name", attr)
            a.add("type", type_)
        for index in t.indexes:
            g = b.block("global_secondary_index")
            g.add("name", index["IndexName"])
            for k in index["KeySchema"]:
                g.add("hash_key" if k["KeyType"] == "HASH" else "range_key", k["AttributeName"])
            projection = index.get("Projection", {})
            g.add("projection_type", projection.get("ProjectionType", "ALL"))
            if projection.get("NonKeyAttributes"):
                g.add("non_key_attributes", list(projection["NonKeyAttributes"]))
        if t.ttl_attribute:
            ttl = b.block("ttl")
            ttl.add("attribute_name", t.ttl_attribute)
            ttl.add("enabled", True)
        b.block("point_in_time_recovery").add("enabled", True)
        sse = b.block("server_side_encryption")
        sse.add("enabled", Expr("var.kms_key_arn != null"))
        sse.add("kms_key_arn", Expr("var.kms_key_arn"))
        return b

    def queue_blocks(self, q: QueuePlan) -> list[Block]:
        p = self.plan
        lbl = self.labels[("queue", q.name)]
        b = Block("resource", ("aws_sqs_queue", lbl))
        if q.consumer:
            fn = p.functions[q.consumer]
            b.body.append(
                f"# Consumed by function {q.consumer} (timeout {fn.timeout}s): visibility "
                f"≥ {VISIBILITY_FACTOR} × that."
            )
        b.add("name", self.name(q.name, p.fifo))
        if p.fifo:
            b.add("fifo_queue", True)
            b.add("content_based_deduplication", True)
        b.add("visibility_timeout_seconds", q.visibility_timeout)
        b.add("message_retention_seconds", RETENTION)
        b.add("delay_seconds", q.delay)
        b.add("receive_wait_time_seconds", 20)
        b.add("sqs_managed_sse_enabled", Expr("var.kms_key_arn == null ? true : null"))
        b.add("kms_master_key_id", Expr("var.kms_key_arn"))
        if q.dead_letter_queue:
            dlq = self.labels[("queue", q.dead_letter_queue)]
            b.add(
                "redrive_policy",
                Expr(
                    "jsonencode("
                    + hcl(
                        {
                            "deadLetterTargetArn": Expr(f"aws_sqs_queue.{dlq}.arn"),
                            "maxReceiveCount": q.max_receive_count,
                        },
                        1,
                    )
                    + ")"
                ),
            )
        out = [b]
        if q.failures_of:
            b.body.append(
                f"# Batches of stream function {q.failures_of} that failed every retry "
                "(shard and sequence range), and records that are no events."
            )
        sources = [s.name for s in p.queues.values() if s.dead_letter_queue == q.name]
        if q.is_dlq and sources:
            allow = Block("resource", ("aws_sqs_queue_redrive_allow_policy", lbl))
            allow.add("queue_url", Expr(f"aws_sqs_queue.{lbl}.id"))
            allow.add(
                "redrive_allow_policy",
                Expr(
                    "jsonencode("
                    + hcl(
                        {
                            "redrivePermission": "byQueue",
                            "sourceQueueArns": [
                                Expr(f"aws_sqs_queue.{self.labels[('queue', s)]}.arn")
                                for s in sources
                            ],
                        },
                        1,
                    )
                    + ")"
                ),
            )
            out.append(allow)
        statements = p.queue_statements(q)
        if statements:
            out.append(self.policy_document(f"{lbl}_queue", statements))
            pol = Block("resource", ("aws_sqs_queue_policy", lbl))
            pol.add("queue_url", Expr(f"aws_sqs_queue.{lbl}.id"))
            pol.add("policy", Expr(f"data.aws_iam_policy_document.{lbl}_queue.json"))
            out.append(pol)
        return out

    def topic_blocks(self, t: TopicPlan) -> list[Block]:
        p = self.plan
        lbl = self.labels[("topic", t.name)]
        b = Block("resource", ("aws_sns_topic", lbl))
        b.add("name", self.name(t.name, p.fifo))
        if p.fifo:
            b.add("fifo_topic", True)
            b.add("content_based_deduplication", True)
        b.body.append("# With a key of yours, its policy must let events and sns use it.")
        b.add("kms_master_key_id", Expr("var.kms_key_arn"))
        out = [b]
        statements = p.topic_statements(t)
        if statements:
            out.append(self.policy_document(f"{lbl}_topic", statements))
            pol = Block("resource", ("aws_sns_topic_policy", lbl))
            pol.add("arn", Expr(f"aws_sns_topic.{lbl}.arn"))
            pol.add("policy", Expr(f"data.aws_iam_policy_document.{lbl}_topic.json"))
            out.append(pol)
        for q in t.subscriptions:
            qlbl = self.labels[("queue", q)]
            sub = Block("resource", ("aws_sns_topic_subscription", f"{lbl}_to_{qlbl}"))
            sub.add("topic_arn", Expr(f"aws_sns_topic.{lbl}.arn"))
            sub.add("protocol", "sqs")
            sub.add("endpoint", Expr(f"aws_sqs_queue.{qlbl}.arn"))
            sub.body.append("# The body arrives as published, as with the sqs:// broker.")
            sub.add("raw_message_delivery", True)
            out.append(sub)
        return out

    def rule_blocks(self, r: RulePlan) -> list[Block]:
        p = self.plan
        lbl = self.labels[("rule", r.name)]
        b = Block("resource", ("aws_cloudwatch_event_rule", lbl))
        for note in r.notes:
            b.body.append(f"# Note: {note}")
        b.add("name", self.name(r.name))
        b.add("description", f"Sluiceway pipeline {p.pipeline}, rule {r.name}")
        b.add("event_pattern", Expr(f"jsonencode(local.event_patterns[{quote(r.name)}])"))
        out = [b]
        for target in r.targets:
            kind = "topic" if target in p.topics else "queue"
            tlbl = self.labels[(kind, target)]
            t = Block("resource", ("aws_cloudwatch_event_target", f"{lbl}_{tlbl}"))
            t.add("rule", Expr(f"aws_cloudwatch_event_rule.{lbl}.name"))
            t.add("target_id", label(target)[:64])
            t.add("arn", Expr(f"{_TYPES[kind]}.{tlbl}.arn"))
            if p.fifo and kind == "queue":
                t.block("sqs_target").add("message_group_id", r.name)
            out.append(t)
        return out

    def policy_document(self, name: str, statements: Sequence[Statement]) -> Block:
        doc = Block("data", ("aws_iam_policy_document", name))
        for s in statements:
            st = doc.block("statement")
            st.add("sid", s.sid)
            st.add("effect", "Allow")
            st.add("actions", list(s.actions))
            st.add("resources", [self.value(r) for r in s.resources])
            if s.principal:
                pr = st.block("principals")
                pr.add("type", s.principal[0])
                pr.add("identifiers", [s.principal[1]])
            for test, variable, values in s.conditions:
                c = st.block("condition")
                c.add("test", test)
                c.add("variable", variable)
                c.add("values", [self.value(v) for v in values])
        return doc

    def function_blocks(self, f: FunctionPlan) -> list[Block]:
        p = self.plan
        lbl = self.labels[("function", f.name)]
        queue = p.queues[f.queue]
        qlbl = self.labels[("queue", f.queue)]
        env: dict[str, Any] = {}
        if any(t.table for t in p.tables):  # user code may use ctx.tables too
            env["SLUICEWAY_TABLES"] = Expr("local.dynamodb_url")
        if queue.dead_letter_queue:
            env["SLUICEWAY_DLQ_URL"] = self.ref(Ref("queue", queue.dead_letter_queue, "url"))
        dests = p.destinations(f)
        if dests:
            env["SLUICEWAY_DESTINATIONS"] = Expr(
                "jsonencode(" + hcl({k: self.value(v) for k, v in dests.items()}, 3) + ")"
            )
        blocks = self.lambda_blocks(f.name, f.timeout, p.function_statements(f), env)
        esm = Block("resource", ("aws_lambda_event_source_mapping", lbl))
        esm.add("event_source_arn", Expr(f"aws_sqs_queue.{qlbl}.arn"))
        esm.add("function_name", Expr(f"aws_lambda_function.{lbl}.arn"))
        esm.add("batch_size", f.batch_size)
        if f.batch_size > 10:
            esm.add("maximum_batching_window_in_seconds", 1)
        esm.body.append("# The handler answers which messages failed; the others are deleted.")
        esm.add("function_response_types", ["ReportBatchItemFailures"])
        esm.block("scaling_config").add("maximum_concurrency", Expr("var.maximum_concurrency"))
        return [*blocks, esm]

    def stream_block(self, s: StreamPlan) -> Block:
        lbl = self.labels[("stream", s.name)]
        b = Block("resource", ("aws_kinesis_stream", lbl))
        b.body.append(
            f"# Pipeline stream {s.name}: producers PutRecords here (partition key: the "
            "dedup key). Read by " + ", ".join(s.consumers) + "."
        )
        b.add("name", self.name(s.name))
        b.add("retention_period", s.retention_hours)
        b.add(
            "shard_count",
            Expr('var.kinesis_stream_mode == "PROVISIONED" ? var.kinesis_shard_count : null'),
        )
        b.block("stream_mode_details").add("stream_mode", Expr("var.kinesis_stream_mode"))
        b.add("encryption_type", "KMS")
        b.add("kms_key_id", Expr('var.kms_key_arn == null ? "alias/aws/kinesis" : var.kms_key_arn'))
        return b

    def stream_function_blocks(self, f: StreamFunctionPlan) -> list[Block]:
        p = self.plan
        lbl = self.labels[("function", f.name)]
        env = {"SLUICEWAY_DLQ_URL": self.ref(Ref("queue", f.failures, "url"))}
        blocks = self.lambda_blocks(f.name, f.timeout, p.stream_function_statements(f), env)
        esm = Block("resource", ("aws_lambda_event_source_mapping", lbl))
        esm.add("event_source_arn", self.ref(Ref("stream", f.stream)))
        esm.add("function_name", Expr(f"aws_lambda_function.{lbl}.arn"))
        esm.add("starting_position", "TRIM_HORIZON")
        esm.body.append(
            "# One batch is one flush: write_dataset's flush_records and flush_seconds."
        )
        esm.add("batch_size", f.batch_size)
        esm.add("maximum_batching_window_in_seconds", f.batching_window)
        esm.body.append(
            "# One batch per shard at a time: the shard's checkpoint and intent are one item."
        )
        esm.add("parallelization_factor", 1)
        esm.body.append("# The handler names the first failed record; Lambda retries from it.")
        esm.add("function_response_types", ["ReportBatchItemFailures"])
        esm.add("bisect_batch_on_function_error", True)
        esm.add("maximum_retry_attempts", Expr("var.stream_maximum_retry_attempts"))
        esm.add("maximum_record_age_in_seconds", -1)
        failure = esm.block("destination_config").block("on_failure")
        failure.add("destination_arn", self.ref(Ref("queue", f.failures)))
        return [*blocks, esm]

    def lambda_blocks(
        self, name: str, timeout: int, statements: Sequence[Statement], env: dict[str, Any]
    ) -> list[Block]:
        """A Lambda function with its log group and its role (the policy ``statements``).

        ``env`` adds to the environment every function's handler needs.
        """
        lbl = self.labels[("function", name)]
        env = {
            "SLUICEWAY_PIPELINE": f"{PIPELINE_DIR}/{self.plan.pipeline_file}",
            "SLUICEWAY_FUNCTION": name,
            "SLUICEWAY_BUCKETS": Expr("jsonencode(local.bucket_urls)"),
            "SLUICEWAY_LEDGER": Expr("local.dynamodb_url"),
            "SLUICEWAY_QUEUE_PREFIX": Expr("var.name_prefix"),
            "SLUICEWAY_LOG": "INFO",
            **env,
        }
        logs = Block("resource", ("aws_cloudwatch_log_group", lbl))
        logs.add("name", template("/aws/lambda/", Expr("var.name_prefix"), name))
        logs.add("retention_in_days", Expr("var.log_retention_days"))
        assume = Block("data", ("aws_iam_policy_document", f"{lbl}_assume"))
        st = assume.block("statement")
        st.add("actions", ["sts:AssumeRole"])
        pr = st.block("principals")
        pr.add("type", "Service")
        pr.add("identifiers", ["lambda.amazonaws.com"])
        role = Block("resource", ("aws_iam_role", lbl))
        role.add("name", Expr(f"substr({self.name(name)}, 0, 64)"))
        role.add("assume_role_policy", Expr(f"data.aws_iam_policy_document.{lbl}_assume.json"))
        doc = self.policy_document(f"{lbl}_role", statements)
        kms = doc.block("dynamic", "statement")
        kms.add("for_each", Expr("var.kms_key_arn == null ? [] : [var.kms_key_arn]"))
        content = kms.block("content")
        content.add("sid", "Kms")
        content.add("actions", ["kms:Decrypt", "kms:GenerateDataKey"])
        content.add("resources", [Expr("statement.value")])
        policy = Block("resource", ("aws_iam_role_policy", lbl))
        policy.add("name", "sluiceway")
        policy.add("role", Expr(f"aws_iam_role.{lbl}.id"))
        policy.add("policy", Expr(f"data.aws_iam_policy_document.{lbl}_role.json"))
        extra = Block("resource", ("aws_iam_role_policy", f"{lbl}_extra"))
        extra.add("count", Expr(f"contains(keys(var.extra_policy_json), {quote(name)}) ? 1 : 0"))
        extra.add("name", "extra")
        extra.add("role", Expr(f"aws_iam_role.{lbl}.id"))
        extra.add("policy", Expr(f"var.extra_policy_json[{quote(name)}]"))

        fn = Block("resource", ("aws_lambda_function", lbl))
        fn.add("function_name", self.name(name))
        fn.add("role", Expr(f"aws_iam_role.{lbl}.arn"))
        fn.add("package_type", Expr('var.image_uri == null ? "Zip" : "Image"'))
        fn.add("image_uri", Expr("var.image_uri"))
        fn.add("s3_bucket", Expr("one(aws_s3_object.lambda_package[*].bucket)"))
        fn.add("s3_key", Expr("one(aws_s3_object.lambda_package[*].key)"))
        fn.add(
            "source_code_hash",
            Expr("var.image_uri == null ? filebase64sha256(local.lambda_zip) : null"),
        )
        fn.add("handler", Expr(f'var.image_uri == null ? "{HANDLER}" : null'))
        fn.add("runtime", Expr("var.image_uri == null ? var.lambda_runtime : null"))
        fn.add("architectures", [Expr("var.lambda_architecture")])
        fn.add("timeout", timeout)
        fn.add("memory_size", Expr("var.lambda_memory_mb"))
        fn.block("ephemeral_storage").add("size", Expr("var.lambda_ephemeral_storage_mb"))
        fn.block("environment").add("variables", env)
        lc = fn.block("logging_config")
        lc.add("log_format", "Text")
        lc.add("log_group", Expr(f"aws_cloudwatch_log_group.{lbl}.name"))
        fn.add(
            "depends_on",
            [Expr(f"aws_iam_role_policy.{lbl}"), Expr(f"aws_cloudwatch_log_group.{lbl}")],
        )
        return [logs, assume, role, doc, policy, extra, fn]

    def outputs(self) -> str:
        p = self.plan

        def out(name: str, value: Any, doc: str) -> str:
            b = Block("output", (name,))
            b.add("description", doc)
            b.add("value", value)
            return b.render()

        blocks = [
            out(
                "bucket_names",
                {
                    m: Expr(f"aws_s3_bucket.{self.labels[('bucket', b.label)]}.bucket")
                    for b in p.buckets
                    for m in b.members
                },
                "S3 bucket of each pipeline bucket.",
            ),
            out(
                "bucket_urls",
                Expr("local.bucket_urls"),
                "s3:// URL of each pipeline bucket (for a profile).",
            ),
            out(
                "queue_urls",
                {
                    q.name: self.ref(Ref("queue", q.name, "url"))
                    for q in p.queues.values()
                    if not q.is_dlq
                },
                "SQS queue URLs.",
            ),
            out(
                "dead_letter_queue_urls",
                {
                    q.name: self.ref(Ref("queue", q.name, "url"))
                    for q in p.queues.values()
                    if q.is_dlq
                },
                "SQS dead-letter queue URLs.",
            ),
            out(
                "topic_arns",
                {t.name: self.ref(Ref("topic", t.name)) for t in p.topics.values()},
                "SNS topic ARNs.",
            ),
            out(
                "function_names",
                {
                    f.name: self.ref(Ref("function", f.name, "function_name"))
                    for f in [*p.functions.values(), *p.stream_functions.values()]
                },
                "Lambda function names.",
            ),
            out(
                "stream_names",
                {s.name: self.ref(Ref("stream", s.name, "name")) for s in p.streams.values()},
                "Kinesis streams: producers PutRecords to these.",
            ),
            out(
                "table_names",
                {t.table or t.purpose: self.ref(Ref("table", t.label, "name")) for t in p.tables},
                "DynamoDB tables: the ledger's and the pipeline's.",
            ),
            out(
                "profile",
                Expr(
                    "{\n    buckets = local.bucket_urls\n"
                    "    ledger  = local.dynamodb_url\n    tables  = local.dynamodb_url\n  }"
                ),
                # No broker: the sqs:// broker configures the queues it opens as the
                # pipeline file says, which would undo this module's settings.
                "A Sluiceway profile for these buckets and tables (`sluiceway status`, `trace`).",
            ),
        ]
        return "\n\n".join(blocks) + "\n"


_REQUIRED = object()


def render(plan: Plan, *, lambda_zip: str = DEFAULT_ZIP) -> dict[str, str]:
    """The module's files (versions.tf, variables.tf, main.tf, outputs.tf) as text."""
    return _Terraform(plan, lambda_zip).files()


def write_module(
    pipeline_config: PipelineConfig,
    out_dir: str | Path,
    *,
    pipeline_file: str = "sluiceway.yaml",
    name_prefix: str | None = None,
    region: str | None = None,
    lambda_zip: str = DEFAULT_ZIP,
) -> tuple[Plan, list[Path]]:
    """Write the module for a pipeline into ``out_dir``; returns the plan and the files."""
    plan = build_plan(
        pipeline_config, pipeline_file=pipeline_file, name_prefix=name_prefix, region=region
    )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name, text in render(plan, lambda_zip=lambda_zip).items():
        path = out / name
        path.write_text(text, encoding="utf-8")
        written.append(path)
    return plan, written


def resolve(value: Any, lookup: Callable[[Ref], str], bucket_name: Callable[[str], str]) -> Any:
    """A plan value with its markers replaced by real names (for the rehearsal)."""
    if isinstance(value, Ref):
        return lookup(value) + value.suffix
    if isinstance(value, BucketName):
        return bucket_name(value.bucket)
    if isinstance(value, Mapping):
        return {k: resolve(v, lookup, bucket_name) for k, v in value.items()}
    if isinstance(value, Joined):
        return "".join(str(resolve(v, lookup, bucket_name)) for v in value.parts)
    if isinstance(value, list | tuple):
        return [resolve(v, lookup, bucket_name) for v in value]
    return value


def policy_json(statements: Sequence[Statement], lookup: Callable[[Ref], str]) -> dict[str, Any]:
    """Statements as an IAM policy document with real ARNs."""
    out = []
    for s in statements:
        st: dict[str, Any] = {
            "Sid": s.sid,
            "Effect": "Allow",
            "Action": list(s.actions),
            "Resource": [resolve(r, lookup, str) for r in s.resources],
        }
        if s.principal:
            st["Principal"] = {s.principal[0]: s.principal[1]}
        for test, variable, values in s.conditions:
            st.setdefault("Condition", {}).setdefault(test, {})[variable] = [
                resolve(v, lookup, str) for v in values
            ]
        out.append(st)
    return {"Version": "2012-10-17", "Statement": out}
