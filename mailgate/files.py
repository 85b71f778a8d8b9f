"""The one durable file write: what a crash or a power loss leaves is the old file or the
new one, never half of one, and a full disk leaves nothing behind.

The bytes go to a temporary file beside the target (fsynced), which then becomes the target
(renamed over it, or linked if it must not exist yet), and the folder is fsynced so that the
name survives a power loss too.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path


def write_durably(
    path: Path,
    data: bytes,
    *,
    mode: int = 0o644,
    exclusive: bool = False,
    owner: tuple[int, int] | None = None,
) -> bool:
    """Write `data` to `path` durably; with `exclusive`, only if `path` does not exist yet;
    with `owner` (uid, gid), the new file has that owner from the start (root replacing a
    service user's file).

    Returns False when `exclusive` found `path` already there (someone else wrote it first),
    True when `data` is in place.

    Raises:
        OSError: it could not be written; no temporary file is left behind.
    """
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
        with os.fdopen(fd, "wb") as fh:
            if owner is not None and owner != _owner_of(fd):
                os.fchown(fd, *owner)
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        if exclusive:
            try:
                os.link(tmp, path)
            except FileExistsError:
                return False
        else:
            os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)  # after a link, or a failure: never a stray temporary
    folder = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(folder)
    finally:
        os.close(folder)
    return True


def _owner_of(fd: int) -> tuple[int, int]:
    stat = os.fstat(fd)
    return stat.st_uid, stat.st_gid
