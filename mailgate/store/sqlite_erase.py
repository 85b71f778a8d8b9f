"""Deleting a person from the SQLite store: every row that is theirs, in one transaction.

The data key is destroyed first (`Keyring.destroy`, by `privacy/erasure.py`), so from that
moment every copy of their values anywhere is ciphertext without a key; this removes the rows
too, overwritten in place (`secure_delete`), and logs the key id in `erasures`. When the store
opens, `reconcile` finishes what a crash interrupted, in either direction: a person whose key
the key store destroyed is deleted here (an old copy of the database restored), and a key
that this log says was destroyed is destroyed in the key store (an old key store restored).
"""

from __future__ import annotations

import json
import re
import sqlite3
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from mailgate.privacy.keyring import Keyring
from mailgate.privacy.sealing import DataKey, Undecryptable
from mailgate.store.labels import BODY, ENVELOPE, ERASED, HTML, OUTBOX, OUTBOX_ERROR, SUBJECT
from mailgate.store.sqlite_raw import message_key

# An address in a text mailgate wrote (a relay's reply, a refusal note, a bounce).
_ADDRESS = re.compile(r"""[^\s<>()\[\],;:"']+@[^\s<>()\[\],;:"']+""")


@dataclass(frozen=True, slots=True)
class Deleted:
    """What an erasure removed, in counts (no personal data), and the files to unlink."""

    tickets: int = 0
    messages: int = 0
    attachments: int = 0
    outbox: int = 0
    tokens: int = 0
    raw_messages: int = 0
    participations: int = 0
    blob_files: tuple[str, ...] = field(default=(), repr=False)
    overwritten: bool = True  # False: a reader kept old pages; the person is still marked

    def __add__(self, other: Deleted) -> Deleted:
        return Deleted(
            tickets=self.tickets + other.tickets,
            messages=self.messages + other.messages,
            attachments=self.attachments + other.attachments,
            outbox=self.outbox + other.outbox,
            tokens=self.tokens + other.tokens,
            raw_messages=self.raw_messages + other.raw_messages,
            participations=self.participations + other.participations,
            blob_files=self.blob_files + other.blob_files,
            overwritten=self.overwritten and other.overwritten,
        )

    def counts(self) -> dict[str, int]:
        return {
            "tickets": self.tickets,
            "messages": self.messages,
            "attachments": self.attachments,
            "outbox": self.outbox,
            "tokens": self.tokens,
            "raw_messages": self.raw_messages,
            "participations": self.participations,
            "files": len(self.blob_files),
        }


def _count(db: sqlite3.Connection, sql: str, params: dict[str, object]) -> int:
    return int(db.execute(sql, params).fetchone()[0])


def delete_tickets(db: sqlite3.Connection, ticket_ids: Sequence[int]) -> Deleted:
    """Delete these tickets with their messages, attachments, outbox rows and raw messages,
    and the blobs that no attachment uses any more; inside a transaction.

    An erasure deletes a person's tickets with this, and retention a ticket whose record was
    archived or whose period ended.
    """
    db.execute("CREATE TEMP TABLE IF NOT EXISTS doomed (id INTEGER PRIMARY KEY)")
    db.execute("DELETE FROM temp.doomed")
    db.executemany("INSERT OR IGNORE INTO temp.doomed (id) VALUES (?)", [(i,) for i in ticket_ids])
    messages = _count(
        db, "SELECT count(*) FROM messages WHERE ticket_id IN (SELECT id FROM temp.doomed)", {}
    )
    attachments = _count(
        db,
        "SELECT count(*) FROM attachments WHERE message_id IN "
        "(SELECT id FROM messages WHERE ticket_id IN (SELECT id FROM temp.doomed))",
        {},
    )
    blobs = json.dumps(
        [
            row[0]
            for row in db.execute(
                "SELECT DISTINCT blob_id FROM attachments WHERE message_id IN "
                "(SELECT id FROM messages WHERE ticket_id IN (SELECT id FROM temp.doomed))"
            )
        ]
    )
    raw = db.execute(
        "DELETE FROM inbound WHERE id IN (SELECT inbound_id FROM messages "
        "WHERE ticket_id IN (SELECT id FROM temp.doomed))"
    ).rowcount
    outbox = db.execute(
        "DELETE FROM outbox WHERE ticket_id IN (SELECT id FROM temp.doomed)"
    ).rowcount
    db.execute("DELETE FROM messages WHERE ticket_id IN (SELECT id FROM temp.doomed)")
    tickets = db.execute("DELETE FROM tickets WHERE id IN (SELECT id FROM temp.doomed)").rowcount
    db.execute("DELETE FROM temp.doomed")
    # Each blob counts its attachments again; one that none uses now goes, file and all.
    db.execute(
        "UPDATE blobs SET refs = (SELECT count(*) FROM attachments a WHERE a.blob_id = blobs.id) "
        "WHERE id IN (SELECT value FROM json_each(?))",
        (blobs,),
    )
    files = tuple(
        row[0]
        for row in db.execute(
            "DELETE FROM blobs WHERE refs = 0 AND id IN (SELECT value FROM json_each(?)) "
            "RETURNING name",
            (blobs,),
        )
    )
    return Deleted(
        tickets=tickets,
        messages=messages,
        attachments=attachments,
        outbox=outbox,
        raw_messages=raw,
        blob_files=files,
    )


def delete_person(
    db: sqlite3.Connection, keys: Keyring, person_id: int, key_id: str, *, forget: bool = True
) -> Deleted:
    """Delete the person's tickets (with their messages, attachments, outbox rows, raw
    messages), blobs, tokens, participations and (with `forget`) row; inside a transaction.

    On other people's tickets, what they wrote stays (it is the other requester's record)
    but not who they were: the sender is sealed under their destroyed key, the raw messages
    they sent are removed with their envelopes, and their address leaves what mailgate wrote
    there (the Cc lists of outgoing mail, the relay's replies, refusal notes and bounces).
    Their mail that no ticket of theirs holds goes too: a repeat delivery, a message waiting
    for ingest or in quarantine (found by its envelope sender).
    """
    p = {"p": person_id, "k": key_id}
    blind = db.execute("SELECT blind FROM people WHERE id = ?", (person_id,)).fetchone()
    mail = json.dumps(_their_mail(db, keys, person_id, bytes(blind[0])) if blind else [])
    tokens = _count(db, "SELECT count(*) FROM verification_tokens WHERE person_id = :p", p)
    participations = _count(db, "SELECT count(*) FROM participants WHERE person_id = :p", p)
    theirs = [row[0] for row in db.execute("SELECT id FROM tickets WHERE requester_id = :p", p)]
    tickets = delete_tickets(db, theirs)
    # What is theirs beyond their tickets: raw messages given to them or sent by them (see
    # `_their_mail`), mail to them on other tickets, any blob left.
    raw = db.execute(
        "DELETE FROM inbound WHERE owner_key = :k OR id IN (SELECT value FROM json_each(:mail))",
        {**p, "mail": mail},
    ).rowcount
    outbox = db.execute("DELETE FROM outbox WHERE recipient_id = :p", p).rowcount
    files = tuple(
        row[0]
        for row in db.execute("DELETE FROM blobs WHERE owner_id = ? RETURNING name", (person_id,))
    )
    if blind is not None:
        _scrub_tickets(db, keys, person_id, bytes(blind[0]))
    db.execute("DELETE FROM participants WHERE person_id = ?", (person_id,))
    db.execute("DELETE FROM verification_tokens WHERE person_id = ?", (person_id,))
    # Their files are unlinked after the commit; until then (a crash) this table names them.
    files = tickets.blob_files + files
    db.executemany("INSERT OR IGNORE INTO erased_files (name) VALUES (?)", [(f,) for f in files])
    if forget:
        # Their messages on other tickets keep no link to them (sender_id SET NULL); their
        # name and address there are sealed under the key that is gone.
        db.execute("DELETE FROM people WHERE id = ?", (person_id,))
        db.execute(
            "INSERT OR IGNORE INTO erasures (key_id, at) VALUES (?, ?)", (key_id, time.time())
        )
    return Deleted(
        tickets=tickets.tickets,
        messages=tickets.messages,
        attachments=tickets.attachments,
        outbox=tickets.outbox + outbox,
        tokens=tokens,
        raw_messages=tickets.raw_messages + raw,
        participations=participations,
        blob_files=files,
    )


def _their_mail(db: sqlite3.Connection, keys: Keyring, person_id: int, blind: bytes) -> list[str]:
    """The inbound rows of the person's mail that their own tickets' rows do not name: those
    of their messages on other tickets; and, found by the envelope sender, those no one owns
    yet (waiting for ingest, quarantined) and the repeat deliveries of their messages on the
    tickets they took part in (each belongs to its ticket's requester)."""
    found = {
        row[0]
        for row in db.execute(
            "SELECT inbound_id FROM messages WHERE sender_id = ? AND inbound_id IS NOT NULL",
            (person_id,),
        )
    }
    rows = db.execute(
        "SELECT id, envelope, raw_key, owner_key FROM inbound WHERE owner_key IS NULL "
        "OR (reason = 'duplicate' AND owner_key IN (SELECT p.key_id FROM participants x "
        "JOIN tickets t ON t.id = x.ticket_id JOIN people p ON p.id = t.requester_id "
        "WHERE x.person_id = ?))",
        (person_id,),
    )
    for inbound_id, envelope, raw_key, owner_key in rows:
        key = message_key(keys, bytes(raw_key), owner_key)
        try:
            sender = json.loads(key.open(bytes(envelope), ENVELOPE))["mail_from"] if key else ""
        except Undecryptable:
            continue
        if sender and keys.blind(sender) == blind:
            found.add(inbound_id)
    return sorted(found)


def _scrub_tickets(db: sqlite3.Connection, keys: Keyring, person_id: int, blind: bytes) -> None:
    """On the other tickets the person took part in, replace their address (found by blind
    index: their own key may be gone already) in what mailgate wrote: outgoing mail's Cc
    lists and the relay's words about it, and the system notes and bounces."""
    tickets = db.execute(
        "SELECT t.id, p.key_id FROM participants x JOIN tickets t ON t.id = x.ticket_id "
        "JOIN people p ON p.id = t.requester_id WHERE x.person_id = ?",
        (person_id,),
    ).fetchall()
    for ticket_id, owner_key in tickets:
        owner = keys.key(owner_key)
        if owner is not None:
            _scrub_outbox(db, keys, owner, ticket_id, blind)
            _scrub_notes(db, keys, owner, ticket_id, blind)


def _scrub_outbox(
    db: sqlite3.Connection, keys: Keyring, owner: DataKey, ticket_id: int, blind: bytes
) -> None:
    rows = db.execute(
        "SELECT id, mail, reply, last_error FROM outbox WHERE ticket_id = ?", (ticket_id,)
    ).fetchall()
    for outbox_id, sealed, reply, error in rows:
        mail = json.loads(owner.open(bytes(sealed), OUTBOX))
        cc = [ERASED if keys.blind(a) == blind else a for a in mail["cc"]]
        texts = [_opened(owner, value, OUTBOX_ERROR) for value in (reply, error)]
        scrubbed = [_scrubbed(text, keys, blind) for text in texts]
        if cc != mail["cc"] or scrubbed != texts:
            mail["cc"] = cc
            db.execute(
                "UPDATE outbox SET mail = ?, reply = ?, last_error = ? WHERE id = ?",
                (
                    owner.seal(json.dumps(mail).encode(), OUTBOX),
                    *(owner.seal_text(text, OUTBOX_ERROR) for text in scrubbed),
                    outbox_id,
                ),
            )


def _scrub_notes(
    db: sqlite3.Connection, keys: Keyring, owner: DataKey, ticket_id: int, blind: bytes
) -> None:
    rows = db.execute(
        "SELECT id, subject, body_text, body_html FROM messages "
        "WHERE ticket_id = ? AND author = 'system'",
        (ticket_id,),
    ).fetchall()
    labels = (SUBJECT, BODY, HTML)
    for message_id, *sealed in rows:
        texts = [_opened(owner, value, label) for value, label in zip(sealed, labels, strict=True)]
        scrubbed = [_scrubbed(text, keys, blind) for text in texts]
        if scrubbed != texts:
            db.execute(
                "UPDATE messages SET subject = ?, body_text = ?, body_html = ? WHERE id = ?",
                (
                    *(owner.seal_text(t, label) for t, label in zip(scrubbed, labels, strict=True)),
                    message_id,
                ),
            )


def _opened(key: DataKey, sealed: bytes | None, label: str) -> str | None:
    return None if sealed is None else key.open_text(bytes(sealed), label)


def _scrubbed(text: str | None, keys: Keyring, blind: bytes) -> str | None:
    """`text` with every address that has this blind index replaced by the erased mark."""

    def replace(found: re.Match[str]) -> str:
        address = found.group(0).rstrip(".")
        if keys.blind(address) != blind:
            return found.group(0)
        return ERASED + found.group(0)[len(address) :]

    return None if text is None else _ADDRESS.sub(replace, text)


def _audit_reconciled(db: sqlite3.Connection, deleted: Deleted) -> None:
    """The audit record of an erasure finished here (`privacy/audit.py` writes the others):
    the address is gone with the key, so it names no subject."""
    db.execute(
        "INSERT INTO audit (at, action, via, subject, counts) VALUES (?, 'erase', 'reconcile', "
        "NULL, ?)",
        (time.time(), json.dumps(deleted.counts(), sort_keys=True)),
    )


def reconcile(db: sqlite3.Connection, keys: Keyring) -> int:
    """Make the database and the key store agree on who was erased; return how many people
    this deleted (an erasure that a restored copy of the database had not seen)."""
    destroyed = keys.destroyed()
    logged = {row[0] for row in db.execute("SELECT key_id FROM erasures")}
    keys.destroy(logged - destroyed)
    deleted = 0
    if destroyed:
        db.execute("BEGIN IMMEDIATE")
        try:
            for person_id, key_id in db.execute("SELECT id, key_id FROM people").fetchall():
                if key_id in destroyed:
                    _audit_reconciled(db, delete_person(db, keys, person_id, key_id))
                    deleted += 1
            db.execute(
                "INSERT OR IGNORE INTO erasures (key_id, at) SELECT value, ? FROM json_each(?)",
                (time.time(), json.dumps(sorted(destroyed - logged))),
            )
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
    if deleted:
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()  # to its end: see _Writer
    return deleted
