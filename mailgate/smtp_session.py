"""The SMTP session: aiosmtpd's protocol with enhanced replies, and the session limits.

`MailgateSMTP` holds what a hostile client must not be able to exhaust: connections (in total
and per IP), file descriptors, errors, time (an idle timeout and a minimum DATA rate) and
memory (the message size; DATA read in pieces whatever its line lengths, `smtp_data.py`, and
a large message kept in a spool file, `spool.py`). Command arguments that are not UTF-8 or
hold controls are refused at their command, so no session keeps a value the store could not
take. Replies carry RFC 3463 enhanced status codes; aiosmtpd's own bare replies are rewritten
on the way out, and no exception text ever reaches a client. A trusted proxy may name the
original client with XFORWARD (`TransactionEnvelope`). The handler that decides what to do
with mail is in `smtp.py`.
"""

from __future__ import annotations

import asyncio
import collections
import errno
import ipaddress
import os
import re
import resource
import ssl
import uuid
from asyncio import sslproto
from datetime import datetime
from email._header_value_parser import get_addr_spec, get_angle_addr
from email.errors import HeaderParseError
from pathlib import Path
from typing import Any, NoReturn

import structlog
from aiosmtpd.smtp import MISSING, SMTP, Session, TLSSetupException, syntax
from aiosmtpd.smtp import Envelope as SmtpEnvelope

from mailgate import metrics
from mailgate.config import SmtpConfig
from mailgate.model import ForwardedClient, HostPort
from mailgate.smtp_data import DataReader
from mailgate.spool import Spool, Spooled
from mailgate.trace import Hop, new_queue_id, received_field

log = structlog.get_logger(__name__)

TEMPFAIL = "451 4.3.0 Temporary failure, please try again later"
TOO_MANY_CONNECTIONS = "421 4.7.0 Too many connections, try again later"
TOO_MANY_FROM_PEER = "421 4.7.0 Too many connections from your address, try again later"
SERVER_BUSY = "421 4.7.0 Server busy, try again later"
TOO_MANY_ERRORS = "421 4.7.0 Too many errors, closing connection"
TOO_MANY_UNKNOWN = "421 4.7.0 Too many unrecognized commands, closing connection"
IDLE_TIMEOUT = "421 4.4.2 Timeout, closing connection"
DATA_TOO_SLOW = "421 4.4.2 Data transfer too slow, closing connection"
SHUTTING_DOWN = "421 4.3.2 Service shutting down"
TOO_MANY_RECIPIENTS = "452 4.5.3 Too many recipients"
LOW_STORAGE = "452 4.3.1 Insufficient system storage, try again later"
MAIL_LOOP = "554 5.4.6 Too many Received headers: mail loop detected"
MESSAGE_TOO_BIG = "552 5.3.4 Message too big for this system"
NOT_UTF8 = "501 5.5.2 Syntax error: not UTF-8"
CONTROL_CHARACTER = "501 5.5.2 Syntax error: control character"
NEEDS_SMTPUTF8 = "501 5.5.2 Syntax error: non-ASCII address without SMTPUTF8"
XFORWARD_EHLO = "250-XFORWARD NAME ADDR PROTO HELO IDENT"
XFORWARD_OK = "250 2.0.0 Ok"
XFORWARD_NOT_PERMITTED = "550 5.7.0 XFORWARD not permitted from your address"
XFORWARD_IN_TRANSACTION = "503 5.5.1 Error: MAIL transaction in progress"
STARTTLS_NOT_OFFERED = "502 5.5.1 STARTTLS not offered"
TLS_ALREADY_ACTIVE = "554 5.5.1 Error: TLS already active"

# The minimum DATA rate is enforced from this many seconds after DATA (or timeout/10 if
# smaller): a client gets time to open its window before its average is judged.
DATA_RATE_GRACE = 10.0
# A hung-up client that does not read its last reply is aborted (RST) after this long, so a
# full send buffer cannot keep the connection open.
HANG_UP_LINGER = 10.0
# MAIL is refused while the database's filesystem (the message's spool file, then the WAL
# before the checkpoint) or the attachments' has less free space than this many
# maximum-size messages.
FREE_SPACE_MESSAGES = 1.5
# New sessions are refused while fewer file descriptors than this are left under the soft
# RLIMIT_NOFILE: the database, the parser's pipes, the HTTP listener and outbound delivery
# keep working, and accept() never fails with EMFILE (asyncio then stops accepting for 1 s).
FD_RESERVE = 64
# Where the open descriptors of this process are listed (Linux; macOS and the BSDs).
_FD_FOLDERS = ("/proc/self/fd", "/dev/fd")

# aiosmtpd's replies without enhanced codes (RFC 2034), rewritten as they are sent.
_ENHANCED = {
    "250 OK": "250 2.0.0 OK",
    "221 Bye": "221 2.0.0 Bye",
    "552 Error: Too much mail data": "552 5.3.4 Message too big for this system",
    "552 Error: message size exceeds fixed maximum message size": (
        "552 5.3.4 Message size exceeds fixed maximum message size"
    ),
    "500 Command line too long": "500 5.5.2 Command line too long",
    # [smtp] require_tls (RFC 3207 section 4): aiosmtpd's refusal before STARTTLS.
    "530 Must issue a STARTTLS command first": "530 5.7.0 Must issue a STARTTLS command first",
    "500 Error: bad syntax": "500 5.5.2 Syntax error",
    "503 Error: need MAIL command": "503 5.5.1 Need MAIL command",
    "503 Error: need RCPT command": "503 5.5.1 Need RCPT command",
    "503 Error: nested MAIL command": "503 5.5.1 Nested MAIL command",
    "503 Error: send HELO first": "503 5.5.1 Send HELO first",
    "501 Syntax: MAIL FROM: <address>": "501 5.5.4 Syntax: MAIL FROM:<address>",
    "501 Syntax: MAIL FROM: <address> [SP <mail-parameters>]": (
        "501 5.5.4 Syntax: MAIL FROM:<address> [SP <mail-parameters>]"
    ),
    "501 Syntax: RCPT TO: <address>": "501 5.5.4 Syntax: RCPT TO:<address>",
    "501 Syntax: RCPT TO: <address> [SP <mail-parameters>]": (
        "501 5.5.4 Syntax: RCPT TO:<address> [SP <mail-parameters>]"
    ),
    "502 EXPN not implemented": "502 5.5.1 EXPN not implemented",
    "252 Cannot VRFY user, but will accept message and attempt delivery": (
        "252 2.5.2 Cannot VRFY user, but will accept message"
    ),
}
# Enhanced codes by basic code where aiosmtpd's text varies; else by class (RFC 3463).
_BY_CODE = {"500": "5.5.2", "501": "5.5.4", "502": "5.5.1", "503": "5.5.1", "555": "5.5.4"}
_CLASS_DEFAULTS = {"4": "4.0.0", "5": "5.5.0"}
_UNRECOGNIZED = '500 Error: command "'  # aiosmtpd echoes the client's word; we don't
_BOGUS_GOODBYE = "502 5.5.1 Too many unrecognized commands"  # aiosmtpd's fixed limit of 5
# Refusals that are not the client's fault (ours, or the session ending anyway): they do not
# count towards max_errors. 452 4.5.3 counts only past an overshoot allowance (see push).
_NOT_CLIENT_ERRORS = ("421 ", "451 ", "452 4.3.1 ")
# aiosmtpd decodes a command's argument as UTF-8 with surrogateescape: each byte that is not
# UTF-8 becomes a lone surrogate, which no UTF-8 encoder (SQLite's included) accepts.
_SURROGATE = re.compile("[\ud800-\udfff]")
# C0 and C1 controls, DEL, and the Unicode line and paragraph separators: none belongs in a
# host name or an address, and each could split or forge a header built from one.
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")


def enhance(reply: str) -> str:
    """Add an enhanced status code to a final reply that lacks one."""
    if reply in _ENHANCED:
        return _ENHANCED[reply]
    if reply.startswith(_UNRECOGNIZED):
        return "500 5.5.1 Command not recognized"
    code, sep, text = reply.partition(" ")
    if sep and len(code) == 3 and code[0] in "45" and not (text[:1].isdigit() and text[1:2] == "."):
        return f"{code} {_BY_CODE.get(code) or _CLASS_DEFAULTS[code[0]]} {text}"
    return reply


def argument_fault(arg: str | None, *, ascii_only: bool = False) -> str | None:
    """The refusal for a command argument that must not reach the session, or None.

    An argument that is not UTF-8 or holds a control character would be kept in the session
    (HELO) or the envelope, and a string that cannot be stored fails the group commit it
    shares with other sessions' messages; so it is refused at its command.
    """
    if not arg:
        return None
    if _SURROGATE.search(arg):
        return NOT_UTF8
    if _CONTROL.search(arg):
        return CONTROL_CHARACTER
    if ascii_only and not arg.isascii():
        return NEEDS_SMTPUTF8
    return None


# -- XFORWARD (Postfix's XFORWARD_README) ------------------------------------------------

XFORWARD_ATTRIBUTES = ("NAME", "ADDR", "PORT", "PROTO", "HELO", "IDENT", "SOURCE")
_XFORWARD_UNKNOWN = ("[UNAVAILABLE]", "[TEMPUNAVAIL]")  # any case
_XTEXT = re.compile(r"(?:[^+]|\+[0-9A-Fa-f]{2})*")  # RFC 3461 xtext ("+" and two hex digits)
_XTEXT_HEX = re.compile(r"\+([0-9A-Fa-f]{2})")
_PRINTABLE = re.compile(r"[!-~]+")  # after decoding: no controls, spaces or non-ASCII


class XforwardError(ValueError):
    """An XFORWARD argument that is not `attribute=value ...`; the text is the reply's."""


def parse_xforward(arg: str) -> dict[str, str | None]:
    """The attributes an XFORWARD argument sets, decoded; None for an unknown value.

    Values are xtext, at most 255 characters, and decoded must be printable ASCII without
    white space (the README's Note 1), so no value from the proxy can carry CR, LF or other
    controls into the envelope. ADDR must be an IP address (an "IPV6:" prefix is dropped).

    Raises:
        XforwardError: the reply text (501 5.5.4) names what is wrong, never the value.
    """
    tokens = arg.split()
    if not tokens:
        raise XforwardError("Syntax: XFORWARD attribute=value ...")
    attributes: dict[str, str | None] = {}
    for token in tokens:
        name, sep, encoded = token.partition("=")
        name = name.upper()
        if name not in XFORWARD_ATTRIBUTES:
            raise XforwardError("Bad XFORWARD attribute name")
        if not sep or not encoded or len(encoded) > 255 or not _XTEXT.fullmatch(encoded):
            raise XforwardError(f"Bad XFORWARD {name} syntax")
        value = _XTEXT_HEX.sub(lambda m: chr(int(m[1], 16)), encoded)
        if value.upper() in _XFORWARD_UNKNOWN:
            attributes[name] = None
        elif not _PRINTABLE.fullmatch(value):
            raise XforwardError(f"Bad XFORWARD {name} syntax")
        else:
            attributes[name] = _xforward_value(name, value)
    return attributes


def _xforward_value(name: str, value: str) -> str:
    """Check (and normalise) one known attribute value by its name."""
    if name == "ADDR":
        if value[:5].upper() == "IPV6:":
            value = value[5:]
        try:
            return str(ipaddress.ip_address(value))
        except ValueError:
            raise XforwardError("Bad XFORWARD ADDR syntax") from None
    if name == "PORT" and not (value.isdigit() and int(value) <= 65535):
        raise XforwardError("Bad XFORWARD PORT syntax")
    if name == "PROTO" and len(value) > 64:
        raise XforwardError("Bad XFORWARD PROTO syntax")
    if name == "SOURCE" and value.upper() not in ("LOCAL", "REMOTE"):
        raise XforwardError("Bad XFORWARD SOURCE syntax")
    return value


class TransactionEnvelope(SmtpEnvelope):
    """aiosmtpd's envelope, with what a trusted proxy said about the client by XFORWARD.

    aiosmtpd starts a new envelope when a transaction ends (after DATA, at RSET, HELO and
    EHLO), which is exactly when XFORWARD's attributes reset: they hold for the next MAIL
    transaction only, so a proxy's cached connection never lends one client's to another.
    """

    def __init__(self) -> None:
        super().__init__()
        self.xforward: dict[str, str | None] | None = None  # None: no XFORWARD yet
        # The message after DATA: bytes (also in `content`), or a spool file if it was large.
        self.message: bytes | Spooled | None = None
        self.queue_id: str | None = None  # named by our Received field, made at DATA

    def forward(self, attributes: dict[str, str | None]) -> None:
        """Apply one XFORWARD: the first makes every attribute unknown, then each overwrites."""
        if self.xforward is None:
            self.xforward = dict.fromkeys(XFORWARD_ATTRIBUTES)
        self.xforward.update(attributes)

    @property
    def forwarded(self) -> ForwardedClient | None:
        """The original client, or None when no XFORWARD came for this transaction.

        An unknown ADDR means the proxy's own (local) submission: its other client attributes
        are ignored, as the README says; IDENT (the proxy's queue id) still names the message.
        PORT and SOURCE are accepted and not kept.
        """
        if self.xforward is None:
            return None
        x = self.xforward
        if x["ADDR"] is None:
            return ForwardedClient(ident=x["IDENT"])
        return ForwardedClient(
            addr=x["ADDR"], name=x["NAME"], helo=x["HELO"], proto=x["PROTO"], ident=x["IDENT"]
        )


def descriptor_headroom() -> int | None:
    """How many more file descriptors this process may open, or None if it cannot tell.

    Counts the entries of /proc/self/fd (or /dev/fd): a cost that grows with the descriptors
    open, about 50 us at 300, paid once per connection. Where neither exists, or the limit
    is infinite, there is no check (and asyncio's own EMFILE handling is what remains).
    """
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return None
    for folder in _FD_FOLDERS:
        try:
            listed = len(os.listdir(folder)) - 1  # the listing's own descriptor is in it
        except OSError as exc:
            if exc.errno in (errno.EMFILE, errno.ENFILE):
                return 0  # not even one more: the listing needs a descriptor itself
            continue
        return soft - listed
    return None


def peer_ip_of(peer: Any) -> str:
    return str(peer[0]) if isinstance(peer, tuple) and peer else str(peer)


def peer_of(session: Session) -> str:
    peer = session.peer
    if isinstance(peer, tuple) and len(peer) >= 2:
        return str(HostPort(str(peer[0]), int(peer[1])))
    return str(peer)


def bind_session(session: Session | None) -> None:
    """Put peer and a session id on every log line of this session's task."""
    if session is not None and not structlog.contextvars.get_contextvars().get("session"):
        structlog.contextvars.bind_contextvars(peer=peer_of(session), session=uuid.uuid4().hex[:12])


class MailgateSMTP(SMTP):
    """aiosmtpd's protocol with enhanced replies, a registry of live sessions and limits.

    A session that breaks a limit is answered (421 when it is closed) and hung up on: the
    reply is written, the transport closed and the session task cancelled, so nothing the
    client pipelined after it is processed and no message of it is stored.
    """

    # The stream reader's limit: a command line longer than this is read to its end and
    # refused (commands are held to 512 octets anyway), and the reader stops reading from the
    # socket while it holds twice this. DATA lines have no limit of their own (RFC 5321 says
    # 1,000 octets; real mailers send base64 and HTML in one line, and Postfix takes them up
    # to the message size): DATA is read in pieces (`smtp_data.py`).
    line_length_limit = 10_002

    def __init__(
        self,
        handler: Any,
        *,
        sessions: set[MailgateSMTP],
        limits: SmtpConfig,
        spool: Path,
        implicit_tls: ssl.SSLContext | None = None,
        **kwargs: Any,
    ) -> None:
        # aiosmtpd keeps command_size_limits on the class, shared by every session, and grows
        # MAIL's entry on each EHLO: one client could lift the limit for all. Keep it ours.
        self.command_size_limits = collections.defaultdict(lambda: SMTP.command_size_limit)
        super().__init__(
            handler,
            data_size_limit=limits.max_message_size,
            timeout=limits.timeout,
            **kwargs,
        )
        self._sessions = sessions
        self._limits = limits
        self._spool = spool  # the folder of spool files (see spool.py)
        self._implicit_tls = implicit_tls  # [smtp] tls_listen: TLS from the first byte
        self._handshake: asyncio.Future[None] | None = None
        self._grace = min(DATA_RATE_GRACE, limits.timeout / 10)
        self.peer_ip = ""
        self.xforward_allowed = False  # a trusted proxy: XFORWARD advertised and honoured
        self._refusal: str | None = None
        self._metered = False  # counted in the metrics: not /healthz's probe
        self._hung_up = False
        self._errors = 0
        self._excess_rcpts = 0
        self._data_start: float | None = None  # loop time of DATA, while the data comes in
        # From the 354 to the reply after the final dot: a stop lets this finish (`shut_down`).
        self.receiving = False
        self._stopping = False
        self._drain: asyncio.Event | None = None
        self._data_bytes = 0
        self._data_last = 0.0

    # -- connections ----------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if self._original_transport is not None:
            # STARTTLS's handshake is done: the same session, now over TLS. aiosmtpd resets
            # it and drops what the client sent in clear behind STARTTLS (RFC 3207 section
            # 4.2: a command injected there must never run as if it came encrypted).
            super().connection_made(transport)
            return
        self.peer_ip = peer_ip_of(transport.get_extra_info("peername"))
        self._metered = metrics.smtp_session_opened(transport.get_extra_info("peername"))
        self.xforward_allowed = self._limits.trusts(self.peer_ip)
        self._refusal = self._admission()
        if self._refusal is None:
            self._sessions.add(self)
        super().connection_made(transport)
        if self._implicit_tls is not None and self._refusal is None:
            self._start_implicit_tls()

    def _start_implicit_tls(self) -> None:
        """Begin the handshake of a `tls_listen` session at once, as STARTTLS does.

        Not the server socket's `ssl=`: asyncio would call `connection_made` only once the
        handshake is done, so a client that never finishes one would hold its socket for 60 s
        outside every session limit and the idle timeout. Here it is a session from its
        accept: counted, and cut at `[smtp] timeout`. aiosmtpd's STARTTLS path
        (`connection_made` again, over TLS) takes it from the end of the handshake.
        """
        assert self._implicit_tls is not None and self.transport is not None
        self._handshake = self.loop.create_future()
        tls = sslproto.SSLProtocol(
            self.loop, self, self._implicit_tls, self._handshake, server_side=True
        )
        self._tls_protocol = tls
        self._original_transport = self.transport
        self._original_transport.set_protocol(tls)
        self.transport = tls._app_transport
        tls.connection_made(self._original_transport)

    def _admission(self) -> str | None:
        """Decide at connect, before the banner, whether this session may start."""
        headroom = descriptor_headroom()
        if headroom is not None and headroom < FD_RESERVE:
            log.warning("smtp_descriptors_low", headroom=headroom, reserve=FD_RESERVE)
            return SERVER_BUSY
        if len(self._sessions) >= self._limits.max_connections:
            return TOO_MANY_CONNECTIONS
        from_peer = sum(1 for s in self._sessions if s.peer_ip == self.peer_ip)
        if from_peer >= self._limits.max_connections_per_ip:
            return TOO_MANY_FROM_PEER
        return None

    def connection_lost(self, error: Exception | None) -> None:
        self._sessions.discard(self)
        metrics.smtp_session_closed(self._metered)
        super().connection_lost(error)

    def eof_received(self) -> bool | None:
        """Let the session finish what the client sent before its EOF, then hang up.

        aiosmtpd cancels the session at EOF; a client that half-closes right after the final
        dot still waits for the 250, and its message must be committed and answered, not cut
        off halfway. Reading past the EOF raises IncompleteReadError (see handle_exception).
        """
        keep_open = asyncio.StreamReaderProtocol.eof_received(self)
        return False if self._tls_protocol is not None else keep_open  # TLS closes it anyway

    async def _handle_client(self) -> None:
        bind_session(self.session)
        if self._refusal is not None:
            log.warning("smtp_connection_refused", reply=self._refusal)
            # On tls_listen no handshake is spent on it: a refusal in clear is no use there.
            await self._hang_up(None if self._implicit_tls is not None else self._refusal)
        if self._handshake is not None:
            try:
                await self._handshake
            except Exception as exc:  # noqa: BLE001 - the client's TLS stack, or a scanner
                log.info("smtp_tls_handshake_failed", error=str(exc))
                self._hang_up_now(None)
                # asyncio tells the protocol of no loss before its handshake completed (as
                # aiosmtpd does after a failed STARTTLS): the session ends here, uncounted.
                self.connection_lost(exc)
                raise asyncio.CancelledError from None
        await super()._handle_client()

    async def _hang_up(self, reply: str | None) -> NoReturn:
        """Answer `reply` (if any), close, and end the session task here."""
        self._hang_up_now(reply)
        raise asyncio.CancelledError

    def _hang_up_now(self, reply: str | None) -> None:
        if self._hung_up:
            return
        self._hung_up = True
        if self.transport is not None:
            # In a STARTTLS handshake the writer still writes in clear: say nothing then.
            handshaking = (
                self._tls_protocol is not None and self._writer.transport is not self.transport
            )
            if reply is not None and not handshaking:
                self._writer.write(reply.encode("ascii") + b"\r\n")
                metrics.smtp_replied(reply, metered=self._metered)
            self.transport.close()  # sends what is buffered first
            self.loop.call_later(HANG_UP_LINGER, self._abort)

    def shut_down(self, progress: asyncio.Event) -> None:
        """The daemon stops: from now on the session's next reply is `SHUTTING_DOWN`, and it
        hangs up. A message in DATA is received, committed and answered first (its 250);
        `progress` is set when it is done."""
        self._stopping = True
        self._drain = progress

    def close_for_shutdown(self) -> None:
        """The drain is over: answer `SHUTTING_DOWN` now (a message still in DATA is cut off
        without its 250, so its sender sends it again) and close."""
        self._hang_up_now(SHUTTING_DOWN)

    def _abort(self) -> None:
        if isinstance(self.transport, asyncio.WriteTransport):  # still flushing: not reading
            self.transport.abort()

    # -- replies and errors ---------------------------------------------------------------

    async def push(self, status: str | bytes) -> None:
        if self._hung_up:  # the client is being cut off; it gets nothing more
            raise asyncio.CancelledError
        if isinstance(status, bytes):
            await super().push(status)
            return
        if self._stopping and not self.receiving:
            # Whatever the command was (one the daemon knows or not), RFC 5321 3.8: a server
            # shutting down answers 421 and closes. A 220 greeting is answered so too.
            log.info("smtp_session_closed_for_stop")
            await self._hang_up(SHUTTING_DOWN)
        reply = enhance(status)
        if reply.startswith(_BOGUS_GOODBYE):
            log.warning("smtp_too_many_unrecognized")
            await self._hang_up(TOO_MANY_UNKNOWN)
        await super().push(reply)
        metrics.smtp_replied(reply, metered=self._metered)
        if reply.startswith("452 4.5.3 "):
            # As Postfix's smtpd_recipient_overshoot_limit: a client may pipeline a list
            # longer than max_recipients and send the rest later; only a flood counts.
            self._excess_rcpts += 1
            if self._excess_rcpts > self._limits.max_recipients:
                await self._client_error()
        elif reply[:1] in ("4", "5") and not reply.startswith(_NOT_CLIENT_ERRORS):
            await self._client_error()

    async def _client_error(self) -> None:
        self._errors += 1
        if self._errors >= self._limits.max_errors:
            log.warning("smtp_too_many_errors", errors=self._errors)
            await self._hang_up(TOO_MANY_ERRORS)

    async def handle_exception(self, error: Exception) -> str:
        """Hang up on a client that is gone; anything else is answered 451, never raised.

        A failed STARTTLS handshake is the client's (a bad or old TLS stack, a scanner): one
        line at info, and aiosmtpd closes the connection (nothing is answered in clear).
        """
        if isinstance(error, TLSSetupException):
            log.info("smtp_starttls_failed", error=str(error.__cause__ or error))
            return TEMPFAIL
        if isinstance(error, asyncio.IncompleteReadError | ConnectionError):
            await self._hang_up(None)
        try:
            return await super().handle_exception(error)
        except Exception:  # noqa: BLE001 - aiosmtpd would put this one's text on the wire
            return TEMPFAIL

    async def _call_handler_hook(self, command: str, *args: Any) -> Any:
        if self._hung_up:  # never start work (a commit) for a session being cut off
            raise asyncio.CancelledError
        return await super()._call_handler_hook(command, *args)

    @syntax("STARTTLS", when="tls_context")
    async def smtp_STARTTLS(self, arg: str) -> None:
        """Without [smtp] tls_cert (and on the implicit-TLS listener) it is not offered: a
        plain refusal, the session goes on. Over TLS already: refused, never nested."""
        if self.tls_context is None:
            await self.push(STARTTLS_NOT_OFFERED)
        elif self._tls_protocol is not None:
            await self.push(TLS_ALREADY_ACTIVE)
        else:
            await super().smtp_STARTTLS(arg)

    def tls_in_use(self) -> tuple[str, str] | None:
        """The TLS version and cipher of this session (STARTTLS or implicit), or None."""
        ssl_object = self.transport.get_extra_info("ssl_object") if self.transport else None
        if ssl_object is None:
            return None
        cipher = ssl_object.cipher()
        return (str(ssl_object.version()), str(cipher[0] if cipher else "unknown"))

    # -- command arguments: UTF-8, no controls, ASCII addresses unless SMTPUTF8 ----------

    async def _refused(self, command: str, arg: str | None, *, ascii_only: bool = False) -> bool:
        """Answer 501 5.5.2 for an argument `argument_fault` refuses; tell whether it did."""
        fault = argument_fault(arg, ascii_only=ascii_only)
        if fault is None:
            return False
        log.info("smtp_argument_refused", command=command, reply=fault)
        await self.push(fault)
        return True

    @syntax("HELO hostname")
    async def smtp_HELO(self, hostname: str) -> None:
        if not await self._refused("HELO", hostname):
            await super().smtp_HELO(hostname)

    @syntax("EHLO hostname")
    async def smtp_EHLO(self, hostname: str) -> None:
        if await self._refused("EHLO", hostname):
            return
        self.command_size_limits.clear()  # aiosmtpd adds to MAIL's limit on every EHLO
        await super().smtp_EHLO(hostname)

    @syntax("MAIL FROM: <address>", extended=" [SP <mail-parameters>]")
    async def smtp_MAIL(self, arg: str | None) -> None:
        if not await self._refused("MAIL", arg, ascii_only=not self._declares_smtputf8(arg)):
            await super().smtp_MAIL(arg)

    @syntax("RCPT TO: <address>", extended=" [SP <mail-parameters>]")
    async def smtp_RCPT(self, arg: str | None) -> None:
        smtputf8 = self.envelope is not None and bool(self.envelope.smtp_utf8)
        if not await self._refused("RCPT", arg, ascii_only=not smtputf8):
            await super().smtp_RCPT(arg)

    @syntax("VRFY <address>")
    async def smtp_VRFY(self, arg: str) -> None:
        """aiosmtpd echoes the argument in its reply: never one that is not clean text."""
        if not await self._refused("VRFY", arg):
            await super().smtp_VRFY(arg)

    # -- XFORWARD from a trusted proxy ----------------------------------------------------

    def _create_envelope(self) -> TransactionEnvelope:
        return TransactionEnvelope()

    @syntax("XFORWARD attribute=value ...", when="xforward_allowed")
    async def smtp_XFORWARD(self, arg: str | None) -> None:
        """Postfix's XFORWARD: the client behind the proxy, for the next transaction.

        Only from `[smtp] trusted_proxies` (anyone else could forge the client SPF judges),
        only outside a transaction (before MAIL, or after DATA or RSET).
        """
        if not self.xforward_allowed:
            log.warning("smtp_xforward_refused")
            await self.push(XFORWARD_NOT_PERMITTED)
            return
        envelope = self.envelope
        assert isinstance(envelope, TransactionEnvelope)
        if envelope.mail_from is not None:
            await self.push(XFORWARD_IN_TRANSACTION)
            return
        try:
            attributes = parse_xforward(arg or "")
        except XforwardError as exc:
            await self.push(f"501 5.5.4 {exc}")
            return
        envelope.forward(attributes)
        await self.push(XFORWARD_OK)

    def _declares_smtputf8(self, arg: str | None) -> bool:
        """Tell whether a MAIL argument carries the SMTPUTF8 parameter (RFC 6531)."""
        path = self._strip_command_keyword("FROM:", arg or "")
        if path is None:
            return False
        _, params = self._getaddr(path)
        return params is not None and "SMTPUTF8" in params.upper().split()

    # -- DATA: memory and time ------------------------------------------------------------

    @syntax("DATA")
    async def smtp_DATA(self, arg: str) -> None:
        """aiosmtpd 1.4.6's DATA, read in pieces into a spool, and timed.

        aiosmtpd keeps a bytearray object per line until the final dot: about 90 bytes of
        overhead a line, so 25 MiB of empty lines took 2.1 GiB, and it refuses long lines.
        Here `DataReader` gives the data out dot-unstuffed in pieces of up to 64 KiB whatever
        the lines are, and `Spool` keeps a small message in memory and a large one in an
        unnamed file: a session holds about one read buffer. The same rules hold: only
        CRLF.CRLF ends the data (RFC 5321 4.1.1.4; no smuggling with bare CR or LF), and
        data over `data_size_limit` is read to the end and refused.
        """
        if await self.check_helo_needed() or await self.check_auth_needed("DATA"):
            return
        assert self.envelope is not None
        if not self.envelope.rcpt_tos:
            await self.push("503 Error: need RCPT command")
            return
        if arg:
            await self.push("501 Syntax: DATA")
            return
        assert isinstance(self.envelope, TransactionEnvelope)
        trace = self._trace(self.envelope)
        self._data_start = self._data_last = self.loop.time()
        self._data_bytes = 0
        self._arm(self._data_deadline()[0])
        try:
            try:
                await self.push("354 End data with <CR><LF>.<CR><LF>")
                self.receiving = True
                content = await self._read_data(trace)
            finally:
                self._end_data()  # the final dot is in: the commit is not the client's time
            await self._finish_data(content)
        finally:
            self.receiving = False
            if self._drain is not None:
                self._drain.set()

    async def _finish_data(self, content: bytes | Spooled | str) -> None:
        """Commit the message read (or answer its refusal) and reply."""
        if isinstance(content, str):
            self.envelope = self._create_envelope()
            metrics.data_answered(content)
            await self.push(content)
            return
        envelope = self.envelope
        assert isinstance(envelope, TransactionEnvelope)
        envelope.message = content
        if isinstance(content, bytes):
            envelope.content = envelope.original_content = content
        try:
            status = await self._call_handler_hook("DATA")
        finally:
            if isinstance(content, Spooled):
                content.release()  # the commit holds it for as long as it needs it
            self.envelope = self._create_envelope()
        reply = "250 OK" if status is MISSING else status
        metrics.data_answered(reply)
        await self.push(reply)

    def _trace(self, envelope: TransactionEnvelope) -> bytes:
        """Our Received field for this message, naming the queue id it gets now."""
        assert self.session is not None
        envelope.queue_id = new_queue_id()
        hop = Hop(
            helo=self.session.host_name,
            peer_ip=self.peer_ip,
            esmtp=bool(self.session.extended_smtp),
            smtputf8=bool(envelope.smtp_utf8),
            tls=self.tls_in_use(),
            recipients=tuple(envelope.rcpt_tos),
        )
        when = datetime.now().astimezone()
        return received_field(hop, hostname=self.hostname, queue_id=envelope.queue_id, when=when)

    async def _read_data(self, trace: bytes) -> bytes | Spooled | str:
        """Read up to the final dot, after `trace` (our Received field, stored at the top of
        the message): the content, or the refusal if it was over a limit."""
        data = DataReader(self._reader)
        first = Spool(self._spool)
        await first.write(trace)  # in memory: far below the spool file's threshold
        spool: Spool | None = first
        refusal: str | None = None
        opening = True  # no byte of the client's yet
        try:
            while (piece := await data.read()) is not None:
                if spool is None:
                    continue  # refused: read to the end, keep nothing
                if opening and piece:
                    opening = False
                    if piece[:1] in (b" ", b"\t"):
                        # A first line in white space would continue our Received field
                        # (the client writing our trace); as Postfix's smtpd, end it first.
                        piece = b"\r\n" + piece
                if self.data_size_limit and data.size > self.data_size_limit:
                    refusal = MESSAGE_TOO_BIG
                elif piece:
                    try:
                        await spool.write(piece)
                    except OSError as exc:  # the spool's disk is full or failing
                        log.error("spool_write_failed", error=exc.strerror or str(exc))
                        refusal = TEMPFAIL
                if refusal is not None:
                    spool.discard()  # let the memory (and the file) go now, not at the dot
                    spool = None
            if spool is None:
                assert refusal is not None
                return refusal
            try:
                return await spool.finish()
            except OSError as exc:
                log.error("spool_write_failed", error=exc.strerror or str(exc))
                spool.discard()
                return TEMPFAIL
        except BaseException:
            if spool is not None:
                spool.discard()
            raise

    def _end_data(self) -> None:
        if self._data_start is not None:
            self._data_start = None
            if self.transport is not None and not self._hung_up:
                self._reset_timeout()

    def data_received(self, data: bytes) -> None:
        if self._data_start is not None:
            self._data_bytes += len(data)
            self._data_last = self.loop.time()
        super().data_received(data)

    def _data_deadline(self) -> tuple[float, bool]:
        """When this DATA is cut off if no more bytes come, and whether for being slow.

        Slow: the average rate since DATA falls below `min_data_rate` at start + bytes/rate
        (never judged before the grace period). Idle: `timeout` after the last bytes.
        """
        assert self._data_start is not None
        start = self._data_start
        slow = max(start + self._grace, start + self._data_bytes / self._limits.min_data_rate)
        idle = self._data_last + self._limits.timeout
        return min(slow, idle), slow <= idle

    def _arm(self, when: float) -> None:
        if self._timeout_handle is not None:
            self._timeout_handle.cancel()
        self._timeout_handle = self.loop.call_at(when, self._timeout_cb)

    def _timeout_cb(self) -> None:
        """aiosmtpd closes silently; we say why. During DATA, check the rate lazily here."""
        if self.transport is None or self._hung_up:
            return
        reply = IDLE_TIMEOUT
        if self._data_start is not None:
            deadline, slow = self._data_deadline()
            if deadline - self.loop.time() > 0.001:
                self._arm(deadline)  # bytes came since this was armed
                return
            if slow:
                reply = DATA_TOO_SLOW
                rate = self._data_bytes / max(self.loop.time() - self._data_start, 1e-9)
                log.warning("smtp_data_too_slow", peer=self.peer_ip, rate=round(rate))
        if reply == IDLE_TIMEOUT:
            log.info("smtp_timeout", peer=self.peer_ip)
        self._hang_up_now(reply)

    def _getaddr(self, arg: str) -> tuple[str | None, str | None]:
        """Parse the address of MAIL/RCPT exactly as aiosmtpd 1.4 does, minus its cost.

        aiosmtpd's version defines a typing.Protocol class on every call, which is about 6% of
        the event loop's time under load (bench/). Same parser, same results otherwise.
        """
        if not arg:
            return "", ""
        parse = get_angle_addr if arg.lstrip().startswith("<") else get_addr_spec
        try:
            address, rest = parse(arg)
        except HeaderParseError:
            return None, None
        addr: str = address.addr_spec
        if self.local_part_limit and len(addr.rpartition("@")[0]) > self.local_part_limit:
            return None, None
        return addr, rest
