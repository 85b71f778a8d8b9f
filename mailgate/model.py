"""Frozen values passed between layers. No I/O, no behaviour beyond formatting."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Literal, NamedTuple

TicketStatus = Literal["open", "closed"]
ThreadReason = Literal["new", "references", "subject_tag", "agent", "bounce"]
InboundState = Literal["received", "ingested", "quarantined"]
Author = Literal["customer", "agent", "system"]
MailKind = Literal[
    "verification",
    "ticket_created",
    "agent_reply",
    "privacy_confirm",  # the link that confirms a privacy request
    "privacy_export",  # the export, attached (or why it is not)
    "privacy_done",  # a restriction or objection applied
    "privacy_erased",  # the erasure done: a system mail, sealed under a key of its own
]
# The rights a privacy request by mail asks for (`tickets.privacy_action`).
PrivacyAction = Literal["export", "erase", "restrict", "object"]
OutboxState = Literal["queued", "sending", "sent", "failed"]
# How far a message's sender is proven (`ingest/trust.py` decides, `tickets.py` acts on it).
Trust = Literal["authenticated", "unauthenticated", "failed"]


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
class ForwardedClient:
    """The original client, as a trusted proxy in front reported it (Postfix XFORWARD)."""

    addr: str | None = None  # the client's IP address
    name: str | None = None  # its verified reverse name
    helo: str | None = None
    proto: str | None = None  # SMTP or ESMTP
    ident: str | None = None  # the proxy's queue id


@dataclass(frozen=True, slots=True)
class Envelope:
    """What the SMTP session saw, stored beside the raw bytes.

    `peer` and `helo` are the hop that talked to mailgate; behind a trusted proxy,
    `forwarded` is the client that talked to the proxy, which SPF judges.
    """

    mail_from: str
    rcpt_tos: tuple[str, ...]
    peer: str
    helo: str | None
    smtputf8: bool = False
    forwarded: ForwardedClient | None = None

    @property
    def peer_ip(self) -> str:
        """The IP address of the hop that talked to mailgate."""
        host = self.peer.rpartition(":")[0] if ":" in self.peer else self.peer
        return host.removeprefix("[").removesuffix("]")

    @property
    def client_ip(self) -> str:
        """The IP address of the client that sent the mail into our side (SPF's `i`)."""
        if self.forwarded is not None and self.forwarded.addr:
            return self.forwarded.addr
        return self.peer_ip

    @property
    def client_helo(self) -> str | None:
        """The HELO name of that client (SPF's `h`)."""
        if self.forwarded is not None and self.forwarded.addr:
            return self.forwarded.helo
        return self.helo


@dataclass(frozen=True, slots=True)
class InboundRow:
    """A message as intake committed it, waiting for (or done with) ingest, without its raw
    bytes: those are read where they are needed (the parser process, `quarantine show
    --raw`), so listing or ingesting many large messages never holds them all."""

    id: str
    envelope: Envelope
    size: int  # of the raw message, bytes
    state: InboundState
    received_at: datetime
    reason: str | None = None
    attempts: int = 0  # sender checks that ran into DNS trouble so far


@dataclass(frozen=True, slots=True)
class AttachmentPart:
    """An attachment or inline part cut out of a message, not yet stored."""

    filename: str | None
    content_type: str
    content: bytes
    inline: bool = False


@dataclass(frozen=True, slots=True)
class Bounce:
    """A delivery status notification: the recipients it reports and the mail it returns."""

    failed: tuple[tuple[str, str], ...]  # (recipient, status such as "5.1.1")
    returned_ids: tuple[str, ...]  # Message-IDs found in the returned message or headers
    tokens: tuple[str, ...] = ()  # hashes of verification tokens in the returned copy

    @property
    def permanent(self) -> tuple[str, ...]:
        return tuple(rcpt for rcpt, status in self.failed if status.startswith("5"))


@dataclass(frozen=True, slots=True)
class DkimRef:
    """One DKIM-Signature field as the parser read it; verified later, if it can matter."""

    index: int  # among the message's DKIM-Signature fields, the topmost being 0
    domain: str  # d=, lower-case A-label
    selector: str  # s=
    partial_body: bool = False  # l= signs only part of the body; the rest could be anything
    signed: frozenset[str] = frozenset()  # h=: the header fields it covers, lower case


@dataclass(frozen=True, slots=True)
class SenderEvidence:
    """What the header says about who wrote the message, read from the parser's one view of
    the header block, for authentication to judge (ARCHITECTURE rule 5)."""

    from_fields: int = 1
    from_mailboxes: int = 1  # mailboxes in the From fields, valid or not
    from_missing: bool = False  # no usable From: the envelope sender is the requester
    bare_line_ending: bool = False  # a CR or LF in the header that is not part of a CRLF
    repeated: tuple[str, ...] = ()  # fields that may occur once but occur more often
    signatures: tuple[DkimRef, ...] = ()
    authentication_results: tuple[str, ...] = ()  # raw values, topmost first

    @property
    def untrusted_shape(self) -> str | None:
        """Why no check can vouch for this header, or None (RFC 7489 6.6.1, RFC 5322 2.2)."""
        if self.bare_line_ending:
            return "bare_line_ending"
        if self.from_fields > 1 or self.from_mailboxes > 1:
            return "multiple_from"
        if self.repeated:
            # DKIM covers the last instance of a field, readers take the first: a signed mail
            # with a Subject or Cc added on top would pass with the attacker's words.
            return "repeated_fields"
        return None

    @property
    def flags(self) -> list[str]:
        """Message flags for the header's shape, whatever authentication made of it."""
        shape = self.untrusted_shape
        return [*([shape] if shape else []), *(["from_missing"] if self.from_missing else [])]


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
    automatic: str | None = None  # why the mail is automatic (RFC 3834), if it is
    bounce: Bounce | None = None
    reply_to: tuple[Address, ...] = ()
    evidence: SenderEvidence = field(default_factory=SenderEvidence)
    body_digest: str | None = None  # SHA-256 of the raw body (parse.body_digest); dedupe


@dataclass(frozen=True, slots=True)
class StoredAttachment:
    """An attachment whose content is in a sealed file (`store/blobs.py`): `blob` names the
    file; `key` opens it and travels only from the parser process to the ingest transaction,
    which wraps it under the owner's data key (it is empty when read back)."""

    filename: str | None
    content_type: str
    size: int
    sha256: str
    inline: bool = False
    blob: str = ""
    key: bytes = field(default=b"", repr=False)
    id: int | None = None


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
    author: Author = "customer"
    attachments: tuple[StoredAttachment, ...] = ()
    auth: dict[str, object] | None = None  # sender authentication results, if checked
    flags: tuple[str, ...] = ()


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
    flags: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class IngestOutcome:
    """What ingest did with one inbound row."""

    inbound_id: str
    state: InboundState
    ticket_id: int | None = None
    created: bool = False
    duplicate: bool = False
    reason: str | None = None
    mails_queued: int = 0


@dataclass(frozen=True, slots=True)
class Requester:
    email: str
    name: str | None
    verified: bool
    created_at: datetime
    verified_at: datetime | None = None
    undeliverable: str | None = None  # the DSN status of a permanent bounce, until it writes in
    state: str = "active"  # or "restricted": stored, but no processing beyond storage
    objected: bool = False


@dataclass(frozen=True, slots=True)
class OutboxItem:
    """An outgoing mail to queue: which template, to whom, and the variables it renders.

    `context` holds only what the template shows; `in_reply_to`/`references` thread it.
    `ticket_id` None is a system mail: about no ticket, to no person (an erasure's
    confirmation, which outlives the person it tells).
    """

    kind: MailKind
    ticket_id: int | None
    to: Address
    message_id: str
    automatic: bool
    context: dict[str, str | int | None]
    cc: tuple[str, ...] = ()
    in_reply_to: str | None = None
    references: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class OutboxRow:
    id: int
    item: OutboxItem
    state: OutboxState
    attempts: int
    last_error: str | None
    created_at: datetime
    next_attempt_at: datetime
    sent_at: datetime | None = None
    reply: str | None = None  # the relay's whole reply to the last attempt


# Why ingest left a row alone: something else (a replay) finished it meanwhile.
ALREADY_PROCESSED = "already processed"


@dataclass(frozen=True, slots=True)
class Queue:
    """One queue's depth by state and its oldest row still to be worked on."""

    by_state: dict[str, int]
    oldest_pending: datetime | None  # inbound 'received', outbox 'queued' or 'sending'
    # Since when the row that has waited longest for its turn has been due: a row deferred
    # to a later retry (DNS trouble, the relay's 4xx) is not due, and counts from its retry
    # time once it is. How far behind the worker is, where `oldest_pending` is how old.
    oldest_due: datetime | None = None


@dataclass(frozen=True, slots=True)
class Queues:
    """What `mailgate status`, `/healthz`, `/metrics` and systemd's STATUS= report."""

    inbound: Queue
    outbox: Queue


@dataclass(frozen=True, slots=True)
class AuditRecord:
    """What was done to personal data: no personal data itself (`privacy/audit.py`)."""

    at: datetime
    action: str  # export, erase, restrict, unrestrict, object, correct, quarantine_purge, ...
    via: str  # the command or link: cli, mail, resume, reconcile, retention, ...
    subject: str | None  # keyed hash of the person's address; None when no person is named
    counts: dict[str, int]
    reason: str | None = None  # an erasure's category: request, under-16, other
    id: int | None = None
