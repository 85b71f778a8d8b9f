"""The Store contract every backend implements, and nothing else.

Intake calls `receive`; the ingest worker hands `ingest()` a unit of work whose writes commit
together (or not at all) with the inbound rows' new state; the CLI reads.

Every method that takes an address compares it by `addresses.address_key` (full Unicode case
folding, the domain as an A-label) and stores it as spelled; none relies on the database's
collation.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Literal, Protocol, TypeVar

from mailgate.model import (
    Address,
    Author,
    Envelope,
    InboundRow,
    InboundState,
    OutboxItem,
    OutboxRow,
    OutboxState,
    ParsedMail,
    PrivacyAction,
    Queues,
    Requester,
    StoredAttachment,
    ThreadReason,
    Ticket,
    TicketStatus,
)
from mailgate.privacy.keyring import Keyring
from mailgate.spool import Spooled

TokenOutcome = Literal["verified", "used", "expired", "revoked", "unknown"]
# What a token is, seen without using it: "live" is one that `redeem_token` would verify with.
TokenState = Literal["live", "used", "expired", "revoked", "unknown"]

T = TypeVar("T")


class IngestTx(Protocol):
    """Reads and writes of one ingest transaction; nothing is visible until it commits.

    Synchronous on purpose: a whole ingest batch runs as one call on the store's writer, so a
    transaction costs one hand-over between threads instead of one per statement.
    """

    def inbound_state(self, inbound_id: str) -> InboundState | None: ...

    def duplicate_ticket(self, message_id: str, sender: str, body_digest: str) -> int | None:
        """Return the ticket already holding this message (its Message-ID from this sender,
        with this body digest), if any: a repeat delivery."""

    def has_message_id(self, message_id: str, sender: str) -> bool:
        """Tell whether a message with this Message-ID from this sender is stored."""

    def tickets_by_message_ids(self, message_ids: Sequence[str], sender: str) -> list[int]:
        """Return the tickets that `message_ids` name for `sender`, newest message first.

        An ID names the tickets of the messages that carried it from `sender`; failing those,
        the ticket of its one carrier. An ID carried by several senders (a copy planted by a
        stranger) names nothing for anyone else.
        """

    def ticket_status(self, ticket_id: int) -> TicketStatus | None: ...

    def create_ticket(
        self,
        subject: str,
        requester: Address,
        *,
        at: datetime,
        flags: Sequence[str] = (),
        rename: bool = False,
    ) -> int:
        """Open a ticket, adding the requester if new; `rename` lets a known one's display
        name change (only an authenticated sender's may)."""

    def add_message(
        self,
        ticket_id: int,
        mail: ParsedMail,
        *,
        inbound_id: str | None,
        reason: ThreadReason,
        attachments: Sequence[StoredAttachment],
        at: datetime,
        author: Author = "customer",
        auth: Mapping[str, object] | None = None,
        flags: Sequence[str] = (),
    ) -> int:
        """Store a message on the ticket; `inbound_id` is None for one written by mailgate."""

    def add_participants(self, ticket_id: int, emails: Sequence[str]) -> None: ...

    def participants(self, ticket_id: int) -> list[str]: ...

    def ticket_head(self, ticket_id: int) -> tuple[str, Address]:
        """Return the ticket's subject and requester."""

    def thread_ids(self, ticket_id: int) -> tuple[str | None, list[str]]:
        """Return the customer's latest Message-ID and the ticket's IDs, oldest first."""

    def requester(self, email: str) -> Requester | None: ...

    def has_live_token(self, email: str, *, at: datetime) -> bool:
        """Tell whether the requester holds an unused, unexpired verification token."""

    def issue_token(
        self,
        email: str,
        token_hash: str,
        *,
        at: datetime,
        expires_at: datetime,
        message_id: str | None = None,
    ) -> None:
        """Store a verification token's hash; `message_id` is the mail that carries it."""

    def revoke_tokens(
        self, *, hashes: Sequence[str] = (), message_ids: Sequence[str] = (), at: datetime
    ) -> int:
        """Revoke the unused tokens with these hashes or carried by these mails (a bounce
        returned them); return how many. A revoked token verifies no one. Privacy requests'
        links are tokens too: an unconfirmed one is revoked the same way."""

    def open_privacy_request(
        self,
        email: str,
        ticket_id: int,
        action: PrivacyAction,
        token_hash: str,
        *,
        at: datetime,
        expires_at: datetime,
        message_id: str | None,
    ) -> None:
        """Store a privacy request of the person with this address, its link's hash and the
        mail that carries it, bound to that address and the request's ticket; their older
        unconfirmed requests for the same action are revoked."""

    def automatic_mails_since(self, recipient: str | None, since: datetime) -> int:
        """Count automatic mails queued since `since`, to `recipient` or (None) to anyone."""

    def undeliverable(self, email: str) -> bool: ...

    def set_undeliverable(self, email: str, status: str | None, *, at: datetime) -> None:
        """Mark `email` undeliverable with a DSN status, or clear the mark (status None)."""

    def sent_to(self, message_id: str) -> list[str]:
        """The addresses (To and Cc) of the outgoing mail with this Message-ID."""

    def enqueue(self, item: OutboxItem, *, at: datetime, held_for: str | None = None) -> int:
        """Queue an outgoing mail, due now; return its outbox id.

        `item.ticket_id` None is a system mail: it makes no person of its recipient and is
        sealed under a key of its own, destroyed with the row once the mail is sent or has
        failed. With `held_for` (an address), the mail is not sent while the person who has
        that address now exists (an erasure's confirmation waits for the erasure; someone
        who writes in with the address later is another person).
        """

    def finish_outbox(
        self,
        outbox_id: int,
        state: OutboxState,
        *,
        error: str | None,
        retry_at: datetime | None,
        reply: str | None = None,
    ) -> None:
        """See `Store.finish_outbox`; here inside a transaction with other writes."""

    def set_status(self, ticket_id: int, status: TicketStatus, *, at: datetime) -> None: ...

    def defer_inbound(self, inbound_id: str, *, retry_at: datetime, count: bool = True) -> None:
        """Leave the row 'received' until `retry_at`, counting one more attempt at its sender
        checks unless `count` is false (it waits for something else: attachment space)."""

    def finish_inbound(
        self,
        inbound_id: str,
        state: InboundState,
        *,
        reason: str | None,
        at: datetime,
        ticket_id: int | None = None,
    ) -> None:
        """Set the row's final state; `ticket_id` names the ticket that holds the message
        already (a repeat delivery), whose requester its raw message then belongs to."""


class Store(Protocol):
    keys: Keyring

    @property
    def path(self) -> Path:
        """Where the parser process reads raw messages (with `keys`)."""

    async def receive(self, batch: Sequence[tuple[str, Envelope, bytes | Spooled]]) -> None:
        """Commit raw messages durably, all in one transaction; a spooled one is copied in
        from its file in pieces (it stays open until this returns).

        Raises:
            StoreUnavailable: nothing was committed; the caller answers 451.
        """

    async def pending_inbound(
        self,
        *,
        limit: int,
        max_bytes: int = 64 * 1024 * 1024,
        exclude: Sequence[str] = (),
    ) -> list[InboundRow]:
        """Return the oldest rows still 'received' and due (not deferred to later), but those
        in `exclude`: at most `limit`, and past the first row, no more than `max_bytes` of raw
        message in all."""

    async def get_inbound(self, inbound_id: str) -> InboundRow | None: ...

    async def list_inbound(self, state: InboundState) -> list[InboundRow]:
        """The rows in `state`, oldest first; no raw message is read for it."""

    async def recent_quarantined(self, limit: int) -> list[InboundRow]:
        """The `limit` rows quarantined last, newest first (`mailgate status`)."""

    async def read_raw(self, inbound_id: str, *, limit: int | None = None) -> bytes | None:
        """The raw message (only its first `limit` bytes, reading no more), or None if there
        is no such row."""

    async def copy_raw(self, inbound_id: str, write: Callable[[bytes], object]) -> bool:
        """Hand the raw message to `write` in pieces; False if there is no such row."""

    async def requeue_inbound(self, inbound_id: str) -> bool:
        """Move a quarantined row back to 'received'; False if it was not quarantined."""

    async def purge_inbound(self, inbound_id: str) -> bool:
        """Delete a quarantined row, raw message and all; False if it was not quarantined."""

    async def ingest(self, work: Callable[[IngestTx], T]) -> T:
        """Run `work` in one write transaction and return its result.

        Raises:
            StoreUnavailable: transient failure; nothing was written.
            StoreError: the work hit a constraint or a bug; nothing was written.
        """

    async def attachment_content(self, attachment_id: int, root: Path) -> bytes | None:
        """The content of a stored attachment (its file under `root`, opened), or None."""

    async def blob_names(self) -> set[str]:
        """The attachment files that rows name; any other file under the folder is garbage."""

    async def list_tickets(self, *, status: TicketStatus | None = None) -> list[Ticket]: ...

    async def get_ticket(self, ticket_id: int) -> Ticket | None:
        """Return the ticket with its messages and their attachments."""

    async def set_ticket_status(self, ticket_id: int, status: TicketStatus) -> bool:
        """Change the status; False if there is no such ticket."""

    async def list_requesters(self) -> list[Requester]: ...

    async def get_requester(self, email: str) -> Requester | None: ...

    async def verify_requester(self, email: str) -> bool:
        """Mark the requester verified; False if there is no such requester."""

    async def add_participant(self, ticket_id: int, email: str) -> bool:
        """Let `email` post on the ticket (an agent's decision); False if no such ticket."""

    async def redeem_token(self, token_hash: str) -> tuple[TokenOutcome, str | None]:
        """Use a verification token once; return the outcome and the requester's email."""

    async def peek_token(self, token_hash: str) -> TokenState:
        """Tell a verification token's state, reading only: nothing is used or changed.

        Raises:
            StoreUnavailable: transient failure.
            StoreError: any other failure of the database.
        """

    async def outbox_attachment(self, outbox_id: int, root: Path) -> bytes | None:
        """The file an outgoing mail attaches (a privacy export's zip, `export_blob` in its
        context), opened from its sealed blob under `root`; None if it is not stored."""

    async def claim_outbox(self, *, limit: int) -> list[OutboxRow]:
        """Move due 'queued' rows to 'sending', counting the attempt, and return them."""

    async def finish_outbox(
        self,
        outbox_id: int,
        state: OutboxState,
        *,
        error: str | None,
        retry_at: datetime | None,
        reply: str | None = None,
    ) -> None:
        """Record an attempt: 'sent', 'failed', or back to 'queued' due at `retry_at`;
        `reply` is the relay's whole reply text (None keeps the last one)."""

    async def requeue_sending(self) -> int:
        """After a crash: rows left 'sending' are queued again, due now (at-least-once)."""

    async def next_outbox_due(self) -> datetime | None: ...

    async def list_outbox(self, state: OutboxState | None = None) -> list[OutboxRow]: ...

    async def recent_delivery_errors(self, limit: int) -> list[OutboxRow]:
        """The `limit` rows whose last attempt failed (failed for good, or queued for a
        retry), newest first (`mailgate status`)."""

    async def retry_outbox(self, outbox_id: int) -> bool:
        """Make a queued or failed row due now; False if there is no such row (or it was sent)."""

    async def rewrap_message_keys(self, *, after: str = "", limit: int = 256) -> tuple[int, str]:
        """Re-wrap under the keyring's current master key the keys of raw messages still
        wrapped under a master key (not yet given to a ticket), for up to `limit` rows with
        queue ids after `after`, in one commit (`rekey`). Return how many were re-wrapped and
        where to go on from ("" once there are no more rows)."""

    async def message_keys_left(self) -> int:
        """How many raw messages' keys are wrapped under another master key than the current."""

    async def queues(self) -> Queues:
        """The inbound and outbox queues' depths by state and their oldest pending rows: one
        read, cheap enough for every health check (the pending rows are indexed)."""

    async def close(self) -> None: ...
