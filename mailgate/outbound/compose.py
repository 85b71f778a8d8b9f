"""Outbox row -> EmailMessage: templates for the words, code for the headers.

Every header value that can hold customer data (names, subjects, Message-IDs we were sent)
passes `clean_line`, which removes CR, LF and other controls: this Python (3.11) does not
refuse them when serialising (CVE-2024-6923), so no customer text can start a header. It also
removes bidi overrides and zero-width characters, so a name or subject shows what it says.
"""

from __future__ import annotations

import email.policy
import re
from datetime import UTC, datetime
from email.headerregistry import Address as HeaderAddress
from email.message import EmailMessage
from email.utils import format_datetime
from typing import Any

from mailgate.config import Config
from mailgate.model import Address, OutboxItem
from mailgate.outbound.templates import Templates
from mailgate.text import clean_line

_PLAIN_MSGID = re.compile(r"[!-;=?-~]{1,998}")  # printable ASCII without space, < and >
MAX_SUBJECT = 200
_MULTILINE = frozenset({"body"})  # the agent's answer; every other variable is one line
EXPORT_FILENAME = "mailgate-export.zip"  # never the address: the name travels with the file


class Composer:
    """Build the message for an outbox row."""

    def __init__(self, config: Config, templates: Templates) -> None:
        self._templates = templates
        self._sender = Address(config.outbound.sender, config.outbound.sender_name)
        self._base_url = config.http.base_url
        self._tag_prefix = config.tickets.tag_prefix
        self._ttl_days = max(1, round(config.verification.ttl / 86400))
        self._privacy_ttl_days = max(1, round(config.privacy.ttl / 86400))

    @property
    def sender(self) -> str:
        return self._sender.email

    def variables(self, item: OutboxItem) -> dict[str, Any]:
        """What the templates see: the row's context, the tag and the verification link.

        One-line values (subject, names) pass `clean_line` here as well as at parse time: a row
        queued by an earlier version may hold bidi overrides that the mail's text would show.
        """
        found: dict[str, Any] = {
            key: clean_line(value) if isinstance(value, str) and key not in _MULTILINE else value
            for key, value in item.context.items()
        }
        found["tag"] = self.tag(item.ticket_id)
        token = found.pop("token", None)
        found.pop("export_blob", None)  # the attachment's file name in the store: not shown
        if item.kind == "verification":
            found["verify_url"] = f"{self._base_url}/verify/{token}"
            found["ttl_days"] = self._ttl_days
        elif item.kind == "privacy_confirm":
            found["confirm_url"] = f"{self._base_url}/privacy/confirm/{token}"
            found["ttl_days"] = self._privacy_ttl_days
        return found

    def tag(self, ticket_id: int | None) -> str:
        """The ticket's subject tag; a system mail (no ticket) has none."""
        return f"[{self._tag_prefix}{ticket_id}]" if ticket_id is not None else ""

    def compose(self, item: OutboxItem, *, attachment: bytes | None = None) -> EmailMessage:
        """Render and assemble, with `attachment` (a privacy export's zip) if given; raises
        ConfigError if a template is broken."""
        variables = self.variables(item)
        tag = self.tag(item.ticket_id)
        subject = _with_tag(
            clean_line(self._templates.mail(item.kind, "subject.txt", variables)), tag
        )
        text = self._templates.mail(item.kind, "txt", variables)
        html = self._templates.mail(item.kind, "html", variables)

        msg = EmailMessage(policy=email.policy.SMTP)
        msg["From"] = _mailbox(self._sender)
        # An automatic mail shows the bare address: a display name is the sender's own text,
        # and a forged From could use it to make mailgate mail an advertisement.
        msg["To"] = _mailbox(Address(item.to.email) if item.automatic else item.to)
        if item.cc:
            msg["Cc"] = ", ".join(_mailbox(Address(cc)) for cc in item.cc)
        msg["Subject"] = subject
        msg["Date"] = format_datetime(datetime.now(UTC))
        msg["Message-ID"] = f"<{item.message_id}>"
        thread = [i for i in item.references if _PLAIN_MSGID.fullmatch(i)]
        if item.in_reply_to and _PLAIN_MSGID.fullmatch(item.in_reply_to):
            msg["In-Reply-To"] = f"<{item.in_reply_to}>"
            thread = [i for i in thread if i != item.in_reply_to] + [item.in_reply_to]
        if thread:
            msg["References"] = " ".join(f"<{i}>" for i in thread)
        if item.automatic:  # RFC 3834; and no Outlook out-of-office in return
            msg["Auto-Submitted"] = "auto-replied"
            msg["X-Auto-Response-Suppress"] = "All"
        msg.set_content(text)
        msg.add_alternative(html, subtype="html")
        if attachment is not None:
            msg.add_attachment(
                attachment, maintype="application", subtype="zip", filename=EXPORT_FILENAME
            )
        return msg


def _with_tag(subject: str, tag: str) -> str:
    """The subject with the ticket's tag, at most MAX_SUBJECT characters.

    The tag is what threads the customer's answer (rule 4) when the client drops References,
    so a subject too long is cut before the tag, never through it: `Re: <long text>... [#12]`.
    A system mail has no tag (`tag` empty).
    """
    if not tag:
        return subject if len(subject) <= MAX_SUBJECT else subject[: MAX_SUBJECT - 3] + "..."
    if tag in subject and len(subject) <= MAX_SUBJECT:
        return subject
    text = subject.replace(tag, " ") if tag in subject else subject
    text = " ".join(text.split())
    room = MAX_SUBJECT - len(tag) - 1
    if len(text) > room:
        text = text[: room - 3].rstrip() + "..."
    return f"{text} {tag}".strip()


def _mailbox(address: Address) -> str:
    """`Name <addr>` with the name cleaned and encoded as RFC 2047 where needed."""
    name = clean_line(address.name or "")
    try:
        return str(HeaderAddress(display_name=name, addr_spec=address.email))
    except (ValueError, IndexError):  # an addr-spec the header parser will not take apart
        return address.email


def serialise(msg: EmailMessage, recipients: list[str]) -> bytes:
    """Bytes for the wire: CRLF lines; SMTPUTF8 only when an address needs it."""
    needs_utf8 = any(not r.isascii() for r in recipients)
    policy = email.policy.SMTPUTF8 if needs_utf8 else email.policy.SMTP
    return msg.as_bytes(policy=policy)
