"""Which mail is automatic (RFC 3834) and which is a bounce (RFC 3464), from its headers.

An automatic mail is still stored on its ticket; it only never triggers automatic mail of
ours, and never reopens a closed ticket. The envelope-based rules (null sender) live in the
worker, which has the envelope.
"""

from __future__ import annotations

import re
from email.message import Message as StdMessage

from mailgate.model import Bounce

_SUPPRESSING = {"all", "autoreply", "oof"}  # X-Auto-Response-Suppress values that cover us
_STATUS = re.compile(r"^Status:\s*([245]\.\d{1,3}\.\d{1,3})", re.IGNORECASE | re.MULTILINE)
_RECIPIENT = re.compile(
    r"^(?:Final|Original)-Recipient:\s*[^;\r\n]*;\s*<?([^\s<>;]+@[^\s<>;]+)>?",
    re.IGNORECASE | re.MULTILINE,
)
_MSGID = re.compile(r"<([^<>\s]{1,998})>")
MAX_REPORTED = 100


def automatic_reason(headers: dict[str, list[str]]) -> str | None:
    """Name the header that marks this mail as automatic, or None for a person's mail."""

    def first(name: str) -> str:
        return headers.get(name, [""])[0].strip().lower()

    auto_submitted = first("auto-submitted")
    if auto_submitted and auto_submitted.split(";")[0].strip() != "no":
        return "auto-submitted"
    if first("precedence") in ("bulk", "junk", "list"):
        return "precedence"
    if "list-id" in headers:
        return "list-id"
    suppress = {v.strip().lower() for v in first("x-auto-response-suppress").split(",")}
    if suppress & _SUPPRESSING:
        return "x-auto-response-suppress"
    if "x-autoreply" in headers or "x-autorespond" in headers:
        return "x-autoreply"
    return None


def find_bounce(msg: StdMessage) -> Bounce | None:
    """Read a multipart/report; report-type=delivery-status, or return None."""
    if msg.get_content_type() != "multipart/report":
        return None
    if str(msg.get_param("report-type", "")).lower() != "delivery-status":
        return None
    failed: list[tuple[str, str]] = []
    returned: list[str] = []
    for part in msg.walk():
        ctype = part.get_content_type()
        if ctype in ("message/delivery-status", "message/global-delivery-status"):
            failed += _failed_recipients(_text_of(part))
        elif ctype in ("message/rfc822", "text/rfc822-headers", "message/global"):
            returned += _MSGID.findall(_message_id_header(_text_of(part)))
    return Bounce(tuple(failed[:MAX_REPORTED]), tuple(dict.fromkeys(returned)))


def _text_of(part: StdMessage) -> str:
    try:
        data = part.as_bytes() if part.is_multipart() else part.get_payload(decode=True)
    except Exception:  # noqa: BLE001 - a broken report part is read as empty
        return ""
    return data.decode("utf-8", "replace") if isinstance(data, bytes) else ""


def _failed_recipients(report: str) -> list[tuple[str, str]]:
    """Pair each per-recipient block's recipient with its Status."""
    found = []
    for block in re.split(r"\r?\n\s*\r?\n", report):
        recipient, status = _RECIPIENT.search(block), _STATUS.search(block)
        if recipient and status and not status.group(1).startswith("2"):
            found.append((recipient.group(1).lower(), status.group(1)))
    return found


def _message_id_header(text: str) -> str:
    match = re.search(r"^Message-ID:\s*(.*(?:\r?\n[ \t].*)*)", text, re.IGNORECASE | re.MULTILINE)
    return match.group(1) if match else ""
