"""Redis counters: one budget shared by a fleet of relays.

Each reservation is one Lua script run atomically on the server (no
read-then-write race between relays); keys expire after their window. Works
with Redis 6/7 and Valkey. While the server cannot be reached every call
raises ``CounterError`` at once for a short back-off, so the router sends
nothing from warming IPs (never over a cap) and the relay keeps delivering
via the pool; the first call that succeeds again logs the recovery.
"""

from __future__ import annotations

import logging
import os
import re
import time
from collections.abc import Sequence
from typing import Any
from urllib.parse import urlparse

from redis import asyncio as aioredis
from redis.exceptions import RedisError

from warmrelay.counters.base import CounterKey, Limit
from warmrelay.errors import CounterError

log = logging.getLogger("warmrelay.counters")

KEY_TTL_S = 8 * 86400  # a window's counts outlive it by a week (progress looks back a day)
BACKOFF_S = 1.0  # after a failure, do not try the server again before this
PASSWORD_ENV = "WARMRELAY_REDIS_PASSWORD"
SCAN_COUNT = 1000  # keys per SCAN step and per MGET
_GLOB_SPECIAL = re.compile(r"[\\*?\[\]]")  # escaped in a SCAN MATCH pattern

_RESERVE = """
local n = tonumber(ARGV[1])
local ttl = tonumber(ARGV[2])
local granted = n
for i, key in ipairs(KEYS) do
  local room = tonumber(ARGV[i + 2]) - tonumber(redis.call('GET', key) or '0')
  if room < granted then granted = room end
end
if granted < 0 then granted = 0 end
if granted > 0 then
  for _, key in ipairs(KEYS) do
    redis.call('INCRBY', key, granted)
    redis.call('EXPIRE', key, ttl)
  end
end
return granted
"""
_RELEASE = """
for _, key in ipairs(KEYS) do
  local left = tonumber(redis.call('GET', key) or '0') - tonumber(ARGV[1])
  if left < 0 then left = 0 end
  redis.call('SET', key, left, 'KEEPTTL')
end
return 0
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
        options: dict[str, Any] = {"socket_connect_timeout": 1.0, "socket_timeout": 2.0}
        if not urlparse(url).password and os.environ.get(PASSWORD_ENV):
            options["password"] = os.environ[PASSWORD_ENV]
        # a bounded pool that makes callers wait for a free connection, never fail for lack of one
        pool = aioredis.BlockingConnectionPool.from_url(
            url, max_connections=32, timeout=5, **options
        )
        self._redis = aioredis.Redis(connection_pool=pool)
        self._reserve = self._redis.register_script(_RESERVE)
        self._release = self._redis.register_script(_RELEASE)
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
            if self.healthy:
                log.error(
                    "counters store %s unreachable (%s): warming IPs pause, mail goes via the pool",
                    self._where(),
                    exc,
                )
            self.healthy, self._failed_at = False, time.monotonic()
            raise CounterError(f"counters store {self._where()}: {exc}") from exc
        if not self.healthy:
            log.warning("counters store %s reachable again", self._where())
            self.healthy = True
        return result

    def _where(self) -> str:
        parsed = urlparse(self.url)
        return f"{parsed.scheme}://{parsed.hostname}:{parsed.port or 6379}"

    async def reserve(self, limits: Sequence[Limit], n: int) -> int:
        if n <= 0 or not limits:
            return 0
        keys = [_key(lim.key) for lim in limits]
        args = [n, KEY_TTL_S, *(lim.cap for lim in limits)]
        return int(await self._call("reserve", self._reserve(keys=keys, args=args)))

    async def release(self, keys: Sequence[CounterKey], n: int) -> None:
        if n > 0 and keys:
            await self._call("release", self._release(keys=[_key(k) for k in keys], args=[n]))

    async def get(self, key: CounterKey) -> int:
        value = await self._call("get", self._redis.get(_key(key)))
        return int(value or 0)

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
        await self._redis.aclose()
