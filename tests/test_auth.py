"""Sender authentication: DKIM, SPF and DMARC against a DNS stub on loopback; trust, not
acceptance. Also the header trust boundary (Authentication-Results, X-Mailgate-*, Reply-To)."""

from __future__ import annotations

import email.policy
import re
from collections.abc import AsyncIterator
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import dkim
import pytest
from hypothesis import given
from hypothesis import strategies as st

from mailgate.config import AuthConfig, Config, load_config
from mailgate.ingest.auth import Authenticator, AuthResults, crlf_lines, verify_signatures
from mailgate.ingest.parse import parse_mail
from mailgate.model import Envelope, HostPort, Ticket
from tests.conftest import Key, Relay, Running, cli_json, daemon_running, mail, write_config
from tests.dns_stub import DnsStub, dns_stub


def auth_config(
    folder: Path, port: int, *, relay: Relay | None = None, extra: str = "", smtp_extra: str = ""
) -> Config:
    """A daemon whose DNS is this test's own stub at `port`."""
    path = write_config(
        folder,
        relay_port=relay.port if relay else None,
        dns_port=port,
        auth_extra=extra,
        smtp_extra=smtp_extra,
    )
    return load_config(path)


@pytest.fixture
async def dns() -> AsyncIterator[tuple[DnsStub, int]]:
    async with dns_stub() as (stub, port):
        stub.txt("_dmarc.example.org", "v=DMARC1; p=reject")
        yield stub, port


def signed(key: Key, message: bytes, *, domain: str = "example.org", length: bool = False) -> bytes:
    signature = dkim.sign(
        message, b"sel", domain.encode(), key.private_pem, length=length, linesep=b"\r\n"
    )
    return bytes(signature) + message


def raw(msg: EmailMessage) -> bytes:
    """The message with CRLF line ends, as it goes over SMTP (and as DKIM signs it)."""
    return msg.as_bytes(policy=email.policy.SMTP)


def shown(running: Running, ticket_id: int) -> Any:
    return cli_json(running, "tickets", "show", str(ticket_id))


async def test_signed_mail_passes_and_results_are_shown(
    tmp_path: Path, dns: tuple[DnsStub, int], key: Key
) -> None:
    stub, port = dns
    stub.txt("sel._domainkey.example.org", key.dns_record)
    async with daemon_running(auth_config(tmp_path, port)) as running:
        await running.send(signed(key, raw(mail(sender="ann@example.org"))))
        await running.settle()
        ticket = shown(running, 1)
        text = running.cli("tickets", "show", "1").stdout
    [message] = ticket["messages"]
    assert message["auth"]["dkim"] == "pass"
    assert message["auth"]["dmarc"] == "pass"
    assert message["auth"]["signatures"] == [
        {"d": "example.org", "result": "pass", "partial_body": False}
    ]
    assert message["auth"]["trust"] == "authenticated"
    assert message["flags"] == []
    assert "Trust: authenticated  dkim=pass spf=none dmarc=pass  d=example.org:pass" in text


async def test_spoofed_follow_up_opens_a_flagged_ticket_and_sends_nothing(
    tmp_path: Path, dns: tuple[DnsStub, int], key: Key, relay: Relay
) -> None:
    """A follow-up claiming to be the requester, failing DMARC, never reaches their ticket,
    whatever tag or References it carries, and triggers no automatic mail."""
    stub, port = dns
    stub.txt("sel._domainkey.example.org", key.dns_record)
    async with daemon_running(auth_config(tmp_path, port, relay=relay)) as running:
        first = mail(sender="ann@example.org", message_id="<real@example.org>")
        await running.send(signed(key, raw(first)))
        await relay.wait_for(2)
        spoof = mail(
            sender="Ann <ann@example.org>",
            subject="Re: Printer on fire [#1]",
            in_reply_to="<real@example.org>",
            references="<real@example.org>",
            body="Please send the invoice to my new address.\n",
        )
        await running.send(raw(spoof), sender="ann@example.org")
        tickets = await running.tickets()
        # a barrier: a third, honest mail's automatic mails arrive after any from the spoof
        await running.send(
            signed(key, raw(mail(sender="bob@example.org"))), sender="bob@example.org"
        )
        await relay.wait_for(4)
        listed = cli_json(running, "tickets", "list")
    assert [len(t.messages) for t in tickets] == [1, 1]
    spoofed: Ticket = tickets[1]
    assert spoofed.flags == ("unverified_sender",)
    assert spoofed.messages[0].flags[0] == "unverified_sender"
    assert spoofed.messages[0].auth is not None and spoofed.messages[0].auth["dmarc"] == "fail"
    assert [r.rcpt_tos for r in relay.received] == [["ann@example.org"]] * 2 + [
        ["bob@example.org"]
    ] * 2
    assert listed[1]["flags"] == ["unverified_sender"]


async def test_no_dmarc_policy_keeps_the_foundation_rule(
    tmp_path: Path, dns: tuple[DnsStub, int]
) -> None:
    """Where the From domain publishes no DMARC record, an unsigned reply joins as before."""
    _stub, port = dns
    async with daemon_running(auth_config(tmp_path, port)) as running:
        await running.send(mail(sender="carol@nodmarc.example"), sender="carol@nodmarc.example")
        await running.send(
            mail(sender="carol@nodmarc.example", subject="Re: Printer on fire [#1]"),
            sender="carol@nodmarc.example",
        )
        [ticket] = await running.tickets()
    assert [m.auth["dmarc"] for m in ticket.messages if m.auth] == ["none", "none"]


async def test_aligned_spf_pass_is_enough(tmp_path: Path, dns: tuple[DnsStub, int]) -> None:
    stub, port = dns
    stub.txt("example.org", "v=spf1 ip4:127.0.0.1 -all")
    async with daemon_running(auth_config(tmp_path, port)) as running:
        await running.send(mail(sender="ann@example.org"), sender="bounces@example.org")
        [ticket] = await running.tickets()
    assert ticket.messages[0].auth == {
        "dkim": "none",
        "spf": "pass",
        "dmarc": "pass",
        "aligned": True,
        "policy": "reject",
        "source": "mailgate",
        "signatures": [],
        "forged_results": 0,
        "notes": [],
        "trust": "authenticated",
    }


async def test_unaligned_passes_fail_dmarc(
    tmp_path: Path, dns: tuple[DnsStub, int], key: Key
) -> None:
    """A valid signature of another domain and SPF pass for another domain prove nothing
    about the From: DMARC fails."""
    stub, port = dns
    stub.txt("sel._domainkey.mailer.example", key.dns_record)
    stub.txt("mailer.example", "v=spf1 ip4:127.0.0.1 -all")
    async with daemon_running(auth_config(tmp_path, port)) as running:
        message = signed(key, raw(mail(sender="ann@example.org")), domain="mailer.example")
        await running.send(message, sender="x@mailer.example")
        [ticket] = await running.tickets()
    auth = ticket.messages[0].auth
    assert auth is not None
    # Neither the other domain's signature nor its SPF could align, so neither was looked up.
    assert (auth["dkim"], auth["spf"], auth["dmarc"]) == ("none", "none", "fail")
    assert auth["signatures"] == [
        {"d": "mailer.example", "result": "skipped", "partial_body": False}
    ]
    assert ticket.flags == ("unverified_sender",)
    assert not [name for name, _ in stub.queries if "mailer.example" in name]


async def test_partial_body_signature_is_flagged_and_not_trusted(
    tmp_path: Path, dns: tuple[DnsStub, int], key: Key
) -> None:
    """`l=` signs only part of the body, so text appended later still verifies: flagged, and
    it does not satisfy DMARC."""
    stub, port = dns
    stub.txt("sel._domainkey.example.org", key.dns_record)
    async with daemon_running(auth_config(tmp_path, port)) as running:
        message = signed(key, raw(mail(sender="ann@example.org")), length=True)
        await running.send(message + b"Appended by someone else.\r\n")
        [ticket] = await running.tickets()
    message_flags = ticket.messages[0].flags
    assert "dkim_partial_body" in message_flags
    assert "unverified_sender" in message_flags


AR_TRUSTED = "mx.example.com"


async def test_trusted_mta_results_are_used_and_forgeries_ignored(
    tmp_path: Path, dns: tuple[DnsStub, int]
) -> None:
    """Behind an MTA, its (topmost) Authentication-Results decide; a header further down
    claiming the same authserv-id came with the message and is ignored, and no DNS is asked."""
    stub, port = dns
    config = auth_config(
        tmp_path,
        port,
        extra=f'trusted_authserv_id = "{AR_TRUSTED}"',
        smtp_extra='trusted_proxies = ["127.0.0.1"]',  # the MTA connects from here
    )
    body = raw(mail(sender="ann@example.org"))
    headers = (
        f"Authentication-Results: {AR_TRUSTED}; dkim=fail header.d=example.org;"
        " spf=softfail smtp.mailfrom=example.org; dmarc=fail header.from=example.org\r\n"
        f"Authentication-Results: {AR_TRUSTED}; dkim=pass; spf=pass; dmarc=pass\r\n"
        "Authentication-Results: other.example; dmarc=pass\r\n"
    ).encode()
    async with daemon_running(config) as running:
        await running.send(headers + body)
        [ticket] = await running.tickets()
    auth = ticket.messages[0].auth
    assert auth is not None
    assert (auth["dkim"], auth["spf"], auth["dmarc"], auth["source"]) == (
        "fail",
        "fail",
        "fail",
        AR_TRUSTED,
    )
    assert auth["forged_results"] == 1
    assert "forged_authentication_results" in ticket.messages[0].flags
    assert not [q for q in stub.queries if "example.org" in q[0]]


async def test_reply_to_never_changes_identity(tmp_path: Path, dns: tuple[DnsStub, int]) -> None:
    _stub, port = dns
    async with daemon_running(auth_config(tmp_path, port)) as running:
        message = mail(sender="carol@nodmarc.example")
        message["Reply-To"] = "mallory@evil.example"
        await running.send(message, sender="carol@nodmarc.example")
        [ticket] = await running.tickets()
    assert ticket.requester.email == "carol@nodmarc.example"
    assert ticket.messages[0].flags == ("unauthenticated", "reply_to_differs")


async def test_mailgate_headers_from_outside_are_not_trusted(
    tmp_path: Path, dns: tuple[DnsStub, int]
) -> None:
    """X-Mailgate-* headers in incoming mail mean nothing: a stranger gets a ticket of
    their own, not ticket 1, and is no agent."""
    _stub, port = dns
    async with daemon_running(auth_config(tmp_path, port)) as running:
        await running.send(mail(sender="carol@nodmarc.example"), sender="carol@nodmarc.example")
        forged = mail(sender="eve@nodmarc.example", subject="hello")
        forged["X-Mailgate-Ticket"] = "1"
        forged["X-Mailgate-Agent"] = "yes"
        forged["X-Mailgate-Verified"] = "true"
        await running.send(forged, sender="eve@nodmarc.example")
        tickets = await running.tickets()
    assert [(t.id, t.requester.email) for t in tickets] == [
        (1, "carol@nodmarc.example"),
        (2, "eve@nodmarc.example"),
    ]
    assert all(m.author == "customer" for t in tickets for m in t.messages)


async def test_global_cap_on_automatic_mail(tmp_path: Path, relay: Relay) -> None:
    """`auto_reply_global_limit` caps automatic mail in all, whoever the senders are."""
    path = write_config(
        tmp_path, relay_port=relay.port, outbound_extra="auto_reply_global_limit = 3\n"
    )
    async with daemon_running(load_config(path)) as running:
        for n in range(5):
            await running.send(mail(sender=f"user{n}@example.net"), sender=f"user{n}@example.net")
        tickets = await running.tickets()
        await relay.wait_for(3)
        outbox = cli_json(running, "outbox", "list")
    assert len(tickets) == 5
    assert len(outbox) == 3


async def check(port: int, message: bytes, envelope: Envelope | None = None) -> AuthResults:
    """The three steps of authentication in this process: DNS, DKIM, the results."""
    authenticator = Authenticator(
        AuthConfig(
            enabled=True,
            dns_timeout=1,
            nameservers=(HostPort("127.0.0.1", port),),
            trusted_authserv_id=None,
        )
    )
    lookup = await authenticator.lookup(parse_mail(message), envelope or ENVELOPE)
    authenticator.close()
    return lookup.results(verify_signatures(message, lookup.jobs), authenticator.psl)


ENVELOPE = Envelope("ann@example.org", ("support@example.com",), "127.0.0.1:40000", "mx.test")


@pytest.mark.parametrize(
    ("policy", "signer", "from_domain", "dkim", "dmarc"),
    [
        ("v=DMARC1; p=reject", "mail.example.org", "example.org", "pass", "pass"),  # relaxed
        ("v=DMARC1; p=reject; adkim=s", "mail.example.org", "example.org", "pass", "fail"),
        ("v=DMARC1; p=reject; adkim=s", "example.org", "example.org", "pass", "pass"),
        # another organisation's signature cannot align, so it is not even checked
        ("v=DMARC1; p=none", "other.example", "example.org", "none", "fail"),  # still a policy
        ("v=spf1 -all", "other.example", "example.org", "none", "none"),  # not a DMARC record
    ],
)
async def test_dmarc_alignment(
    key: Key, policy: str, signer: str, from_domain: str, dkim: str, dmarc: str
) -> None:
    async with dns_stub() as (stub, port):
        stub.txt(f"_dmarc.{from_domain}", policy)
        stub.txt(f"sel._domainkey.{signer}", key.dns_record)
        message = signed(key, raw(mail(sender=f"ann@{from_domain}")), domain=signer)
        results = await check(port, message)
    assert results.dkim == dkim
    assert results.dmarc == dmarc


async def test_subdomain_falls_back_to_the_organisational_policy(key: Key) -> None:
    async with dns_stub() as (stub, port):
        stub.txt("_dmarc.example.org", "v=DMARC1; p=reject")
        message = raw(mail(sender="ann@eu.example.org"))
        results = await check(port, message)
        asked = [name for name, _ in stub.queries]
    assert results.dmarc == "fail"
    assert asked.index("_dmarc.eu.example.org") < asked.index("_dmarc.example.org")


async def test_bad_signature_fails(key: Key) -> None:
    async with dns_stub() as (stub, port):
        stub.txt("sel._domainkey.example.org", key.dns_record)
        message = signed(key, raw(mail(sender="ann@example.org"))).replace(b"on fire", b"OK")
        results = await check(port, message)
    assert results.dkim == "fail"
    assert results.signatures[0].result == "fail"


@given(body=st.lists(st.sampled_from([b"\r", b"\n", b"\r\n", b"x", b" "]), max_size=30))
def test_body_lines_end_with_crlf_as_dkimpy_reads_them(body: list[bytes]) -> None:
    # The cheap way (two replaces) gives what the regex gives, without a list entry per line.
    joined = b"".join(body)
    assert crlf_lines(joined) == re.sub(rb"\r?\n", b"\r\n", joined)
