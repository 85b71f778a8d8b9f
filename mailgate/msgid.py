"""mailgate's own Message-IDs: they name a ticket and prove it with an HMAC.

`mg-<ticket>-<nonce>-<mac>@<hostname>`: a reply whose In-Reply-To/References carry one joins
that ticket (ARCHITECTURE rule 4) even if mailgate stored nothing for the ID, and a stranger
cannot mint one for someone else's ticket without the secret.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from collections.abc import Sequence
from pathlib import Path

from mailgate.config import Config
from mailgate.errors import ConfigError
from mailgate.files import write_durably

SECRET_BYTES = 32
_MAC_HEX = 24  # 96 bits of HMAC-SHA256: unguessable, and the header stays on one line
_OWN_ID = re.compile(r"mg-(\d{1,18})-([0-9a-f]{12})-([0-9a-f]{24})@[^<>\s@]+")


def load_secret(path: Path) -> bytes:
    """Read the HMAC secret, creating it (mode 0600) at first start.

    Raises:
        ValueError: the file cannot be read, or holds a key too short (an empty one too).
    """
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        if not path.exists():
            _create_secret(path)
        secret = path.read_bytes().strip()
    except OSError as exc:
        raise ValueError(f"{path}: {exc.strerror or exc}") from None
    if not secret:
        raise ValueError(f"{path}: the secret file is empty (remove it to make a new one)")
    if len(secret) < SECRET_BYTES:
        raise ValueError(f"{path}: the secret is shorter than {SECRET_BYTES} bytes")
    return secret


def _create_secret(path: Path) -> None:
    """Write a new secret so that `path` is never seen empty or half-written, and only if no
    other process (a CLI command starting beside the daemon) got there first: then theirs is
    the secret. A crash never leaves an empty key that would stop every later start."""
    write_durably(path, secrets.token_hex(SECRET_BYTES).encode(), mode=0o600, exclusive=True)


class MessageIds:
    """Mint and verify mailgate's Message-IDs with one secret."""

    def __init__(self, secret: bytes, hostname: str) -> None:
        self._secret = secret
        self._hostname = hostname

    def _mac(self, ticket_id: int, nonce: str) -> str:
        digest = hmac.new(self._secret, f"{ticket_id}-{nonce}".encode(), hashlib.sha256)
        return digest.hexdigest()[:_MAC_HEX]

    def new(self, ticket_id: int) -> str:
        """A fresh Message-ID for a mail about `ticket_id`, without angle brackets."""
        nonce = secrets.token_hex(6)
        return f"mg-{ticket_id}-{nonce}-{self._mac(ticket_id, nonce)}@{self._hostname}"

    def system(self) -> str:
        """A Message-ID for a system mail (no ticket): it names nothing, so a reply to it
        opens a new ticket."""
        return f"mg-system-{secrets.token_hex(12)}@{self._hostname}"

    def ticket_of(self, message_id: str) -> int | None:
        """The ticket an ID of ours names, or None if it is not ours or its HMAC is wrong."""
        match = _OWN_ID.fullmatch(message_id)
        if match is None:
            return None
        ticket, nonce, mac = match.groups()
        return int(ticket) if hmac.compare_digest(mac, self._mac(int(ticket), nonce)) else None

    def find_in(self, text: str) -> list[int]:
        """Tickets named by valid IDs of ours anywhere in `text` (a returned message)."""
        return self.tickets_of(shaped_like_ours(text))

    def tickets_of(self, message_ids: Sequence[str]) -> list[int]:
        """Tickets named by those of `message_ids` that are ours with a valid HMAC, once each."""
        found = [self.ticket_of(message_id) for message_id in message_ids]
        return list(dict.fromkeys(t for t in found if t is not None))


def shaped_like_ours(text: str, *, limit: int = 100) -> list[str]:
    """The first `limit` strings in `text` shaped like our Message-IDs (HMAC not checked):
    what the parser process finds in a raw message, for the daemon to check with the secret."""
    found = []
    for match in _OWN_ID.finditer(text):
        found.append(match.group(0))
        if len(found) >= limit:
            break
    return found


def daemon_secret(config: Config) -> bytes:
    """The secret of `outbound.secret_file` (made at first start): it keys the Message-IDs'
    HMACs and, through a key derived from it, the confirmation forms' (`confirm.CsrfKey`).

    Raises:
        ConfigError: the file cannot be read or made, or holds no usable key.
    """
    try:
        return load_secret(config.outbound.secret_file)
    except ValueError as exc:
        raise ConfigError(f"outbound.secret_file: {exc}") from None


def message_ids(config: Config) -> MessageIds:
    """The Message-ID minter with the secret from the state directory (made at first start)."""
    return MessageIds(daemon_secret(config), config.smtp.hostname)
