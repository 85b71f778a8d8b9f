"""The intake bench's nulled builds of mailgate, each chosen by an environment variable, so
that mailgate against one of them in the same run is the cost of one part alone:

- MAILGATE_BENCH_NULL_CIPHER=1, the "plaintext" target: AES-GCM replaced by a copy that keeps
  the same sizes (a 16-byte zero tag) but does no cryptography: the cost of sealing.
- MAILGATE_BENCH_NULL_METRICS=1, the "nometrics" target: the calls components make into
  mailgate.metrics (per SMTP reply, session and message, per ingested row and outbox
  attempt) made no-ops: the cost of the /metrics instrumentation. `/metrics` still answers,
  its counters at 0.

Imported by every Python process that has this folder on PYTHONPATH (the daemon and its
spawned parser process alike); never shipped."""

from __future__ import annotations

import os
from typing import Any

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

if os.environ.get("MAILGATE_BENCH_NULL_METRICS") == "1":
    import mailgate.metrics as metrics

    def _nothing(*args: Any, **kwargs: Any) -> None:
        return None

    def _metered(peer: Any) -> bool:
        return True  # as for any session but a health probe's: nothing else depends on it

    metrics.smtp_session_opened = _metered
    for name in (
        "smtp_session_closed",
        "smtp_replied",
        "data_answered",
        "ingest_finished",
        "outbound_attempted",
        "outbound_finished",
    ):
        setattr(metrics, name, _nothing)
