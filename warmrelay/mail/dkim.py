"""DKIM signing at acceptance: every retry sends the bytes that were signed once.

A new IP has no reputation of its own; receivers lean on the signing domain's
instead, so warmup mail must be signed. The listener calls ``Signer.sign`` on
the client's content before it prepends its own Received: line (which must not
be signed: it names us, not the author) and before the spool stores it.

The header section is split and both canonicalisations (relaxed/relaxed, RFC
6376 3.4.2 and 3.4.4) are done here with bytes methods: dkimpy's regexes and
pure-Python RSA (~6.7 ms a signature) cost more than the budget of 0.5 ms per
message, and dkimpy strips VT and FF where the RFC strips only WSP and refuses
``Subject : x`` (legal, RFC 5322 4.5). The tests check ours against a plain
per-rule reference and against two independent verifiers (opendkim, Mail::DKIM).
The digest is signed with ``cryptography`` (OpenSSL): RSA PKCS#1 v1.5 over the
prehashed SHA-256 digest, Ed25519 (RFC 8463) over the same digest. With several
keys (RSA + Ed25519, or a rotation) the body hash and the canonical header block
are computed once for all signatures.
"""

from __future__ import annotations

import asyncio
import base64
import email.utils
import functools
import hashlib
import logging
import os
import re
import stat
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, padding, rsa, utils
from pydantic import ValidationError

from warmrelay.config.mail import DkimConfig, DkimKeyConfig
from warmrelay.config.model import Config
from warmrelay.config.values import format_path
from warmrelay.delivery.nexthop import normalize_domain
from warmrelay.errors import ConfigError, ConfigProblem, NextHopError
from warmrelay.mail.dates import mail_date
from warmrelay.tokens import token_hex

log = logging.getLogger("warmrelay.dkim")

PrivateKey = rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey
Algorithm = Literal["rsa-sha256", "ed25519-sha256"]
Result = Literal["signed", "unsigned", "refused", "error"]

MIN_RSA_BITS = 2048  # RFC 8301: verifiers may reject smaller keys; Gmail treats 1024 as weak
RSA_BITS = 2048  # keygen: the size every receiver verifies, 0.4 ms a signature
TXT_STRING_MAX = 255  # one character-string of a TXT record (RFC 1035 3.3)
_LINE = 78  # fold signature headers here (RFC 5322 2.1.1 SHOULD)
OFF_LOOP_BYTES = 64 * 1024  # ~0.7 ms of signing: above it, a thread (Signer.sign_off_loop)


class DkimKeyError(ConfigError):
    """A key file under dkim.domains cannot be read or used: the relay refuses to start
    (and a reload keeps the keys it has). Each problem names the key path and the file."""


# -- keys ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class SigningKey:
    """One loaded key of a signing domain."""

    domain: str  # d=, A-label lower case
    selector: str  # s=
    algorithm: Algorithm
    private: PrivateKey
    path: Path

    def sign_digest(self, digest: bytes) -> bytes:
        """Sign a SHA-256 digest of the canonical headers (RFC 6376 3.7; RFC 8463 3)."""
        if isinstance(self.private, rsa.RSAPrivateKey):
            return self.private.sign(digest, padding.PKCS1v15(), utils.Prehashed(hashes.SHA256()))
        return self.private.sign(digest)


def read_private_key(path: Path, algorithm: Algorithm) -> PrivateKey:
    """The PEM private key in ``path`` if it fits ``algorithm``; ValueError says why not."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ValueError(f"cannot read {path}: {exc.strerror}") from None
    return parse_private_key(data, path, algorithm)


def parse_private_key(data: bytes, path: Path, algorithm: Algorithm) -> PrivateKey:
    """The checks every user of a key file shares (signing, preflight): PEM, unencrypted,
    the configured algorithm, RSA of at least MIN_RSA_BITS; ValueError says why not."""
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except TypeError:  # encrypted: nobody is there to type the passphrase
        raise ValueError(f"{path} is encrypted with a passphrase; store it without") from None
    except (ValueError, UnsupportedAlgorithm):
        raise ValueError(
            f"{path} is not a PEM private key (`warmrelay dkim keygen` writes one)"
        ) from None
    if algorithm == "rsa-sha256":
        if not isinstance(key, rsa.RSAPrivateKey):
            raise ValueError(f"{path} is not an RSA key (algorithm is rsa-sha256)")
        if key.key_size < MIN_RSA_BITS:
            raise ValueError(
                f"{path} is a {key.key_size}-bit RSA key; receivers want at least "
                f"{MIN_RSA_BITS} bits (`warmrelay dkim keygen` makes one)"
            )
        return key
    if not isinstance(key, ed25519.Ed25519PrivateKey):
        raise ValueError(f"{path} is not an Ed25519 key (algorithm is ed25519-sha256)")
    return key


def load_keys(dkim: DkimConfig) -> dict[str, tuple[SigningKey, ...]]:
    """Every key of ``dkim.domains``, by signing domain. All problems are reported at once
    (DkimKeyError), each with its key path and file, so one start shows every broken key."""
    keys: dict[str, tuple[SigningKey, ...]] = {}
    problems: list[ConfigProblem] = []
    for name, domain in dkim.domains.items():
        loaded: list[SigningKey] = []
        for i, key in enumerate(domain.keys):
            where = format_path(["dkim", "domains", name, "keys", i, "key_file"])
            try:
                private = read_private_key(key.key_file, key.algorithm)
            except ValueError as exc:
                problems.append(ConfigProblem(where, str(exc)))
                continue
            _warn_if_readable_by_others(key.key_file)
            d = _domain(name) or name.lower()
            loaded.append(SigningKey(d, key.selector, key.algorithm, private, key.key_file))
        keys[_domain(name) or name.lower()] = tuple(loaded)
    if problems:
        raise DkimKeyError(problems)
    return keys


_warned: set[tuple[Path, int]] = set()  # (key file, mode) said once per process


def quiet_key_warnings() -> None:
    """A worker of ``serve --workers``: its supervisor said it already."""
    _warned.add((Path(), -1))


def _warn_if_readable_by_others(path: Path) -> None:
    """Once per process and file (and mode): not again at every reload or check."""
    try:
        mode = path.stat().st_mode
    except OSError:
        return
    said = (path, stat.S_IMODE(mode))
    if mode & (stat.S_IRWXG | stat.S_IRWXO) and said not in _warned:
        if (Path(), -1) in _warned:
            return
        _warned.add(said)
        log.warning(
            "DKIM key %s is readable by others (mode %o): chmod 600 it; anyone holding it "
            "can sign mail as the domain",
            path,
            stat.S_IMODE(mode),
        )


def generate_key(algorithm: Literal["rsa", "ed25519"]) -> PrivateKey:
    if algorithm == "rsa":
        return rsa.generate_private_key(public_exponent=65537, key_size=RSA_BITS)
    return ed25519.Ed25519PrivateKey.generate()


def write_key(path: Path, key: PrivateKey) -> None:
    """PKCS#8 PEM, mode 0600, created here: an existing file is never replaced (it may be
    the key a published record belongs to). FileExistsError if it exists."""
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.fchmod(fd, 0o600)  # whatever the umask says
        os.write(fd, pem)
        os.fsync(fd)
    finally:
        os.close(fd)


def keygen(
    domain: str, selector: str, algorithm: Literal["rsa", "ed25519"], out: Path | None
) -> tuple[str, DkimKeyConfig, str]:
    """`warmrelay dkim keygen`: a new key written to ``out`` (default DOMAIN.SELECTOR.pem);
    returns the domain, the key's configuration entry and the zone-file line to publish.
    ValueError: bad names; FileExistsError: ``out`` exists (never replaced)."""
    name = _domain(domain)
    if "." not in name or name.startswith("*"):
        raise ValueError(f"--domain {domain!r} is not a domain name")
    path = (out or Path(f"{name}.{selector.lower()}.pem")).absolute()
    alg: Algorithm = "rsa-sha256" if algorithm == "rsa" else "ed25519-sha256"
    try:
        entry = DkimKeyConfig(selector=selector.lower(), key_file=path, algorithm=alg)
    except ValidationError:
        raise ValueError(f"--selector {selector!r} is not a DNS label (e.g. s2026)") from None
    key = generate_key(algorithm)
    write_key(path, key)
    return name, entry, zone_line(name, entry.selector, key)


def txt_value(key: PrivateKey) -> str:
    """The DKIM key record (RFC 6376 3.6.1): RSA as SubjectPublicKeyInfo, Ed25519 as the
    raw 32-byte key (RFC 8463 4.2)."""
    if isinstance(key, rsa.RSAPrivateKey):
        der = key.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        return f"v=DKIM1; k=rsa; p={base64.b64encode(der).decode()}"
    raw = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return f"v=DKIM1; k=ed25519; p={base64.b64encode(raw).decode()}"


def txt_strings(value: str) -> list[str]:
    """A TXT value as character-strings of at most 255 bytes (an RSA key needs two)."""
    return [value[i : i + TXT_STRING_MAX] for i in range(0, len(value), TXT_STRING_MAX)] or [""]


def zone_line(domain: str, selector: str, key: PrivateKey) -> str:
    """The record in zone-file syntax: ``S._domainkey.D. IN TXT "..." "..."``."""
    name = f"{selector}._domainkey.{domain}."
    return f"{name} IN TXT " + " ".join(f'"{s}"' for s in txt_strings(txt_value(key)))


# -- signing -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Signed:
    """What ``Signer.sign`` did to one message."""

    data: bytes  # added headers (signatures, Message-ID, Date) + the client's content
    result: Result
    domain: str  # signed: the signing domain; otherwise the From domain ("" if none)
    detail: str  # for the log line: d= and s=, or why it is not signed
    refuse: bool = False  # dkim.unsigned: refuse, and it could not be signed

    @property
    def reply(self) -> str:
        """The SMTP reply when ``refuse``: permanent, the same message fails again."""
        if self.result == "error":
            return "554 5.6.0 Message cannot be DKIM-signed: malformed header section"
        if self.domain:
            return f"550 5.7.1 Message refused: no DKIM key for {self.domain}"
        return "550 5.7.1 Message refused: no single From: domain to DKIM-sign for"

    @property
    def summary(self) -> str:
        return f"{self.result} {self.detail}"


class Signer:
    """The dkim settings and keys in force (replaced as a whole on reload)."""

    def __init__(
        self, dkim: DkimConfig, keys: Mapping[str, Sequence[SigningKey]], hostname: str
    ) -> None:
        self.dkim = dkim
        self.keys = {d: tuple(k) for d, k in keys.items() if k}
        self.hostname = hostname
        self.headers = tuple(h.lower().encode("ascii") for h in dkim.headers)
        self._exact: dict[str, str] = {}
        self._suffix: list[tuple[str, str]] = []  # (".suffix", domain), longest first
        for pattern, target in dkim.map.items():
            to = _domain(target) or target.lower()
            if pattern.startswith("*."):
                self._suffix.append(("." + (_domain(pattern[2:]) or pattern[2:].lower()), to))
            else:
                self._exact[_domain(pattern) or pattern.lower()] = to
        self._suffix.sort(key=lambda s: -len(s[0]))
        self._templates: dict[
            tuple[str, str, str, tuple[bytes, ...], int, int], tuple[_Template, _Template]
        ] = {}

    @classmethod
    def load(cls, config: Config) -> Signer:
        """Keys read now (start and every reload: a rotated file is picked up); a broken
        key raises DkimKeyError (the reload then keeps the Signer in force as a whole)."""
        return cls(config.dkim, load_keys(config.dkim), config.smtp.hostname)

    async def sign_off_loop(self, content: bytes, now: float, *, defer: bool = False) -> Signed:
        """``sign``, inline for the usual message and in a thread of its own pool for a
        large one. RSA-2048 + Ed25519 take ~0.5 ms CPU per 4 KB message inline; handing
        that to a thread costs another ~0.2 ms of CPU (wake-ups, the future) and with one
        worker per core there is no idle core to gain, so small mail stays on the loop.
        A 1 MB body takes ~10 ms to canonicalise and hash: that would stall every other
        session, so from OFF_LOOP_BYTES on it goes to the pool (OpenSSL and hashlib
        release the GIL there)."""
        if not self.keys or defer or len(content) < OFF_LOOP_BYTES:
            return self.sign(content, now, defer=defer)
        return await asyncio.get_running_loop().run_in_executor(_pool(), self.sign, content, now)

    def signing_domain(self, from_domain: str) -> str | None:
        """Exact map entry, else the From domain's own keys, else the longest *.suffix."""
        if from_domain in self._exact:
            return self._exact[from_domain]
        if from_domain in self.keys:
            return from_domain
        for suffix, target in self._suffix:
            if from_domain.endswith(suffix):
                return target
        return None

    def sign(self, content: bytes, now: float, *, defer: bool = False) -> Signed:
        """Hygiene first (Message-ID, Date), then one signature per key of the signing
        domain, placed above the content in key order. ``content`` has CRLF line ends.

        ``defer``: hygiene and the key lookup only (what acceptance must decide: refuse
        mode), no signature: the delivery stage signs per source IP, once it added the
        IP's Feedback-ID (``bounces``). Signing is deterministic for the same bytes and
        ``now`` (the acceptance time), so every retry from an IP sends the same bytes."""
        head, body = split_message(content)
        try:
            headers = parse_header_section(head)
        except HeaderSectionError as exc:
            detail = f"(header section cannot be parsed: {exc})"
            return Signed(content, "error", "", detail[:200], self.dkim.unsigned == "refuse")
        added = self._missing_headers(headers, now)
        if added:
            headers = added + headers
            content = b"".join(name + b":" + value for name, value in added) + content
        from_domain = _from_domain(headers)
        domain = self.signing_domain(from_domain) if from_domain else None
        keys = self.keys.get(domain or "", ())
        if not keys:
            why = f"(no key for {from_domain})" if from_domain else "(no single From: domain)"
            if self.dkim.unsigned == "refuse":
                return Signed(content, "refused", from_domain, why, refuse=True)
            return Signed(content, "unsigned", from_domain, why)
        assert domain is not None
        if defer:
            detail = f"d={domain} s={','.join(k.selector for k in keys)} (at delivery)"
            return Signed(content, "signed", domain, detail)
        names = [name.lower() for name, _ in headers]
        unsure = _unsure_names(headers, names) if _UNSURE.search(head) else set()
        include = self._include(names, unsure)
        signatures = self._signatures(keys, headers, names, include, body, now)
        detail = f"d={domain} s={','.join(k.selector for k in keys)}"
        left_out = [h.decode("ascii") for h in self.headers if h in unsure]
        if left_out:
            detail += f" (not in h=, VT or FF that verifiers read apart: {','.join(left_out)})"
        return Signed(b"".join(signatures) + content, "signed", domain, detail)

    def _missing_headers(self, headers: list[Field], now: float) -> list[Field]:
        """RFC 5322 requires Date and expects Message-ID; receivers score mail without them
        as spam, and a signature cannot cover what is added later."""
        if not self.dkim.add_missing_headers:
            return []
        names = {name.lower() for name, _ in headers}
        added: list[Field] = []
        if b"message-id" not in names:
            mid = f" <{token_hex(16)}@{self.hostname}>\r\n"
            added.append((b"Message-ID", mid.encode("ascii")))
        if b"date" not in names:
            date = mail_date(now)
            added.append((b"Date", f" {date}\r\n".encode("ascii")))
        return added

    def _include(self, names: list[bytes], unsure: set[bytes]) -> list[bytes]:
        """h=: each configured field as often as it occurs, then From once more (a From
        added later then breaks the signature: RFC 6376 8.15). ``names``: lower case.
        Fields named in ``unsure`` are left out: see _unsure_names."""
        present = set(names) - unsure
        include = [h for h in self.headers if h in present for _ in range(names.count(h))]
        return [*include, b"from"]

    def _signatures(
        self,
        keys: Sequence[SigningKey],
        headers: list[Field],
        names: list[bytes],
        include: list[bytes],
        body: bytes,
        now: float,
    ) -> list[bytes]:
        """The header block every key signs is canonicalised and hashed once; each key
        then adds its own DKIM-Signature (from a cached template) to a copy of that hash."""
        bh = base64.b64encode(hashlib.sha256(relaxed_body(body)).digest())
        shared = hashlib.sha256(canonical_headers(headers, names, include))
        t = b"%d" % int(now)
        out = []
        for key in keys:
            head, canonical = self._template(key, tuple(include), len(t), len(bh))
            hasher = shared.copy()
            hasher.update(canonical.fill(t, bh))
            b = base64.b64encode(key.sign_digest(hasher.digest()))
            lines = b"\r\n\t ".join([b[i : i + 64] for i in range(0, len(b), 64)])
            out.append(b"DKIM-Signature:" + head.fill(t, bh) + lines + b"\r\n")
        return out

    def _template(
        self, key: SigningKey, include: tuple[bytes, ...], t_len: int, bh_len: int
    ) -> tuple[_Template, _Template]:
        """The folded signature header up to its empty b=, and its relaxed canonical form
        (what is hashed), with holes for t= and bh=. Their lengths are fixed (10 digits
        until 2286, 44 base64 characters), so the fold lines fall in the same places for
        every message: one template per key and h= list, made once."""
        cache_key = (key.domain, key.selector, key.algorithm, include, t_len, bh_len)
        found = self._templates.get(cache_key)
        if found is None:
            tags = [
                ("v", "1"),
                ("a", key.algorithm),
                ("c", "relaxed/relaxed"),
                ("d", key.domain),
                ("s", key.selector),
                ("t", _T_HOLE * t_len),
                ("h", ":".join(h.decode("ascii") for h in include)),
                ("bh", _BH_HOLE * bh_len),
            ]
            folded = _fold(tags)
            canonical = b"dkim-signature:" + relaxed_header_value(folded).removesuffix(b"\r\n")
            found = (_Template.cut(folded), _Template.cut(canonical))
            if len(self._templates) >= _TEMPLATES_MAX:  # h= lists made of odd headers
                self._templates.clear()
            self._templates[cache_key] = found
        return found


_T_HOLE, _BH_HOLE = "\x01", "\x02"  # never in a tag value (ASCII names, base64, digits)
_TEMPLATES_MAX = 256


@dataclass(frozen=True)
class _Template:
    """Bytes with a hole for t= and one for bh= (in that order), filled per message."""

    before_t: bytes
    before_bh: bytes
    after: bytes

    @classmethod
    def cut(cls, text: bytes) -> _Template:
        t0, b0 = text.index(_T_HOLE.encode()), text.index(_BH_HOLE.encode())
        t1 = len(text) - len(text[t0:].lstrip(_T_HOLE.encode()))
        b1 = len(text) - len(text[b0:].lstrip(_BH_HOLE.encode()))
        return cls(text[:t0], text[t1:b0], text[b1:])

    def fill(self, t: bytes, bh: bytes) -> bytes:
        return self.before_t + t + self.before_bh + bh + self.after


# -- the header section and canonicalisation -----------------------------------------------

Field = tuple[bytes, bytes]  # (name without the WSP before its colon, value after the colon)

_FTEXT = bytes(range(0x21, 0x7F))  # field-name characters (RFC 5322 3.6.8; the colon ends it)
_WSP = (0x20, 0x09)  # SP and HTAB: the only whitespace DKIM canonicalisation touches
_UNSURE = re.compile(rb"[\x0b\x0c]")


class HeaderSectionError(ValueError):
    """The header section is not RFC 5322 (not even its obsolete syntax): a verifier would
    split it differently or refuse it, so a signature over it would not verify."""


def split_message(content: bytes) -> tuple[bytes, bytes]:
    """(header section up to the CRLF of its last field, body after the empty line).
    Content that starts with an empty line has no header section; content without
    one is all header section."""
    if content.startswith(b"\r\n"):
        return b"", content[2:]
    end = content.find(b"\r\n\r\n")
    if end < 0:
        return content, b""
    return content[: end + 2], content[end + 4 :]


def parse_header_section(head: bytes) -> list[Field]:
    """The fields of a header section, top to bottom. A field is a line with a name
    (printable ASCII), optional WSP, a colon, and every following line that starts
    with WSP (a fold); the value keeps its folds and the CRLF ending the field. Odd but
    legal input is taken as it is: WSP before the colon (RFC 5322 4.5), empty values,
    lines of only WSP in a fold, 8-bit and control bytes in values. HeaderSectionError:
    a line that is none of these, a bare CR or LF, or NUL (the listener refuses those;
    ``Signer.sign`` may be called without it)."""
    crlf = head.count(b"\r\n")
    if head.count(b"\r") != crlf or head.count(b"\n") != crlf or b"\0" in head:
        raise HeaderSectionError("a bare CR or LF, or NUL, in the header section")
    fields: list[Field] = []
    pos, n = 0, len(head)
    while pos < n:
        end = _line_end(head, pos)
        while end < n and head[end] in _WSP:  # a fold: the field goes on
            end = _line_end(head, end)
        colon = head.find(b":", pos, end)
        name = head[pos:colon].rstrip(b" \t")
        if colon < 0 or not name or name.translate(None, _FTEXT):
            line = head[pos : _line_end(head, pos)].rstrip(b"\r\n")
            where = head.count(b"\r\n", 0, pos) + 1
            raise HeaderSectionError(f"line {where} is not a header field: {line[:80]!r}")
        fields.append((name, head[colon + 1 : end]))
        pos = end
    return fields


def _line_end(head: bytes, pos: int) -> int:
    """Where the line starting at ``pos`` ends, after its CRLF (or at the end of ``head``)."""
    eol = head.find(b"\r\n", pos)
    return len(head) if eol < 0 else eol + 2


def select_headers(
    headers: list[Field], names: list[bytes], include: Sequence[bytes]
) -> list[Field]:
    """The fields ``h=`` names, in its order; a name listed twice takes the next field up
    (RFC 6376 5.4.2: from the bottom); a name with no field left is skipped (it is what
    over-signing means). dkimpy's select_headers, with the names lowered once (``names``)."""
    picked = []
    below: dict[bytes, int] = {}
    for h in include:
        i = below.get(h, len(names))
        while i > 0:
            i -= 1
            if names[i] == h:
                picked.append(headers[i])
                break
        below[h] = i
    return picked


def canonical_headers(headers: list[Field], names: list[bytes], include: Sequence[bytes]) -> bytes:
    """The selected fields in relaxed canonical form (RFC 6376 3.4.2), as they are hashed
    before the signature header itself."""
    return b"".join(
        name.lower() + b":" + relaxed_header_value(value)
        for name, value in select_headers(headers, names, include)
    )


def relaxed_header_value(value: bytes) -> bytes:
    """Relaxed header value (RFC 6376 3.4.2) of a value as parse_header_section gives it:
    unfold, every run of WSP one SP, no WSP at either end, then CRLF. Only WSP: VT and
    FF are text and stay (bytes.strip() would take them). Bytes methods: dkimpy's
    regexes took a third of the signing time."""
    value = value.replace(b"\r\n", b"")
    if b"\t" in value:
        value = value.replace(b"\t", b" ")
    while b"  " in value:
        value = value.replace(b"  ", b" ")
    return value.strip(b" ") + b"\r\n"


def relaxed_body(body: bytes) -> bytes:
    """Relaxed body canonicalisation (RFC 6376 3.4.4): no WSP at the end of a line (the
    last one too, when the body does not end with CRLF), every run of WSP one SP, no
    empty lines at the end, and a CRLF after the last line of a body that is not empty.
    A regex per space (dkimpy) costs 0.3 ms per 4 KB and 100 ms per MB, on the event
    loop; bytes methods do it in 0.02 ms and 7 ms. ``body`` has CRLF line ends."""
    if b"\t" in body:
        body = body.replace(b"\t", b" ")
    body = body.rstrip(b" ")  # a last line without CRLF; a no-op after a CRLF
    if b" \r\n" in body:
        body = b"\r\n".join([line.rstrip(b" ") for line in body.split(b"\r\n")])
    while b"  " in body:
        body = body.replace(b"  ", b" ")
    end = len(body)
    while body.endswith(b"\r\n", 0, end):
        end -= 2
    if end == 0:
        return b""  # an empty body (or only empty lines) hashes as empty
    return body[:end] + b"\r\n"


def _unsure_names(headers: list[Field], names: list[bytes]) -> set[bytes]:
    """Names (lower case) of fields whose value holds VT or FF, except From (it must be
    signed; there the RFC's form is hashed). RFC 6376 keeps both as text; opendkim reads
    them as WSP (right after the colon as an SP), Mail::DKIM drops them right after the
    colon and keeps them elsewhere. The two agree nowhere, so no canonical form verifies
    with both: such fields are left out of h= rather than break the whole signature."""
    unsure = {names[i] for i, (_, value) in enumerate(headers) if _UNSURE.search(value)}
    unsure.discard(b"from")
    return unsure


@functools.cache
def _pool() -> ThreadPoolExecutor:
    """Signing threads: CPU-bound, so about one per core (not the loop's default executor,
    where DNS or file work could queue ahead of a session waiting for its 250)."""
    return ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1), thread_name_prefix="dkim")


def _fold(tags: list[tuple[str, str]]) -> bytes:
    """The header value after "DKIM-Signature:" up to an empty b=, folded at tag
    boundaries (h= also after its colons); b= starts a line of its own, so its value is
    appended without changing a byte before it. Relaxed canonicalisation unfolds it all."""
    lines: list[str] = []
    line = "DKIM-Signature:"
    for name, value in tags:
        parts = value.split(":") if name == "h" else [value]
        words = [f"{p}:" for p in parts[:-1]] + [f"{parts[-1]};"]
        words[0] = f"{name}={words[0]}"
        for i, word in enumerate(words):
            sep = "" if i else " "  # inside h= the next name follows its colon
            if len(line) + len(sep) + len(word) > _LINE:
                lines.append(line)
                line, sep = "\t", ""
            line += sep + word
    lines += [line, "\tb="]
    return "\r\n".join(lines)[len("DKIM-Signature:") :].encode("ascii")


def _domain(name: str) -> str:
    """A domain in the form keys and map use: A-label, lower case ("" if not a domain)."""
    try:
        return normalize_domain(name)
    except NextHopError:
        return ""


def _from_domain(headers: list[Field]) -> str:
    """The domain of the From: header, if there is exactly one From: field and all its
    addresses share one domain (DMARC asks the same); otherwise ""."""
    values = [value for name, value in headers if name.lower() == b"from"]
    if len(values) != 1:
        return ""
    text = values[0].decode("utf-8", "surrogateescape").replace("\r\n", "")
    domains = {
        _domain(addr.rpartition("@")[2])
        for _, addr in email.utils.getaddresses([text])
        if "@" in addr
    }
    return domains.pop() if len(domains) == 1 else ""
