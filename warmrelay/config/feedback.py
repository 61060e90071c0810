"""The section of what comes back after the handover (``warmrelay.feedback``): our own
return path domain, the secret that signs its tokens, and what becomes of the reports
(``bounces:``)."""

from __future__ import annotations

import os
from pathlib import Path

from pydantic import Field, model_validator

from warmrelay.config.values import Frozen, HostName
from warmrelay.errors import ConfigError, ConfigProblem

SECRET_MIN_BYTES = 16  # an HMAC key shorter than this is guessable


class BouncesConfig(Frozen):
    """``bounces.domain``'s MX points at this relay: every delivery leaves with a return
    path there (a signed token per recipient), and the DSNs and complaints sent to it are
    taken in, attributed to the IP and provider that carried the mail, and forwarded."""

    domain: HostName
    secret_env: str | None = None  # the variable holding the token secret
    secret_file: Path | None = None  # or a file holding it (mode 0600)
    forward: bool = True  # reports go on to the original sender (null sender, pool IP)
    sender_id: str | None = Field(default=None, pattern=r"^[A-Za-z0-9._-]{1,64}$")
    max_report_bytes: int = Field(default=1024 * 1024, gt=0)  # a bigger report: 552 5.3.4
    reports_per_minute: int = Field(default=120, gt=0)  # per client address: then 450 4.7.1
    keep_reports_days: float = Field(default=7.0, gt=0)  # raw reports kept for inspection

    @model_validator(mode="after")
    def _one_secret(self) -> BouncesConfig:
        if (self.secret_env is None) == (self.secret_file is None):
            raise ValueError("give exactly one of secret_env or secret_file")
        return self

    def feedback_sender_id(self, hostname: str) -> str:
        """Feedback-ID's last field (Gmail's SenderId): the configured one, else the relay's
        host name."""
        return self.sender_id or hostname


def bounce_secret(bounces: BouncesConfig) -> bytes:
    """The token secret, read now; a missing or short secret is a ConfigError (serve refuses
    to start: an unsigned return path would let anyone suppress any address)."""
    if bounces.secret_env is not None:
        value = os.environ.get(bounces.secret_env, "").strip()
        where, source = "bounces.secret_env", f"the environment variable {bounces.secret_env}"
    else:
        assert bounces.secret_file is not None
        where, source = "bounces.secret_file", str(bounces.secret_file)
        try:
            value = bounces.secret_file.read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            raise ConfigError([ConfigProblem(where, f"cannot read {source}: {reason}")]) from None
    if len(value.encode()) < SECRET_MIN_BYTES:
        what = "is not set or empty" if not value else f"is shorter than {SECRET_MIN_BYTES} bytes"
        raise ConfigError(
            [
                ConfigProblem(
                    where,
                    f"{source} {what}; refusing to start with a return path anyone could forge "
                    "(set it to a long random secret: openssl rand -hex 32)",
                )
            ]
        )
    return value.encode()
