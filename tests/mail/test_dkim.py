"""DKIM signing at acceptance, checked by independent verifiers over real DNS.

The public keys are published as TXT records by a loopback DNS server. Three verifiers
read the signed mail:

- opendkim-testmsg (Debian's opendkim-tools, libopendkim) uses the system resolver, which
  cannot be given a port: it runs in a private mount namespace whose /etc/resolv.conf
  names a port-53 responder on a loopback address that answers from the same server.
  That needs root.
- Perl's Mail::DKIM (libmail-dkim-perl) asks the loopback server through a Net::DNS
  resolver given its address and port. Debian 12's version (1.20230212) has no Ed25519
  (added in 1.20230630): there it checks the RSA signatures only.
- dkimpy through dnspython. It is not independent of us (it strips VT and FF as we did
  and cannot parse ``Subject : x``), so the tests of odd input do not ask it.

Without opendkim-testmsg, root or Mail::DKIM their checks skip, except under CI=true
where they must run. The canonicalisation itself is compared with a plain per-rule
reading of RFC 6376 3.4.2 and 3.4.4 written out below.
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import logging
import os
import random
import re
import shutil
import stat
import struct
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiosmtplib
import dkim
import dns.resolver
import pytest
import yaml
from aiosmtpd.smtp import Envelope
from cryptography.hazmat.primitives.asymmetric import rsa
from hypothesis import given
from hypothesis import strategies as st
from support.cli import warmrelay
from support.dnsserver import LoopbackDNS
from support.relay import relay_config, relay_doc, running
from support.sink import Sink

from warmrelay import cli
from warmrelay.app import Relay
from warmrelay.config import DKIM_HEADERS, load_config
from warmrelay.mail.dkim import (
    OFF_LOOP_BYTES,
    DkimKeyError,
    HeaderSectionError,
    PrivateKey,
    Signer,
    generate_key,
    parse_header_section,
    relaxed_body,
    relaxed_header_value,
    select_headers,
    txt_value,
    write_key,
)

DOMAIN = "example.test"


def _in_ci() -> bool:
    return os.environ.get("CI", "").lower() not in ("", "0", "false", "no")


async def run_tool(
    *argv: str, stdin: bytes | None = None, timeout_s: float = 30.0
) -> tuple[int, bytes, bytes]:
    """A verifier (or a probe of one) as a process of its own, bounded in time: killed when
    it runs over, so a hung tool fails its test instead of hanging the suite."""
    proc = await asyncio.create_subprocess_exec(
        *argv,
        stdin=asyncio.subprocess.DEVNULL if stdin is None else asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(stdin), timeout_s)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode is not None
    return proc.returncode, out, err


# -- keys, DNS and the two verifiers ----------------------------------------------------


class Keys:
    """Key files made once per module (RSA key generation takes a while)."""

    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self.private: dict[str, PrivateKey] = {}
        for selector, algorithm in (("r1", "rsa"), ("e1", "ed25519"), ("r2", "rsa")):
            key = generate_key(algorithm)  # type: ignore[arg-type]
            write_key(self.path(selector), key)
            self.private[selector] = key

    def path(self, selector: str) -> Path:
        return self.dir / f"{selector}.pem"

    def entry(self, selector: str) -> dict[str, str]:
        algorithm = "rsa-sha256" if selector.startswith("r") else "ed25519-sha256"
        return {"selector": selector, "key_file": str(self.path(selector)), "algorithm": algorithm}

    def publish(self, zone: LoopbackDNS, domain: str = DOMAIN) -> None:
        for selector, key in self.private.items():
            zone.add_txt(f"{selector}._domainkey.{domain}", txt_value(key))


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> Keys:
    return Keys(tmp_path_factory.mktemp("dkim-keys"))


@pytest.fixture
async def zone(keys: Keys) -> AsyncIterator[LoopbackDNS]:
    async with LoopbackDNS() as server:
        keys.publish(server)
        yield server


def dkim_section(keys: Keys, *selectors: str, **over: Any) -> dict[str, Any]:
    return {"domains": {DOMAIN: {"keys": [keys.entry(s) for s in selectors]}}, **over}


def txt_lookup(zone: LoopbackDNS) -> Callable[..., bytes | None]:
    """dkimpy's dnsfunc: TXT through dnspython, asking only the loopback server."""
    resolver = dns.resolver.Resolver(configure=False)
    resolver.nameservers = [zone.host]
    resolver.port = zone.port

    def get_txt(name: bytes, timeout: float = 5) -> bytes | None:
        try:
            answer = resolver.resolve(name.decode(), "TXT", lifetime=timeout)
        except dns.resolver.NXDOMAIN:
            return None
        return b"".join(b"".join(r.strings) for r in answer)

    return get_txt


async def dkimpy_verifies(data: bytes, zone: LoopbackDNS, idx: int = 0) -> bool:
    """dkimpy is synchronous: in a thread, so the loopback DNS (in this loop) can answer."""
    d = dkim.DKIM(data)
    try:
        return bool(await asyncio.to_thread(d.verify, idx, txt_lookup(zone)))
    except dkim.ValidationError:  # e.g. a body hash mismatch: raised, not returned
        return False


class Port53:
    """A DNS responder on port 53 of a loopback address, relaying to a LoopbackDNS."""

    def __init__(self, zone: LoopbackDNS, workdir: Path) -> None:
        self.zone = zone
        self.address = f"127.53.{random.randint(1, 254)}.{random.randint(1, 254)}"
        self.resolv_conf = workdir / "resolv.conf"
        self._udp: asyncio.DatagramTransport | None = None
        self._tcp: asyncio.Server | None = None

    async def start(self) -> None:
        zone = self.zone

        class Udp(asyncio.DatagramProtocol):
            def connection_made(self, transport: asyncio.BaseTransport) -> None:
                self.transport = transport

            def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
                reply = zone.answer(data, udp=True)
                if reply is not None:
                    self.transport.sendto(reply, addr)  # type: ignore[attr-defined]

        async def tcp(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError):
                while True:
                    (length,) = struct.unpack("!H", await reader.readexactly(2))
                    reply = zone.answer(await reader.readexactly(length), udp=False) or b""
                    writer.write(struct.pack("!H", len(reply)) + reply)
                    await writer.drain()
            writer.close()

        loop = asyncio.get_running_loop()
        self._udp, _ = await loop.create_datagram_endpoint(Udp, local_addr=(self.address, 53))
        self._tcp = await asyncio.start_server(tcp, self.address, 53)
        self.resolv_conf.write_text(f"nameserver {self.address}\noptions timeout:2 attempts:2\n")

    def stop(self) -> None:
        if self._udp is not None:
            self._udp.close()
        if self._tcp is not None:
            self._tcp.close()


@pytest.fixture
async def opendkim(zone: LoopbackDNS, tmp_path: Path) -> AsyncIterator[Callable[..., Any]]:
    """``await opendkim(data)`` -> (exit code, stderr) of opendkim-testmsg verifying."""
    reason = ""
    if shutil.which("opendkim-testmsg") is None:
        reason = "opendkim-testmsg is not installed (apt-get install opendkim-tools)"
    elif os.geteuid() != 0 or shutil.which("unshare") is None:
        reason = "opendkim checks need root and unshare (a private /etc/resolv.conf)"
    port53 = Port53(zone, tmp_path)
    if not reason:
        try:
            await port53.start()
        except OSError as exc:
            port53.stop()  # UDP may be bound already
            reason = f"cannot serve DNS on {port53.address}:53: {exc}"
    if reason:
        if _in_ci():
            pytest.fail(f"{reason} (CI=true: the opendkim checks must run)")
        pytest.skip(reason)

    async def verify(data: bytes) -> tuple[int, str]:
        script = 'mount --bind "$1" /etc/resolv.conf && exec opendkim-testmsg'
        code, _, err = await run_tool(
            *("unshare", "--mount", "--propagation", "private", "sh", "-c", script, "sh"),
            str(port53.resolv_conf),
            stdin=data,
        )
        return code, err.decode(errors="replace")

    try:
        yield verify
    finally:
        port53.stop()


# Mail::DKIM verifying the message on stdin; one line per signature: selector, result.
MAIL_DKIM_VERIFY = r"""
use strict;
use warnings;
use Mail::DKIM::DNS;
use Mail::DKIM::Verifier;
use Net::DNS::Resolver;
my ($host, $port) = @ARGV;
Mail::DKIM::DNS::resolver(Net::DNS::Resolver->new(
    nameservers => [$host], port => $port, retry => 2, udp_timeout => 5, tcp_timeout => 5));
binmode STDIN;
my $message = do { local $/; <STDIN> };
my $dkim = Mail::DKIM::Verifier->new;
$dkim->PRINT($message);
$dkim->CLOSE;
print join("\t", $_->selector // "", $_->result_detail // ""), "\n" for $dkim->signatures;
"""


class MailDkim:
    """``await mail_dkim(data)`` -> {selector: Mail::DKIM's result, e.g. "pass" or
    "fail (message has been altered)"} for every signature of the message."""

    def __init__(self, zone: LoopbackDNS, ed25519: bool) -> None:
        self.zone = zone
        self.ed25519 = ed25519  # this Mail::DKIM verifies ed25519-sha256

    async def __call__(self, data: bytes) -> dict[str, str]:
        code, out, err = await run_tool(
            *("perl", "-e", MAIL_DKIM_VERIFY, self.zone.host, str(self.zone.port)), stdin=data
        )
        assert code == 0, err.decode(errors="replace")
        lines = out.decode(errors="replace").splitlines()
        return dict(line.split("\t", 1) for line in lines)

    def checks(self, algorithm: str) -> bool:
        return algorithm == "rsa-sha256" or self.ed25519


async def _perl_has(module: str) -> bool:
    code, _, _ = await run_tool("perl", f"-M{module}", "-e", "1")
    return code == 0


@pytest.fixture
async def mail_dkim(zone: LoopbackDNS) -> MailDkim:
    reason = ""
    if shutil.which("perl") is None:
        reason = "perl is not installed"
    elif not await _perl_has("Mail::DKIM::Verifier") or not await _perl_has("Net::DNS"):
        reason = "Mail::DKIM is not installed (apt-get install libmail-dkim-perl)"
    if reason:
        if _in_ci():
            pytest.fail(f"{reason} (CI=true: the Mail::DKIM checks must run)")
        pytest.skip(reason)
    return MailDkim(zone, await _perl_has("Mail::DKIM::Algorithm::ed25519_sha256"))


async def rejections(
    data: bytes, opendkim: Callable[..., Any], mail_dkim: MailDkim, *, use_opendkim: bool = True
) -> list[str]:
    """What the independent verifiers hold against the signatures of ``data`` (empty: every
    signature verifies with each verifier that knows its algorithm). opendkim-testmsg
    reports one result for a message, so it sees each signature alone."""
    sigs = signatures(data)
    assert sigs, "not signed"
    out = []
    by_perl = await mail_dkim(data)
    for i, sig in enumerate(sigs):
        if use_opendkim:
            code, err = await opendkim(only_signature(data, i))
            if code != 0:
                out.append(f"opendkim rejects s={sig['s']}: {err.strip()}")
        if mail_dkim.checks(sig["a"]) and by_perl.get(sig["s"]) != "pass":
            out.append(f"Mail::DKIM rejects s={sig['s']}: {by_perl.get(sig['s'])}")
    return out


# -- message helpers -----------------------------------------------------------------------


def header_section(data: bytes) -> bytes:
    return data.split(b"\r\n\r\n", 1)[0] + b"\r\n"


def fields(data: bytes, name: str) -> list[bytes]:
    """Every field ``name`` of the header section, unfolded, top to bottom."""
    unfolded = re.sub(rb"\r\n[ \t]", b" ", header_section(data))
    prefix = name.lower().encode() + b":"
    return [line for line in unfolded.split(b"\r\n") if line.lower().startswith(prefix)]


def tags(signature: bytes) -> dict[str, str]:
    value = re.sub(r"\s+", "", signature.decode().split(":", 1)[1])
    return dict(part.split("=", 1) for part in value.split(";") if part)


def signatures(data: bytes) -> list[dict[str, str]]:
    return [tags(f) for f in fields(data, "DKIM-Signature")]


def only_signature(data: bytes, keep: int) -> bytes:
    """The message with every DKIM-Signature but number ``keep`` removed."""
    lines = data.split(b"\r\n")
    out, n, skipping = [], -1, False
    for i, line in enumerate(lines):
        if skipping and line[:1] in (b" ", b"\t"):
            continue
        skipping = False
        if line.lower().startswith(b"dkim-signature:"):
            n += 1
            if n != keep:
                skipping = True
                continue
        out.append(line)
        if not line:  # end of the header section: the rest as it is
            out += lines[i + 1 :]
            break
    return b"\r\n".join(out)


def without_our_received(data: bytes) -> bytes:
    assert data.startswith(b"Received: from ")
    end = data.index(b"\r\n", data.index(b"(warmrelay)")) + 2
    end = data.index(b"\r\n", end) + 2  # the date line
    return data[end:]


MESSAGE = (
    "Received: from app.internal (app.internal [10.0.0.9]) by mx.internal;\r\n"
    "\tThu, 26 Nov 2026 10:00:00 +0000\r\n"
    f"From: Shop <orders@{DOMAIN}>\r\n"
    "To: <a@rcpt.test>\r\n"
    "Subject: Your   order\r\n"
    "Date: Thu, 26 Nov 2026 10:00:00 +0000\r\n"
    f"Message-ID: <order-1@{DOMAIN}>\r\n"
    "MIME-Version: 1.0\r\n"
    "Content-Type: text/plain; charset=utf-8\r\n"
    "\r\n"
    "Thanks for your order.  \r\n"
    "\tIt ships today.\r\n"
)


async def submit(relay: Relay, message: str | bytes, sender: str = f"orders@{DOMAIN}") -> str:
    client = aiosmtplib.SMTP(hostname="127.0.0.1", port=relay.smtp_ports[0])
    async with client:
        _, reply = await client.sendmail(sender, ["a@rcpt.test"], message)
    return reply


def dkim_count(relay: Relay, domain: str, result: str) -> float:
    labels = {"domain": domain, "result": result}
    return relay.metrics.registry.get_sample_value("warmrelay_dkim_total", labels) or 0.0


# -- the tests -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "selectors",
    [("r1",), ("e1",), ("r1", "e1")],
    ids=["rsa", "ed25519", "dual"],
)
async def test_signatures_verify_with_dkimpy_opendkim_and_mail_dkim(
    tmp_path: Path,
    sink: Sink,
    keys: Keys,
    zone: LoopbackDNS,
    opendkim: Callable[..., Any],
    mail_dkim: MailDkim,
    selectors: tuple[str, ...],
) -> None:
    config = relay_config(tmp_path, sink.port, dkim=dkim_section(keys, *selectors))
    async with running(config) as relay:
        await submit(relay, MESSAGE)
        data = (await sink.wait_for(1))[0].data
        assert dkim_count(relay, DOMAIN, "signed") == 1
    sigs = signatures(data)
    assert [s["s"] for s in sigs] == list(selectors)  # in key order, one per key
    algorithms = {"r": "rsa-sha256", "e": "ed25519-sha256"}
    assert [s["a"] for s in sigs] == [algorithms[s[0]] for s in selectors]
    assert all(s["d"] == DOMAIN and s["c"] == "relaxed/relaxed" for s in sigs)
    assert await rejections(data, opendkim, mail_dkim) == []
    forged = data.replace(b"Subject: Your   order", b"Subject: Your refund")
    by_perl = await mail_dkim(forged)
    for i, sig in enumerate(sigs):
        assert await dkimpy_verifies(data, zone, i), f"dkimpy rejects {sig['s']}"
        # the verifiers really check: a changed subject fails the same signature
        assert not await dkimpy_verifies(forged, zone, i)
        assert (await opendkim(only_signature(forged, i)))[0] != 0
        if mail_dkim.checks(sig["a"]):
            assert by_perl[sig["s"]] == "fail (message has been altered)"
    code, err = await opendkim(data)  # the message as delivered, every signature in it
    assert code == 0, err


async def test_from_is_oversigned_and_received_is_not_signed(
    tmp_path: Path, sink: Sink, keys: Keys, zone: LoopbackDNS, opendkim: Callable[..., Any]
) -> None:
    config = relay_config(tmp_path, sink.port, dkim=dkim_section(keys, "r1"))
    async with running(config) as relay:
        await submit(relay, MESSAGE)
        data = (await sink.wait_for(1))[0].data
    # our Received: is on top, above the signature: added after signing
    assert data.startswith(b"Received: from ") and b"by relay.test (warmrelay)" in data
    assert data.index(b"(warmrelay)") < data.index(b"DKIM-Signature:")
    signed = tags(fields(data, "DKIM-Signature")[0])["h"].split(":")
    assert signed.count("from") == 2  # once per From field, once more: over-signed
    assert "received" not in signed  # neither ours nor the client's own trace field
    assert {"to", "subject", "date", "message-id", "mime-version", "content-type"} <= set(signed)
    # removing our trace line (or adding more trace) leaves the signature valid
    assert await dkimpy_verifies(without_our_received(data), zone)
    assert (await opendkim(without_our_received(data)))[0] == 0
    # a second From: added on the way breaks it, wherever it goes
    for forged in (
        b"From: <ceo@" + DOMAIN.encode() + b">\r\n" + data,
        data.replace(b"\r\nTo: ", b"\r\nFrom: <ceo@" + DOMAIN.encode() + b">\r\nTo: ", 1),
    ):
        assert not await dkimpy_verifies(forged, zone)
        assert (await opendkim(forged))[0] != 0


async def test_missing_message_id_and_date_are_added_and_signed(
    tmp_path: Path, sink: Sink, keys: Keys, zone: LoopbackDNS, opendkim: Callable[..., Any]
) -> None:
    bare = f"From: <app@{DOMAIN}>\r\nTo: <a@rcpt.test>\r\nSubject: bare\r\n\r\nhello\r\n"
    config = relay_config(tmp_path, sink.port, dkim=dkim_section(keys, "e1"))
    async with running(config) as relay:
        await submit(relay, bare)
        data = (await sink.wait_for(1))[0].data
    [message_id] = fields(data, "Message-ID")
    assert re.fullmatch(rb"Message-ID: <[0-9a-f]{32}@relay\.test>", message_id)
    [date] = fields(data, "Date")
    assert email.utils.parsedate_to_datetime(date.split(b":", 1)[1].decode()) is not None
    signed = tags(fields(data, "DKIM-Signature")[0])["h"].split(":")
    assert "date" in signed and "message-id" in signed
    assert await dkimpy_verifies(data, zone)
    assert (await opendkim(data))[0] == 0

    off = relay_config(
        tmp_path / "off",
        sink.port,
        dkim=dkim_section(keys, "e1", add_missing_headers=False),
    )
    async with running(off) as relay:
        await submit(relay, bare)
        data = (await sink.wait_for(2))[1].data
    assert not fields(data, "Message-ID") and not fields(data, "Date")
    assert await dkimpy_verifies(data, zone)


async def test_a_retry_after_451_sends_the_same_signed_bytes(
    tmp_path: Path, sink: Sink, keys: Keys, zone: LoopbackDNS
) -> None:
    attempts: list[bytes] = []

    def data_reply(peer: str, envelope: Envelope) -> str | None:
        attempts.append(envelope.original_content or b"")
        return "451 4.3.0 Try again later" if len(attempts) == 1 else None

    sink.data_reply = data_reply
    bare = f"From: <app@{DOMAIN}>\r\nTo: <a@rcpt.test>\r\nSubject: retry\r\n\r\nhello\r\n"
    config = relay_config(tmp_path, sink.port, dkim=dkim_section(keys, "r1", "e1"))
    async with running(config) as relay:
        await submit(relay, bare)
        await sink.wait_for(1)
    assert len(attempts) == 2
    assert attempts[0] == attempts[1]  # signature, Message-ID, Date: all made once
    assert len(signatures(attempts[1])) == 2
    assert await dkimpy_verifies(attempts[1], zone, 0)
    assert await dkimpy_verifies(attempts[1], zone, 1)


async def test_mail_without_a_key_is_sent_unsigned_and_counted(
    tmp_path: Path, sink: Sink, keys: Keys, zone: LoopbackDNS
) -> None:
    dkim_doc = dkim_section(keys, "r1", map={"*.example.test": DOMAIN, "brand.test": DOMAIN})
    config = relay_config(tmp_path, sink.port, dkim=dkim_doc)
    async with running(config) as relay:
        await submit(relay, MESSAGE)
        await submit(relay, MESSAGE.replace(f"@{DOMAIN}>", "@other.test>"))
        # map: a subdomain and another brand are signed with example.test's key
        await submit(relay, MESSAGE.replace(f"@{DOMAIN}>", "@news.example.test>"))
        await submit(relay, MESSAGE.replace(f"@{DOMAIN}>", "@brand.test>"))
        await submit(relay, MESSAGE.replace(f"@{DOMAIN}>", "@notexample.test>"))
        got = await sink.wait_for(5)
        assert dkim_count(relay, DOMAIN, "signed") == 3
        assert dkim_count(relay, "other.test", "unsigned") == 1
        assert dkim_count(relay, "notexample.test", "unsigned") == 1
    by_from = {fields(m.data, "From")[0].split(b"@")[1].rstrip(b">"): m.data for m in got}
    assert not fields(by_from[b"other.test"], "DKIM-Signature")
    assert not fields(by_from[b"notexample.test"], "DKIM-Signature")
    for author in (DOMAIN.encode(), b"news.example.test", b"brand.test"):
        assert signatures(by_from[author])[0]["d"] == DOMAIN
        assert await dkimpy_verifies(by_from[author], zone)


async def test_refuse_mode_answers_550_for_a_domain_without_a_key(
    tmp_path: Path, sink: Sink, keys: Keys
) -> None:
    config = relay_config(tmp_path, sink.port, dkim=dkim_section(keys, "r1", unsigned="refuse"))
    async with running(config) as relay:
        with pytest.raises(aiosmtplib.SMTPDataError) as refused:
            await submit(relay, MESSAGE.replace(f"@{DOMAIN}>", "@other.test>"))
        assert refused.value.code == 550
        assert "5.7.1" in refused.value.message
        assert "no DKIM key for other.test" in refused.value.message
        with pytest.raises(aiosmtplib.SMTPDataError) as broken:
            await submit(relay, "this is no header\r\n\r\nbody\r\n")
        assert broken.value.code == 554
        await submit(relay, MESSAGE)  # a domain with a key is still accepted
        await sink.wait_for(1)
        assert dkim_count(relay, "other.test", "refused") == 1
        assert dkim_count(relay, "", "error") == 1
        assert dkim_count(relay, DOMAIN, "signed") == 1
        assert relay.metrics.registry.get_sample_value("warmrelay_received_total") == 1
    assert len(sink.messages) == 1


async def test_a_header_section_that_cannot_be_parsed_is_sent_unsigned(
    tmp_path: Path, sink: Sink, keys: Keys
) -> None:
    config = relay_config(tmp_path, sink.port, dkim=dkim_section(keys, "r1"))
    async with running(config) as relay:
        await submit(relay, "this is no header\r\n\r\nbody\r\n")
        data = (await sink.wait_for(1))[0].data
        assert dkim_count(relay, "", "error") == 1
    assert b"DKIM-Signature" not in data and data.endswith(b"this is no header\r\n\r\nbody\r\n")


@pytest.mark.parametrize(
    "broken",
    [
        b" folded: before any field\r\nFrom: <app@example.test>\r\n",
        b"From: <app@example.test>\r\nX Two Words: v\r\n",
        b"From: <app@example.test>\r\nB\xc3\xa4d: 8-bit name\r\n",
        b"From: <app@example.test>\r\n: no name\r\n",
        b"From <app@example.test> Thu Nov 26 10:00:00 2026\r\nSubject: mbox\r\n",
    ],
    ids=["fold-first", "space-in-name", "8bit-name", "no-name", "mbox-from-line"],
)
def test_a_header_section_a_verifier_would_read_apart_is_not_signed(
    tmp_path: Path, keys: Keys, broken: bytes
) -> None:
    """Not RFC 5322, not even its obsolete syntax: each verifier would read it its own way,
    if at all, so it is not signed (sent unsigned, or 554 in refuse mode: tests above).
    dkimpy skipped an mbox "From " line and signed the rest."""
    signer = Signer.load(relay_config(tmp_path, 9, dkim=dkim_section(keys, "r1")))
    signed = signer.sign(broken + b"\r\nbody\r\n", 1e9)
    assert signed.result == "error" and b"DKIM-Signature" not in signed.data
    assert "header section cannot be parsed" in signed.detail
    with pytest.raises(HeaderSectionError):
        parse_header_section(broken)


@pytest.mark.parametrize(
    ("section", "expected"),
    [
        (b"Subject : x\r\n", [(b"Subject", b" x\r\n")]),
        (b"Subject\t \t:x\r\n", [(b"Subject", b"x\r\n")]),
        (b"A:\r\nB: \r\n", [(b"A", b"\r\n"), (b"B", b" \r\n")]),
        (
            b"A: 1\r\n\t2\r\n \r\n 3\r\nB: 4\r\n",
            [(b"A", b" 1\r\n\t2\r\n \r\n 3\r\n"), (b"B", b" 4\r\n")],
        ),
        (b"A:\r\n x\r\n", [(b"A", b"\r\n x\r\n")]),
        (b"X-8bit: \xe4\xff\x0b\x0c\r\n", [(b"X-8bit", b" \xe4\xff\x0b\x0c\r\n")]),
        (b"To: a\r\nTo: b\r\n", [(b"To", b" a\r\n"), (b"To", b" b\r\n")]),
        (b"X~odd_name.1!: :x:\r\n", [(b"X~odd_name.1!", b" :x:\r\n")]),
        (b"A: no final CRLF", [(b"A", b" no final CRLF")]),
        (b"", []),
    ],
    ids=[
        "space-colon",
        "wsp-colon",
        "empty",
        "folds",
        "fold-after-colon",
        "8bit-vt-ff",
        "twice",
        "odd-name",
        "no-crlf",
        "none",
    ],
)
def test_odd_but_legal_header_sections_are_split_as_rfc_5322_reads_them(
    section: bytes, expected: list[tuple[bytes, bytes]]
) -> None:
    assert parse_header_section(section) == expected


async def test_whitespace_before_the_colon_is_signed_and_verifies(
    tmp_path: Path,
    sink: Sink,
    keys: Keys,
    zone: LoopbackDNS,
    opendkim: Callable[..., Any],
    mail_dkim: MailDkim,
) -> None:
    """RFC 5322 4.5 (obs-optional) allows WSP before the colon; RFC 6376 3.4.2 drops it.
    dkimpy cannot parse it: such mail went out unsigned, or was refused with 554."""
    message = MESSAGE.replace("Subject: Your", "Subject : Your").replace("From:", "From  :")
    tabbed = MESSAGE.replace("Subject: Your", "Subject\t: Your")
    dkim_doc = dkim_section(keys, "r1", "e1", unsigned="refuse")
    async with running(relay_config(tmp_path, sink.port, dkim=dkim_doc)) as relay:
        await submit(relay, message)
        await submit(relay, tabbed)
        got = [m.data for m in await sink.wait_for(2)]
        assert dkim_count(relay, DOMAIN, "signed") == 2
    data = next(d for d in got if b"Subject : Your" in d)
    assert {"from", "subject"} <= set(signatures(data)[0]["h"].split(":"))
    assert await rejections(data, opendkim, mail_dkim) == []
    forged = data.replace(b"Subject : Your   order", b"Subject : Your refund")
    assert forged != data
    # both signatures, by each verifier that knows their algorithm
    assert len(await rejections(forged, opendkim, mail_dkim)) == 3 + mail_dkim.ed25519
    # a tab there is legal too, but libopendkim refuses any control character in a field
    # name (dkim_header: "Syntax error"), signed or not: Mail::DKIM is the judge of it
    data = next(d for d in got if b"Subject\t: Your" in d)
    assert await rejections(data, opendkim, mail_dkim, use_opendkim=False) == []


@pytest.mark.parametrize(
    "subject",
    [b"Subject: Your order\x0c", b"Subject: \x0bYour order", b"Subject: Your\x0b\x0c order"],
    ids=["ends-in-ff", "begins-with-vt", "vt-ff-inside"],
)
async def test_a_field_with_vt_or_ff_is_left_out_and_the_signature_verifies_everywhere(
    tmp_path: Path,
    sink: Sink,
    keys: Keys,
    zone: LoopbackDNS,
    opendkim: Callable[..., Any],
    mail_dkim: MailDkim,
    subject: bytes,
) -> None:
    """RFC 6376 3.4.2 strips only WSP (SP, HTAB): VT and FF are text. The verifiers do not
    agree: opendkim reads them as WSP (right after the colon as an SP), Mail::DKIM drops
    them right after the colon. No canonical form passes both (the old one, stripping
    them at either end, failed one or the other), so such a field stays out of h= (the
    log line says so) and the rest of the message is signed. From is signed anyway."""
    message = MESSAGE.encode().replace(b"Subject: Your   order", subject)
    async with running(
        relay_config(tmp_path, sink.port, dkim=dkim_section(keys, "r1", "e1"))
    ) as relay:
        await submit(relay, message)
        data = (await sink.wait_for(1))[0].data
        assert dkim_count(relay, DOMAIN, "signed") == 1
    assert await rejections(data, opendkim, mail_dkim) == []
    signed = signatures(data)[0]["h"].split(":")
    assert "subject" not in signed and {"from", "to", "date", "message-id"} <= set(signed)
    signer = Signer.load(relay_config(tmp_path, 9, dkim=dkim_section(keys, "r1")))
    left_out = f"d={DOMAIN} s=r1 (not in h=, VT or FF that verifiers read apart: subject)"
    assert signer.sign(message, 1e9).detail == left_out
    odd_from = signer.sign(message.replace(b"From: Shop", b"From: Shop\x0c"), 1e9)
    assert signatures(odd_from.data)[0]["h"].split(":").count("from") == 2
    assert odd_from.detail == left_out


async def test_a_body_without_a_final_crlf_loses_the_wsp_of_its_last_line(
    tmp_path: Path,
    keys: Keys,
    zone: LoopbackDNS,
    opendkim: Callable[..., Any],
    mail_dkim: MailDkim,
) -> None:
    """RFC 6376 3.4.4: WSP at the end of every line goes, the last one's too, and a body
    that does not end with CRLF gets one. Only a direct caller of Signer.sign can have such
    a body (SMTP ends every message with CRLF); sent on, the transport adds the CRLF."""
    signer = Signer.load(relay_config(tmp_path, 9, dkim=dkim_section(keys, "r1", "e1")))
    content = MESSAGE.encode() + b"Regards,  \r\nthe shop \t "
    signed = signer.sign(content, 1e9)
    assert signed.result == "signed" and signed.data.endswith(b"the shop \t ")
    # as SMTP carries it (aiosmtplib adds the CRLF): every verifier
    assert await rejections(signed.data + b"\r\n", opendkim, mail_dkim) == []
    # as it is: Mail::DKIM too. libopendkim (with FIXCRLF, as opendkim-testmsg runs it)
    # hashes no CRLF after a last line that ends in WSP, unlike one that does not.
    assert await rejections(signed.data, opendkim, mail_dkim, use_opendkim=False) == []


# Odd but legal messages: every one is signed and verifies with both verifiers.
_ODD_HEAD = (
    f"From: Shop <orders@{DOMAIN}>\r\nTo: <a@rcpt.test>\r\n"
    "Date: Thu, 26 Nov 2026 10:00:00 +0000\r\n"
).encode()


def odd(fields: bytes = b"Subject: odd\r\n", body: bytes | None = b"Hello.\r\n") -> bytes:
    return _ODD_HEAD + fields + (b"" if body is None else b"\r\n" + body)


ODD_MESSAGES: dict[str, bytes] = {
    "subject ends in FF": odd(b"Subject: Your order\x0c\r\n"),
    "subject begins with VT": odd(b"Subject:\x0bYour order\r\n"),
    "VT and FF inside a field": odd(
        b"Subject: odd\r\nCc: <b@rcpt.test>\x0b,\x0c <c@rcpt.test>\r\n"
    ),
    "WSP before the colon": odd(b"Subject : Your order\r\nMIME-Version   :1.0\r\n"),
    "WSP before From's colon": odd().replace(b"From:", b"From :"),
    "folds with tabs": odd(b"Subject: Your\r\n\torder\r\n \t has\r\n\t\tshipped  \r\n"),
    "a fold right after the colon": odd(b"Subject:\r\n Your order\r\nCc:\r\n\t<b@rcpt.test>\r\n"),
    "a fold line of only WSP": odd(b"Subject: Your\r\n \r\n\t order\r\n \t\r\n"),
    "empty values": odd(b"Subject:\r\nCc: \r\nIn-Reply-To:\t \r\n"),
    "a long unfolded field": odd(b"Subject: " + b"word " * 190 + b"end\r\n"),
    "a long folded field": odd(
        b"Subject: refs\r\nReferences: "
        + b"\r\n ".join(b"<%d.%s@example.test>" % (i, b"x" * 40) for i in range(150))
        + b"\r\n"
    ),
    "8-bit UTF-8 field": odd("Subject: Bestellbestätigung, voilà\r\n".encode()),
    "8-bit Latin-1 field": odd(b"Subject: Best\xe4tigung \xa0\x85\r\n"),
    "many spaces": odd(b"Subject:     Your      order     \r\nCc:\t \t<b@rcpt.test>\t \t\r\n"),
    "names in odd case": odd(b"SUBJECT: odd\r\nmime-VERSION: 1.0\r\n").replace(b"From:", b"FROM:"),
    "odd name characters": odd(b"Subject: odd\r\nX-Odd_Name.1~!: v\r\n"),
    "signed fields twice": odd(
        b"Subject: odd\r\nComments: one\r\nKeywords: a\r\nComments: two\r\n"
    ),
    "a body of blank lines": odd(body=b"\r\n\r\n\r\n"),
    "an empty body": odd(body=b""),
    "a CRLF-only body": odd(body=b"\r\n"),
    "no body at all": odd(body=None),
    "lines of only whitespace": odd(body=b"Hello.\r\n \t \r\n\t\r\n  \r\nBye.\r\n \r\n\t\r\n"),
    "WSP runs and line ends": odd(body=b"a  \t b\t\r\n\t lead\r\nend \t\r\n"),
    "VT and FF in the body": odd(body=b"page 1\x0c\r\n\x0b indented \x0c\r\n"),
    "dot-stuffed lines": odd(body=b".\r\n..\r\n. leading dot\r\n"),
    "8-bit body": odd(body=b"Gr\xc3\xbc\xc3\x9fe\r\n\xff\xfe \r\n"),
    "a long body line": odd(body=b"x" * 990 + b"\r\n"),
}


async def test_odd_but_legal_messages_are_signed_and_verify_everywhere(
    tmp_path: Path,
    sink: Sink,
    keys: Keys,
    zone: LoopbackDNS,
    opendkim: Callable[..., Any],
    mail_dkim: MailDkim,
) -> None:
    """Each message of ODD_MESSAGES through the relay, RSA and Ed25519; every signature
    must verify with opendkim and Mail::DKIM (RSA only where it has no Ed25519)."""
    headers = [*DKIM_HEADERS, "comments", "keywords", "x-odd_name.1~!"]
    dkim_doc = dkim_section(keys, "r1", "e1", headers=headers)
    names = list(ODD_MESSAGES)
    async with running(relay_config(tmp_path, sink.port, dkim=dkim_doc)) as relay:
        for i, name in enumerate(names):
            client = aiosmtplib.SMTP(hostname="127.0.0.1", port=relay.smtp_ports[0])
            async with client:
                await client.sendmail(f"orders@{DOMAIN}", [f"c{i}@rcpt.test"], ODD_MESSAGES[name])
        got = {m.rcpts[0]: m.data for m in await sink.wait_for(len(names))}
    problems = []
    for i, name in enumerate(names):
        data = got[f"c{i}@rcpt.test"]
        if len(signatures(data)) != 2:
            problems.append(f"{name}: not signed")
            continue
        problems += [f"{name}: {p}" for p in await rejections(data, opendkim, mail_dkim)]
    assert not problems, "\n".join(problems)
    data = got[f"c{names.index('signed fields twice')}@rcpt.test"]
    assert signatures(data)[0]["h"].split(":").count("comments") == 2


@pytest.mark.parametrize("algorithm", ["rsa", "ed25519"])
async def test_keygen_writes_a_0600_key_and_a_record_that_verifies(
    tmp_path: Path,
    sink: Sink,
    capsys: pytest.CaptureFixture[str],
    opendkim: Callable[..., Any],
    zone: LoopbackDNS,
    algorithm: str,
) -> None:
    out = tmp_path / "new.pem"
    argv = ["dkim", "keygen", "--domain", "Fresh.Test", "--selector", "k1"]
    argv += ["--algorithm", algorithm, "--out", str(out)]
    assert cli.main(argv) == 0
    printed = capsys.readouterr().out.strip()
    assert stat.S_IMODE(out.stat().st_mode) == 0o600
    name, strings = printed.split(" IN TXT ", 1)
    assert name == "k1._domainkey.fresh.test."
    parts = re.findall(r'"([^"]*)"', strings)
    assert all(len(p.encode()) <= 255 for p in parts)
    assert len(parts) == (2 if algorithm == "rsa" else 1)
    record = "".join(parts)
    assert record.startswith(f"v=DKIM1; k={algorithm}; p=")

    before = out.read_bytes()  # never overwritten
    assert cli.main(argv) == 1
    assert out.read_bytes() == before
    assert "exists" in capsys.readouterr().err

    zone.add_txt("k1._domainkey.fresh.test", record)
    entry = {"selector": "k1", "key_file": str(out)}
    entry["algorithm"] = "rsa-sha256" if algorithm == "rsa" else "ed25519-sha256"
    dkim_doc = {"domains": {"fresh.test": {"keys": [entry]}}}
    async with running(relay_config(tmp_path, sink.port, dkim=dkim_doc)) as relay:
        await submit(relay, MESSAGE.replace(f"@{DOMAIN}>", "@fresh.test>"))
        data = (await sink.wait_for(1))[0].data
    assert signatures(data)[0]["d"] == "fresh.test"
    assert await dkimpy_verifies(data, zone)
    assert (await opendkim(data))[0] == 0


def test_a_broken_key_file_stops_the_start_naming_it(tmp_path: Path, keys: Keys) -> None:
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("-----BEGIN PRIVATE KEY-----\nnot a key\n-----END PRIVATE KEY-----\n")
    small = tmp_path / "small.pem"
    write_key(small, rsa.generate_private_key(public_exponent=65537, key_size=1024))
    missing = tmp_path / "missing.pem"
    entries = [
        {"selector": "a", "key_file": str(garbage)},
        {"selector": "b", "key_file": str(missing)},
        {"selector": "c", "key_file": str(small)},
        {"selector": "d", "key_file": str(keys.path("e1"))},  # Ed25519 named as RSA
    ]
    doc = {"dkim": {"domains": {DOMAIN: {"keys": entries}}}}
    with pytest.raises(DkimKeyError) as raised:  # what the listener does at start
        Signer.load(relay_config(tmp_path, 9, **doc))
    text = str(raised.value)  # every broken key at once, each with its key path and file
    for i, path in enumerate((garbage, missing, small, keys.path("e1"))):
        assert f"dkim.domains['{DOMAIN}'].keys[{i}].key_file: " in text
        assert str(path) in text
    assert "not a PEM private key" in text and "1024-bit" in text and "not an RSA key" in text

    # the real command: refuses to start, exit 1, the key path on stderr, never "ready"
    path = tmp_path / "relay.yaml"
    path.write_text(yaml.safe_dump(relay_doc(tmp_path, 9, **doc)))
    serve = warmrelay("serve", "-c", str(path))
    assert serve.returncode == 1
    assert str(garbage) in serve.stderr and str(missing) in serve.stderr
    assert " ready: " not in serve.stderr

    # --workers: the supervisor refuses too, before any worker (no restart loop)
    serve = warmrelay("serve", "-c", str(path), "--workers", "2")
    assert serve.returncode == 1
    assert str(garbage) in serve.stderr
    assert "exited" not in serve.stderr and " ready: " not in serve.stderr


async def test_reload_keeps_the_keys_when_a_key_breaks_and_takes_a_rotation(
    tmp_path: Path, sink: Sink, keys: Keys, zone: LoopbackDNS, caplog: pytest.LogCaptureFixture
) -> None:
    key_file = tmp_path / "live.pem"
    key_file.write_bytes(keys.path("r1").read_bytes())
    key_file.chmod(0o600)
    doc = relay_doc(tmp_path, sink.port)
    doc["dkim"] = {"domains": {DOMAIN: {"keys": [{"selector": "r1", "key_file": str(key_file)}]}}}
    path = tmp_path / "relay.yaml"
    path.write_text(yaml.safe_dump(doc))
    async with running(load_config(path)) as relay:
        key_file.write_text("broken by a bad deploy\n")
        with caplog.at_level(logging.ERROR, logger="warmrelay.dkim"):
            assert await relay.reload(path)  # the rest of the file applies
        errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
        assert any(str(key_file) in e for e in errors)
        await submit(relay, MESSAGE)  # still signed, with the key loaded at start
        data = (await sink.wait_for(1))[0].data
        assert signatures(data)[0]["s"] == "r1" and await dkimpy_verifies(data, zone)

        # a rotation: new selector and file, published first, then SIGHUP
        doc["dkim"]["domains"][DOMAIN]["keys"] = [keys.entry("r2")]
        path.write_text(yaml.safe_dump(doc))
        assert await relay.reload(path)
        await submit(relay, MESSAGE)
        data = (await sink.wait_for(2))[1].data
        assert signatures(data)[0]["s"] == "r2" and await dkimpy_verifies(data, zone)


def rfc_relaxed_body(body: bytes) -> bytes:
    """RFC 6376 3.4.4, rule by rule (WSP is SP or HTAB, RFC 5234 B.1)."""
    lines = body.split(b"\r\n")
    if lines[-1] == b"":  # the body ends with CRLF (or is empty): no line after it
        lines.pop()
    lines = [re.sub(rb"[ \t]+\Z", b"", line) for line in lines]  # WSP at the end of lines
    lines = [re.sub(rb"[ \t]+", b" ", line) for line in lines]  # runs of WSP: one SP
    while lines and lines[-1] == b"":  # empty lines at the end
        lines.pop()
    return b"".join(line + b"\r\n" for line in lines)  # and a CRLF after the last one


def rfc_relaxed_header(field: bytes) -> bytes:
    """RFC 6376 3.4.2 for one field (name, colon, value, CRLF), rule by rule."""
    name, value = field.split(b":", 1)
    name = name.lower()  # field names in lower case
    value = re.sub(rb"\r\n(?=[ \t])", b"", value)  # unfold
    value = re.sub(rb"[ \t]+", b" ", value)  # runs of WSP: one SP
    value = re.sub(rb"[ \t]+\r\n\Z", b"\r\n", value)  # no WSP at the end of the value
    name, value = re.sub(rb"[ \t]+\Z", b"", name), re.sub(rb"^[ \t]+", b"", value)  # by ":"
    return name + b":" + value


_BODY_PARTS = [b"a", b"xy", b" ", b"  ", b"\t", b"\r\n", b"\x0b", b"\x0c", b"\xa0"]


@given(st.lists(st.sampled_from(_BODY_PARTS), max_size=40))
def test_relaxed_body_is_the_rfcs(parts: list[bytes]) -> None:
    """Our bytes-method canonicalisation (fast) gives the RFC's bytes, with or without a
    final CRLF; dkimpy agrees where the body ends with one (it keeps the WSP of a last
    line without CRLF)."""
    from dkim.canonicalization import Relaxed

    body = b"".join(parts)
    assert relaxed_body(body) == rfc_relaxed_body(body)
    if body.endswith(b"\r\n"):
        assert relaxed_body(body) == Relaxed.canonicalize_body(body)


@given(
    st.sampled_from([b"Subject", b"X-A~b", b"TO"]),
    st.sampled_from([b"", b" ", b"\t", b" \t "]),
    st.lists(
        st.sampled_from(
            [b"a", b"x;y", b":", b" ", b"  ", b"\t", b"\r\n ", b"\r\n\t", b"\x0b", b"\x0c", b"\xe4"]
        ),
        max_size=30,
    ),
)
def test_relaxed_header_is_the_rfcs(name: bytes, before_colon: bytes, parts: list[bytes]) -> None:
    """The header side: split by parse_header_section, canonicalised by ours, the RFC's bytes
    whatever WSP, VT or FF a client sends. dkimpy agrees only without VT and FF (it strips
    them) and without WSP before the colon (it cannot parse that)."""
    from dkim.canonicalization import Relaxed

    field = name + before_colon + b":" + b"".join(parts) + b"\r\n"
    [(parsed, value)] = parse_header_section(field)
    ours = parsed.lower() + b":" + relaxed_header_value(value)
    assert ours == rfc_relaxed_header(field)
    if not before_colon and b"\x0b" not in value and b"\x0c" not in value:
        [(n, v)] = Relaxed.canonicalize_headers([(name, value)])
        assert ours == n + b":" + v


@given(
    st.lists(st.sampled_from([b"From", b"to", b"TO", b"Subject", b"X-A"]), max_size=8),
    st.lists(st.sampled_from([b"from", b"to", b"subject", b"date"]), max_size=8),
)
def test_header_selection_is_dkimpys(names: list[bytes], include: list[bytes]) -> None:
    """h= picks fields from the bottom, a repeated name the next one up (RFC 6376 5.4.2)."""
    from dkim import select_headers as dkimpy_select

    headers = [(name, b" v%d\r\n" % i) for i, name in enumerate(names)]
    lowered = [name.lower() for name in names]
    assert select_headers(headers, lowered, include) == dkimpy_select(headers, include)


async def test_a_large_message_is_signed_off_the_loop_and_verifies(
    tmp_path: Path, sink: Sink, keys: Keys, zone: LoopbackDNS, opendkim: Callable[..., Any]
) -> None:
    """Above OFF_LOOP_BYTES the signing runs in the pool's thread: same signatures."""
    line = "Shipping notes: the parcel  leaves\tthe depot today. \r\n"
    big = MESSAGE + line * (2 * OFF_LOOP_BYTES // len(line))
    config = relay_config(tmp_path, sink.port, dkim=dkim_section(keys, "r1", "e1"))
    async with running(config) as relay:
        await submit(relay, big)
        data = (await sink.wait_for(1))[0].data
    assert len(data) > 2 * OFF_LOOP_BYTES and len(signatures(data)) == 2
    for i in range(2):
        assert await dkimpy_verifies(data, zone, i)
        assert (await opendkim(only_signature(data, i)))[0] == 0
    assert not await dkimpy_verifies(data.replace(b"depot", b"dep0t", 1), zone)
