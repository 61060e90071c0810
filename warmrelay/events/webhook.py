"""The webhook poster: the outbox's events, oldest first, in signed JSON batches.

A batch is up to ``batch_max`` events, sent once that many wait or the oldest waited
``batch_ms``. One POST at a time, in outbox order (a message's events keep their order).
The receiver's 2xx removes the batch; anything else (another status, no answer in
``timeout_s``, a refused connection) keeps it and tries again after a backoff
(``retry_first_s`` doubling up to ``retry_max_s``). A POST whose answer never came may
have been taken: the retry sends the same events with the same ``event_id``s, and the
consumer de-duplicates by them. Events older than ``max_age_s`` are dropped, counted and
logged as an ERROR.

Signature, as Stripe's: ``X-Warmrelay-Signature: t=<unix time>,v1=<hex>`` where hex is
HMAC-SHA256(secret, "<t>." + body). The consumer recomputes it and refuses a ``t`` too
far from its clock (a replay).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import logging
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from warmrelay import __version__
from warmrelay.config import WebhookConfig
from warmrelay.events.outbox import Outbox, Row, checkpoint
from warmrelay.operate.metrics import Metrics

if TYPE_CHECKING:
    import aiohttp

log = logging.getLogger("warmrelay.events")

SIGNATURE_HEADER = "X-Warmrelay-Signature"
IDLE_S = 5.0  # the gauges are refreshed at least this often (workers are not scraped)
CHECKPOINT_EVERY = 1000  # events taken by the receiver between two WAL checkpoints


def sign(secret: bytes, timestamp: int, body: bytes) -> str:
    mac = hmac.new(secret, f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()
    return f"t={timestamp},v1={mac}"


def verify(secret: bytes, header: str, body: bytes, now: float, tolerance_s: float = 300) -> bool:
    """What a consumer does: the signature matches and was made recently."""
    fields = dict(part.split("=", 1) for part in header.split(",") if "=" in part)
    try:
        timestamp = int(fields["t"])
    except (KeyError, ValueError):
        return False
    expected = sign(secret, timestamp, body).split("v1=", 1)[1]
    given = fields.get("v1", "")
    fresh = abs(now - timestamp) <= tolerance_s
    return fresh and given.isascii() and hmac.compare_digest(expected.encode(), given.encode())


def shown(url: str) -> str:
    """The URL for logs: scheme, host and path (its query may hold a token)."""
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc.rsplit('@', 1)[-1]}{parts.path}"


class Webhook:
    def __init__(
        self,
        config: Callable[[], WebhookConfig | None],
        secret: Callable[[], bytes],
        outbox: Outbox,
        metrics: Metrics,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._config = config
        self._secret = secret
        self.outbox = outbox
        self._metrics = metrics
        self._clock = clock
        self._more = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._failures = 0  # POSTs in a row that failed (the backoff; one WARNING each run)
        self._expiring = False  # events expired since the last POST taken (one ERROR)
        self._posted_since_checkpoint = 0
        self.posted = asyncio.Event()  # set after each POST the receiver took (tests)

    def wake(self) -> None:
        """An event was written: a batch may be due."""
        self._more.set()

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        self.gauges()

    def gauges(self) -> None:
        self._metrics.webhook_outbox.set(self.outbox.count)
        oldest = self.outbox.oldest
        self._metrics.webhook_oldest.set(0 if oldest is None else max(0.0, self._clock() - oldest))

    async def _run(self) -> None:
        import aiohttp

        async with aiohttp.ClientSession() as session:
            while True:
                try:
                    await self._round(session)
                except asyncio.CancelledError:
                    raise
                except Exception:  # a bug must not end the poster: events would pile up
                    log.exception("events: the webhook poster failed; trying again")
                    await asyncio.sleep(IDLE_S)

    async def _round(self, session: aiohttp.ClientSession) -> None:
        self.gauges()
        config = self._config()
        if config is None or self.outbox.count == 0:
            await self._wait(IDLE_S)
            return
        due = (self.outbox.oldest or 0.0) + config.batch_ms / 1000 - self._clock()
        if self.outbox.count < config.batch_max and due > 0:
            await self._wait(min(due, IDLE_S))  # a fuller batch, or the oldest's time
            return
        rows = self.outbox.peek(config.batch_max)
        if self._expire(rows, config):
            return
        if await self._post(session, config, rows):
            self.outbox.remove([r.id for r in rows])
            self.gauges()
            self.posted.set()
            self._posted_since_checkpoint += len(rows)
            if self._posted_since_checkpoint >= CHECKPOINT_EVERY:
                self._posted_since_checkpoint = 0
                await self._checkpoint()
            return
        delay = min(config.retry_first_s * 2 ** min(self._failures - 1, 30), config.retry_max_s)
        await asyncio.sleep(delay)

    async def _checkpoint(self) -> None:
        """The outbox's WAL copied back, off the event loop (writes never do it)."""
        try:
            await asyncio.to_thread(checkpoint, self.outbox.path)
        except Exception as exc:  # the WAL grows a while longer; the next one tries again
            log.debug("events: outbox checkpoint failed: %s", exc)

    async def _wait(self, timeout_s: float) -> None:
        self._more.clear()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._more.wait(), timeout_s)

    def _expire(self, rows: Sequence[Row], config: WebhookConfig) -> bool:
        """Drop the events that waited longer than max_age_s; True if there were any."""
        cutoff = self._clock() - config.max_age_s
        old = [r for r in rows if r.created < cutoff]
        if not old:
            return False
        self.outbox.remove([r.id for r in old])
        self._metrics.events_lost.labels("expired").inc(len(old))
        if self._expiring:  # one line per episode; the metric counts every event
            self.gauges()
            return True
        self._expiring = True
        log.error(
            "events: %d event(s) dropped: %s did not take them within %.0fs "
            "(events.webhook.max_age_s); the oldest was from %s (more are counted in "
            'warmrelay_events_lost_total{reason="expired"} until a POST is taken again)',
            len(old),
            shown(config.url),
            config.max_age_s,
            time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(old[0].created)),
        )
        self.gauges()
        return True

    async def _post(
        self, session: aiohttp.ClientSession, config: WebhookConfig, rows: Sequence[Row]
    ) -> bool:
        import aiohttp

        body = ("[" + ",".join(r.body for r in rows) + "]").encode()
        headers = {
            "Content-Type": "application/json",
            "User-Agent": f"warmrelay/{__version__}",
            SIGNATURE_HEADER: sign(self._secret(), int(self._clock()), body),
        }
        why = ""
        try:
            timeout = aiohttp.ClientTimeout(total=config.timeout_s)
            async with session.post(config.url, data=body, headers=headers, timeout=timeout) as r:
                await r.read()
                if 200 <= r.status < 300:
                    self._metrics.webhook_posts.labels("ok").inc()
                    self._expiring = False
                    if self._failures:
                        log.info(
                            "events: %s takes events again (after %d failed POST(s))",
                            shown(config.url),
                            self._failures,
                        )
                    self._failures = 0
                    return True
                result, why = "rejected", f"HTTP {r.status} {r.reason or ''}".rstrip()
        except TimeoutError:
            result, why = "failed", f"no answer within {config.timeout_s:g}s"
        except aiohttp.ClientError as exc:
            result, why = "failed", str(exc) or type(exc).__name__
        self._metrics.webhook_posts.labels(result).inc()
        self._failures += 1
        if self._failures == 1:  # one line per episode, not per retry
            log.warning(
                "events: %s: %s; %d event(s) wait in the outbox and are posted again",
                shown(config.url),
                why,
                self.outbox.count,
            )
        return False
