"""Ticket threading (ARCHITECTURE rule 4): which ticket a message joins, and why.

A message joins ticket T when its In-Reply-To/References name a Message-ID stored for T or
issued by mailgate for T (its HMAC checked), or its subject carries T's tag, and its sender
is T's requester, a participant or an agent. Anything else opens a new ticket, so a stranger
can never append to someone else's ticket. A stored Message-ID names the ticket of the
message that carried it from that sender: a stranger who copies someone's Message-ID onto a
ticket of their own cannot make replies to it land there.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

from mailgate.model import ParsedMail, ThreadReason
from mailgate.store import IngestTx

# Reply prefixes of common clients and languages (RFC 5322 3.6.5 names only "Re:").
_REPLY_PREFIX = re.compile(
    r"^\s*(?:(?:re|aw|sv|vs|antw|ant|rif|odp|vá|ynt|atb|res|réf|ref|回复|回覆|答复|답장|ΑΠ|Отв)"
    r"\s*(?:\[\d+\]|\(\d+\))?\s*[:：]\s*)+",  # noqa: RUF001 - CJK clients send U+FF1A
    re.IGNORECASE,
)


def strip_reply_prefixes(subject: str) -> str:
    """Remove leading Re:/AW:/SV:/VS:/Antw:/답장: and similar, however often repeated."""
    return _REPLY_PREFIX.sub("", subject).strip()


def tag_pattern(prefix: str) -> re.Pattern[str]:
    return re.compile(r"\[" + re.escape(prefix) + r"(\d{1,18})\]")


def display_subject(subject: str, prefix: str) -> str:
    """The subject people see for a ticket: no reply prefixes, no ticket tag."""
    cleaned = strip_reply_prefixes(tag_pattern(prefix).sub("", subject))
    return strip_reply_prefixes(cleaned) or "(no subject)"


@dataclass(frozen=True, slots=True)
class ThreadMatch:
    ticket_id: int | None  # None: open a new ticket
    reason: ThreadReason


def find_thread(
    tx: IngestTx,
    mail: ParsedMail,
    *,
    tag_prefix: str,
    own_ticket: Callable[[str], int | None],
    is_agent: bool = False,
) -> ThreadMatch:
    """Choose the ticket `mail` belongs to, checking the sender may post there.

    `own_ticket` maps one of mailgate's Message-IDs to its ticket (None if not ours or forged).
    """

    def may_post(ticket_id: int) -> bool:
        if tx.ticket_status(ticket_id) is None:
            return False
        return is_agent or tx.may_post(ticket_id, mail.sender.email)

    referenced = list(dict.fromkeys([*reversed(mail.in_reply_to), *reversed(mail.references)]))
    issued = [t for t in map(own_ticket, referenced) if t is not None]
    stored = tx.tickets_by_message_ids(referenced, mail.sender.email)
    for ticket_id in dict.fromkeys([*issued, *stored]):
        if may_post(ticket_id):
            return ThreadMatch(ticket_id, "references")
    for tag in tag_pattern(tag_prefix).findall(mail.subject):
        if may_post(int(tag)):
            return ThreadMatch(int(tag), "subject_tag")
    return ThreadMatch(None, "new")
