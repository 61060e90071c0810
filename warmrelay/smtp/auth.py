"""Authentication of applications: argon2 password hashes, failure tracking, sender rights.

argon2id verification costs tens of milliseconds of CPU on purpose, so it runs
in a thread and a successful check is remembered for a while (keyed by a
keyed hash of the credentials, never the password itself): an application
that opens one connection per message does not pay it every time.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import hmac
import secrets
import time
from collections.abc import Mapping
from dataclasses import dataclass, field

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError

from warmrelay.config import UserConfig
from warmrelay.warmup.eligibility import sender_matches

# argon2id with OWASP's recommended minimum (19 MiB, 2 passes, 1 lane): each check takes
# about 20 ms and 19 MiB while it runs, instead of the library default's 64 MiB.
_HASHER = PasswordHasher(time_cost=2, memory_cost=19 * 1024, parallelism=1)
CACHE_TTL_S = 300.0


def hash_password(password: str) -> str:
    return _HASHER.hash(password)


class Authenticator:
    """Checks user/password against the configured hashes; remembers recent successes."""

    def __init__(self, users: Mapping[str, UserConfig]) -> None:
        self._users = users
        self._key = secrets.token_bytes(32)
        self._ok: dict[bytes, float] = {}

    @property
    def enabled(self) -> bool:
        return bool(self._users)

    async def verify(self, user: str, password: str) -> bool:
        config = self._users.get(user)
        if config is None:
            # Same cost as a real check, so response time does not reveal user names.
            await asyncio.to_thread(_check, _dummy_hash(), password)
            return False
        token = hmac.new(self._key, f"{user}\0{password}".encode(), hashlib.sha256).digest()
        now = time.monotonic()
        if self._ok.get(token, 0.0) > now:
            return True
        if await asyncio.to_thread(_check, config.password_hash, password):
            if len(self._ok) > 10_000:
                self._ok.clear()
            self._ok[token] = now + CACHE_TTL_S
            return True
        return False

    def may_send_as(self, user: str, sender: str) -> bool:
        config = self._users.get(user)
        if config is None:
            return False
        if not config.senders:
            return True
        return bool(sender) and any(sender_matches(sender, p) for p in config.senders)


def _check(hashed: str, password: str) -> bool:
    try:
        return _HASHER.verify(hashed, password)
    except (VerifyMismatchError, VerificationError, InvalidHashError):
        return False


@functools.cache
def _dummy_hash() -> str:
    """Made on first need: hashing costs memory that a relay without users never spends."""
    return _HASHER.hash(secrets.token_hex(16))


@dataclass
class _Failures:
    times: list[float] = field(default_factory=list)
    locked_until: float = 0.0


class AuthGuard:
    """Slows down, then locks out, clients that keep failing AUTH (password guessing)."""

    WINDOW_S = 900.0

    def __init__(self, max_failures: int, lockout_s: float, tarpit_s: float = 1.0) -> None:
        self._by_ip: dict[str, _Failures] = {}
        self.configure(max_failures, lockout_s, tarpit_s)

    def configure(self, max_failures: int, lockout_s: float, tarpit_s: float) -> None:
        """New limits (reload) apply from the next failure on. Recorded failures and current
        lockouts stay as they are: a reload must not set a password guesser free."""
        self._max = max_failures
        self._lockout_s = lockout_s
        self._tarpit_s = tarpit_s

    def locked(self, ip: str) -> bool:
        f = self._by_ip.get(ip)
        return f is not None and f.locked_until > time.monotonic()

    def failed(self, ip: str) -> float:
        """Record a failure; returns how long to wait before answering (tarpit)."""
        now = time.monotonic()
        f = self._by_ip.setdefault(ip, _Failures())
        f.times = [t for t in f.times if now - t < self.WINDOW_S] + [now]
        if len(f.times) >= self._max:
            f.locked_until = now + self._lockout_s
        if len(self._by_ip) > 100_000:  # bounded memory under a distributed attack
            self._by_ip = {k: v for k, v in self._by_ip.items() if v.locked_until > now}
        return self._tarpit_s * min(len(f.times), 5)

    def succeeded(self, ip: str) -> None:
        self._by_ip.pop(ip, None)
