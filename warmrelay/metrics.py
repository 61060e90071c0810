"""Prometheus collectors, all in one place, on a registry of the relay's own.

With ``serve --workers`` every process writes its values to files under
PROMETHEUS_MULTIPROC_DIR and the supervisor serves their sum (``livesum``)
or the latest value (``mostrecent``) per gauge.

A registry per relay (not the global default) keeps several relays in one
test process apart. Gauges that mirror counters (warmup day, cap, sent) are
set just before each scrape, from the same code that routes.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest, multiprocess


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.warmup_day = Gauge(
            "warmrelay_warmup_day",
            "Warmup day of the IP (1 = start date; 0 = not started)",
            ["ip"],
            multiprocess_mode="mostrecent",
            registry=r,
        )
        self.warmup_cap = Gauge(
            "warmrelay_warmup_cap",
            "Recipients the warming IP may send today (-1 = no cap)",
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
            "Recipient outcomes by source IP (delivered, deferred, bounced, expired)",
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
            "fcrdns, dnsbl:ZONE, spf:IP, dkim:SELECTOR, dmarc, bind): 1 pass, 0 fail, -1 unknown",
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
        self.suppressed = Counter(
            "warmrelay_suppressed",
            "Suppression list events: added (a hard bounce or the operator), refused (a RCPT "
            "to a suppressed address), expired (deleted after suppression.ttl_s), removed "
            "(by the operator)",
            ["event"],
            registry=r,
        )
        self.dsn_sent = Counter(
            "warmrelay_dsn", "Delivery status notifications generated", registry=r
        )

    def render(self) -> bytes:
        return generate_latest(self.registry)


def render_all_processes(directory: str) -> bytes:
    """The metrics of every worker process, merged (the supervisor's /metrics)."""
    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry, path=directory)  # type: ignore[no-untyped-call]
    return generate_latest(registry)
