"""Queues and topics on Redis Streams: SQS semantics on a server every worker can reach.

Layout, for a queue ``NAME`` under the URL's prefix ``P`` (``?prefix=``,
default ``sluiceway:<pipeline>`` for the broker), with ``Q = P:q:NAME``:

``Q:s``
    The stream, with one consumer group. An entry is a pointer (field
    ``id``) to a message that is *visible*; the group hands each entry out
    once, and while a worker holds the message the entry sits in the group's
    pending list (``XPENDING`` shows which host has what).
``Q:m:<id>``
    The message: body, attributes, receive count, current receipt, failure
    record, and which stream entry points at it. Its existence is also the
    dedup record: a known id is not queued again while it is in the queue.
``Q:i`` / ``Q:d``
    Sorted sets of deadlines (ms, server clock): in flight until, delayed
    until. A dead-lettered message of a queue without a DLQ is parked in
    ``Q:d`` at ``+inf``, never dropped.
``Q:a`` / ``Q:n``
    Every message in send order (for ``peek``, ``purge``, ``counts``), and
    the sequence that orders it.

Why deadlines live in sorted sets and not only in the pending list's idle
time: SQS lets a worker hide a message for *any* time from now (a heartbeat,
a 5 s "busy" pause, a retry backoff longer than the visibility timeout).
``XCLAIM IDLE``/``TIME`` can only move a delivery into the past, and
``XAUTOCLAIM`` takes one minimum idle time per call, so idle time can only
express "hidden for exactly the visibility timeout". A message whose
deadline passes is moved back to the tail of the stream (``XACK`` + ``XDEL``
of the old entry, ``XADD`` of a new one) by whoever receives next.

Every state change is one Lua script, so it is atomic and there is no
window in which a crash leaves a message half-moved: the stream entry, the
pending list, the deadline sets and the message hash always agree. The
message is handed out by ``XREADGROUP`` *inside* the receive script, so the
receive count, the fresh receipt and the deadline are written in the same
step. Long polling blocks on a plain ``XREAD BLOCK`` from the stream's last
id: it wakes when a message is added but consumes nothing, so a connection
lost while blocked cannot strand a delivered-but-unrecorded entry (which a
blocking ``XREADGROUP`` could).

Time is the Redis server's (``TIME`` inside the scripts): workers on
machines whose clocks disagree still agree on every deadline.

Needs Redis 6.2 or newer, standalone. The scripts derive per-message keys
from the queue's base key, so Redis Cluster (and servers that insist on
declared keys, like Dragonfly by default) are not supported.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar
from urllib.parse import parse_qsl, urlencode, urlsplit

try:
    import redis
    from redis.backoff import NoBackoff
    from redis.retry import Retry
except ImportError as e:  # pragma: no cover - depends on the installation
    raise ImportError(
        f"the Redis backend needs the redis package ({e}): pip install 'sluiceway[redis]'"
    ) from None

from .. import health
from ..connections import Backoff, display_url
from ..errors import ConfigError, SluicewayError
from .base import Broker, Message, OutgoingMessage, Queue, QueueCounts, QueueSpec
from .conventions import broker_prefix

log = logging.getLogger("sluiceway.redis")

T = TypeVar("T")

DEFAULT_PREFIX = "sluiceway"
GROUP = "sluiceway"
MIN_VERSION = (6, 2)

# A blocked receive re-checks at least this often: a deadline another client
# moved earlier (a short retry backoff) does not add to the stream, so nothing
# would wake the block for it.
POLL_CAP = 0.25
# How long an operation keeps reconnecting (with backoff) before it gives up
# with RedisUnavailable; ``?retry_for=`` in the URL changes it.
DEFAULT_RETRY_FOR = 30.0
STARTUP_ATTEMPTS = 3
# Our own URL options; the rest of the query goes to redis-py.
OWN_OPTIONS = ("prefix", "retry_for")


class RedisUnavailable(SluicewayError):
    """The Redis server cannot be reached (at start, or for longer than ``retry_for``)."""


# -- connection ----------------------------------------------------------------


@dataclass(frozen=True)
class RedisTarget:
    """A ``redis://`` URL split into what redis-py takes and what is ours."""

    client_url: str  # for redis-py: our own query options removed
    display: str  # for messages: password hidden
    prefix: str
    retry_for: float
    prefix_given: bool = False  # in the URL, rather than the default


def parse_url(url: str) -> RedisTarget:
    """Split ``redis://[:password@]host:port/db[/prefix][?prefix=…&retry_for=…]``.

    The key prefix comes from ``?prefix=`` or from the path after the database
    number; everything Sluiceway writes lives under it, so several pipelines
    (or test runs) can share one database.
    """
    parts = urlsplit(url)
    display = display_url(url)
    query = parse_qsl(parts.query, keep_blank_values=True)
    own = {k: v for k, v in query if k in OWN_OPTIONS}
    rest = [(k, v) for k, v in query if k not in OWN_OPTIONS]
    segments = [s for s in parts.path.split("/") if s]
    db = segments[0] if segments else ""
    if db and not db.isdigit():
        raise ConfigError([f"redis URL {display!r}: the path must start with a database number"])
    given = own.get("prefix") or "/".join(segments[1:])
    prefix = given or DEFAULT_PREFIX
    try:
        retry_for = float(own.get("retry_for", DEFAULT_RETRY_FOR))
    except ValueError:
        problem = f"redis URL {display!r}: retry_for must be a number of seconds"
        raise ConfigError([problem]) from None
    client_url = parts._replace(path=f"/{db}" if db else "", query=urlencode(rest)).geturl()
    return RedisTarget(client_url, display, prefix, retry_for, bool(given))


class RedisConnection:
    """A redis-py client (thread-safe, pooled) that reconnects with backoff.

    redis-py's own retries are off: ``call`` retries the *whole* operation (a
    script, a MULTI block), with exponential backoff and jitter, for up to
    ``retry_for`` seconds, then raises ``RedisUnavailable``. Nothing is ever
    given up silently. Every operation is written to be safe to repeat when
    the first attempt's reply was lost: sends carry their ids (deduplicated),
    acks and visibility changes check the receipt, and a repeated receive at
    worst hides its messages until their visibility timeout.
    """

    def __init__(self, client: redis.Redis, target: RedisTarget, what: str) -> None:
        self.client = client
        self.target = target
        self.what = what

    @classmethod
    def open(cls, url: str, what: str) -> RedisConnection:
        """Connect and check the server once, failing with one clear error."""
        target = parse_url(url)
        options: dict[str, Any] = {
            "decode_responses": True,
            "retry": Retry(NoBackoff(), 0),
            "socket_timeout": 10.0,
            "socket_connect_timeout": 5.0,
            "health_check_interval": 30,
            "client_name": f"sluiceway-{what}-{socket.gethostname()}-{os.getpid()}",
        }
        client = redis.Redis.from_url(target.client_url, **options)
        conn = cls(client, target, what)
        conn._check()
        return conn

    def _check(self) -> None:
        started = time.monotonic()
        last: Exception | None = None
        for attempt in range(1, STARTUP_ATTEMPTS + 1):
            try:
                version = str(self.client.info("server").get("redis_version", "0"))
                break
            except redis.AuthenticationError as e:
                self.client.close()
                raise RedisUnavailable(
                    f"the Redis server for the {self.what} at {self.target.display} refused "
                    f"the credentials: {e}. Check the user and password in the profile's "
                    f"{self.what} URL (passwords come from ${{VARIABLES}})."
                ) from None
            except (redis.ConnectionError, redis.TimeoutError) as e:
                last = e
                if attempt < STARTUP_ATTEMPTS:
                    time.sleep(0.25 * attempt)
        else:
            self.client.close()
            raise RedisUnavailable(
                f"cannot reach the Redis server for the {self.what} at {self.target.display}: "
                f"tried to connect {STARTUP_ATTEMPTS} times over "
                f"{time.monotonic() - started:.1f}s, last error: {str(last).rstrip('.')}. "
                "Is redis-server "
                f"running and reachable from here? Check the profile's {self.what} URL."
            ) from None
        have = tuple(int(p) for p in version.split(".")[:2] if p.isdigit())
        if have < MIN_VERSION:
            self.client.close()
            raise RedisUnavailable(
                f"the Redis server for the {self.what} at {self.target.display} runs "
                f"{version}; Sluiceway needs {'.'.join(map(str, MIN_VERSION))} or newer"
            )

    def call(self, fn: Callable[[], T], what: str) -> T:
        """Run ``fn``; on a lost connection reconnect with backoff and run it again."""
        started = time.monotonic()
        backoff = Backoff()
        attempt = 0
        while True:
            try:
                result = fn()
            except redis.AuthenticationError:
                raise
            except (redis.ConnectionError, redis.TimeoutError) as e:
                health.lost("redis", self.target.display, e)
                attempt += 1
                waited = time.monotonic() - started
                pause = backoff.current
                if waited + pause > self.target.retry_for:
                    raise RedisUnavailable(
                        f"lost the Redis server for the {self.what} at {self.target.display} "
                        f"during {what}: {attempt} attempts over {waited:.1f}s, last error: {e}"
                    ) from e
                log.warning(
                    "redis %s at %s: %s failed (%s); retrying in %.2fs",
                    self.what,
                    self.target.display,
                    what,
                    e,
                    pause,
                )
                time.sleep(backoff.next())
            else:
                health.ok("redis", self.target.display)
                return result

    def close(self) -> None:
        self.client.close()


def delete_prefix(client: redis.Redis, prefix: str) -> int:
    """Delete every key under ``prefix`` (SCAN, in batches). For tests and teardown."""
    pattern = "".join("\\" + c if c in "*?[]\\" else c for c in prefix) + "*"
    n = 0
    batch: list[str] = []
    for key in client.scan_iter(match=pattern, count=1000):
        batch.append(key)
        if len(batch) >= 500:
            n += client.unlink(*batch)
            batch.clear()
    if batch:
        n += client.unlink(*batch)
    return n


# -- the scripts ----------------------------------------------------------------

# Shared by every script. ``q`` is a queue's base key; see the module docstring.
_LUA_COMMON = """
local GROUP = 'sluiceway'

local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

local function seconds(ms)
  return string.format('%.3f', ms / 1000)
end

local function ensure_group(q)
  if redis.call('EXISTS', q .. ':s') == 0 then
    redis.call('XGROUP', 'CREATE', q .. ':s', GROUP, '0', 'MKSTREAM')
  end
end

-- Visible now, at the tail of the stream.
local function enqueue(q, id)
  ensure_group(q)
  local e = redis.call('XADD', q .. ':s', '*', 'id', id)
  redis.call('HSET', q .. ':m:' .. id, 'entry', e, 'state', 'ready')
end

-- Out of the stream, the pending list and the deadline sets; the hash stays.
local function unlink(q, id)
  local m = q .. ':m:' .. id
  local e = redis.call('HGET', m, 'entry')
  if e and e ~= '' then
    redis.pcall('XACK', q .. ':s', GROUP, e)
    redis.call('XDEL', q .. ':s', e)
    redis.call('HSET', m, 'entry', '')
  end
  redis.call('ZREM', q .. ':i', id)
  redis.call('ZREM', q .. ':d', id)
end

local function drop(q, id)
  unlink(q, id)
  redis.call('ZREM', q .. ':a', id)
  redis.call('DEL', q .. ':m:' .. id)
end

-- A message in q (replacing any with the same id), visible at `at` (ms).
local function create(q, id, fields, at, now)
  drop(q, id)
  redis.call('HSET', q .. ':m:' .. id, unpack(fields))
  redis.call('ZADD', q .. ':a', redis.call('INCR', q .. ':n'), id)
  if at > now then
    redis.call('ZADD', q .. ':d', at, id)
    redis.call('HSET', q .. ':m:' .. id, 'entry', '', 'state', 'delayed')
  else
    enqueue(q, id)
  end
end

-- To the dead-letter queue with the failure record; parked if there is none.
local function dead_letter(q, id, failure, dlq, name, now)
  local m = q .. ':m:' .. id
  if dlq == '' then
    unlink(q, id)
    redis.call('HSET', m, 'failure', failure, 'receipt', '', 'state', 'parked')
    redis.call('ZADD', q .. ':d', '+inf', id)
    return
  end
  local f = redis.call('HMGET', m, 'body', 'attrs', 'sent_at', 'rc')
  drop(q, id)
  create(dlq, id, {'body', f[1], 'attrs', f[2], 'sent_at', f[3], 'rc', f[4], 'receipt', '',
    'failure', failure, 'from', name, 'dl_at', seconds(now)}, now, now)
end
"""

# KEYS[1] queue; ARGV: groups of (id, body, attributes JSON, delay ms).
_LUA_SEND = """
local q = KEYS[1]
local now = now_ms()
for i = 1, #ARGV, 4 do
  local id = ARGV[i]
  if redis.call('EXISTS', q .. ':m:' .. id) == 0 then
    create(q, id, {'body', ARGV[i + 1], 'attrs', ARGV[i + 2], 'sent_at', seconds(now),
      'rc', 0, 'receipt', '', 'failure', '', 'from', '', 'dl_at', ''},
      now + tonumber(ARGV[i + 3]), now)
  end
end
return 1
"""

# KEYS[1] queue, KEYS[2] its DLQ ('' for none);
# ARGV: max messages, visibility ms, max receive count, consumer, queue name, receipts...
# Returns {messages, next deadline ms or -1, last stream id, server time ms}.
_LUA_RECEIVE = """
local q, dlq = KEYS[1], KEYS[2]
local n, vt, max_rc = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local consumer, name = ARGV[4], ARGV[5]
local now = now_ms()
ensure_group(q)
for _, z in ipairs({':d', ':i'}) do
  for _, id in ipairs(redis.call('ZRANGEBYSCORE', q .. z, '-inf', now, 'LIMIT', 0, 100)) do
    unlink(q, id)
    enqueue(q, id)
  end
end
local out = {}
local r = 6
local rounds = 0
local more = false
while #out < n do
  rounds = rounds + 1
  if rounds > 10 then more = true break end
  local res = redis.call('XREADGROUP', 'GROUP', GROUP, consumer, 'COUNT', n - #out,
    'STREAMS', q .. ':s', '>')
  if not res then break end
  for _, ent in ipairs(res[1][2]) do
    local eid, id = ent[1], ent[2][2]
    local m = q .. ':m:' .. id
    if redis.call('HGET', m, 'entry') ~= eid then
      -- points at nothing (cannot happen through these scripts): clear it
      redis.call('XACK', q .. ':s', GROUP, eid)
      redis.call('XDEL', q .. ':s', eid)
    else
      local f = redis.call('HMGET', m, 'body', 'attrs', 'sent_at', 'rc', 'failure', 'from', 'dl_at')
      local rc = tonumber(f[4])
      if rc >= max_rc then
        -- received that often without an ack or a recorded failure: the worker
        -- died each time. Stop the crash loop here.
        local failure = f[5]
        if failure == '' then
          failure = cjson.encode({error_type = 'MaxReceiveCountExceeded',
            message = 'received ' .. rc .. ' times without being acked '
              .. '(the worker died or timed out each time)'})
        end
        dead_letter(q, id, failure, dlq, name, now)
      else
        rc = rc + 1
        local receipt = ARGV[r]
        r = r + 1
        redis.call('HSET', m, 'rc', rc, 'receipt', receipt, 'state', 'inflight')
        redis.call('ZADD', q .. ':i', now + vt, id)
        out[#out + 1] = {id, f[1], f[2], rc, receipt, f[3], f[5], f[6], f[7]}
      end
    end
  end
end
local due = -1
if more then due = now end
for _, z in ipairs({':d', ':i'}) do
  local first = redis.call('ZRANGE', q .. z, 0, 0, 'WITHSCORES')
  local s = tonumber(first[2])
  if s and s < 1e15 and (due < 0 or s < due) then due = s end
end
local last = redis.call('XREVRANGE', q .. ':s', '+', '-', 'COUNT', 1)
local last_id = '0-0'
if last[1] then last_id = last[1][1] end
return {out, due, last_id, now}
"""

# KEYS[1] queue; ARGV: pairs of (id, receipt). Returns how many were deleted.
_LUA_ACK = """
local q = KEYS[1]
local n = 0
for i = 1, #ARGV, 2 do
  local id, receipt = ARGV[i], ARGV[i + 1]
  if receipt ~= '' and redis.call('HGET', q .. ':m:' .. id, 'receipt') == receipt then
    drop(q, id)
    n = n + 1
  end
end
return n
"""

# KEYS[1] queue; ARGV: id, receipt, hide ms, '1' to set the failure, failure JSON.
_LUA_VISIBILITY = """
local q, id, receipt = KEYS[1], ARGV[1], ARGV[2]
local m = q .. ':m:' .. id
if receipt == '' or redis.call('HGET', m, 'receipt') ~= receipt then return 0 end
if ARGV[4] == '1' then redis.call('HSET', m, 'failure', ARGV[5]) end
local now = now_ms()
local at = now + tonumber(ARGV[3])
if at <= now then
  unlink(q, id)
  enqueue(q, id)  -- an XADD: wakes blocked receivers at once
else
  if redis.call('HGET', m, 'state') ~= 'inflight' then unlink(q, id) end
  redis.call('ZADD', q .. ':i', at, id)
  redis.call('HSET', m, 'state', 'inflight')
end
return 1
"""

# KEYS[1] queue, KEYS[2] its DLQ ('' for none); ARGV: id, receipt ('' = any), failure, name.
_LUA_DEAD = """
local q, id, receipt = KEYS[1], ARGV[1], ARGV[2]
local current = redis.call('HGET', q .. ':m:' .. id, 'receipt')
if not current then return 0 end
if receipt ~= '' and current ~= receipt then return 0 end
dead_letter(q, id, ARGV[3], KEYS[2], ARGV[4], now_ms())
return 1
"""

# KEYS[1] from, KEYS[2] to; ARGV: ids. Visible now, receive count reset.
_LUA_REDRIVE = """
local src, dst = KEYS[1], KEYS[2]
local now = now_ms()
local moved = 0
for i = 1, #ARGV do
  local id = ARGV[i]
  local m = src .. ':m:' .. id
  if redis.call('EXISTS', m) == 1 then
    local f = redis.call('HMGET', m, 'body', 'attrs', 'sent_at', 'failure', 'from', 'dl_at')
    drop(src, id)
    create(dst, id, {'body', f[1], 'attrs', f[2], 'sent_at', f[3], 'rc', 0, 'receipt', '',
      'failure', f[4], 'from', f[5], 'dl_at', f[6]}, now, now)
    moved = moved + 1
  end
end
return moved
"""

# KEYS[1] queue; ARGV: ids. Removes them whatever their state (copied elsewhere).
_LUA_DELETE = """
local n = 0
for i = 1, #ARGV do
  n = n + redis.call('EXISTS', KEYS[1] .. ':m:' .. ARGV[i])
  drop(KEYS[1], ARGV[i])
end
return n
"""

# KEYS[1] queue. Returns how many messages were deleted.
_LUA_PURGE = """
local q = KEYS[1]
local ids = redis.call('ZRANGE', q .. ':a', 0, -1)
for i = 1, #ids, 500 do
  local keys = {}
  for j = i, math.min(i + 499, #ids) do keys[#keys + 1] = q .. ':m:' .. ids[j] end
  redis.call('DEL', unpack(keys))
end
redis.call('DEL', q .. ':s', q .. ':i', q .. ':d', q .. ':a')
ensure_group(q)
return #ids
"""

# KEYS[1] queue. Returns {visible, in flight, delayed} at the server's now.
_LUA_COUNTS = """
local q = KEYS[1]
local now = now_ms()
local total = redis.call('ZCARD', q .. ':a')
local inflight = redis.call('ZCOUNT', q .. ':i', string.format('(%d', now), '+inf')
local delayed = redis.call('ZCOUNT', q .. ':d', string.format('(%d', now), '+inf')
return {total - inflight - delayed, inflight, delayed}
"""


class _Scripts:
    """The queue scripts, registered with one client (EVALSHA, loaded on demand)."""

    def __init__(self, client: redis.Redis) -> None:
        def script(body: str) -> Any:
            return client.register_script(_LUA_COMMON + body)

        self.send = script(_LUA_SEND)
        self.receive = script(_LUA_RECEIVE)
        self.ack = script(_LUA_ACK)
        self.visibility = script(_LUA_VISIBILITY)
        self.dead = script(_LUA_DEAD)
        self.redrive = script(_LUA_REDRIVE)
        self.delete = script(_LUA_DELETE)
        self.purge = script(_LUA_PURGE)
        self.counts = script(_LUA_COUNTS)


def _ms(seconds: float) -> int:
    return max(0, round(seconds * 1000))


def _message(
    name: str,
    id: str,
    body: str,
    attrs: str,
    receive_count: Any,
    receipt: str,
    sent_at: str,
    failure: str,
    dead_from: str,
    dead_at: str,
) -> Message:
    attributes = json.loads(attrs) if attrs else {}
    if dead_from:  # kept beside the attributes, so moving them never re-encodes user JSON
        attributes["source_queue"] = dead_from
        attributes["dead_lettered_at"] = float(dead_at)
    return Message(
        id=id,
        queue=name,
        body=body,
        attributes=attributes,
        receive_count=int(receive_count),
        receipt=receipt,
        sent_at=float(sent_at or 0),
        failure=json.loads(failure) if failure else None,
    )


# -- queues and the broker -------------------------------------------------------


class RedisQueue(Queue):
    """One queue: a stream, its consumer group, and the message hashes and deadlines."""

    def __init__(self, broker: RedisBroker, spec: QueueSpec) -> None:
        self.spec = spec
        self._broker = broker
        self._conn = broker.conn
        self._scripts = broker.scripts
        self.key = broker.key(spec.name)
        self._stream = f"{self.key}:s"

    def __repr__(self) -> str:
        return f"RedisQueue({self.name!r}, {self._conn.target.display!r})"

    def _dlq_key(self) -> str:
        dlq = self.spec.dead_letter_queue
        return "" if dlq is None else self._broker.key(dlq)

    def _send_args(self, messages: Sequence[OutgoingMessage], ids: Sequence[str]) -> list[Any]:
        args: list[Any] = []
        for mid, m in zip(ids, messages, strict=True):
            delay = self.spec.delay if m.delay is None else m.delay
            args += [mid, m.body, json.dumps(m.attributes), _ms(delay)]
        return args

    def send_batch(self, messages: Sequence[OutgoingMessage]) -> list[str]:
        # Ids are fixed before the first attempt, so a retry after a lost reply
        # is deduplicated instead of queueing the batch twice.
        ids = [m.id or str(uuid.uuid4()) for m in messages]
        if not messages:
            return ids
        args = self._send_args(messages, ids)
        self._conn.call(lambda: self._scripts.send(keys=[self.key], args=args), "send")
        return ids

    def _receive_once(self, max_messages: int) -> tuple[list[Message], int, str, int]:
        head = [
            max_messages,
            _ms(self.spec.visibility_timeout),
            self.spec.max_receive_count,
            self._broker.consumer,
            self.name,
        ]

        def attempt() -> Any:
            # Fresh receipts per attempt. If a reply is lost, the messages that
            # attempt took are held by nobody and return after the visibility timeout.
            receipts = [uuid.uuid4().hex for _ in range(max_messages)]
            return self._scripts.receive(keys=[self.key, self._dlq_key()], args=head + receipts)

        rows, due, last_id, now = self._conn.call(attempt, "receive")
        return [_message(self.name, *row) for row in rows], int(due), last_id, int(now)

    def receive(self, max_messages: int = 1, *, wait: float = 0.0) -> list[Message]:
        if max_messages <= 0:
            return []
        deadline = time.monotonic() + wait
        while True:
            got, due, last_id, now = self._receive_once(max_messages)
            remaining = deadline - time.monotonic()
            if got or remaining <= 0:
                return got
            pause = min(remaining, POLL_CAP)
            if due >= 0:
                pause = min(pause, max(0.0, (due - now) / 1000))
            block = round(pause * 1000)
            if block >= 1:  # 0 would mean "block forever"
                # Wakes on any XADD after last_id; consumes nothing.
                self._conn.call(
                    lambda b=block, after=last_id: self._conn.client.xread(
                        {self._stream: after}, count=1, block=b
                    ),
                    "wait",
                )

    def ack(self, messages: Sequence[Message]) -> int:
        if not messages:
            return 0
        args: list[str] = []
        for m in messages:
            args += [m.id, m.receipt]
        return int(self._conn.call(lambda: self._scripts.ack(keys=[self.key], args=args), "ack"))

    def _hide(self, message: Message, seconds: float, failure: dict[str, Any] | None) -> bool:
        args = [
            message.id,
            message.receipt,
            _ms(seconds),
            "0" if failure is None else "1",
            "" if failure is None else json.dumps(failure, default=str),
        ]
        return bool(
            self._conn.call(
                lambda: self._scripts.visibility(keys=[self.key], args=args), "change visibility"
            )
        )

    def change_visibility(self, message: Message, seconds: float) -> bool:
        return self._hide(message, seconds, None)

    def record_failure(self, message: Message, failure: dict[str, Any], retry_in: float) -> bool:
        return self._hide(message, retry_in, failure)

    def dead_letter(self, message: Message, failure: dict[str, Any]) -> None:
        """Move the message (this receive of it) to the DLQ, or park it if there is none.

        A receipt that is no longer current is ignored: someone else holds the
        message now and decides its fate.
        """
        args = [message.id, message.receipt, json.dumps(failure, default=str), self.name]
        moved = self._conn.call(
            lambda: self._scripts.dead(keys=[self.key, self._dlq_key()], args=args),
            "dead-letter",
        )
        if not moved:
            log.warning(
                "message %s of %s not dead-lettered: gone, or received again since",
                message.id,
                self.name,
            )

    def counts(self) -> QueueCounts:
        visible, in_flight, delayed = self._conn.call(
            lambda: self._scripts.counts(keys=[self.key]), "counts"
        )
        return QueueCounts(visible=int(visible), in_flight=int(in_flight), delayed=int(delayed))

    def _ids(self, limit: int) -> list[str]:
        return self._conn.call(
            lambda: self._conn.client.zrange(f"{self.key}:a", 0, limit - 1), "peek"
        )

    def peek(self, limit: int = 100) -> list[Message]:
        if limit <= 0:
            return []
        ids = self._ids(limit)
        fields = ("body", "attrs", "rc", "sent_at", "failure", "from", "dl_at")

        def fetch() -> list[Any]:
            pipe = self._conn.client.pipeline(transaction=False)
            for mid in ids:
                pipe.hmget(f"{self.key}:m:{mid}", fields)
            return pipe.execute()

        out = []
        for mid, row in zip(ids, self._conn.call(fetch, "peek"), strict=True):
            if row[0] is None:  # acked between the two reads
                continue
            body, attrs, rc, sent_at, failure, dead_from, dead_at = row
            # No receipt: a peek is not a receive and proves nothing.
            out.append(
                _message(self.name, mid, body, attrs, rc, "", sent_at, failure, dead_from, dead_at)
            )
        return out

    def redrive(self, to: Queue, ids: Sequence[str] | None = None) -> int:
        if not (isinstance(to, RedisQueue) and to._broker is self._broker):
            return self._redrive_across(to, ids)
        if ids is None:  # everything here now; later arrivals stay
            wanted: list[str] = self._conn.call(
                lambda: self._conn.client.zrange(f"{self.key}:a", 0, -1), "redrive"
            )
        else:
            wanted = list(ids)
        moved = 0
        for i in range(0, len(wanted), 500):
            chunk = wanted[i : i + 500]
            moved += int(
                self._conn.call(
                    lambda c=chunk: self._scripts.redrive(keys=[self.key, to.key], args=c),
                    "redrive",
                )
            )
        return moved

    def _redrive_across(self, to: Queue, ids: Sequence[str] | None) -> int:
        """To a queue of another broker: send there first, then delete here.

        A crash in between leaves the message in both places (delivered
        twice, which the ledger absorbs), never in neither.
        """
        wanted = set(ids) if ids is not None else None
        moved = 0
        for msg in self.peek(limit=1_000_000):
            if wanted is not None and msg.id not in wanted:
                continue
            to.send(msg.body, attributes=msg.attributes, id=msg.id)
            self._conn.call(
                lambda m=msg: self._scripts.delete(keys=[self.key], args=[m.id]), "redrive"
            )
            moved += 1
        return moved

    def purge(self) -> int:
        return int(self._conn.call(lambda: self._scripts.purge(keys=[self.key]), "purge"))


class RedisBroker(Broker):
    """Queues as Redis Streams; a topic is config: publish adds to each subscriber's stream."""

    def __init__(
        self,
        conn: RedisConnection,
        specs: Mapping[str, QueueSpec],
        subscriptions: Mapping[str, Sequence[str]] | None = None,
        *,
        pipeline: str | None = None,
    ) -> None:
        self.conn = conn
        given = conn.target.prefix if conn.target.prefix_given else None
        self.prefix = broker_prefix(given, pipeline, DEFAULT_PREFIX, DEFAULT_PREFIX + ":{pipeline}")
        self.specs = dict(specs)
        self.subscriptions = {t: list(qs) for t, qs in (subscriptions or {}).items()}
        self.scripts = _Scripts(conn.client)
        # One consumer per host: the pending list shows where a message is;
        # correctness never depends on the name (deadlines are in sorted sets).
        self.consumer = socket.gethostname()
        self._queues: dict[str, RedisQueue] = {}

    @classmethod
    def from_url(
        cls,
        url: str,
        specs: Mapping[str, QueueSpec],
        subscriptions: Mapping[str, Sequence[str]] | None = None,
        *,
        pipeline: str | None = None,
    ) -> RedisBroker:
        """``redis://host:port/db?prefix=…``: connects now, so a wrong URL fails at start."""
        return cls(RedisConnection.open(url, "broker"), specs, subscriptions, pipeline=pipeline)

    def __repr__(self) -> str:
        return f"RedisBroker({self.conn.target.display!r})"

    def key(self, name: str) -> str:
        """The base key of queue ``name``: every key of the queue starts with it."""
        return f"{self.prefix}:q:{name}"

    def queue(self, name: str) -> RedisQueue:
        q = self._queues.get(name)
        if q is None:
            spec = self.specs.get(name)
            if spec is None:
                raise KeyError(f"unknown queue {name!r}")
            q = self._queues[name] = RedisQueue(self, spec)
        return q

    def publish(self, topic: str, messages: Sequence[OutgoingMessage]) -> None:
        """One MULTI block: every subscription gets every message, or none does."""
        names = self.subscriptions.get(topic)
        if names is None:
            raise KeyError(f"unknown topic {topic!r}")
        if not messages or not names:
            return
        ids = [m.id or str(uuid.uuid4()) for m in messages]
        queues = [self.queue(n) for n in names]
        batches = [(q.key, q._send_args(messages, ids)) for q in queues]

        def run() -> None:
            pipe = self.conn.client.pipeline(transaction=True)
            for key, args in batches:
                self.scripts.send(keys=[key], args=args, client=pipe)
            pipe.execute()

        self.conn.call(run, f"publish to {topic}")

    def close(self) -> None:
        self.conn.close()
