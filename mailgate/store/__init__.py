"""Storage: one Store contract (base.py), one backend per database."""

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from mailgate.config import Config
from mailgate.privacy.keyring import Keyring
from mailgate.store.base import IngestTx, Store
from mailgate.store.sqlite import SqliteStore, open_store


def open_keyring(config: Config, *, create: bool = True) -> Keyring:
    """The configured keys; with `create`, a missing master key file is made (first start).

    Raises:
        KeyringError: the key file or key store cannot be used.
    """
    security = config.security
    return Keyring.open(security.key_file, security.keystore, create=create)


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
