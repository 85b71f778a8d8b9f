"""mailgate's Message-IDs and link tokens: what they prove, and what a forger cannot make."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from mailgate.msgid import MessageIds, load_secret
from mailgate.privacy.tokens import new_token, token_hash

SECRET = b"0123456789abcdef0123456789abcdef"


def test_an_issued_id_names_its_ticket() -> None:
    ids = MessageIds(SECRET, "mailgate.test")
    issued = ids.new(42)
    assert issued.endswith("@mailgate.test")
    assert ids.ticket_of(issued) == 42
    assert ids.new(42) != issued  # each mail its own ID


def test_tampered_ids_name_no_ticket() -> None:
    ids = MessageIds(SECRET, "mailgate.test")
    issued = ids.new(42)
    _, ticket, nonce, mac = issued.split("@")[0].split("-")
    assert ids.ticket_of(issued.replace(f"-{ticket}-", "-43-", 1)) is None  # another ticket
    flipped = mac[:-1] + ("0" if mac[-1] != "0" else "1")
    assert ids.ticket_of(issued.replace(mac, flipped)) is None
    assert ids.ticket_of(f"mg-42-{nonce}-{'0' * len(mac)}@mailgate.test") is None
    other_secret = MessageIds(b"f" * 32, "mailgate.test")
    assert other_secret.ticket_of(issued) is None
    assert ids.ticket_of("CAF=abc@mail.gmail.com") is None


def test_find_in_returned_text() -> None:
    ids = MessageIds(SECRET, "mailgate.test")
    issued = ids.new(7)
    text = f"Message-ID: <{issued}>\nReferences: <mg-8-000000000000-{'0' * 24}@mailgate.test>"
    assert ids.find_in(text) == [7]


def test_secret_is_created_once_and_private(tmp_path: Path) -> None:
    path = tmp_path / "state" / "secret.key"
    first = load_secret(path)
    assert len(first) >= 32
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert load_secret(path) == first


def test_short_secret_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "secret.key"
    path.write_text("short\n")
    with pytest.raises(ValueError, match="shorter than 32 bytes"):
        load_secret(path)


def test_tokens_are_random_and_stored_hashed() -> None:
    token, digest = new_token()
    assert len(token) >= 43 and token.replace("-", "").replace("_", "").isalnum()
    assert digest == token_hash(token) and token not in digest
    assert new_token()[0] != token


def test_an_empty_secret_file_is_a_config_error_naming_it(tmp_path: Path) -> None:
    """What a crash mid-write used to leave: every start then failed. Now it is a clear
    config error naming the file (exit 78), and a new secret is never written half."""
    path = tmp_path / "secret.key"
    path.write_bytes(b"")
    with pytest.raises(ValueError, match=f"{path}: the secret file is empty"):
        load_secret(path)


def test_an_unreadable_secret_file_is_a_config_error(tmp_path: Path) -> None:
    path = tmp_path / "secret.key"
    path.mkdir()
    with pytest.raises(ValueError, match=str(path)):
        load_secret(path)


def test_creating_the_secret_leaves_no_temporary_file_and_keeps_a_rivals(tmp_path: Path) -> None:
    """The secret appears whole or not at all (written aside, then linked into place); a
    process that finds one made meanwhile keeps that one."""
    path = tmp_path / "secret.key"
    first = load_secret(path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["secret.key"]
    from mailgate import msgid

    msgid._create_secret(path)  # a rival that lost the race
    assert load_secret(path) == first
    assert sorted(p.name for p in tmp_path.iterdir()) == ["secret.key"]
