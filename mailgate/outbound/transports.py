"""Where composed mail goes: a relay over SMTP (aiosmtplib), or .eml files in a folder.

Both raise `DeliveryFailed`, temporary or permanent; the outbox worker decides on retries.
Both keep a `Handover` up to date, so that a stop which has to cut a delivery knows whether
the mail may already be with the relay.
"""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, Literal, Protocol

import aiosmtplib
from aiosmtplib.typing import Default

from mailgate.config import OutboundConfig
from mailgate.errors import MailgateError


class DeliveryFailed(MailgateError):
    """The transport did not take the mail; `permanent` (5xx) means retrying cannot help."""

    def __init__(self, reason: str, *, permanent: bool) -> None:
        super().__init__(reason)
        self.permanent = permanent


class Handover:
    """How far one delivery got, for a stop that cuts it (see `OutboundWorker.stop`).

    `committed`: from here on the relay may have the mail (DATA was sent: the relay takes the
    mail at the final dot whether or not its answer still reaches us; or a file write began,
    which no cancel stops), so a cut delivery must not be queued again blindly. `delivered`:
    the relay answered 250 to the final dot (the file is in place). `done`: the transport has
    returned or raised; only the outcome is left to record.
    """

    __slots__ = ("committed", "delivered", "done")

    def __init__(self) -> None:
        self.committed = False
        self.delivered = False
        self.done = False


class Transport(Protocol):
    async def send(
        self, message: bytes, *, sender: str, recipients: Sequence[str], handover: Handover
    ) -> None:
        """Hand over one message, keeping `handover` up to date.

        Raises:
            DeliveryFailed: nothing was delivered (or, for 5xx, never will be).
        """


class FileTransport:
    """Write each mail as an .eml file: the default on a fresh machine, and for tests."""

    def __init__(self, directory: Path) -> None:
        self._directory = directory

    async def send(
        self, message: bytes, *, sender: str, recipients: Sequence[str], handover: Handover
    ) -> None:
        handover.committed = True  # a cancel would not stop the thread from writing the file
        try:
            await asyncio.to_thread(self._write, message)  # fsync stays off the event loop
        except OSError as exc:
            raise DeliveryFailed(
                f"cannot write to the outbox folder: {exc}", permanent=False
            ) from exc
        handover.delivered = True

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


class _RelayClient(aiosmtplib.SMTP):
    """aiosmtplib's client, keeping a `Handover` (its `sendmail` calls `data`), and closing at
    once when a stop cuts the delivery: a QUIT to a relay that is not answering would wait
    out `outbound.timeout` again."""

    def __init__(self, *, handover: Handover, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._handover = handover

    async def data(
        self,
        message: str | bytes,
        /,
        *,
        timeout: float | Literal[Default.token] | None = Default.token,  # noqa: ASYNC109 - theirs
    ) -> aiosmtplib.SMTPResponse:
        self._handover.committed = True
        response = await super().data(message, timeout=timeout)
        self._handover.delivered = True  # super() raises unless the answer was 250
        return response

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if isinstance(exc, asyncio.CancelledError):
            self.close()
            return
        await super().__aexit__(exc_type, exc, traceback)


class SmtpTransport:
    """Deliver to the relay: STARTTLS when offered (or required), implicit TLS, AUTH."""

    def __init__(self, config: OutboundConfig, *, local_hostname: str) -> None:
        self._config = config
        self._local_hostname = local_hostname

    async def send(
        self, message: bytes, *, sender: str, recipients: Sequence[str], handover: Handover
    ) -> None:
        config = self._config
        client = _RelayClient(
            handover=handover,
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
