"""A relay's immediate refusal of a recipient, recorded as an asynchronous DSN would be.

A relay that refuses a recipient at RCPT, or the whole mail at DATA, tells at once what a
bounce would tell days later, and the same follows (ARCHITECTURE rule 12): a permanent
refusal (5xx) marks the address undeliverable, so no automatic mail goes there until it
writes in again, and the ticket gets a system note naming what was refused and why, so the
agent knows the customer did not get the answer. A temporary refusal (4xx) of one recipient
while the others took the mail is noted too: that recipient is not tried again. A
verification mail that never arrives verifies no one: its link is revoked.

Runs inside the transaction that also records the outbox row's outcome, so a crash leaves
either all of it or none (the row stays 'sending' and is delivered again at start).
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

from mailgate.model import Address, OutboxItem, ParsedMail
from mailgate.outbound.transports import Refusal
from mailgate.store import IngestTx


def record_refusals(
    tx: IngestTx,
    item: OutboxItem,
    refused: Sequence[Refusal],
    *,
    delivered: bool,
    sender: Address,
    at: datetime,
) -> None:
    """Mark the permanently refused recipients of `item` and note its ticket; `delivered`
    tells whether the relay took the mail for the other recipients. A system mail (no
    ticket) leaves no trace: marking its recipient would make a person of an address that
    must stay gone (an erasure's confirmation)."""
    if item.ticket_id is None:
        return
    for refusal in refused:
        if refusal.permanent:
            tx.set_undeliverable(refusal.recipient, refusal.status, at=at)
    if item.kind in ("verification", "privacy_confirm") and not delivered:
        tx.revoke_tokens(message_ids=[item.message_id], at=at)
    if tx.ticket_status(item.ticket_id) is None:
        return
    lines = [f"The relay refused our {item.kind.replace('_', ' ')} mail <{item.message_id}>"]
    lines.append("for these recipients:" if delivered else "(no recipient got it):")
    for refusal in refused:
        after = "not tried again" if not refusal.permanent else "no automatic mail until it writes"
        lines.append(f"- {refusal.recipient} at {refusal.stage}: {refusal.text} ({after})")
    note = ParsedMail(
        sender=sender,
        to=(),
        cc=(),
        subject="Mail delivery refused by the relay",
        message_id=None,
        in_reply_to=(),
        references=(),
        body_text="\n".join(lines),
        body_html=None,
    )
    tx.add_message(
        item.ticket_id,
        note,
        inbound_id=None,
        reason="bounce",
        attachments=(),
        at=at,
        author="system",
    )
