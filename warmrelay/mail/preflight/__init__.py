"""Preflight: is each sending IP and signing domain fit to send, before (and while) it warms?

Receivers judge a new IP by its DNS identity before they look at its volume: a PTR
record whose name is the EHLO name and resolves back to the IP, no blocklist entry, and
for each signing domain an SPF record authorising the IP, the DKIM key published at its
selector and a DMARC record. A warmup that starts with one of these missing burns the
IP's first days. ``warmrelay preflight`` checks them all on the sending host; the relay
runs the same checks at start and pauses a warming IP found on a blocklist.

Each check is ``pass``, ``fail`` or ``unknown`` with its reason. Only a failure hurts
delivery; unknown (a timeout, SERVFAIL, a refused blocklist query, SPF temperror, or a
subject public DNS knows nothing of) never fails a run. But when not one DNS answer
arrived, nothing was checked, and the run says so instead of looking clean. The command
exits 1 when a check failed, else 2 when no DNS answer arrived, else 0.

The modules, one job each (no cycles: each imports only those above it):

- ``dns``: the DNS client (``dns.nameservers``, ``preflight.timeout_s``); answers are
  values (``Found | Missing | Failed``), and ``DnsStats`` says "no DNS answers at all".
- ``report``: the results (``Outcome``, ``Check``, ``Report``), their JSON and table,
  and one note per kind of skipped check.
- ``identity``: bind, PTR, PTR = helo, forward-confirmed reverse DNS, per IP.
- ``dnsbl``: blocklists, and what an RFC 5782 answer means (listed, not listed, unknown).
- ``spf``: RFC 7208 check_host(), for ``spf:IP`` of each signing domain.
- ``domain``: a signing domain's checks: SPF per IP, DKIM record vs our key, DMARC.
- ``run``: ``Preflight``, one run of everything, and what is not asked (skips).
- ``relay``: ``RelayPreflight``, the running relay's runs, log lines, metrics, pauses.

Other modules import from here, not from the modules.
"""

from warmrelay.mail.preflight.dns import DnsClient, DnsStats, Failed, Found, Lookup, Missing
from warmrelay.mail.preflight.dnsbl import classify_dnsbl, dnsbl_name
from warmrelay.mail.preflight.relay import RelayPreflight
from warmrelay.mail.preflight.report import Check, Outcome, Report, Skip
from warmrelay.mail.preflight.run import Preflight
from warmrelay.mail.preflight.spf import (
    MacroContext,
    SpfEvaluation,
    SpfResult,
    SpfSyntaxError,
    SpfVerdict,
    classify_spf,
    expand_macros,
    parse_spf,
)

__all__ = [
    "Check",
    "DnsClient",
    "DnsStats",
    "Failed",
    "Found",
    "Lookup",
    "MacroContext",
    "Missing",
    "Outcome",
    "Preflight",
    "RelayPreflight",
    "Report",
    "Skip",
    "SpfEvaluation",
    "SpfResult",
    "SpfSyntaxError",
    "SpfVerdict",
    "classify_dnsbl",
    "classify_spf",
    "dnsbl_name",
    "expand_macros",
    "parse_spf",
]
