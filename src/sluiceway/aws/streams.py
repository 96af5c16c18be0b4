"""Stream functions on Lambda: Kinesis → Lambda → S3, each event exactly once.

Locally a stream function's flush is exactly once because one SQLite
transaction moves the checkpoint, stores the dedup keys and drops the flush's
intent (``streams/consumer.py``). On Lambda there is no such transaction and
no local state that survives an invocation, and Lambda's event source mapping
(ESM) owns the checkpoint: it retries a failed batch from the failed record
onward (per shard, in order), may split a failed batch in two
(``bisect_batch_on_function_error``), and a Lambda may die after writing its
files but before returning. So the same promises are kept differently, with
one DynamoDB table (``PREFIX<pipeline>-stream-state``, next to the ledger's,
same ``table_prefix``) and deterministic file names:

**One batch is one flush.** The ESM's ``batch_size`` is the sink's
``flush_records`` (at most Kinesis's 10,000) and its
``maximum_batching_window_in_seconds`` the sink's ``flush_seconds`` (at most
300): Lambda buffers, not the function. Each flush writes one file per
partition named ``part-<first seq>-<last seq>-<function>.<shard>.<ext>``, so
a retry of the same records rewrites the same objects with the same bytes.

**Dedup decisions are keyed by the record, not by the attempt.** For each key
(``dedup: {key: event_uuid, window: 24h}``) the table records where it first
arrived: shard, sequence number and Kinesis's ``approximateArrivalTimestamp``,
written with a conditional put (the first writer wins, also across shards).
A record is a duplicate if another record of the same key arrived less than
``window`` before (or after) it; a record that finds *itself* recorded is a
replay and is kept. So a retry, a bisected half or a re-read of the same
records decides exactly as the first attempt did, and a true duplicate (other
seq) is dropped within the window. Times are the stream's arrival times,
never the clock. The item's TTL attribute ``expires`` is arrival + window +
the stream's retention: a record can be replayed as long as Kinesis keeps
it, and its decision is there until then.

**A checkpoint and an intent per (function, shard)**, in the same table:

1. *Intent*: before the first file is written, the range and every file key
   are stored in the shard's item (conditional on the committed seq being
   what this flush read, a fence against a stale invocation).
2. *Files*, each a single PUT.
3. *Commit*: ``committed`` moves to the last seq and the intent is removed
   (conditional on the intent being this flush's).

Records at or below ``committed`` are already in the lake and are skipped:
a retry of a flush that finished but whose invocation died before
returning, or a bisected half of it, writes nothing again. An intent left by
a dead invocation is replayed: if the batch starts at its first seq and
reaches its last, exactly that range is flushed again (same keys, same
bytes) and the rest of the batch is a second flush; otherwise (a bisected
retry, a new mapping) the batch is flushed as it comes and the intent's
files that this flush does not rewrite are deleted, so no record is in the
lake twice.

Records that are not events (not JSON, missing fields) are sent to the
function's dead-letter queue (``SLUICEWAY_DLQ_URL``) with the reason and
acknowledged: they cannot block a shard. Any other failure fails the flush;
the handler reports its first seq in ``batchItemFailures`` and Lambda
retries from there.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import time
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import pyarrow as pa

from .. import faults
from ..aws_clients import DYNAMO_OPTIONS, Dynamo, error_code, parse_url
from ..errors import ConfigError, SluicewayError
from ..events import Event
from ..ledger import Claim
from ..steps import STEPS, parse_step
from ..steps.base import Batches, StepContext, StepFn
from ..steps.dedup import TIME_COLUMN, DedupOptions
from ..streams.base import Record
from ..streams.consumer import FlushContext, flush_info, flush_ledger_key
from ..streams.events import records_to_batch

if TYPE_CHECKING:
    from ..config import PipelineConfig
    from ..pipeline import Pipeline

log = logging.getLogger("sluiceway.aws.streams")

KINESIS_MAX_BATCH = 10_000  # the ESM's batch_size limit for Kinesis
KINESIS_MAX_WINDOW = 300  # seconds: maximum_batching_window_in_seconds
KINESIS_MIN_RETENTION = 86_400.0  # a Kinesis stream keeps records at least 24 hours
RACE_ATTEMPTS = 8  # conditional writes lost to a concurrent shard before giving up
CLAIM_THREADS = 16  # parallel conditional puts per batch (one key each)
STATE_TABLE = ("stream", "state")  # after the pipeline's name: PREFIX<pipeline>-stream-state


@dataclass(frozen=True)
class Arrival:
    """Where and when a record arrived: its identity in the stream."""

    shard: str
    seq: str
    at: float  # approximateArrivalTimestamp, POSIX seconds

    def same(self, other: Arrival) -> bool:
        return self.shard == other.shard and self.seq == other.seq


@dataclass(frozen=True)
class KinesisRecord:
    """One record of a Kinesis batch as the ESM delivers it, decoded."""

    shard: str
    seq: str
    arrived: float
    data: Any  # the JSON value, or None if the data is not JSON
    raw: Mapping[str, Any]

    @property
    def number(self) -> int:
        return int(self.seq)


def parse_record(r: Mapping[str, Any]) -> KinesisRecord:
    """A Lambda Kinesis event record → a KinesisRecord (undecodable data becomes None)."""
    k = r["kinesis"]
    seq = str(k["sequenceNumber"])
    if not seq.isdigit():
        raise ValueError(f"Kinesis sequence number {seq!r} is not a decimal number")
    shard = str(r.get("eventID") or "").rpartition(":")[0] or "shardId-unknown"
    data: Any
    try:
        data = json.loads(base64.b64decode(str(k.get("data") or ""), validate=True))
    except (ValueError, binascii.Error):
        data = None
    arrived = float(k.get("approximateArrivalTimestamp") or 0.0)
    return KinesisRecord(shard, seq, arrived, data, r)


def writer_name(function: str, shard: str) -> str:
    """The ``<function>`` part of a flush's file names: the function and the shard."""
    return f"{function}.{shard}"


# -- the state table -----------------------------------------------------------------------


def _s(value: str) -> dict[str, str]:
    return {"S": value}


def _n(value: float) -> dict[str, str]:
    return {"N": repr(float(value))}


@dataclass
class ShardState:
    """What the table says about one (function, shard)."""

    committed: str | None  # the last seq of the last finished flush
    pending: dict[str, Any] | None  # the intent of an unfinished flush
    pending_text: str | None  # the intent as stored (the commit's condition)

    @property
    def committed_number(self) -> int | None:
        return int(self.committed) if self.committed is not None else None


class StreamState:
    """The DynamoDB table of stream functions on Lambda (see the module docstring).

    One hash key ``id``: ``key|<function>:<column>|<value>`` items hold a
    dedup key's first arrival (``shard``, ``seq``, ``arrived``, TTL
    ``expires``); ``dropped|<function>:<column>|<shard>|<seq>`` items mark a
    record dropped as a duplicate (TTL ``expires``); ``shard|<function>|<shard>``
    items hold ``committed`` and the ``pending`` intent (no TTL). Sequence
    numbers are strings: Kinesis's have more digits than a DynamoDB number keeps.
    """

    def __init__(self, dynamo: Dynamo, namespace: str) -> None:
        self.db = dynamo
        self.table = dynamo.table_name(namespace, *STATE_TABLE)
        dynamo.ensure_table(self.table, [("id", "HASH", "S")], ttl_attribute="expires")

    @classmethod
    def from_url(cls, url: str, namespace: str) -> StreamState:
        """The table next to the ledger's: same ``dynamodb://`` URL and ``table_prefix``."""
        return cls(Dynamo(parse_url(url, "dynamodb", DYNAMO_OPTIONS), "stream state"), namespace)

    # -- dedup keys ----------------------------------------------------------------------

    @staticmethod
    def key_id(scope: str, key: str) -> str:
        return f"key|{scope}|{key}"

    def first_arrivals(self, scope: str, keys: Sequence[str]) -> dict[str, Arrival]:
        """The recorded first arrival of each key that has one (strongly consistent)."""
        items = self.db.batch_get(self.table, [{"id": _s(self.key_id(scope, k))} for k in keys])
        prefix = len(self.key_id(scope, ""))
        return {i["id"]["S"][prefix:]: _arrival(i) for i in items}

    def record_first(
        self, scope: str, key: str, me: Arrival, replacing: Arrival | None, expires: float
    ) -> tuple[bool, Arrival | None]:
        """Record ``me`` as the key's first arrival: (True, me), or (False, what is there now).

        Conditional: the key must be unrecorded, or still hold ``replacing``
        (an arrival more than a window old), so of two shards racing for one
        key exactly one wins and the other sees the winner.
        """
        from botocore.exceptions import ClientError

        item = {
            "id": _s(self.key_id(scope, key)),
            "shard": _s(me.shard),
            "seq": _s(me.seq),
            "arrived": _n(me.at),
            "expires": {"N": str(int(expires) + 1)},
        }
        kwargs: dict[str, Any] = {"ConditionExpression": "attribute_not_exists(id)"}
        if replacing is not None:
            kwargs = {
                "ConditionExpression": "#sh = :sh AND #sq = :sq",
                "ExpressionAttributeNames": {"#sh": "shard", "#sq": "seq"},
                "ExpressionAttributeValues": {
                    ":sh": _s(replacing.shard),
                    ":sq": _s(replacing.seq),
                },
            }
        try:
            self.db.call(
                lambda: self.db.client.put_item(TableName=self.table, Item=item, **kwargs),
                "record a dedup key",
            )
            return True, me
        except ClientError as e:
            if error_code(e) != "ConditionalCheckFailedException":
                raise
        got = self.db.call(
            lambda: self.db.client.get_item(
                TableName=self.table, Key={"id": item["id"]}, ConsistentRead=True
            ),
            "read a dedup key",
        ).get("Item")
        # None: deleted by TTL in between; the caller tries again on an empty key.
        return False, _arrival(got) if got is not None else None

    @staticmethod
    def dropped_id(scope: str, record: Arrival) -> str:
        return f"dropped|{scope}|{record.shard}|{record.seq}"

    def mark_dropped(self, scope: str, records: Sequence[Arrival], keep_for: float) -> None:
        """Remember the records dropped as duplicates, for a replay to decide the same.

        Needed only when a key's recorded arrival has moved on by a window
        since (see ``lambda_dedup``); written before the flush's files.
        """
        self.db.batch_write(
            self.table,
            [
                {
                    "PutRequest": {
                        "Item": {
                            "id": _s(self.dropped_id(scope, r)),
                            "expires": {"N": str(int(r.at + keep_for) + 1)},
                        }
                    }
                }
                for r in records
            ],
        )

    def was_dropped(self, scope: str, record: Arrival) -> bool:
        got = self.db.call(
            lambda: self.db.client.get_item(
                TableName=self.table,
                Key={"id": _s(self.dropped_id(scope, record))},
                ConsistentRead=True,
            ),
            "read a dropped record's mark",
        )
        return "Item" in got

    # -- shard checkpoints -----------------------------------------------------------------

    @staticmethod
    def shard_id(function: str, shard: str) -> str:
        return f"shard|{function}|{shard}"

    def shard(self, function: str, shard: str) -> ShardState:
        item = self.db.call(
            lambda: self.db.client.get_item(
                TableName=self.table,
                Key={"id": _s(self.shard_id(function, shard))},
                ConsistentRead=True,
            ),
            "read a shard checkpoint",
        ).get("Item")
        return _shard_state(item)

    def shards(self, function: str) -> dict[str, ShardState]:
        """Every shard ``function`` has flushed from, by shard id (a Scan: for status and compact).

        The Lambda side never lists: it reads its own shard's item. This is
        for whoever looks from outside, who does not know the shard ids.
        """
        head = f"shard|{function}|"
        out: dict[str, ShardState] = {}
        args: dict[str, Any] = {
            "TableName": self.table,
            "FilterExpression": "begins_with(#i, :h)",
            "ExpressionAttributeNames": {"#i": "id"},
            "ExpressionAttributeValues": {":h": _s(head)},
            "ConsistentRead": True,
        }
        while True:
            page = self.db.call(lambda: self.db.client.scan(**args), "list shard checkpoints")
            for item in page.get("Items", []):
                out[item["id"]["S"][len(head) :]] = _shard_state(item)
            if "LastEvaluatedKey" not in page:
                return dict(sorted(out.items()))
            args["ExclusiveStartKey"] = page["LastEvaluatedKey"]

    def plan(self, function: str, shard: str, committed: str | None, intent: str) -> None:
        """Step 1: the intent, if the checkpoint is still ``committed``."""
        cond = "attribute_not_exists(#c)" if committed is None else "#c = :c"
        values = {":p": _s(intent), ":t": _n(time.time())}
        if committed is not None:
            values[":c"] = _s(committed)
        self._update(
            function,
            shard,
            "SET #p = :p, #u = :t",
            cond,
            values,
            f"the checkpoint of {function} on {shard} moved (another invocation?)",
        )

    def commit(self, function: str, shard: str, to_seq: str, intent: str) -> None:
        """Step 3: the checkpoint moves to ``to_seq`` and the intent goes, if it is ours."""
        self._update(
            function,
            shard,
            "SET #c = :c, #u = :t REMOVE #p",
            "#p = :p",
            {":c": _s(to_seq), ":p": _s(intent), ":t": _n(time.time())},
            f"the flush intent of {function} on {shard} changed under us",
        )

    def _update(
        self,
        function: str,
        shard: str,
        update: str,
        condition: str,
        values: dict[str, Any],
        conflict: str,
    ) -> None:
        from botocore.exceptions import ClientError

        names = {"#c": "committed", "#p": "pending", "#u": "updated_at"}
        used = {k: v for k, v in names.items() if k in update or k in condition}
        try:
            self.db.call(
                lambda: self.db.client.update_item(
                    TableName=self.table,
                    Key={"id": _s(self.shard_id(function, shard))},
                    UpdateExpression=update,
                    ConditionExpression=condition,
                    ExpressionAttributeNames=used,
                    ExpressionAttributeValues=values,
                ),
                "update a shard checkpoint",
            )
        except ClientError as e:
            if error_code(e) == "ConditionalCheckFailedException":
                raise SluicewayError(conflict) from None
            raise

    def close(self) -> None:
        self.db.close()


def _shard_state(item: Mapping[str, Any] | None) -> ShardState:
    if not item:
        return ShardState(None, None, None)
    committed = item.get("committed", {}).get("S")
    text = item.get("pending", {}).get("S")
    return ShardState(committed, json.loads(text) if text else None, text)


def lambda_stream_state(pipeline: Pipeline) -> StreamState | None:
    """The state table of the pipeline's stream functions on Lambda, if there is one.

    Lambda keeps its checkpoints there, next to the DynamoDB ledger, so
    ``status`` and ``compact`` run with the same profile find them. Only
    looked up, never created: a pipeline whose stream functions run locally
    on a DynamoDB ledger has none.
    """
    from ..backends import scheme_of
    from ..config import expand_env

    url = pipeline.config.backends.ledger
    if url is None or scheme_of(url) != "dynamodb":
        return None
    if not any(fn.stream for fn in pipeline.config.functions.values()):
        return None
    dynamo = Dynamo(parse_url(expand_env(url), "dynamodb", DYNAMO_OPTIONS), "stream state")
    if not dynamo.exists(dynamo.table_name(pipeline.name, *STATE_TABLE)):
        dynamo.close()
        return None
    return StreamState(dynamo, pipeline.name)


def parse_writer(writer: str) -> tuple[str, str] | None:
    """``<function>.<shard>`` (the writer part of a Lambda flush's file names) → both parts."""
    function, dot, shard = writer.rpartition(".")
    return (function, shard) if dot and function and shard.startswith("shardId-") else None


def _arrival(item: Mapping[str, Any]) -> Arrival:
    return Arrival(item["shard"]["S"], item["seq"]["S"], float(item["arrived"]["N"]))


# -- the steps on Lambda ------------------------------------------------------------------------


@dataclass
class LambdaFlushContext(FlushContext):
    """A flush of one shard's batch: ``arrivals`` line up with the records' rows."""

    consumer: str = ""  # the stream function (``function`` also names the shard)
    shard: str = ""
    arrivals: list[Arrival] = field(default_factory=list)


def lambda_dedup(opts: DedupOptions, state: StreamState, retention: float) -> StepFn:
    """``dedup`` with its keys in DynamoDB, decided by each record's first arrival."""

    def decide(scope: str, key: str, rows: list[Arrival], stored: Arrival | None) -> list[bool]:
        out: list[bool] = []
        current = stored
        for me in rows:
            for _ in range(RACE_ATTEMPTS):
                if current is not None and current.same(me):
                    keep = True  # a replay of the record that was first
                    break
                if current is not None and abs(me.at - current.at) < opts.window:
                    keep = False  # another record of this key, within the window
                    break
                if current is not None and me.at < current.at:
                    # A window older than the recorded one (which replaced, since, the
                    # one this record was judged against): what was decided the first
                    # time? Only a dropped record leaves a mark.
                    keep = not state.was_dropped(scope, me)
                    break
                won, seen = state.record_first(
                    scope, key, me, current, me.at + opts.window + retention
                )
                if won:
                    current, keep = me, True
                    break
                current = seen  # another shard was first: decide against it
            else:
                raise SluicewayError(f"dedup key {key!r}: {RACE_ATTEMPTS} conditional writes lost")
            out.append(keep)
        return out

    def dedup(ctx: StepContext, batches: Batches | None) -> Batches:
        if not isinstance(ctx, LambdaFlushContext):
            raise SluicewayError("the Lambda dedup step runs in Lambda stream flushes only")
        scope = f"{ctx.consumer}:{opts.key}"
        ctx.stats.setdefault("duplicates", 0)
        offset = 0
        for batch in batches or []:
            for column in (opts.key, TIME_COLUMN):
                if column not in batch.schema.names:
                    raise SluicewayError(f"dedup needs column {column!r}")
            arrivals = ctx.arrivals[offset : offset + batch.num_rows]
            offset += batch.num_rows
            if len(arrivals) != batch.num_rows:
                raise SluicewayError("on Lambda, dedup must be the first step")
            keys = batch.column(opts.key).to_pylist()
            rows: dict[str, list[int]] = {}
            for i, k in enumerate(keys):
                if k is not None:
                    rows.setdefault(str(k), []).append(i)
            stored = state.first_arrivals(scope, list(rows))
            mask = [True] * batch.num_rows
            jobs = [
                (idx, key, [arrivals[i] for i in idx], stored.get(key)) for key, idx in rows.items()
            ]
            with ThreadPoolExecutor(max_workers=CLAIM_THREADS) as pool:
                decided = pool.map(lambda job: (job[0], decide(scope, *job[1:])), jobs)
                for idx, keeps in decided:
                    for i, keep in zip(idx, keeps, strict=True):
                        mask[i] = keep
            state.mark_dropped(
                scope,
                [a for a, keep in zip(arrivals, mask, strict=True) if not keep],
                opts.window + retention,
            )
            dropped = mask.count(False)
            if dropped:
                ctx.count("duplicates", dropped)
                ctx.count_by(batch.filter(pa.array([not m for m in mask])), "duplicates")
                batch = batch.filter(pa.array(mask))
            yield batch

    return dedup


# -- one stream function -----------------------------------------------------------------------


@dataclass
class FlushOutcome:
    """One flush of one shard's batch (or the part of it that was new)."""

    status: str  # done | duplicate | error | not_started
    shard: str
    from_seq: str
    to_seq: str
    detail: dict[str, Any] = field(default_factory=dict)


class LambdaStreamFunction:
    """A stream function answering Kinesis batches (see the module docstring)."""

    def __init__(
        self,
        pipeline: Pipeline,
        function: str,
        state: StreamState,
        dead_letters: Any,
        *,
        worker_id: str,
    ) -> None:
        cfg = pipeline.config
        fn = cfg.functions[function]
        assert fn.stream is not None, f"{function} is not a stream function"
        self.pipeline = pipeline
        self.function = function
        self.stream = fn.stream
        self.state = state
        self.dead_letters = dead_letters
        self.worker_id = worker_id
        retention = cfg.stream_config(fn.stream).retention
        self.retention = max(KINESIS_MIN_RETENTION, retention or 0.0)
        check_function(cfg, function)
        self.steps: list[StepFn] = []
        for raw in fn.steps:
            name, options = parse_step(raw)
            step_type = STEPS[name]
            if name == "dedup":
                opts = step_type.options(options)
                assert isinstance(opts, DedupOptions)
                self.steps.append(lambda_dedup(opts, state, self.retention))
            else:
                self.steps.append(step_type.build(options, cfg))

    def handle(self, records: Sequence[KinesisRecord], context: Any = None) -> list[FlushOutcome]:
        """Flush each shard's records; stops a shard at its first failure."""
        shards: dict[str, list[KinesisRecord]] = {}
        for r in records:
            shards.setdefault(r.shard, []).append(r)
        out: list[FlushOutcome] = []
        for shard, recs in shards.items():
            recs.sort(key=lambda r: r.number)
            out += self._shard(shard, recs, context)
        return out

    def _shard(self, shard: str, recs: list[KinesisRecord], context: Any) -> Iterator[FlushOutcome]:
        try:
            st = self.state.shard(self.function, shard)
        except Exception as e:
            log.exception("%s: reading the checkpoint of %s failed", self.function, shard)
            yield FlushOutcome("error", shard, recs[0].seq, recs[-1].seq, _error(e))
            return
        done = st.committed_number
        fresh = [r for r in recs if done is None or r.number > done]
        if len(fresh) < len(recs):
            old = recs[: len(recs) - len(fresh)]
            yield FlushOutcome(
                "duplicate",
                shard,
                old[0].seq,
                old[-1].seq,
                {"reason": f"committed up to {st.committed} already", "records": len(old)},
            )
        if not fresh:
            return
        pieces = [fresh]
        prior: list[dict[str, str]] = []
        if st.pending is not None:
            prior = list(st.pending["files"])
            lo, hi = int(st.pending["from_seq"]), int(st.pending["to_seq"])
            cut = next((i for i, r in enumerate(fresh) if r.number == hi), None)
            if fresh[0].number == lo and cut is not None:
                log.warning("%s: replaying the unfinished flush %s..%s", self.function, lo, hi)
                pieces = [fresh[: cut + 1], fresh[cut + 1 :]] if cut + 1 < len(fresh) else [fresh]
        committed = st.committed
        for n, piece in enumerate(pieces):
            if _out_of_time(context):
                yield FlushOutcome("not_started", shard, piece[0].seq, piece[-1].seq)
                return
            try:
                info = self._flush(shard, piece, prior if n == 0 else [], committed)
            except Exception as e:
                log.exception(
                    "%s: flush of %s %s..%s failed",
                    self.function,
                    shard,
                    piece[0].seq,
                    piece[-1].seq,
                )
                yield FlushOutcome("error", shard, piece[0].seq, piece[-1].seq, _error(e))
                return
            committed = piece[-1].seq
            yield FlushOutcome("done", shard, piece[0].seq, piece[-1].seq, info)

    def _flush(
        self,
        shard: str,
        recs: list[KinesisRecord],
        prior: list[dict[str, str]],
        committed: str | None,
    ) -> dict[str, Any]:
        started = time.time()
        lo, hi = recs[0], recs[-1]
        batch, rejected = records_to_batch(
            [Record(r.number, r.arrived, r.data) for r in recs]  # type: ignore[arg-type]
        )
        bad = {int(x["seq"]) for x in rejected}
        accepted = [r for r in recs if r.number not in bad]
        ctx = LambdaFlushContext(
            event=Event(
                source="sluiceway.stream",
                detail_type="Stream Flush",
                detail={
                    "stream": self.stream,
                    "shard": shard,
                    "function": self.function,
                    "from_seq": lo.seq,
                    "to_seq": hi.seq,
                },
                id=f"{self.stream}/{shard}:{lo.seq}-{hi.seq}",
            ),
            function=writer_name(self.function, shard),
            buckets=self.pipeline.buckets,
            tables=self.pipeline.tables,
            stream=self.stream,
            from_seq=lo.number,
            to_seq=hi.number,
            replay=bool(prior),
            consumer=self.function,
            shard=shard,
            arrivals=[Arrival(shard, r.seq, r.arrived) for r in accepted],
        )
        planned: list[str] = []

        def plan(files: list[dict[str, str]]) -> None:
            keys = {(f["bucket"], f["key"]) for f in files}
            stale = [f for f in prior if (f["bucket"], f["key"]) not in keys]
            intent = json.dumps(
                {"from_seq": lo.seq, "to_seq": hi.seq, "files": [*files, *stale]},
                separators=(",", ":"),
            )
            self.state.plan(self.function, shard, committed, intent)
            planned.append(intent)
            for f in stale:
                log.warning(
                    "%s: %s/%s is not rewritten; deleting it", self.function, f["bucket"], f["key"]
                )
                self.pipeline.bucket(f["bucket"]).delete(f["key"])

        ctx.plan_outputs = plan
        ctx.count("rows_in", len(recs))
        ctx.count_by(batch, "records")
        stream: Iterator[pa.RecordBatch] = iter([batch] if batch.num_rows else [])
        for step in self.steps:
            stream = step(ctx, stream)
        for _ in stream:  # drive the chain; the sink consumes everything
            pass
        if not planned:
            raise SluicewayError(f"function {self.function!r}: the last step planned no outputs")
        if rejected:
            ctx.count("rejected", len(rejected))
            self._reject(shard, recs, rejected)
        faults.point("after_commit")  # files published, the checkpoint not moved
        self.state.commit(self.function, shard, hi.seq, planned[-1])
        info = flush_info(
            ctx,
            rejected,
            from_seq=lo.seq,
            to_seq=hi.seq,
            worker=self.worker_id,
            started_at=started,
            shard=shard,
        )
        info["finished_at"] = time.time()
        self._record_in_ledger(shard, lo.seq, hi.seq, info)
        return info

    def _reject(
        self, shard: str, recs: list[KinesisRecord], rejected: list[dict[str, Any]]
    ) -> None:
        """Records that are not events go to the DLQ with why: never retried, never lost."""
        by_seq = {r.number: r for r in recs}
        for x in rejected:
            r = by_seq[int(x["seq"])]
            failure = {
                "error_type": "NotAnEvent",
                "message": x["reason"],
                "source": "kinesis",
                "shard": shard,
                "sequenceNumber": r.seq,
                "function": self.function,
                "at": time.time(),
            }
            self.dead_letters.send(
                json.dumps(dict(r.raw), default=str), failure, message_id=f"{shard}:{r.seq}"
            )

    def _record_in_ledger(self, shard: str, lo: str, hi: str, info: dict[str, Any]) -> None:
        """The flush as a finished ledger entry, for `sluiceway status` (best effort)."""
        ledger = self.pipeline.ledger
        key = flush_ledger_key(self.function, f"{self.stream}/{shard}", int(lo), int(hi))
        try:
            got = ledger.claim(key, function=self.function, owner=self.worker_id, ttl=60.0)
            if got is Claim.ACQUIRED:
                ledger.complete(key, owner=self.worker_id, info=info)
        except Exception:  # the flush is committed; only the summary is missing
            log.exception("%s: recording flush %s in the ledger failed", self.function, key)


def _error(e: BaseException) -> dict[str, Any]:
    return {"error_type": type(e).__name__, "message": str(e)[:2000]}


def _out_of_time(context: Any, margin_ms: int = 10_000) -> bool:
    remaining = getattr(context, "get_remaining_time_in_millis", None)
    return callable(remaining) and remaining() < margin_ms


def check_function(cfg: PipelineConfig, function: str) -> None:
    """What a stream function needs on Lambda beyond what it needs anywhere."""
    steps = [parse_step(raw)[0] for raw in cfg.functions[function].steps]
    if "dedup" in steps[1:]:
        raise ConfigError(
            [
                f"function {function!r}: on Lambda, dedup must be the first step (it decides "
                "by each record's shard and sequence number, which later steps do not carry)"
            ]
        )


def esm_settings(cfg: PipelineConfig, function: str) -> dict[str, int]:
    """The event source mapping's batching for a stream function: its sink's flush settings."""
    fn = cfg.functions[function]
    name, options = parse_step(fn.steps[-1])
    sink = STEPS[name].options(options)
    records = int(getattr(sink, "flush_records", KINESIS_MAX_BATCH))
    seconds = float(getattr(sink, "flush_seconds", 60.0))
    return {
        "batch_size": max(1, min(KINESIS_MAX_BATCH, records)),
        "maximum_batching_window_in_seconds": max(0, min(KINESIS_MAX_WINDOW, round(seconds))),
    }
