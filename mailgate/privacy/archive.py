"""What of a closed ticket the archive keeps, and the archive hook that erasure calls.

The record of a consumer inquiry and its settlement: the ticket's id, subject, when it was
opened and closed, and each message's author role, time, subject and text, with each
attachment's metadata (file name, type, size, SHA-256). Not kept: the requester's name and
address (the address only as a keyed hash, `person_hash`, so a later request by that address
can still find its records), other participants, senders' names and addresses (a keyed hash
each), HTML bodies, sender-authentication results, raw messages, outgoing mail, and the
attachment content: the archive keeps what the inquiry was and how it was settled, and stays
small. What a customer wrote in the text is kept as written: that is the record.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from mailgate.addresses import address_key
from mailgate.config import RetentionConfig
from mailgate.model import Message, Ticket
from mailgate.privacy.erasure import Archive
from mailgate.privacy.keyring import Keyring
from mailgate.store.archive import ArchiveStore, Reason
from mailgate.store.labels import ERASED
from mailgate.store.sqlite import PersonRef, SqliteStore


def person_hash(keys: Keyring, email: str) -> str:
    """A person's address as a keyed hash: equal for every spelling of it, and no way back to
    the address without the key store's index key. The same hash names the person as the
    audit log's subject (purpose "audit", as `privacy/audit.py` of the rights work makes it),
    so an archive read is audited under the requester's own subject."""
    return keys.keyed_hash(address_key(email).encode("utf-8"), "audit")


def _sender(keys: Keyring, message: Message) -> str | None:
    email = message.sender.email
    return None if email == ERASED else person_hash(keys, email)


def record(keys: Keyring, ticket: Ticket) -> dict[str, Any]:
    """The archived content of a ticket read from the database."""
    return {
        "subject": ticket.subject,
        "messages": [
            {
                "author": m.author,
                "sender": _sender(keys, m),
                "received_at": m.received_at.isoformat(),
                "subject": m.subject,
                "body_text": m.body_text,
                "attachments": [
                    {
                        "filename": a.filename,
                        "content_type": a.content_type,
                        "size": a.size,
                        "sha256": a.sha256,
                    }
                    for a in m.attachments
                ],
            }
            for m in ticket.messages
        ],
    }


async def archive_ticket(
    store: SqliteStore, archive: ArchiveStore, ticket_id: int, closed_at: float, reason: Reason
) -> bool:
    """Copy the ticket's record into the archive (durably) unless it is there already; False
    if it cannot be read (no such ticket, or its requester's key is gone: nothing to keep).

    The caller deletes it from the database afterwards; a crash in between leaves it in both,
    and the next purge finds it archived and deletes it.
    """
    if await archive.has(ticket_id):
        return True
    ticket = await store.get_ticket(ticket_id)
    if ticket is None or ticket.requester.email == ERASED:
        return False
    return await archive.put(
        ticket_id,
        requester=person_hash(store.keys, ticket.requester.email),
        created_at=ticket.created_at,
        closed_at=datetime.fromtimestamp(closed_at, UTC),
        reason=reason,
        content=record(store.keys, ticket),
    ) or await archive.has(ticket_id)


def archiver(
    store: SqliteStore,
    archive: ArchiveStore,
    retention: RetentionConfig,
    *,
    now: datetime | None = None,
) -> Archive:
    """The `archive` hook of `privacy.erasure.erase`: before the person's key is destroyed,
    their closed tickets still within `closed_tickets` go to the archive (their open ones are
    just erased). `now` is the retention clock (default: the time of each call)."""

    async def keep(person: PersonRef) -> int:
        moment = now or datetime.now(UTC)
        since = retention.closed_tickets.before(moment).timestamp()
        kept = 0
        for ticket_id, closed_at in await store.closed_tickets(since=since, requester=person.id):
            kept += await archive_ticket(store, archive, ticket_id, closed_at, "erasure")
        return kept

    return keep
