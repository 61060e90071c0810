"""The section of the events the application consumes (``warmrelay.events``): a signed
webhook fed from a durable outbox, and the same events as JSON lines (``events:``)."""

from __future__ import annotations

import os
from urllib.parse import urlsplit

from pydantic import Field, field_validator

from warmrelay.config.values import Frozen
from warmrelay.errors import ConfigError, ConfigProblem

SECRET_MIN_BYTES = 16  # an HMAC key shorter than this is guessable
ARGS_HEADER = "X-Warmrelay-Args"


class WebhookConfig(Frozen):
    """Events are POSTed to ``url`` in JSON batches, signed with the secret, at least once:
    kept in ``state.dir``'s outbox until the receiver answered 2xx."""

    url: str
    secret_env: str  # the variable holding the signing secret (unset: refuse to start)
    batch_max: int = Field(default=100, ge=1, le=10_000)  # events per POST at most
    batch_ms: int = Field(default=1000, ge=0)  # the longest an event waits for a batch
    timeout_s: float = Field(default=10.0, gt=0)  # per POST; no answer: retried
    retry_first_s: float = Field(default=1.0, gt=0)  # after a failed POST, doubling...
    retry_max_s: float = Field(default=300.0, gt=0)  # ...up to this
    max_age_s: float = Field(default=3 * 86400.0, gt=0)  # then the event is dropped (ERROR)
    max_events: int = Field(default=1_000_000, ge=1)  # outbox bound: more are counted lost

    @field_validator("url")
    @classmethod
    def _http(cls, value: str) -> str:
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("an http:// or https:// URL with a host")
        return value


class EventsConfig(Frozen):
    """One event per recipient and outcome, in SendGrid's Event Webhook shape."""

    webhook: WebhookConfig | None = None
    file: str | None = None  # JSON lines appended here ("-": standard output)
    # a message's custom arguments are kept (in the state store) this long for the
    # bounces and complaints that come back after the handover (with bounces:)
    args_keep_days: float = Field(default=30.0, gt=0)


def webhook_secret(webhook: WebhookConfig) -> bytes:
    """The signing secret, read now; missing or short is a ConfigError (serve refuses to
    start: unsigned events would let anyone feed the application's suppression list)."""
    value = os.environ.get(webhook.secret_env, "").strip()
    if len(value.encode()) < SECRET_MIN_BYTES:
        what = "is not set or empty" if not value else f"is shorter than {SECRET_MIN_BYTES} bytes"
        raise ConfigError(
            [
                ConfigProblem(
                    "events.webhook.secret_env",
                    f"the environment variable {webhook.secret_env} {what}; refusing to post "
                    "unsigned events (set it to a long random secret: openssl rand -hex 32)",
                )
            ]
        )
    return value.encode()
