"""A tiny authoritative DNS server on loopback, so authentication tests never touch the network.

Answers A, TXT and MX from a dict; names it does not know get NXDOMAIN. `silent` names get no
answer at all (a timeout).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdatatype
import dns.rrset


def txt_chunks(text: str) -> str:
    """A TXT rdata in zone-file syntax, split into 255-octet strings."""
    parts = [text[i : i + 200] for i in range(0, len(text), 200)] or [""]
    return " ".join('"' + p.replace('"', '\\"') + '"' for p in parts)


class DnsStub(asyncio.DatagramProtocol):
    def __init__(self) -> None:
        self.records: dict[tuple[str, str], list[str]] = {}
        self.silent: set[str] = set()
        self.queries: list[tuple[str, str]] = []
        self._transport: asyncio.DatagramTransport | None = None

    def add(self, name: str, rtype: str, value: str) -> None:
        self.records.setdefault((name.lower().rstrip("."), rtype), []).append(value)

    def txt(self, name: str, text: str) -> None:
        self.add(name, "TXT", txt_chunks(text))

    def connection_made(self, transport: Any) -> None:
        self._transport = transport

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        query = dns.message.from_wire(data)
        question = query.question[0]
        name = question.name.to_text().lower().rstrip(".")
        rtype = dns.rdatatype.to_text(question.rdtype)
        self.queries.append((name, rtype))
        if name in self.silent:
            return
        response = dns.message.make_response(query)
        response.flags |= dns.flags.AA
        values = self.records.get((name, rtype))
        if values:
            response.answer.append(dns.rrset.from_text_list(question.name, 60, "IN", rtype, values))
        elif not any(key[0] == name for key in self.records):
            response.set_rcode(dns.rcode.NXDOMAIN)
        assert self._transport is not None
        self._transport.sendto(response.to_wire(), addr)


@asynccontextmanager
async def dns_stub() -> AsyncIterator[tuple[DnsStub, int]]:
    """Serve a DnsStub on 127.0.0.1 at a free UDP port; yield it and the port."""
    loop = asyncio.get_running_loop()
    transport, stub = await loop.create_datagram_endpoint(DnsStub, local_addr=("127.0.0.1", 0))
    port = transport.get_extra_info("sockname")[1]
    try:
        yield stub, port
    finally:
        transport.close()
