"""Content-addressed attachment files under [storage] attachments.

A file's name is the SHA-256 of its bytes, so the customer's filename never reaches the
filesystem, identical attachments are stored once, and writing again is harmless.

A write goes to a temporary file first, then is renamed into place; a write that fails (a
full disk) removes its temporary file, so retrying costs no space and freeing space is all
it takes for the next try to succeed.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from mailgate.files import write_durably


def blob_path(root: Path, sha256: str) -> Path:
    return root / sha256[:2] / sha256


def save_blob(root: Path, data: bytes) -> str:
    """Write `data` durably (fsync, atomic rename) unless already present; return its hash.

    Raises:
        OSError: it could not be written; nothing of this attempt is left behind.
    """
    digest = hashlib.sha256(data).hexdigest()
    target = blob_path(root, digest)
    if target.exists():
        return digest
    target.parent.mkdir(parents=True, exist_ok=True)
    write_durably(target, data)
    return digest
