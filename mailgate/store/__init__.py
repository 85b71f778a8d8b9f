"""Storage: one Store contract (base.py), one backend per database."""

from mailgate.store.base import IngestTx, Store
from mailgate.store.sqlite import SqliteStore, open_store

__all__ = ["IngestTx", "SqliteStore", "Store", "open_store"]
