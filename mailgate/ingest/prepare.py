"""The database-free half of ingest, run in a separate parser process.

Parsing is CPU-bound Python: in the daemon's process it would compete with the event loop for
the GIL. A child process parses on another core, and a parser that crashes takes down only
the child (`ParserPool` replaces it and ingest quarantines the message that did it).
"""

from __future__ import annotations

import asyncio
import multiprocessing
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TypeVar

from mailgate.errors import MailgateError, Unparseable
from mailgate.ingest.parse import parse_mail
from mailgate.model import ParsedMail, StoredAttachment
from mailgate.store.blobs import save_blob

T = TypeVar("T")


class ParserCrashed(MailgateError):
    """The parser process died (a crash in C code, the OOM killer); it has been replaced."""


class AttachmentsUnwritable(MailgateError):
    """Attachment files could not be written (disk full): transient, retry the row later."""


@dataclass(frozen=True, slots=True)
class Prepared:
    """One message parsed, its attachment files written, or the reason it goes to quarantine."""

    mail: ParsedMail | None
    attachments: tuple[StoredAttachment, ...] = ()
    failure: str | None = None


def prepare(raw: bytes, attachments: Path) -> Prepared:
    """Parse `raw` and store its attachments by content hash."""
    try:
        mail = parse_mail(raw)
    except Unparseable as exc:
        return Prepared(None, failure=str(exc))
    except Exception as exc:  # noqa: BLE001 - a parser failure quarantines, never kills
        return Prepared(None, failure=f"parser failed: {type(exc).__name__}")
    try:
        stored = tuple(
            StoredAttachment(
                filename=part.filename,
                content_type=part.content_type,
                size=len(part.content),
                sha256=save_blob(attachments, part.content),
                inline=part.inline,
            )
            for part in mail.attachments
        )
    except OSError as exc:
        raise AttachmentsUnwritable(f"attachments: {exc.strerror}") from exc
    # The content is on disk now; don't ship it back across the process boundary.
    return Prepared(replace(mail, attachments=()), stored)


def prepare_all(raws: Sequence[bytes], attachments: Path) -> list[Prepared]:
    return [prepare(raw, attachments) for raw in raws]


class ParserPool:
    """One parser process, started on first use and replaced when it dies."""

    def __init__(self) -> None:
        self._pool: ProcessPoolExecutor | None = None

    async def start(self) -> None:
        """Start the process and import the parser now, not with the first message (~0.7 s)."""
        await self.run(prepare_all, [], Path())

    async def run(self, func: Callable[..., T], *args: object) -> T:
        """Run `func(*args)` in the parser process.

        Raises:
            ParserCrashed: the process died while running it.
        """
        if self._pool is None:
            # spawn, not fork: forking a process that runs threads (SQLite's) is unsafe.
            self._pool = ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"))
        pool = self._pool
        try:
            return await asyncio.get_running_loop().run_in_executor(pool, func, *args)
        except BrokenProcessPool as exc:
            if self._pool is pool:
                self._pool = None
                pool.shutdown(wait=False, cancel_futures=True)
            raise ParserCrashed(str(exc)) from exc

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
