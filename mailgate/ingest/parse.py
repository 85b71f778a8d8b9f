"""Raw bytes -> ParsedMail.

The MIME structure is read by `mime.read_message`, under hard limits (depth, parts, header
sizes) that hostile mail cannot get past; the stdlib parses only single capped header blocks
and decodes payloads. Headers are decoded here from their raw values (RFC 2047 words, raw
UTF-8, mislabelled charsets); address headers by `address_list`, which never decodes inside
an addr-spec. Who wrote the message is decided here (ARCHITECTURE rule 5): the first valid
From mailbox; failing that, the envelope sender, and the message says so (`from_missing`).
Raises `Unparseable` only when neither names anyone (no usable From and a null sender);
everything else degrades to "what could be read", and a message cut by a limit says so at the
end of its body.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import replace
from email.message import Message as StdMessage

from dkim.util import parse_tag_value

from mailgate.addresses import EmailNotValidError, validate_address
from mailgate.domains import a_label
from mailgate.errors import Unparseable
from mailgate.ingest.address_list import Mailbox, mailboxes
from mailgate.ingest.classify import automatic_reason, find_bounce, reporting_mta
from mailgate.ingest.mime import LIMIT_NOTES, MAX_DEPTH, HeaderView, read_message
from mailgate.ingest.returned import bounce_tokens
from mailgate.model import Address, AttachmentPart, Bounce, DkimRef, ParsedMail, SenderEvidence
from mailgate.privacy.tokens import redact_token_bytes, redact_tokens
from mailgate.text import (
    clean_body,
    clean_line,
    codec_for,
    decode_bytes,
    decode_header_text,
    html_to_text,
)

MAX_REFERENCES = 100
MAX_ADDRESSES = 100  # kept from one address header
MAX_ADDRESSES_READ = 1000  # looked at in one address header, valid or not
MAX_FROM_MAILBOXES = 100  # looked at in the From fields; the first valid one is the requester
MAX_FILENAME = 255
MAX_SIGNATURES = 10  # DKIM-Signature fields read; authentication checks fewer still
MAX_AUTHENTICATION_RESULTS = 20
# Fields a message may hold once at most (RFC 5322 3.6), From aside (counted on its own).
_SINGLE_FIELDS = (
    "sender",
    "reply-to",
    "to",
    "cc",
    "message-id",
    "in-reply-to",
    "references",
    "subject",
    "date",
)
_MSGID = re.compile(r"<([^<>\s]{1,998})>")
_FOLD = re.compile(r"\r?\n(?=[ \t])")


def parse_mail(raw: bytes, envelope_sender: str = "") -> ParsedMail:
    """Parse one message; `envelope_sender` (MAIL FROM, "" for the null sender) stands in
    for a missing or unusable From. Raise `Unparseable` if neither names a sender."""
    msg, limits, header = read_message(raw)
    mail = _extract(msg, header, envelope_sender, raw)
    if not limits:
        return mail
    # The agent must know that the ticket does not show all of the message.
    notes = "\n".join(f"[mailgate: {LIMIT_NOTES[name]}]" for name in sorted(limits))
    return replace(mail, body_text=f"{mail.body_text}\n\n{notes}".strip())


def _extract(msg: StdMessage, header: HeaderView, envelope_sender: str, raw: bytes) -> ParsedMail:
    headers = _raw_headers(msg)
    from_fields = headers.get("from", [])
    written = list(mailboxes(from_fields, limit=MAX_FROM_MAILBOXES))
    bounce = _safe_bounce(msg, headers, envelope_sender, raw)
    mta = reporting_mta(msg) if bounce is not None else None
    sender, from_missing = _sender(written, envelope_sender, mta)
    evidence = SenderEvidence(
        from_fields=len(from_fields),
        from_mailboxes=len(written),
        from_missing=from_missing,
        bare_line_ending=header.bare_line_ending,
        repeated=tuple(name for name in _SINGLE_FIELDS if len(headers.get(name, ())) > 1),
        signatures=_dkim_signatures(headers.get("dkim-signature", [])),
        authentication_results=tuple(headers.get("authentication-results", []))[
            :MAX_AUTHENTICATION_RESULTS
        ],
    )
    body = _Body()
    body.walk(msg, depth=0)
    body_text, body_html, attachments = body.text(), body.html, tuple(body.attachments)
    if bounce is not None:  # it may return our verification mail: keep no link of it
        body_text = redact_tokens(body_text)
        body_html = redact_tokens(body_html) if body_html is not None else None
        attachments = tuple(replace(a, content=redact_token_bytes(a.content)) for a in attachments)
    return ParsedMail(
        sender=sender,
        to=_addresses(headers, "to"),
        cc=_addresses(headers, "cc"),
        subject=decode_header_text(headers.get("subject", [""])[0]),
        message_id=_first_msgid(headers.get("message-id", [""])[0]),
        in_reply_to=tuple(_MSGID.findall(" ".join(headers.get("in-reply-to", []))))[:10],
        references=tuple(_MSGID.findall(" ".join(headers.get("references", []))))[-MAX_REFERENCES:],
        body_text=body_text,
        body_html=body_html,
        attachments=attachments,
        automatic=automatic_reason(headers),
        reply_to=_addresses(headers, "reply-to"),
        bounce=bounce,
        evidence=evidence,
        body_digest=body_digest(raw, header.body_start),
    )


def _dkim_signatures(values: list[str]) -> tuple[DkimRef, ...]:
    """The DKIM-Signature fields that name a domain and a selector (the first few)."""
    found = []
    for index, value in enumerate(values[:MAX_SIGNATURES]):
        try:
            tags = parse_tag_value(value.encode("utf-8", "surrogateescape"))
            domain = tags[b"d"].decode("utf-8").strip()
            selector = tags[b"s"].decode("ascii").strip()
        except Exception:  # noqa: BLE001, S112 - a malformed signature can verify nothing
            continue
        signed = frozenset(
            name.strip().lower()
            for name in tags.get(b"h", b"").decode("ascii", "replace").split(":")
        )
        if domain and selector:
            found.append(
                DkimRef(index, a_label(domain), selector, partial_body=b"l" in tags, signed=signed)
            )
    return tuple(found)


def _safe_bounce(
    msg: StdMessage, headers: dict[str, list[str]], envelope_sender: str, raw: bytes
) -> Bounce | None:
    """The bounce `msg` is, with the verification tokens it returns; None if it is none."""
    try:
        bounce = find_bounce(msg, headers, envelope_sender)
        return replace(bounce, tokens=bounce_tokens(msg, raw)) if bounce else None
    except Exception:  # noqa: BLE001 - a malformed report is kept as an ordinary mail
        return None


def _raw_headers(msg: StdMessage) -> dict[str, list[str]]:
    """Map lower-cased header names to their raw, unfolded values, in order."""
    found: dict[str, list[str]] = {}
    for name, value in msg.raw_items():
        found.setdefault(name.lower().strip(), []).append(_FOLD.sub("", str(value)))
    return found


def _first_msgid(value: str) -> str | None:
    match = _MSGID.search(value)
    if match:
        return clean_line(match.group(1))
    bare = clean_line(value)
    return bare[:998] or None


def body_digest(raw: bytes, start: int) -> str:
    """SHA-256 of the body after the header block, trailing line endings left out.

    It tells a retry of the same message (an SMTP client that never saw our 250 sends the
    same bytes again) from another message under the same Message-ID and sender, which is
    kept. The header is left out: every relay adds its own Received fields to a retry.
    """
    end = len(raw)
    while end > start and raw[end - 1] in b"\r\n":
        end -= 1
    return hashlib.sha256(memoryview(raw)[start:end]).hexdigest()


def _parse_addresses(values: list[str], *, limit: int = MAX_ADDRESSES) -> list[Address]:
    """The first `limit` valid addresses among the first MAX_ADDRESSES_READ of `values`.

    Validating costs tens of microseconds an address, and a 64 KiB field holds 20,000.
    """
    found: list[Address] = []
    for written in mailboxes(values, limit=MAX_ADDRESSES_READ):
        if len(found) == limit:
            break
        address = _valid(written)
        if address is not None:
            found.append(address)
    return found


def _valid(written: Mailbox) -> Address | None:
    """The mailbox as an Address, its addr-spec taken literally (never decoded), if valid."""
    if written.addr_spec is None:
        return None
    try:
        return Address(validate_address(written.addr_spec), written.name)
    except EmailNotValidError:
        return None


def _sender(
    written: list[Mailbox], envelope_sender: str, reporting_mta: str | None = None
) -> tuple[Address, bool]:
    """Who wrote the message, and whether the envelope had to say so (no usable From).

    The first valid From mailbox; then MAIL FROM, which is where RFC 3834 sends automatic
    answers anyway. A null sender with no usable From names nobody, unless the message is a
    bounce whose report names the MTA that wrote it (Courier's From is `<@>`): then its
    MAILER-DAEMON.
    """
    for mailbox in written:
        address = _valid(mailbox)
        if address is not None:
            return address, False
    if not envelope_sender and reporting_mta:
        try:
            return Address(validate_address(f"MAILER-DAEMON@{reporting_mta}")), True
        except EmailNotValidError:
            pass
    if not envelope_sender:
        raise Unparseable("no usable From and a null envelope sender")
    try:
        return Address(validate_address(envelope_sender)), True
    except EmailNotValidError:
        raise Unparseable("no usable From and an unusable envelope sender") from None


def _addresses(headers: dict[str, list[str]], name: str) -> tuple[Address, ...]:
    return tuple(_parse_addresses(headers.get(name, [])))


def sanitise_filename(name: str | None) -> str | None:
    """Keep only the last path component, without control characters, at most 255 chars.

    The result is metadata for people; files are stored by content hash, never by this name.
    """
    if not name:
        return None
    name = clean_line(name).replace("\\", "/").rsplit("/", 1)[-1].strip().lstrip(".")
    if not name:
        return None
    if len(name) > MAX_FILENAME:
        stem, dot, ext = name.rpartition(".")
        ext = ext if dot and len(ext) <= 16 else ""
        name = (stem if dot else name)[: MAX_FILENAME - len(ext) - 1] + (f".{ext}" if ext else "")
    return name


class _Body:
    """Walks the MIME tree: the first text parts become the body, the rest attachments."""

    def __init__(self) -> None:
        self.plain: list[str] = []
        self.html: str | None = None
        self.attachments: list[AttachmentPart] = []

    def text(self) -> str:
        if self.plain:
            return clean_body("\n\n".join(self.plain)).strip()
        return html_to_text(self.html) if self.html else ""

    def walk(self, part: StdMessage, *, depth: int) -> None:
        ctype = _content_type(part)
        if part.is_multipart() and ctype.startswith("multipart/") and depth < MAX_DEPTH:
            children = part.get_payload()
            for child in children if isinstance(children, list) else []:
                if isinstance(child, StdMessage):
                    self.walk(child, depth=depth + 1)
            return
        disposition = _safe(part.get_content_disposition) or "inline"
        filename = _filename(part)
        if ctype in ("text/plain", "text/html") and disposition == "inline" and not filename:
            text = decode_bytes(_payload(part), _safe(part.get_content_charset))
            if ctype == "text/plain":
                self.plain.append(text)
                return
            if self.html is None:
                self.html = clean_body(text)
                return
        self.attachments.append(
            AttachmentPart(
                filename=sanitise_filename(filename),
                content_type=ctype,
                content=_payload(part),
                inline=disposition == "inline",
            )
        )


def _safe(getter: object) -> str | None:
    try:
        value = getter()  # type: ignore[operator]
    except Exception:  # noqa: BLE001 - malformed parameters make these raise anything
        return None
    return str(value) if value is not None else None


def _content_type(part: StdMessage) -> str:
    return clean_line(_safe(part.get_content_type) or "application/octet-stream").lower()


def _filename(part: StdMessage) -> str | None:
    """The part's file name, from Content-Disposition, else Content-Type's `name`.

    Not `Message.get_filename`: it decodes an RFC 2231 value (`filename*=utf-7''...`) with
    whatever Python codec the sender names; here its bytes go through `decode_bytes`, which
    decodes only mail charsets. A plain value may hold RFC 2047 words (Outlook writes them).
    """
    for header, name in (("content-disposition", "filename"), ("content-type", "name")):
        try:
            value = part.get_param(name, header=header)
        except Exception:  # noqa: BLE001, S112 - malformed parameters name no file
            continue
        if isinstance(value, tuple):  # RFC 2231: (charset, language, the bytes as str)
            charset, _language, text = value
            data = text.encode("latin-1", "replace")
            codec = codec_for(charset)  # the declared charset, if it is one of mail's
            return (data.decode(codec, "replace") if codec else decode_bytes(data, None)) or None
        if value:
            return decode_header_text(value) or None
    return None


def _payload(part: StdMessage) -> bytes:
    """Return the decoded content bytes; for a message/* part, the raw message it holds."""
    try:
        if part.is_multipart():  # only a tree built by hand: `read_message` makes none here
            return part.as_bytes()
        data = part.get_payload(decode=True)
    except Exception:  # noqa: BLE001 - bad base64 or a broken nested message
        return b""
    return data if isinstance(data, bytes) else b""
