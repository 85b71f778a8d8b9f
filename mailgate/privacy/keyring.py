"""The keys: a master key in a file, and a key store (its own SQLite file) of wrapped keys.

Every person has a data key; their values are sealed under it (`sealing.py`). Data keys are
kept only in the key store, each wrapped (sealed) under the master key, and the key store lives
outside the database's folder: a backup of the data directory carries ciphertext and no key to
it. Erasing a person destroys their data key (`destroy`), so every copy of their values, in the
database, its WAL or any backup, is ciphertext whose key no longer exists (crypto-shredding).
The key store logs each destroyed key id; the database logs each erasure; both are reconciled
when the store opens, so restoring an old copy of either brings no one back.

Lookups by address go through a blind index: HMAC-SHA256 of the address key under an index key
(random, wrapped under the master key in the key store). Each wrapped key records which master
key wrapped it (its fingerprint), so `rekey` can move them to a new master key one by one and
resume after a crash.

Every process that opens the key store holds a shared lock on `<keystore>.lock` while it has it
open; `mailgate rekey` takes it exclusively, so it never runs beside a daemon or a command that
would wrap new keys under the old master key (and they refuse to start while it runs).

New data keys are made ahead, 64 to a commit of the key store, so that a new person inside an
ingest transaction costs no fsync of its own: a key is durable before any value is sealed
under it. Keys made and never used are a few dozen bytes each, wrapped, and harmless.
"""

from __future__ import annotations

import fcntl
import hashlib
import hmac
import os
import secrets
import sqlite3
import threading
import time
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from pathlib import Path

from mailgate.addresses import address_key
from mailgate.errors import ConfigError, MailgateError
from mailgate.files import write_durably
from mailgate.privacy.sealing import KEY_BYTES, DataKey, Undecryptable

POOL = 64
CACHE = 65536
_FINGERPRINT = 8  # bytes
_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (
    name  TEXT PRIMARY KEY,
    value BLOB NOT NULL
);
-- A person's data key, sealed under the master key whose fingerprint is `master`.
CREATE TABLE IF NOT EXISTS data_keys (
    key_id     TEXT PRIMARY KEY,
    wrapped    BLOB NOT NULL,
    master     TEXT NOT NULL,
    created_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS data_keys_master ON data_keys (master);
-- Keys destroyed by an erasure: never made again, and erased from a restored database.
CREATE TABLE IF NOT EXISTS destroyed (
    key_id TEXT PRIMARY KEY,
    at     REAL NOT NULL
);
"""


class KeyringError(ConfigError):
    """The master key or the key store cannot be used (a configuration problem: exit 78)."""


class KeystoreBusy(MailgateError):
    """The key store is held by a rekey (for everyone else), or in use (for a rekey)."""


class _Lock:
    """A lock on `<keystore>.lock` (flock: released by the kernel when the process dies, so a
    `kill -9` leaves nothing to clean up): shared by every user, exclusive for a rekey."""

    def __init__(self, keystore: Path, *, exclusive: bool) -> None:
        self.path = keystore.with_name(keystore.name + ".lock")
        try:
            keystore.parent.mkdir(parents=True, exist_ok=True)
            # Empty, and readable by all: flock needs no write access, so a lock file that
            # another user made first never locks the daemon's user out.
            self._fd = os.open(self.path, os.O_RDONLY | os.O_CREAT, 0o644)
        except OSError as exc:
            raise KeyringError(f"{self.path}: {exc.strerror or exc}") from None
        try:
            fcntl.flock(self._fd, (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._fd)
            if exclusive:
                raise KeystoreBusy(
                    f"{keystore}: the key store is in use: stop `mailgate serve` (and any other"
                    " mailgate command using this config) before `mailgate rekey`"
                ) from None
            raise KeystoreBusy(
                f"{keystore}: `mailgate rekey` is re-wrapping the keys: try again when it is done"
            ) from None
        except OSError:
            os.close(self._fd)
            raise

    def release(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def new_key_id() -> str:
    return secrets.token_hex(12)


def fingerprint(master: bytes) -> str:
    return hmac.new(master, b"mailgate master key fingerprint", hashlib.sha256).hexdigest()[
        : 2 * _FINGERPRINT
    ]


def read_master_key(path: Path) -> bytes:
    """Read a master key file: 32 raw bytes, or 64 hex digits (what `keygen` writes).

    32 bytes that are all printable text are no random key (32 random bytes are text once in
    10^14): a passphrase or a short hex key, which a dictionary would find offline (every
    wrapped message key in the database carries the master key's fingerprint).

    Raises:
        KeyringError: unreadable, or not a 32-byte key.
    """
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise KeyringError(f"{path}: {exc.strerror or exc}") from None
    if len(data) == KEY_BYTES and not _text(data):
        return data
    try:
        key = bytes.fromhex(data.decode("ascii").strip())
    except (UnicodeDecodeError, ValueError):
        key = b""
    if len(key) != KEY_BYTES:
        raise KeyringError(
            f"{path}: not a master key (expected {KEY_BYTES} bytes or 64 hex digits)"
        )
    return key


def _text(data: bytes) -> bool:
    return all(0x20 <= byte < 0x7F or byte in b"\t\r\n" for byte in data)


def key_text(master: bytes) -> bytes:
    """A master key as a key file holds it: 64 hex digits and a newline."""
    return (master.hex() + "\n").encode()


def write_master_key(path: Path) -> None:
    """Write a fresh master key (mode 0600), never over an existing file.

    Raises:
        FileExistsError: there is one already.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    key = key_text(secrets.token_bytes(KEY_BYTES))
    if not write_durably(path, key, mode=0o600, exclusive=True):
        raise FileExistsError(path)


def _owner_only(path: Path) -> None:
    """Make the key store file, if new, readable by its owner only; SQLite gives its WAL and
    shared-memory files the same mode."""
    try:
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    except FileExistsError:
        pass
    except OSError as exc:
        raise KeyringError(f"{path}: {exc.strerror or exc}") from None


class Keyring:
    """The master key(s) in memory and the key store; safe to use from several threads."""

    def __init__(
        self,
        masters: Sequence[bytes],
        keystore: Path,
        *,
        exclusive: bool = False,
        _held: _Lock | None = None,
    ) -> None:
        """Open the key store with these master keys (the first wraps new keys); `exclusive`
        (for a rekey) fails unless no other process has it open.

        Raises:
            KeystoreBusy: the lock could not be had.
            KeyringError: the key store cannot be read, or its index key opens under none of
                `masters`.
        """
        self._masters = {fingerprint(m): DataKey(m) for m in masters}
        self.current = fingerprint(masters[0])
        self.path = keystore
        self._lock = threading.Lock()
        self._pool: list[DataKey] = []
        self._cache: OrderedDict[str, DataKey] = OrderedDict()
        # A keyring made from another (`with_new_master`) shares its lock and leaves it be.
        self._owned = _held is None
        self._file_lock = _Lock(keystore, exclusive=exclusive) if _held is None else _held
        try:
            _owner_only(keystore)
            self._db = sqlite3.connect(keystore, isolation_level=None, check_same_thread=False)
        except sqlite3.Error as exc:
            self._release()
            raise KeyringError(f"{keystore}: {exc}") from None
        except KeyringError:
            self._release()
            raise
        try:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.execute("PRAGMA secure_delete=ON")
            self._db.execute("PRAGMA busy_timeout=30000")
            self._db.executescript(_SCHEMA)
            self._index = self._index_key()
        except sqlite3.Error as exc:
            self._db.close()
            self._release()
            raise KeyringError(f"{keystore}: {exc}") from None
        except KeyringError:
            self._db.close()
            self._release()
            raise

    def _release(self) -> None:
        if self._owned:
            self._file_lock.release()

    @classmethod
    def open(
        cls, key_file: Path, keystore: Path, *, create: bool = False, exclusive: bool = False
    ) -> Keyring:
        """Open with the master key in `key_file`, making one first if `create` and missing."""
        if create and not key_file.exists():
            try:
                write_master_key(key_file)
            except FileExistsError:
                pass  # another process (the CLI beside the daemon) made it first: use theirs
            except OSError as exc:
                raise KeyringError(f"{key_file}: {exc.strerror or exc}") from None
        if not create and not keystore.exists():
            # A new key store would make a new index key, and no address would be found.
            raise KeyringError(
                f"{keystore}: no key store (has `mailgate serve` run with this config?)"
            )
        return cls([read_master_key(key_file)], keystore, exclusive=exclusive)

    @property
    def masters(self) -> tuple[bytes, ...]:
        """The master keys, current first (for the parser process, which opens raw mail)."""
        current = self._masters[self.current]
        return (current.material, *(m.material for m in self._masters.values() if m is not current))

    def close(self) -> None:
        with self._lock:
            self._db.close()
            self._release()

    # -- the index key and the blind index -------------------------------------------------

    def _index_key(self) -> bytes:
        """The index key, made at first use; also proves that the master key is the right one."""
        row = self._db.execute("SELECT value FROM meta WHERE name = 'index_key'").fetchone()
        if row is None:
            material = secrets.token_bytes(KEY_BYTES)
            self._db.execute("BEGIN IMMEDIATE")
            try:
                again = self._db.execute(
                    "SELECT value FROM meta WHERE name = 'index_key'"
                ).fetchone()
                if again is None:
                    self._db.execute(
                        "INSERT INTO meta (name, value) VALUES ('index_key', ?)",
                        (self._wrap(material, "index-key"),),
                    )
                    self._db.execute("COMMIT")
                    return material
                self._db.execute("COMMIT")
                row = again
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
        return self._unwrap(bytes(row[0]), "index-key")

    def blind(self, email: str) -> bytes:
        """The blind index of an address: equal for every spelling `address_key` makes one."""
        return hmac.new(self._index, address_key(email).encode("utf-8"), hashlib.sha256).digest()

    def keyed_hash(self, value: bytes, purpose: str) -> str:
        """A keyed digest that names a thing without revealing it (audit subjects, blobs)."""
        return hmac.new(self._index, purpose.encode() + b"\0" + value, hashlib.sha256).hexdigest()

    # -- wrapping under the master key -----------------------------------------------------

    def _wrap(self, material: bytes, label: str) -> bytes:
        return self.current.encode() + self._masters[self.current].seal(material, label)

    def _unwrap(self, wrapped: bytes, label: str) -> bytes:
        master = self._masters.get(wrapped[: 2 * _FINGERPRINT].decode("ascii", "replace"))
        if master is None:
            raise KeyringError(
                f"{self.path}: a key is wrapped under another master key than the key file's"
                " (the wrong key_file, or an unfinished `mailgate rekey`)"
            )
        try:
            return master.open(wrapped[2 * _FINGERPRINT :], label)
        except Undecryptable:
            raise KeyringError(f"{self.path}: a wrapped key does not open (altered?)") from None

    def message_key(self) -> tuple[DataKey, bytes]:
        """A fresh key for one raw message, and that key wrapped under the master key."""
        key = DataKey.generate()
        return key, self._wrap(key.material, "message-key")

    def unwrap_message_key(self, wrapped: bytes) -> DataKey:
        return DataKey(self._unwrap(wrapped, "message-key"))

    def rewrap_message_key(self, wrapped: bytes) -> bytes:
        """The same message key wrapped under the current master key (for `rekey`)."""
        return self._wrap(self._unwrap(wrapped, "message-key"), "message-key")

    # -- people's data keys ----------------------------------------------------------------

    def new_key(self) -> DataKey:
        """A data key for a new person, already durable in the key store."""
        with self._lock:
            if not self._pool:
                self._refill()
            key = self._pool.pop()
            self._remember(key)
            return key

    def _refill(self) -> None:
        keys = [DataKey.generate(new_key_id()) for _ in range(POOL)]
        now = time.time()
        rows = [
            (k.key_id, self._wrap(k.material, f"data-key:{k.key_id}"), self.current, now)
            for k in keys
        ]
        self._db.execute("BEGIN IMMEDIATE")
        try:
            self._db.executemany(
                "INSERT INTO data_keys (key_id, wrapped, master, created_at) VALUES (?, ?, ?, ?)",
                rows,
            )
            self._db.execute("COMMIT")
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._pool.extend(keys)

    def key(self, key_id: str) -> DataKey | None:
        """The data key with this id, or None if it was destroyed (its person erased)."""
        with self._lock:
            cached = self._cache.get(key_id)
            if cached is not None:
                self._cache.move_to_end(key_id)
                return cached
            row = self._db.execute(
                "SELECT wrapped FROM data_keys WHERE key_id = ?", (key_id,)
            ).fetchone()
            if row is None:
                return None
            key = DataKey(self._unwrap(bytes(row[0]), f"data-key:{key_id}"), key_id)
            self._remember(key)
            return key

    def _remember(self, key: DataKey) -> None:
        self._cache[key.key_id] = key
        if len(self._cache) > CACHE:
            self._cache.popitem(last=False)

    def destroy(self, key_ids: Iterable[str]) -> int:
        """Destroy these data keys for good and log them; return how many were still there.

        The freed pages are overwritten (secure_delete) and the WAL is truncated, so the key
        store's file keeps no copy of them either.
        """
        ids = sorted(set(key_ids))
        if not ids:
            return 0
        now = time.time()
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                gone = 0
                for key_id in ids:
                    gone += self._db.execute(
                        "DELETE FROM data_keys WHERE key_id = ?", (key_id,)
                    ).rowcount
                    self._db.execute(
                        "INSERT OR IGNORE INTO destroyed (key_id, at) VALUES (?, ?)", (key_id, now)
                    )
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            for key_id in ids:
                self._cache.pop(key_id, None)
            self._overwrite()
        return gone

    def _overwrite(self) -> None:
        """Checkpoint and truncate the WAL, so the destroyed keys' old pages are overwritten.

        Raises:
            KeyringError: a reader (a backup under way) kept the old pages in use; the keys
                are destroyed for every reader from now on, but their bytes are still in the
                file until this runs again (an erasure says so and is finished when repeated).
        """
        [(busy, _pages, _moved)] = self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()
        if busy:
            raise KeyringError(
                f"{self.path}: destroyed keys are still in the file while another connection"
                " reads it (a backup?); run again when it is done"
            )

    def destroyed(self) -> set[str]:
        with self._lock:
            return {row[0] for row in self._db.execute("SELECT key_id FROM destroyed")}

    # -- rekey -----------------------------------------------------------------------------

    def with_new_master(self, new_master: bytes) -> Keyring:
        """A keyring that opens keys wrapped under either master and wraps under the new one.
        It shares this one's lock: close it before this one."""
        old = [k.material for k in self._masters.values()]
        return Keyring([new_master, *old], self.path, _held=self._file_lock)

    def rewrap_batch(self, limit: int = 256) -> int:
        """Re-wrap up to `limit` data keys (and the index key) under the current master key, in
        one commit; return how many were moved (0: done). Safe to run again after a crash."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                row = self._db.execute("SELECT value FROM meta WHERE name = 'index_key'").fetchone()
                if row is not None and not bytes(row[0]).startswith(self.current.encode()):
                    self._db.execute(
                        "UPDATE meta SET value = ? WHERE name = 'index_key'",
                        (self._wrap(self._unwrap(bytes(row[0]), "index-key"), "index-key"),),
                    )
                # Two ranges of the index, not `!=` (a scan of every key for every batch).
                rows = self._db.execute(
                    "SELECT key_id, wrapped FROM data_keys WHERE master < ?1 OR master > ?1 "
                    "LIMIT ?2",
                    (self.current, limit),
                ).fetchall()
                for key_id, wrapped in rows:
                    label = f"data-key:{key_id}"
                    self._db.execute(
                        "UPDATE data_keys SET wrapped = ?, master = ? WHERE key_id = ?",
                        (
                            self._wrap(self._unwrap(bytes(wrapped), label), label),
                            self.current,
                            key_id,
                        ),
                    )
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            if not rows:
                self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()
            return len(rows)

    def masters_in_use(self) -> set[str]:
        """The fingerprints of the master keys that wrap the data keys and the index key."""
        with self._lock:
            found = {row[0] for row in self._db.execute("SELECT DISTINCT master FROM data_keys")}
            row = self._db.execute("SELECT value FROM meta WHERE name = 'index_key'").fetchone()
        if row is not None:
            found.add(bytes(row[0])[: 2 * _FINGERPRINT].decode("ascii", "replace"))
        return found

    def left_to_rewrap(self) -> int:
        """How many data keys (and the index key) are wrapped under another master key."""
        with self._lock:
            (keys,) = self._db.execute(
                "SELECT count(*) FROM data_keys WHERE master < ?1 OR master > ?1", (self.current,)
            ).fetchone()
            row = self._db.execute("SELECT value FROM meta WHERE name = 'index_key'").fetchone()
        index = row is not None and not bytes(row[0]).startswith(self.current.encode())
        return int(keys) + int(index)

    def wraps_current(self, wrapped: bytes) -> bool:
        """Tell whether a wrapped key (a message key) is wrapped under the current master key."""
        return wrapped.startswith(self.current.encode())
