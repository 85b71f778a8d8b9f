"""The mails mailgate queues in reaction to events, written in the event's own transaction.

Ingest calls `after_customer_mail` and `relay_agent_reply` inside its transaction; the CLI's
`reply` calls `agent_reply`. Composition and delivery happen later, in the outbound worker,
from the outbox row alone. Automatic mails (verification, acknowledgement) follow RFC 3834
and ARCHITECTURE rule 6: never to automatic or bounced senders nor to a person who restricted
processing, at most `auto_reply_limit` per recipient and `auto_reply_global_limit` in all per
window. Agent replies are not automatic (a restricted person still gets them).
"""

from __future__ import annotations

from datetime import datetime, timedelta

import structlog

from mailgate.addresses import same_address
from mailgate.config import Config
from mailgate.log import mask_address
from mailgate.model import Address, MailKind, OutboxItem, ParsedMail
from mailgate.msgid import MessageIds
from mailgate.privacy.tokens import new_token
from mailgate.store import IngestTx

log = structlog.get_logger(__name__)

MAX_REFERENCES = 20


class Reactions:
    """Decide and queue outgoing mail for one event; every method runs inside a transaction."""

    def __init__(self, config: Config, msgids: MessageIds) -> None:
        self._config = config
        self._msgids = msgids

    def after_customer_mail(
        self, tx: IngestTx, mail: ParsedMail, *, ticket_id: int, created: bool, at: datetime
    ) -> list[int]:
        """Queue the verification mail and the acknowledgement that `mail` calls for."""
        queued = []
        sender = mail.sender.email
        requester = tx.requester(sender)
        if requester is not None and not requester.verified:
            if not tx.has_live_token(sender, at=at):
                to = Address(requester.email, requester.name)
                outbox_id = self.verification(tx, ticket_id, to, sender=sender, at=at)
                if outbox_id is not None:
                    queued.append(outbox_id)
        if created and self._config.outbound.acknowledge:
            _subject, to = tx.ticket_head(ticket_id)
            outbox_id = self._automatic(tx, "ticket_created", ticket_id, to, {}, at=at)
            if outbox_id is not None:
                queued.append(outbox_id)
        return queued

    def verification(
        self, tx: IngestTx, ticket_id: int, to: Address, *, sender: str, at: datetime
    ) -> int | None:
        """Queue the mail that lets `to` confirm the address `sender` wrote from, with a new
        token; None (and no token) if a limit says no. (Also `requesters update --email`.)"""
        token, digest = new_token()
        ttl = timedelta(seconds=self._config.verification.ttl)
        context: dict[str, str | int | None] = {"token": token, "email": sender}
        # The token knows its mail: a permanent bounce of that mail revokes it.
        message_id = self._msgids.new(ticket_id)
        outbox_id = self._automatic(
            tx, "verification", ticket_id, to, context, at=at, message_id=message_id
        )
        if outbox_id is not None:
            tx.issue_token(sender, digest, at=at, expires_at=at + ttl, message_id=message_id)
        return outbox_id

    def _automatic(
        self,
        tx: IngestTx,
        kind: MailKind,
        ticket_id: int,
        to: Address,
        context: dict[str, str | int | None],
        *,
        at: datetime,
        message_id: str | None = None,
    ) -> int | None:
        """Queue an automatic mail to `to`, unless a limit says no."""
        outbound = self._config.outbound
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
        return self._enqueue(
            tx, kind, ticket_id, to, context, automatic=True, at=at, message_id=message_id
        )

    def agent_reply(
        self, tx: IngestTx, ticket_id: int, body: str, *, agent: Address | None, at: datetime
    ) -> int:
        """Store an agent's response on the ticket and queue it to the requester."""
        subject, _requester = tx.ticket_head(ticket_id)
        message_id = self._msgids.new(ticket_id)
        author = agent or Address(self._config.outbound.sender, self._config.outbound.sender_name)
        note = ParsedMail(
            sender=author,
            to=(),
            cc=(),
            subject=subject,
            message_id=message_id,
            in_reply_to=(),
            references=(),
            body_text=body,
            body_html=None,
        )
        tx.add_message(
            ticket_id, note, inbound_id=None, reason="agent", attachments=(), at=at, author="agent"
        )
        return self.relay_agent_reply(
            tx, ticket_id, body, agent=agent, at=at, message_id=message_id
        )

    def relay_agent_reply(
        self,
        tx: IngestTx,
        ticket_id: int,
        body: str,
        *,
        agent: Address | None,
        at: datetime,
        message_id: str | None = None,
    ) -> int:
        """Queue an agent's (already stored) response to the requester, participants on Cc."""
        subject, requester = tx.ticket_head(ticket_id)
        expose = agent is not None and self._config.agents.expose_address
        context: dict[str, str | int | None] = {
            "subject": subject,
            "body": body,
            "requester_name": requester.name,
            "agent_name": agent.name if expose and agent else None,
            "agent_email": agent.email if expose and agent else None,
        }
        ours = self._config.smtp.accepts
        cc = tuple(
            email
            for email in tx.participants(ticket_id)
            if not same_address(email, requester.email)
            and not ours(email)
            and not self._config.agents.includes(email)
        )
        return self._enqueue(
            tx,
            "agent_reply",
            ticket_id,
            requester,
            context,
            automatic=False,
            at=at,
            cc=cc,
            message_id=message_id,
        )

    def _enqueue(
        self,
        tx: IngestTx,
        kind: MailKind,
        ticket_id: int,
        to: Address,
        context: dict[str, str | int | None],
        *,
        automatic: bool,
        at: datetime,
        cc: tuple[str, ...] = (),
        message_id: str | None = None,
    ) -> int:
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
            cc=cc,
            in_reply_to=latest,
            references=references,
        )
        return tx.enqueue(item, at=at)


def _restricted(tx: IngestTx, email: str) -> bool:
    """The person restricted processing (or objected): their mail is stored, no more
    (`privacy/rights.py`); no automatic mail goes to them."""
    person = tx.requester(email)
    return person is not None and person.state != "active"
