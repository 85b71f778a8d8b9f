"""A message while it arrives: in memory while it is small, then in an unnamed spool file.

DATA may bring up to `max_message_size` bytes on each of `max_connections` sessions at once;
held in memory that is their product (100 x 25 MiB: 2.5 GiB before any copy). So a message
that passes `SPOOL_THRESHOLD` moves to a file and the session keeps only what it has not yet
written, at most `WRITE_CHUNK`. The file is a buffer, not a copy of record: it is never
fsynced, its name is removed at once (`tempfile.TemporaryFile`: O_TMPFILE on Linux, unlinked
at creation elsewhere), so a crash or `kill -9` leaves nothing to recover or clean up. What
makes a message durable is the store's commit, which copies the file into the database in
pieces (`store/sqlite.py`); only then does the sender get its 250.

The file lives in the database's folder: the same filesystem, which the free-space check at
MAIL covers. Writes run in a small thread pool of their own: a write that waits for the disk
holds up its own session, never the event loop (and with it every session).

What reaches the disk is encrypted (AES-256-CTR under a key that only this process's memory
holds, made for the one file): a message that takes minutes to arrive is written back to the
disk meanwhile, and its blocks stay there after the file is gone. The store seals it under
the message's own key as it copies it in.
"""

from __future__ import annotations

import asyncio
import os
import tempfile
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import BinaryIO, TypeVar

from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

T = TypeVar("T")

# A message larger than this goes to a spool file as it arrives; smaller ones stay in memory
# (a file per small message would cost a syscall or three for nothing).
SPOOL_THRESHOLD = 1024 * 1024
# Once spooling, what a session holds before it writes; also the piece the commit copies.
WRITE_CHUNK = 256 * 1024
# Threads writing spool files, shared by all sessions.
WRITERS = 4
# What one encryption step of a write covers.
_PIECE = 64 * 1024

_pool: ThreadPoolExecutor | None = None


def _writers() -> ThreadPoolExecutor:
    """The process's spool writer threads, started on first use."""
    global _pool
    if _pool is None:
        _pool = ThreadPoolExecutor(max_workers=WRITERS, thread_name_prefix="spool")
    return _pool


class _Veil:
    """The spool file's own key: AES-256-CTR, so any piece en- or decrypts at its offset."""

    __slots__ = ("_key", "_nonce")

    def __init__(self) -> None:
        self._key = os.urandom(32)
        self._nonce = os.urandom(8)

    def apply(self, data: bytes | memoryview, offset: int) -> bytes:
        """`data` en- or decrypted as the bytes at `offset` of the file."""
        block, skip = divmod(offset, 16)
        counter = self._nonce + block.to_bytes(8, "big")
        stream = Cipher(algorithms.AES(self._key), modes.CTR(counter)).encryptor()
        stream.update(bytes(skip))  # into the block where `offset` is
        return stream.update(data)


class Spooled:
    """A finished message in an unnamed spool file, read back by offset (`os.pread`).

    Reads never move a file position, so the store's writer thread may read it while the
    session's task still holds it. It is closed when the last holder lets go: the session
    and the commit each `retain()` and `release()`, in whatever order they finish.
    """

    def __init__(self, file: BinaryIO, size: int, veil: _Veil | None = None) -> None:
        self._file = file
        self.size = size
        self._veil = veil or _Veil()  # the key `Spool` wrote it under
        self._holders = 1

    def chunks(self, size: int = WRITE_CHUNK) -> Iterator[bytes]:
        """The message in pieces of `size` bytes, from the start.

        Raises:
            OSError: the file could not be read, or is shorter than the message.
        """
        fd = self._file.fileno()
        offset = 0
        while offset < self.size:
            piece = os.pread(fd, min(size, self.size - offset), offset)
            if not piece:
                raise OSError(f"spool file ends at {offset} of {self.size} bytes")
            yield self._veil.apply(piece, offset)
            offset += len(piece)

    def head(self, size: int) -> bytes:
        """The first `size` bytes (or the whole message, if shorter)."""
        return self._veil.apply(os.pread(self._file.fileno(), min(size, self.size), 0), 0)

    def retain(self) -> Spooled:
        self._holders += 1
        return self

    def release(self) -> None:
        """Let go; the last holder closes the file (and the filesystem frees its space)."""
        self._holders -= 1
        if self._holders == 0:
            self._file.close()


class Spool:
    """Collects one message's bytes: memory up to `threshold`, then an unnamed file."""

    def __init__(self, folder: Path, *, threshold: int = SPOOL_THRESHOLD) -> None:
        self._folder = folder
        self._threshold = threshold
        self._buffer = bytearray()
        self._file: BinaryIO | None = None
        self._veil = _Veil()
        self._written = 0
        self.size = 0

    async def write(self, data: bytes) -> None:
        """Add `data`; past the threshold, what is held goes to the file.

        Raises:
            OSError: the spool file could not be made or written (disk full); discard().
        """
        self._buffer += data
        self.size += len(data)
        if self._file is None and len(self._buffer) > self._threshold:
            self._file = await self._run(self._open)
        if self._file is not None and len(self._buffer) >= WRITE_CHUNK:
            await self._flush()

    async def finish(self) -> bytes | Spooled:
        """The whole message: bytes if it stayed small, else the file, written out."""
        if self._file is None:
            data, self._buffer = bytes(self._buffer), bytearray()
            return data
        await self._flush()
        spooled = Spooled(self._file, self.size, self._veil)
        self._file = None
        return spooled

    def discard(self) -> None:
        """Drop what was collected (refused, or the session ended); safe to call twice."""
        self._buffer = bytearray()
        if self._file is not None:
            self._file.close()
            self._file = None

    def _open(self) -> BinaryIO:
        return tempfile.TemporaryFile(dir=self._folder, prefix=".spool-", buffering=0)

    async def _flush(self) -> None:
        data, self._buffer = self._buffer, bytearray()
        if data:
            file = self._file
            assert file is not None
            await self._run(_write_all, file, self._veil, self._written, data)
            self._written += len(data)

    @staticmethod
    async def _run(func: Callable[..., T], *args: object) -> T:
        return await asyncio.get_running_loop().run_in_executor(_writers(), func, *args)


def _write_all(file: BinaryIO, veil: _Veil, offset: int, data: bytearray) -> None:
    """Write all of `data`, encrypted as the bytes at `offset`, a piece at a time (a copy of
    a piece, not of the whole, is what encrypting costs; an unbuffered write may write less
    than asked)."""
    view = memoryview(data)
    for start in range(0, len(view), _PIECE):
        piece = memoryview(veil.apply(view[start : start + _PIECE], offset + start))
        while piece:
            written = file.write(piece)
            if not written:
                raise OSError("spool file write wrote nothing")
            piece = piece[written:]
