"""What a reload changes: ``describe_changes`` compares the running configuration with
the new one, one "key.path: old \u2192 new" line per value, for the log of the reload;
secrets are never shown (``redact_url`` also serves the commands that print a counters
URL)."""

from __future__ import annotations

import re
from collections.abc import Mapping
from datetime import date
from typing import Any
from urllib.parse import urlparse

from pydantic import BaseModel

from warmrelay.config.model import Config
from warmrelay.config.values import format_path, is_secret_key
from warmrelay.warmup.plan import Schedule


def redact_url(text: str) -> str:
    """A URL without its password (``redis://:***@host``, also ``?password=***``)."""
    if "://" not in text:
        return text
    parsed = urlparse(text)
    netloc = parsed.netloc
    if parsed.password is not None:
        userinfo, _, host = netloc.rpartition("@")
        netloc = f"{userinfo.partition(':')[0]}:***@{host}"
    query = re.sub(r"(?i)(^|&)(password|pass|token)=[^&]*", r"\1\2=***", parsed.query)
    return parsed._replace(netloc=netloc, query=query).geturl()


_ABSENT = object()  # a mapping key or an IP that one side does not have


def _show(value: Any, name: str = "") -> str:
    """A configuration value as a YAML editor would write it, secrets left out."""
    if value is _ABSENT:
        return "(absent)"
    if value is None:
        return "none"
    if is_secret_key(name):
        return "***"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, str):
        return redact_url(value)
    if isinstance(value, Schedule):
        caps = ", ".join(str(c) for c in value.daily[:4])
        more = f", ... {value.daily[-1]}" if value.days > 4 else ""
        label = "" if value.name == "custom" else f"{value.name} "
        return f"{label}[{caps}{more}] ({value.days} days)"
    if isinstance(value, BaseModel):
        fields = [f for f in type(value).model_fields if f in value.model_fields_set]
        return "{" + ", ".join(f"{f}: {_show(getattr(value, f), f)}" for f in fields) + "}"
    if isinstance(value, Mapping):
        return "{" + ", ".join(f"{k}: {_show(v, str(k))}" for k, v in value.items()) + "}"
    if (
        isinstance(value, tuple)
        and len(value) == 2
        and isinstance(value[0], str)
        and isinstance(value[1], int)
    ):
        host, port = value
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    if isinstance(value, (tuple, list)):
        return "[" + ", ".join(_show(v, name) for v in value) + "]"
    if isinstance(value, date):
        return value.isoformat()
    return str(value)


def _diff(old: Any, new: Any, path: list[int | str], out: list[str]) -> None:
    if old == new:
        return
    name = str(path[-1]) if path else ""
    if isinstance(old, BaseModel) and type(old) is type(new):
        for field in type(old).model_fields:
            _diff(getattr(old, field), getattr(new, field), [*path, field], out)
        return
    if isinstance(old, Mapping) and isinstance(new, Mapping):
        for key in [*old, *(k for k in new if k not in old)]:
            _diff(old.get(key, _ABSENT), new.get(key, _ABSENT), [*path, str(key)], out)
        return
    if path == ["ips"]:  # entries by address: one inserted is not a change of all after it
        before = {str(ip.address): ip for ip in old}
        after = {str(ip.address): ip for ip in new}
        for address in [*before, *(a for a in after if a not in before)]:
            _diff(before.get(address, _ABSENT), after.get(address, _ABSENT), [*path, address], out)
        return
    if (
        isinstance(old, tuple)
        and isinstance(new, tuple)
        and len(old) == len(new)
        and any(isinstance(v, BaseModel) for v in old)
    ):
        for i, (a, b) in enumerate(zip(old, new, strict=True)):
            _diff(a, b, [*path, i], out)
        return
    before_text, after_text = _show(old, name), _show(new, name)
    where = format_path(path)
    if before_text == after_text:  # only a secret part differs
        out.append(f"{where}: {before_text} (a secret changed; not shown)")
    else:
        out.append(f"{where}: {before_text} \u2192 {after_text}")


def describe_changes(old: Config, new: Config) -> list[str]:
    """What a reload changes, one "key.path: old \u2192 new" per value, in file order;
    secrets (password hashes, tokens, passwords in URLs) are never shown. Source IPs are
    named by address (``ips['127.0.0.2'].warmup.start``), added or removed ones as a whole."""
    out: list[str] = []
    _diff(old, new, [], out)
    return out
