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

Privacy requests by mail (rule 18): the link that confirms one is automatic mail within the
same limits, but goes to a restricted person too (their rights are not processing for
support: restriction must not keep them from lifting it, getting a copy or being erased);
the answer to a confirmed request is not limited (each answers one click on a link that was)
and goes whatever the person's state. An erasure's answer is a system mail (no ticket), held
until the erasure is done.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime, timedelta

import structlog

from mailgate.config import Config
from mailgate.log import mask_address
from mailgate.model import Address, MailKind, OutboxItem, PrivacyAction
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
        self._privacy_ttl = timedelta(seconds=config.privacy.ttl)
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

    def privacy_confirmation(
        self, tx: IngestTx, ticket_id: int, to: str, action: PrivacyAction, *, at: datetime
    ) -> int | None:
        """Queue the mail with the link that confirms a privacy request of the person with
        address `to`, with a new token and its request; None (and no request) if a limit says
        no."""
        token, digest = new_token()
        message_id = self._msgids.new(ticket_id)  # a permanent bounce of it revokes the link
        context: Context = {"token": token, "action": action}
        outbox_id = self.automatic(
            tx,
            "privacy_confirm",
            ticket_id,
            Address(to),
            context,
            at=at,
            message_id=message_id,
            rights=True,
        )
        if outbox_id is not None:
            tx.open_privacy_request(
                to,
                ticket_id,
                action,
                digest,
                at=at,
                expires_at=at + self._privacy_ttl,
                message_id=message_id,
            )
        return outbox_id

    def privacy_answer(
        self,
        tx: IngestTx,
        kind: MailKind,
        ticket_id: int,
        to: str,
        context: Context,
        *,
        at: datetime,
    ) -> int:
        """Queue the answer to a confirmed privacy request, threaded onto its ticket."""
        return self.queue(tx, kind, ticket_id, Address(to), context, automatic=True, at=at)

    def farewell(self, tx: IngestTx, to: str, *, at: datetime) -> int:
        """Queue the mail that tells `to` their data was erased: a system mail (no ticket,
        nothing but the address, sealed under a key of its own), held until the person with
        that address (being erased) is gone."""
        item = OutboxItem(
            kind="privacy_erased",
            ticket_id=None,
            to=Address(to),
            message_id=self._msgids.system(),
            automatic=True,
            context={},
        )
        return tx.enqueue(item, at=at, held_for=to)

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
        rights: bool = False,
    ) -> int | None:
        """Queue an automatic mail to `to`, unless a limit says no (then None); `rights`: it
        serves the person's privacy rights, so a restriction does not stop it."""
        outbound = self._outbound
        if tx.undeliverable(to.email):
            log.info("automatic_mail_skipped", kind=kind, ticket_id=ticket_id, why="undeliverable")
            return None
        if not rights and _restricted(tx, to.email):
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
