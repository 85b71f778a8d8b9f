"""The SMTP listener: an aiosmtpd handler that is only an adapter, and its server.

`Handler` checks recipients against `[smtp] accept` (never an open relay), refuses mail while
the disk of the store or of the attachments is nearly full and mail that has looped, hands
DATA to intake and maps the outcome to a reply. The session itself and its limits are in
`smtp_session.py`; a large message reaches the handler as a spool file (`spool.py`), which
the commit copies into the store. `start_smtp` listens in clear (STARTTLS offered when there
is a certificate) and, with `[smtp] tls_listen`, with TLS from the first byte as well.
"""

from __future__ import annotations

import asyncio
import re
import resource
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import structlog
from aiosmtpd.smtp import SMTP, Session
from aiosmtpd.smtp import Envelope as SmtpEnvelope

from mailgate.config import Config, SmtpConfig
from mailgate.errors import StoreUnavailable
from mailgate.intake import Intake
from mailgate.live import Live
from mailgate.log import mask_address
from mailgate.model import Envelope, HostPort
from mailgate.smtp_session import (
    FREE_SPACE_MESSAGES,
    LOW_STORAGE,
    MAIL_LOOP,
    TEMPFAIL,
    TOO_MANY_RECIPIENTS,
    XFORWARD_EHLO,
    MailgateSMTP,
    TransactionEnvelope,
    peer_of,
)
from mailgate.spool import Spooled
from mailgate.tls import ServerTls

log = structlog.get_logger(__name__)

# Received fields are counted in this much of the message at most: the parser reads no more
# of a header block either (ingest/mime.py), and a loop's fields are at the top.
RECEIVED_SCAN = 1024 * 1024

_HEADER_END = re.compile(rb"\r?\n\r?\n")
_RECEIVED = re.compile(rb"^received[ \t]*:", re.IGNORECASE | re.MULTILINE)


def count_received(raw: bytes) -> int:
    """Count `Received:` fields in the header block (up to the first empty line).

    Continuation lines start with white space, so only field names at a line start count.
    """
    if raw.startswith((b"\r\n", b"\n")):
        return 0
    end = _HEADER_END.search(raw)
    return len(_RECEIVED.findall(raw, 0, end.start() if end else len(raw)))


class Handler:
    """aiosmtpd hooks: storage check, RCPT policy, loop check, DATA to intake, errors to 451.

    The `[smtp]` settings are read where they are used, from the live config, so a reload
    (the accept list, the limits) holds from the next command on.
    """

    def __init__(
        self, config: Live[Config], intake: Intake, *, spool: Path, attachments: Path
    ) -> None:
        self._live = config
        self._intake = intake
        # Where mail is written before ingest is done with it: the database's folder (and
        # the spool files in it) and the attachment files.
        self._disks = (spool, attachments)
        self._commits: set[asyncio.Task[str | None]] = set()
        self.in_flight = 0  # DATA commits under way; the drain waits for them
        self._drain: asyncio.Event | None = None

    @property
    def _config(self) -> SmtpConfig:
        return self._live.current.smtp

    async def handle_EHLO(
        self,
        server: SMTP,
        session: Session,
        envelope: SmtpEnvelope,
        hostname: str,
        responses: list[str],
    ) -> list[str]:
        session.host_name = hostname
        last = responses.pop()  # "250 HELP" closes the list; keep it last
        # aiosmtpd lists AUTH once TLS is up; mailgate takes no logins.
        responses = [line for line in responses if not line.startswith("250-AUTH")]
        extensions = ["250-ENHANCEDSTATUSCODES"]
        if isinstance(server, MailgateSMTP) and server.xforward_allowed:
            extensions.append(XFORWARD_EHLO)  # to [smtp] trusted_proxies only
        return [*responses, *extensions, last]

    async def handle_MAIL(
        self,
        server: SMTP,
        session: Session,
        envelope: SmtpEnvelope,
        address: str,
        mail_options: list[str],
    ) -> str:
        """Refuse mail early (before DATA is sent) while the store could not take it: the
        database's disk, or the attachments' (mail with attachments would wait there)."""
        for folder in self._disks:
            free = shutil.disk_usage(folder).free
            if free < FREE_SPACE_MESSAGES * self._config.max_message_size:
                log.warning("storage_low", free=free, folder=str(folder))
                return LOW_STORAGE
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        return "250 2.1.0 Sender OK"

    async def handle_RCPT(
        self,
        server: SMTP,
        session: Session,
        envelope: SmtpEnvelope,
        address: str,
        rcpt_options: list[str],
    ) -> str:
        if len(envelope.rcpt_tos) >= self._config.max_recipients:
            return TOO_MANY_RECIPIENTS
        if not self._config.accepts(address):
            log.info("recipient_rejected", rcpt=mask_address(address))
            return "550 5.1.1 Recipient not accepted here"
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 Recipient OK"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: SmtpEnvelope) -> str:
        raw = envelope.message if isinstance(envelope, TransactionEnvelope) else None
        raw = raw or envelope.original_content or b""
        head = raw.head(RECEIVED_SCAN) if isinstance(raw, Spooled) else raw[:RECEIVED_SCAN]
        received = count_received(head)
        del head
        if received > self._config.max_received_headers:
            log.warning("mail_loop_refused", received=received)
            return MAIL_LOOP
        stored = Envelope(
            # aiosmtpd reports the null sender of MAIL FROM:<> as "<>"; we store it as "".
            mail_from="" if envelope.mail_from in (None, "<>") else envelope.mail_from,
            rcpt_tos=tuple(envelope.rcpt_tos),
            peer=peer_of(session),
            helo=session.host_name,
            smtputf8=bool(envelope.smtp_utf8),
            # Behind a trusted proxy: the client that talked to it (peer and helo stay the
            # proxy's, so the stored envelope records both hops).
            forwarded=envelope.forwarded if isinstance(envelope, TransactionEnvelope) else None,
        )
        # The commit is its own task, shielded: a session cancelled now (client gone, drain)
        # leaves the commit to finish (the row is whole or absent, never half-written) and
        # the drain waits for it through in_flight. The sender got no 250 and may retry;
        # ingest stores a retried duplicate once.
        if isinstance(raw, Spooled):
            raw.retain()  # the session lets go when it is done; the commit when it is
        # The id our Received field names (the session made it at DATA).
        queue_id = envelope.queue_id if isinstance(envelope, TransactionEnvelope) else None
        commit = asyncio.create_task(self._commit(stored, raw, queue_id))
        self._commits.add(commit)
        commit.add_done_callback(self._commits.discard)
        try:
            queue_id = await asyncio.shield(commit)
        except asyncio.CancelledError:
            log.info("session_lost_during_commit")
            raise
        return TEMPFAIL if queue_id is None else f"250 2.0.0 Queued as {queue_id}"

    async def _commit(
        self, stored: Envelope, raw: bytes | Spooled, queue_id: str | None
    ) -> str | None:
        """Commit one message; its queue id, or None if it was not stored."""
        self.in_flight += 1
        size = raw.size if isinstance(raw, Spooled) else len(raw)
        try:
            queue_id = await self._intake.receive(stored, raw, queue_id=queue_id)
        except StoreUnavailable:
            log.warning("message_deferred", size=size)
            return None
        except Exception as exc:  # a sender gets 451, never an error text
            log.error("message_commit_failed", error=type(exc).__name__, exc_info=exc)
            return None
        finally:
            if isinstance(raw, Spooled):
                raw.release()
            self.in_flight -= 1
            if self._drain is not None:
                self._drain.set()
        client = {"client": stored.client_ip} if stored.forwarded is not None else {}
        log.info(
            "message_queued",
            queue_id=queue_id,
            size=size,
            rcpts=len(stored.rcpt_tos),
            **client,
        )
        return queue_id

    def shut_down(self, progress: asyncio.Event) -> None:
        """The daemon stops: set `progress` as each commit ends, for the drain."""
        self._drain = progress

    async def handle_exception(self, error: Exception) -> str:
        log.error("smtp_session_failed", error=type(error).__name__, exc_info=error)
        return TEMPFAIL  # never exception text on the wire


@dataclass
class Listener:
    """The started SMTP servers (in clear, and with implicit TLS if configured) and what
    their drain needs."""

    server: asyncio.Server
    handler: Handler
    sessions: set[MailgateSMTP]
    tls_server: asyncio.Server | None = None  # [smtp] tls_listen

    @property
    def address(self) -> HostPort:
        return _address(self.server)

    @property
    def tls_address(self) -> HostPort | None:
        return None if self.tls_server is None else _address(self.tls_server)

    @property
    def servers(self) -> tuple[asyncio.Server, ...]:
        return (self.server,) if self.tls_server is None else (self.server, self.tls_server)

    async def drain(self, grace: float) -> None:
        """Stop accepting; let the messages in DATA arrive, commit and get their 250 for up to
        `grace` seconds, answering 421 4.3.2 to any other command; then close every session.

        A new connection is refused (the listening socket is closed). A session cut off at
        the end of `grace` never got its 250, so its sender retries: nothing is lost.
        """
        for server in self.servers:
            server.close()
        log.info("smtp_draining", receiving=sum(1 for s in self.sessions if s.receiving))
        progress = asyncio.Event()  # set as a commit ends or a session leaves DATA
        self.handler.shut_down(progress)
        for session in self.sessions:
            session.shut_down(progress)
        try:
            async with asyncio.timeout(grace):
                while self.handler.in_flight or any(s.receiving for s in self.sessions):
                    progress.clear()
                    await progress.wait()
        except TimeoutError:
            receiving = sum(1 for s in self.sessions if s.receiving)
            log.warning(
                "smtp_drain_timed_out", in_flight=self.handler.in_flight, receiving=receiving
            )
        open_sessions = [s for s in self.sessions if s.transport is not None]
        for session in open_sessions:
            session.close_for_shutdown()
        await asyncio.sleep(0)  # let connection_lost run before the store closes
        log.info("smtp_drained", closed_sessions=len(open_sessions))


def _address(server: asyncio.Server) -> HostPort:
    sock = server.sockets[0].getsockname()
    return HostPort(sock[0], sock[1])


def raise_descriptor_limit() -> None:
    """Lift the soft RLIMIT_NOFILE to the hard limit, as far as the system lets us.

    Each SMTP session holds a descriptor, and the soft limit is often 1,024 while the hard
    one is far higher: the sessions refused for lack of descriptors (`FD_RESERVE`) should be
    refused at the limit ops chose, not at a default.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == hard:
        return
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    except (ValueError, OSError) as exc:  # macOS: an infinite hard limit is above OPEN_MAX
        log.warning("descriptor_limit_kept", soft=soft, hard=hard, error=str(exc))
        return
    log.info("descriptor_limit_raised", soft=soft, to=hard)


async def start_smtp(
    live: Live[Config],
    intake: Intake,
    *,
    sessions: set[MailgateSMTP],
    spool: Path,
    attachments: Path,
    tls: ServerTls | None = None,
) -> Listener:
    """Listen on `[smtp] listen` with `loop.create_server` (no threaded Controller), and on
    `[smtp] tls_listen` with TLS from the first byte.

    Each session takes the `[smtp]` limits current when it connects (`live`). `sessions` is
    kept up to date with the open sessions of both listeners; intake reads its size. `spool`
    is the folder of the database, where large messages are spooled as they arrive; its free
    space and that of `attachments` MAIL checks. `tls` (given with a certificate in the
    config) is the server's TLS: STARTTLS on the plain listener, required before MAIL with
    `require_tls`; each handshake takes its current certificate (`ServerTls.load`). The
    descriptor limit is raised first (see `raise_descriptor_limit`).
    """
    raise_descriptor_limit()
    handler = Handler(live, intake, spool=spool, attachments=attachments)
    loop = asyncio.get_running_loop()
    config = live.current.smtp  # what is bound at start: listen addresses, require_tls

    def session(*, starttls: bool) -> Callable[[], MailgateSMTP]:
        implicit = tls.context if not starttls and tls is not None else None
        return lambda: MailgateSMTP(
            handler,
            sessions=sessions,
            limits=live.current.smtp,
            spool=spool,
            implicit_tls=implicit,
            enable_SMTPUTF8=True,
            decode_data=False,
            hostname=config.hostname,
            ident="ESMTP mailgate",
            tls_context=tls.context if starttls and tls is not None else None,
            require_starttls=starttls and tls is not None and config.require_tls,
        )

    server = await loop.create_server(
        session(starttls=True), host=config.listen.host, port=config.listen.port
    )
    listener = Listener(server, handler, sessions)
    if config.tls_listen is not None:
        assert tls is not None, "config.py refuses tls_listen without a certificate"
        try:
            listener.tls_server = await loop.create_server(
                session(starttls=False),
                host=config.tls_listen.host,
                port=config.tls_listen.port,
            )  # TLS is the session's (MailgateSMTP implicit_tls), counted from the accept
        except BaseException:
            server.close()
            raise
    return listener
