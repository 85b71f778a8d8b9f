"""The intake bench's "plaintext" target: mailgate with AES-GCM replaced by a copy that keeps
the same sizes (a 16-byte zero tag) but does no cryptography, so "mailgate" against
"plaintext" in one run is the cost of sealing alone. Imported by every Python process that has
this folder on PYTHONPATH (the daemon and its spawned parser process alike); never shipped."""

from __future__ import annotations

import os

if os.environ.get("MAILGATE_BENCH_NULL_CIPHER") == "1":
    import mailgate.privacy.sealing as sealing

    class NullAEAD:
        def __init__(self, key: bytes) -> None:
            self._key = key

        @staticmethod
        def generate_key(bit_length: int) -> bytes:
            return os.urandom(bit_length // 8)

        def encrypt(self, nonce: bytes, data: bytes, aad: bytes | None) -> bytes:
            return data + bytes(16)

        def decrypt(self, nonce: bytes, data: bytes, aad: bytes | None) -> bytes:
            return data[:-16]

    sealing.AESGCM = NullAEAD  # type: ignore[assignment, attr-defined]
