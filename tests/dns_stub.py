"""A tiny authoritative DNS server on loopback, so authentication tests never touch the network.

Answers A, TXT and MX from a dict; names it does not know get NXDOMAIN. `silent` names get no
answer at all (a timeout); `delay` holds every answer back that long; `loss` drops that share
of the answers at random (lost UDP packets, which the resolver must retry); with `lose_retries`
off, a query asked again after a loss is always answered.
"""

from __future__ import annotations

import asyncio
import random
import subprocess
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
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
        self.delay = 0.0
        self.loss = 0.0
        self.lost = 0
        self.lose_retries = True
        self._lost_ids: set[int] = set()
        self._random = random.Random(5)  # the same losses in every run
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
        retry = query.id in self._lost_ids
        if self.loss and (self.lose_retries or not retry) and self._random.random() < self.loss:
            self._lost_ids.add(query.id)
            self.lost += 1
            return
        response = dns.message.make_response(query)
        response.flags |= dns.flags.AA
        values = self.records.get((name, rtype))
        if values:
            response.answer.append(dns.rrset.from_text_list(question.name, 60, "IN", rtype, values))
        elif not any(key[0] == name for key in self.records):
            response.set_rcode(dns.rcode.NXDOMAIN)
        assert self._transport is not None
        if self.delay:
            asyncio.get_running_loop().call_later(
                self.delay, self._transport.sendto, response.to_wire(), addr
            )
        else:
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


_shared: tuple[DnsStub, int] | None = None
_shared_lock = threading.Lock()


def shared_dns_stub() -> tuple[DnsStub, int]:
    """One stub for the whole test run, serving from a thread of its own, so that daemons in
    other processes and in any test's event loop can ask it; started on first use."""
    global _shared
    with _shared_lock:
        if _shared is None:
            started: list[tuple[DnsStub, int]] = []
            ready = threading.Event()

            def serve() -> None:
                loop = asyncio.new_event_loop()
                transport, stub = loop.run_until_complete(
                    loop.create_datagram_endpoint(DnsStub, local_addr=("127.0.0.1", 0))
                )
                started.append((stub, int(transport.get_extra_info("sockname")[1])))
                ready.set()
                loop.run_forever()

            threading.Thread(target=serve, name="dns-stub", daemon=True).start()
            ready.wait(10)
            _shared = started[0]
        return _shared


def dkim_key_pair(folder: Path, bits: int = 1024) -> tuple[bytes, str]:
    """A real RSA key pair (openssl): the private key in PEM, and the public half as the TXT
    record a DKIM selector publishes."""
    private = folder / "dkim.pem"
    subprocess.run(
        ["openssl", "genrsa", "-out", str(private), str(bits)], check=True, capture_output=True
    )
    public = subprocess.run(
        ["openssl", "rsa", "-in", str(private), "-pubout"], check=True, capture_output=True
    ).stdout.decode()
    body = "".join(line for line in public.splitlines() if "-----" not in line)
    return private.read_bytes(), f"v=DKIM1; k=rsa; p={body}"
