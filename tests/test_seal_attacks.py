"""The sealed store under attack: what a copy of the data directory, a backup taken before an
erasure, a sender and a local agent can get out of it (issue 10, security review).

Every test here reads real files: a real daemon writes them, the raw bytes of every file under
the data directory (database, WAL, shared memory, attachments) and the log are searched for
each personal value in every form it travelled in (UTF-8, the charset it was sent in, base64,
quoted-printable), and the store is read with the current keys after an erasure.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import os
import quopri
import re
import shutil
import signal
import sqlite3
import stat
import time
import urllib.parse
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.message import EmailMessage
from pathlib import Path

import aiosmtplib
import pytest

from mailgate.addresses import address_key
from mailgate.config import Config, load_config
from mailgate.errors import StoreUnavailable
from mailgate.model import Address, Envelope, ParsedMail, StoredAttachment
from mailgate.privacy.erasure import erase, finish
from mailgate.privacy.keyring import Keyring, KeyringError, read_master_key
from mailgate.privacy.sealing import CHUNK, STREAM_HEADER, Undecryptable, stream_size
from mailgate.spool import SPOOL_THRESHOLD
from mailgate.store import IngestTx, store_for
from mailgate.store.blobs import blob_path, save_blob
from mailgate.store.labels import ERASED
from mailgate.store.sqlite_raw import RawReader
from tests.conftest import SUPPORT, Relay, SubprocessDaemon, mail, run_cli, write_config

# -- the personal values and the forms they travel in -----------------------------------------


def forms(value: str, *charsets: str) -> dict[str, bytes]:
    """`value` as bytes in every form a file could hold it: each charset, and each of those in
    base64 (at the three alignments, edges cut), quoted-printable (body and header) and
    percent-encoded (RFC 2231 parameters); its first 16 characters too (a header folded or
    split into several encoded words keeps only a start whole)."""
    found: dict[str, bytes] = {}
    parts = {"": value, "start/": value[:16]} if len(value) > 20 else {"": value}
    for part, text in parts.items():
        for charset in ("utf-8", *charsets):
            try:
                raw = text.encode(charset)
            except UnicodeEncodeError:
                continue
            found[f"{part}{charset}"] = raw
            for shift in range(3):
                encoded = base64.b64encode(b"\0" * shift + raw)
                core = encoded[4 if shift else 0 : -4]
                if len(core) >= 8:
                    found[f"{part}{charset}/base64+{shift}"] = core
            if not raw.isascii():
                found[f"{part}{charset}/qp"] = quopri.encodestring(raw).replace(b"=\n", b"")
                found[f"{part}{charset}/q"] = quopri.encodestring(raw, header=True)
                found[f"{part}{charset}/pct"] = urllib.parse.quote(raw).encode()
    return found


def scan(roots: Iterable[Path], values: dict[str, dict[str, bytes]]) -> list[str]:
    """Every (file, value, form) where a form of a value is in a file's raw bytes, as they are
    or with line breaks (and quoted-printable soft breaks) taken out."""
    hits = []
    for root in roots:
        files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
        for file in files:
            data = file.read_bytes()
            joined = re.sub(rb"=?\r?\n", b"", data)
            for name, variants in values.items():
                for form, needle in variants.items():
                    if needle in data or needle in joined:
                        hits.append(f"{file.name}: {name} ({form})")
    return hits


def scan_bytes(data: bytes, values: dict[str, dict[str, bytes]]) -> set[str]:
    """The values whose forms are in `data`."""
    return {name for name, variants in values.items() if any(v in data for v in variants.values())}


def found_values(hits: list[str]) -> set[str]:
    return {hit.split(": ", 1)[1].rsplit(" (", 1)[0] for hit in hits}


def secured_config(folder: Path) -> None:
    """Keys outside the data directory, as deploy/README.md says to run it."""
    path = folder / "config.toml"
    keys = folder / "keys"
    path.write_text(
        path.read_text(encoding="utf-8") + f'\n[security]\nkey_file = "{keys / "master.key"}"\n',
        encoding="utf-8",
    )


async def settled(config: Config, within: float = 60) -> None:
    """Wait until ingest has finished every received row."""
    deadline = time.monotonic() + within
    async with store_for(config, create=False) as store:
        while await store.list_inbound("received"):
            assert time.monotonic() < deadline, "ingest did not finish"
            await asyncio.sleep(0.02)


# The requester writes in UTF-8; her Cc participant is a person of their own.
JOERG = "Jörg Übermaß"
JOERG_EMAIL = "joerg.uebermass@example.org"
SUBJECT = "Rückerstattung für Bestellung Größe XL"
BODY = "Meine Kündigungsbestätigung fehlt noch, schöne Grüße aus Köln"
HTML_PHRASE = "Öffentliche Straßenbahn Zürich"
FILENAME = "Überweisungsbeleg-Jörg.pdf"
CONTENT = b"%PDF-1.4 attachment content only Joerg has " + "Überweisung".encode() * 40
CLARA = "Clara Zweitmeinung"
CLARA_EMAIL = "clara.zweit@example.org"
CLARA_BODY = "Clara bestätigt: die Lieferung kam nie an"
# The second requester writes in ISO-8859-1.
GRETE = "Gräfin Müller"
GRETE_EMAIL = "graefin.mueller@example.org"
GRETE_SUBJECT = "Heizung in der Wohnküche"
GRETE_BODY = "Die Heizung läuft nicht, schöne Grüße aus Düsseldorf"
AGENT_TEXT = "Wir überweisen den Betrag für Jörg morgen zurück"


def joerg_mail(message_id: str = "<joerg-1@client.example>") -> EmailMessage:
    msg = mail(
        sender=f"{JOERG} <{JOERG_EMAIL}>",
        subject=SUBJECT,
        body=BODY + "\n",
        message_id=message_id,
        cc=f"{CLARA} <{CLARA_EMAIL}>",
    )
    msg.add_alternative(f"<p>{HTML_PHRASE}</p><p>{BODY}</p>", subtype="html")
    msg.add_attachment(CONTENT, maintype="application", subtype="pdf", filename=FILENAME)
    return msg


def grete_mail() -> bytes:
    return (
        "From: =?iso-8859-1?q?Gr=E4fin_M=FCller?= <graefin.mueller@example.org>\r\n"
        f"To: {SUPPORT}\r\n"
        "Subject: =?iso-8859-1?q?Heizung_in_der_Wohnk=FCche?=\r\n"
        "Message-ID: <grete-1@client.example>\r\n"
        "MIME-Version: 1.0\r\n"
        "Content-Type: text/plain; charset=iso-8859-1\r\n"
        "Content-Transfer-Encoding: 8bit\r\n"
        "\r\n"
        f"{GRETE_BODY}\r\n"
    ).encode("latin-1")


def personal_values(**extra: str) -> dict[str, dict[str, bytes]]:
    values = {
        "joerg": forms(JOERG, "latin-1"),
        "joerg email": forms(JOERG_EMAIL),
        "subject": forms(SUBJECT, "latin-1"),
        "body": forms(BODY, "latin-1"),
        "html": forms(HTML_PHRASE, "latin-1"),
        "filename": forms(FILENAME, "latin-1"),
        "content": {"raw": CONTENT[:60], "base64": base64.b64encode(CONTENT)[8:80]},
        "clara": forms(CLARA),
        "clara email": forms(CLARA_EMAIL),
        "clara body": forms(CLARA_BODY, "latin-1"),
        "grete": forms(GRETE, "latin-1"),
        "grete email": forms(GRETE_EMAIL),
        "grete subject": forms(GRETE_SUBJECT, "latin-1"),
        "grete body": forms(GRETE_BODY, "latin-1"),
        "agent reply": forms(AGENT_TEXT, "latin-1"),
    }
    values.update({name: forms(value) for name, value in extra.items()})
    return values


# -- a real daemon, real mail -----------------------------------------------------------------


async def send(port: int, message: EmailMessage | bytes, sender: str) -> str:
    errors, reply = await aiosmtplib.send(
        message, sender=sender, recipients=[SUPPORT], hostname="127.0.0.1", port=port
    )
    assert not errors, errors
    return reply.rsplit(" ", 1)[1]


async def outbox_done(config: Config, within: float = 60) -> None:
    deadline = time.monotonic() + within
    async with store_for(config, create=False) as store:
        while await store.list_outbox("queued") or await store.list_outbox("sending"):
            assert time.monotonic() < deadline, "the outbox did not finish"
            await asyncio.sleep(0.05)


@dataclass
class World:
    """What `populate` sent: queue ids by name, the raw mails, Jörg's verification token."""

    ids: dict[str, str] = field(default_factory=dict)
    sent: list[bytes] = field(default_factory=list)
    token: str = ""
    ticket: int = 0

    async def send(self, port: int, name: str, message: EmailMessage | bytes, sender: str) -> None:
        raw = message if isinstance(message, bytes) else message.as_bytes()
        self.sent.append(raw)
        self.ids[name] = await send(port, raw, sender)


async def populate(daemon: SubprocessDaemon, relay: Relay) -> World:
    """Jörg (UTF-8, HTML, an attachment, Clara in Cc) writes the same mail twice (an SMTP
    retry), Grete writes in ISO-8859-1, Clara answers on Jörg's ticket, an agent answers Jörg
    through the relay (Clara in Cc)."""
    config, world = daemon.config, World()
    first = joerg_mail().as_bytes()
    await world.send(daemon.port, "joerg", first, JOERG_EMAIL)
    await world.send(daemon.port, "joerg again", first, JOERG_EMAIL)
    await world.send(daemon.port, "grete", grete_mail(), GRETE_EMAIL)
    await settled(config)
    async with store_for(config, create=False) as store:
        [ticket] = [t for t in await store.list_tickets() if t.requester.email == JOERG_EMAIL]
    world.ticket = ticket.id
    clara = mail(
        sender=f"{CLARA} <{CLARA_EMAIL}>", subject=f"Re: [#{ticket.id}] {SUBJECT}", body=CLARA_BODY
    )
    await world.send(daemon.port, "clara", clara.as_bytes(), CLARA_EMAIL)
    await world.send(daemon.port, "clara again", clara.as_bytes(), CLARA_EMAIL)
    agent = mail(
        sender="Agent <agent@example.com>", subject=f"Re: [#{ticket.id}] x", body=AGENT_TEXT
    )
    # Clara's mailbox is gone: the relay says so, naming her, on Jörg's ticket.
    relay.refuse[CLARA_EMAIL] = f"550 5.1.1 <{CLARA_EMAIL}>: mailbox unavailable"
    await world.send(daemon.port, "agent", agent, "agent@example.com")
    await settled(config)
    await outbox_done(config)
    [verification] = [
        r for r in relay.received if JOERG_EMAIL in r.rcpt_tos and "/verify/" in r.text()
    ]
    found = re.search(r"/verify/([A-Za-z0-9_-]+)", verification.text())
    assert found is not None
    world.token = found.group(1)
    [reply] = [r for r in relay.received if AGENT_TEXT in r.text()]
    assert reply.rcpt_tos == [JOERG_EMAIL] and CLARA_EMAIL in reply.message["Cc"]
    return world


def start(folder: Path, relay: Relay) -> SubprocessDaemon:
    daemon = SubprocessDaemon(folder, relay_port=relay.port, log_level="info")
    secured_config(folder)
    daemon.start()
    return daemon


async def test_no_personal_value_is_in_clear_in_any_file_or_log_line(
    tmp_path: Path, relay: Relay
) -> None:
    daemon = start(tmp_path / "d", relay)
    try:
        world = await populate(daemon, relay)
        values = personal_values(token=world.token)
        # The search finds every value in what went over the wire (it can fail).
        wire = tmp_path / "wire.eml"
        wire.write_bytes(b"".join([*(r.raw for r in relay.received), *world.sent]))
        assert found_values(scan([wire], values)) == set(values)
        running = tmp_path / "copy"  # what a copy of the live data directory holds
        shutil.copytree(daemon.folder / "var", running)
        assert scan([running, daemon.folder / "daemon.log"], values) == []
    finally:
        daemon.kill(signal.SIGTERM)
    assert scan([daemon.folder / "var", daemon.folder / "daemon.log"], values) == []


# -- erasure ----------------------------------------------------------------------------------


async def readable(config: Config, *, raw: bool = True) -> bytes:
    """Everything the store shows with the current keys: tickets with their messages and
    attachment files, outgoing mail, requesters, and every inbound row (with its raw message,
    unless `raw` is false)."""
    shown: list[object] = []
    contents: list[bytes] = []
    async with store_for(config, create=False) as store:
        for summary in await store.list_tickets():
            ticket = await store.get_ticket(summary.id)
            shown.append(ticket)
            for message in ticket.messages if ticket else ():
                for attachment in message.attachments:
                    content = await store.attachment_content(
                        attachment.id or 0, config.storage.attachments
                    )
                    contents.append(content or b"")
        shown += [*await store.list_outbox(), *await store.list_requesters()]
        for state in ("received", "ingested", "quarantined"):
            for row in await store.list_inbound(state):
                shown.append(row)
                if raw:
                    contents.append(await store.read_raw(row.id) or b"")
    return repr(shown).encode() + b"\n".join(contents)


def joergs(world: World) -> dict[str, dict[str, bytes]]:
    """What is Jörg's: who he is and everything on his ticket."""
    values = personal_values(token=world.token)
    return {k: v for k, v in values.items() if not k.startswith(("clara", "grete"))}


def claras() -> dict[str, dict[str, bytes]]:
    """Who Clara is (what she wrote on Jörg's ticket is his record, and stays)."""
    return {"clara": forms(CLARA), "clara email": forms(CLARA_EMAIL)}


async def erased(config: Config, email: str) -> None:
    async with store_for(config, create=False) as store:
        assert await erase(store, email, config.storage.attachments) is not None


async def populated(folder: Path, relay: Relay) -> tuple[Config, World]:
    daemon = start(folder, relay)
    try:
        world = await populate(daemon, relay)
    finally:
        daemon.kill(signal.SIGTERM)
    return daemon.config, world


def showing(data: bytes, values: dict[str, dict[str, bytes]], at: Path) -> set[str]:
    at.write_bytes(data)
    return found_values(scan([at], values))


async def populated_store(folder: Path) -> tuple[Config, World]:
    """Jörg's ticket with a message, written through the store (no daemon needed)."""
    write_config(folder)
    secured_config(folder)
    config = load_config(folder / "config.toml")
    now = datetime.now(UTC)
    raw = joerg_mail().as_bytes()
    envelope = Envelope(JOERG_EMAIL, (SUPPORT,), "127.0.0.1:2525", "client.example")
    parsed = ParsedMail(
        sender=Address(JOERG_EMAIL, JOERG), to=(), cc=(), subject=SUBJECT,
        message_id="joerg-1@client.example", in_reply_to=(), references=(), body_text=BODY,
        body_html=None,
    )  # fmt: skip

    def work(tx: IngestTx) -> int:
        ticket = tx.create_ticket(SUBJECT, Address(JOERG_EMAIL, JOERG), at=now)
        tx.add_message(ticket, parsed, inbound_id="Q1", reason="new", attachments=(), at=now)
        tx.finish_inbound("Q1", "ingested", reason=None, at=now)
        return ticket

    async with store_for(config) as store:
        await store.receive([("Q1", envelope, raw)])
        return config, World(ids={"joerg": "Q1"}, sent=[raw], ticket=await store.ingest(work))


async def test_after_an_erasure_no_read_of_the_store_shows_the_person(
    tmp_path: Path, relay: Relay
) -> None:
    """Jörg's repeated mail (an SMTP client that never saw the 250 sends again) is stored
    once; its second copy's raw message and envelope must go with him too."""
    config, world = await populated(tmp_path / "d", relay)
    # Before, every value of his is there to read (only the token's hash is kept once sent).
    before = showing(await readable(config), joergs(world), tmp_path / "before")
    assert before == set(joergs(world)) - {"token"}
    await erased(config, JOERG_EMAIL)
    assert showing(await readable(config), joergs(world), tmp_path / "after") == set()
    async with store_for(config, create=False) as store:
        assert await store.get_inbound(world.ids["joerg again"]) is None
        assert await store.get_inbound(world.ids["grete"]) is not None  # others keep theirs


async def test_erasing_a_participant_leaves_nothing_on_other_tickets_that_names_her(
    tmp_path: Path, relay: Relay
) -> None:
    """Clara wrote on Jörg's ticket, was in Cc of the agent's answer, and the relay refused
    her address (a note on the ticket, its reply on the outbox row)."""
    config, world = await populated(tmp_path / "d", relay)
    assert showing(await readable(config, raw=False), claras(), tmp_path / "before") == set(
        claras()
    )
    await erased(config, CLARA_EMAIL)
    # Jörg's own raw mail still names her in its Cc header: his record, kept as long as raw
    # mail is; every other read shows her as erased.
    assert showing(await readable(config, raw=False), claras(), tmp_path / "after") == set()
    async with store_for(config, create=False) as store:
        assert await store.get_inbound(world.ids["clara"]) is None  # her envelope too
        assert await store.get_inbound(world.ids["clara again"]) is None  # and her repeat
        assert await store.get_inbound(world.ids["joerg again"]) is not None  # not Jörg's
        ticket = await store.get_ticket(world.ticket)
        assert ticket is not None
        assert CLARA_BODY in [m.body_text for m in ticket.messages]  # Jörg's record stays
        notes = [m.body_text for m in ticket.messages if m.author == "system"]
        assert notes and all(ERASED in note for note in notes)


async def test_a_backup_from_before_an_erasure_shows_nothing_of_the_person(
    tmp_path: Path, relay: Relay
) -> None:
    """A copy of the data directory taken before Jörg's erasure, restored after it and opened
    with the current key store (by mailgate, or read directly by anyone holding the keys)."""
    config, world = await populated(tmp_path / "d", relay)
    data = config.storage.database.parent
    backup = tmp_path / "backup"
    shutil.copytree(data, backup)
    await erased(config, JOERG_EMAIL)
    # Read directly, with the current keys but without mailgate's reconciliation.
    async with store_for(config, create=False) as store:
        ids = [row[0] for row in sqlite3.connect(backup / "mailgate.db").execute(
            "SELECT id FROM inbound"
        )]  # fmt: skip
        reader = RawReader(backup / "mailgate.db", store.keys)
        direct = b"\n".join(reader.read(i) or b"" for i in ids)
        reader.close()
    assert showing(direct, joergs(world), tmp_path / "direct") == set()
    # Restored and opened by mailgate.
    shutil.rmtree(data)
    shutil.copytree(backup, data)
    assert showing(await readable(config), joergs(world), tmp_path / "restored") == set()


async def test_mail_waiting_for_ingest_at_an_erasure_does_not_bring_the_person_back(
    tmp_path: Path, relay: Relay
) -> None:
    """Mail of Jörg's accepted before his erasure and not yet ingested (its sender checks
    deferred, the daemon stopped) is erased with him, not made into a ticket afterwards."""
    config, world = await populated(tmp_path / "d", relay)
    envelope = Envelope(JOERG_EMAIL, (SUPPORT,), "127.0.0.1:2525", "client.example")
    later = mail(sender=f"{JOERG} <{JOERG_EMAIL}>", subject="Noch eine Frage", body=BODY)
    async with store_for(config, create=False) as store:
        await store.receive([("LATE1", envelope, later.as_bytes())])
    await erased(config, JOERG_EMAIL)
    daemon = start(tmp_path / "d", relay)
    try:
        await settled(config)
    finally:
        daemon.kill(signal.SIGTERM)
    async with store_for(config, create=False) as store:
        assert await store.get_requester(JOERG_EMAIL) is None
        assert await store.get_inbound("LATE1") is None
    assert showing(await readable(config), joergs(world), tmp_path / "after") == set()


async def test_quarantined_mail_of_the_person_goes_with_them(tmp_path: Path) -> None:
    """Mail that ingest could not use waits in quarantine for an agent, owned by no ticket;
    its envelope sender says whose it is."""
    write_config(tmp_path)
    secured_config(tmp_path)
    config = load_config(tmp_path / "config.toml")
    envelope = Envelope(JOERG_EMAIL, (SUPPORT,), "127.0.0.1:2525", "client.example")
    other = Envelope(GRETE_EMAIL, (SUPPORT,), "127.0.0.1:2525", "client.example")
    broken = f"From: {JOERG} <{JOERG_EMAIL}>\r\nSubject: {SUBJECT}\r\n\r\n{BODY}".encode()
    now = datetime.now(UTC)

    def quarantine(tx: IngestTx) -> None:
        tx.create_ticket(SUBJECT, Address(JOERG_EMAIL, JOERG), at=now)  # he is a requester
        for queue_id in ("BAD1", "BAD2"):
            tx.finish_inbound(queue_id, "quarantined", reason="parser failed: X", at=now)

    async with store_for(config) as store:
        await store.receive([("BAD1", envelope, broken), ("BAD2", other, b"x")])
        await store.ingest(quarantine)
        assert await store.read_raw("BAD1") == broken
        assert await erase(store, JOERG_EMAIL, config.storage.attachments) is not None
        assert await store.get_inbound("BAD1") is None
        assert await store.get_inbound("BAD2") is not None


# -- large mail while it arrives --------------------------------------------------------------


def spool_files(pid: int, data: Path) -> list[Path]:
    """The unnamed files the daemon holds open in the data directory (its spool files)."""
    found = []
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith(str(data)) and target.endswith("(deleted)"):
            found.append(fd)
    return found


async def test_a_large_mail_is_not_in_clear_in_its_spool_file(tmp_path: Path) -> None:
    """A message past the spool threshold goes to an unnamed file in the database's folder
    as it arrives (minutes, for a slow client): what reaches the disk there is sealed too."""
    daemon = SubprocessDaemon(tmp_path / "d", max_message_size=8 * 1024 * 1024)
    secured_config(daemon.folder)
    daemon.start()
    line = f"{BODY} {JOERG} {JOERG_EMAIL}\r\n".encode()
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", daemon.port)
        await reader.readline()
        for command in (b"EHLO client.example", f"MAIL FROM:<{JOERG_EMAIL}>".encode(),
                        f"RCPT TO:<{SUPPORT}>".encode(), b"DATA"):  # fmt: skip
            writer.write(command + b"\r\n")
            while (answer := await reader.readline())[3:4] == b"-":
                pass
            assert answer[:1] in (b"2", b"3"), answer
        writer.write(f"From: {JOERG} <{JOERG_EMAIL}>\r\nSubject: big\r\n\r\n".encode())
        lines = 2 * SPOOL_THRESHOLD // len(line)
        writer.write(line * lines)
        await writer.drain()
        data = (daemon.folder / "var").resolve()
        deadline = time.monotonic() + 30
        spooled = b""
        while len(spooled) < SPOOL_THRESHOLD:  # the session writes it out in pieces
            assert time.monotonic() < deadline, "no spool file"
            assert daemon.proc is not None
            spooled = max((p.read_bytes() for p in spool_files(daemon.proc.pid, data)), key=len,
                          default=b"")  # fmt: skip
            await asyncio.sleep(0.05)
        assert scan_bytes(spooled, {"body": forms(BODY), "joerg": forms(JOERG),
                                    "joerg email": forms(JOERG_EMAIL)}) == set()  # fmt: skip
        writer.write(b".\r\n")
        assert (await reader.readline()).startswith(b"250 2.0.0 Queued as ")
        writer.close()
        await settled(daemon.config)
        async with store_for(daemon.config, create=False) as store:
            [ticket] = await store.list_tickets()  # what arrived is whole
            full = await store.get_ticket(ticket.id)
            assert full is not None and full.messages[0].body_text.count(BODY) == lines
    finally:
        daemon.kill(signal.SIGTERM)


# -- the key store and the master key ---------------------------------------------------------


async def test_a_destroyed_key_leaves_no_copy_in_the_key_store_file_even_while_it_is_read(
    tmp_path: Path,
) -> None:
    """An erasure while something reads the key store (a backup with `sqlite3 .backup`, as
    deploy/README.md says to make them): the wrapped key's page cannot be overwritten then.
    The erasure must not report success with the key still in the file."""
    config, world = await populated_store(tmp_path)
    keystore = config.security.keystore
    async with store_for(config, create=False) as store:
        person = await store.begin_erasure(JOERG_EMAIL)
        assert person is not None
        [wrapped] = (
            sqlite3.connect(keystore)
            .execute("SELECT wrapped FROM data_keys WHERE key_id = ?", (person.key_id,))
            .fetchone()
        )
        backup = sqlite3.connect(keystore, isolation_level=None)
        backup.execute("BEGIN")
        backup.execute("SELECT count(*) FROM data_keys").fetchone()  # a read under way
        store.keys._db.execute("PRAGMA busy_timeout = 100")  # not the 30 s it waits, here
        try:
            await erase(store, JOERG_EMAIL, config.storage.attachments)
        except KeyringError:
            pass  # not finished: the person is still marked, and erasing again finishes it
        holding = b"".join(p.read_bytes() for p in keystore.parent.glob(keystore.name + "*"))
        backup.execute("COMMIT")
        backup.close()
        finished = await store.get_requester(JOERG_EMAIL) is None
        assert not (finished and bytes(wrapped) in holding), "erased, key still in the file"
        if not finished:
            assert await erase(store, JOERG_EMAIL, config.storage.attachments) is not None
    files = b"".join(p.read_bytes() for p in keystore.parent.glob(keystore.name + "*"))
    assert bytes(wrapped) not in files
    assert world.ticket


def test_the_key_store_is_readable_by_its_owner_only(tmp_path: Path) -> None:
    keys = Keyring.open(tmp_path / "keys" / "master.key", tmp_path / "keys" / "ks.sqlite",
                        create=True)  # fmt: skip
    keys.new_key()
    files = sorted(p for p in (tmp_path / "keys").iterdir() if p.suffix != ".lock")  # empty
    assert [p.name for p in files] == ["ks.sqlite", "ks.sqlite-shm", "ks.sqlite-wal", "master.key"]
    assert {p.name: stat.S_IMODE(p.stat().st_mode) for p in files} == {p.name: 0o600 for p in files}
    keys.close()


@pytest.mark.parametrize(
    "content",
    [
        b"correct horse battery staple 123",  # a passphrase of 32 characters
        b"00112233445566778899aabbccddeeff",  # a 128-bit key in hex, no newline
        b" " * 32,
    ],
)
def test_a_master_key_file_of_text_is_refused(tmp_path: Path, content: bytes) -> None:
    """32 bytes are taken as a raw key; 32 bytes of text are not a random key (a
    passphrase: a dictionary away, checked offline against the fingerprint every wrapped
    message key in the database carries)."""
    assert len(content) == 32
    path = tmp_path / "master.key"
    path.write_bytes(content)
    with pytest.raises(KeyringError, match="not a master key"):
        read_master_key(path)
    path.write_bytes(os.urandom(32))
    assert len(read_master_key(path)) == 32  # raw bytes still do
    path.write_bytes(os.urandom(32).hex().encode() + b"\n")
    assert len(read_master_key(path)) == 32  # and what keygen writes


def test_check_config_warns_of_keys_and_clear_mail_beside_the_data(tmp_path: Path) -> None:
    """deploy/README.md: check-config warns when the key file or the key store is in the data
    directory (a copy of it then carries the keys, and erasure reaches no backup of it): a
    key file set to a path in there too, not only the default. And of a key file others may
    read, and of the file transport, which writes each outgoing mail in clear, outside the
    store and its erasure."""
    inside = write_config(tmp_path / "inside")
    data = (tmp_path / "inside" / "var").resolve()
    inside.write_text(
        inside.read_text(encoding="utf-8") + f'\n[security]\nkey_file = "{data / "my.key"}"\n',
        encoding="utf-8",
    )
    warned = run_cli("--config", str(inside), "check-config")
    assert warned.returncode == 0, warned.stderr
    assert f"the master key ({data / 'my.key'}) is inside the data directory" in warned.stdout
    assert f"the key store ({data / 'keystore.sqlite'}) is inside" in warned.stdout
    assert f"the file transport writes outgoing mail in clear to {data / 'outbox'}" in (
        warned.stdout
    )
    secured = write_config(tmp_path / "secured", relay_port=2525)
    secured_config(tmp_path / "secured")
    keys = Keyring.open(tmp_path / "secured" / "keys" / "master.key",
                        tmp_path / "secured" / "keys" / "keystore.sqlite", create=True)  # fmt: skip
    keys.close()
    quiet = run_cli("--config", str(secured), "check-config")
    assert quiet.returncode == 0, quiet.stderr
    assert "warning" not in quiet.stdout, quiet.stdout
    (tmp_path / "secured" / "keys" / "master.key").chmod(0o644)
    loose = run_cli("--config", str(secured), "check-config")
    assert "master.key) can be read by others than its owner (mode 0644)" in loose.stdout


# -- what a sender can make the daemon do -----------------------------------------------------


async def test_one_content_attached_many_times_is_written_once(tmp_path: Path) -> None:
    """A sender attaches the same bytes 300 times (the parser reads up to 1000 parts): each
    copy was a file of its own, sealed and fsynced twice, the duplicates garbage that only
    a sweep (not run by the daemon) would remove."""
    daemon = SubprocessDaemon(tmp_path / "d")
    secured_config(daemon.folder)
    daemon.start()
    message = mail(sender=f"{JOERG} <{JOERG_EMAIL}>", subject="many", body="see attached")
    for n in range(300):
        message.add_attachment(b"the same bytes", maintype="application", subtype="octet-stream",
                               filename=f"copy-{n}.bin")  # fmt: skip
    message.add_attachment(CONTENT, maintype="application", subtype="pdf", filename=FILENAME)
    try:
        await send(daemon.port, message, JOERG_EMAIL)
        await settled(daemon.config)
    finally:
        daemon.kill(signal.SIGTERM)
    config = daemon.config
    files = [p for p in config.storage.attachments.rglob("*") if p.is_file()]
    async with store_for(config, create=False) as store:
        [ticket] = await store.list_tickets()
        full = await store.get_ticket(ticket.id)
        assert full is not None
        attachments = full.messages[0].attachments
        assert len(attachments) == 301
        contents = {await store.attachment_content(a.id or 0, config.storage.attachments)
                    for a in attachments}  # fmt: skip
        assert contents == {b"the same bytes", CONTENT}
        assert await store.blob_names() == {p.name for p in files}
    assert len(files) == 2


async def test_mail_during_an_erasure_beside_a_running_daemon_leaves_nothing_behind(
    tmp_path: Path, relay: Relay
) -> None:
    """The daemon keeps unwrapped keys in its cache; another process erases Jörg while he
    writes again. What the daemon makes of that mail (under the key it still holds, or, the
    key gone, nothing) goes with the erasure; mail after it makes a new person, new key."""
    daemon = start(tmp_path / "d", relay)
    try:
        world = await populate(daemon, relay)
        config = daemon.config
        async with store_for(config, create=False) as store:
            person = await store.begin_erasure(JOERG_EMAIL)
            assert person is not None
            store.keys.destroy([person.key_id])  # the daemon's cache still holds it
            reply = mail(sender=f"{JOERG} <{JOERG_EMAIL}>", body=BODY,
                         subject=f"Re: [#{world.ticket}] {SUBJECT}")  # fmt: skip
            fresh = mail(sender=f"{JOERG} <{JOERG_EMAIL}>", subject=SUBJECT, body=BODY)
            fresh.add_attachment(CONTENT, maintype="application", subtype="pdf",
                                 filename=FILENAME)  # fmt: skip
            await send(daemon.port, reply, JOERG_EMAIL)
            await send(daemon.port, fresh, JOERG_EMAIL)
            await settled(config)
            await outbox_done(config)
            await finish(store, person, config.storage.attachments)
        db = sqlite3.connect(config.storage.database)
        for sql in (
            "SELECT count(*) FROM people WHERE key_id = ?",
            "SELECT count(*) FROM inbound WHERE owner_key = ?",
            "SELECT count(*) FROM messages WHERE sender_key = ?",
        ):
            assert db.execute(sql, (person.key_id,)).fetchone() == (0,), sql
        assert db.execute("SELECT count(*) FROM people WHERE state = 'erasing'").fetchone() == (0,)
        db.close()
        assert showing(await readable(config), joergs(world), tmp_path / "after") == set()
        db = sqlite3.connect(config.storage.database)
        assert db.execute(
            "SELECT count(*) FROM blobs WHERE owner_id = ?", (person.id,)
        ).fetchone() == (0,)
        db.close()
        await send(daemon.port, mail(sender=f"{JOERG} <{JOERG_EMAIL}>", body="Neu"), JOERG_EMAIL)
        await settled(config)
        async with store_for(config, create=False) as store:
            again = await store.get_requester(JOERG_EMAIL)
            assert again is not None and again.email == JOERG_EMAIL
            [key_id] = (
                sqlite3.connect(config.storage.database)
                .execute(
                    "SELECT key_id FROM people WHERE blind = ?", (store.keys.blind(JOERG_EMAIL),)
                )
                .fetchone()
            )
            assert key_id != person.key_id and store.keys.key(key_id) is not None
    finally:
        daemon.kill(signal.SIGTERM)


# -- the seals themselves: what an attacker who can change the files gets -----------------------


async def test_a_raw_message_altered_chunk_by_chunk_does_not_open(tmp_path: Path) -> None:
    """Real sealed bytes of a raw message of four 64 KiB chunks, cut at a chunk boundary,
    with a chunk dropped, swapped or repeated, spliced onto another message's header: each
    reads as absent (whole or by its head), never as other bytes."""
    write_config(tmp_path)
    secured_config(tmp_path)
    config = load_config(tmp_path / "config.toml")
    envelope = Envelope(JOERG_EMAIL, (SUPPORT,), "127.0.0.1:2525", "client.example")
    raw = os.urandom(3 * CHUNK + 1000)
    other = os.urandom(3 * CHUNK + 1000)
    async with store_for(config) as store:
        await store.receive([("R1", envelope, raw), ("R2", envelope, other)])
    db = sqlite3.connect(config.storage.database, isolation_level=None)
    sealed = bytes(db.execute("SELECT raw FROM inbound WHERE id = 'R1'").fetchone()[0])
    foreign = bytes(db.execute("SELECT raw FROM inbound WHERE id = 'R2'").fetchone()[0])
    step = CHUNK + 16
    head, body = sealed[:STREAM_HEADER], sealed[STREAM_HEADER:]
    chunks = [body[i : i + step] for i in range(0, len(body), step)]
    assert len(sealed) == stream_size(len(raw)) and len(chunks) == 4
    altered = {
        "cut at a chunk boundary": head + b"".join(chunks[:3]),
        "a middle chunk dropped": head + b"".join([chunks[0], chunks[2], chunks[3]]),
        "two chunks swapped": head + b"".join([chunks[1], chunks[0], *chunks[2:]]),
        "the last chunk repeated": head + b"".join([*chunks, chunks[3]]),
        "a chunk appended": head + b"".join(chunks) + chunks[0],
        "another header": foreign[:STREAM_HEADER] + body,
        "a byte cut": sealed[:-1],
        "a bit flipped": sealed[:-5] + bytes([sealed[-5] ^ 1]) + sealed[-4:],
        "another message": foreign,
    }
    async with store_for(config) as store:
        assert await store.read_raw("R1") == raw
        for what, value in altered.items():
            db.execute("UPDATE inbound SET raw = ? WHERE id = 'R1'", (value,))
            assert await store.read_raw("R1") is None, what
            head_read = await store.read_raw("R1", limit=100)
            assert head_read is None or head_read == raw[:100], what
        db.execute("UPDATE inbound SET raw = ? WHERE id = 'R1'", (sealed,))
        assert await store.read_raw("R1") == raw
    db.close()


async def test_an_attachment_file_altered_does_not_open(tmp_path: Path) -> None:
    config, _world = await populated_store(tmp_path)
    content = os.urandom(2 * CHUNK + 10)
    name, key, digest = save_blob(config.storage.attachments, content)
    stored = StoredAttachment("a.bin", "application/octet-stream", len(content), digest, False,
                              name, key)  # fmt: skip
    parsed = ParsedMail(sender=Address(JOERG_EMAIL, JOERG), to=(), cc=(), subject="s",
                        message_id="a@x", in_reply_to=(), references=(), body_text="b",
                        body_html=None)  # fmt: skip
    now = datetime.now(UTC)
    async with store_for(config) as store:
        await store.ingest(
            lambda tx: tx.add_message(
                1, parsed, inbound_id=None, reason="new", attachments=[stored], at=now
            )
        )
        ticket = await store.get_ticket(1)
        assert ticket is not None
        [attachment] = ticket.messages[-1].attachments
        root = config.storage.attachments
        assert await store.attachment_content(attachment.id or 0, root) == content
        path = blob_path(root, name)
        sealed = path.read_bytes()
        for value in (sealed[: STREAM_HEADER + CHUNK + 16], sealed + sealed[-16:], sealed[:-1]):
            path.write_bytes(value)
            with pytest.raises(Undecryptable):
                await store.attachment_content(attachment.id or 0, root)


async def test_a_sealed_value_moved_to_another_person_or_column_does_not_open(
    tmp_path: Path,
) -> None:
    """Each person's values are under their own key and each column's label is the seal's
    associated data. (Two values of one person in one column, say the subjects of two of
    their tickets, can be swapped: only someone who can write the database can do that, and
    they hold the CLI's keys already.)"""
    config, _world = await populated_store(tmp_path)
    now = datetime.now(UTC)
    async with store_for(config) as store:
        grete = await store.ingest(
            lambda tx: tx.create_ticket(GRETE_SUBJECT, Address(GRETE_EMAIL, GRETE), at=now)
        )
    db = sqlite3.connect(config.storage.database, isolation_level=None)
    [(subject,)] = db.execute("SELECT subject FROM tickets WHERE id = 1").fetchall()
    [(grete_subject,)] = db.execute("SELECT subject FROM tickets WHERE id = ?", (grete,))
    db.execute("UPDATE tickets SET subject = ? WHERE id = ?", (subject, grete))
    async with store_for(config) as store:
        with pytest.raises(Undecryptable):
            await store.get_ticket(grete)  # Jörg's subject on Grete's ticket
        db.execute("UPDATE tickets SET subject = ? WHERE id = ?", (grete_subject, grete))
        [(name,)] = db.execute("SELECT name FROM people WHERE id = 1").fetchall()
        db.execute("UPDATE people SET name = ? WHERE id = 1", (subject,))
        with pytest.raises(Undecryptable):
            await store.get_requester(JOERG_EMAIL)  # his subject as his name
        db.execute("UPDATE people SET name = ? WHERE id = 1", (name,))
        assert (await store.get_requester(JOERG_EMAIL)) is not None
    db.close()
    keystore = sqlite3.connect(config.security.keystore, isolation_level=None)
    rows = keystore.execute("SELECT key_id, wrapped FROM data_keys LIMIT 2").fetchall()
    (first, first_wrapped), (second, second_wrapped) = rows
    keystore.execute("UPDATE data_keys SET wrapped = ? WHERE key_id = ?", (second_wrapped, first))
    keystore.close()
    keys = Keyring.open(config.security.key_file, config.security.keystore)
    with pytest.raises(KeyringError, match="does not open"):
        keys.key(first)  # another key's wrapping under this id
    wrapped = keys.message_key()[1]
    unknown = b"0" * 16 + wrapped[16:]
    with pytest.raises(KeyringError, match="another master key"):
        keys.unwrap_message_key(unknown)  # the fingerprint names no master key we hold
    with pytest.raises(KeyringError, match="does not open"):
        keys.unwrap_message_key(wrapped[:-1] + bytes([wrapped[-1] ^ 1]))  # altered
    keys.close()
    assert second and first_wrapped


async def test_every_sealed_value_has_its_own_nonce_and_the_blind_index_needs_the_key_store(
    tmp_path: Path, relay: Relay
) -> None:
    """In a database a daemon wrote: no two sealed values share a nonce (or two streams a
    prefix), and the blind index of an address is no hash anyone could compute from a guess
    without the key store (another key store gives another one)."""
    config, _world = await populated(tmp_path / "d", relay)
    db = sqlite3.connect(config.storage.database)
    columns = {
        "people": ("email", "name"), "tickets": ("subject",),
        "messages": ("sender", "subject", "body_text", "body_html", "auth"),
        "attachments": ("meta",), "blobs": ("key",), "outbox": ("mail", "reply", "last_error"),
        "inbound": ("envelope", "raw_key", "raw"),
    }  # fmt: skip
    nonces: list[bytes] = []
    for table, names in columns.items():
        for name in names:
            for (value,) in db.execute(f"SELECT {name} FROM {table} WHERE {name} IS NOT NULL"):  # noqa: S608
                value = bytes(value)
                if value[:1] == b"\x02":  # a stream: its nonce prefix
                    nonces.append(value[:STREAM_HEADER])
                else:  # a value (under the master key: after the fingerprint)
                    start = 16 if value[:1] != b"\x01" else 0
                    assert value[start : start + 1] == b"\x01", (table, name)
                    nonces.append(value[start : start + 13])
    assert len(nonces) > 40 and len(set(nonces)) == len(nonces)
    stored = {bytes(row[0]) for row in db.execute("SELECT blind FROM people")}
    db.close()
    key = address_key(JOERG_EMAIL).encode()
    guesses = {
        hashlib.sha256(key).digest(), hashlib.sha256(JOERG_EMAIL.encode()).digest(),
        hmac.new(b"", key, hashlib.sha256).digest(),
    }  # fmt: skip
    assert not guesses & stored
    keys = Keyring.open(config.security.key_file, config.security.keystore)
    assert keys.blind(JOERG_EMAIL) in stored  # with the key store it is found
    other = Keyring.open(tmp_path / "o" / "master.key", tmp_path / "o" / "ks.sqlite", create=True)
    assert other.blind(JOERG_EMAIL) not in stored
    keys.close()
    other.close()


async def test_a_wrong_key_file_path_does_not_make_a_new_key_store_for_an_existing_database(
    tmp_path: Path,
) -> None:
    """`[security] key_file` pointing at a folder that is not there (a typo, a volume not
    mounted): with no key store there, mailgate made a new master key and key store at start,
    every person read as erased and their new mail made a second person under other keys."""
    await populated_store(tmp_path)
    path = tmp_path / "config.toml"
    path.write_text(
        path.read_text(encoding="utf-8").replace("/keys/master.key", "/keyz/master.key"),
        encoding="utf-8",
    )
    result = run_cli("--config", str(path), "serve")
    assert result.returncode == 78, (result.returncode, result.stderr)
    assert "keystore.sqlite" in result.stderr and "people" in result.stderr
    assert not (tmp_path / "keyz").exists()
    fresh = tmp_path / "fresh"  # a new installation still makes its keys at first start
    write_config(fresh)
    async with store_for(load_config(fresh / "config.toml")) as store:
        assert await store.list_tickets() == []
    assert (fresh / "var" / "keystore.sqlite").exists()


async def test_an_answer_queued_with_an_erased_participant_in_cc_still_reaches_the_requester(
    tmp_path: Path, relay: Relay
) -> None:
    """The agent answers Jörg with Clara in Cc while the relay is down; Clara is erased before
    it comes back. The erasure leaves `[erased]` in the queued mail's Cc: the answer must
    still go to Jörg (it failed to compose, for good, and he never got it)."""
    daemon = start(tmp_path / "d", relay)
    config = daemon.config
    try:
        await send(daemon.port, joerg_mail(), JOERG_EMAIL)
        await settled(config)
        await outbox_done(config)
        await relay.stop()
        agent = mail(sender="Agent <agent@example.com>", subject="Re: [#1] x", body=AGENT_TEXT)
        await send(daemon.port, agent, "agent@example.com")
        await settled(config)
    finally:
        daemon.kill(signal.SIGTERM)
    async with store_for(config, create=False) as store:
        [queued] = [r for r in await store.list_outbox() if r.item.kind == "agent_reply"]
        assert queued.state == "queued" and queued.item.cc == (CLARA_EMAIL,)
    await erased(config, CLARA_EMAIL)
    await relay.start()
    daemon = start(tmp_path / "d", relay)
    try:
        await outbox_done(config)
    finally:
        daemon.kill(signal.SIGTERM)
    [answer] = [r for r in relay.received if AGENT_TEXT in r.text()]
    assert answer.rcpt_tos == [JOERG_EMAIL] and answer.message["Cc"] is None
    async with store_for(config, create=False) as store:
        [sent] = [r for r in await store.list_outbox() if r.item.kind == "agent_reply"]
        assert sent.state == "sent" and sent.item.cc == (ERASED,)


def sealed_values(database: Path, sql: str, *params: object) -> list[bytes]:
    db = sqlite3.connect(database)
    try:
        return [bytes(v) for (v,) in db.execute(sql, params) if v is not None]
    finally:
        db.close()


def database_files(database: Path) -> bytes:
    return b"".join(p.read_bytes() for p in database.parent.glob(database.name + "*"))


async def test_an_erasure_leaves_no_old_page_in_the_database_files_even_while_it_is_read(
    tmp_path: Path, relay: Relay
) -> None:
    """What Clara's erasure deletes or rewrites under keys that live on (her envelope, the
    relay's reply naming her on Jörg's outbox row): no copy of the old bytes may stay in the
    database, its WAL or shared memory, even while a reader (`quarantine show --raw | less`)
    holds a snapshot; with the snapshot held the erasure is not reported done."""
    config, world = await populated(tmp_path / "d", relay)
    database = config.storage.database
    old = [
        *sealed_values(database, "SELECT envelope FROM inbound WHERE id = ?", world.ids["clara"]),
        *sealed_values(database, "SELECT reply FROM outbox WHERE kind = 'agent_reply'"),
    ]
    assert len(old) == 2 and all(value in database_files(database) for value in old)
    reader = sqlite3.connect(database, isolation_level=None)
    reader.execute("BEGIN")
    reader.execute("SELECT count(*) FROM inbound").fetchone()  # a snapshot held
    async with store_for(config, create=False) as store:
        # Not the 10 s a writer waits for readers, here.
        store._writer._db.execute("PRAGMA busy_timeout = 100")  # type: ignore[union-attr]
        try:
            await erase(store, CLARA_EMAIL, config.storage.attachments)
        except StoreUnavailable:
            pass  # not finished: erasing again finishes it
        held = database_files(database)
        reader.execute("COMMIT")
        reader.close()
        done = await store.get_requester(CLARA_EMAIL) is None
        assert not (done and any(value in held for value in old)), "erased, old pages kept"
        if not done:
            assert await erase(store, CLARA_EMAIL, config.storage.attachments) is not None
    assert not [value for value in old if value in database_files(database)]
