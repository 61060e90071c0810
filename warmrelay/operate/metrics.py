"""Prometheus collectors, all in one place, on a registry of the relay's own.

With ``serve --workers`` every process writes its values to files under
PROMETHEUS_MULTIPROC_DIR and the supervisor serves their sum (``livesum``)
or the latest value (``mostrecent``) per gauge.

A registry per relay (not the global default) keeps several relays in one
test process apart. Gauges that mirror counters (warmup day, cap, sent) are
set just before each scrape, from the same code that routes.

No ``_created`` series (they double the series count and nobody graphs them),
no negative sentinels: a value that does not exist (no cap) is no series.
Durations are in seconds, timestamps in seconds since the epoch.
"""

from __future__ import annotations

import os
import platform
import time
from datetime import datetime, tzinfo
from typing import TYPE_CHECKING

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
    multiprocess,
)

from warmrelay import __version__
from warmrelay.operate.tally import DayTally

if TYPE_CHECKING:
    from warmrelay.warmup.router import Route, Smarthost

disable_created_metrics()  # type: ignore[no-untyped-call]

# time from the 250 to a recipient's delivery: a fast hop, a slow one, retries, a held day
LATENCY_BUCKETS_S = (
    0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 1800.0,
    3600.0, 7200.0, 14400.0, 43200.0, 86400.0, 259200.0,
)  # fmt: skip
# one SMTP transaction with a next hop: connect, (STARTTLS), envelope, data, the final reply
ATTEMPT_BUCKETS_S = (
    0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0,
)  # fmt: skip


def multiprocess_mode() -> bool:
    """Values live in files of PROMETHEUS_MULTIPROC_DIR (``serve --workers``)."""
    return bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR"))  # the supervisor sets it


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.warmup_day = Gauge(
            "warmrelay_warmup_day",
            "Warmup day of the IP (1 = start date; 0 = not started); with progress: "
            "reputation also one series per provider, its own day (provider empty: the IP's)",
            ["ip", "provider"],
            multiprocess_mode="mostrecent",
            registry=r,
        )
        self.reputation_signal = Gauge(
            "warmrelay_reputation_signal",
            "The signals the warmup controller used in its last decision per IP and provider "
            "(rates as fractions; snds_filter 0 GREEN, 1 YELLOW, 2 RED)",
            ["ip", "provider", "signal"],
            multiprocess_mode="mostrecent",
            registry=r,
        )
        self.warmup_decisions = Counter(
            "warmrelay_warmup_decisions",
            "Decisions of the warmup controller (progress: reputation) by IP, provider and "
            "action: advance, hold, back, pause",
            ["ip", "provider", "action"],
            registry=r,
        )
        self.warmup_cap = Gauge(
            "warmrelay_warmup_cap",
            "Recipients the warming IP may send today (no series while it has no cap: warm)",
            ["ip"],
            multiprocess_mode="mostrecent",
            registry=r,
        )
        self.warmup_sent = Gauge(
            "warmrelay_warmup_sent",
            "Recipients counted against the IP's cap today",
            ["ip"],
            multiprocess_mode="mostrecent",
            registry=r,
        )
        self.ip_up = Gauge(
            "warmrelay_ip_up",
            "1 if the source IP can be used, 0 if marked down",
            ["ip"],
            multiprocess_mode="mostrecent",
            registry=r,
        )
        self.routed = Counter(
            "warmrelay_routed",
            "Recipients routed, by source IP and reason (warmup, overflow, pool)",
            ["ip", "reason"],
            registry=r,
        )
        self.throttled = Counter(
            "warmrelay_throttled",
            "Recipients a provider deferred with a throttling reply, by warming IP and provider",
            ["ip", "provider"],
            registry=r,
        )
        self.blocked = Counter(
            "warmrelay_blocked",
            "Recipients refused with a reply blaming the sending IP's reputation (a blocklist), "
            "by source IP and provider; retried from elsewhere, never bounced",
            ["ip", "provider"],
            registry=r,
        )
        self.suspended = Gauge(
            "warmrelay_suspended",
            "1 while a warming IP is suspended for a provider after throttling",
            ["ip", "provider"],
            multiprocess_mode="mostrecent",
            registry=r,
        )
        self.held = Counter(
            "warmrelay_held",
            "Recipients held back by the router (no IP may take them now)",
            registry=r,
        )
        self.deliveries = Counter(
            "warmrelay_deliveries",
            "Recipient outcomes by source IP (delivered, deferred, bounced, expired); "
            "warmrelay_provider_deliveries_total has them per provider too",
            ["ip", "outcome"],
            registry=r,
        )
        self.received = Counter(
            "warmrelay_received", "Messages accepted (250 after DATA)", registry=r
        )
        self.dkim = Counter(
            "warmrelay_dkim",
            "Messages by DKIM outcome at acceptance (signed, unsigned: no key, refused: no key "
            "and dkim.unsigned is refuse, error: header section not parsable); domain is the "
            'signing domain when signed, else the From domain ("" when there is none)',
            ["domain", "result"],
            registry=r,
        )
        self.rejected = Counter(
            "warmrelay_rejected", "SMTP commands refused, by reply code", ["code"], registry=r
        )
        self.spool_errors = Counter(
            "warmrelay_spool_errors",
            "Messages refused with 451 because the spool failed",
            registry=r,
        )
        self.spool_writable = Gauge(
            "warmrelay_spool_writable",
            "1 if the spool takes writes; 0: new mail is answered 451 and delivery progress "
            "is kept in memory until the disk takes it (see warmrelay_spool_unrecorded)",
            multiprocess_mode="livemin",
            registry=r,
        )
        self.spool_unrecorded = Gauge(
            "warmrelay_spool_unrecorded",
            "Messages whose delivery progress is known only in memory (the spool could not "
            "write it yet): a restart now would deliver those recipients again",
            multiprocess_mode="livesum",
            registry=r,
        )
        self.reservations_unreleased = Gauge(
            "warmrelay_reservations_unreleased",
            "Reserved recipients the counters store refused to give back (retried until it "
            "answers): today's count is that much too high meanwhile",
            multiprocess_mode="livesum",
            registry=r,
        )
        self.counters_up = Gauge(
            "warmrelay_counters_up",
            "1 if the counters store answers; 0: warming IPs pause, mail goes via the pool",
            multiprocess_mode="mostrecent",
            registry=r,
        )
        self.preflight_ok = Gauge(
            "warmrelay_preflight_ok",
            "Latest preflight result per subject (IP or signing domain) and check (ptr, helo, "
            "fcrdns, dnsbl:ZONE, spf:IP, dkim:SELECTOR, dmarc, bind): 1 pass, 0 fail; no series "
            "while the result is unknown (see warmrelay_preflight_unknown)",
            ["subject", "check"],
            multiprocess_mode="mostrecent",
            registry=r,
        )
        self.preflight_unknown = Gauge(
            "warmrelay_preflight_unknown",
            "1 if the latest preflight could not tell (no answer, a refused query) for this "
            "subject and check, 0 if it could (then warmrelay_preflight_ok has the result)",
            ["subject", "check"],
            multiprocess_mode="mostrecent",
            registry=r,
        )
        self.smtp_sessions = Gauge(
            "warmrelay_smtp_sessions",
            "SMTP client sessions open now",
            multiprocess_mode="livesum",
            registry=r,
        )
        self.spool_messages = Gauge(
            "warmrelay_spool_messages",
            "Messages in the spool (not yet finished)",
            multiprocess_mode="mostrecent",
            registry=r,
        )
        self.async_bounces = Counter(
            "warmrelay_async_bounces",
            "Bounces that came back after the handover (DSNs to our return path), by the IP "
            "and provider that carried the mail and class: hard (5.x.x), soft (4.x.x), other",
            ["ip", "provider", "class"],
            registry=r,
        )
        self.complaints = Counter(
            "warmrelay_complaints",
            "Complaints (ARF feedback reports) by the IP and provider that carried the mail",
            ["ip", "provider"],
            registry=r,
        )
        self.feedback_reports = Counter(
            "warmrelay_feedback_reports",
            "Reports taken in at the bounce domain, by kind (dsn, text, arf, own: our own "
            "DSN, unrecognised: kept in state.dir/feedback) and whether they could be "
            "attributed to an IP and provider",
            ["kind", "attributed"],
            registry=r,
        )
        self.feedback_forwarded = Counter(
            "warmrelay_feedback_forwarded",
            "Reports forwarded to the original sender (forwarded), or not: no_sender (the "
            "report quotes no trace header of ours), failed (the spool refused it)",
            ["result"],
            registry=r,
        )
        self.suppressed = Counter(
            "warmrelay_suppressed",
            "Suppression list events: added (a hard bounce or the operator), refused (a RCPT "
            "to a suppressed address), expired (deleted after suppression.ttl_s), removed "
            "(by the operator)",
            ["event"],
            registry=r,
        )
        self.events = Counter(
            "warmrelay_events",
            "Events for the application (events:), by event: processed, delivered, deferred, "
            "bounce, dropped, spamreport",
            ["event"],
            registry=r,
        )
        self.events_lost = Counter(
            "warmrelay_events_lost",
            "Events that will never reach the webhook or the file, by reason: outbox_full "
            "(events.webhook.max_events), outbox_error (the disk refused), expired "
            "(events.webhook.max_age_s), file_error",
            ["reason"],
            registry=r,
        )
        self.webhook_posts = Counter(
            "warmrelay_webhook_posts",
            "POSTs of event batches to events.webhook.url, by result: ok (2xx), "
            "rejected (another status), failed (no answer: refused, timeout, TLS)",
            ["result"],
            registry=r,
        )
        self.webhook_outbox = Gauge(
            "warmrelay_webhook_outbox_events",
            "Events in the outbox (written, not yet acknowledged by the webhook)",
            multiprocess_mode="livesum",
            registry=r,
        )
        self.webhook_oldest = Gauge(
            "warmrelay_webhook_oldest_event_age_seconds",
            "Age of the oldest event in the outbox (0 when empty)",
            multiprocess_mode="livemax",
            registry=r,
        )
        # every series from the start at 0: an alert's increase() sees the first one
        for event in ("processed", "delivered", "deferred", "bounce", "dropped", "spamreport"):
            self.events.labels(event)
        for reason in ("outbox_full", "outbox_error", "expired", "file_error"):
            self.events_lost.labels(reason)
        for result in ("ok", "rejected", "failed"):
            self.webhook_posts.labels(result)
        self.connections = Gauge(
            "warmrelay_connections",
            "Outbound connections open per source IP and provider (a provider no rule "
            "recognises: other), by state: active (carrying a message) or idle (kept for reuse)",
            ["ip", "provider", "state"],
            multiprocess_mode="livesum",
            registry=r,
        )
        self.dsn_sent = Counter(
            "warmrelay_dsn", "Delivery status notifications generated", registry=r
        )
        self.provider_deliveries = Counter(
            "warmrelay_provider_deliveries",
            "Recipient outcomes (delivered, deferred, bounced, expired) by source IP and "
            "mailbox provider (a recognised provider's name, else other); summed over "
            "provider, each of these outcomes equals warmrelay_deliveries_total's",
            ["ip", "provider", "outcome"],
            registry=r,
        )
        self.delivery_latency = Histogram(
            "warmrelay_delivery_latency_seconds",
            "Time from the 250 the client got (the message's receive time) to a recipient's "
            "delivery, by the source IP that delivered it",
            ["ip"],
            buckets=LATENCY_BUCKETS_S,
            registry=r,
        )
        self.attempt_seconds = Histogram(
            "warmrelay_delivery_attempt_seconds",
            "Duration of one delivery attempt to a next hop, by outcome (delivered, deferred, "
            "bounced, throttled, blocked: what every recipient got; mixed; unreachable: no "
            "next hop took a transaction)",
            ["outcome"],
            buckets=ATTEMPT_BUCKETS_S,
            registry=r,
        )
        self.queue_oldest_age = Gauge(
            "warmrelay_queue_oldest_age_seconds",
            "Age of the oldest message in the spool (since its 250); 0 when the spool is empty",
            multiprocess_mode="livemax",
            registry=r,
        )
        self.build_info = Gauge(
            "warmrelay_build_info",
            "Always 1; the labels say which warmrelay and Python run",
            ["version", "python"],
            multiprocess_mode="mostrecent",
            registry=r,
        )
        self.build_info.labels(__version__, platform.python_version()).set(1)
        self.reload_ok = Gauge(
            "warmrelay_config_last_reload_successful",
            "1 if the latest configuration load (start or reload) was applied, 0 if refused",
            multiprocess_mode="mostrecent",
            registry=r,
        )
        self.reload_success_time = Gauge(
            "warmrelay_config_last_reload_success_timestamp_seconds",
            "When the configuration in force was loaded (start or the latest good reload), "
            "seconds since the epoch",
            multiprocess_mode="mostrecent",
            registry=r,
        )
        self.reloaded(True, time.time())  # the configuration this relay starts with
        self.today = DayTally()  # today's routing, for the status page

    def count_routed(
        self, ip: str, part: Route | Smarthost, n: int, now: datetime, zone: tzinfo
    ) -> None:
        """``n`` recipients of ``part`` routed from ``ip`` (or "smarthost"): counted in
        warmrelay_routed_total and in today's tally at once, so the page and the metric agree."""
        self.routed.labels(ip, part.reason.value).inc(n)
        refusals = ((r.address, r.reason.value, r.provider) for r in part.refusals)
        self.today.count(ip, part.reason.value, n, refusals, now, zone)

    def reloaded(self, ok: bool, when: float) -> None:
        """A configuration load at ``when`` (seconds since the epoch) was applied or refused."""
        self.reload_ok.set(1 if ok else 0)
        if ok:
            self.reload_success_time.set(when)

    @staticmethod
    def drop(metric: Gauge, *labels: str) -> None:
        """No series for these labels any more. Values written in multiprocess mode stay in
        their files (prometheus_client cannot delete them): there the value becomes NaN,
        which no comparison in a rule or panel takes for a number."""
        if multiprocess_mode():
            metric.labels(*labels).set(float("nan"))
        else:
            metric.remove(*labels)

    def render(self) -> bytes:
        return generate_latest(self.registry)


def render_all_processes(directory: str) -> bytes:
    """The metrics of every worker process, merged (the supervisor's /metrics)."""
    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry, path=directory)  # type: ignore[no-untyped-call]
    return generate_latest(registry)
