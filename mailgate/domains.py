"""Domain names as DNS compares them (A-labels) and as people read them (U-labels).

A sender writes `anna@bücher.example` and signs with `d=xn--bcher-kva.example`: both name one
domain, so every comparison (DKIM `d=`, SPF, DMARC, organisational domains) is made on the
A-label form (IDNA 2008 with UTS 46 mapping, RFC 8616), and output shows the Unicode form.
"""

from __future__ import annotations

import idna

# Top-level names that the DNS never answers for: `localhost` and `invalid` (RFC 6761), `local`
# (multicast DNS, RFC 6762), `onion` (RFC 7686) and `alt` (RFC 9476). Mail from them, or from a
# dotless name, cannot be authenticated, so nothing is looked up for it. (`test`, `example`,
# `internal` and `home.arpa` are looked up: test rigs and private networks serve them.)
_NO_DNS_TLDS = frozenset({"localhost", "invalid", "local", "onion", "alt"})


def a_label(domain: str) -> str:
    """`domain` in lower-case A-label form; as given (lower-cased) if it is no valid IDN."""
    cleaned = domain.strip().rstrip(".").lower()
    if cleaned.isascii():
        return cleaned
    try:
        return idna.encode(cleaned, uts46=True).decode("ascii")
    except (idna.IDNAError, UnicodeError):
        return cleaned


def u_label(domain: str) -> str:
    """`domain` as people read it: A-labels decoded, anything undecodable left as it is."""
    try:
        return idna.decode(domain)
    except (idna.IDNAError, UnicodeError):
        return domain


def in_dns(domain: str) -> bool:
    """Tell whether the DNS could hold records for `domain` (a name, not an address literal
    such as `[192.0.2.1]`, with a dot, and no TLD the DNS never answers for)."""
    name = a_label(domain)
    if name.startswith("["):
        return False
    return "." in name and name.rpartition(".")[2] not in _NO_DNS_TLDS
