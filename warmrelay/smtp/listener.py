"""Listener: the SMTP side facing applications (aiosmtpd protocol, our policy).

Access policy and limits live in ``RelayHandler``; the protocol is aiosmtpd's.
On DATA the message goes to the spool and the client hears ``250`` only once
the spool holds it durably; delivery never runs inside an SMTP session.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import functools
import inspect
import ipaddress
import json
import logging
import re
import ssl
import time
import weakref
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any, AnyStr

import aiosmtpd.smtp
from aiosmtpd.proxy_protocol import ProxyData
from aiosmtpd.smtp import SMTP, AuthResult, Envelope, LoginPassword, Session, TLSSetupException

from warmrelay.config import ARGS_HEADER, Config, IPAddress, IPNetwork, ListenerConfig
from warmrelay.errors import SpoolError
from warmrelay.events.emitter import Events
from warmrelay.events.model import ArgsError, parse_args
from warmrelay.feedback.intake import FeedbackIntake
from warmrelay.feedback.token import FEEDBACK_ID, without_header
from warmrelay.mail.dates import mail_date
from warmrelay.mail.dkim import Signer
from warmrelay.mail.suppression import SuppressionList
from warmrelay.operate.metrics import Metrics
from warmrelay.queue.spool import Spool, SpooledMessage
from warmrelay.smtp.auth import Authenticator, AuthGuard
from warmrelay.warmup.eligibility import header_block

log = logging.getLogger("warmrelay.listener")

PROXY_TIMEOUT_S = 10.0  # a load balancer sends its PROXY header at once
SHUTTING_DOWN = "421 4.3.2 Service shutting down, try again later"
# A line this long without its end is abuse, not mail (RFC 5321 allows 1,000 octets;
# aiosmtpd answers 500 after the dot for anything over that, but keeps every fragment of
# the line until its end): the session is answered and closed as the bytes arrive.
MAX_LINE_BYTES = 1024 * 1024
# A refusal that is the recipient's fault, not the client's (a suppressed, dead address):
# it does not spend the session's budget of refused commands.
_RECIPIENT_VERDICT = "550 5.1.1 "

# aiosmtpd answers some errors itself, without enhanced status codes (RFC 3463).
_ENHANCED = {
    "552 Error: message size exceeds fixed maximum message size": (
        "552 5.3.4 Message size exceeds fixed maximum message size"
    ),
    "553 5.1.3 Error: malformed address": "501 5.1.3 Bad address syntax",
    "503 Error: need MAIL command": "503 5.5.1 Error: need MAIL command",
    "503 Error: nested MAIL command": "503 5.5.1 Error: nested MAIL command",
}
# <local@domain> with an unquoted dot-atom local part and a plain domain, then parameters
_SIMPLE_PATH = re.compile(
    r"\s*<(([A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+(?:\.[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+)*)"
    r"@[A-Za-z0-9](?:[A-Za-z0-9.-]*[A-Za-z0-9])?)>(.*)\Z",
    re.DOTALL,
)
_BARE_NEWLINE = re.compile(rb"\r(?!\n)|(?<!\r)\n")
_DOMAIN = re.compile(
    r"^(?:[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.)+[A-Za-z0-9-]{1,63}$"
    r"|^\[(?:IPv6:)?[0-9A-Fa-f:.]+\]$"
)


class _Methods(Mapping[str, Any]):
    """Command or mechanism name -> this session's method, bound when aiosmtpd looks it up.

    aiosmtpd's SMTP.__init__ lists the protocol's smtp_*/auth_* and the handler's handle_*
    methods into dicts of bound methods for every connection (with dir(), getmembers() and
    a getattr per name), of which a session uses four or five: ~5 % of the event loop at
    one connection per message. The names depend only on the class; see ``_methods``."""

    __slots__ = ("_functions", "_owner", "_wrap")

    def __init__(
        self,
        owner: object,
        functions: dict[str, Callable[..., Any]],
        wrap: Callable[[Any], Any] | None = None,
    ) -> None:
        self._owner, self._functions, self._wrap = owner, functions, wrap

    def __getitem__(self, name: str) -> Any:
        bound = self._functions[name].__get__(self._owner, type(self._owner))
        return bound if self._wrap is None else self._wrap(bound)

    def __iter__(self) -> Iterator[str]:
        return iter(self._functions)

    def __len__(self) -> int:
        return len(self._functions)


_FOUND: dict[tuple[type, str], dict[str, Callable[..., Any]]] = {}


def _methods(cls: type, prefix: str) -> dict[str, Callable[..., Any]]:
    """The functions behind ``cls``'s methods named ``prefix``*, by the name aiosmtpd gives
    them: the rest of the name; for auth_, ``__auth_mechanism_name__`` or "__" as "-".
    Listed once per class."""
    found = _FOUND.get((cls, prefix))
    if found is not None:
        return found
    found = {}
    for name in dir(cls):
        if name.startswith(prefix):
            fn = getattr(cls, name)
            key = name[len(prefix) :]
            if prefix == "auth_":
                key = getattr(fn, "__auth_mechanism_name__", key.replace("__", "-"))
            found[key] = fn
    _FOUND[(cls, prefix)] = found
    return found


class _HandlerMethods:
    """What aiosmtpd's SMTP.__init__ derives from the handler, once per handler: its
    handle_* hooks (bound to it, so one dict serves every session; aiosmtpd never changes
    it), its own auth_* mechanisms, and which handle_EHLO signature it has."""

    def __init__(self, handler: object) -> None:
        names = [n for n in dir(handler) if n.startswith("handle_")]
        self.hooks = {n[len("handle_") :]: getattr(handler, n) for n in names}
        self.auth = {
            k: aiosmtpd.smtp._AuthMechAttr(fn.__get__(handler, type(handler)), False)
            for k, fn in _methods(type(handler), "auth_").items()
        }
        ehlo = self.hooks.get("EHLO")
        self.ehlo_version: str | None = None
        if ehlo is not None:
            self.ehlo_version = {4: "old", 5: "new"}[len(inspect.signature(ehlo).parameters)]


_HANDLERS: weakref.WeakKeyDictionary[object, _HandlerMethods] = weakref.WeakKeyDictionary()


def _builtin_auth(method: Any) -> Any:
    return aiosmtpd.smtp._AuthMechAttr(method, True)


_LOG_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO}
_aiosmtpd_sanitized_log = aiosmtpd.smtp.sanitized_log


def _sanitized_log(func: Callable[..., None], msg: AnyStr, *args: Any, **kwargs: Any) -> None:
    """aiosmtpd logs every command line through sanitized_log(log.info | log.debug, ...),
    which runs its AUTH-masking regex over the line before the logger decides whether
    to write anything. Its logger ("mail.log") passes only warnings (setup_logging), so
    ask the logger first: ~2 % of the event loop at one connection per message."""
    logger = getattr(func, "__self__", None)
    level = _LOG_LEVELS.get(getattr(func, "__name__", ""))
    if isinstance(logger, logging.Logger) and level is not None and not logger.isEnabledFor(level):
        return
    _aiosmtpd_sanitized_log(func, msg, *args, **kwargs)


setattr(aiosmtpd.smtp, "sanitized_log", _sanitized_log)  # noqa: B010


# DATA: a line of 998 octets + CRLF, or 999 with a transparency dot (aiosmtpd's
# line_length_limit of 1,001 with its CRLF); the stream may hold this much per read.
MAX_DATA_LINE = 999
_LINE_TOO_LONG = "500 5.5.2 Line too long"
_TOO_MUCH_DATA = "552 5.3.4 Message size exceeds fixed maximum message size"
DATA_READ_LIMIT = 256 * 1024


def _too_long_or_too_much(raw: bytearray, limit: int) -> str:
    """The refusal for a message that just passed ``limit`` bytes, decided as aiosmtpd's
    line reader does: 500 if a line before the one that crossed the limit was too long,
    or the crossing line is longer than its stream limit (1,001 octets before the CRLF);
    else 552. Lines after the crossing one do not count."""
    count = 0
    parts = raw.split(b"\r\n")
    for i, part in enumerate(parts):
        count += len(part) + (2 if i < len(parts) - 1 else 0)
        if count > limit:
            return _LINE_TOO_LONG if len(part) > MAX_DATA_LINE + 2 else _TOO_MUCH_DATA
        if len(part) > MAX_DATA_LINE:
            return _LINE_TOO_LONG
    return _TOO_MUCH_DATA


class ConnectionLimits:
    """Open sessions, in total and per client address (shared by all listeners)."""

    def __init__(self, total: int, per_client: int) -> None:
        self.open = 0
        self._by_client: dict[str, int] = {}
        self.configure(total, per_client)

    def configure(self, total: int, per_client: int) -> None:
        """New caps (reload) apply to the next connection; open sessions are kept and counted."""
        self.total, self.per_client = total, per_client

    def acquire(self, client: str, *, exempt: bool = False) -> bool:
        """``exempt`` skips the per-client cap (as Postfix exempts $mynetworks): an
        application host in allow_networks may open many sessions at once."""
        if self.open >= self.total:
            return False
        if not exempt and self._by_client.get(client, 0) >= self.per_client:
            return False
        self.open += 1
        self._by_client[client] = self._by_client.get(client, 0) + 1
        return True

    def move(self, old: str, new: str, *, exempt: bool = False) -> bool:
        """Hand one open session from ``old`` to ``new`` (a load balancer's connection once
        its PROXY header names the real client), checking ``new``'s per-client cap. When
        refused, the session stays counted under ``old``."""
        if not exempt and self._by_client.get(new, 0) >= self.per_client:
            return False
        self._forget(old)
        self._by_client[new] = self._by_client.get(new, 0) + 1
        return True

    def release(self, client: str) -> None:
        self.open -= 1
        self._forget(client)

    def _forget(self, client: str) -> None:
        left = self._by_client.get(client, 1) - 1
        if left:
            self._by_client[client] = left
        else:
            self._by_client.pop(client, None)


# A client that vanishes or talks nonsense at the socket or TLS level: its fault, not ours.
_NETWORK_ERRNOS = frozenset(
    {
        errno.ECONNRESET,
        errno.ECONNABORTED,
        errno.EPIPE,
        errno.ETIMEDOUT,
        errno.EHOSTUNREACH,
        errno.ENETUNREACH,
        errno.EHOSTDOWN,
        errno.ENETDOWN,
    }
)


def _client_fault(error: BaseException) -> bool:
    if isinstance(error, (TLSSetupException, ssl.SSLError, asyncio.IncompleteReadError)):
        return True
    if isinstance(error, ConnectionError):
        return True
    return isinstance(error, OSError) and error.errno in _NETWORK_ERRNOS


def _describe(error: BaseException) -> str:
    cause = error.__cause__ if isinstance(error, TLSSetupException) else None
    shown = cause or error
    text = str(shown).strip()
    return f"{type(shown).__name__}: {text}" if text else type(shown).__name__


class RelaySMTP(SMTP):
    """aiosmtpd's protocol plus our limits: enhanced status codes, connection caps,
    a budget of refused commands, a deadline for DATA, and AUTH checked off the loop.

    ``client`` is the one identity of a connection, decided once: the socket peer, or on
    a PROXY listener the source address from the balancer's header. aiosmtpd starts a new
    ``Session`` at STARTTLS (RFC 3207 §4.2), which forgets the PROXY data; this object
    lives as long as the connection, so relay permission, connection caps, AUTH lockout,
    the Received: header and log lines all use ``client`` and never ``session.peer``.
    """

    def __init__(
        self,
        handler: RelayHandler,
        listener: ListenerConfig,
        tls: str,
        *,
        loop: asyncio.AbstractEventLoop,
        hostname: str,
        data_size_limit: int,
        timeout: float,
        tls_context: ssl.SSLContext | None,
        auth_required: bool,
        auth_require_tls: bool,
        proxy_protocol_timeout: float | None,
    ) -> None:
        """What aiosmtpd's SMTP.__init__ sets up for these arguments (enable_SMTPUTF8,
        decode_data=False, our authenticator), with its method dicts made per class
        (``_Methods``) instead of per connection; test_protocol_init compares the two."""
        asyncio.StreamReaderProtocol.__init__(
            self,
            asyncio.StreamReader(loop=loop, limit=self.line_length_limit),
            client_connected_cb=self._cb_client_connected,
            loop=loop,
        )
        self.__ident__ = "warmrelay ESMTP"
        self.loop = loop
        self.event_handler = handler
        self.data_size_limit = data_size_limit
        self.enable_SMTPUTF8 = True
        self._decode_data = False
        self.command_size_limits.clear()  # as aiosmtpd does (a dict of its class)
        self.hostname = hostname
        self.tls_context = tls_context
        self.require_starttls = False if tls_context else None  # aiosmtpd: ctx and False
        self._timeout_duration = timeout
        self._timeout_handle: asyncio.TimerHandle | None = None
        self._tls_handshake_okay = True
        self._tls_protocol = None
        self._original_transport = None
        self.session = None
        self.envelope = None
        self.transport = None
        self._handler_coroutine = None
        self._auth_require_tls = auth_require_tls
        self._proxy_timeout = proxy_protocol_timeout
        self._authenticator = self._capture
        self._auth_callback = None
        self._auth_required = auth_required
        known = _HANDLERS.get(handler)
        if known is None:
            known = _HANDLERS[handler] = _HandlerMethods(handler)
        auth: Mapping[str, Any] = _Methods(self, _methods(type(self), "auth_"), _builtin_auth)
        if known.auth:  # a handler's mechanism replaces the protocol's of that name
            auth = {**auth, **known.auth}
        # aiosmtpd declares dicts; it only reads them (get, [], in, keys, items)
        self._auth_methods = auth  # type: ignore[assignment]
        self._handle_hooks = known.hooks
        self._ehlo_hook_ver = known.ehlo_version
        self._smtp_methods = _Methods(self, _methods(type(self), "smtp_"))  # type: ignore[assignment]
        self._enforce_call_limit = False
        self.relay = handler
        self.listener = listener
        self.tls_mode = tls
        self._metrics = handler.metrics
        self.client = ""
        # False on a PROXY listener until a header names the client (a LOCAL or UNKNOWN
        # header is the balancer talking for itself): allow_networks then does not apply.
        self.client_known = True
        self._held: str | None = None  # the key of our slot in ConnectionLimits
        self._bad = 0
        self._implicit_tls = False
        self._open_line = 0  # bytes received since the last line end
        self._idle_deadline = 0.0  # loop time after which a silent client is hung up on
        self._continued: list[str] = []  # lines of a multi-line reply not yet written

    def _reset_timeout(self, duration: float | None = None) -> None:
        """aiosmtpd cancels its idle timer and starts a new one at every command (7+ timer
        handles per message in the loop's heap); moving a deadline and keeping one timer,
        which looks again when it fires, ends a silent session at the same moment."""
        loop = self.loop
        self._idle_deadline = loop.time() + (duration or self._timeout_duration)
        timer = self._timeout_handle
        if timer is None or timer.cancelled() or timer.when() > self._idle_deadline:
            if timer is not None:
                timer.cancel()
            self._timeout_handle = loop.call_at(self._idle_deadline, self._idle_check)

    def _idle_check(self) -> None:
        if self.loop.time() < self._idle_deadline:  # a command came meanwhile: look later
            self._timeout_handle = self.loop.call_at(self._idle_deadline, self._idle_check)
        elif self.transport is not None:  # as aiosmtpd's _timeout_cb: connection_lost cleans up
            self.transport.close()

    @property
    def encrypted(self) -> bool:
        return self._implicit_tls or (self.session is not None and self.session.ssl is not None)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if self.transport is not None:  # the STARTTLS upgrade: same connection, same client
            super().connection_made(transport)
            return
        if self.relay.closing:  # accepted just before the listener closed
            _last_word(transport, SHUTTING_DOWN)
            return
        peer = transport.get_extra_info("peername")
        self.client = _address(str(peer[0])) if peer else ""
        self._implicit_tls = transport.get_extra_info("sslcontext") is not None
        if self.listener.proxy_protocol:
            # Only a listed balancer may name the client; anyone else could claim any
            # address. Closed before the header is read: nothing of theirs is parsed.
            if not _in_networks(self.client, self.listener.proxy_from):
                log.warning(
                    "%s: not in proxy_from of PROXY listener %s:%d; closing",
                    self.client,
                    *self.listener.address,
                )
                transport.close()
                return
            self.client_known = False
            exempt = True  # the balancer carries many clients; each is capped on its own
        else:
            exempt = self.relay.may_relay(self.client)
        if not self.relay.limits.acquire(self.client, exempt=exempt):
            self._metrics.rejected.labels("421").inc()
            log.warning("%s: too many connections, refusing", self.client)
            _last_word(transport, "421 4.7.0 Too many connections, try again later")
            return
        self._held = self.client
        self._metrics.smtp_sessions.inc()
        self.relay.sessions.add(self)
        super().connection_made(transport)

    def connection_lost(self, error: Exception | None) -> None:
        if self._held is None:
            return  # refused in connection_made, or already cleaned up
        self.relay.limits.release(self._held)
        self._held = None
        self._metrics.smtp_sessions.dec()
        self.relay.session_ended(self)
        super().connection_lost(error)
        # asyncio sets a client's reset (ConnectionResetError) on this protocol's "closed"
        # future too, and retrieves it only in the protocol's __del__; when a garbage
        # collection finalizes the future first, the log gets "Future exception was never
        # retrieved" for a client's hang-up. Retrieved here: it was just handled above.
        closed = getattr(self, "_closed", None)
        if closed is not None and closed.done() and not closed.cancelled():
            closed.exception()

    def eof_received(self) -> bool:
        """The client closed its side: no command can follow. aiosmtpd cancels the session
        task here and keeps the half-closed transport open; a task cancelled before its
        first step (a client that connects and closes at once, seen with uvloop) then never
        closes it, and the session would hold its connection slot until the idle timeout.
        Closing it now still sends what is queued."""
        super().eof_received()
        return False

    @property
    def in_transaction(self) -> bool:
        """MAIL accepted and the message not yet answered (DATA resets the envelope before
        its final reply): the part of a session a shutdown lets finish."""
        return self.envelope is not None and self.envelope.mail_from is not None

    def shut_down(self) -> None:
        """The relay is stopping: 421 4.3.2 and close (RFC 5321 3.8), at once."""
        self._hang_up(SHUTTING_DOWN)

    async def proxied(self, address: str) -> bool:
        """The balancer's PROXY header names the real client: from now on it is ``client``,
        and the connection counts against that client's cap (allow_networks exempt)."""
        address = _address(address)
        balancer = self.client
        assert self._held is not None
        if not self.relay.limits.move(self._held, address, exempt=self.relay.may_relay(address)):
            log.warning("%s: too many connections (via %s), refusing", address, balancer)
            await self.push("421 4.7.0 Too many connections, try again later")
            return False
        self._held = self.client = address
        self.client_known = True
        log.debug("%s: connected via PROXY from %s", address, balancer)
        return True

    async def _handle_client(self) -> None:
        """aiosmtpd runs the session as a task nobody awaits, so an exception escaping it
        surfaces only at garbage collection, as "Task exception was never retrieved" with a
        traceback. Its loop re-raises ConnectionResetError, and the PROXY phase and the
        greeting run outside its per-command handler. Whatever escapes ends here, when it
        happens: a client's fault as one INFO line, ours with its traceback. Cancellation
        (connection_lost cancels the task) passes through."""
        try:
            await super()._handle_client()
        except Exception as exc:
            if _client_fault(exc):
                log.info("%s: session ended by the client: %s", self.client, _describe(exc))
            else:
                log.exception("%s: session failed", self.client)
            if self.transport is not None:
                self.transport.close()

    async def handle_exception(self, error: Exception) -> str:
        """An exception escaping a command (aiosmtpd would log a traceback and tell the
        client our exception's class and text). A client's fault (a failed STARTTLS
        handshake, a reset while we answer) is one INFO line and the end of the session; our
        own fault is logged with its traceback and answered with a plain 451."""
        if _client_fault(error):
            log.info("%s: session ended by the client: %s", self.client, _describe(error))
            if self.transport is not None:
                self.transport.close()
            return "421 4.4.2 Connection lost"
        log.exception("%s: error in the SMTP session", self.client, exc_info=error)
        return "451 4.3.0 Local error in processing, try again later"

    async def push(self, status: AnyStr) -> None:
        """One write per reply. aiosmtpd pushes each line of a multi-line reply (EHLO's
        seven) as a write of its own: a send() each, and a wake-up of the client for each,
        ~40 % of our writes per message. A continuation line ("250-...") waits here for its
        reply's last line; one with another code cannot belong to it and is dropped."""
        text = status.decode("utf-8", "replace") if isinstance(status, bytes) else str(status)
        text = _ENHANCED.get(text, text)
        if text[3:4] == "-":
            self._continued.append(text)
            return
        if self._continued:
            held: list[str] = self._continued
            self._continued = []
            if all(line[:3] == text[:3] for line in held):
                text = "\r\n".join([*held, text])
        if text[:1] in ("4", "5"):
            self._metrics.rejected.labels(text[:3]).inc()
        await super().push(text)
        if self.relay.closing and not self.in_transaction:
            self.shut_down()  # the transaction ended (250 after DATA, RSET, a refusal)
            return
        if text[:1] == "5" and not text.startswith(_RECIPIENT_VERDICT):
            self._bad += 1
            if self._bad == self.relay.config.smtp.max_bad_commands:
                log.warning("%s: too many refused commands, hanging up", self.client)
                self._hang_up("421 4.7.0 Too many errors, closing connection")

    def data_received(self, data: bytes) -> None:
        """Bound what one session can make us hold: count the bytes of the line in
        progress (one rfind per chunk) and hang up once it passes MAX_LINE_BYTES."""
        end = data.rfind(b"\n")
        self._open_line = len(data) - end - 1 if end >= 0 else self._open_line + len(data)
        if self._open_line > MAX_LINE_BYTES:
            if self.transport is not None and not self.transport.is_closing():
                log.warning(
                    "%s: a line over %d bytes without its end: hanging up",
                    self.client,
                    MAX_LINE_BYTES,
                )
            self._hang_up("500 5.5.2 Line too long, closing connection")
            return
        super().data_received(data)

    def _hang_up(self, reply: str) -> None:
        """Say why, then close. Synchronous, so a timer can call it too: connection_lost then
        cancels the session task, which aiosmtpd ends quietly."""
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        self._metrics.rejected.labels(reply[:3]).inc()
        _last_word(transport, reply)

    def _getaddr(self, arg: str) -> tuple[str | None, str | None]:
        """The common "<local@domain> PARAMS" is split here; anything else (quoted local
        parts, source routes, comments, UTF-8) goes to aiosmtpd's stdlib-email parser,
        which cost ~10 % of the loop thread for every MAIL and RCPT."""
        m = _SIMPLE_PATH.match(arg)
        if m is None or len(m.group(2)) > 64:
            return super()._getaddr(arg)
        return m.group(1), m.group(3).lstrip(" \t")

    async def smtp_DATA(self, arg: str) -> None:
        """DATA under a deadline, read in bulk (see ``_read_data``). A timer closes the
        connection rather than cancelling the read, so a reply written after that never
        left and no inner task ends with an exception nobody retrieved."""
        if await self.check_helo_needed() or await self.check_auth_needed("DATA"):
            return
        assert self.envelope is not None
        if not self.envelope.rcpt_tos:
            await self.push("503 5.5.1 Error: need RCPT command")
            return
        if arg:
            await self.push("501 Syntax: DATA")
            return
        await self.push("354 End data with <CR><LF>.<CR><LF>")
        deadline = self.loop.call_later(self.relay.config.smtp.data_timeout_s, self._data_late)
        try:
            content, refusal = await self._read_data()
        except asyncio.CancelledError:  # the connection is gone (or the deadline closed it)
            self._writer.close()
            raise
        finally:
            deadline.cancel()
        if refusal is not None:
            await self.push(refusal)
            self.envelope = self._create_envelope()  # aiosmtpd's post-DATA state
            return
        self.envelope.content = self.envelope.original_content = content
        status = await self._call_handler_hook("DATA")
        self.envelope = self._create_envelope()
        await self.push("250 OK" if status is aiosmtpd.smtp.MISSING else status)

    async def _read_data(self) -> tuple[bytes, str | None]:
        """The message up to CRLF.CRLF, unstuffed (RFC 5321 4.5.2); or the refusal owed once
        the dot arrives (RFC 5321 4.2.5): a line over 1,000 octets or a message over
        max_message_bytes, whichever came first, as aiosmtpd's reader decides it.

        aiosmtpd awaits one line at a time, ~70 awaits for 4 KB: 10 % of the event loop's
        CPU. This asks the stream for everything up to the next ".CRLF" (usually the end
        of the message, in one call) and checks lines with bytes.split in C. What follows
        the terminator (a pipelining client's next commands) stays in the stream."""
        reader = self._reader
        limit = self.data_size_limit
        # the stream's line limit (aiosmtpd's, for commands) is raised while DATA lasts;
        # asyncio has no public setter for it
        saved: int = reader._limit  # type: ignore[attr-defined]
        reader._limit = max(saved, DATA_READ_LIMIT)  # type: ignore[attr-defined]
        raw = bytearray()  # the raw lines (stuffing dots kept) while none is refused
        refusal: str | None = None
        seen = b""  # the stream's last two bytes: does ".CRLF" start a line?
        try:
            while True:
                try:
                    chunk = await reader.readuntil(b".\r\n")
                    ended = (seen + chunk)[-5:] == b"\r\n.\r\n" or (not seen and chunk == b".\r\n")
                except asyncio.LimitOverrunError as exc:  # no ".CRLF" yet in a full buffer
                    chunk, ended = await reader.readexactly(exc.consumed), False
                except asyncio.IncompleteReadError as exc:  # the end of the stream
                    raise ConnectionResetError("connection closed during DATA") from exc
                seen = (seen + chunk)[-2:]
                if refusal is None:
                    raw += chunk[:-3] if ended else chunk
                    if limit and len(raw) > limit:
                        refusal, raw = _too_long_or_too_much(raw, limit), bytearray()
                if ended:
                    break
        finally:
            reader._limit = saved  # type: ignore[attr-defined]
        if refusal is None and raw and max(map(len, raw.split(b"\r\n"))) > MAX_DATA_LINE:
            refusal = _LINE_TOO_LONG
        if refusal is not None:
            return b"", refusal
        if raw[:1] == b".":
            del raw[0]
        return bytes(raw.replace(b"\r\n.", b"\r\n")), None

    def _data_late(self) -> None:
        log.warning("%s: DATA took too long, hanging up", self.client)
        self._hang_up("421 4.4.2 DATA timeout, closing connection")

    # AUTH: aiosmtpd parses PLAIN/LOGIN and calls a synchronous authenticator; ours only
    # captures the credentials, then the real (slow, threaded) check runs here.

    def _capture(
        self, server: SMTP, session: Session, envelope: Envelope, mechanism: str, data: Any
    ) -> AuthResult:
        return AuthResult(success=True, auth_data=data)

    async def auth_PLAIN(self, _: Any, args: list[str]) -> AuthResult:
        if not await self._auth_allowed():
            return AuthResult(success=False, handled=True)
        return await self._verify(await super().auth_PLAIN(_, args))

    async def auth_LOGIN(self, _: Any, args: list[str]) -> AuthResult:
        if not await self._auth_allowed():
            return AuthResult(success=False, handled=True)
        return await self._verify(await super().auth_LOGIN(_, args))

    async def _auth_allowed(self) -> bool:
        if self.relay.guard.locked(self.client):
            log.warning("%s: AUTH refused, locked out after failed attempts", self.client)
            self._hang_up("421 4.7.0 Too many failed authentications, try again later")
            return False
        return True

    async def _verify(self, parsed: AuthResult) -> AuthResult:
        if not parsed.success or not isinstance(parsed.auth_data, LoginPassword):
            return parsed  # aiosmtpd already answered (bad base64, cancelled)
        user = parsed.auth_data.login.decode("utf-8", "replace")
        password = parsed.auth_data.password.decode("utf-8", "replace")
        if await self.relay.auth.verify(user, password):
            self.relay.guard.succeeded(self.client)
            log.info("%s: authenticated as %s", self.client, user)
            return AuthResult(success=True, auth_data=parsed.auth_data)
        delay = self.relay.guard.failed(self.client)
        log.warning("%s: authentication failed for user %r", self.client, user[:64])
        await asyncio.sleep(delay)  # tarpit: each failure makes guessing slower
        return AuthResult(
            success=False, handled=False, message="535 5.7.8 Authentication credentials invalid"
        )


def valid_mailbox(address: str) -> bool:
    """local@domain with a plausible domain (RFC 5321 syntax, simplified; UTF-8 allowed)."""
    local, at, domain = address.rpartition("@")
    if not at or not local or len(address) > 254:
        return False
    try:
        address.encode("utf-8")  # undecodable bytes arrive as lone surrogates
    except UnicodeEncodeError:
        return False
    try:
        ascii_domain = domain.encode("idna").decode("ascii") if not domain.isascii() else domain
    except UnicodeError:
        return False
    return bool(_DOMAIN.match(ascii_domain))


class RelayHandler:
    """aiosmtpd handler: who may relay, what fits, and the durable hand-off to the spool."""

    def __init__(
        self,
        config: Config,
        spool: Spool,
        submit: Callable[[SpooledMessage, bytes], None],
        metrics: Metrics,
        admit: Callable[[], Awaitable[None]] | None = None,
        suppression: SuppressionList | None = None,
    ) -> None:
        self.spool = spool
        self.submit = submit
        self.metrics = metrics
        self.admit = admit
        self.suppression = suppression  # addresses that bounced hard: refused at RCPT
        self.intake: FeedbackIntake | None = None  # reports to the bounce domain (bounces:)
        self.events: Events | None = None  # the application's events (events:)
        smtp = config.smtp
        self.limits = ConnectionLimits(smtp.max_connections, smtp.max_connections_per_client)
        self.guard = AuthGuard(smtp.max_auth_failures, smtp.auth_lockout_s, smtp.auth_tarpit_s)
        self.sessions: set[RelaySMTP] = set()  # open, admitted connections
        self.closing = False  # set by drain(): no new sessions or transactions
        self._all_ended = asyncio.Event()
        self.configure(config)

    def configure(self, config: Config, signer: Signer | None = None) -> None:
        """Take a (re)loaded configuration: relay networks, users, limits, names. Connection
        and AUTH limits change in place, so open sessions and lockouts carry over.
        ``signer``: the DKIM keys the reload loaded (or kept); at start they are read here
        and a broken key file stops the start (DkimKeyError)."""
        self.config = config
        smtp = config.smtp
        self._allowed: Sequence[IPNetwork] = smtp.allow_networks
        self.auth = Authenticator(smtp.users)
        self.limits.configure(smtp.max_connections, smtp.max_connections_per_client)
        self.guard.configure(smtp.max_auth_failures, smtp.auth_lockout_s, smtp.auth_tarpit_s)
        self.dkim = signer if signer is not None else Signer.load(config)

    def may_relay(self, client: str) -> bool:
        return _in_networks(client, self._allowed)

    def session_ended(self, session: RelaySMTP) -> None:
        self.sessions.discard(session)
        if self.closing and not self.sessions:
            self._all_ended.set()

    async def drain(self, timeout_s: float) -> None:
        """Shutdown (the listeners are closed already). Sessions outside a transaction hear
        421 4.3.2 now; those in one may finish it within ``timeout_s`` (a DATA still gets its
        250 once the spool holds the message), then hear 421 4.3.2; at the deadline the rest
        hear it too. Nobody is cut off without a reply, and the spool is still open."""
        self.closing = True
        busy = [s for s in self.sessions if s.in_transaction]
        for session in [s for s in self.sessions if not s.in_transaction]:
            session.shut_down()
        if busy:
            log.info(
                "stopping: %d SMTP session(s) in a transaction may finish within %g s",
                len(busy),
                timeout_s,
            )
        if not self.sessions:
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._all_ended.wait(), timeout_s)
        late = list(self.sessions)
        if late:
            log.warning(
                "stopping: %d SMTP session(s) still in a transaction after %g s: 421 4.3.2",
                len(late),
                timeout_s,
            )
        for session in late:
            session.shut_down()
        with contextlib.suppress(TimeoutError):  # let their connection_lost run before exit
            await asyncio.wait_for(self._all_ended.wait(), 1.0)

    async def handle_PROXY(
        self, server: SMTP, session: Session, envelope: Envelope, proxy: ProxyData
    ) -> bool:
        """A well-formed PROXY header (v1 or v2) from a balancer in proxy_from (checked at
        connect): its source address is the client from now on."""
        if not proxy.valid:
            return False
        if proxy.src_addr is None:  # LOCAL / UNKNOWN: the balancer's own health check
            return True
        src = proxy.src_addr
        client = src.decode("ascii", "replace") if isinstance(src, bytes) else str(src)
        if isinstance(server, RelaySMTP):
            return await server.proxied(client)
        return True

    async def handle_EHLO(
        self,
        server: SMTP,
        session: Session,
        envelope: Envelope,
        hostname: str,
        responses: list[str],
    ) -> list[str]:
        session.host_name = hostname
        offered = [r for r in responses[:-1] if not r.startswith("250-AUTH") or self.auth.enabled]
        return [*offered, "250-PIPELINING", "250-ENHANCEDSTATUSCODES", responses[-1]]

    async def handle_MAIL(
        self,
        server: SMTP,
        session: Session,
        envelope: Envelope,
        address: str,
        mail_options: list[str],
    ) -> str:
        # The null reverse-path stays "<>" in the envelope (aiosmtpd needs it truthy).
        if address != "<>" and not valid_mailbox(address):
            return "501 5.1.7 Bad sender address syntax"
        if not address.isascii() and "SMTPUTF8" not in (o.upper() for o in mail_options):
            return "553 5.6.7 Non-ASCII address needs MAIL FROM ... SMTPUTF8"
        user = _user(session)
        if user is not None and not self.auth.may_send_as(user, "" if address == "<>" else address):
            log.warning("%s: user %s may not send as <%s>", _client(server, session), user, address)
            return "553 5.7.1 Sender address not allowed for this user"
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        return "250 2.1.0 Ok"

    async def handle_RCPT(
        self,
        server: SMTP,
        session: Session,
        envelope: Envelope,
        address: str,
        rcpt_options: list[str],
    ) -> str:
        client = _client(server, session)
        reports = self._reports(envelope)
        if self.intake is not None and self.intake.is_report(address):
            # anyone may send reports here (receivers bounce from anywhere); they are never
            # relayed on, so they need no relay permission
            if envelope.rcpt_tos and not reports:
                return "452 4.5.3 Send reports to the bounce domain in a transaction of their own"
            if len(envelope.rcpt_tos) >= self.config.smtp.max_recipients:
                return "452 4.5.3 Too many recipients"
            reply = self.intake.rcpt(address)
            if reply.startswith("250"):
                envelope.rcpt_tos.append(address)
            else:
                log.info("%s: <%s> refused: %s", client, address, reply[4:])
            return reply
        if reports:
            return "452 4.5.3 Send reports to the bounce domain in a transaction of their own"
        listener: ListenerConfig | None = getattr(server, "listener", None)
        known = not isinstance(server, RelaySMTP) or server.client_known
        by_network = known and self.may_relay(client) and not (listener and listener.require_auth)
        if not (session.authenticated or by_network):
            log.warning("%s: relaying denied to <%s>", client, address)
            if listener is not None and listener.require_auth:
                return "530 5.7.0 Authentication required"
            return "550 5.7.1 Relaying denied"
        if not valid_mailbox(address):
            return "501 5.1.3 Bad recipient address syntax"
        if not address.isascii() and not envelope.smtp_utf8:
            return "553 5.6.7 Non-ASCII address needs MAIL FROM ... SMTPUTF8"
        suppressed = self.suppression.check(address) if self.suppression is not None else None
        if suppressed is not None:
            log.info("%s: <%s> refused: on the suppression list", client, address)
            refusal = suppressed.refusal(address)
            if self.events is not None:
                self.events.refused(address, refusal.split(": ", 1)[-1], datetime.now(UTC))
            return refusal
        if len(envelope.rcpt_tos) >= self.config.smtp.max_recipients:
            return "452 4.5.3 Too many recipients"
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(rcpt_options)
        return "250 2.1.5 Ok"

    def _reports(self, envelope: Envelope) -> bool:
        """A transaction to the bounce domain (its first recipient says it)."""
        return (
            self.intake is not None
            and bool(envelope.rcpt_tos)
            and self.intake.is_report(envelope.rcpt_tos[0])
        )

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        content: bytes = envelope.original_content or b""
        client = _client(server, session)
        if self._reports(envelope):
            assert self.intake is not None
            return await self.intake.take(client, envelope.rcpt_tos, content)
        if b"\0" in content:
            return "554 5.6.0 Message contains NUL characters"
        if _has_bare_newline(content):
            # A lone CR or LF lets "<LF>.<LF>" end a message early at a receiver that
            # takes it for a line end (SMTP smuggling): refuse, or make every one CRLF.
            if self.config.smtp.bare_newlines == "reject":
                return "554 5.6.11 Message contains bare CR or LF characters"
            content = _BARE_NEWLINE.sub(b"\r\n", content)
        # The application's custom arguments for its events: never delivered, never signed
        meta = {"client": client, "helo": session.host_name or ""}
        if ARGS_HEADER.encode().lower() in content[: content.find(b"\r\n\r\n")].lower():
            text = header_block(content, {ARGS_HEADER.lower()}).get(ARGS_HEADER.lower())
            if text is not None:
                try:
                    args = parse_args(text)
                except ArgsError as exc:
                    return f"554 5.6.0 {ARGS_HEADER}: {exc}"
                content = without_header(content, ARGS_HEADER)
                if args:
                    meta["args"] = json.dumps(args, separators=(",", ":"))
        received_at = time.time()
        # Signed once, here, before the spool: every retry sends these bytes. Our own
        # Received: line is added after, unsigned (it is trace, not the author's content).
        # With a bounce domain, each source IP's Feedback-ID must be signed too: the
        # delivery stage signs (deterministically: retries from an IP send the same bytes);
        # here only what decides acceptance (refuse mode) and the added Message-ID/Date.
        deferred = self.config.bounces is not None
        if deferred:
            content = without_header(content, FEEDBACK_ID)  # ours names the IP
        signed = await self.dkim.sign_off_loop(content, received_at, defer=deferred)
        if signed.refuse:
            self.metrics.dkim.labels(signed.domain, signed.result).inc()
            log.warning(
                "%s: from=<%s> refused: dkim %s", client, envelope.mail_from, signed.summary
            )
            return signed.reply
        content = signed.data
        encrypted = bool(getattr(server, "encrypted", False))
        trace = self._received_header(session, client, envelope, received_at, encrypted)
        data = trace + content
        if self.events is not None:  # SendGrid's smtp-id (DKIM may have added it)
            message_id = header_block(content, {"message-id"}).get("message-id")
            if message_id:
                meta["message_id"] = message_id
        if self.admit is not None:
            await self.admit()
        try:
            message = await self.spool.store(
                "" if envelope.mail_from == "<>" else envelope.mail_from or "",
                envelope.rcpt_tos,
                data,
                meta=meta,
                received_at=received_at,
            )
        except SpoolError as exc:
            self.metrics.spool_errors.inc()
            log.error("%s: spool cannot store a message: %s", client, exc)
            return "451 4.3.0 Cannot queue the message now, try again later"
        self.metrics.received.inc()
        self.metrics.dkim.labels(signed.domain, signed.result).inc()
        log.log(
            logging.WARNING if signed.result == "error" else logging.INFO,
            "%s: from=<%s> nrcpt=%d size=%d client=%s dkim=%s",
            message.queue_id,
            message.mail_from,
            len(message.rcpt_tos),
            message.size,
            client,
            signed.summary,
            extra={  # log.format json: the same fields, typed
                "queue_id": message.queue_id,
                "from": message.mail_from,
                "nrcpt": len(message.rcpt_tos),
                "size": message.size,
                "client": client,
                "dkim": signed.summary,
            },
        )
        if self.events is not None:
            self.events.processed(message)
        self.submit(message, data)
        return f"250 2.0.0 Ok: queued as {message.queue_id}"

    def _received_header(
        self, session: Session, client: str, envelope: Envelope, now: float, encrypted: bool
    ) -> bytes:
        helo = (session.host_name or "unknown").replace("\r", "").replace("\n", "")[:255]
        # RFC 3848 protocol names: ESMTP, +S with TLS, +A when authenticated
        proto = ("UTF8SMTP" if envelope.smtp_utf8 else "ESMTP") if session.extended_smtp else "SMTP"
        proto += ("S" if encrypted else "") + ("A" if session.authenticated else "")
        date = mail_date(now)
        header = (
            f"Received: from {helo} ([{client}])\r\n"
            f"\tby {self.config.smtp.hostname} (warmrelay) with {proto};\r\n"
            f"\t{date}\r\n"
        )
        return header.encode("utf-8", "surrogateescape")


def _last_word(transport: asyncio.BaseTransport, reply: str) -> None:
    """Write one reply, then close (the transport sends what it holds first). Not behind
    ``isinstance(transport, asyncio.WriteTransport)``: another event loop's transports
    (uvloop's) have write() without being its subclasses, and the client would hear
    nothing."""
    write = getattr(transport, "write", None)
    if write is not None:
        write(reply.encode("ascii") + b"\r\n")
    transport.close()


def _has_bare_newline(content: bytes) -> bool:
    """A CR or LF not part of a CRLF pair. Counting in C is ~10x faster than the regex on
    clean mail; the regex only confirms when the counts disagree."""
    pairs = content.count(b"\r\n")
    if content.count(b"\n") == pairs and content.count(b"\r") == pairs:
        return False
    return _BARE_NEWLINE.search(content) is not None


def _client(server: SMTP, session: Session) -> str:
    """The client's address as RelaySMTP decided it once for the connection (PROXY source or
    socket peer; never the session's, which STARTTLS renews). A plain aiosmtpd SMTP has only
    the socket peer."""
    if isinstance(server, RelaySMTP):
        return server.client
    peer = session.peer
    return _address(str(peer[0])) if isinstance(peer, tuple) else str(peer or "")


def _ip(text: str) -> IPAddress | None:
    """An address as text, IPv4-mapped IPv6 (a dual-stack socket's view) as plain IPv4."""
    try:
        addr = ipaddress.ip_address(text)
    except ValueError:
        return None
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return addr.ipv4_mapped
    return addr


@functools.lru_cache(maxsize=1024)  # per connection: a few clients, parsed once each
def _address(text: str) -> str:
    """One spelling per client, so caps and lockouts count ::ffff:10.0.0.1 as 10.0.0.1."""
    addr = _ip(text)
    return text if addr is None else str(addr)


def _in_networks(client: str, networks: Sequence[IPNetwork]) -> bool:
    addr = _ip(client)
    return addr is not None and any(addr in net for net in networks)


def _user(session: Session) -> str | None:
    if not session.authenticated or session.login_data is None:
        return None
    login = session.login_data
    return login.decode("utf-8", "replace") if isinstance(login, bytes) else str(login)


def make_protocol(
    handler: RelayHandler,
    config: Config,
    listener: ListenerConfig,
    tls_context: ssl.SSLContext | None,
) -> Callable[[], RelaySMTP]:
    """A protocol factory for ``loop.create_server`` for one listener."""
    tls = config.smtp.listener_tls(listener)
    in_clear_ok = listener.auth_without_tls or tls == "implicit"

    def factory() -> RelaySMTP:
        return RelaySMTP(
            handler,
            listener,
            tls,
            loop=asyncio.get_running_loop(),  # aiosmtpd's own lookup costs a warnings context
            hostname=handler.config.smtp.hostname,  # the handler's: follows reloads
            data_size_limit=handler.config.smtp.max_message_bytes,
            timeout=handler.config.smtp.timeout_s,
            tls_context=tls_context if tls == "starttls" else None,
            auth_required=listener.require_auth,
            auth_require_tls=not in_clear_ok,
            proxy_protocol_timeout=PROXY_TIMEOUT_S if listener.proxy_protocol else None,
        )

    return factory
