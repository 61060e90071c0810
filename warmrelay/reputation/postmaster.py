"""Gmail Postmaster Tools API v2: a day's spam rate per source IP and delivery errors per
domain, through Google's official client (google-api-python-client, google-auth).

What v2 offers (its discovery document, shipped with the client, is what we build from):

- ``domains.domainStats.query`` (POST ``v2/domains/{domain}/domainStats:query``) with a
  ``QueryDomainStatsRequest``: ``metricDefinitions`` (each a caller-chosen ``name``, a
  ``baseMetric.standardMetric`` and an optional ``filter``), a ``timeQuery`` (a
  ``dateList`` of ``Date`` {year, month, day}, or date ranges), ``aggregationGranularity``
  DAILY and ``pageSize`` (default 10, at most 200; the API pages per entry, so we follow
  ``nextPageToken``). The answer is a list of ``DomainStat`` {metric: our name, date,
  value: ``StatisticValue`` (doubleValue, floatValue, intValue, stringValue, stringList)};
  it holds only what has data: a metric absent on a day is unknown, not zero.
- ``FEEDBACK_LOOP_SPAM_RATE`` needs ``feedback_loop_id = "<id>"`` and may add
  ``AND aggregation_key_type = "FROM_HEADER" | "ALL_DKIM"``. ``SPAM_RATE`` is the
  domain's. ``DELIVERY_ERROR_RATE`` takes no filter (all errors), ``error_type = "reject" |
  "temp_fail"``, or a type and an ``error_reason``; v2 breaks it down by reason only
  through these filters (one metric per reason) and never by IP.
- The read scope is ``postmaster.traffic.readonly`` (v2 has no ``postmaster.readonly``).

Rates are fractions (0.003 = 0.3 %), as in v1's ratios; a rate outside [0, 1] is refused
rather than guessed at.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from datetime import date
from pathlib import Path
from typing import Any

from warmrelay.reputation.feeds import FeedError, FeedValue

PROVIDER = "gmail"
SCOPE = "https://www.googleapis.com/auth/postmaster.traffic.readonly"
# Gmail's FBL counts only mail DKIM-signed, after the Feedback-ID was added, by the domain
# registered in Postmaster Tools; ALL_DKIM selects exactly that mail, also when the From
# domain differs from the signing domain (FROM_HEADER, the default, would miss it).
AGGREGATION_KEY_TYPE = "ALL_DKIM"
# DELIVERY_ERROR_RATE's reasons per error type, as the discovery document lists them.
DELIVERY_ERROR_REASONS: Mapping[str, tuple[str, ...]] = {
    "reject": (
        "bad_attachment",
        "bad_or_missing_ptr_record",
        "ip_in_rbls",
        "low_domain_reputation",
        "low_ip_reputation",
        "spammy_content",
        "stamp_policy_error",
        "other",
    ),
    "temp_fail": ("anomalous_traffic_pattern", "other"),
}
PAGE_SIZE = 200
MAX_PAGES = 50


def fetch_postmaster(
    credentials_file: Path,
    domains: Sequence[str],
    identifiers: Mapping[str, str],
    day: date,
    *,
    endpoint: str | None = None,
    timeout_s: float = 30,
) -> list[FeedValue]:
    """Postmaster Tools' values for ``day`` (provider "gmail"), synchronous: the caller
    runs it in a thread.

    ``identifiers`` maps each source IP to its Feedback-ID identifier: one field of the
    header, not the whole header. Our header is ``Feedback-ID:
    ip-127-0-0-2:warmrelay:mail:<sender_id>``, so 127.0.0.2's identifier is
    ``ip-127-0-0-2``. Gmail aggregates its Feedback Loop on each of the header's first
    four fields separately ("Identifiers", the help page says), and the API's
    ``feedback_loop_id`` is such an Identifier ("uniquely identifies individual
    campaigns", the same words the help page uses for Identifiers); the ids that
    ``FEEDBACK_LOOP_ID`` lists are single field values.

    Per IP: ``spam_rate`` is the Feedback Loop spam rate of its identifier, the highest
    over ``domains`` that have one. ``delivery_error_rate`` (all types) and
    ``delivery_error_reasons`` (the reasons with a non-zero rate, highest first,
    comma-separated, "" for none, names as the API spells them: ``low_ip_reputation``,
    ``ip_in_rbls``, ``bad_or_missing_ptr_record``, ``anomalous_traffic_pattern``...;
    ``other`` stands for the "other" of either error type) are
    per domain in v2: the highest over ``domains`` applies to every IP, because v2 cannot
    tell which IP the errors hit. A domain with no data for the day adds nothing: absent
    means unknown.

    Credentials: a service account key file; its ``token_uri`` says where the access token
    is fetched. ``endpoint`` replaces the API's root URL (tests: loopback). ``timeout_s``
    bounds each network read. Any failure (key file, token endpoint, HTTP status, timeout,
    an answer that is not what the API returns) raises FeedError with a one-line reason.
    """
    idents = sorted({ident for ident in identifiers.values() if ident})
    if not domains or not identifiers:
        return []
    service = _service(credentials_file, endpoint, timeout_s)
    body, meaning = _request(idents, day)
    spam: dict[str, float] = {}  # identifier -> highest FBL spam rate
    error_rate: float | None = None
    reasons: dict[str, float] = {}  # reason -> highest rate
    for domain in domains:
        for name, value in _day_values(service, domain, body, day, timeout_s).items():
            if name not in meaning:
                continue  # not a metric we asked for
            kind, what = meaning[name]
            if kind == "fbl":
                spam[what] = max(value, spam.get(what, value))
            elif kind == "total":
                error_rate = value if error_rate is None else max(error_rate, value)
            else:
                reasons[what] = max(value, reasons.get(what, value))
    ranked = sorted((r for r in reasons.items() if r[1] > 0), key=lambda r: (-r[1], r[0]))
    shown = ",".join(reason for reason, _ in ranked)
    out: list[FeedValue] = []
    for ip, ident in identifiers.items():
        if ident in spam:
            out.append(FeedValue(ip, PROVIDER, day, "spam_rate", spam[ident]))
        if error_rate is not None:
            out.append(FeedValue(ip, PROVIDER, day, "delivery_error_rate", error_rate))
        if error_rate is not None or reasons:
            out.append(FeedValue(ip, PROVIDER, day, "delivery_error_reasons", shown))
    return out


def _request(idents: Sequence[str], day: date) -> tuple[dict[str, Any], dict[str, tuple[str, str]]]:
    """The QueryDomainStatsRequest (one FBL spam rate per identifier, the delivery error
    rate, one per error type and reason) and what each metric name we chose means:
    ("fbl", identifier), ("total", ""), ("reason", reason). Names keep to [a-z0-9_]."""
    metrics: list[dict[str, Any]] = []
    meaning: dict[str, tuple[str, str]] = {}
    for n, ident in enumerate(idents):
        meaning[f"fbl_{n}"] = ("fbl", ident)
        metrics.append(
            {
                "name": f"fbl_{n}",
                "baseMetric": {"standardMetric": "FEEDBACK_LOOP_SPAM_RATE"},
                "filter": (
                    f'feedback_loop_id = "{_quoted(ident)}" '
                    f'AND aggregation_key_type = "{AGGREGATION_KEY_TYPE}"'
                ),
            }
        )
    meaning["delivery_error_rate"] = ("total", "")
    metrics.append(
        {"name": "delivery_error_rate", "baseMetric": {"standardMetric": "DELIVERY_ERROR_RATE"}}
    )
    for error_type, names in DELIVERY_ERROR_REASONS.items():
        for reason in names:
            name = f"reason__{error_type}__{reason}"
            meaning[name] = ("reason", reason)  # "other" of either type: one reason
            metrics.append(
                {
                    "name": name,
                    "baseMetric": {"standardMetric": "DELIVERY_ERROR_RATE"},
                    "filter": f'error_type = "{error_type}" AND error_reason = "{reason}"',
                }
            )
    body = {
        "metricDefinitions": metrics,
        "timeQuery": {"dateList": {"dates": [_date(day)]}},
        "aggregationGranularity": "DAILY",
        "pageSize": PAGE_SIZE,
    }
    return body, meaning


def _quoted(text: str) -> str:
    return text.replace("\\", "\\\\").replace('"', '\\"')


def _date(day: date) -> dict[str, int]:
    return {"year": day.year, "month": day.month, "day": day.day}


def load_credentials(credentials_file: Path) -> tuple[Any, dict[str, Any]]:
    """The service account's credentials (no network yet) and its key file's fields;
    FeedError naming the file when it cannot be used. serve and check-config call it too:
    a relay does not start with a key file it could never use."""
    from google.oauth2 import service_account

    try:
        info = json.loads(credentials_file.read_bytes())
    except OSError as exc:
        raise FeedError(
            f"gmail postmaster: cannot read the service account file {credentials_file}: "
            f"{(exc.strerror or str(exc)).lower()}"
        ) from None
    except ValueError:
        raise FeedError(
            f"gmail postmaster: {credentials_file} is not JSON (a service account key file is)"
        ) from None
    try:
        credentials = service_account.Credentials.from_service_account_info(  # type: ignore[no-untyped-call]
            info, scopes=[SCOPE]
        )
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise FeedError(
            f"gmail postmaster: {credentials_file} is not a service account key file: "
            f"{_one_line(exc)}"
        ) from None
    return credentials, info


def _service(credentials_file: Path, endpoint: str | None, timeout_s: float) -> Any:
    """The v2 client, built from the discovery document the package ships, its HTTP
    authorised by the service account (the access token is fetched here, so that a refusal
    reads as the token endpoint's) and bounded by ``timeout_s``."""
    import google_auth_httplib2
    import httplib2
    from googleapiclient.discovery import build

    credentials, info = load_credentials(credentials_file)
    plain = httplib2.Http(timeout=timeout_s)
    try:
        credentials.refresh(google_auth_httplib2.Request(plain))
    except Exception as exc:  # the library's many error types: one reason each
        raise _failure(
            exc, f"gmail postmaster token endpoint {info.get('token_uri')}", timeout_s
        ) from None
    http = google_auth_httplib2.AuthorizedHttp(credentials, http=plain)
    try:
        return build(
            "gmailpostmastertools",
            "v2",
            http=http,
            static_discovery=True,
            client_options={"api_endpoint": endpoint} if endpoint else None,
        )
    except Exception as exc:  # the client's own set-up: no network is involved
        raise FeedError(
            f"gmail postmaster: cannot build the API client: {_one_line(exc)}"
        ) from None


def _day_values(
    service: Any, domain: str, body: dict[str, Any], day: date, timeout_s: float
) -> dict[str, float]:
    """Our metric name -> value for ``day`` at ``domain``, over every page."""
    values: dict[str, float] = {}
    page_token: str | None = None
    for _ in range(MAX_PAGES):
        request = dict(body, parent=f"domains/{domain}")
        if page_token:
            request["pageToken"] = page_token
        try:
            answer = (
                service.domains()
                .domainStats()
                .query(parent=f"domains/{domain}", body=request)
                .execute()
            )
        except Exception as exc:  # the library's many error types: one reason each
            raise _failure(exc, f"gmail postmaster {domain}", timeout_s) from None
        page_token = _read_page(answer, domain, day, values)
        if not page_token:
            return values
    raise FeedError(f"gmail postmaster {domain}: more than {MAX_PAGES} pages of stats")


def _read_page(answer: object, domain: str, day: date, values: dict[str, float]) -> str | None:
    """Adds one QueryDomainStatsResponse's values for ``day``; its nextPageToken."""
    where = f"gmail postmaster {domain}"
    if isinstance(answer, (str, bytes)):  # what the client hands on when JSON fails
        raise FeedError(f"{where}: the answer is not JSON")
    if not isinstance(answer, dict):
        raise FeedError(f"{where}: the answer is not a QueryDomainStatsResponse object")
    stats = answer.get("domainStats", [])
    if not isinstance(stats, list):
        raise FeedError(f"{where}: domainStats is not a list")
    for stat in stats:
        if not isinstance(stat, dict) or not isinstance(stat.get("metric"), str):
            raise FeedError(f"{where}: a DomainStat without a metric name")
        when = stat.get("date")
        if when is not None and when != _date(day):
            if not isinstance(when, dict):
                raise FeedError(f"{where}: a DomainStat date is not a Date")
            continue  # another day: not asked for
        number = _number(stat.get("value"), where, stat["metric"])
        if number is not None:
            values[stat["metric"]] = number
    token = answer.get("nextPageToken")
    if token is not None and not isinstance(token, str):
        raise FeedError(f"{where}: nextPageToken is not a string")
    return token or None


def _number(value: object, where: str, metric: str) -> float | None:
    """A StatisticValue's rate (doubleValue or floatValue), None if it has none."""
    if value is None:
        return None
    if not isinstance(value, dict):
        raise FeedError(f"{where}: the value of {metric} is not a StatisticValue")
    raw = value.get("doubleValue", value.get("floatValue"))
    if raw is None:
        return None
    if isinstance(raw, bool) or not isinstance(raw, (int, float, str)):
        raise FeedError(f"{where}: the value of {metric} is not a number")
    try:  # proto3 JSON may write a double as a string ("NaN", "0.25")
        number = float(raw)
    except ValueError:
        raise FeedError(f"{where}: the value of {metric} is not a number") from None
    if math.isnan(number):
        return None
    if not 0 <= number <= 1:
        raise FeedError(f"{where}: {metric} = {number:g} is not a rate between 0 and 1")
    return number


def _failure(exc: Exception, where: str, timeout_s: float) -> FeedError:
    """One line saying why a call failed (``where``: what was called)."""
    from google.auth import exceptions as auth_errors
    from googleapiclient import errors as api_errors

    if isinstance(exc, api_errors.HttpError):
        return FeedError(f"{where}: HTTP {exc.status_code} {_one_line(exc.reason)}".rstrip())
    if isinstance(exc, auth_errors.RefreshError):
        said = exc.args[0] if exc.args and isinstance(exc.args[0], str) else str(exc)
        return FeedError(f"{where}: refused: {_one_line(said)}")
    if isinstance(exc, auth_errors.TransportError):
        return FeedError(f"{where}: cannot be reached: {_one_line(exc)}")
    if isinstance(exc, TimeoutError):
        return FeedError(f"{where}: no answer within {timeout_s:g}s")
    if isinstance(exc, OSError):
        return FeedError(f"{where}: cannot connect: {(exc.strerror or str(exc)).lower()}")
    if isinstance(exc, ValueError):  # json.JSONDecodeError among them
        return FeedError(f"{where}: the answer is not JSON: {_one_line(exc)}")
    if isinstance(exc, (TypeError, KeyError)):  # google-auth reading a token answer
        return FeedError(f"{where}: the answer is not a token response")
    return FeedError(f"{where}: {type(exc).__name__}: {_one_line(exc)}")


def _one_line(exc: object) -> str:
    return " ".join(str(exc).split())[:300]
