"""Behind an MTA: XFORWARD from `[smtp] trusted_proxies` names the original client.

A trusted proxy is offered XFORWARD in the EHLO reply and its attributes reach the stored
envelope (`forwarded`) beside the proxy's own peer and HELO; anyone else is not offered the
command and is refused it. Spoken in raw bytes, as the proxy (Postfix's smtp client) does.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest

from mailgate.model import ForwardedClient, InboundRow
from mailgate.store import store_for
from tests.conftest import SUPPORT, Running
from tests.test_cli import NO_FROM
from tests.test_hostile_smtp import Raw, inbound_count, limited, message, raw

pytestmark = pytest.mark.filterwarnings("ignore::ResourceWarning")


@asynccontextmanager
async def behind(
    tmp_path: Path, proxies: str = '["127.0.0.1", "10.0.0.0/8", "::1"]'
) -> AsyncIterator[Running]:
    async with limited(tmp_path, f"trusted_proxies = {proxies}") as daemon:
        yield daemon


async def ehlo(conn: Raw, name: str = "proxy.example") -> list[str]:
    """Greeting and EHLO; every line of the EHLO reply."""
    await conn.greeting()
    await conn.send(f"EHLO {name}\r\n".encode())
    lines = []
    while True:
        line = (await conn.reader.readline()).decode().rstrip("\r\n")
        lines.append(line)
        if line[3:4] != "-":
            return lines


async def transaction(
    conn: Raw,
    subject: str = "Forwarded",
    data: bytes | None = None,
    sender: str = "customer@example.org",
) -> str:
    """MAIL, RCPT and DATA with one message; its queue id."""
    assert await conn.command(f"MAIL FROM:<{sender}>") == "250 2.1.0 Sender OK"
    assert await conn.command(f"RCPT TO:<{SUPPORT}>") == "250 2.1.5 Recipient OK"
    assert (await conn.command("DATA")).startswith("354 ")
    await conn.send((data if data is not None else message(subject=subject)) + b".\r\n")
    queued = await conn.reply()
    assert queued.startswith("250 2.0.0 Queued as "), queued
    return queued.rsplit(" ", 1)[1]


async def stored(daemon: Running, queue_id: str) -> InboundRow:
    async with store_for(daemon.config) as store:
        row = await store.get_inbound(queue_id)
    assert row is not None
    return row


async def test_trusted_proxy_is_offered_xforward_and_the_client_is_stored(
    tmp_path: Path,
) -> None:
    async with behind(tmp_path) as daemon, raw(daemon) as conn:
        lines = await ehlo(conn)
        assert "250-XFORWARD NAME ADDR PROTO HELO IDENT" in lines
        assert lines[-1] == "250 HELP"
        # As Postfix sends it: two commands, values xtext-encoded.
        assert await conn.command(
            "XFORWARD NAME=mail.client.example ADDR=192.0.2.7 PORT=41234 PROTO=ESMTP"
        ) == ("250 2.0.0 Ok")
        assert await conn.command("XFORWARD HELO=[192.0.2.7] IDENT=4XyZ1+2B2 SOURCE=REMOTE") == (
            "250 2.0.0 Ok"
        )
        first = await transaction(conn)
        # The attributes were for that transaction only: the next one is the proxy's own.
        second = await transaction(conn, subject="Not forwarded")
    row = await stored(daemon, first)
    assert row.envelope.forwarded == ForwardedClient(
        addr="192.0.2.7",
        name="mail.client.example",
        helo="[192.0.2.7]",
        proto="ESMTP",
        ident="4XyZ1+2",
    )
    assert row.envelope.peer.startswith("127.0.0.1:")  # both hops: the proxy is the peer
    assert row.envelope.helo == "proxy.example"
    assert (row.envelope.client_ip, row.envelope.client_helo) == ("192.0.2.7", "[192.0.2.7]")
    after = await stored(daemon, second)
    assert after.envelope.forwarded is None
    assert after.envelope.client_ip == "127.0.0.1"


async def test_untrusted_peer_is_not_offered_xforward_and_is_refused(tmp_path: Path) -> None:
    # Trusted: 127.0.0.2 only. This client connects from 127.0.0.1.
    async with behind(tmp_path, '["127.0.0.2"]') as daemon:
        async with raw(daemon) as conn:
            lines = await ehlo(conn)
            assert not [line for line in lines if "XFORWARD" in line]
            assert await conn.command("XFORWARD ADDR=192.0.2.7 HELO=forged.example") == (
                "550 5.7.0 XFORWARD not permitted from your address"
            )
            assert "XFORWARD" not in await conn.command("HELP")
            queue_id = await transaction(conn)
        row = await stored(daemon, queue_id)
        assert row.envelope.forwarded is None
        assert row.envelope.client_ip == "127.0.0.1"
        # The same daemon believes the peer it trusts.
        async with raw(daemon, source="127.0.0.2") as proxy:
            assert "250-XFORWARD NAME ADDR PROTO HELO IDENT" in await ehlo(proxy)
            assert await proxy.command("XFORWARD ADDR=192.0.2.8") == "250 2.0.0 Ok"
            trusted = await transaction(proxy)
        assert (await stored(daemon, trusted)).envelope.client_ip == "192.0.2.8"


async def test_nothing_is_trusted_by_default(daemon: Running) -> None:
    assert daemon.config.smtp.trusted_proxies == ()
    async with raw(daemon) as conn:
        assert not [line for line in await ehlo(conn) if "XFORWARD" in line]
        assert (await conn.command("XFORWARD ADDR=192.0.2.7")).startswith("550 5.7.0 ")


async def test_xforward_inside_a_transaction_is_refused(tmp_path: Path) -> None:
    async with behind(tmp_path) as daemon, raw(daemon) as conn:
        await ehlo(conn)
        assert await conn.command("XFORWARD ADDR=192.0.2.1") == "250 2.0.0 Ok"
        assert await conn.command("MAIL FROM:<customer@example.org>") == "250 2.1.0 Sender OK"
        assert await conn.command("XFORWARD ADDR=198.51.100.66") == (
            "503 5.5.1 Error: MAIL transaction in progress"
        )
        assert await conn.command(f"RCPT TO:<{SUPPORT}>") == "250 2.1.5 Recipient OK"
        assert await conn.command("XFORWARD NAME=late.example") == (
            "503 5.5.1 Error: MAIL transaction in progress"
        )
        assert (await conn.command("DATA")).startswith("354 ")
        await conn.send(message() + b".\r\n")
        queued = await conn.reply()
        assert queued.startswith("250 2.0.0 Queued as ")
    row = await stored(daemon, queued.rsplit(" ", 1)[1])
    assert row.envelope.forwarded == ForwardedClient(addr="192.0.2.1")


async def test_rset_and_ehlo_end_the_attributes(tmp_path: Path) -> None:
    async with behind(tmp_path) as daemon, raw(daemon) as conn:
        await ehlo(conn)
        assert await conn.command("XFORWARD ADDR=192.0.2.1 HELO=one.example") == "250 2.0.0 Ok"
        assert await conn.command("MAIL FROM:<customer@example.org>") == "250 2.1.0 Sender OK"
        assert await conn.command("RSET") == "250 2.0.0 OK"
        after_rset = await transaction(conn)
        assert await conn.command("XFORWARD ADDR=192.0.2.2") == "250 2.0.0 Ok"
        assert (await conn.command("EHLO proxy.example")).startswith("250 ")
        after_ehlo = await transaction(conn)
    assert (await stored(daemon, after_rset)).envelope.forwarded is None
    assert (await stored(daemon, after_ehlo)).envelope.forwarded is None


async def test_attribute_values_ipv6_unknown_and_updates(tmp_path: Path) -> None:
    async with behind(tmp_path) as daemon, raw(daemon) as conn:
        await ehlo(conn)
        commands = [
            "XFORWARD NAME=first.example ADDR=IPV6:2001:DB8:0:0::1 PROTO=SMTP",
            # Later commands overwrite what they name; [UNAVAILABLE] (any case) erases.
            "xforward name=[unavailable] HELO=h+3Dx IDENT=[TEMPUNAVAIL]",
        ]
        for command in commands:
            assert await conn.command(command) == "250 2.0.0 Ok"
        queue_id = await transaction(conn)
        # ADDR unknown: the proxy's own submission; only IDENT is kept (XFORWARD_README).
        assert await conn.command("XFORWARD ADDR=[UNAVAILABLE] HELO=x IDENT=Q1") == ("250 2.0.0 Ok")
        local = await transaction(conn)
    assert (await stored(daemon, queue_id)).envelope.forwarded == ForwardedClient(
        addr="2001:db8::1", name=None, helo="h=x", proto="SMTP", ident=None
    )
    local_row = await stored(daemon, local)
    assert local_row.envelope.forwarded == ForwardedClient(ident="Q1")
    assert local_row.envelope.client_ip == "127.0.0.1"


@pytest.mark.parametrize(
    ("command", "reply"),
    [
        (b"XFORWARD", "501 5.5.4 Syntax: XFORWARD attribute=value ..."),
        (b"XFORWARD ADDR", "501 5.5.4 Bad XFORWARD ADDR syntax"),
        (b"XFORWARD NAME=", "501 5.5.4 Bad XFORWARD NAME syntax"),
        (b"XFORWARD COLOUR=blue", "501 5.5.4 Bad XFORWARD attribute name"),
        (b"XFORWARD ADDR=not-an-address", "501 5.5.4 Bad XFORWARD ADDR syntax"),
        (b"XFORWARD ADDR=192.0.2.300", "501 5.5.4 Bad XFORWARD ADDR syntax"),
        (b"XFORWARD PORT=70000", "501 5.5.4 Bad XFORWARD PORT syntax"),
        (b"XFORWARD SOURCE=SPACE", "501 5.5.4 Bad XFORWARD SOURCE syntax"),
        (b"XFORWARD PROTO=" + b"P" * 65, "501 5.5.4 Bad XFORWARD PROTO syntax"),
        (b"XFORWARD NAME=" + b"n" * 256, "501 5.5.4 Bad XFORWARD NAME syntax"),
        (b"XFORWARD HELO=bad+ZZ", "501 5.5.4 Bad XFORWARD HELO syntax"),  # not xtext
        (b"XFORWARD HELO=a+0D+0Ab", "501 5.5.4 Bad XFORWARD HELO syntax"),  # CR LF decoded
        (b"XFORWARD HELO=a+20b", "501 5.5.4 Bad XFORWARD HELO syntax"),  # a space decoded
        (b"XFORWARD HELO=a\x01b", "501 5.5.4 Bad XFORWARD HELO syntax"),
        (b"XFORWARD NAME=caf\xe9", "501 5.5.4 Bad XFORWARD NAME syntax"),  # not UTF-8
        (b"XFORWARD NAME=ok.example ADDR=bad", "501 5.5.4 Bad XFORWARD ADDR syntax"),
    ],
    ids=repr,
)
async def test_bad_xforward_syntax_gets_501_554_and_changes_nothing(
    tmp_path: Path, command: bytes, reply: str
) -> None:
    async with behind(tmp_path) as daemon, raw(daemon) as conn:
        await ehlo(conn)
        assert await conn.command(command) == reply
        queue_id = await transaction(conn)
    # A refused command sets nothing, not even the attributes before its bad one.
    assert (await stored(daemon, queue_id)).envelope.forwarded is None
    assert inbound_count(daemon) == 1


async def test_quarantine_show_names_the_original_client(tmp_path: Path) -> None:
    async with behind(tmp_path) as daemon:
        async with raw(daemon) as conn:
            await ehlo(conn)
            assert await conn.command("XFORWARD NAME=mx.client.example ADDR=192.0.2.9") == (
                "250 2.0.0 Ok"
            )
            queue_id = await transaction(conn, data=NO_FROM, sender="")  # names nobody
        await daemon.settle()
        shown = daemon.cli("quarantine", "show", queue_id)
        assert shown.returncode == 0, shown.stderr
        detail = json.loads(shown.stdout)
        assert detail["peer"].startswith("127.0.0.1:")
        assert detail["helo"] == "proxy.example"
        assert detail["forwarded"] == {
            "addr": "192.0.2.9",
            "name": "mx.client.example",
            "helo": None,
            "proto": None,
            "ident": None,
        }
