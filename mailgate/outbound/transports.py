"""Where composed mail goes: a relay over SMTP (aiosmtplib), or .eml files in a folder.

Both raise `DeliveryFailed`, temporary or permanent; the outbox worker decides on retries.
Both keep a `Handover` up to date, so that a stop which has to cut a delivery knows whether
the mail may already be with the relay. The relay's TLS follows `[outbound] tls` (see
`SmtpTransport`); mail that its policy says must be encrypted is deferred, never sent in clear.
"""

from __future__ import annotations

import asyncio
import re
import ssl
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Literal, Protocol

import aiosmtplib
from aiosmtplib.typing import Default

from mailgate.config import OutboundConfig
from mailgate.errors import MailgateError
from mailgate.files import write_durably
from mailgate.tls import client_context

_STATUS = re.compile(r"^([245])\.(\d{1,3})\.(\d{1,3})\b")


@dataclass(frozen=True, slots=True)
class Refusal:
    """A recipient the relay refused at once: at RCPT, or at DATA (then every recipient it
    had accepted). What an asynchronous DSN would report, a few days earlier."""

    recipient: str
    code: int
    text: str  # the relay's whole reply text, its lines joined by newlines
    stage: str  # "RCPT" or "DATA"

    @property
    def permanent(self) -> bool:
        return self.code >= 500

    @property
    def status(self) -> str:
        """The enhanced status code (RFC 3463) the reply starts with, else its class's."""
        found = _STATUS.match(self.text)
        if found and found.group(1) == str(self.code)[0]:
            return found.group(0)
        return f"{self.code // 100}.0.0"


@dataclass(frozen=True, slots=True)
class Delivery:
    """What the transport was told: the relay's replies (one line per refused recipient and
    the reply to DATA) and the recipients it refused while taking the mail for the others."""

    reply: str
    refused: tuple[Refusal, ...] = ()


class DeliveryFailed(MailgateError):
    """The transport did not take the mail; `permanent` (5xx) means retrying cannot help.
    `reply` is the relay's whole reply text; `refused` the recipients it refused at once."""

    def __init__(
        self,
        reason: str,
        *,
        permanent: bool,
        reply: str | None = None,
        refused: tuple[Refusal, ...] = (),
    ) -> None:
        super().__init__(reason)
        self.permanent = permanent
        self.reply = reply
        self.refused = refused


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
    ) -> Delivery:
        """Hand over one message, keeping `handover` up to date; return what the relay said.

        Raises:
            DeliveryFailed: nothing was delivered (or, for 5xx, never will be).
        """


class FileTransport:
    """Write each mail as an .eml file: the default on a fresh machine, and for tests."""

    def __init__(self, directory: Path) -> None:
        self._directory = directory

    async def send(
        self, message: bytes, *, sender: str, recipients: Sequence[str], handover: Handover
    ) -> Delivery:
        handover.committed = True  # a cancel would not stop the thread from writing the file
        name = uuid.uuid4().hex
        try:
            await asyncio.to_thread(self._write, message, name)  # fsync off the event loop
        except OSError as exc:
            raise DeliveryFailed(
                f"cannot write to the outbox folder: {exc}", permanent=False
            ) from exc
        handover.delivered = True
        return Delivery(f"written to {name}.eml")

    def _write(self, message: bytes, name: str) -> None:
        self._directory.mkdir(parents=True, exist_ok=True)
        # Durable before the row says 'sent'; a full disk must not fill up with halves.
        write_durably(self._directory / f"{name}.eml", message)


class _RelayClient(aiosmtplib.SMTP):
    """aiosmtplib's client, keeping a `Handover` (its `sendmail` calls `data`) and the relay's
    replies per recipient (it calls `rcpt` for each; `sendmail` drops the refusals once DATA
    fails), and closing at once when a stop cuts the delivery: a QUIT to a relay that is not
    answering would wait out `outbound.timeout` again."""

    def __init__(self, *, handover: Handover, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._handover = handover
        self.accepted: list[str] = []
        self.refused: list[Refusal] = []
        self.replies: list[str] = []  # the relay's words, one line per reply that matters

    async def rcpt(
        self,
        recipient: str,
        /,
        *,
        options: Iterable[str] | None = None,
        encoding: str = "ascii",
        timeout: float | Literal[Default.token] | None = Default.token,  # noqa: ASYNC109 - theirs
    ) -> aiosmtplib.SMTPResponse:
        try:
            response = await super().rcpt(
                recipient, options=options, encoding=encoding, timeout=timeout
            )
        except aiosmtplib.SMTPRecipientRefused as exc:
            self.refused.append(Refusal(recipient, exc.code, exc.message, "RCPT"))
            self.replies.append(f"RCPT <{recipient}>: {exc.code} {exc.message}")
            raise
        self.accepted.append(recipient)
        return response

    async def data(
        self,
        message: str | bytes,
        /,
        *,
        timeout: float | Literal[Default.token] | None = Default.token,  # noqa: ASYNC109 - theirs
    ) -> aiosmtplib.SMTPResponse:
        self._handover.committed = True
        try:
            response = await super().data(message, timeout=timeout)
        except aiosmtplib.SMTPResponseException as exc:
            self.replies.append(f"DATA: {exc.code} {exc.message}")
            if exc.code >= 500:  # the relay refuses the mail for every recipient it accepted
                self.refused += [Refusal(r, exc.code, exc.message, "DATA") for r in self.accepted]
            raise
        self._handover.delivered = True  # super() raises unless the answer was 250
        self.replies.append(f"DATA: {response.code} {response.message}")
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
    """Deliver to the relay, encrypted as `[outbound] tls` says, then AUTH, then the mail.

    - `required`: STARTTLS, always; a relay that does not offer it, or a handshake or a
      certificate that fails, defers the mail (retried, the reason in `last_error`).
    - `opportunistic`: STARTTLS when the relay offers it, else in clear. Offered, it is
      verified as with `required`, and a failed verification defers the mail: it never
      falls back to clear text or to an unverified peer (Postfix's "may" does; a relay that
      offers TLS with a certificate mailgate cannot check needs `tls_ca_file`).
    - `implicit`: TLS from the first byte (port 465), verified.
    - `none`: in clear.

    The certificate is checked against the system's trust store, or `tls_ca_file`, and
    against the relay's host name as `[outbound] relay` writes it. AUTH (`username`) is sent
    only over an encrypted connection; without one the mail is deferred.
    """

    def __init__(self, config: OutboundConfig, *, local_hostname: str) -> None:
        self._config = config
        self._local_hostname = local_hostname
        # Built once, here: a bad tls_ca_file stops the start (ConfigError, exit 78).
        self._tls = client_context(config.tls_ca_file) if config.tls != "none" else None

    async def send(
        self, message: bytes, *, sender: str, recipients: Sequence[str], handover: Handover
    ) -> Delivery:
        config = self._config
        client = _RelayClient(
            handover=handover,
            hostname=config.relay.host,
            port=config.relay.port,
            local_hostname=self._local_hostname,
            timeout=config.timeout,
            use_tls=config.tls == "implicit",
            start_tls=False,  # _secure decides; aiosmtplib would log in whatever came of it
            tls_context=self._tls,
        )
        try:
            async with client:
                await self._secure(client)
                await client.sendmail(sender, list(recipients), message)
        except aiosmtplib.SMTPRecipientsRefused as exc:
            refused = tuple(client.refused)
            raise DeliveryFailed(
                "recipients refused: " + "; ".join(_refusal(r) for r in refused),
                permanent=all(r.permanent for r in refused),
                reply="\n".join(client.replies),
                refused=refused,
            ) from exc
        except aiosmtplib.SMTPResponseException as exc:
            replies = client.replies or [f"{exc.code} {exc.message}"]  # before RCPT: MAIL, AUTH
            raise DeliveryFailed(
                f"relay answered {exc.code} {exc.message}",
                permanent=exc.code >= 500,
                reply="\n".join(replies),
                refused=tuple(client.refused),
            ) from exc
        except (aiosmtplib.SMTPException, OSError, TimeoutError) as exc:
            failed_tls = _tls_failure(exc)
            if failed_tls is not None:
                raise DeliveryFailed(
                    f"TLS with the relay failed: {failed_tls}", permanent=False
                ) from exc
            raise DeliveryFailed(f"relay unreachable: {exc}", permanent=False) from exc
        return Delivery("\n".join(client.replies), tuple(client.refused))

    async def _secure(self, client: aiosmtplib.SMTP) -> None:
        """STARTTLS as the policy says, then AUTH only if the connection is encrypted.

        Raises:
            DeliveryFailed: temporary: the policy or the password forbids going on in clear.
        """
        config = self._config
        encrypted = config.tls == "implicit"
        if config.tls in ("required", "opportunistic"):
            if client.is_ehlo_or_helo_needed:
                await client.ehlo()
            if client.supports_extension("starttls"):
                await client.starttls()
                encrypted = True
            elif config.tls == "required":
                raise DeliveryFailed(
                    "relay does not offer STARTTLS (outbound.tls = required); not sent in clear",
                    permanent=False,
                )
        if config.username is not None:
            if not encrypted:
                raise DeliveryFailed(
                    "relay connection is not encrypted: AUTH is never sent in clear; not sent",
                    permanent=False,
                )
            try:
                await client.login(config.username, config.password or "")
            except aiosmtplib.SMTPResponseException as exc:
                # Even a 535 is ours to fix (a wrong or rotated password), not the mail's: it
                # waits, as with Postfix's smtp_sasl_auth_soft_bounce, instead of failing.
                raise DeliveryFailed(
                    f"relay refused the login: {exc.code} {exc.message}", permanent=False
                ) from exc


def _tls_failure(exc: BaseException) -> str | None:
    """The TLS error behind a failed connection or STARTTLS, as OpenSSL words it, or None.

    aiosmtplib wraps an implicit-TLS handshake error in SMTPConnectError and lets STARTTLS's
    through as it is.
    """
    while exc is not None:
        if isinstance(exc, ssl.SSLCertVerificationError):
            return (
                f"certificate not verified ({exc.verify_message}); not sent"
                " (a private CA goes into outbound.tls_ca_file)"
            )
        if isinstance(exc, ssl.SSLError):
            return f"{exc.reason or exc}; not sent"
        exc = exc.__cause__  # type: ignore[assignment]
    return None


def _refusal(refusal: Refusal) -> str:
    return f"<{refusal.recipient}> {refusal.code} {refusal.text}"


def transport_for(config: OutboundConfig, *, local_hostname: str) -> Transport:
    if config.transport == "smtp":
        return SmtpTransport(config, local_hostname=local_hostname)
    return FileTransport(config.directory)
