"""Redis counters: one budget shared by a fleet of relays.

Reservations are Lua scripts run atomically on the server (no read-then-write
race between relays); keys expire after their window. The reservations and
releases waiting in one process go as one batch (``Coalescer``): one EVALSHA
evaluates them in arrival order against the running counts, one round trip
for all of them. The keys of one IP share a hash slot; a batch holding
several IPs sends one script per IP (together, one round trip's wait); each
operation gets its own script's answer. A release carries an id that the
script records (with an expiry) atomically with the counts, so a release whose
answer was lost is applied once however often it is retried. Works
with Redis 6/7 and Valkey. While the server cannot be reached every call
raises ``CounterError`` at once for a short back-off, so the router sends
nothing from warming IPs (never over a cap) and the relay keeps delivering
via the pool; the first call that succeeds again logs the recovery.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import os
import re
import time
from collections.abc import Sequence
from typing import Any
from urllib.parse import urlparse

from redis import asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from warmrelay.errors import CounterError
from warmrelay.warmup.counters.base import (
    RELEASE_ID_TTL_S,
    Answer,
    Coalescer,
    CounterKey,
    Limit,
    Pending,
)

log = logging.getLogger("warmrelay.counters")

KEY_TTL_S = 8 * 86400  # a window's counts outlive it by a week (progress looks back a day)
BACKOFF_S = 1.0  # after a failure, do not try the server again before this
PASSWORD_ENV = "WARMRELAY_REDIS_PASSWORD"
SCAN_COUNT = 1000  # keys per SCAN step and per MGET
_GLOB_SPECIAL = re.compile(r"[\\*?\[\]]")  # escaped in a SCAN MATCH pattern

# A batch of reservations and releases, evaluated in order against the running counts (so
# two of one batch never together exceed a cap), then every changed key written once.
# ARGV[1]: the TTL; ARGV[2]: the operations as JSON (one argument, cheap to encode), each
# [n, key index, cap, key index, cap, ...] for a reservation of n, [-n, id index, key
# index, ...] for a release of n (id index 0: no id); ARGV[3]: the TTL of release ids.
# A release whose id key exists was applied before and changes nothing (its first answer
# was lost: a timeout, a dropped connection). Returns each operation's grant (0 for a
# release), as JSON. Every read comes before the first write (a script is not rolled back
# when a command fails), and the ids are written before the counts: a script cut short
# between them leaves a count too high (a release lost), never a release applied twice.
_BATCH = """
local ttl = tonumber(ARGV[1])
local ops = cjson.decode(ARGV[2])
local id_ttl = tonumber(ARGV[3])
local counts, dirty, out, applied = {}, {}, {}, {}
local function fresh(i)
  if i == 0 then return true end
  if applied[i] or redis.call('EXISTS', KEYS[i]) == 1 then return false end
  applied[i] = true
  return true
end
local function count(i)
  local c = counts[i]
  if c == nil then
    c = tonumber(redis.call('GET', KEYS[i]) or '0')
    counts[i] = c
  end
  return c
end
for o, op in ipairs(ops) do
  local n = op[1]
  local granted = 0
  if n > 0 then
    granted = n
    for j = 2, #op, 2 do
      local room = op[j + 1] - count(op[j])
      if room < granted then granted = room end
    end
    if granted < 0 then granted = 0 end
    if granted > 0 then
      for j = 2, #op, 2 do
        local i = op[j]
        counts[i] = counts[i] + granted
        dirty[i] = 'r'
      end
    end
  elseif fresh(op[2]) then
    for j = 3, #op do
      local i = op[j]
      local left = count(i) + n
      if left < 0 then left = 0 end
      if left ~= counts[i] then
        counts[i] = left
        dirty[i] = dirty[i] or 'l'
      end
    end
  end
  out[o] = granted
end
for i, _ in pairs(applied) do
  redis.call('SET', KEYS[i], '1', 'EX', id_ttl)
end
for i, how in pairs(dirty) do
  if how == 'r' then
    redis.call('SET', KEYS[i], counts[i], 'EX', ttl)
  else
    redis.call('SET', KEYS[i], counts[i], 'KEEPTTL')
  end
end
return cjson.encode(out)
"""
_COMPARE_AND_SET = """
local current = redis.call('GET', KEYS[1])
if ARGV[1] == '1' then
  if current ~= ARGV[2] then return 0 end
elseif current then
  return 0
end
if ARGV[3] == '1' then redis.call('SET', KEYS[1], ARGV[4]) else redis.call('DEL', KEYS[1]) end
return 1
"""


def _key(key: CounterKey) -> str:
    # the hash tag keeps one IP's keys in one slot (a reservation may touch several)
    return f"warmrelay:{{{key.ip}}}:{key.window}:{key.scope}"


class RedisCounters:
    def __init__(self, url: str) -> None:
        self.url = url
        options: dict[str, Any] = {
            "socket_connect_timeout": 1.0,
            "socket_timeout": 2.0,
            # never re-sent by the client library: a script whose answer timed out may have
            # run (our own retries are idempotent: releases carry ids)
            "retry": Retry(NoBackoff(), 0),
        }
        if not urlparse(url).password and os.environ.get(PASSWORD_ENV):
            options["password"] = os.environ[PASSWORD_ENV]
        # a bounded pool that makes callers wait for a free connection, never fail for lack of one
        pool = aioredis.BlockingConnectionPool.from_url(
            url, max_connections=32, timeout=5, **options
        )
        self._redis = aioredis.Redis(connection_pool=pool)
        self._batch = self._redis.register_script(_BATCH)
        self._batches = Coalescer(self._apply)
        self._compare_and_set = self._redis.register_script(_COMPARE_AND_SET)
        self.healthy = True
        self._failed_at = float("-inf")

    async def _call(self, what: str, coro: Any) -> Any:
        if not self.healthy and time.monotonic() - self._failed_at < BACKOFF_S:
            coro.close()
            raise CounterError(f"counters store {self._where()} is unreachable")
        try:
            result = await coro
        except (RedisError, OSError) as exc:
            raise self._failed(exc) from exc
        if not self.healthy:
            log.warning("counters store %s reachable again", self._where())
            self.healthy = True
        return result

    def _failed(self, exc: BaseException) -> CounterError:
        """Log once per episode, back off; the error to give the caller."""
        if self.healthy:
            log.error(
                "counters store %s unreachable (%s): warming IPs pause, mail goes via the pool",
                self._where(),
                exc,
            )
        self.healthy, self._failed_at = False, time.monotonic()
        error = CounterError(f"counters store {self._where()}: {exc}")
        error.__cause__ = exc
        return error

    def _where(self) -> str:
        parsed = urlparse(self.url)
        return f"{parsed.scheme}://{parsed.hostname}:{parsed.port or 6379}"

    async def _apply(self, batch: list[Pending]) -> list[Answer]:
        """One script per hash slot (IP) for the operations of ``batch``, run together;
        each operation gets the answer of its own script: one IP's failure is not
        reported as another's (whose script ran)."""
        groups = _by_slot(batch)
        calls = [_script_args(group) for group in groups]

        async def run_all() -> list[Any]:
            results = await asyncio.gather(
                *(self._batch(keys=keys, args=args) for keys, args in calls),
                return_exceptions=True,
            )
            failed = [r for r in results if isinstance(r, BaseException)]
            if len(failed) == len(results):
                raise failed[0]  # nothing answered: the store fails for all
            return results

        results = await self._call("batch", run_all())
        answers: dict[int, Answer] = {}
        for group, result in zip(groups, results, strict=True):
            if isinstance(result, BaseException):
                if not isinstance(result, RedisError | OSError):
                    raise result  # a bug, not the store: Coalescer fails the whole batch
                error = self._failed(result)
                for op in group:
                    answers[id(op)] = error
            else:
                for op, granted in zip(group, _grants(result), strict=True):
                    answers[id(op)] = granted
        return [answers[id(op)] for op in batch]

    async def reserve(self, limits: Sequence[Limit], n: int) -> int:
        if n <= 0 or not limits:
            return 0
        keys = [_key(lim.key) for lim in limits]
        return await self._batches.submit(keys, [lim.cap for lim in limits], n)

    async def release(self, keys: Sequence[CounterKey], n: int, release_id: str) -> None:
        if n > 0 and keys:
            await self._batches.submit([_key(k) for k in keys], None, n, release_id)

    async def get(self, key: CounterKey) -> int:
        value = await self._call("get", self._redis.get(_key(key)))
        return int(value or 0)

    async def counts(self, keys: Sequence[CounterKey]) -> list[int]:
        """One MGET per IP (its keys share a hash slot: a cluster answers it)."""
        found: dict[CounterKey, int] = {}
        by_ip: dict[str, list[CounterKey]] = {}
        for key in keys:
            by_ip.setdefault(key.ip, []).append(key)
        for group in by_ip.values():
            for at in range(0, len(group), SCAN_COUNT):
                chunk = group[at : at + SCAN_COUNT]
                values = await self._call("mget", self._redis.mget([_key(k) for k in chunk]))
                found.update((k, int(v or 0)) for k, v in zip(chunk, values, strict=True))
        return [found[key] for key in keys]

    async def get_value(self, key: str) -> str | None:
        value = await self._call("get", self._redis.get(f"warmrelay:state:{key}"))
        return value.decode() if isinstance(value, bytes) else value

    async def set_value(self, key: str, value: str | None) -> None:
        name = f"warmrelay:state:{key}"
        if value is None:
            await self._call("del", self._redis.delete(name))
        else:
            await self._call("set", self._redis.set(name, value))

    async def compare_and_set(self, key: str, expected: str | None, new: str | None) -> bool:
        args = [
            "0" if expected is None else "1",
            expected or "",
            "0" if new is None else "1",
            new or "",
        ]
        script = self._compare_and_set(keys=[f"warmrelay:state:{key}"], args=args)
        return bool(await self._call("cas", script))

    async def list_values(self, prefix: str) -> dict[str, str]:
        """SCAN (never KEYS: the server keeps answering others) for the prefix, then MGET
        in batches. A key deleted in between is left out."""
        base = "warmrelay:state:"
        pattern = _GLOB_SPECIAL.sub(r"\\\g<0>", base + prefix) + "*"
        names: list[bytes] = []
        cursor = 0
        while True:
            cursor, batch = await self._call(
                "scan", self._redis.scan(cursor=cursor, match=pattern, count=SCAN_COUNT)
            )
            names.extend(batch)
            if not cursor:
                break
        unique = sorted(set(names))
        found: dict[str, str] = {}
        for at in range(0, len(unique), SCAN_COUNT):
            chunk = unique[at : at + SCAN_COUNT]
            values = await self._call("mget", self._redis.mget(chunk))
            for name, value in zip(chunk, values, strict=True):
                if value is not None:
                    key = name.decode() if isinstance(name, bytes) else str(name)
                    found[key.removeprefix(base)] = (
                        value.decode() if isinstance(value, bytes) else str(value)
                    )
        return found

    async def close(self) -> None:
        await self._batches.idle()  # queued reservations and releases are made first
        await self._redis.aclose()


def _grants(reply: Any) -> list[int]:
    """The script's answer: one grant per operation, in order."""
    return [int(g) for g in json.loads(reply)]


@functools.lru_cache(maxsize=4096)
def _slot(key: str) -> str:
    """The hash tag of one of our keys (the IP): what Redis Cluster places by."""
    start = key.find("{")
    end = key.find("}", start + 1)
    return key[start + 1 : end] if start >= 0 and end > start else key


def _by_slot(batch: Sequence[Pending]) -> list[list[Pending]]:
    """``batch`` split so that no script touches two hash slots, each part in arrival
    order (operations of different parts share no key: their order does not matter). An
    operation over several IPs (not made by the router) joins their parts."""
    parent: dict[str, str] = {}

    def root(slot: str) -> str:
        while parent.setdefault(slot, slot) != slot:
            slot = parent[slot]
        return slot

    for op in batch:
        first = root(_slot(op.keys[0]))
        for key in op.keys[1:]:
            parent[root(_slot(key))] = first
    groups: dict[str, list[Pending]] = {}
    for op in batch:
        groups.setdefault(root(_slot(op.keys[0])), []).append(op)
    return list(groups.values())


def _script_args(group: Sequence[Pending]) -> tuple[list[str], list[int | str]]:
    """KEYS and ARGV of ``_BATCH`` for ``group``."""
    index: dict[str, int] = {}
    ops: list[list[int]] = []
    for op in group:
        at = [index.setdefault(key, len(index) + 1) for key in op.keys]
        if op.caps is None:
            marker = 0
            if op.release_id:  # in the slot of the counts it changes
                name = f"warmrelay:{{{_slot(op.keys[0])}}}:released:{op.release_id}"
                marker = index.setdefault(name, len(index) + 1)
            ops.append([-op.n, marker, *at])
        else:
            ops.append([op.n, *(x for pair in zip(at, op.caps, strict=True) for x in pair)])
    return list(index), [KEY_TTL_S, json.dumps(ops, separators=(",", ":")), RELEASE_ID_TTL_S]
