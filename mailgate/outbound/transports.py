"""Where composed mail goes: a relay over SMTP (aiosmtplib), or .eml files in a folder.

Both raise `DeliveryFailed`, temporary or permanent; the outbox worker decides on retries.
"""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

import aiosmtplib

from mailgate.config import OutboundConfig
from mailgate.errors import MailgateError


class DeliveryFailed(MailgateError):
    """The transport did not take the mail; `permanent` (5xx) means retrying cannot help."""

    def __init__(self, reason: str, *, permanent: bool) -> None:
        super().__init__(reason)
        self.permanent = permanent


class Transport(Protocol):
    async def send(self, message: bytes, *, sender: str, recipients: Sequence[str]) -> None:
        """Hand over one message.

        Raises:
            DeliveryFailed: nothing was delivered (or, for 5xx, never will be).
        """


class FileTransport:
    """Write each mail as an .eml file: the default on a fresh machine, and for tests."""

    def __init__(self, directory: Path) -> None:
        self._directory = directory

    async def send(self, message: bytes, *, sender: str, recipients: Sequence[str]) -> None:
        try:
            await asyncio.to_thread(self._write, message)  # fsync stays off the event loop
        except OSError as exc:
            raise DeliveryFailed(
                f"cannot write to the outbox folder: {exc}", permanent=False
            ) from exc

    def _write(self, message: bytes) -> None:
        self._directory.mkdir(parents=True, exist_ok=True)
        name = uuid.uuid4().hex
        tmp = self._directory / f".{name}.tmp"
        try:
            with open(tmp, "xb") as fh:
                fh.write(message)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, self._directory / f"{name}.eml")
        except BaseException:
            tmp.unlink(missing_ok=True)  # a full disk must not fill up with halves
            raise
        folder = os.open(self._directory, os.O_RDONLY)
        try:
            os.fsync(folder)  # the rename survives a power loss before the row says 'sent'
        finally:
            os.close(folder)


class SmtpTransport:
    """Deliver to the relay: STARTTLS when offered (or required), implicit TLS, AUTH."""

    def __init__(self, config: OutboundConfig, *, local_hostname: str) -> None:
        self._config = config
        self._local_hostname = local_hostname

    async def send(self, message: bytes, *, sender: str, recipients: Sequence[str]) -> None:
        config = self._config
        client = aiosmtplib.SMTP(
            hostname=config.relay.host,
            port=config.relay.port,
            local_hostname=self._local_hostname,
            timeout=config.timeout,
            use_tls=config.tls == "implicit",
            start_tls=None if config.tls == "starttls" else False,  # None: when offered
            username=config.username,
            password=config.password,
        )
        try:
            async with client:
                await client.sendmail(sender, list(recipients), message)
        except aiosmtplib.SMTPRecipientsRefused as exc:
            codes = [refusal.code for refusal in exc.recipients]
            raise DeliveryFailed(
                f"recipients refused: {codes}", permanent=all(c >= 500 for c in codes)
            ) from exc
        except aiosmtplib.SMTPResponseException as exc:
            raise DeliveryFailed(
                f"relay answered {exc.code} {exc.message}", permanent=exc.code >= 500
            ) from exc
        except (aiosmtplib.SMTPException, OSError, TimeoutError) as exc:
            raise DeliveryFailed(f"relay unreachable: {exc}", permanent=False) from exc


def transport_for(config: OutboundConfig, *, local_hostname: str) -> Transport:
    if config.transport == "smtp":
        return SmtpTransport(config, local_hostname=local_hostname)
    return FileTransport(config.directory)
