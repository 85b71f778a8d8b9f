"""Verification links in a bounce: the mail it returns may be our verification mail.

A bounce's copy of that mail is stored (the raw row, the returned part as an attachment, the
text of the note), and a link in a stored copy must not verify anyone: the address never got
it. So the tokens of the links found in a bounce are handed to ingest, which revokes them,
and the parser cuts them out of the text and attachments it keeps (`privacy.tokens`).

Links are looked for where a copy can hold them: the raw bytes (a 7bit body, a quote), each
part decoded (base64 and quoted-printable), and each returned message (message/rfc822)
parsed and decoded in turn, under the parser's limits.
"""

from __future__ import annotations

from email.message import Message as StdMessage

from mailgate.ingest.mime import read_message
from mailgate.privacy.tokens import find_tokens

MAX_TOKENS = 20  # a verification mail holds one; a bounce may return a few


def bounce_tokens(msg: StdMessage, raw: bytes) -> tuple[str, ...]:
    """The hashes of the verification tokens in `raw` (a bounce) or the mail it returns."""
    found = find_tokens(raw.decode("latin-1"))
    for part in _leaves(msg):
        data = _decoded(part)
        found |= find_tokens(data.decode("latin-1"))
        if part.get_content_maintype() == "message" and data:
            for inner in _leaves(read_message(data).message):
                found |= find_tokens(_decoded(inner).decode("latin-1"))
    return tuple(sorted(found))[:MAX_TOKENS]


def _leaves(msg: StdMessage) -> list[StdMessage]:
    return [part for part in msg.walk() if not part.is_multipart()]


def _decoded(part: StdMessage) -> bytes:
    try:
        data = part.get_payload(decode=True)
    except Exception:  # noqa: BLE001 - bad base64 or a broken nested message: nothing to read
        return b""
    return data if isinstance(data, bytes) else b""
