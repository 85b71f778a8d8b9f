"""The half of ingest that needs no write to the database, run in a separate parser process.

Parsing is CPU-bound Python: in the daemon's process it would compete with the event loop for
the GIL. A child process parses on another core, and a parser that crashes takes down only
the child (`ParserPool` replaces it and ingest quarantines the message that did it). The
child is also what makes a time budget possible: a stalled parse is ended by killing the
process (a thread cannot be stopped), and ingest treats it like a crash.

The child reads each raw message from the database itself (read-only, by queue id, one at a
time), for the parse and again for DKIM verification: the daemon never holds a batch of raw
messages, nor pickles them across the pipe, and gets back only what the parse made of them
(attachments are written to their files here and stay out of it).
"""

from __future__ import annotations

import asyncio
import multiprocessing
import os
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TypeVar

from mailgate.errors import MailgateError, Unparseable
from mailgate.ingest.auth import VerifyJob, verify_signatures
from mailgate.ingest.child import die_with_parent
from mailgate.ingest.parse import parse_mail
from mailgate.model import AttachmentPart, ParsedMail, StoredAttachment
from mailgate.msgid import shaped_like_ours
from mailgate.privacy.keyring import Keyring
from mailgate.store.blobs import save_blob
from mailgate.store.sqlite_raw import RawReader

T = TypeVar("T")

# The time budget of one call into the parser process. Parsing a message within the limits of
# `mime.py` takes milliseconds (a 25 MiB one well under a second), so a call that runs this
# long is stuck: the process is killed. A batch that runs out is redone message by message,
# each with the whole budget, so only a message that alone takes this long is quarantined.
PARSE_TIMEOUT = 10.0
# Starting a process and importing the parser (~0.7 s) is not charged to the first message.
START_TIMEOUT = 60.0


class ParserCrashed(MailgateError):
    """The parser process died (a crash in C code, the OOM killer); it has been replaced."""

    reason = "parser crashed"  # the quarantine reason of a message that does this alone


class ParserTimedOut(ParserCrashed):
    """A call ran past its time budget; the process was killed and will be replaced."""

    reason = "parse timed out"


# What a message whose raw bytes are gone (purged since it was picked) is prepared as; its
# row is gone too, so ingest finds nothing to do.
GONE = "raw message not found"


@dataclass(frozen=True, slots=True)
class Prepared:
    """One message parsed, its attachment files written; or the reason it goes to quarantine
    (`failure`); or the reason it must wait and be prepared again later (`retry`)."""

    mail: ParsedMail | None
    attachments: tuple[StoredAttachment, ...] = ()
    failure: str | None = None
    retry: str | None = None
    # For a bounce: strings in the raw message shaped like our Message-IDs, for the daemon
    # to check with the secret (the returned mail may not be where RFC 3464 puts it).
    mentioned_ids: tuple[str, ...] = ()


def prepare(raw: bytes, attachments: Path, envelope_sender: str = "") -> Prepared:
    """Parse `raw` (its envelope sender stands in for a missing From) and store its
    attachments by content hash.

    Attachment files that cannot be written (disk full, I/O error) are a reason to wait, not
    to fail: the result says `retry`, and this message alone waits for the disk.
    """
    try:
        mail = parse_mail(raw, envelope_sender)
    except Unparseable as exc:
        return Prepared(None, failure=str(exc))
    except Exception as exc:  # noqa: BLE001 - a parser failure quarantines, never kills
        return Prepared(None, failure=f"parser failed: {type(exc).__name__}")
    try:
        stored = _store_all(attachments, mail.attachments)
    except OSError as exc:
        return Prepared(None, retry=f"attachments unwritable: {exc.strerror or exc}")
    mentioned = tuple(shaped_like_ours(raw.decode("latin-1"))) if mail.bounce else ()
    # The content is on disk now; don't ship it back across the process boundary.
    return Prepared(replace(mail, attachments=()), stored, mentioned_ids=mentioned)


def _store_all(root: Path, parts: Sequence[AttachmentPart]) -> tuple[StoredAttachment, ...]:
    """Write each distinct content once: a sender who attaches the same bytes a thousand
    times costs one sealed file (and its fsyncs), which all of those attachments name."""
    files: dict[bytes, tuple[str, bytes, str]] = {}
    stored = []
    for part in parts:
        if part.content not in files:
            files[part.content] = save_blob(root, part.content)
        blob, key, digest = files[part.content]
        stored.append(
            StoredAttachment(
                filename=part.filename,
                content_type=part.content_type,
                size=len(part.content),
                sha256=digest,
                inline=part.inline,
                blob=blob,
                key=key,
            )
        )
    return tuple(stored)


@dataclass(frozen=True, slots=True)
class Source:
    """Where the parser process reads raw messages: the database and the keys that open them
    (the master key's bytes cross the pipe to the child once per call, never to disk)."""

    database: Path
    masters: tuple[bytes, ...]
    keystore: Path


_readers: dict[Source, RawReader] = {}


def _raw_of(source: Source, inbound_id: str) -> bytes | None:
    """The raw message of a row, over this process's one read-only connection to the database."""
    reader = _readers.get(source)
    if reader is None:
        for stale in _readers.values():
            stale.close()
        _readers.clear()
        keys = Keyring(source.masters, source.keystore)
        reader = _readers[source] = RawReader(source.database, keys)
    return reader.read(inbound_id)


def prepare_all(
    database: Source | None, ids: Sequence[str], attachments: Path, senders: Sequence[str]
) -> list[Prepared]:
    """Prepare the rows `ids` of `database`, reading one raw message at a time; `senders`
    are their envelope senders, in the same order."""
    results = []
    for inbound_id, sender in zip(ids, senders, strict=True):
        assert database is not None
        raw = _raw_of(database, inbound_id)
        results.append(
            Prepared(None, failure=GONE) if raw is None else prepare(raw, attachments, sender)
        )
        del raw
    return results


def verify_all(
    database: Source, jobs: Sequence[tuple[str, Sequence[VerifyJob]]]
) -> list[dict[int, bool]]:
    """DKIM verification of each row's message with its fetched keys (see
    `auth.verify_signatures`): here, under the parser's time budget, a hostile header cannot
    stall the daemon. A row whose raw message is gone verifies nothing."""
    found = []
    for inbound_id, message_jobs in jobs:
        raw = _raw_of(database, inbound_id)
        found.append({} if raw is None else verify_signatures(raw, message_jobs))
        del raw
    return found


class ParserPool:
    """One parser process, started on first use and replaced when it dies or stalls."""

    def __init__(self, *, timeout: float = PARSE_TIMEOUT) -> None:
        self._pool: ProcessPoolExecutor | None = None
        self._timeout = timeout

    async def start(self) -> None:
        """Start the process and import the parser now, not with the first message (~0.7 s)."""
        await self._ready()

    async def run(self, func: Callable[..., T], *args: object) -> T:
        """Run `func(*args)` in the parser process, within the time budget.

        Raises:
            ParserTimedOut: it ran past the budget; the process was killed.
            ParserCrashed: the process died while running it.
        """
        loop = asyncio.get_running_loop()
        pool = await self._ready()
        try:
            future = loop.run_in_executor(pool, func, *args)
        except BrokenProcessPool:  # it died while idle, not of this call: start another
            self._discard(pool)
            pool = await self._ready()
            future = loop.run_in_executor(pool, func, *args)
        try:
            return await asyncio.wait_for(future, self._timeout)
        except TimeoutError as exc:
            self._discard(pool, kill=True)
            raise ParserTimedOut(f"no result within {self._timeout:g} s") from exc
        except BrokenProcessPool as exc:
            self._discard(pool)
            raise ParserCrashed(str(exc)) from exc

    async def _ready(self) -> ProcessPoolExecutor:
        """The running pool, or a new one whose process has started and imported the parser."""
        if self._pool is not None:
            return self._pool
        # spawn, not fork: forking a process that runs threads (SQLite's) is unsafe. The child
        # ends when we do, kill -9 included (`child.die_with_parent`).
        pool = self._pool = ProcessPoolExecutor(
            1,
            mp_context=multiprocessing.get_context("spawn"),
            initializer=die_with_parent,
            initargs=(os.getpid(),),
        )
        future = asyncio.get_running_loop().run_in_executor(pool, prepare_all, None, [], Path(), [])
        try:
            await asyncio.wait_for(future, START_TIMEOUT)
        except TimeoutError as exc:
            self._discard(pool, kill=True)
            raise ParserTimedOut("the parser process did not start") from exc
        except BrokenProcessPool as exc:
            self._discard(pool)
            raise ParserCrashed(str(exc)) from exc
        return pool

    def _discard(self, pool: ProcessPoolExecutor, *, kill: bool = False) -> None:
        """Stop using `pool`; with `kill`, end its process first (it may be stuck in C code)."""
        if kill:
            # ProcessPoolExecutor has no public way to stop a busy worker before Python 3.14.
            for process in list((pool._processes or {}).values()):
                process.kill()
        if self._pool is pool:
            self._pool = None
        pool.shutdown(wait=False, cancel_futures=True)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
