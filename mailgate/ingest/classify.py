"""Which mail is automatic (RFC 3834) and which is a bounce, from its headers and body.

An automatic mail is still stored on its ticket; it only never triggers automatic mail of
ours, and never reopens a closed ticket. The envelope-based rules (null sender) live in the
worker, which has the envelope. Bounces are read here as RFC 3464 reports first, then, for
mail from an MTA, as the other formats MTAs write (`mta_bounce`).
"""

from __future__ import annotations

import re
from email.message import Message as StdMessage

from mailgate.ingest.mta_bounce import from_an_mta, is_ndr, mta_failures, null_return_path
from mailgate.model import Bounce

_SUPPRESSING = {"all", "autoreply", "oof"}  # X-Auto-Response-Suppress values that cover us
_STATUS = re.compile(r"^Status:\s*([245]\.\d{1,3}\.\d{1,3})", re.IGNORECASE | re.MULTILINE)
_RECIPIENT = re.compile(
    r"^(?:Final|Original)-Recipient:\s*[^;\r\n]*;\s*<?([^\s<>;]+@[^\s<>;]+)>?",
    re.IGNORECASE | re.MULTILINE,
)
_MSGID = re.compile(r"<([^<>\s]{1,998})>")
# A returned header block quoted in a bounce's text (qmail, Exim, Domino): its Message-ID line.
_QUOTED_MSGID = re.compile(
    r"^[ \t>]*Message-ID:[ \t]*(?:\r?\n[ \t]+)?<([^<>\s]{1,998})>", re.IGNORECASE | re.MULTILINE
)
_RETURNED = ("message/rfc822", "text/rfc822-headers", "message/global", "message/global-headers")
_REPORTING_MTA = re.compile(r"^Reporting-MTA:\s*dns\s*;\s*([A-Za-z0-9.-]{1,253})\s*$", re.I | re.M)
MAX_REPORTED = 100
MAX_QUOTED_TEXT = 1024 * 1024  # of each text part searched for a quoted Message-ID line


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
    if null_return_path(headers):  # the delivering MTA says: a null sender, so no answer
        return "return-path"
    return None


def find_bounce(
    msg: StdMessage, headers: dict[str, list[str]], envelope_sender: str = "x"
) -> Bounce | None:
    """Read a bounce: an RFC 3464 report, or, for mail from an MTA, another format MTAs
    write (Exim, qmail, Exchange, Domino, ...); None for any other mail.

    `envelope_sender` is MAIL FROM ("" for the null sender, which bounces use).
    """
    report = _delivery_report(msg)
    if report is not None and report.failed:
        return report
    if report is None and not from_an_mta(headers, envelope_sender):
        return None
    failed = mta_failures(msg)
    if not failed and report is None and not is_ndr(headers):
        return None
    returned = [*(report.returned_ids if report else ()), *_returned_ids(msg, quoted=True)]
    return Bounce(tuple(failed[:MAX_REPORTED]), tuple(dict.fromkeys(returned)))


def _delivery_report(msg: StdMessage) -> Bounce | None:
    """Read a multipart/report; report-type=delivery-status (RFC 3464), or return None."""
    if msg.get_content_type() != "multipart/report":
        return None
    if str(msg.get_param("report-type", "")).lower() != "delivery-status":
        return None
    failed: list[tuple[str, str]] = []
    for part in msg.walk():
        ctype = part.get_content_type()
        if ctype in ("message/delivery-status", "message/global-delivery-status"):
            failed += _failed_recipients(_text_of(part))
    returned = _returned_ids(msg, quoted=False)
    return Bounce(tuple(failed[:MAX_REPORTED]), tuple(dict.fromkeys(returned)))


def reporting_mta(msg: StdMessage) -> str | None:
    """The host a delivery report names as its Reporting-MTA (`dns; mx.example.org`)."""
    for part in msg.walk():
        if part.get_content_type() in ("message/delivery-status", "message/global-delivery-status"):
            found = _REPORTING_MTA.search(_text_of(part)[:MAX_QUOTED_TEXT])
            if found:
                return found.group(1).rstrip(".").lower()
    return None


def _returned_ids(msg: StdMessage, *, quoted: bool) -> list[str]:
    """The Message-IDs of the mail a bounce returns: in its returned parts, and with `quoted`
    also in header blocks its text quotes (formats that return the mail inline)."""
    found: list[str] = []
    for part in msg.walk():
        ctype = part.get_content_type()
        if ctype in _RETURNED:
            found += _MSGID.findall(_message_id_header(_text_of(part)))
        elif quoted and ctype.startswith("text/") and not part.is_multipart():
            found += _QUOTED_MSGID.findall(_text_of(part)[:MAX_QUOTED_TEXT])
    return found


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
