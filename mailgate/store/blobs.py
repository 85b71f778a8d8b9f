"""Attachment files under [storage] attachments, sealed: one file per owner and content.

The parser process writes each attachment's content sealed under a fresh key of its own, to a
file with a random name (so neither the customer's filename nor the content's hash reaches the
filesystem), and hands back the key and name; the ingest transaction records the file as a
blob of the ticket's requester, its key wrapped under their data key, or counts one more use
of the blob they already have of that content. A file no committed row names (its message
was not committed, or the blob existed already, or its owner was erased) is removed by
`sweep`, so a crash at any point leaves at worst a sealed file that nothing can open.

A write goes to a temporary file first, then is renamed into place; a write that fails (a
full disk) removes its temporary file, so retrying costs no space.
"""

from __future__ import annotations

import hashlib
import secrets
import time
from collections.abc import Collection
from pathlib import Path

from mailgate.files import write_durably
from mailgate.privacy.sealing import DataKey, seal_stream
from mailgate.store.labels import BLOB

# A file younger than this may belong to a message still being ingested: the sweep spares it.
SWEEP_GRACE = 24 * 3600.0


def blob_path(root: Path, name: str) -> Path:
    return root / name[:2] / name


def save_blob(root: Path, data: bytes) -> tuple[str, bytes, str]:
    """Seal `data` under a fresh key into a new file (fsync, atomic rename); return its name,
    the key and the content's SHA-256 (for the owner's dedup, never stored in clear).

    Raises:
        OSError: it could not be written; nothing of this attempt is left behind.
    """
    key = DataKey.generate()
    name = secrets.token_hex(16)
    target = blob_path(root, name)
    target.parent.mkdir(parents=True, exist_ok=True)
    write_durably(target, seal_stream(key, data, BLOB))
    return name, key.material, hashlib.sha256(data).hexdigest()


def read_blob(root: Path, name: str, key: DataKey) -> bytes | None:
    try:
        sealed = blob_path(root, name).read_bytes()
    except FileNotFoundError:
        return None
    return key.open_stream(sealed, BLOB)


def remove_blobs(root: Path, names: Collection[str]) -> int:
    removed = 0
    for name in names:
        try:
            blob_path(root, name).unlink()
            removed += 1
        except FileNotFoundError:
            pass
    return removed


def sweep(root: Path, keep: Collection[str], *, now: float | None = None) -> int:
    """Remove the files under `root` that no row names and that are older than the grace."""
    moment = time.time() if now is None else now
    removed = 0
    if not root.is_dir():
        return 0
    for folder in root.iterdir():
        if not folder.is_dir():
            continue
        for file in folder.iterdir():
            if file.name in keep or ".tmp" in file.name:
                continue
            try:
                if moment - file.stat().st_mtime > SWEEP_GRACE:
                    file.unlink()
                    removed += 1
            except FileNotFoundError:
                pass
    return removed
