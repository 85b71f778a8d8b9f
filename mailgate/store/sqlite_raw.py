"""Raw messages in SQLite, sealed and in pieces: no process holds a large one whole unless it
parses it.

Every raw message is sealed as a stream (`privacy/sealing.py`) under a key of its own, before
the commit that its 250 waits for. The key is wrapped under the master key until ingest gives
the message to a ticket, then under that ticket's requester's data key (`owner_key`).

Writing. A message that arrived as a spool file (`mailgate.spool`) is inserted as
`zeroblob(sealed size)` and sealed chunk by chunk into it with incremental BLOB I/O
(`Connection.blobopen`), inside the commit's transaction: the row is whole or absent, and the
one durable write is the WAL's fsync at COMMIT, as for a small message bound as a parameter.

Reading. `RawReader` opens a read-only connection of its own and reads by queue id, whole
(the parser process, which reads the raw message itself so the daemon never receives it) or
in pieces (the CLI's `quarantine show --raw`, a listing's header), opening it as it goes.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path

from mailgate.privacy.keyring import Keyring
from mailgate.privacy.sealing import DataKey, Undecryptable, plain_prefix_size, stream_size
from mailgate.spool import WRITE_CHUNK, Spooled
from mailgate.store.labels import MESSAGE_KEY, RAW

_ROW = "SELECT rowid, raw_key, owner_key FROM inbound WHERE id = ? AND raw IS NOT NULL"


def raw_size(raw: bytes | Spooled) -> int:
    return raw.size if isinstance(raw, Spooled) else len(raw)


def message_key(keys: Keyring, raw_key: bytes, owner_key: str | None) -> DataKey | None:
    """A raw message's own key, unwrapped; None if its owner was erased (key destroyed)."""
    if owner_key is None:
        return keys.unwrap_message_key(raw_key)
    owner = keys.key(owner_key)
    return None if owner is None else DataKey(owner.open(raw_key, MESSAGE_KEY))


def insert_spooled(
    db: sqlite3.Connection, sql: str, params: Sequence[object], raw: Spooled, key: DataKey
) -> None:
    """Insert one inbound row whose raw column `sql` sets to zeroblob(?) (the last
    parameter, added here), then seal the spool file into it; inside a transaction.

    Raises:
        OSError: the spool file could not be read; the transaction must roll back.
    """
    insert_stream(db, sql, params, raw.size, raw.chunks(), key)


def insert_stream(
    db: sqlite3.Connection,
    sql: str,
    params: Sequence[object],
    size: int,
    pieces: Iterable[bytes],
    key: DataKey,
) -> None:
    """As `insert_spooled`, for a raw message of `size` bytes read in `pieces` from anywhere
    (a spool file, or a legacy row's clear BLOB being adopted)."""
    cursor = db.execute(sql, (*params, stream_size(size)))
    rowid = cursor.lastrowid
    assert rowid is not None
    sealer = key.stream_sealer(RAW)
    with db.blobopen("inbound", "raw", rowid) as blob:
        blob.write(sealer.header)
        for piece in pieces:
            blob.write(sealer.update(piece))
        blob.write(sealer.finish())


def blob_pieces(db: sqlite3.Connection, table: str, column: str, rowid: int) -> Iterator[bytes]:
    """A BLOB read in pieces of at most WRITE_CHUNK bytes, never whole."""
    with db.blobopen(table, column, rowid, readonly=True) as blob:
        yield from _read_pieces(blob, len(blob))


class RawReader:
    """Reads raw messages by queue id over its own read-only connection (opened on first use).

    One per process, or per call: a connection may be used by one thread at a time. A message
    whose owner was erased reads as absent.
    """

    def __init__(self, path: Path, keys: Keyring) -> None:
        self.path = path
        self._keys = keys
        self._db: sqlite3.Connection | None = None

    def _connect(self) -> sqlite3.Connection:
        if self._db is None:
            uri = f"{self.path.resolve().as_uri()}?mode=ro"
            self._db = sqlite3.connect(uri, uri=True, isolation_level=None)
            self._db.execute("PRAGMA busy_timeout = 10000")
        return self._db

    def read(self, inbound_id: str) -> bytes | None:
        """The whole raw message, or None if there is no such row."""
        pieces: list[bytes] = []
        return b"".join(pieces) if self._pieces(inbound_id, pieces.append) else None

    def head(self, inbound_id: str, size: int) -> bytes | None:
        """The first `size` bytes of the raw message, reading little more of it."""
        pieces: list[bytes] = []
        found = self._pieces(inbound_id, pieces.append, stop=size)
        return b"".join(pieces)[:size] if found else None

    def copy(self, inbound_id: str, write: Callable[[bytes], object]) -> bool:
        """Hand the raw message to `write` in pieces; False if there is no such row."""
        return self._pieces(inbound_id, write)

    def _pieces(
        self, inbound_id: str, write: Callable[[bytes], object], *, stop: int | None = None
    ) -> bool:
        db = self._connect()
        # One read transaction: the rowid and the blob are of the same snapshot (an implicit
        # rowid may be reused once a row is purged).
        db.execute("BEGIN")
        try:
            row = db.execute(_ROW, (inbound_id,)).fetchone()
            if row is None:
                return False
            key = message_key(self._keys, bytes(row[1]), row[2])
            if key is None:
                return False
            with db.blobopen("inbound", "raw", row[0], readonly=True) as blob:
                total = len(blob)
                if stop is not None and plain_prefix_size(stop) < total:
                    write(key.open_stream_prefix(blob.read(plain_prefix_size(stop)), RAW))
                    return True
                for chunk in key.stream_chunks(_read_pieces(blob, total), RAW):
                    write(chunk)
            return True
        except Undecryptable:
            return False
        finally:
            db.execute("COMMIT")

    def close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None


def _read_pieces(blob: sqlite3.Blob, total: int) -> Iterator[bytes]:
    left = total
    while left > 0:
        piece = blob.read(min(WRITE_CHUNK, left))
        left -= len(piece)
        yield piece
