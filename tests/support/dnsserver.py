"""A real DNS server on loopback for tests.

It speaks the wire format (dnslib) over UDP and TCP on the same port, in the test's own event
loop, so the code under test goes through its real resolver and sockets. Answers larger than
the client's UDP size are truncated (TC) so TCP fallback is exercised too.
"""

from __future__ import annotations

import asyncio
import ipaddress
import struct
from collections import Counter
from types import TracebackType
from typing import cast

from dnslib import AAAA, MX, PTR, QTYPE, RCODE, RR, TXT, A, DNSError, DNSRecord


def _key(name: str) -> str:
    return name.strip().rstrip(".").lower()


class _UDP(asyncio.DatagramProtocol):
    def __init__(self, server: LoopbackDNS) -> None:
        self._server = server
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # The selector transport is not a DatagramTransport subclass, only duck-typed as one.
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        reply = self._server.answer(data, udp=True)
        if reply is not None and self.transport is not None:
            self.transport.sendto(reply, addr)


class LoopbackDNS:
    """Authoritative-style server for whatever names a test adds.

    Unknown names get NXDOMAIN; known names without the asked type get NODATA. ``queries``
    counts questions as ``(name, type)`` so tests can tell whether a cache was used.
    """

    def __init__(self, host: str = "127.0.0.1", ttl: int = 300) -> None:
        self.host = host
        self.ttl = ttl
        self.port = 0
        self.queries: Counter[tuple[str, str]] = Counter()
        self._records: dict[str, list[RR]] = {}
        self._servfail: set[str] = set()
        self._drop: set[str] = set()
        self._udp: asyncio.DatagramTransport | None = None
        self._tcp: asyncio.Server | None = None
        self._tcp_tasks: set[asyncio.Task[None]] = set()

    @property
    def address(self) -> tuple[str, int]:
        return (self.host, self.port)

    def add_mx(self, domain: str, preference: int, host: str, ttl: int | None = None) -> None:
        self._add(domain, QTYPE.MX, MX(host, preference), ttl)

    def add_a(self, name: str, ip: str, ttl: int | None = None) -> None:
        self._add(name, QTYPE.A, A(ip), ttl)

    def add_aaaa(self, name: str, ip: str, ttl: int | None = None) -> None:
        self._add(name, QTYPE.AAAA, AAAA(ip), ttl)

    def add_txt(self, name: str, text: str, ttl: int | None = None) -> None:
        """Makes a name exist without MX or address records (NODATA for those). Text longer
        than 255 bytes (a DKIM RSA key) is split into several strings of one record, as
        DNS requires; the reader joins them."""
        data = text.encode()
        if len(data) <= 255:
            self._add(name, QTYPE.TXT, TXT(text), ttl)
        else:
            self._add(
                name, QTYPE.TXT, TXT([data[i : i + 255] for i in range(0, len(data), 255)]), ttl
            )

    def add_ptr(self, ip: str, host: str, ttl: int | None = None) -> None:
        """Reverse DNS: the PTR record of ``ip`` (under in-addr.arpa or ip6.arpa) names ``host``."""
        self._add(ipaddress.ip_address(ip).reverse_pointer, QTYPE.PTR, PTR(host), ttl)

    def set_servfail(self, name: str) -> None:
        self._servfail.add(_key(name))

    def set_drop(self, name: str) -> None:
        """Never answer questions about ``name``: the client must time out."""
        self._drop.add(_key(name))

    def query_count(self, name: str | None = None) -> int:
        return sum(n for (q, _), n in self.queries.items() if name is None or q == _key(name))

    def _add(self, name: str, rtype: int, rdata: object, ttl: int | None) -> None:
        rr = RR(_key(name) + ".", rtype, rdata=rdata, ttl=self.ttl if ttl is None else ttl)
        self._records.setdefault(_key(name), []).append(rr)

    def answer(self, data: bytes, *, udp: bool) -> bytes | None:
        """The wire reply to one query, or None to stay silent (dropped name, garbage)."""
        try:
            request = DNSRecord.parse(data)
        except DNSError:
            return None
        if not request.questions:
            return None
        name = _key(str(request.q.qname))
        self.queries[(name, QTYPE.get(request.q.qtype))] += 1
        if name in self._drop:
            return None
        reply = request.reply()
        if name in self._servfail:
            reply.header.rcode = RCODE.SERVFAIL
        elif name not in self._records:
            reply.header.rcode = RCODE.NXDOMAIN
        else:
            for rr in self._records[name]:
                if rr.rtype == request.q.qtype:
                    reply.add_answer(rr)
        wire: bytes = reply.pack()
        opt = [rr for rr in request.ar if rr.rtype == QTYPE.OPT]
        limit = max(512, opt[0].rclass) if opt else 512
        if udp and len(wire) > limit:
            truncated = request.reply()
            truncated.header.tc = 1
            wire = truncated.pack()
        return wire

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        for _ in range(20):  # UDP picks the port; TCP may find it taken, then try another
            udp, _proto = await loop.create_datagram_endpoint(
                lambda: _UDP(self), local_addr=(self.host, 0)
            )
            port = udp.get_extra_info("sockname")[1]
            try:
                self._tcp = await asyncio.start_server(self._serve_tcp, self.host, port)
            except OSError:
                udp.close()
                continue
            self._udp, self.port = udp, port
            return
        raise OSError("no free port for both UDP and TCP")

    async def _serve_tcp(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tcp_tasks.add(task)
        try:
            while True:
                (length,) = struct.unpack("!H", await reader.readexactly(2))
                reply = self.answer(await reader.readexactly(length), udp=False)
                if reply is None:
                    await asyncio.Event().wait()  # dropped: hold the connection until stop()
                else:
                    writer.write(struct.pack("!H", len(reply)) + reply)
                    await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            self._tcp_tasks.discard(task)
            writer.close()

    async def stop(self) -> None:
        if self._udp is not None:
            self._udp.close()
            self._udp = None
        if self._tcp is not None:
            self._tcp.close()
            for task in list(self._tcp_tasks):
                task.cancel()
            await asyncio.gather(*self._tcp_tasks, return_exceptions=True)
            await self._tcp.wait_closed()
            self._tcp = None

    async def __aenter__(self) -> LoopbackDNS:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()
