"""The `Received:` trace field mailgate prepends to every message it accepts, and the queue id
it names.

RFC 5321 section 4.4: an SMTP server that takes a message adds a trace field at its top, so
that each hop is on record (and loops can be counted). The form is Postfix's: the client's
HELO and address, our name, the protocol (RFC 3848: ESMTPS when TLS carried it; RFC 6531:
UTF8SMTP for SMTPUTF8 mail), the queue id, the TLS version and cipher in a comment, the
recipient when there is exactly one (RFC 5321 section 7.2: naming several would tell each of
them who else got the mail), and the date. No reverse DNS lookup is made: the address is
written as a literal, as Postfix writes "unknown [192.0.2.1]". What the client chose (the
HELO name) is cut to characters that cannot end the field, open or close a comment, or break
the clause it stands in.
"""

from __future__ import annotations

import ipaddress
import re
import uuid
from dataclasses import dataclass
from datetime import datetime
from email.utils import format_datetime

# Characters a domain or an address literal is written with; any other in a HELO name
# (white space, parentheses, ";", controls, non-ASCII) becomes "_".
_UNSAFE = re.compile(r"[^A-Za-z0-9.\-_:\[\]]")
_MAX_NAME = 255  # a domain name is at most 253 octets; a literal fits too
# A recipient is named only if it is a plain address: no comment, bracket or white space.
_PLAIN_ADDRESS = re.compile(r"[^\s()<>\\;\"]+@[^\s()<>\\;\"@]+")


def new_queue_id() -> str:
    """A fresh queue id: 20 upper-case hex digits (80 random bits)."""
    return uuid.uuid4().hex[:20].upper()


@dataclass(frozen=True, slots=True)
class Hop:
    """What the trace field records about one SMTP transaction."""

    helo: str | None
    peer_ip: str
    esmtp: bool  # EHLO (else HELO)
    smtputf8: bool
    tls: tuple[str, str] | None  # (version, cipher) when the session is encrypted
    recipients: tuple[str, ...]


def safe_name(name: str | None) -> str:
    """`name` (a HELO argument, our hostname) as it may stand in the field."""
    return _UNSAFE.sub("_", name or "")[:_MAX_NAME] or "unknown"


def address_literal(ip: str) -> str:
    """`[192.0.2.1]` or `[IPv6:2001:db8::1]` (RFC 5321 section 4.1.3)."""
    try:
        address = ipaddress.ip_address(ip)
    except ValueError:
        return "[unknown]"
    return f"[IPv6:{address}]" if address.version == 6 else f"[{address}]"


def protocol(hop: Hop) -> str:
    """The `with` value: SMTP, ESMTP or UTF8SMTP, and S when TLS carried it."""
    base = "UTF8SMTP" if hop.smtputf8 else "ESMTP" if hop.esmtp else "SMTP"
    return base + "S" if hop.tls and base != "SMTP" else base


def received_field(hop: Hop, *, hostname: str, queue_id: str, when: datetime) -> bytes:
    """The whole field, folded at its clauses, each line ending in CRLF."""
    lines = [
        f"Received: from {safe_name(hop.helo)} ({address_literal(hop.peer_ip)})",
        f"\tby {safe_name(hostname)} (mailgate) with {protocol(hop)} id {queue_id}",
    ]
    if hop.tls is not None:
        version, cipher = (safe_name(part) for part in hop.tls)
        lines.append(f"\t(version={version} cipher={cipher})")
    recipient = hop.recipients[0] if len(hop.recipients) == 1 else None
    date = format_datetime(when)
    if recipient is not None and _PLAIN_ADDRESS.fullmatch(recipient):
        lines.append(f"\tfor <{recipient}>; {date}")
    else:
        lines[-1] += f"; {date}"
    return "".join(f"{line}\r\n" for line in lines).encode("utf-8")
