"""Outgoing mail queued in an event's own transaction: the automatic ones only within limits.

`tickets.py` decides which mail follows an event and calls this module, and nothing else
does (an import-linter contract holds it to that). What is left here is how a mail is queued:
automatic mail (verification, acknowledgement) follows RFC 3834 and ARCHITECTURE rule 12,
never to an undeliverable address nor to a person who restricted processing (or objected),
and at most `auto_reply_limit` per recipient and
`auto_reply_global_limit` in all per `auto_reply_window`; a verification token is issued
only with the mail that carries it, and knows that mail's Message-ID (a permanent bounce of it
revokes the token); every mail threads onto the ticket (In-Reply-To, References). Agent
replies are not automatic (a restricted person still gets them). Composition and delivery
happen later, in the outbound worker, from the outbox row alone.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime, timedelta

import structlog

from mailgate.config import Config
from mailgate.log import mask_address
from mailgate.model import Address, MailKind, OutboxItem
from mailgate.msgid import MessageIds
from mailgate.privacy.tokens import new_token
from mailgate.store import IngestTx

log = structlog.get_logger(__name__)

MAX_REFERENCES = 20

Context = dict[str, str | int | None]


class Reactions:
    """Queue outgoing mail; every method runs inside a store unit of work."""

    def __init__(self, config: Config, msgids: MessageIds) -> None:
        self._outbound = config.outbound
        self._ttl = timedelta(seconds=config.verification.ttl)
        self._msgids = msgids

    def verification(
        self, tx: IngestTx, ticket_id: int, to: Address, *, sender: str, at: datetime
    ) -> int | None:
        """Queue the mail that lets `to` confirm the address `sender` wrote from, with a new
        token; None (and no token) if a limit says no."""
        token, digest = new_token()
        context: Context = {"token": token, "email": sender}
        # The token knows its mail: a permanent bounce of that mail revokes it.
        message_id = self._msgids.new(ticket_id)
        outbox_id = self.automatic(
            tx, "verification", ticket_id, to, context, at=at, message_id=message_id
        )
        if outbox_id is not None:
            tx.issue_token(sender, digest, at=at, expires_at=at + self._ttl, message_id=message_id)
        return outbox_id

    def automatic(
        self,
        tx: IngestTx,
        kind: MailKind,
        ticket_id: int,
        to: Address,
        context: Context,
        *,
        at: datetime,
        message_id: str | None = None,
    ) -> int | None:
        """Queue an automatic mail to `to`, unless a limit says no (then None)."""
        outbound = self._outbound
        if tx.undeliverable(to.email):
            log.info("automatic_mail_skipped", kind=kind, ticket_id=ticket_id, why="undeliverable")
            return None
        if _restricted(tx, to.email):
            log.info("automatic_mail_skipped", kind=kind, ticket_id=ticket_id, why="restricted")
            return None
        since = at - timedelta(seconds=outbound.auto_reply_window)
        if tx.automatic_mails_since(to.email, since) >= outbound.auto_reply_limit:
            log.info(
                "automatic_mail_skipped",
                kind=kind,
                ticket_id=ticket_id,
                why="rate limit",
                recipient=mask_address(to.email),
            )
            return None
        if tx.automatic_mails_since(None, since) >= outbound.auto_reply_global_limit:
            log.warning("automatic_mail_skipped", kind=kind, ticket_id=ticket_id, why="global cap")
            return None
        return self.queue(
            tx, kind, ticket_id, to, context, automatic=True, at=at, message_id=message_id
        )

    def queue(
        self,
        tx: IngestTx,
        kind: MailKind,
        ticket_id: int,
        to: Address,
        context: Context,
        *,
        automatic: bool,
        at: datetime,
        cc: Sequence[str] = (),
        message_id: str | None = None,
    ) -> int:
        """Queue a mail about the ticket, threaded onto it; return its outbox id."""
        latest, ids = tx.thread_ids(ticket_id)
        own = message_id or self._msgids.new(ticket_id)
        references = tuple(i for i in ids if i != own)[-MAX_REFERENCES:]
        item = OutboxItem(
            kind=kind,
            ticket_id=ticket_id,
            to=to,
            message_id=own,
            automatic=automatic,
            context={**context, "ticket_id": ticket_id},
            cc=tuple(cc),
            in_reply_to=latest,
            references=references,
        )
        return tx.enqueue(item, at=at)


def _restricted(tx: IngestTx, email: str) -> bool:
    """The person restricted processing (or objected): their mail is stored, no more
    (`privacy/rights.py`); no automatic mail goes to them."""
    person = tx.requester(email)
    return person is not None and person.state != "active"
