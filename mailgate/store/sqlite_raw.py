"""Raw messages in SQLite, in pieces: no process holds a large one whole unless it parses it.

Writing. A message that arrived as a spool file (`mailgate.spool`) is inserted as
`zeroblob(size)` and its bytes copied in with incremental BLOB I/O (`Connection.blobopen`),
inside the commit's transaction: the row is whole or absent, and the one durable write is
the WAL's fsync at COMMIT, as for a small message bound as a parameter. SQLite spills pages
to the WAL as its cache fills, so the copy costs a page cache, not the message.

Reading. `RawReader` opens a read-only connection of its own and reads by queue id, whole
(the parser process, which reads the raw message itself so the daemon never receives it) or
in pieces (the CLI's `quarantine show --raw`, a listing's header).
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Sequence
from pathlib import Path

from mailgate.spool import WRITE_CHUNK, Spooled

_ROWID = "SELECT rowid FROM inbound WHERE id = ?"


def insert_spooled(
    db: sqlite3.Connection, sql: str, params: Sequence[object], raw: Spooled
) -> None:
    """Insert one inbound row whose raw column `sql` sets to zeroblob(?) (the last
    parameter, added here), then copy the spool file into it; inside a transaction.

    Raises:
        OSError: the spool file could not be read; the transaction must roll back.
    """
    cursor = db.execute(sql, (*params, raw.size))
    rowid = cursor.lastrowid
    assert rowid is not None
    with db.blobopen("inbound", "raw", rowid) as blob:
        for piece in raw.chunks():
            blob.write(piece)


class RawReader:
    """Reads raw messages by queue id over its own read-only connection (opened on first use).

    One per process, or per call: a connection may be used by one thread at a time.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._db: sqlite3.Connection | None = None

    def _connect(self) -> sqlite3.Connection:
        if self._db is None:
            uri = f"{self.path.resolve().as_uri()}?mode=ro"
            self._db = sqlite3.connect(uri, uri=True, isolation_level=None)
            self._db.execute("PRAGMA busy_timeout = 10000")
        return self._db

    def read(self, inbound_id: str) -> bytes | None:
        """The whole raw message, or None if there is no such row."""
        row = self._connect().execute("SELECT raw FROM inbound WHERE id = ?", (inbound_id,))
        found = row.fetchone()
        return bytes(found[0]) if found is not None else None

    def head(self, inbound_id: str, size: int) -> bytes | None:
        """The first `size` bytes of the raw message, reading no more of it."""
        pieces: list[bytes] = []
        found = self._pieces(inbound_id, pieces.append, stop=size)
        return b"".join(pieces) if found else None

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
            row = db.execute(_ROWID, (inbound_id,)).fetchone()
            if row is None:
                return False
            with db.blobopen("inbound", "raw", row[0], readonly=True) as blob:
                left = len(blob) if stop is None else min(stop, len(blob))
                while left > 0:
                    piece = blob.read(min(WRITE_CHUNK, left))
                    left -= len(piece)
                    write(piece)
            return True
        finally:
            db.execute("COMMIT")

    def close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None
