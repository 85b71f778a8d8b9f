"""`mailgate rekey NEW_KEY_FILE`: every key wrapped under the master key moves to a new one.

Wrapped under the master key are each person's data key and the index key (in the key store)
and the key of each raw message not yet given to a ticket (`inbound.raw_key` where `owner_key`
is NULL; the others are wrapped under their owner's data key and need nothing). No sealed
value changes: only the wrapping of their keys.

Every wrapped key starts with the fingerprint of the master key that wrapped it, so the work
goes in batches, each its own commit, and a run skips what is done. In order:

1. the key store's keys, batch by batch (`Keyring.with_new_master`, `rewrap_batch`);
2. the raw messages' keys, batch by batch (`Store.rewrap_message_keys`);
3. a check that nothing is left under another master key;
4. `<key_file>.old` gets the old key (mode 0600), then `key_file` the new one, each written
   durably (a temporary file, fsync, rename): `key_file` holds the old key or the new one,
   never half of either, and the daemon starts afterwards with its config unchanged.

A crash anywhere (kill -9 included) leaves a state from which the same command finishes: before
step 4 the old key is still `key_file` and both keys open everything; after it, `key_file` is
the new key and the old one is in `<key_file>.old`.

The old key is kept, not deleted: a backup of the key store made before the rekey opens only
with it. Delete `<key_file>.old` (and NEW_KEY_FILE, a copy of `key_file` now) when no such
backup is wanted any more; a later rekey refuses to start while a `.old` of another key is
there, rather than overwrite it.

It runs alone. A daemon beside it would wrap new keys under the old master key after the
rekey had passed them by, and could not open keys it had already moved; so the rekey holds
the key store's lock exclusively (`keyring`), refuses to start while `mailgate serve` or any
other command of this config has the key store open, and they refuse to start while it runs.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from mailgate.config import Config
from mailgate.errors import MailgateError, NotFound
from mailgate.files import write_durably
from mailgate.privacy.keyring import Keyring, KeyringError, fingerprint, key_text, read_master_key
from mailgate.store.sqlite import open_store

BATCH = 256


class RekeyError(MailgateError):
    """The rekey cannot start or finish as things are; the message says what to do."""


@dataclass(frozen=True, slots=True)
class Rekeyed:
    """What a run did, in counts."""

    data_keys: int  # people's data keys re-wrapped by this run
    index_key: bool  # the index key re-wrapped by this run
    message_keys: int  # raw messages' keys re-wrapped by this run
    replaced: bool  # key_file replaced by this run (False: it held the new key already)
    old_copy: Path  # where the old key is kept
    seconds: float


def old_key_path(key_file: Path) -> Path:
    return key_file.with_name(key_file.name + ".old")


async def rekey(config: Config, new_key_file: Path, *, batch: int = BATCH) -> Rekeyed:
    """Move every master-wrapped key under the key in `new_key_file`, then make it `key_file`.

    Raises:
        KeyringError: a key file is unreadable or not a key, or keys are wrapped under a master
            key that is neither (a rekey to a third key left unfinished).
        KeystoreBusy: the key store is in use (the daemon runs).
        NotFound: there is no database or key store.
        RekeyError: `<key_file>.old` holds another key; or keys were left behind.
    """
    started = time.monotonic()
    security = config.security
    new = read_master_key(new_key_file)
    current = read_master_key(security.key_file)
    old_copy = old_key_path(security.key_file)
    kept = read_master_key(old_copy) if old_copy.exists() else None
    if current != new and kept not in (None, current):
        raise RekeyError(
            f"{old_copy} holds another key (kept by an earlier rekey): move it away first; it"
            " still opens backups of the key store made before that rekey"
        )
    old = current if current != new else kept  # None: key_file was the new key all along
    for path in (config.storage.database, security.keystore):
        if not path.exists():
            raise NotFound(f"no {path} (has `mailgate serve` run with this config?)")
    masters = [new] if old is None else [old, new]
    base = Keyring(masters, security.keystore, exclusive=True)
    try:
        ring = base.with_new_master(new)
        try:
            known = {fingerprint(m) for m in masters}
            if ring.masters_in_use() - known:
                raise KeyringError(
                    f"{security.keystore}: keys are wrapped under a master key that is neither"
                    f" {security.key_file} nor {new_key_file} (a rekey to another key left"
                    " unfinished? run it again with that key file first)"
                )
            before = ring.left_to_rewrap()
            data_keys = 0
            while moved := ring.rewrap_batch(batch):
                data_keys += moved
            async with open_store(
                config.storage.database, ring, attachments=config.storage.attachments
            ) as store:
                message_keys, after = 0, ""
                while True:
                    moved, after = await store.rewrap_message_keys(after=after, limit=batch)
                    message_keys += moved
                    if not after:
                        break
                left = await store.message_keys_left() + ring.left_to_rewrap()
            if left:
                raise RekeyError(f"{left} keys are still wrapped under the old key: run again")
        finally:
            ring.close()
        replaced = current != new
        if replaced:
            _replace_key_file(security.key_file, old_copy, current, new)
    finally:
        base.close()
    return Rekeyed(
        data_keys=data_keys,
        index_key=before > data_keys,
        message_keys=message_keys,
        replaced=replaced,
        old_copy=old_copy,
        seconds=time.monotonic() - started,
    )


def _replace_key_file(key_file: Path, old_copy: Path, old: bytes, new: bytes) -> None:
    """The old key to `<key_file>.old`, then the new one to `key_file`: each durable and atomic,
    mode 0600, owned as `key_file` was (a rekey run as root keeps the daemon's user's key)."""
    stat = key_file.stat()
    owner = (stat.st_uid, stat.st_gid)
    write_durably(old_copy, key_text(old), mode=0o600, owner=owner)
    write_durably(key_file, key_text(new), mode=0o600, owner=owner)
