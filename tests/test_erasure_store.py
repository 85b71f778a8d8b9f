"""Erasure at the store: rows gone, key destroyed, files removed, and a restored copy of the
data directory (or of the key store) brings no one back."""

from __future__ import annotations

import hashlib
import shutil
from datetime import UTC, datetime
from pathlib import Path

from mailgate.model import Address, Envelope, OutboxItem, ParsedMail, StoredAttachment
from mailgate.privacy.erasure import erase, resume
from mailgate.privacy.keyring import Keyring
from mailgate.store import IngestTx, open_store
from mailgate.store.blobs import save_blob
from mailgate.store.labels import ERASED

NAME = "Zoë Erasable"
EMAIL = "zoe.erasable@example.org"
OTHER = "keeper@example.org"
SUBJECT = "My very private subject"
BODY = "the body phrase only Zoë wrote"
CONTENT = b"attachment content that must vanish" * 10


def _mail(sender: Address, body: str, message_id: str) -> ParsedMail:
    return ParsedMail(
        sender=sender,
        to=(),
        cc=(),
        subject=SUBJECT,
        message_id=message_id,
        in_reply_to=(),
        references=(),
        body_text=body,
        body_html=f"<p>{body}</p>",
        body_digest=hashlib.sha256(body.encode()).hexdigest(),
    )


def _keys(folder: Path) -> Keyring:
    return Keyring.open(folder / "master.key", folder / "keystore.sqlite", create=True)


async def _populate(data: Path, keys: Keyring) -> tuple[int, int]:
    raw = f"From: {NAME} <{EMAIL}>\r\nSubject: {SUBJECT}\r\n\r\n{BODY}\r\n".encode()
    envelope = Envelope(EMAIL, ("support@example.com",), "127.0.0.1:1", "client")
    name, key, digest = save_blob(data / "attachments", CONTENT)
    attachment = StoredAttachment(
        "secret.txt", "text/plain", len(CONTENT), digest, False, name, key
    )
    now = datetime.now(UTC)
    async with open_store(data / "db.sqlite", keys) as store:
        await store.receive([("Q1", envelope, raw), ("Q2", envelope, raw)])

        def work(tx: IngestTx) -> tuple[int, int]:
            mine = tx.create_ticket(SUBJECT, Address(EMAIL, NAME), at=now)
            tx.add_message(
                mine, _mail(Address(EMAIL, NAME), BODY, "m1@x"), inbound_id="Q1",
                reason="new", attachments=[attachment], at=now,
            )  # fmt: skip
            theirs = tx.create_ticket("Keeper's ticket", Address(OTHER, "Keeper"), at=now)
            tx.add_participants(theirs, [EMAIL])
            tx.add_message(
                theirs, _mail(Address(EMAIL, NAME), "Zoë chimes in", "m2@x"), inbound_id="Q2",
                reason="references", attachments=(), at=now,
            )  # fmt: skip
            tx.enqueue(
                OutboxItem(
                    kind="agent_reply", ticket_id=theirs, to=Address(OTHER, "Keeper"),
                    message_id="r1@x", automatic=False, context={"body": "ok"}, cc=(EMAIL,),
                ),
                at=now,
            )  # fmt: skip
            tx.finish_inbound("Q2", "ingested", reason=None, at=now)
            tx.finish_inbound("Q1", "ingested", reason=None, at=now)
            return mine, theirs

        return await store.ingest(work)


async def test_erasure_removes_rows_key_and_files_and_leaves_others(tmp_path: Path) -> None:
    data, secrets = tmp_path / "data", tmp_path / "secrets"
    keys = _keys(secrets)
    mine, theirs = await _populate(data, keys)
    async with open_store(data / "db.sqlite", keys) as store:
        [before] = (await store.get_ticket(mine)).messages  # type: ignore[union-attr]
        assert (
            await store.attachment_content(before.attachments[0].id or 0, data / "attachments")
            == CONTENT
        )
        deleted = await erase(store, EMAIL, data / "attachments")
        assert deleted is not None
        assert deleted.counts() == {
            "tickets": 1, "messages": 1, "attachments": 1, "outbox": 0, "tokens": 0,
            "raw_messages": 2, "participations": 1, "files": 1,
        }  # fmt: skip
        assert await store.get_ticket(mine) is None
        assert await store.get_requester(EMAIL) is None
        assert await store.read_raw("Q1") is None
        kept = await store.get_ticket(theirs)
        assert kept is not None and kept.requester.email == OTHER
        assert [m.sender.email for m in kept.messages] == [ERASED]
        assert kept.messages[0].body_text == "Zoë chimes in"  # the keeper's record stays
        assert await store.read_raw("Q2") is None  # but not the raw mail Zoë sent
        assert await store.get_inbound("Q2") is None  # nor its envelope (her address)
        [outgoing] = await store.list_outbox()
        assert (outgoing.item.to.email, outgoing.item.cc) == (OTHER, (ERASED,))
        assert await erase(store, EMAIL, data / "attachments") is None
    assert not any((data / "attachments").rglob("*.*")) and not [
        p for p in (data / "attachments").rglob("*") if p.is_file()
    ]
    keys.close()


async def test_a_backup_restored_after_an_erasure_shows_nothing_of_the_person(
    tmp_path: Path,
) -> None:
    data, secrets = tmp_path / "data", tmp_path / "secrets"
    keys = _keys(secrets)
    mine, _theirs = await _populate(data, keys)
    backup = tmp_path / "backup"
    shutil.copytree(data, backup)  # the data directory only: the key store is elsewhere
    async with open_store(data / "db.sqlite", keys) as store:
        assert await erase(store, EMAIL, data / "attachments") is not None
    shutil.rmtree(data)
    shutil.copytree(backup, data)  # restored last month's copy
    async with open_store(data / "db.sqlite", keys) as store:
        assert await store.get_ticket(mine) is None  # reconciled at open
        assert await store.get_requester(EMAIL) is None
        assert await store.read_raw("Q1") is None
    keys.close()


async def test_an_old_key_store_restored_after_an_erasure_is_reconciled(tmp_path: Path) -> None:
    data, secrets = tmp_path / "data", tmp_path / "secrets"
    keys = _keys(secrets)
    await _populate(data, keys)
    keys.close()
    shutil.copytree(secrets, tmp_path / "old-secrets")
    keys = _keys(secrets)
    async with open_store(data / "db.sqlite", keys) as store:
        person = await store.begin_erasure(EMAIL)
        assert person is not None
        assert await erase(store, EMAIL, data / "attachments") is not None
    keys.close()
    old = _keys(tmp_path / "old-secrets")
    assert old.key(person.key_id) is not None  # the old key store still holds the key...
    async with open_store(data / "db.sqlite", old):
        pass
    assert old.key(person.key_id) is None  # ...until the database's erasure log is applied
    assert person.key_id in old.destroyed()
    old.close()


async def test_an_erasure_cut_short_is_finished_at_the_next_start(tmp_path: Path) -> None:
    data, secrets = tmp_path / "data", tmp_path / "secrets"
    keys = _keys(secrets)
    await _populate(data, keys)
    async with open_store(data / "db.sqlite", keys) as store:
        person = await store.begin_erasure(EMAIL)  # then the process dies
    assert person is not None
    async with open_store(data / "db.sqlite", keys) as store:
        assert await resume(store, data / "attachments") == 1
        assert await store.get_requester(EMAIL) is None
        assert await resume(store, data / "attachments") == 0
    assert keys.key(person.key_id) is None
    keys.close()
