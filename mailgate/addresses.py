"""Mail addresses: which ones mailgate takes, and when two of them name the same mailbox.

Two forms of every address. The *spelling* is the address as the sender wrote it (normalised
by email-validator: NFC, unneeded quotes dropped, the domain lower-cased): it is what people
see and where mail to them goes. The *key* (`address_key`) is what every comparison uses
(requester, participant, agent, support address, dedupe, undeliverable): the local part with
full Unicode case folding (`STRASSE` and `straße` are one key; SQLite's `NOCASE` folds ASCII
only) and the domain as a lower-case A-label. Strictly a local part is case-sensitive (RFC 5321
2.4), but no mail system in use treats `Anna@` and `anna@` as two people, and a helpdesk that
did would split one customer into two requesters.

Syntax is checked; deliverability is not mailgate's business: dotless hosts (`root@vm`, which
swaks sends), special-use and reserved names (`localhost`, `.local`, `.test`, `.example`,
`.invalid`, `.internal`), quoted local parts and address literals are all addresses. What is
refused is what could turn into *another* address in other software: an RFC 2047 encoded word
in a local part (decoded by some parsers into `victim@example.com>`, the 2024 "splitting the
email atom" attacks; RFC 2047 section 5 forbids encoded words in an addr-spec) and a quoted
local part that holds `@`, `<` or `>`.

This is the one place that validates and keys addresses (config, the CLI, the parser and the
store all come here), so that the rule can move when requesters become persons.
"""

from __future__ import annotations

import unicodedata

import email_validator
from email_validator import EmailNotValidError, EmailSyntaxError, validate_email

from mailgate.domains import a_label

__all__ = ["EmailNotValidError", "address_key", "same_address", "validate_address"]

# email-validator refuses special-use and reserved names (localhost, .local, .test, .invalid,
# .onion, .arpa) on every call, whatever its options; this module attribute is its documented
# switch. mailgate takes mail from test rigs and private networks as well as the Internet.
email_validator.SPECIAL_USE_DOMAIN_NAMES = []

# Characters that end an address or start another one: inside a quoted local part they make an
# address that other software can split (`"victim@example.com>"@attacker.example`).
_SPLITTING = frozenset("@<>")


def validate_address(address: str) -> str:
    """Return `address` normalised (the spelling mailgate keeps), or raise EmailNotValidError.

    A trailing dot on the domain (the DNS root, `x@example.org.`) is dropped, as Postfix
    drops it: RFC 5321 has no such domain form, and mail to it would be refused.
    """
    text = address.strip()
    if text.endswith(".") and "@" in text:
        text = text[:-1]
    normalised = validate_email(
        text,
        check_deliverability=False,
        globally_deliverable=False,  # dotless hosts: root@vm
        allow_smtputf8=True,
        allow_quoted_local=True,
        allow_domain_literal=True,
    ).normalized
    local = normalised.rpartition("@")[0]
    if "=?" in local:
        raise EmailSyntaxError("an encoded word (RFC 2047) is not allowed before the @-sign")
    if local.startswith('"') and _SPLITTING.intersection(local):
        raise EmailSyntaxError("a quoted local part may not hold @, < or >")
    return normalised


def address_key(address: str) -> str:
    """The form two spellings of one mailbox share: the local part case-folded (full Unicode
    folding, canonically composed), the domain a lower-case A-label. Never raises."""
    local, at, domain = address.strip().rpartition("@")
    if not at:
        return _fold(address.strip())
    return f"{_fold(local)}@{a_label(domain)}"


def same_address(first: str, second: str) -> bool:
    """Tell whether two addresses name the same mailbox."""
    return address_key(first) == address_key(second)


def _fold(text: str) -> str:
    # Canonical caseless matching (Unicode 3.13, D145): NFD before folding, so that a
    # precomposed and a decomposed letter fold alike; NFC after, to store one form.
    return unicodedata.normalize("NFC", unicodedata.normalize("NFD", text).casefold())
