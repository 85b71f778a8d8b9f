"""The Store contract every backend implements, and nothing else.

Intake calls `receive`; the ingest worker works inside `ingesting()`, a unit of work whose
writes commit together (or not at all) with the inbound row's new state; the CLI reads.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import AbstractAsyncContextManager
from datetime import datetime
from typing import Protocol

from mailgate.model import (
    Address,
    Envelope,
    InboundRow,
    InboundState,
    ParsedMail,
    StoredAttachment,
    ThreadReason,
    Ticket,
    TicketStatus,
)


class IngestTx(Protocol):
    """Reads and writes of one ingest transaction. Nothing is visible until it commits."""

    async def inbound_state(self, inbound_id: str) -> InboundState | None: ...

    async def duplicate_ticket(self, message_id: str, sender: str) -> int | None:
        """Return the ticket already holding this Message-ID from this sender, if any."""

    async def tickets_by_message_ids(self, message_ids: Sequence[str]) -> list[int]:
        """Return tickets holding any of `message_ids`, newest message first."""

    async def ticket_status(self, ticket_id: int) -> TicketStatus | None: ...

    async def may_post(self, ticket_id: int, email: str) -> bool:
        """Tell whether `email` is the ticket's requester or one of its participants."""

    async def create_ticket(self, subject: str, requester: Address, *, at: datetime) -> int: ...

    async def add_message(
        self,
        ticket_id: int,
        mail: ParsedMail,
        *,
        inbound_id: str,
        reason: ThreadReason,
        attachments: Sequence[StoredAttachment],
        at: datetime,
    ) -> int: ...

    async def add_participants(self, ticket_id: int, emails: Sequence[str]) -> None: ...

    async def set_status(self, ticket_id: int, status: TicketStatus, *, at: datetime) -> None: ...

    async def finish_inbound(
        self, inbound_id: str, state: InboundState, *, reason: str | None, at: datetime
    ) -> None: ...


class Store(Protocol):
    async def receive(self, batch: Sequence[tuple[str, Envelope, bytes]]) -> None:
        """Commit raw messages durably, all in one transaction.

        Raises:
            StoreUnavailable: nothing was committed; the caller answers 451.
        """

    async def pending_inbound(self, *, limit: int) -> list[InboundRow]:
        """Return the oldest rows still in state 'received'."""

    async def get_inbound(self, inbound_id: str) -> InboundRow | None: ...

    async def list_inbound(self, state: InboundState) -> list[InboundRow]: ...

    async def requeue_inbound(self, inbound_id: str) -> bool:
        """Move a quarantined row back to 'received'; False if it was not quarantined."""

    def ingesting(self) -> AbstractAsyncContextManager[IngestTx]: ...

    async def list_tickets(self, *, status: TicketStatus | None = None) -> list[Ticket]: ...

    async def get_ticket(self, ticket_id: int) -> Ticket | None:
        """Return the ticket with its messages and their attachments."""

    async def set_ticket_status(self, ticket_id: int, status: TicketStatus) -> bool:
        """Change the status; False if there is no such ticket."""

    async def close(self) -> None: ...
