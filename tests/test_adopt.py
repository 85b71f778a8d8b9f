"""A database written before migration 009 (addresses, text and attachment files in clear) comes
out person-keyed and sealed when the store first opens it, nothing lost (`store/sqlite_adopt.py`).

The legacy database is built with the old code's schema: the package's migrations 001-008,
applied as the old version applied them, then rows as it wrote them."""

from __future__ import annotations

import hashlib
import json
import signal
import sqlite3
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from pathlib import Path

import pytest

import mailgate.store
from mailgate.addresses import address_key
from mailgate.errors import StoreError
from mailgate.model import Envelope, ForwardedClient
from mailgate.privacy.keyring import Keyring
from mailgate.store import SqliteStore, open_store
from tests.conftest import SubprocessDaemon, run_cli

ADDRESS = "Zelda.Quist@example.org"
NAME = "Zelda Quistwater"
OTHER = "Oskar.Brandvold@example.net"
OTHER_NAME = "Oskar Brandvold"
PARTICIPANT = "Rowan.Pike@example.net"
SUBJECT = "Flux capacitor rattles at dawn"
BODY = "The rattle started on Tuesday, right after the warranty ran out."
HTML = "<p>The rattle started on Tuesday, right after the warranty ran out.</p>"
REPLY = "Please send us the serial number from the underside."
ATTACHMENT = b"RIFF-recording-of-the-rattle-0f3a9c" * 40
QUARANTINED = b"From: <>\r\nSubject: Quarantined mail of Zelda.Quist@example.org\r\n\r\nBody.\r\n"
SECRETS = (ADDRESS, NAME, OTHER, OTHER_NAME, PARTICIPANT, SUBJECT, BODY, REPLY)

RAW = (
    f"From: {NAME} <{ADDRESS}>\r\nTo: support@example.com\r\nSubject: {SUBJECT}\r\n"
    f"Message-ID: <m1@client.example>\r\n\r\n{BODY}\r\n"
).encode()
SHA = hashlib.sha256(ATTACHMENT).hexdigest()
AUTH = {"trust": "authenticated", "dkim": "pass", "spf": "pass", "dmarc": "pass"}


def legacy_database(path: Path, attachments: Path) -> None:
    """A database and attachment folder as mailgate wrote them before migration 009."""
    folder = Path(mailgate.store.__file__).parent / "migrations" / "sqlite"
    db = sqlite3.connect(path, isolation_level=None)
    for pragma in ("journal_mode = WAL", "secure_delete = ON", "foreign_keys = ON"):
        db.execute(f"PRAGMA {pragma}")
    db.create_function("address_key", 1, address_key, deterministic=True)
    db.execute("PRAGMA foreign_keys = OFF")  # as the old migrations ran
    for script in sorted(folder.glob("00[1-8]_*.sql")):
        version = int(script.name.split("_", 1)[0])
        db.executescript(f"BEGIN;\n{script.read_text()}\nPRAGMA user_version = {version};\nCOMMIT;")
    db.execute("PRAGMA foreign_keys = ON")

    def insert(table: str, **row: object) -> None:
        columns, marks = ", ".join(row), ", ".join("?" * len(row))
        db.execute(f"INSERT INTO {table} ({columns}) VALUES ({marks})", tuple(row.values()))  # noqa: S608

    inbound = {"rcpt_tos": '["support@example.com"]', "processed_at": 1001.0}
    insert(
        "inbound",
        id="Q1",
        received_at=1000.0,
        mail_from=ADDRESS,
        peer="192.0.2.7:4000",
        helo="mx.example",
        raw=RAW,
        state="ingested",
        **inbound,
    )
    forwarded = {
        "addr": "198.51.100.9",
        "name": "client.example",
        "helo": "client",
        "proto": "ESMTP",
        "ident": "ABC123",
        "future_key": 1,
    }
    insert(
        "inbound",
        id="Q2",
        received_at=1100.0,
        mail_from="",
        peer="192.0.2.8:4001",
        helo="relay.example",
        smtputf8=1,
        raw=QUARANTINED,
        state="quarantined",
        reason="unparseable",
        attempts=2,
        forwarded=json.dumps(forwarded),
        **inbound,
    )
    insert(
        "requesters",
        id=1,
        email=ADDRESS,
        email_key=address_key(ADDRESS),
        name=NAME,
        created_at=1000.0,
        verified_at=1050.0,
    )
    insert(
        "requesters",
        id=2,
        email=OTHER,
        email_key=address_key(OTHER),
        name=OTHER_NAME,
        created_at=1200.0,
    )
    insert(
        "tickets",
        id=7,
        subject=SUBJECT,
        status="closed",
        requester_id=1,
        created_at=1000.0,
        updated_at=1500.0,
        flags='["unverified_sender"]',
    )
    insert(
        "tickets",
        id=8,
        subject="Same recording, other person",
        requester_id=2,
        created_at=1200.0,
        updated_at=1200.0,
    )
    insert("participants", ticket_id=7, email=PARTICIPANT, email_key=address_key(PARTICIPANT))
    insert(
        "messages",
        id=11,
        ticket_id=7,
        inbound_id="Q1",
        message_id="m1@client.example",
        from_email=ADDRESS,
        from_name=NAME,
        from_key=address_key(ADDRESS),
        subject=SUBJECT,
        body_text=BODY,
        body_html=HTML,
        thread_reason="new",
        received_at=1000.0,
        auth=json.dumps(AUTH),
        flags='["first"]',
        body_sha256=hashlib.sha256(BODY.encode()).hexdigest(),
    )
    insert(
        "messages",
        id=12,
        ticket_id=7,
        message_id="r1@mailgate.test",
        from_email="agent@example.com",
        from_name="Agent Ann",
        from_key="agent@example.com",
        subject=f"Re: {SUBJECT}",
        body_text=REPLY,
        thread_reason="agent",
        author="agent",
        received_at=1400.0,
    )
    insert(
        "messages",
        id=13,
        ticket_id=8,
        message_id="m2@client.example",
        from_email=OTHER,
        from_name=OTHER_NAME,
        from_key=address_key(OTHER),
        subject="Same recording, other person",
        body_text="See attached.",
        thread_reason="new",
        received_at=1200.0,
    )
    for row_id, message, filename, inline in (
        (21, 11, "rattle.wav", 0),
        (22, 12, "your-rattle.wav", 0),
        (23, 13, "rattle-too.wav", 1),
    ):
        insert(
            "attachments",
            id=row_id,
            message_id=message,
            position=0,
            sha256=SHA,
            filename=filename,
            content_type="audio/wav",
            size=len(ATTACHMENT),
            inline=inline,
        )
    insert(
        "verification_tokens",
        id=31,
        requester_id=1,
        token_hash="a" * 64,
        created_at=1000.0,
        expires_at=9e9,
        message_id="v1@mailgate.test",
    )
    insert(
        "outbox",
        id=41,
        kind="agent_reply",
        ticket_id=7,
        recipient=ADDRESS,
        recipient_name=NAME,
        cc=json.dumps([PARTICIPANT]),
        message_id="r1@mailgate.test",
        in_reply_to="m1@client.example",
        refs='["m1@client.example"]',
        context=json.dumps({"subject": SUBJECT, "body": REPLY, "ticket_id": 7}),
        automatic=0,
        state="failed",
        attempts=3,
        last_error=f"550 5.1.1 <{PARTICIPANT}>: no such user",
        created_at=1400.0,
        next_attempt_at=1460.0,
        reply=f"RCPT <{PARTICIPANT}>: 550 5.1.1 no such user",
    )
    insert(
        "undeliverable",
        email_key=address_key(PARTICIPANT),
        email=PARTICIPANT,
        status="5.1.1",
        since=1460.0,
    )
    # Ticket 9 was made and is gone: its id is never given again.
    db.execute("UPDATE sqlite_sequence SET seq = 9 WHERE name = 'tickets'")
    db.close()
    old = attachments / SHA[:2] / SHA
    old.parent.mkdir(parents=True)
    old.write_bytes(ATTACHMENT)
    # A file the old version left behind: its message was never committed.
    orphan = hashlib.sha256(b"orphan " + ATTACHMENT).hexdigest()
    (attachments / orphan[:2]).mkdir()
    (attachments / orphan[:2] / orphan).write_bytes(b"orphan " + ATTACHMENT)


@asynccontextmanager
async def opened(path: Path, attachments: Path | None) -> AsyncIterator[SqliteStore]:
    keys = Keyring.open(
        path.parent / "keys" / "master.key", path.parent / "keys" / "ks.sqlite", create=True
    )
    try:
        async with open_store(path, keys, attachments=attachments) as store:
            yield store
    finally:
        keys.close()


def clear_values_in(files: list[Path]) -> list[tuple[str, str]]:
    """(file, value) for every personal value found in clear in these files' bytes."""
    needles = [*(s.encode() for s in SECRETS), ATTACHMENT[:64], address_key(ADDRESS).encode()]
    found = []
    for file in files:
        data = file.read_bytes()
        found += [(file.name, n.decode()[:30]) for n in needles if n in data]
    return found


def data_files(path: Path, attachments: Path) -> list[Path]:
    files = [p for p in (path, path.with_name(path.name + "-wal")) if p.exists()]
    return files + [p for p in attachments.rglob("*") if p.is_file()]


async def test_a_legacy_database_comes_out_sealed_and_whole(tmp_path: Path) -> None:
    """Every value of every legacy table reads back through the Store API; afterwards no file
    of the data directory (database, WAL, attachments) holds any of them in clear."""
    path, root = tmp_path / "var" / "mailgate.db", tmp_path / "var" / "attachments"
    path.parent.mkdir()
    legacy_database(path, root)
    assert clear_values_in(data_files(path, root))  # the scan finds them where they are

    async with opened(path, root) as store:
        ticket = await store.get_ticket(7)
        other = await store.get_ticket(8)
        requesters = await store.list_requesters()
        participant = await store.get_requester(PARTICIPANT.upper())
        [outbox] = await store.list_outbox()
        q1, q2 = await store.get_inbound("Q1"), await store.get_inbound("Q2")
        raw1, raw2 = await store.read_raw("Q1"), await store.read_raw("Q2")
        assert ticket is not None and other is not None
        contents = [
            await store.attachment_content(a.id or 0, root)
            for m in (*ticket.messages, *other.messages)
            for a in m.attachments
        ]

        def read(tx: mailgate.store.IngestTx) -> tuple[object, ...]:
            new = tx.create_ticket("after", tx.ticket_head(8)[1], at=datetime.now(UTC))
            return (
                tx.participants(7),
                PARTICIPANT.lower() in [p.lower() for p in tx.participants(7)],
                tx.has_live_token(ADDRESS.lower(), at=datetime.now(UTC)),
                tx.duplicate_ticket(
                    "m1@client.example", ADDRESS, hashlib.sha256(BODY.encode()).hexdigest()
                ),
                tx.undeliverable(PARTICIPANT),
                tx.thread_ids(7),
                new,
            )

        found = await store.ingest(read)
        with sqlite3.connect(path) as db:
            owners = dict(db.execute("SELECT id, owner_key IS NOT NULL FROM inbound"))
            blobs = db.execute("SELECT count(*), sum(refs) FROM blobs").fetchone()
            tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master")}
        files_open = data_files(path, root)
        leaks_open = clear_values_in(files_open)

    assert (ticket.subject, ticket.status, ticket.requester.email, ticket.requester.name) == (
        SUBJECT,
        "closed",
        ADDRESS,
        NAME,
    )
    assert ticket.flags == ("unverified_sender",)
    assert ticket.updated_at == datetime.fromtimestamp(1500, UTC)
    first, reply = ticket.messages
    assert (first.id, first.sender.email, first.sender.name, first.subject) == (
        11,
        ADDRESS,
        NAME,
        SUBJECT,
    )
    assert (first.body_text, first.body_html, first.auth, first.flags) == (
        BODY,
        HTML,
        AUTH,
        ("first",),
    )
    assert (reply.author, reply.thread_reason, reply.body_text, reply.sender.name) == (
        "agent",
        "agent",
        REPLY,
        "Agent Ann",
    )
    [attachment] = first.attachments
    assert (attachment.id, attachment.filename, attachment.sha256, attachment.size) == (
        21,
        "rattle.wav",
        SHA,
        len(ATTACHMENT),
    )
    assert other.messages[0].attachments[0].inline
    assert contents == [ATTACHMENT] * 3
    assert blobs == (2, 3)  # one sealed file per owner of the content, counted per use
    assert [(r.email, r.name, r.verified, r.undeliverable) for r in requesters] == [
        (ADDRESS, NAME, True, None),
        (OTHER, OTHER_NAME, False, None),
    ]
    assert requesters[0].verified_at == datetime.fromtimestamp(1050, UTC)
    assert requesters[0].created_at == datetime.fromtimestamp(1000, UTC)
    assert participant is not None and participant.undeliverable == "5.1.1"
    assert (outbox.id, outbox.item.to.email, outbox.item.to.name, outbox.item.cc) == (
        41,
        ADDRESS,
        NAME,
        (PARTICIPANT,),
    )
    assert outbox.item.context == {"subject": SUBJECT, "body": REPLY, "ticket_id": 7}
    assert (outbox.state, outbox.attempts, outbox.item.references) == (
        "failed",
        3,
        ("m1@client.example",),
    )
    assert outbox.last_error == f"550 5.1.1 <{PARTICIPANT}>: no such user"
    assert outbox.reply == f"RCPT <{PARTICIPANT}>: 550 5.1.1 no such user"
    assert q1 is not None and q2 is not None
    assert (q1.state, q1.envelope.mail_from, q1.envelope.helo) == (
        "ingested",
        ADDRESS,
        "mx.example",
    )
    assert (q2.state, q2.reason, q2.attempts, q2.size) == (
        "quarantined",
        "unparseable",
        2,
        len(QUARANTINED),
    )
    assert q2.envelope == Envelope(
        "",
        ("support@example.com",),
        "192.0.2.8:4001",
        "relay.example",
        smtputf8=True,
        forwarded=ForwardedClient("198.51.100.9", "client.example", "client", "ESMTP", "ABC123"),
    )
    assert (raw1, raw2) == (RAW, QUARANTINED)
    assert owners == {"Q1": 1, "Q2": 0}  # ingested: the requester's; quarantined: the master's
    assert found == (
        [PARTICIPANT],
        True,
        True,
        7,
        True,
        ("m1@client.example", ["m1@client.example", "r1@mailgate.test"]),
        10,
    )
    assert not {t for t in tables if t.startswith("legacy_")}
    assert leaks_open == []
    assert clear_values_in(data_files(path, root)) == []
    assert not any(len(p.name) == 64 for p in root.rglob("*"))  # old files, orphans too, gone


async def test_adoption_that_fails_leaves_the_legacy_rows_and_is_tried_again(
    tmp_path: Path,
) -> None:
    """One transaction: an attachment file that cannot be read stops the adoption, nothing
    of it is committed, and the next open adopts everything. A crash after the commit, with
    some old files deleted and some not, is finished by the next open."""
    path, root = tmp_path / "mailgate.db", tmp_path / "attachments"
    legacy_database(path, root)
    old = root / SHA[:2] / SHA
    old.unlink()
    old.mkdir()  # reading it fails
    with pytest.raises(StoreError, match="Is a directory"):
        async with opened(path, root):
            pass
    with sqlite3.connect(path) as db:
        assert db.execute("SELECT count(*) FROM legacy_messages").fetchone() == (3,)
        assert db.execute("SELECT count(*) FROM people").fetchone() == (0,)
    old.rmdir()
    old.write_bytes(ATTACHMENT)

    # Without its attachment folder a store cannot adopt files: it says so, and keeps them.
    with pytest.raises(StoreError, match=r"\[storage\] attachments"):
        async with opened(path, None):
            pass

    async with opened(path, root) as store:
        ticket = await store.get_ticket(7)
        assert ticket is not None and len(ticket.messages) == 2
    assert not old.exists()

    # The state a crash between the commit and the deletions leaves: the marker, one old file
    # still there, another already gone.
    old.write_bytes(ATTACHMENT)
    with sqlite3.connect(path) as db:
        db.execute("CREATE TABLE legacy_files_pending (at REAL NOT NULL)")
    async with opened(path, root) as store:
        ticket = await store.get_ticket(7)
        assert ticket is not None
        attachment = ticket.messages[0].attachments[0]
        assert await store.attachment_content(attachment.id or 0, root) == ATTACHMENT
    assert not old.exists()
    with sqlite3.connect(path) as db:
        # Zelda, Oskar, the participant and the agent: each once, however often adopted.
        assert db.execute("SELECT count(*) FROM people").fetchone() == (4,)
        assert (
            db.execute(
                "SELECT name FROM sqlite_master WHERE name = 'legacy_files_pending'"
            ).fetchone()
            is None
        )


async def test_a_missing_legacy_attachment_file_keeps_its_metadata(tmp_path: Path) -> None:
    path, root = tmp_path / "mailgate.db", tmp_path / "attachments"
    legacy_database(path, root)
    (root / SHA[:2] / SHA).unlink()
    async with opened(path, root) as store:
        ticket = await store.get_ticket(7)
        assert ticket is not None
        [attachment] = ticket.messages[0].attachments
        assert (attachment.filename, attachment.size) == ("rattle.wav", len(ATTACHMENT))
        assert await store.attachment_content(attachment.id or 0, root) is None


def test_the_daemon_adopts_a_legacy_data_directory_in_place(tmp_path: Path) -> None:
    """The configured store (`store_for`) passes its attachment folder: `mailgate serve` on a
    legacy data directory adopts it, the CLI then shows the ticket, and nothing is in clear."""
    daemon = SubprocessDaemon(tmp_path)
    path, root = daemon.database, tmp_path / "var" / "attachments"
    path.parent.mkdir(parents=True)
    legacy_database(path, root)
    try:
        daemon.start()
    finally:
        daemon.kill(signal.SIGTERM)
    shown = run_cli("--config", str(daemon.config_path), "tickets", "show", "7", "--json")
    assert shown.returncode == 0, shown.stderr
    ticket = json.loads(shown.stdout)
    assert (ticket["subject"], ticket["requester"]["email"]) == (SUBJECT, ADDRESS)
    assert ticket["messages"][0]["attachments"][0]["filename"] == "rattle.wav"
    assert clear_values_in(data_files(path, root)) == []
