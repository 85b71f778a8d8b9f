"""Customer text in every output: escaped in HTML (mail and pages), literal in templates, free
of terminal escapes on the CLI; customer HTML is never rendered, and never sent back out."""

from __future__ import annotations

import asyncio
import email.policy
import json
import re
import sqlite3
import time
from collections.abc import Callable
from email.message import EmailMessage
from email.parser import BytesParser
from pathlib import Path

import aiohttp

from mailgate.config import Config, load_config
from mailgate.privacy.keyring import Keyring
from mailgate.privacy.sealing import DataKey
from mailgate.store import labels, open_keyring
from tests.conftest import Relay, Running, daemon_running, mail, write_config

SCRIPT = "<script>alert(1)</script>"
FILENAME = "<img src=x onerror=alert(3)>.html"  # no "/": the sanitiser keeps only the last part


def hostile_mail(sender: str = "ann@example.org") -> bytes:
    message = mail(
        sender=f'"{SCRIPT}" <{sender}>',
        subject=f"{SCRIPT} {{{{ 7*7 }}}} \x1b[31mred",
        body=f"{SCRIPT}\n\x1b]0;pwned\x07 {{% for x in range(9**9) %}}{{% endfor %}}\n",
    )
    message.add_alternative(f"<p>hi</p>{SCRIPT}<img src=x onerror=alert(2)>", subtype="html")
    message.add_attachment(b"x", maintype="text", subtype="html", filename=FILENAME)
    return bytes(message)


async def test_agent_reply_escapes_customer_text(
    relay: Relay, relay_config: Config, tmp_path: Path
) -> None:
    async with daemon_running(relay_config) as running:
        await running.send(hostile_mail())
        await relay.wait_for(2)
        body = tmp_path / "reply.txt"
        body.write_text("Thanks.\n")
        assert running.cli("reply", "1", "--body-file", str(body)).returncode == 0
        [*_, answer] = await relay.wait_for(3)
    raw = answer.raw.decode()
    html = answer.message.get_body(("html",))
    assert html is not None
    content = str(html.get_content())
    assert SCRIPT not in content and "&lt;script&gt;alert(1)&lt;/script&gt;" in content
    assert "onerror" not in raw  # customer HTML and filenames are never sent back out
    assert "\x1b" not in raw
    subject = str(answer.message["Subject"])
    assert "{{ 7*7 }}" in subject and "49" not in subject


def test_cli_shows_no_terminal_escapes(tmp_path: Path) -> None:
    """Run through the whole pipeline and print the ticket as an agent would see it."""

    async def scenario(config: Config) -> str:
        async with daemon_running(config) as running:
            await running.send(hostile_mail())
            await running.settle()
            return (
                running.cli("tickets", "show", "1").stdout + running.cli("tickets", "list").stdout
            )

    output = asyncio.run(scenario(load_config(write_config(tmp_path))))
    assert "\x1b" not in output and "\x07" not in output
    assert f"[attachment] {FILENAME}" in output  # metadata shown as text, stored by hash
    assert "{{ 7*7 }}" in output
    assert not list((tmp_path / "var" / "attachments").rglob("*onerror*"))


async def test_verification_page_escapes_the_address(relay: Relay, relay_config: Config) -> None:
    """A quoted local part may hold markup (an attribute breakout; `<` and `>` it may not hold,
    see test_senders); the landing page shows it as text."""
    sender = '"x\\"onmouseover=alert(1)&\'y"@example.org'
    async with daemon_running(relay_config) as running:
        await running.send(hostile_mail(sender), sender="ann@example.org")
        received = await relay.wait_for(2)
        [verification] = [r for r in received if "confirm" in str(r.message["Subject"])]
        match = re.search(r"(/verify/[A-Za-z0-9_-]+)", verification.text())
        assert match
        page = await fetch(running, match.group(1))
    assert '"onmouseover' not in page and "&'y" not in page
    assert "&#34;x\\&#34;onmouseover=alert(1)&amp;&#39;y&#34;@example.org" in page


async def fetch(running: Running, path: str) -> str:
    async with aiohttp.ClientSession() as session:
        url = f"http://{running.http.host}:{running.http.port}{path}"
        async with session.get(url) as response:
            assert response.status == 200
            return await response.text()


# -- bidi controls and invisible characters ----------------------------------------------------

# Shown as written, `invoice\u202egpj.exe` reads "invoiceexe.jpg": each of these would make a
# name, subject or filename display something other than what it says.
INVISIBLE = set(
    "\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069\u200e\u200f\u061c"
    "\u200b\u2060\u2061\u2062\u2063\u2064\ufeff"
)
SPOOFED_FILE = "invoice\u202egpj.exe"
SPOOFED_NAME = "Ann \u202eexe.nimda\u202c \u2067Support\u2069"
SPOOFED_SUBJECT = "Refund \u200bnow\ufeff \u2066urgent\u2069 \u200fplease\u200e"
PERSIAN = "\u0645\u06cc\u200c\u062e\u0648\u0627\u0647\u0645"  # its ZWNJ is spelling: kept


def spoofing_mail() -> bytes:
    message = mail(sender=f"{SPOOFED_NAME} {PERSIAN} <ann@example.org>", subject=SPOOFED_SUBJECT)
    message.add_attachment(
        b"MZ", maintype="application", subtype="octet-stream", filename=SPOOFED_FILE
    )
    return bytes(message)


def assert_visible(text: str) -> None:
    found = sorted(f"U+{ord(c):04X}" for c in set(text) & INVISIBLE)
    assert not found, found


async def cli_output(running: Running) -> str:
    commands = [
        ("tickets", "show", "1"),
        ("tickets", "show", "1", "--json"),
        ("tickets", "list"),
        ("tickets", "list", "--json"),
        ("requesters", "list"),
        ("requesters", "show", "ann@example.org", "--json"),
    ]
    results = [await asyncio.to_thread(running.cli, *args) for args in commands]
    assert all(r.returncode == 0 for r in results), [r.stderr for r in results]
    return "\n".join(r.stdout for r in results)


async def test_cli_shows_names_subjects_and_filenames_without_bidi_controls(
    daemon: Running,
) -> None:
    await daemon.send(spoofing_mail())
    await daemon.settle()
    output = await cli_output(daemon)
    assert_visible(output)
    assert "[attachment] invoicegpj.exe" in output
    assert "Refund now urgent please" in output
    assert f"Ann exe.nimda Support {PERSIAN}" in output


def edit_store(config: Config, edit: Callable[[sqlite3.Connection, Keyring], None]) -> None:
    """Change stored rows by hand, in one transaction of the real SQLite file, sealing values
    with the store's own keys and labels (as a version that stored them so would have)."""
    keys = open_keyring(config, create=False)
    db = sqlite3.connect(config.storage.database)
    db.row_factory = sqlite3.Row
    try:
        with db:
            edit(db, keys)
    finally:
        db.close()
        keys.close()


def _key(keys: Keyring, key_id: str) -> DataKey:
    key = keys.key(key_id)
    assert key is not None
    return key


def _spoof_rows(db: sqlite3.Connection, keys: Keyring) -> None:
    owners = "SELECT t.id, p.key_id FROM tickets t JOIN people p ON p.id = t.requester_id"
    for ticket, key_id in db.execute(owners).fetchall():
        owner = _key(keys, key_id)
        db.execute(
            "UPDATE tickets SET subject = ? WHERE id = ?",
            (owner.seal_text(SPOOFED_SUBJECT, labels.SUBJECT), ticket),
        )
        messages = "SELECT id, sender_key, sender FROM messages WHERE ticket_id = ?"
        for message, sender_key, sender in db.execute(messages, (ticket,)).fetchall():
            by = _key(keys, sender_key)
            address, _name = json.loads(by.open(sender, labels.SENDER))
            db.execute(
                "UPDATE messages SET subject = ?, sender = ? WHERE id = ?",
                (
                    owner.seal_text(SPOOFED_SUBJECT, labels.SUBJECT),
                    by.seal(json.dumps([address, SPOOFED_NAME]).encode(), labels.SENDER),
                    message,
                ),
            )
            parts = "SELECT id, meta FROM attachments WHERE message_id = ?"
            for attachment, meta in db.execute(parts, (message,)).fetchall():
                opened = json.loads(owner.open(meta, labels.ATTACHMENT))
                opened["filename"] = SPOOFED_FILE
                db.execute(
                    "UPDATE attachments SET meta = ? WHERE id = ?",
                    (owner.seal(json.dumps(opened).encode(), labels.ATTACHMENT), attachment),
                )
    for person, key_id in db.execute("SELECT id, key_id FROM people").fetchall():
        db.execute(
            "UPDATE people SET name = ? WHERE id = ?",
            (_key(keys, key_id).seal_text(SPOOFED_NAME, labels.NAME), person),
        )


async def stored_as_an_earlier_version_did(config: Config) -> None:
    """Put the characters back into the stored rows, as a version before the cleaning kept them."""
    await asyncio.to_thread(edit_store, config, _spoof_rows)


def read_mails(folder: Path) -> list[EmailMessage]:
    parser = BytesParser(policy=email.policy.default)
    return [parser.parsebytes(f.read_bytes()) for f in sorted(folder.glob("*.eml"))]


async def outbox_files(folder: Path, count: int) -> list[EmailMessage]:
    """The mails in the file transport's folder, once there are `count` of them."""
    deadline = time.monotonic() + 15
    while len(mails := await asyncio.to_thread(read_mails, folder)) < count:
        assert time.monotonic() < deadline, f"{len(mails)} of {count} mails in {folder}"
        await asyncio.sleep(0.05)
    return mails


def shown(message: EmailMessage) -> str:
    """What a mail client shows of a mail: decoded headers and both bodies."""
    parts = [f"{name}: {value}" for name, value in message.items()]
    for kind in ("plain", "html"):
        body = message.get_body((kind,))
        assert body is not None
        parts.append(str(body.get_content()))
    return "\n".join(parts)


async def test_stored_bidi_controls_never_reach_the_cli_or_the_customers_mail(
    daemon: Running, tmp_path: Path
) -> None:
    """Rows stored before the cleaning: the CLI cleans them when it prints, and the agent's
    reply (To with the requester's name, "Re: subject", "Hello name") is cleaned too."""
    await daemon.send(spoofing_mail())
    outbox = daemon.config.outbound.directory
    await outbox_files(outbox, 2)  # verification and acknowledgement
    await stored_as_an_earlier_version_did(daemon.config)

    output = await cli_output(daemon)
    assert_visible(output)
    assert "[attachment] invoicegpj.exe" in output

    body = tmp_path / "reply.txt"
    body.write_text("We refunded you.\n")
    result = await asyncio.to_thread(daemon.cli, "reply", "1", "--body-file", str(body))
    assert result.returncode == 0, result.stderr
    mails = await outbox_files(outbox, 3)
    [reply] = [m for m in mails if "We refunded you." in shown(m)]
    text = shown(reply)
    assert_visible(text)
    assert "Re: Refund now urgent please" in str(reply["Subject"])
    assert "Ann exe.nimda Support" in str(reply["To"])
    assert "Hello Ann exe.nimda Support," in text
    for received in mails:
        assert_visible(shown(received))


async def test_verification_page_shows_no_bidi_controls(daemon: Running) -> None:
    """The page shows the requester's address; a stored one holding an override (addresses
    are validated, so only an earlier version's row or a hand edit could) is shown cleaned."""
    await daemon.send(spoofing_mail())
    mails = await outbox_files(daemon.config.outbound.directory, 2)
    links = [re.search(r"/verify/[A-Za-z0-9_-]+", shown(m)) for m in mails]
    [link] = [found.group(0) for found in links if found]

    def spoof_address(db: sqlite3.Connection, keys: Keyring) -> None:
        for person, key_id in db.execute("SELECT id, key_id FROM people").fetchall():
            sealed = _key(keys, key_id).seal_text("ann\u202egro.elpmaxe@example.org", labels.EMAIL)
            db.execute("UPDATE people SET email = ? WHERE id = ?", (sealed, person))

    await asyncio.to_thread(edit_store, daemon.config, spoof_address)
    page = await fetch(daemon, link)
    assert_visible(page)
    assert "anngro.elpmaxe@example.org" in page
