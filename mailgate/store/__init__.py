"""Storage: one Store contract (base.py), one backend per database."""

import sqlite3
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from mailgate.config import Config
from mailgate.privacy.keyring import Keyring, KeyringError
from mailgate.store.base import IngestTx, Store
from mailgate.store.sqlite import SqliteStore, open_store


def open_keyring(config: Config, *, create: bool = True) -> Keyring:
    """The configured keys; with `create`, a missing master key file is made (first start).

    Not for a database that holds people already: their keys are in a key store elsewhere
    (the config names the wrong one, or its volume is not mounted), and new keys would open
    none of them.

    Raises:
        KeyringError: the key file or key store cannot be used.
    """
    security = config.security
    if create and not security.keystore.exists() and _has_people(config.storage.database):
        raise KeyringError(
            f"{security.keystore}: no key store, but {config.storage.database} holds people"
            " sealed under one (the wrong [security] key_file or keystore, or a volume not"
            " mounted?); a new key store would open none of them"
        )
    return Keyring.open(security.key_file, security.keystore, create=create)


def _has_people(database: Path) -> bool:
    if not database.exists():
        return False
    try:
        db = sqlite3.connect(f"{database.resolve().as_uri()}?mode=ro", uri=True)
        try:
            return db.execute("SELECT 1 FROM people LIMIT 1").fetchone() is not None
        finally:
            db.close()
    except sqlite3.Error:  # no people table yet (an older schema, adopted at open), or none
        return False


@asynccontextmanager
async def store_for(config: Config, *, create: bool = True) -> AsyncIterator[SqliteStore]:
    """The configured store with its keys, closed (keys too) on exit."""
    keys = open_keyring(config, create=create)
    try:
        async with open_store(
            config.storage.database, keys, attachments=config.storage.attachments
        ) as store:
            yield store
    finally:
        keys.close()


__all__ = ["IngestTx", "SqliteStore", "Store", "open_keyring", "open_store", "store_for"]
