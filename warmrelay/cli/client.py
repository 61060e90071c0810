"""The command line's client of the running relay's admin endpoint (``warmrelay queue``,
``ip``, ``suppression``): one place that finds the relay, sends the token and the
operator's name, and turns the relay's answers into words for the person at the shell.

No relay answering is not an error here (``RelayDown``: the commands then work on the
state they would otherwise ask the relay about); a relay that refuses says why, in client
words: what to set or fix on this side, never an HTTP status.
"""

from __future__ import annotations

import contextlib
import getpass
import json
import os
import urllib.error
import urllib.request
from typing import Any

from warmrelay.config import Config

TIMEOUT_S = 30.0


class RelayDown(Exception):
    """No relay answers on admin.listen (or none is configured)."""


class Refused(Exception):
    """The relay answered, and refused: the text says why, for the operator."""


def operator() -> str:
    """Who is at the shell (logged by the relay with each change)."""
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return "unknown"


def base_url(config: Config) -> str:
    if config.admin.listen is None:
        raise RelayDown
    host, port = config.admin.listen
    return f"http://{'[' + host + ']' if ':' in host else host}:{port}"


def call(
    config: Config, method: str, path: str, body: dict[str, Any] | None = None
) -> dict[str, Any]:
    """``method path`` on the running relay; its JSON answer. ``RelayDown`` when no relay
    answers, ``Refused`` when it says no."""
    url = base_url(config) + path
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method=method)
    if data is not None:
        request.add_header("Content-Type", "application/json")
    env = config.admin.token_env
    token = os.environ.get(env, "").strip() if env else ""
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    request.add_header("X-Warmrelay-User", operator())
    try:
        with urllib.request.urlopen(request, timeout=TIMEOUT_S) as response:
            answer: dict[str, Any] = json.loads(response.read())
            return answer
    except urllib.error.HTTPError as exc:
        text = exc.read().decode(errors="replace").strip()
        with contextlib.suppress(ValueError, KeyError, TypeError):
            text = str(json.loads(text)["error"])
        if exc.code == 401:
            raise Refused(_unauthorised(env, bool(token))) from None
        raise Refused(text) from None
    except (urllib.error.URLError, OSError) as exc:
        reason = exc.reason if isinstance(exc, urllib.error.URLError) else exc
        if isinstance(reason, TimeoutError):  # it is there, and did not answer in time
            raise Refused(f"the running relay did not answer within {TIMEOUT_S:g} s") from None
        raise RelayDown from None


def _unauthorised(env: str | None, sent: bool) -> str:
    if env is None:
        return (
            "the running relay wants an admin token, but this file has no admin.token_env: "
            "is it the relay's configuration?"
        )
    if not sent:
        return f"the running relay wants its admin token: set {env} (admin.token_env) here"
    return f"the running relay did not accept the admin token in {env}"
