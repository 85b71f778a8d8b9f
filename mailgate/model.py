"""Frozen values passed between layers. No I/O, no behaviour beyond formatting."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Literal, NamedTuple

TicketStatus = Literal["open", "closed"]
ThreadReason = Literal["new", "references", "subject_tag"]
InboundState = Literal["received", "ingested", "quarantined"]


class HostPort(NamedTuple):
    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@dataclass(frozen=True, slots=True)
class Address:
    """A normalised addr-spec and its decoded display name."""

    email: str
    name: str | None = None


@dataclass(frozen=True, slots=True)
class Envelope:
    """What the SMTP session saw, stored beside the raw bytes."""

    mail_from: str
    rcpt_tos: tuple[str, ...]
    peer: str
    helo: str | None
    smtputf8: bool = False


@dataclass(frozen=True, slots=True)
class InboundRow:
    """A raw message as intake committed it, waiting for (or done with) ingest."""

    id: str
    envelope: Envelope
    raw: bytes
    state: InboundState
    received_at: datetime
    reason: str | None = None


@dataclass(frozen=True, slots=True)
class AttachmentPart:
    """An attachment or inline part cut out of a message, not yet stored."""

    filename: str | None
    content_type: str
    content: bytes
    inline: bool = False


@dataclass(frozen=True, slots=True)
class ParsedMail:
    """Everything ingest needs from one message, decoded to text."""

    sender: Address
    to: tuple[Address, ...]
    cc: tuple[Address, ...]
    subject: str
    message_id: str | None
    in_reply_to: tuple[str, ...]
    references: tuple[str, ...]
    body_text: str
    body_html: str | None
    attachments: tuple[AttachmentPart, ...] = ()


@dataclass(frozen=True, slots=True)
class StoredAttachment:
    filename: str | None
    content_type: str
    size: int
    sha256: str
    inline: bool = False


@dataclass(frozen=True, slots=True)
class Message:
    id: int
    ticket_id: int
    sender: Address
    subject: str
    body_text: str
    body_html: str | None
    message_id: str | None
    received_at: datetime
    thread_reason: ThreadReason
    attachments: tuple[StoredAttachment, ...] = ()


@dataclass(frozen=True, slots=True)
class Ticket:
    id: int
    subject: str
    status: TicketStatus
    requester: Address
    created_at: datetime
    updated_at: datetime
    message_count: int
    messages: tuple[Message, ...] = field(default=())


@dataclass(frozen=True, slots=True)
class IngestOutcome:
    """What ingest did with one inbound row."""

    inbound_id: str
    state: InboundState
    ticket_id: int | None = None
    created: bool = False
    duplicate: bool = False
    reason: str | None = None
