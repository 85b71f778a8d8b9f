"""Sealed values: AES-256-GCM under a data key, a fresh random nonce per value.

A sealed value is `01 | nonce(12) | ciphertext | tag(16)`; its label (the column or purpose it
was sealed for) is the associated data, so a ciphertext moved into another column (a subject
pasted over a name) does not open there.

Raw messages and attachment files can be large and are written and read in pieces, so they
are sealed as a stream (`02 | prefix(7)`, then chunks of CHUNK bytes of plaintext, each with
its own tag): chunk i's nonce is the prefix, i, and whether it is the last chunk, so chunks can
be neither reordered nor cut off at a chunk boundary without the open failing (the STREAM
construction of Hoang, Reyhanitabar, Rogaway and Vizár). Its sealed size follows from the
plaintext size alone (`stream_size`), which lets a raw message be allocated in the database
before its bytes arrive.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Iterator

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

KEY_BYTES = 32
_VALUE = b"\x01"
_STREAM = b"\x02"
_NONCE = 12
_PREFIX = 7
_TAG = 16
CHUNK = 64 * 1024
STREAM_HEADER = 1 + _PREFIX
VALUE_OVERHEAD = 1 + _NONCE + _TAG


class Undecryptable(Exception):
    """A sealed value does not open: its key is gone (erased) or it was altered."""


class DataKey:
    """One AES-256-GCM key: a person's data key, a message's key or a blob's key."""

    __slots__ = ("_aead", "key_id", "material")

    def __init__(self, material: bytes, key_id: str = "") -> None:
        if len(material) != KEY_BYTES:
            raise ValueError(f"a data key is {KEY_BYTES} bytes")
        self.key_id = key_id
        self.material = material
        self._aead = AESGCM(material)

    @classmethod
    def generate(cls, key_id: str = "") -> DataKey:
        return cls(AESGCM.generate_key(bit_length=256), key_id)

    def seal(self, plaintext: bytes, label: str) -> bytes:
        nonce = os.urandom(_NONCE)
        return _VALUE + nonce + self._aead.encrypt(nonce, plaintext, label.encode())

    def open(self, sealed: bytes, label: str) -> bytes:
        """Raises:
        Undecryptable: not sealed under this key and label, or altered."""
        if len(sealed) < VALUE_OVERHEAD or sealed[:1] != _VALUE:
            raise Undecryptable("not a sealed value")
        nonce = sealed[1 : 1 + _NONCE]
        try:
            return self._aead.decrypt(nonce, sealed[1 + _NONCE :], label.encode())
        except InvalidTag:
            raise Undecryptable("the value does not open under this key") from None

    def seal_text(self, text: str | None, label: str) -> bytes | None:
        return None if text is None else self.seal(text.encode("utf-8"), label)

    def open_text(self, sealed: bytes | None, label: str) -> str | None:
        return None if sealed is None else self.open(sealed, label).decode("utf-8")

    # -- streams ---------------------------------------------------------------------------

    def stream_sealer(self, label: str) -> StreamSealer:
        return StreamSealer(self, label)

    def open_stream(self, sealed: bytes, label: str) -> bytes:
        """Open a whole stream held in memory."""
        return b"".join(self.stream_chunks(iter((sealed,)), label))

    def stream_chunks(self, pieces: Iterator[bytes], label: str) -> Iterator[bytes]:
        """Open a stream read in pieces of any size; yield its plaintext chunk by chunk.

        Raises:
            Undecryptable: a chunk was altered, reordered or cut off, or the key is wrong.
        """
        buffer = bytearray()
        prefix: bytes | None = None
        index = 0
        sealed_chunk = CHUNK + _TAG
        for piece in pieces:
            buffer += piece
            if prefix is None:
                if len(buffer) < STREAM_HEADER:
                    continue
                if buffer[:1] != _STREAM:
                    raise Undecryptable("not a sealed stream")
                prefix = bytes(buffer[1:STREAM_HEADER])
                del buffer[:STREAM_HEADER]
            # Hold back one full chunk: only the end of input tells whether it is the last.
            while len(buffer) > sealed_chunk:
                yield self._open_chunk(prefix, index, bytes(buffer[:sealed_chunk]), label, False)
                del buffer[:sealed_chunk]
                index += 1
        if prefix is None:
            raise Undecryptable("not a sealed stream")
        yield self._open_chunk(prefix, index, bytes(buffer), label, True)

    def open_stream_prefix(self, sealed: bytes, label: str) -> bytes:
        """Open the whole chunks of the start of a longer stream (none of them is its last)."""
        body = memoryview(sealed)[STREAM_HEADER:]
        if sealed[:1] != _STREAM:
            raise Undecryptable("not a sealed stream")
        prefix = sealed[1:STREAM_HEADER]
        sealed_chunk = CHUNK + _TAG
        whole = len(body) // sealed_chunk
        return b"".join(
            self._open_chunk(
                prefix, i, bytes(body[i * sealed_chunk : (i + 1) * sealed_chunk]), label, False
            )
            for i in range(whole)
        )

    def _open_chunk(
        self, prefix: bytes, index: int, sealed: bytes, label: str, last: bool
    ) -> bytes:
        try:
            return self._aead.decrypt(_chunk_nonce(prefix, index, last), sealed, label.encode())
        except InvalidTag:
            raise Undecryptable("a chunk does not open under this key") from None

    def _seal_chunk(self, prefix: bytes, index: int, plain: bytes, label: str, last: bool) -> bytes:
        return self._aead.encrypt(_chunk_nonce(prefix, index, last), plain, label.encode())


class StreamSealer:
    """Seal a stream written in pieces of any size: `header`, then `update` and `finish`."""

    def __init__(self, key: DataKey, label: str) -> None:
        self._key = key
        self._label = label
        self._prefix = os.urandom(_PREFIX)
        self._index = 0
        self._pending = bytearray()
        self.header = _STREAM + self._prefix

    def update(self, data: bytes) -> bytes:
        self._pending += data
        out = []
        # Hold back one chunk's worth: the last chunk is sealed as last by `finish`.
        while len(self._pending) > CHUNK:
            out.append(self._sealed(bytes(self._pending[:CHUNK]), last=False))
            del self._pending[:CHUNK]
        return b"".join(out)

    def finish(self) -> bytes:
        return self._sealed(bytes(self._pending), last=True)

    def _sealed(self, plain: bytes, *, last: bool) -> bytes:
        sealed = self._key._seal_chunk(self._prefix, self._index, plain, self._label, last)
        self._index += 1
        return sealed


def seal_stream(key: DataKey, data: bytes, label: str) -> bytes:
    sealer = key.stream_sealer(label)
    return sealer.header + sealer.update(data) + sealer.finish()


def stream_size(plain_size: int) -> int:
    """The sealed size of a stream of `plain_size` bytes (an empty one is one empty chunk)."""
    chunks = max(1, -(-plain_size // CHUNK))
    return STREAM_HEADER + plain_size + chunks * _TAG


def plain_prefix_size(limit: int) -> int:
    """How many sealed bytes hold the first `limit` bytes of plaintext (whole chunks)."""
    chunks = -(-limit // CHUNK) + 1  # one more: the chunk after may be the last one
    return STREAM_HEADER + chunks * (CHUNK + _TAG)


def _chunk_nonce(prefix: bytes, index: int, last: bool) -> bytes:
    return prefix + struct.pack(">IB", index, 1 if last else 0)
