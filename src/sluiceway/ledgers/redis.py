"""The ledger in Redis: claims, seen object versions and sent ids, shared by every worker.

Keys, all under ``L = <prefix>:ledger:<namespace>`` (the prefix from the URL,
``?prefix=`` or the path after the database number, default ``sluiceway``;
the namespace is the pipeline's name):

``L:e:<key>``
    One hash per entry: function, status, owner, expires_at, attempts,
    created_at, updated_at and ``info`` as JSON.
``L:counts``
    ``function NUL status`` → how many entries (``function_counts``), kept
    in step by the same scripts that change a status.
``L:done``
    Keys of finished entries, all at score 0, so ``ZRANGEBYLEX`` finds the
    other versions of one input by key prefix (no LIKE, nothing to escape),
    and ``done_infos`` walks them.
``L:upd`` / ``L:id:<identity>``
    Keys by ``updated_at`` (``entries_since``) and, per input identity
    (the part after ``function|``), by ``created_at`` (``entries_for``).
``L:o:<bucket>/<key>`` / ``L:ov:<bucket>/<key>``
    The versions an event was raised for: etag → JSON details, and etags by
    the time they were first seen.
``L:sent``
    Sent message ids by the time they were marked (``forget_sent`` trims it).

Every change that must be atomic is one Lua script: a claim acquires only if
the entry is absent, failed, or an expired ``in_progress``; finishing checks
the owner; ``first_seen`` is an ``HSETNX``. Times come from the server's
clock (``TIME``), so expiry means the same thing to every worker whatever
its own clock says. The connection (pooling, reconnecting with backoff, the
one clear error when the server cannot be reached) is shared with the Redis
broker.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from typing import Any

from ..ledger import Claim, Entry, Ledger
from ..queues.redis import RedisConnection

_LUA_COMMON = """
local function now_s()
  local t = redis.call('TIME')
  return tonumber(t[1]) + tonumber(t[2]) / 1e6
end

local function fmt(x)
  return string.format('%.6f', x)
end

-- Move an entry's count from one status to another (either may be nil).
local function recount(L, fn, old, new)
  if old then redis.call('HINCRBY', L .. ':counts', fn .. '\\0' .. old, -1) end
  if new then redis.call('HINCRBY', L .. ':counts', fn .. '\\0' .. new, 1) end
end

local function touched(L, key, now)
  redis.call('ZADD', L .. ':upd', now, key)
end
"""

# KEYS: L; ARGV: bucket/key, etag, details JSON (seen_at is added here).
_LUA_FIRST_SEEN = """
local L, obj, etag = KEYS[1], ARGV[1], ARGV[2]
local now = now_s()
local details = string.sub(ARGV[3], 1, -2) .. ', "seen_at": ' .. fmt(now) .. '}'
if redis.call('HSETNX', L .. ':o:' .. obj, etag, details) == 0 then return 0 end
redis.call('ZADD', L .. ':ov:' .. obj, now, etag)
return 1
"""

# KEYS: L; ARGV: key, function, owner, ttl seconds. Returns acquired | busy | done.
_LUA_CLAIM = """
local L, key, fn, owner, ttl = KEYS[1], ARGV[1], ARGV[2], ARGV[3], tonumber(ARGV[4])
local e = L .. ':e:' .. key
local now = now_s()
local cur = redis.call('HMGET', e, 'status', 'expires_at', 'function')
local status = cur[1]
if not status then
  redis.call('HSET', e, 'function', fn, 'status', 'in_progress', 'owner', owner,
    'expires_at', fmt(now + ttl), 'attempts', 1, 'created_at', fmt(now),
    'updated_at', fmt(now), 'info', '{}')
  recount(L, fn, nil, 'in_progress')
  touched(L, key, now)
  local bar = string.find(key, '|', 1, true)
  if bar then redis.call('ZADD', L .. ':id:' .. string.sub(key, bar + 1), now, key) end
  return 'acquired'
end
if status == 'failed' or (status == 'in_progress' and tonumber(cur[2]) < now) then
  redis.call('HSET', e, 'status', 'in_progress', 'owner', owner,
    'expires_at', fmt(now + ttl), 'updated_at', fmt(now))
  redis.call('HINCRBY', e, 'attempts', 1)
  recount(L, cur[3], status, 'in_progress')
  touched(L, key, now)
  return 'acquired'
end
if status == 'in_progress' then return 'busy' end
return 'done'
"""

# KEYS: L; ARGV: key, owner, ttl seconds.
_LUA_EXTEND = """
local e = KEYS[1] .. ':e:' .. ARGV[1]
local cur = redis.call('HMGET', e, 'status', 'owner')
if cur[1] ~= 'in_progress' or cur[2] ~= ARGV[2] then return 0 end
local now = now_s()
redis.call('HSET', e, 'expires_at', fmt(now + tonumber(ARGV[3])), 'updated_at', fmt(now))
touched(KEYS[1], ARGV[1], now)
return 1
"""

# KEYS: L; ARGV: key, owner, new status, info JSON. Only the owner of a live claim.
_LUA_FINISH = """
local L, key, owner, status = KEYS[1], ARGV[1], ARGV[2], ARGV[3]
local e = L .. ':e:' .. key
local cur = redis.call('HMGET', e, 'status', 'owner', 'function')
if cur[1] ~= 'in_progress' or cur[2] ~= owner then return 0 end  -- done stays done
local now = now_s()
redis.call('HSET', e, 'status', status, 'expires_at', '', 'updated_at', fmt(now), 'info', ARGV[4])
recount(L, cur[3], 'in_progress', status)
touched(L, key, now)
if status == 'done' then redis.call('ZADD', L .. ':done', 0, key) end
return 1
"""

# KEYS: L; ARGV: key.
_LUA_SUPERSEDE = """
local L, key = KEYS[1], ARGV[1]
local e = L .. ':e:' .. key
local cur = redis.call('HMGET', e, 'status', 'function')
if not cur[1] then return 0 end
local now = now_s()
redis.call('HSET', e, 'status', 'superseded', 'updated_at', fmt(now))
recount(L, cur[2], cur[1], 'superseded')
touched(L, key, now)
redis.call('ZREM', L .. ':done', key)
return 1
"""

# KEYS: L; ARGV: ids.
_LUA_MARK_SENT = """
local now = now_s()
for i = 1, #ARGV do redis.call('ZADD', KEYS[1] .. ':sent', 'NX', now, ARGV[i]) end
return #ARGV
"""

# KEYS: L; ARGV: older_than seconds. Drops ids marked before now - older_than.
_LUA_FORGET_SENT = """
local cutoff = now_s() - tonumber(ARGV[1])
return redis.call('ZREMRANGEBYSCORE', KEYS[1] .. ':sent', '-inf', '(' .. fmt(cutoff))
"""

_ENTRY_FIELDS = (
    "function",
    "status",
    "owner",
    "expires_at",
    "attempts",
    "created_at",
    "updated_at",
    "info",
)


def _entry(key: str, row: Sequence[str | None]) -> Entry | None:
    function, status, owner, expires_at, attempts, created_at, updated_at, info = row
    if status is None:
        return None
    return Entry(
        key=key,
        function=function or "",
        status=status,
        owner=owner or None,
        expires_at=float(expires_at) if expires_at else None,
        attempts=int(attempts or 0),
        created_at=float(created_at or 0),
        updated_at=float(updated_at or 0),
        info=json.loads(info) if info else {},
    )


class RedisLedger(Ledger):
    """The ledger as Redis hashes and sorted sets, changed by atomic Lua scripts."""

    def __init__(self, conn: RedisConnection, namespace: str) -> None:
        self.conn = conn
        self.namespace = namespace
        self.key = f"{conn.target.prefix}:ledger:{namespace}"
        client = conn.client

        def script(body: str) -> Any:
            return client.register_script(_LUA_COMMON + body)

        self._first_seen = script(_LUA_FIRST_SEEN)
        self._claim = script(_LUA_CLAIM)
        self._extend = script(_LUA_EXTEND)
        self._finish = script(_LUA_FINISH)
        self._supersede = script(_LUA_SUPERSEDE)
        self._mark_sent = script(_LUA_MARK_SENT)
        self._forget_sent = script(_LUA_FORGET_SENT)

    @classmethod
    def from_url(cls, url: str, namespace: str) -> RedisLedger:
        """``redis://host:port/db?prefix=…``; ``namespace`` is the pipeline's name."""
        return cls(RedisConnection.open(url, "ledger"), namespace)

    def __repr__(self) -> str:
        return f"RedisLedger({self.conn.target.display!r}, {self.namespace!r})"

    def _run(self, script: Any, args: Sequence[Any], what: str) -> Any:
        return self.conn.call(lambda: script(keys=[self.key], args=list(args)), what)

    # -- object versions ---------------------------------------------------------

    def first_seen(self, bucket: str, key: str, etag: str, size: int, event_id: str) -> bool:
        details = json.dumps({"size": size, "event_id": event_id})
        return bool(self._run(self._first_seen, [f"{bucket}/{key}", etag, details], "first_seen"))

    def has_seen(self, bucket: str, key: str, etag: str) -> bool:
        return bool(
            self.conn.call(
                lambda: self.conn.client.hexists(f"{self.key}:o:{bucket}/{key}", etag), "has_seen"
            )
        )

    def versions(self, bucket: str, key: str) -> list[dict[str, Any]]:
        obj = f"{bucket}/{key}"

        def read() -> tuple[list[str], dict[str, str]]:
            pipe = self.conn.client.pipeline(transaction=True)
            pipe.zrange(f"{self.key}:ov:{obj}", 0, -1)
            pipe.hgetall(f"{self.key}:o:{obj}")
            etags, details = pipe.execute()
            return etags, details

        etags, details = self.conn.call(read, "versions")
        out = []
        for etag in etags:
            d = json.loads(details[etag])
            out.append(
                {
                    "etag": etag,
                    "size": d["size"],
                    "seen_at": d["seen_at"],
                    "event_id": d["event_id"],
                }
            )
        return out

    # -- claims -----------------------------------------------------------------------

    def claim(self, key: str, *, function: str, owner: str, ttl: float) -> Claim:
        return Claim(self._run(self._claim, [key, function, owner, ttl], "claim"))

    def extend(self, key: str, *, owner: str, ttl: float) -> bool:
        return bool(self._run(self._extend, [key, owner, ttl], "extend"))

    def _finish_as(self, key: str, owner: str, status: str, info: dict[str, Any]) -> None:
        self._run(self._finish, [key, owner, status, json.dumps(info, default=str)], status)

    def complete(self, key: str, *, owner: str, info: dict[str, Any]) -> None:
        self._finish_as(key, owner, "done", info)

    def fail(self, key: str, *, owner: str, info: dict[str, Any]) -> None:
        self._finish_as(key, owner, "failed", info)

    def skip(self, key: str, *, owner: str, info: dict[str, Any]) -> None:
        self._finish_as(key, owner, "skipped", info)

    def supersede(self, key: str) -> None:
        self._run(self._supersede, [key], "supersede")

    # -- reading entries ----------------------------------------------------------------

    def _entries(self, keys: Sequence[str]) -> list[Entry]:
        if not keys:
            return []

        def read() -> list[Any]:
            pipe = self.conn.client.pipeline(transaction=False)
            for k in keys:
                pipe.hmget(f"{self.key}:e:{k}", _ENTRY_FIELDS)
            return pipe.execute()

        rows = self.conn.call(read, "read entries")
        return [e for k, row in zip(keys, rows, strict=True) if (e := _entry(k, row)) is not None]

    def get(self, key: str) -> Entry | None:
        row = self.conn.call(
            lambda: self.conn.client.hmget(f"{self.key}:e:{key}", _ENTRY_FIELDS), "get"
        )
        return _entry(key, row)

    def function_counts(self) -> dict[str, dict[str, int]]:
        raw = self.conn.call(lambda: self.conn.client.hgetall(f"{self.key}:counts"), "counts")
        out: dict[str, dict[str, int]] = {}
        for field, n in raw.items():
            if int(n) > 0:
                fn, _, status = field.partition("\0")
                out.setdefault(fn, {})[status] = int(n)
        return out

    def other_versions(self, function: str, input_prefix: str, current: str) -> list[Entry]:
        prefix = f"{function}|{input_prefix}".encode()
        # UTF-8 never contains 0xFF: every key starting with the prefix sorts below this.
        keys = self.conn.call(
            lambda: self.conn.client.zrangebylex(
                f"{self.key}:done", b"[" + prefix, b"(" + prefix + b"\xff"
            ),
            "other_versions",
        )
        return [e for e in self._entries([k for k in keys if k != current]) if e.status == "done"]

    def entries_for(self, identity: str) -> list[Entry]:
        keys = self.conn.call(
            lambda: self.conn.client.zrange(f"{self.key}:id:{identity}", 0, -1), "entries_for"
        )
        return self._entries(keys)

    def entries_since(self, since: float) -> list[Entry]:
        keys = self.conn.call(
            lambda: self.conn.client.zrangebyscore(f"{self.key}:upd", since, "+inf"),
            "entries_since",
        )
        return self._entries(keys)

    def done_infos(self) -> Iterator[tuple[str, dict[str, Any]]]:
        # Pages in key order from the last key seen: unlike ZSCAN, never the
        # same entry twice (metrics would count it twice), and each page retries.
        after: bytes = b"-"
        while True:
            keys = self.conn.call(
                lambda a=after: self.conn.client.zrangebylex(
                    f"{self.key}:done", a, b"+", start=0, num=500
                ),
                "done_infos",
            )
            for e in self._entries(keys):
                if e.status == "done":
                    yield e.function, e.info
            if len(keys) < 500:
                return
            after = b"(" + keys[-1].encode()

    # -- sent ids --------------------------------------------------------------------------

    def mark_sent(self, ids: Sequence[str]) -> None:
        if ids:
            self._run(self._mark_sent, list(ids), "mark_sent")

    def unsent(self, ids: Sequence[str]) -> list[str]:
        if not ids:
            return []
        scores = self.conn.call(
            lambda: self.conn.client.zmscore(f"{self.key}:sent", list(ids)), "unsent"
        )
        return [i for i, s in zip(ids, scores, strict=True) if s is None]

    def forget_sent(self, older_than: float) -> int:
        return int(self._run(self._forget_sent, [older_than], "forget_sent"))

    def close(self) -> None:
        self.conn.close()
