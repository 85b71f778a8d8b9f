"""A relay's immediate refusal, through the daemon: recorded as an asynchronous DSN would be.

The relay (conftest `Relay`, aiosmtpd on loopback) answers 550 at RCPT for the recipients in
its `refuse` map, or 5xx at DATA with `reply`. The refused address is marked undeliverable,
the ticket gets a system note, the outbox row keeps the relay's whole reply, and a partial
refusal (the To took the mail, a Cc did not) is a success that says so.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

from mailgate.config import Config
from mailgate.store import store_for
from tests.conftest import Relay, Running, cli_json, daemon_running, mail
from tests.test_loop_protection import CUSTOMER, outbox_drained, undeliverable

GONE = (
    "550-5.1.1 The email account that you tried to reach does not exist. Please try\r\n"
    "550-5.1.1 double-checking the recipient's email address for typos or\r\n"
    "550 5.1.1 unnecessary spaces. https://support.example/mail/?p=NoSuchUser"
)
COLLEAGUE = "colleague@example.net"


def notes(running: Running) -> list[str]:
    """The bodies of the system notes on the customer's ticket."""
    [ticket] = cli_json(running, "tickets", "list")
    shown = cli_json(running, "tickets", "show", str(ticket["id"]))
    return [
        m["body_text"]
        for m in shown["messages"]
        if m["author"] == "system" and m["thread_reason"] == "bounce"
    ]


async def marked(config: Config, email: str) -> str | None:
    """The undeliverable mark of an address that need not be a requester (a participant)."""
    async with store_for(config) as store:
        person = await store.get_requester(email)
    return person.undeliverable if person else None


def revoked_tokens(database: Path) -> int:
    with sqlite3.connect(database) as db:
        row = db.execute(
            "SELECT count(*) FROM verification_tokens WHERE revoked_at IS NOT NULL"
        ).fetchone()
    return int(row[0])


async def test_a_550_at_rcpt_marks_the_recipient_and_notes_the_ticket(
    relay_config: Config, relay: Relay
) -> None:
    """Both automatic mails to a mailbox the relay knows is gone fail at once: the address is
    marked undeliverable (5.1.1), each refusal is a note on the ticket, each row keeps the
    relay's whole three-line reply, and the verification link (never delivered) is revoked."""
    relay.refuse[CUSTOMER] = GONE
    async with daemon_running(relay_config) as running:
        await running.send(mail(), sender=CUSTOMER)
        await outbox_drained(running)
        rows = cli_json(running, "outbox", "list")
        assert [r["state"] for r in rows] == ["failed", "failed"]
        for row in rows:
            assert row["reply"].splitlines() == [
                f"RCPT <{CUSTOMER}>: 550 5.1.1 The email account that you tried to reach does not"
                " exist. Please try",
                "5.1.1 double-checking the recipient's email address for typos or",
                "5.1.1 unnecessary spaces. https://support.example/mail/?p=NoSuchUser",
            ]
            assert "550" in row["last_error"] and "does not exist" in row["last_error"]
        assert undeliverable(running, CUSTOMER) == "5.1.1"
        found = notes(running)
        assert len(found) == 2 and all(CUSTOMER in n and "does not exist" in n for n in found)
        assert revoked_tokens(relay_config.storage.database) == 1
        table = running.cli("outbox", "list")
        assert table.returncode == 0, table.stderr
        assert "RELAY REPLY" in table.stdout and "p=NoSuchUser" in table.stdout
    assert relay.received == []


async def test_a_5xx_at_data_marks_every_recipient(relay_config: Config, relay: Relay) -> None:
    relay.reply = "554 5.7.1 <customer@example.org>: delivery not authorized, message refused"
    async with daemon_running(relay_config) as running:
        await running.send(mail(), sender=CUSTOMER)
        await outbox_drained(running)
        rows = cli_json(running, "outbox", "list")
        assert [r["state"] for r in rows] == ["failed", "failed"]
        assert all(r["reply"].startswith("DATA: 554 5.7.1 ") for r in rows), rows
        assert undeliverable(running, CUSTOMER) == "5.7.1"
        assert len(notes(running)) == 2


async def agent_reply_with_a_colleague(running: Running, relay: Relay, tmp: Path) -> dict[str, str]:
    """The customer writes in, an agent adds a colleague and answers; return its outbox row."""
    await running.send(mail(), sender=CUSTOMER)
    await outbox_drained(running)
    [ticket] = cli_json(running, "tickets", "list")
    assert running.cli("participants", "add", str(ticket["id"]), COLLEAGUE).returncode == 0
    body = tmp / "reply.txt"
    body.write_text("We are on it.\n", encoding="utf-8")
    result = running.cli("reply", str(ticket["id"]), "--body-file", str(body))
    assert result.returncode == 0, result.stderr
    await outbox_drained(running)
    [row] = [r for r in cli_json(running, "outbox", "list") if r["kind"] == "agent_reply"]
    assert row["cc"] == [COLLEAGUE]
    return dict(row)


async def test_a_refused_cc_is_no_silent_success(
    relay_config: Config, relay: Relay, tmp_path: Path
) -> None:
    """The To takes the agent's reply, the Cc is refused at RCPT: the row is sent, and says
    what was refused; the colleague is marked and the ticket noted; the customer is not."""
    relay.refuse[COLLEAGUE] = "550 5.1.1 <colleague@example.net>: Recipient address rejected"
    async with daemon_running(relay_config) as running:
        row = await agent_reply_with_a_colleague(running, relay, tmp_path)
        assert row["state"] == "sent"
        assert row["last_error"] == f"refused 1 of 2 recipients: <{COLLEAGUE}> 550"
        lines = row["reply"].splitlines()
        assert (
            lines[0] == f"RCPT <{COLLEAGUE}>: 550 5.1.1 <{COLLEAGUE}>: Recipient address rejected"
        )
        assert lines[1].startswith("DATA: 250 ")
        assert await marked(relay_config, COLLEAGUE) == "5.1.1"
        assert undeliverable(running, CUSTOMER) is None
        [note] = notes(running)
        assert COLLEAGUE in note and "Recipient address rejected" in note
    [reply] = [r for r in relay.received if r.message["Auto-Submitted"] is None]
    assert reply.rcpt_tos == [CUSTOMER]


async def test_a_temporarily_refused_cc_is_noted_not_marked(
    relay_config: Config, relay: Relay, tmp_path: Path
) -> None:
    relay.refuse[COLLEAGUE] = "450 4.2.1 <colleague@example.net>: mailbox busy, try later"
    async with daemon_running(relay_config) as running:
        row = await agent_reply_with_a_colleague(running, relay, tmp_path)
        assert row["state"] == "sent"
        assert row["last_error"] == f"refused 1 of 2 recipients: <{COLLEAGUE}> 450"
        assert "450 4.2.1" in row["reply"]
        assert await marked(relay_config, COLLEAGUE) is None
        [note] = notes(running)
        assert "mailbox busy" in note and "not tried again" in note


async def test_an_accepted_mail_keeps_the_relays_reply(relay_config: Config, relay: Relay) -> None:
    async with daemon_running(relay_config) as running:
        await running.send(mail(), sender=CUSTOMER)
        await outbox_drained(running)
        rows = cli_json(running, "outbox", "list")
    assert [(r["state"], r["reply"], r["last_error"]) for r in rows] == [
        ("sent", "DATA: 250 2.0.0 OK", None)
    ] * 2
