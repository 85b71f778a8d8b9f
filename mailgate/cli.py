"""The command line: argparse subcommands; the only place with asyncio.run and sys.exit.

Its help (`mailgate --help`) is written for operators: DESCRIPTION and EPILOG below, and a
help text on every subcommand and argument.

Exit status: 0 done, 1 a named thing was not found or the store failed, 2 usage,
3 the daemon could not start, 78 (EX_CONFIG) the configuration is invalid.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import multiprocessing
import os
import signal
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from datetime import UTC, datetime
from email.parser import BytesHeaderParser
from email.policy import compat32
from pathlib import Path
from typing import Any, NoReturn, TypeVar, get_args

import structlog

from mailgate import __version__, preflight, stats, tls
from mailgate.addresses import EmailNotValidError, validate_address
from mailgate.config import Config, config_path, load_config
from mailgate.domains import u_label
from mailgate.errors import ConfigError, MailgateError, NotFound, UsageError
from mailgate.files import write_durably
from mailgate.log import configure_logging, mask_address
from mailgate.model import (
    Address,
    AuditRecord,
    InboundRow,
    InboundState,
    Message,
    OutboxRow,
    OutboxState,
    Queue,
    Queues,
    Requester,
    Ticket,
)
from mailgate.msgid import message_ids
from mailgate.outbound.templates import Templates
from mailgate.privacy import audit, export, rights
from mailgate.privacy.archive import person_hash
from mailgate.privacy.keyring import write_master_key
from mailgate.privacy.tokens import new_token
from mailgate.store import IngestTx, SqliteStore, store_for
from mailgate.store.archive import ArchivedTicket, ArchiveStore, open_archive
from mailgate.store.labels import ERASED
from mailgate.store.sqlite_rights import Change, Correction
from mailgate.text import clean_body, clean_line, decode_header_text
from mailgate.tickets import Tickets

EX_STARTUP = 3

log = structlog.get_logger(__name__)
# What of a raw message a listing reads for its Subject: the header, as far as it matters.
HEAD_BYTES = 65536
Command = Callable[[Config, argparse.Namespace], Awaitable[int]]
T = TypeVar("T")


def _line(text: str) -> str:
    """A stored one-line value as shown: no controls, bidi overrides or zero-width characters.

    The parser cleans names, subjects and filenames on the way in; rows stored by an earlier
    version may still hold what it now removes, so every output cleans them again. Addresses
    are left alone: email-validator refuses all of these, and scripts look requesters up by
    the address as printed.
    """
    return clean_line(text)


def _opt(text: str | None) -> str | None:
    return _line(text) if text else text


def _address(a: Address) -> dict[str, str | None]:
    return {"name": _opt(a.name), "email": a.email}


def ticket_json(ticket: Ticket) -> dict[str, Any]:
    return {
        "id": ticket.id,
        "subject": _line(ticket.subject),
        "status": ticket.status,
        "requester": _address(ticket.requester),
        "created_at": ticket.created_at.isoformat(),
        "updated_at": ticket.updated_at.isoformat(),
        "message_count": ticket.message_count,
        "flags": list(ticket.flags),
    }


def message_json(message: Message) -> dict[str, Any]:
    return {
        "from": _address(message.sender),
        "subject": _line(message.subject),
        "body_text": message.body_text,
        "has_html": message.body_html is not None,
        "received_at": message.received_at.isoformat(),
        "message_id": message.message_id,
        "thread_reason": message.thread_reason,
        "author": message.author,
        "auth": message.auth,
        "flags": list(message.flags),
        "attachments": [
            {
                "filename": _opt(a.filename),
                "content_type": a.content_type,
                "size": a.size,
                "inline": a.inline,
                "sha256": a.sha256,
            }
            for a in message.attachments
        ],
    }


def inbound_json(row: InboundRow, head: bytes) -> dict[str, Any]:
    """The row for output; `head` is the start of its raw message (HEAD_BYTES), for Subject."""
    # compat32: raw values that never raise; decode_header_text does the decoding.
    headers = BytesHeaderParser(policy=compat32).parsebytes(head)
    forwarded = row.envelope.forwarded
    return {
        "id": row.id,
        "state": row.state,
        "reason": row.reason,
        "received_at": row.received_at.isoformat(),
        "mail_from": row.envelope.mail_from,
        "rcpt_tos": list(row.envelope.rcpt_tos),
        "peer": row.envelope.peer,
        "helo": row.envelope.helo,
        # Behind a trusted proxy (XFORWARD): the client that talked to it; peer is the proxy.
        "forwarded": dataclasses.asdict(forwarded) if forwarded is not None else None,
        "size": row.size,
        "subject": decode_header_text(str(headers.get("subject", ""))),
    }


def requester_json(requester: Requester) -> dict[str, Any]:
    return {
        "email": requester.email,
        "name": _opt(requester.name),
        "verified": requester.verified,
        "created_at": requester.created_at.isoformat(),
        "verified_at": requester.verified_at.isoformat() if requester.verified_at else None,
        "undeliverable": requester.undeliverable,
        "state": requester.state,
        "objected": requester.objected,
    }


def outbox_json(row: OutboxRow) -> dict[str, Any]:
    return {
        "id": row.id,
        "state": row.state,
        "kind": row.item.kind,
        "ticket_id": row.item.ticket_id,
        "recipient": row.item.to.email,
        "cc": list(row.item.cc),
        "message_id": row.item.message_id,
        "automatic": row.item.automatic,
        "attempts": row.attempts,
        "last_error": _opt(row.last_error),
        # The relay's whole reply, its lines kept (one per refused recipient, then DATA's).
        "reply": clean_body(row.reply) if row.reply is not None else None,
        "created_at": row.created_at.isoformat(),
        "next_attempt_at": row.next_attempt_at.isoformat(),
        "sent_at": row.sent_at.isoformat() if row.sent_at else None,
    }


def _print_json(value: object) -> None:
    print(json.dumps(value, ensure_ascii=False, indent=2))


def _table(
    rows: Sequence[Sequence[object]], header: Sequence[str], *, whole_last: bool = False
) -> None:
    """Print aligned columns, each cut at 50 characters; with `whole_last`, the last column
    is printed whole (it is the one a reader needs all of)."""
    cells = [[str(c) for c in header], *[[str(c) for c in row] for row in rows]]
    widths = [min(50, max(len(r[i]) for r in cells)) for i in range(len(header))]
    if whole_last:
        widths[-1] = max(len(r[-1]) for r in cells)
    for row in cells:
        print("  ".join(c[: widths[i]].ljust(widths[i]) for i, c in enumerate(row)).rstrip())


def _existing_store(config: Config) -> AbstractAsyncContextManager[SqliteStore]:
    """The store, if it exists. Every command but `serve` reads or changes what is there, so
    on a database that does not exist (a wrong `storage.database`, a daemon never started)
    it says so rather than create an empty one and report nothing found."""
    path = config.storage.database
    if not path.exists():
        raise NotFound(f"no database at {path} (has `mailgate serve` run with this config?)")
    return store_for(config, create=False)


# -- commands --


async def cmd_serve(config: Config, _args: argparse.Namespace) -> int:
    """SIGTERM or SIGINT stops cleanly (a second one exits at once), SIGHUP reloads."""
    from mailgate import service  # the daemon's imports stay out of the quick commands

    loop = asyncio.get_running_loop()
    stopping: asyncio.Future[str] = loop.create_future()
    reloads = asyncio.Event()

    def on_stop(sig: signal.Signals) -> None:
        if stopping.done():
            _exit_now(sig)
        stopping.set_result(sig.name)

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_stop, sig)
    loop.add_signal_handler(signal.SIGHUP, reloads.set)
    try:
        await service.serve(config, shutdown=lambda: stopping, reloads=reloads)
    except OSError as exc:  # the port is taken, the state folder unwritable
        print(f"mailgate: cannot start: {exc}", file=sys.stderr)
        return EX_STARTUP
    return 0


def _exit_now(sig: signal.Signals) -> NoReturn:
    """A second stop signal: exit now, with the parser process. Nothing acknowledged is lost:
    a 250 was sent only after its commit; a message cut off in DATA got none, so its sender
    sends it again, and rows under way are taken up again at the next start."""
    log.warning("daemon_exit_forced", signal=sig.name)
    for child in multiprocessing.active_children():
        child.kill()
    os._exit(128 + sig)


async def cmd_tickets_list(config: Config, args: argparse.Namespace) -> int:
    async with _existing_store(config) as store:
        tickets = await store.list_tickets(status=args.status)
    if args.json:
        _print_json([ticket_json(t) for t in tickets])
    else:
        _table(
            [
                (t.id, t.status, t.message_count, t.requester.email, _line(t.subject))
                for t in tickets
            ],
            ("ID", "STATUS", "MSGS", "REQUESTER", "SUBJECT"),
        )
    return 0


async def _ticket(store: SqliteStore, ticket_id: int) -> Ticket:
    ticket = await store.get_ticket(ticket_id)
    if ticket is None:
        raise NotFound(f"no ticket {ticket_id}")
    return ticket


async def cmd_tickets_show(config: Config, args: argparse.Namespace) -> int:
    async with _existing_store(config) as store:
        ticket = await _ticket(store, args.id)
    if args.json:
        _print_json({**ticket_json(ticket), "messages": [message_json(m) for m in ticket.messages]})
        return 0
    requester = ticket.requester
    flags = f" ({', '.join(ticket.flags)})" if ticket.flags else ""
    name = _opt(requester.name)
    print(f"Ticket #{ticket.id} [{ticket.status}] {_line(ticket.subject)}{flags}")
    print(f"Requester: {f'{name} ' if name else ''}<{requester.email}>")
    print(f"Created:   {ticket.created_at.isoformat()}")
    for m in ticket.messages:
        author = "" if m.author == "customer" else f"[{m.author}] "
        print(f"\n--- {m.received_at.isoformat()}  {author}{m.sender.email}  ({m.thread_reason})")
        if m.auth:
            print(_auth_line(m.auth))
        if m.flags:
            print(f"Flags: {', '.join(m.flags)}")
        print(m.body_text)
        for a in m.attachments:
            filename = _line(a.filename) if a.filename else "(unnamed)"
            print(f"[attachment] {filename}  {_line(a.content_type)}  {a.size} bytes")
    return 0


def _auth_line(auth: dict[str, Any]) -> str:
    """`Trust: authenticated  dkim=pass spf=none dmarc=pass  d=bücher.example:pass`."""
    line = f"Trust: {auth.get('trust', 'not recorded')}"
    if "dkim" in auth:
        line += f"  dkim={auth['dkim']} spf={auth['spf']} dmarc={auth['dmarc']}"
    signatures = [f"d={u_label(str(s['d']))}:{s['result']}" for s in auth.get("signatures", [])]
    return "  ".join([line, *signatures])


async def cmd_close(config: Config, args: argparse.Namespace) -> int:
    async with _existing_store(config) as store:
        if not await store.set_ticket_status(args.id, "closed"):
            raise NotFound(f"no ticket {args.id}")
    print(f"ticket {args.id} closed")
    return 0


async def cmd_reopen(config: Config, args: argparse.Namespace) -> int:
    # The same status change as a customer's reply to a closed ticket, so statistics count it
    # as reopened (the reopen rate); an open ticket stays as it is and counts nothing.
    async with _existing_store(config) as store:
        if (await _ticket(store, args.id)).status == "open":
            print(f"ticket {args.id} is open already")
            return 0
        await store.set_ticket_status(args.id, "open")
    print(f"ticket {args.id} reopened")
    return 0


# How many of the latest quarantined messages and delivery errors `status` shows.
STATUS_RECENT = 5


def _queue_json(queue: Queue, states: tuple[str, ...], pending: tuple[str, ...]) -> dict[str, Any]:
    oldest = queue.oldest_pending
    return {
        "by_state": {state: queue.by_state.get(state, 0) for state in states},
        "pending": sum(queue.by_state.get(state, 0) for state in pending),
        "oldest_pending": oldest.isoformat(timespec="seconds") if oldest else None,
    }


def status_json(
    queues: Queues, quarantined: list[InboundRow], errors: list[OutboxRow]
) -> dict[str, Any]:
    """The `status` document: every state always present, no personal data (a relay's reply
    may quote an address: masked as in the logs)."""
    return {
        "inbound": _queue_json(queues.inbound, get_args(InboundState), ("received",)),
        "outbox": _queue_json(queues.outbox, get_args(OutboxState), ("queued", "sending")),
        "quarantined": [
            {
                "id": r.id,
                "received_at": r.received_at.isoformat(timespec="seconds"),
                "reason": r.reason,
            }
            for r in quarantined
        ],
        "delivery_errors": [
            {
                "id": r.id,
                "state": r.state,
                "kind": r.item.kind,
                "ticket_id": r.item.ticket_id,
                "attempts": r.attempts,
                "next_attempt_at": (
                    r.next_attempt_at.isoformat(timespec="seconds") if r.state == "queued" else None
                ),
                "last_error": mask_address(_line(r.last_error or "")),
            }
            for r in errors
        ],
    }


async def cmd_status(config: Config, args: argparse.Namespace) -> int:
    # Reads only: safe beside the running daemon (SQLite in WAL mode lets readers in).
    async with _existing_store(config) as store:
        queues = await store.queues()
        quarantined = await store.recent_quarantined(STATUS_RECENT)
        errors = await store.recent_delivery_errors(STATUS_RECENT)
    shown = status_json(queues, quarantined, errors)
    if args.json:
        _print_json(shown)
        return 0
    _table(
        [
            (
                name,
                shown[name]["pending"],
                shown[name]["oldest_pending"] or "-",
                " ".join(f"{k}={v}" for k, v in shown[name]["by_state"].items()),
            )
            for name in ("inbound", "outbox")
        ],
        ("QUEUE", "PENDING", "OLDEST PENDING", "BY STATE"),
        whole_last=True,
    )
    print(f"\nLatest quarantined messages ({len(quarantined)}):")
    if quarantined:
        _table(
            [(q["id"], q["received_at"], q["reason"]) for q in shown["quarantined"]],
            ("ID", "RECEIVED", "REASON"),
            whole_last=True,
        )
    print(f"\nLatest delivery errors ({len(errors)}):")
    if errors:
        _table(
            [
                (
                    e["id"],
                    e["state"],
                    e["kind"],
                    e["ticket_id"] or "-",
                    e["attempts"],
                    e["next_attempt_at"] or "-",
                    e["last_error"],
                )
                for e in shown["delivery_errors"]
            ],
            ("ID", "STATE", "KIND", "TICKET", "ATTEMPTS", "NEXT ATTEMPT", "LAST ERROR"),
            whole_last=True,
        )
    return 0


async def cmd_quarantine_list(config: Config, args: argparse.Namespace) -> int:
    # Only what is printed is read: the table needs no raw message at all, the JSON the first
    # HEAD_BYTES of each (for Subject), one at a time.
    async with _existing_store(config) as store:
        rows = await store.list_inbound("quarantined")
        if args.json:
            listed = []
            for r in rows:
                head = await store.read_raw(r.id, limit=HEAD_BYTES)
                listed.append(inbound_json(r, head or b""))
            _print_json(listed)
            return 0
    _table(
        [(r.id, r.received_at.isoformat(timespec="seconds"), r.size, r.reason) for r in rows],
        ("ID", "RECEIVED", "SIZE", "REASON"),
    )
    return 0


async def cmd_quarantine_show(config: Config, args: argparse.Namespace) -> int:
    async with _existing_store(config) as store:
        row = await store.get_inbound(args.id)
        if row is None or row.state != "quarantined":
            raise NotFound(f"no quarantined message {args.id}")
        if args.raw:  # in pieces: a 25 MiB message is never read whole
            await store.copy_raw(row.id, sys.stdout.buffer.write)
            sys.stdout.buffer.flush()
            return 0
        head = await store.read_raw(row.id, limit=HEAD_BYTES)
    _print_json(inbound_json(row, head or b""))
    return 0


async def cmd_quarantine_purge(config: Config, args: argparse.Namespace) -> int:
    async with _existing_store(config) as store:
        if not await store.purge_inbound(args.id):
            raise NotFound(f"no quarantined message {args.id}")
        # No subject: a quarantined message belongs to no person yet.
        await audit.record(store, "quarantine_purge", "cli", None, {"raw_messages": 1})
    print(f"{args.id}: purged")
    return 0


async def cmd_quarantine_replay(config: Config, args: argparse.Namespace) -> int:
    # Ingest's imports (the parser, the sender checks) stay out of the other commands: each
    # command is a process of its own, and they are the bulk of its start-up.
    from mailgate.ingest.prepare import ParserPool
    from mailgate.ingest.worker import IngestWorker

    async with _existing_store(config) as store:
        if not await store.requeue_inbound(args.id):
            raise NotFound(f"no quarantined message {args.id}")
        row = await store.get_inbound(args.id)
        assert row is not None
        parser = ParserPool()
        worker = IngestWorker(store, config, parser=parser, msgids=message_ids(config))
        try:
            [outcome] = await worker.ingest([row])
        finally:
            parser.close()
    if outcome.state == "quarantined":
        print(f"{args.id}: quarantined again: {outcome.reason}")
        return 1
    if outcome.state == "received":  # DNS trouble: the daemon checks it again later
        print(f"{args.id}: waiting for its sender checks (DNS); the daemon ingests it")
        return 0
    print(f"{args.id}: ingested into ticket {outcome.ticket_id}")
    return 0


async def cmd_check_config(config: Config, _args: argparse.Namespace) -> int:
    templates = Templates(config.outbound.templates)
    templates.check()
    problems = preflight.problems(config)
    for problem in problems:
        print(f"mailgate: config error: {problem}", file=sys.stderr)
    if problems:
        return os.EX_CONFIG
    for warning in config.warnings:
        print(f"config: warning: {warning}")
    _check_tls(config)
    replaced, unknown = templates.overridden()
    if templates.overrides is not None:
        listed = ", ".join(replaced) or "none"
        print(f"templates: overridden from {templates.overrides}: {listed}")
        for name in unknown:
            print(
                f"templates: warning: {templates.overrides / name} replaces no shipped"
                " template (a misspelt name?); it is never used"
            )
    security = config.security
    if not security.key_file_given:
        print(
            f"security: warning: [security] key_file is not set: the master key is kept beside"
            f" the data ({security.key_file}), so whoever copies that folder has the key too;"
            " set key_file to a path outside it (`mailgate keygen PATH` writes one)"
        )
    data = config.storage.database.parent.resolve()
    folders = (data, config.storage.attachments.resolve())
    if security.key_file_given and any(
        security.key_file.resolve().is_relative_to(f) for f in folders
    ):
        print(
            f"security: warning: the master key ({security.key_file}) is inside the data"
            " directory: whoever copies that folder has the key too, and an erasure reaches"
            " none of its backups; set [security] key_file to a path outside it"
        )
    if security.keystore.resolve().is_relative_to(data):
        print(
            f"security: warning: the key store ({security.keystore}) is inside the database's"
            f" folder ({data}): a backup of the data then carries the keys to it; set"
            " [security] keystore to a path outside it"
        )
    try:
        mode = security.key_file.stat().st_mode & 0o777
    except OSError:
        mode = 0  # not made yet: `serve` makes it, 0600
    if mode & 0o077:
        print(
            f"security: warning: the master key ({security.key_file}) can be read by others"
            f" than its owner (mode {mode:04o}): chmod 600 it"
        )
    if config.outbound.transport == "file":
        print(
            "outbound: the file transport writes outgoing mail in clear to"
            f" {config.outbound.directory.resolve()}, outside the sealed store and its erasure"
            ' (in production, a relay: transport = "smtp")'
        )
    if config.auth.trusted_authserv_id:
        print(f"auth: the Authentication-Results of {config.auth.trusted_authserv_id} decide")
    elif config.auth.enabled:
        from mailgate.ingest.auth import Authenticator  # see cmd_quarantine_replay

        authenticator = Authenticator(config.auth)
        print(f"auth: {await authenticator.dns_state()}")
        authenticator.close()
    else:
        print("auth: off: no mail is authenticated (no agent answers by mail, no renames)")
    if config.privacy.address:
        print(f"privacy: requests by mail to {config.privacy.address} (accepted by SMTP)")
    print(f"{config.path}: OK")
    return 0


def _check_tls(config: Config) -> None:
    """Load the certificates as `serve` does (ConfigError, exit 78, if one cannot be)."""
    smtp, outbound = config.smtp, config.outbound
    if outbound.transport == "smtp" and outbound.tls != "none":
        tls.client_context(outbound.tls_ca_file)
    if smtp.tls_cert is not None and smtp.tls_key is not None:
        tls.server_context(smtp.tls_cert, smtp.tls_key)
        required = ", required before MAIL" if smtp.require_tls else ""
        implicit = f"; TLS from the first byte on {smtp.tls_listen}" if smtp.tls_listen else ""
        print(f"smtp: STARTTLS offered with {smtp.tls_cert}{required}{implicit}")
        for warning in tls.certificate_warnings(smtp.tls_cert, smtp.tls_key):
            print(f"smtp: warning: {warning}")


async def cmd_participants_add(config: Config, args: argparse.Namespace) -> int:
    try:
        email = validate_address(args.email)
    except EmailNotValidError as exc:
        raise UsageError(f"EMAIL: not a valid address: {exc}") from None
    async with _existing_store(config) as store:
        if not await store.add_participant(args.id, email):
            raise NotFound(f"no ticket {args.id}")
    print(f"ticket {args.id}: {email} may post")
    return 0


def _read_body(source: str) -> str:
    """The reply text from a file or stdin ("-"); UsageError if unreadable or empty."""
    try:
        data = sys.stdin.buffer.read() if source == "-" else Path(source).read_bytes()
        body = data.decode("utf-8")
    except OSError as exc:
        raise UsageError(f"--body-file: {exc.strerror or exc}: {source}") from None
    except UnicodeDecodeError:
        raise UsageError(f"--body-file: not UTF-8 text: {source}") from None
    if not body.strip():
        raise UsageError(f"--body-file: the reply is empty: {source}")
    return clean_body(body)


async def cmd_reply(config: Config, args: argparse.Namespace) -> int:
    body = _read_body(args.body_file)
    tickets = Tickets(config, message_ids(config))
    async with _existing_store(config) as store:
        await _ticket(store, args.id)
        outbox_id = await store.ingest(
            lambda tx: tickets.agent_reply(tx, args.id, body, agent=None, at=datetime.now(UTC))
        )
    print(f"ticket {args.id}: reply stored, mail queued as outbox {outbox_id}")
    return 0


async def cmd_outbox_list(config: Config, args: argparse.Namespace) -> int:
    async with _existing_store(config) as store:
        rows = await store.list_outbox(args.state)
    if args.json:
        _print_json([outbox_json(r) for r in rows])
    else:
        _table(
            [
                (
                    r.id,
                    r.state,
                    r.item.kind,
                    r.item.ticket_id,
                    r.attempts,
                    _line(r.last_error or ""),
                    _line((r.reply or "").replace("\n", " | ")),
                )
                for r in rows
            ],
            ("ID", "STATE", "KIND", "TICKET", "ATTEMPTS", "LAST ERROR", "RELAY REPLY"),
            whole_last=True,
        )
    return 0


async def cmd_outbox_retry(config: Config, args: argparse.Namespace) -> int:
    async with _existing_store(config) as store:
        if not await store.retry_outbox(args.id):
            raise NotFound(f"no queued or failed outbox row {args.id}")
    print(f"outbox {args.id}: due now")
    return 0


async def _requester(store: SqliteStore, email: str) -> Requester:
    requester = await store.get_requester(email)
    if requester is None:
        raise NotFound(f"no requester {email}")
    return requester


async def cmd_requesters_list(config: Config, args: argparse.Namespace) -> int:
    async with _existing_store(config) as store:
        requesters = await store.list_requesters()
    if args.json:
        _print_json([requester_json(r) for r in requesters])
    else:
        _table(
            [
                (
                    r.email,
                    "yes" if r.verified else "no",
                    r.created_at.isoformat(timespec="seconds"),
                    _line(r.name or ""),
                )
                for r in requesters
            ],
            ("EMAIL", "VERIFIED", "CREATED", "NAME"),
        )
    return 0


async def cmd_requesters_show(config: Config, args: argparse.Namespace) -> int:
    async with _existing_store(config) as store:
        requester = await _requester(store, args.email)
    if args.json:
        _print_json(requester_json(requester))
        return 0
    print(f"Email:    {requester.email}")
    print(f"Name:     {_line(requester.name or '')}")
    print(f"Verified: {'yes' if requester.verified else 'no'}")
    print(f"Created:  {requester.created_at.isoformat()}")
    if requester.undeliverable:
        print(f"Undeliverable: bounced with {requester.undeliverable}; no automatic mail")
    if requester.state != "active":
        objected = " (objected)" if requester.objected else ""
        print(f"Processing: {requester.state}{objected}; stored only, no automatic mail")
    return 0


async def cmd_requesters_verify(config: Config, args: argparse.Namespace) -> int:
    async with _existing_store(config) as store:
        if not await store.verify_requester(args.email):
            raise NotFound(f"no requester {args.email}")
    print(f"{args.email}: verified")
    return 0


# -- the requester's rights, the audit log, statistics (issue 10) --


@asynccontextmanager
async def _privacy_store(config: Config) -> AsyncIterator[SqliteStore]:
    """The store, with any erasure a crash cut short finished first."""
    async with _existing_store(config) as store:
        await rights.finish_erasures(store, config)
        yield store


def _date(text: str) -> datetime:
    """`2024-05-01` (midnight UTC) or an ISO 8601 time (UTC unless it names an offset)."""
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise UsageError(f"--since: not a date (YYYY-MM-DD): {text}") from None
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def _new_address(text: str) -> str:
    try:
        return validate_address(text)
    except EmailNotValidError as exc:
        raise UsageError(f"--email: not a valid address: {exc}") from None


async def cmd_privacy_export(config: Config, args: argparse.Namespace) -> int:
    async with _privacy_store(config) as store:
        if await store.get_requester(args.email) is None:
            raise NotFound(f"no requester {args.email}")
        # Named by the audit subject's hash: never the address in a file name.
        name = f"mailgate-export-{audit.subject_hash(store.keys, args.email)[:16]}.zip"
        out = Path(args.out) if args.out else Path.cwd() / name
        if out.exists():
            raise UsageError(f"--out: {out} exists; move it away or name another file")
        data = await export.build_export(store, args.email, config.storage.attachments)
        if data is None:
            raise NotFound(f"no requester {args.email}")
    try:
        if not write_durably(out, data, mode=0o600, exclusive=True):
            raise UsageError(f"--out: {out} exists; move it away or name another file")
    except OSError as exc:
        raise UsageError(f"--out: {exc.strerror or exc}: {out}") from None
    print(f"{args.email}: exported to {out} ({len(data)} bytes)")
    return 0


async def _restriction(config: Config, args: argparse.Namespace, change: Change) -> int:
    async with _privacy_store(config) as store:
        result = await rights.restriction(store, args.email, change, via="cli")
    if result is None:
        raise NotFound(f"no requester {args.email}")
    done = {
        "restrict": "restricted: stored only, no automatic mail, left out of statistics",
        "object": "objection recorded; restricted: stored only, no automatic mail",
        "unrestrict": "restriction lifted (and any objection withdrawn)",
    }[change]
    already = {
        "restrict": "already restricted",
        "object": "objection already recorded",
        "unrestrict": "not restricted",
    }[change]
    print(f"{args.email}: {done if result.changed else 'no change: ' + already}")
    return 0


async def cmd_privacy_restrict(config: Config, args: argparse.Namespace) -> int:
    return await _restriction(config, args, "restrict")


async def cmd_privacy_unrestrict(config: Config, args: argparse.Namespace) -> int:
    return await _restriction(config, args, "unrestrict")


async def cmd_privacy_object(config: Config, args: argparse.Namespace) -> int:
    return await _restriction(config, args, "object")


async def cmd_privacy_erase(config: Config, args: argparse.Namespace) -> int:
    async with _privacy_store(config) as store:
        erased = await rights.erase(store, args.email, config, via="cli", reason=args.reason)
    if erased is None:
        raise NotFound(f"no requester {args.email}")
    counts = erased.counts
    print(f"{args.email}: erased (reason: {erased.reason}); their key is destroyed")
    for name in ("tickets", "messages", "attachments", "files", "outbox", "tokens"):
        print(f"  {name}: {counts[name]}")
    print(f"  raw messages: {counts['raw_messages']}")
    print(f"  participations removed: {counts['participations']}")
    if counts["open_tickets"]:
        print(f"  open tickets closed and erased, not archived: {counts['open_tickets']}")
    return 0


async def cmd_requesters_update(config: Config, args: argparse.Namespace) -> int:
    if args.name is None and args.email_new is None:
        raise UsageError("give --name NAME and/or --email NEW")
    name = clean_line(args.name) if args.name is not None else None
    new = _new_address(args.email_new) if args.email_new is not None else None
    rules = Tickets(config, message_ids(config))
    now = datetime.now(UTC)

    def follow(tx: IngestTx, corrected: Correction) -> int | None:
        """A new address is verified again: the verification mail, on their latest ticket."""
        if not corrected.email or corrected.ticket_id is None or new is None:
            return None
        return rules.address_corrected(tx, corrected.ticket_id, new, at=now)

    async with _privacy_store(config) as store:
        done = await rights.correct(
            store, args.email, name=name, new_email=new, via="cli", then=follow
        )
    if done is None:
        raise NotFound(f"no requester {args.email}")
    corrected, outbox_id = done
    if corrected.name:
        print(f"{args.email}: name corrected")
    if new is not None and not corrected.email:
        print(f"{args.email}: address spelled {new} (the same mailbox; verification kept)")
    if corrected.email:
        print(f"{args.email}: address corrected to {new}; it must be verified again")
        if outbox_id is not None:
            print(f"{new}: verification mail queued as outbox {outbox_id}")
        else:
            print(f"{new}: no verification mail queued (no ticket, restricted or a limit)")
    return 0


def audit_json(record: AuditRecord) -> dict[str, Any]:
    return {
        "id": record.id,
        "at": record.at.isoformat(),
        "action": record.action,
        "via": record.via,
        "subject": record.subject,
        "reason": record.reason,
        "counts": record.counts,
    }


async def cmd_audit_list(config: Config, args: argparse.Namespace) -> int:
    since = _date(args.since) if args.since else None
    async with _existing_store(config) as store:
        records = await store.audit_records(since)
        if args.subject:
            subject = audit.subject_hash(store.keys, args.subject)
            records = [r for r in records if r.subject == subject]
    if args.json:
        _print_json([audit_json(r) for r in records])
        return 0
    _table(
        [
            (
                r.at.isoformat(timespec="seconds"),
                r.action,
                r.via,
                (r.subject or "-")[:16],
                r.reason or "",
                " ".join(f"{k}={v}" for k, v in sorted(r.counts.items())),
            )
            for r in records
        ],
        ("AT", "ACTION", "VIA", "SUBJECT", "REASON", "COUNTS"),
        whole_last=True,
    )
    return 0


async def cmd_stats(config: Config, args: argparse.Namespace) -> int:
    since = _date(args.since) if args.since else None
    async with _existing_store(config) as store:
        result = stats.compute(await store.ticket_facts(since), since)
    if args.json:
        _print_json(result.as_json())
        return 0
    shown = result.as_json()
    print(f"Since:           {shown['since'] or 'the start'}")
    print(f"Opened, closed:  {shown['tickets_opened']}, {shown['tickets_closed']}")
    print(
        f"First response:  {stats.duration(result.first_response.seconds)} median "
        f"({result.first_response.count} tickets)"
    )
    print(
        f"Resolution:      {stats.duration(result.resolution.seconds)} median "
        f"({result.resolution.count} tickets)"
    )
    rate = result.reopen_rate
    print(
        f"Reopened:        {result.reopened} of {result.ever_closed} closed"
        + (f" ({rate:.0%})" if rate is not None else "")
    )
    print("Restricted and objecting requesters are left out.")
    print()
    _table(
        [(d["day"], d["opened"], d["closed"]) for d in shown["per_day"]],
        ("DAY", "OPENED", "CLOSED"),
    )
    print()
    _table(list(result.domains.items()), ("DOMAIN", "TICKETS"))
    print(f"(domains with fewer than {stats.MIN_DOMAIN} tickets are counted as other)")
    return 0


Add = Callable[..., argparse.ArgumentParser]
Group = Callable[[str, str], Any]
EMAIL_HELP = "the requester's address, as `requesters list` shows it"
SINCE_HELP = "count from this date on (YYYY-MM-DD, UTC, or an ISO 8601 time)"


def _add_rights(add: Add, group: Group) -> None:
    """The privacy, audit and stats commands."""
    pv = group("privacy", "a requester's rights: export, restrict, object, erase")
    exporting = add(
        "export",
        cmd_privacy_export,
        "write everything stored of a person to a zip (their tickets, messages, attachments)",
        pv,
    )
    exporting.add_argument("email", metavar="EMAIL", help=EMAIL_HELP)
    exporting.add_argument(
        "--out", metavar="FILE", help="the zip (default: ./mailgate-export-<hash>.zip, mode 0600)"
    )
    add(
        "restrict",
        cmd_privacy_restrict,
        "keep a person's data but process it no further (no automatic mail, no statistics)",
        pv,
    ).add_argument("email", metavar="EMAIL", help=EMAIL_HELP)
    add(
        "unrestrict", cmd_privacy_unrestrict, "lift a restriction (and any objection)", pv
    ).add_argument("email", metavar="EMAIL", help=EMAIL_HELP)
    add(
        "object", cmd_privacy_object, "record an objection to processing (it restricts)", pv
    ).add_argument("email", metavar="EMAIL", help=EMAIL_HELP)
    erasing = add(
        "erase",
        cmd_privacy_erase,
        "erase a person: their rows and files, then their key; prints what was removed",
        pv,
    )
    erasing.add_argument("email", metavar="EMAIL", help=EMAIL_HELP)
    erasing.add_argument(
        "--reason",
        metavar="TEXT",
        help="request (default), under-16, or any text (kept only as the category 'other')",
    )

    a_sub = group("audit", "the audit log of what was done to personal data")
    a_list = add(
        "list",
        cmd_audit_list,
        "list audit records, oldest first (no personal data)",
        a_sub,
        json=True,
    )
    a_list.add_argument("--since", metavar="DATE", help=SINCE_HELP)
    a_list.add_argument("--subject", metavar="EMAIL", help="only the records about this address")

    st = add(
        "stats",
        cmd_stats,
        "ticket statistics without personal data: opened, closed, response and resolution"
        " times, reopen rate, tickets per day and per domain",
        json=True,
    )
    st.add_argument("--since", metavar="DATE", help=SINCE_HELP)


# -- retention and the archive (issue 10) --


async def cmd_purge(config: Config, args: argparse.Namespace) -> int:
    from mailgate.privacy import retention

    async with _existing_store(config) as store:
        counts = await retention.purge_now(
            config, store, now=retention.clock(), dry_run=args.dry_run
        )
    if args.json:
        _print_json({"dry_run": args.dry_run, "counts": counts})
    else:
        _table(list(counts.items()), ("CATEGORY", "DUE" if args.dry_run else "REMOVED"))
        if args.dry_run:
            print("(dry run: nothing was changed)")
    return 0


def archived_json(record: ArchivedTicket, *, messages: bool = False) -> dict[str, Any]:
    """An archived record for output: the requester as its keyed hash, never a name."""
    content = record.content
    shown: dict[str, Any] = {
        "id": record.ticket_id,
        "subject": _line(content["subject"]) if content else ERASED,
        "requester": record.requester,
        "created_at": record.created_at.isoformat(),
        "closed_at": record.closed_at.isoformat(),
        "archived_at": record.archived_at.isoformat(),
        "archived_because": record.reason,
        "message_count": record.message_count,
    }
    if messages:
        shown["messages"] = [
            {
                "author": m["author"],
                "sender": m["sender"],
                "received_at": m["received_at"],
                "subject": _line(m["subject"]),
                "body_text": m["body_text"],
                "attachments": [
                    {**a, "filename": _opt(a["filename"]), "content_type": _line(a["content_type"])}
                    for a in m["attachments"]
                ],
            }
            for m in (content or {}).get("messages", [])
        ]
    return shown


async def _archived(
    config: Config, store: SqliteStore, read: Callable[[ArchiveStore], Awaitable[T]], empty: T
) -> T:
    """Read the archive (`empty` if there is none yet); only these commands open it."""
    if not config.retention.archive.exists():
        return empty  # and make none
    async with open_archive(config.retention.archive, store.keys) as archive:
        return await read(archive)


async def cmd_archive_list(config: Config, args: argparse.Namespace) -> int:
    async with _existing_store(config) as store:
        requester = None
        if args.requester:
            try:
                requester = person_hash(store.keys, validate_address(args.requester))
            except EmailNotValidError as exc:
                raise UsageError(f"--requester: not a valid address: {exc}") from None
        none: list[ArchivedTicket] = []
        records = await _archived(config, store, lambda a: a.list(requester=requester), none)
        await audit.record(
            store, "archive.list", "cli", None, {"records": len(records)}, hashed=requester
        )
    if args.json:
        _print_json([archived_json(r) for r in records])
        return 0
    _table(
        [
            (
                r.ticket_id,
                r.closed_at.isoformat(timespec="seconds"),
                r.archived_at.isoformat(timespec="seconds"),
                r.message_count,
                r.requester[:16],
                _line(r.content["subject"]) if r.content else ERASED,
            )
            for r in records
        ],
        ("ID", "CLOSED", "ARCHIVED", "MSGS", "REQUESTER (KEYED HASH)", "SUBJECT"),
    )
    return 0


async def cmd_archive_show(config: Config, args: argparse.Namespace) -> int:
    async with _existing_store(config) as store:
        record = await _archived(config, store, lambda a: a.get(args.id), None)
        if record is None:
            raise NotFound(f"no archived ticket {args.id}")
        await audit.record(
            store,
            "archive.show",
            "cli",
            None,
            {"messages": record.message_count},
            hashed=record.requester,
        )
    shown = archived_json(record, messages=True)
    if args.json:
        _print_json(shown)
        return 0
    print(f"Archived ticket #{shown['id']} {shown['subject']}")
    print(f"Requester: {shown['requester']} (keyed hash of the address)")
    print(f"Created:   {shown['created_at']}")
    print(f"Closed:    {shown['closed_at']}")
    print(f"Archived:  {shown['archived_at']} ({shown['archived_because']})")
    for m in shown["messages"]:
        author = "" if m["author"] == "customer" else f"[{m['author']}] "
        sender = (m["sender"] or ERASED)[:16]
        print(f"\n--- {m['received_at']}  {author}{sender}")
        print(m["body_text"])
        for a in m["attachments"]:
            filename = a["filename"] or "(unnamed)"
            print(f"[attachment] {filename}  {a['content_type']}  {a['size']} bytes")
    return 0


def _retention_commands(add: Add, group: Group) -> None:
    purge = add(
        "purge",
        cmd_purge,
        "apply every [retention] period now and print how many records each removed",
        json=True,
    )
    purge.add_argument("--dry-run", action="store_true", help="count what is due; change nothing")
    a_sub = group("archive", "closed tickets kept for their legal period, outside the database")
    a_list = add(
        "list", cmd_archive_list, "list archived tickets (each read is audited)", a_sub, json=True
    )
    a_list.add_argument("--requester", metavar="EMAIL", help="only this address's tickets")
    a_show = add(
        "show",
        cmd_archive_show,
        "show an archived ticket with its messages (audited)",
        a_sub,
        json=True,
    )
    a_show.add_argument("id", type=int, metavar="ID", help="the ticket's number")


async def cmd_rekey(config: Config, args: argparse.Namespace) -> int:
    from mailgate.privacy.rekey import rekey  # the store's imports stay out of keygen

    if args.batch < 1:
        raise UsageError("--batch: at least 1")
    done = await rekey(config, Path(args.new_key_file), batch=args.batch)
    index = " and the index key" if done.index_key else ""
    print(
        f"rekey: {done.data_keys} data keys{index} and {done.message_keys} message keys"
        f" re-wrapped under {args.new_key_file} in {done.seconds:.2f} s (batches of {args.batch})"
    )
    key_file = config.security.key_file
    if done.replaced:
        print(f"rekey: {key_file} now holds the new key; the old key is kept as {done.old_copy}")
    else:
        print(f"rekey: {key_file} already held the new key")
    if done.old_copy.exists():
        print(
            f"rekey: delete {done.old_copy} once no backup of the key store from before this"
            f" rekey is wanted (only it opens them); {args.new_key_file} is a copy of {key_file}"
        )
    return 0


def cmd_keygen(path: Path) -> int:
    """Write a fresh master key; never over an existing file (a lost key loses everything)."""
    try:
        write_master_key(path)
    except FileExistsError:
        print(f"mailgate: {path} exists: keygen never overwrites a key", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"mailgate: {path}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    print(f"{path}: new master key written (mode 0600)")
    return 0


def cmd_api_token_new() -> int:
    """Print a fresh intake API token and the config line that accepts it: only the digest
    goes into the config, so the token is shown this once."""
    token, digest = new_token()  # a link token's form: a valid RFC 6750 bearer token
    print(token)
    print("# Give the token above to the chat-bot; mailgate keeps only its SHA-256 digest.")
    print("# Add the digest to [http] api_tokens (beside any there), then reload mailgate:")
    print(f'api_tokens = ["{digest}"]')
    return 0


DESCRIPTION = (
    "mailgate turns mail to your support address into tickets. `mailgate serve` runs the"
    " daemon (SMTP in, the HTTP links, mail out); the other commands show and change what it"
    " stored, and may run while it does."
)
EPILOG = (
    "The config file is --config PATH, else $MAILGATE_CONFIG, else ./config.toml; --config and"
    " --json may come before or after the command. `mailgate COMMAND --help` tells more."
    " Exit status: 0 done, 1 not found (or the store failed), 2 usage, 3 the daemon could not"
    " start, 78 the configuration is invalid."
)
CONFIG_HELP = "the config file (default: $MAILGATE_CONFIG, else ./config.toml)"
ID_HELP = "the ticket's number, as `tickets list` shows it"
QUEUE_ID_HELP = "the message's queue id, as `quarantine list` shows it"


def _global_options(*, json: bool) -> argparse.ArgumentParser:
    """`--config` (and `--json`) for a subcommand, so they may follow it: SUPPRESS leaves an
    option given before the subcommand alone unless it is given again after it."""
    options = argparse.ArgumentParser(add_help=False)
    options.add_argument("--config", metavar="PATH", default=argparse.SUPPRESS, help=CONFIG_HELP)
    if json:
        options.add_argument(
            "--json",
            action="store_true",
            default=argparse.SUPPRESS,
            help="print JSON instead of text (a stable document for scripts)",
        )
    return options


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mailgate", description=DESCRIPTION, epilog=EPILOG)
    parser.add_argument("--version", action="version", version=f"mailgate {__version__}")
    parser.add_argument("--config", metavar="PATH", help=CONFIG_HELP)
    parser.add_argument(
        "--json", action="store_true", help="print JSON, for the commands that list or show"
    )
    parser.set_defaults(prints_json=False)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    plain, with_json = _global_options(json=False), _global_options(json=True)

    def add(
        name: str, func: Command | None, help_: str, parent: Any = commands, *, json: bool = False
    ) -> argparse.ArgumentParser:
        sub: argparse.ArgumentParser = parent.add_parser(
            name, help=help_, description=help_, parents=[with_json if json else plain]
        )
        sub.set_defaults(func=func, prints_json=json)
        return sub

    def group(name: str, help_: str) -> Any:
        """A command with subcommands (`tickets list`, ...)."""
        sub = commands.add_parser(name, help=help_, description=help_, parents=[plain])
        return sub.add_subparsers(dest=f"{name}_command", required=True, metavar="COMMAND")

    add(
        "serve",
        cmd_serve,
        "run the daemon: SMTP listener, ingest, outgoing mail and the HTTP links, until SIGTERM"
        " or SIGINT; logs to stdout",
    )
    add(
        "check-config",
        cmd_check_config,
        "validate the configuration, render every template, check that the listen addresses"
        " are free and the state folders writable; print warnings, then PATH: OK",
    )
    add(
        "status",
        cmd_status,
        "show the queues (inbound and outbox: rows by state, the oldest still waiting), the"
        " latest quarantined messages and the latest delivery errors; read-only, safe while"
        " the daemon runs",
        json=True,
    )
    keygen = add("keygen", None, "write a new master key (mode 0600) for [security] key_file")
    keygen.add_argument("path", metavar="PATH", help="where to write it; never overwritten")
    rekey = add(
        "rekey",
        cmd_rekey,
        "re-wrap every key under a new master key, then make it [security] key_file"
        " (the daemon must be stopped; run it again to finish after a crash)",
    )
    rekey.add_argument(
        "new_key_file", metavar="NEW_KEY_FILE", help="the new key, as `mailgate keygen` wrote it"
    )
    rekey.add_argument(
        "--batch", type=int, default=256, metavar="N", help="keys per commit (default 256)"
    )
    add("close", cmd_close, "close a ticket").add_argument(
        "id", type=int, metavar="ID", help=ID_HELP
    )
    api_token_sub = group("api-token", "tokens for the chat-bot intake API (POST /api/tickets)")
    add(
        "new",
        None,
        "print a fresh bearer token for the intake API and the [http] api_tokens line that"
        " accepts it: the config holds only its SHA-256 digest, so the token is shown once;"
        " needs no config",
        api_token_sub,
    )
    add(
        "reopen",
        cmd_reopen,
        "reopen a closed ticket (statistics count it as reopened, as when the customer"
        " writes again)",
    ).add_argument("id", type=int, metavar="ID", help=ID_HELP)

    tickets_sub = group("tickets", "list and show tickets")
    listing = add(
        "list",
        cmd_tickets_list,
        "list tickets: number, status, messages, requester, subject",
        tickets_sub,
        json=True,
    )
    listing.add_argument("--status", choices=("open", "closed"), help="only tickets in this state")
    show = add(
        "show", cmd_tickets_show, "show one ticket with its messages", tickets_sub, json=True
    )
    show.add_argument("id", type=int, metavar="ID", help=ID_HELP)

    q_sub = group("quarantine", "messages that could not become tickets, and why")
    add(
        "list",
        cmd_quarantine_list,
        "list quarantined messages: queue id, arrival, size, reason",
        q_sub,
        json=True,
    )
    q_show = add(
        "show",
        cmd_quarantine_show,
        "show a quarantined message's envelope and subject as JSON",
        q_sub,
    )
    q_show.add_argument("id", metavar="ID", help=QUEUE_ID_HELP)
    q_show.add_argument("--raw", action="store_true", help="print the raw message as received")
    add(
        "replay", cmd_quarantine_replay, "ingest a quarantined message again (after a fix)", q_sub
    ).add_argument("id", metavar="ID", help=QUEUE_ID_HELP)
    add(
        "purge", cmd_quarantine_purge, "delete a quarantined message for good (audited)", q_sub
    ).add_argument("id", metavar="ID", help=QUEUE_ID_HELP)

    p_sub = group("participants", "who may post on a ticket besides its requester")
    p_add = add("add", cmd_participants_add, "let an address post on a ticket", p_sub)
    p_add.add_argument("id", type=int, metavar="ID", help=ID_HELP)
    p_add.add_argument("email", metavar="EMAIL", help="the address that may post")

    reply = add(
        "reply", cmd_reply, "answer a ticket as an agent; the answer is mailed to the requester"
    )
    reply.add_argument("id", type=int, metavar="ID", help=ID_HELP)
    reply.add_argument(
        "--body-file", required=True, metavar="PATH", help='the reply text (UTF-8); "-" reads stdin'
    )

    o_sub = group("outbox", "outgoing mail and its delivery state")
    o_list = add(
        "list",
        cmd_outbox_list,
        "list outgoing mail: state, kind, ticket, attempts, last error, the relay's reply",
        o_sub,
        json=True,
    )
    o_list.add_argument(
        "--state", choices=("queued", "sending", "sent", "failed"), help="only mail in this state"
    )
    add("retry", cmd_outbox_retry, "make a queued or failed mail due now", o_sub).add_argument(
        "id", type=int, metavar="ID", help="the mail's number, as `outbox list` shows it"
    )

    r_sub = group("requesters", "the people who wrote in")
    add(
        "list",
        cmd_requesters_list,
        "list requesters: address, verified, first seen, name",
        r_sub,
        json=True,
    )
    r_show = add("show", cmd_requesters_show, "show one requester", r_sub, json=True)
    r_show.add_argument("email", metavar="EMAIL", help=EMAIL_HELP)
    add("verify", cmd_requesters_verify, "mark a requester's address verified", r_sub).add_argument(
        "email", metavar="EMAIL", help=EMAIL_HELP
    )
    r_update = add(
        "update",
        cmd_requesters_update,
        "correct a requester's name or address (audited; a new address is verified again)",
        r_sub,
    )
    r_update.add_argument("email", metavar="EMAIL", help=EMAIL_HELP)
    r_update.add_argument("--name", metavar="NAME", help="the corrected name")
    r_update.add_argument(
        "--email", dest="email_new", metavar="NEW", help="the corrected address (verified again)"
    )
    _add_rights(add, group)
    _retention_commands(add, group)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.json and not args.prints_json:
        parser.error(f"--json: `mailgate {args.command}` prints no JSON")
    if args.command == "keygen":  # needs no config: it makes what the config will name
        return cmd_keygen(Path(args.path))
    if args.command == "api-token":  # likewise
        return cmd_api_token_new()
    try:
        config = load_config(config_path(args.config))
    except ConfigError as exc:
        print(f"mailgate: config error: {exc}", file=sys.stderr)
        return os.EX_CONFIG
    configure_logging(config.log.level, fmt=config.log.format)
    try:
        status: int = asyncio.run(args.func(config, args))
        return status
    except UsageError as exc:
        print(f"mailgate: {exc}", file=sys.stderr)
        return 2
    except ConfigError as exc:
        print(f"mailgate: config error: {exc}", file=sys.stderr)
        return os.EX_CONFIG
    except NotFound as exc:
        print(f"mailgate: {exc}", file=sys.stderr)
        return 1
    except MailgateError as exc:
        print(f"mailgate: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
