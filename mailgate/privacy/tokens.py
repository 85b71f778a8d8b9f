"""Single-use link tokens: 32 random bytes, URL-safe; the store keeps only their SHA-256.

A token also travels in copies of the mail that carried it: a bounce returns the
verification mail (or a privacy request's confirmation mail), whole or in part. `find_tokens`
and `redact_tokens` let ingest recognise such a copy (its tokens are then revoked) and keep
the link out of what it stores. Both kinds of link are found: `/verify/<token>` and
`/privacy/confirm/<token>`.
"""

from __future__ import annotations

import hashlib
import re
import secrets

TOKEN_BYTES = 32
# `secrets.token_urlsafe(32)`: 43 characters of the URL-safe base64 alphabet, no padding.
_LINK = re.compile(r"/(verify|privacy/confirm)/([A-Za-z0-9_-]{43})(?![A-Za-z0-9_-])")
_LINK_BYTES = re.compile(rb"/(verify|privacy/confirm)/[A-Za-z0-9_-]{43}(?![A-Za-z0-9_-])")
REDACTED = "/verify/[link removed]"  # and "/privacy/confirm/[link removed]"


def new_token() -> tuple[str, str]:
    """Return (token for the link, hash to store)."""
    token = secrets.token_urlsafe(TOKEN_BYTES)
    return token, token_hash(token)


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8", "surrogateescape")).hexdigest()


def find_tokens(text: str) -> set[str]:
    """The hashes of the tokens in the links (`/verify/<token>`, `/privacy/confirm/<token>`)
    in `text`."""
    return {token_hash(match.group(2)) for match in _LINK.finditer(text)}


def redact_tokens(text: str) -> str:
    """`text` with every link's token replaced by a note."""
    return _LINK.sub(r"/\1/[link removed]", text)


def redact_token_bytes(data: bytes) -> bytes:
    """`data` (an attachment as stored) with every visible link token replaced."""
    return _LINK_BYTES.sub(rb"/\1/[link removed]", data)
