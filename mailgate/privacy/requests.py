"""Privacy requests by mail, carried out once their link is confirmed (architecture rule 18).

The ticket rules (`tickets.py`) open a request when mail to `[privacy] address` asks for a
right, and send its link to the From address: the mailbox whose data it is, so a forged From
makes mailgate ask the real owner and nothing more. This module is what the link does
(`/privacy/confirm/{token}`, `confirm.py`: the GET shows a button, only its POST confirms):

- `peek` and `describe` read (GET, HEAD): the link's state and the right asked for; never
  anything of the person, so a prefetching scanner learns nothing and uses nothing.
- `redeem` uses the link once, in a transaction that also records the confirmation in the
  audit log (action `request`, via `link`), and carries the request out (the action audited
  via `mail`):
  - *restrict*, *object*: applied in that same transaction, with the mail that says so (the
    answer to their request, which a restriction does not stop);
  - *export*: the zip (`export.build_export`), sealed into a blob of the person
    (`store/blobs.py`) and mailed as an attachment; the outbound worker opens it at send
    time and the store removes it once the mail is sent or has failed (an erasure removes it
    with the rest). A zip past `[privacy] max_export_size` is not mailed: the mail says so
    and asks them to reply, so that an agent hands it over another way;
  - *erase*: the transaction marks the person 'erasing' and queues the farewell, a system
    mail (no ticket, only the address, sealed under a key of its own) held until the person's
    row is gone; the erasure (`rights.erase_marked`) then destroys their key and rows, the
    request's with them.
- An export that cannot be made (the store, a full disk) gives the link back: the page says
  to try again, and the button does it then. A crash after the confirmation is finished at
  the next start: an erasure by `rights.finish_erasures` (which lets the farewell go), an
  export by `finish_confirmed`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Literal

import structlog

from mailgate.config import Config
from mailgate.errors import StoreError, StoreUnavailable
from mailgate.model import PrivacyAction
from mailgate.privacy import audit, export, rights
from mailgate.store.base import TokenState
from mailgate.store.blobs import remove_blobs, save_blob
from mailgate.store.sqlite import PersonRef, PrivacyTx, SqliteStore
from mailgate.store.sqlite_requests import Claim
from mailgate.store.sqlite_rights import Change
from mailgate.tickets import Tickets

log = structlog.get_logger(__name__)

Refusal = Literal["used", "expired", "revoked", "unknown"]


@dataclass(frozen=True, slots=True)
class Done:
    """A request carried out: what was asked, and what came of it (for the page)."""

    action: PrivacyAction
    outcome: Literal["mailed", "too_large", "erased", "applied", "gone"]


class PrivacyRequests:
    """The engine behind the privacy confirmation route, on one store."""

    def __init__(self, store: SqliteStore, config: Config, rules: Tickets) -> None:
        self._store = store
        self._config = config
        self._rules = rules
        self._attachments = config.storage.attachments
        self._max_export = config.privacy.max_export_size

    async def peek(self, token_hash: str) -> TokenState:
        """The link's state; reads only."""
        state, _action = await self._store.peek_privacy(token_hash)
        return state

    async def describe(self, token_hash: str) -> dict[str, str]:
        """What the page may say of a live link: the right asked for, nothing of the person."""
        _state, action = await self._store.peek_privacy(token_hash)
        return {"request": action} if action is not None else {}

    async def redeem(self, token_hash: str) -> Done | Refusal:
        """Use the link once and carry its request out; otherwise the link's state."""
        now = datetime.now(UTC)
        keys = self._store.keys

        def confirm(tx: PrivacyTx) -> Claim | TokenState:
            claim = tx.confirm_request(token_hash, at=now)
            if isinstance(claim, str):
                return claim
            tx.add_audit(audit.entry(keys, "request", "link", claim.email, {claim.action: 1}))
            if claim.action in ("restrict", "object"):
                change: Change = "restrict" if claim.action == "restrict" else "object"
                tx.restrict(claim.email, change, audit.entry(keys, change, "mail", claim.email, {}))
                self._rules.privacy_done(tx, claim.ticket_id, claim.email, claim.action, at=now)
                tx.finish_request(claim.id, at=now)
            elif claim.action == "erase":
                # Marked in the transaction that confirms: from here a crash is finished at the
                # next start, and the farewell waits for the person's row to go.
                tx.begin_erasure(claim.person_id)
                self._rules.privacy_erased(tx, claim.email, at=now)
            return claim

        claim = await self._store.privacy(confirm)
        if isinstance(claim, str):
            assert claim != "live"
            return claim
        log.info("privacy_request_confirmed", ticket_id=claim.ticket_id, action=claim.action)
        if claim.action == "export":
            try:
                return Done("export", await self._export(claim))
            except (StoreError, OSError) as exc:  # the store, or the attachments' disk
                await self._give_back(claim)
                raise StoreUnavailable(f"export: {type(exc).__name__}: {exc}") from exc
        if claim.action == "erase":
            await rights.erase_marked(
                self._store,
                PersonRef(claim.person_id, claim.key_id),
                claim.email,
                self._config,
                via="mail",
            )
            return Done("erase", "erased")
        return Done(claim.action, "applied")

    async def _give_back(self, claim: Claim) -> None:
        """The export could not be made: the link works again, so that pressing the button
        later (the page says to try again in a few minutes) does it; if even that cannot be
        written, the next start carries it out (`finish_confirmed`)."""
        reopen = _reopen(claim.id)
        try:
            given = await self._store.privacy(reopen)
        except StoreError as exc:
            log.error("privacy_request_left_confirmed", ticket_id=claim.ticket_id, error=str(exc))
            return
        log.warning("privacy_export_failed", ticket_id=claim.ticket_id, link_live_again=given)

    async def finish_confirmed(self) -> int:
        """Carry out the exports confirmed before a crash (or a failure) and not yet mailed;
        return how many. (A confirmed restriction is applied in the transaction that confirms
        it; a confirmed erasure is finished by `rights.finish_erasures`.)"""
        finished = 0
        for request_id in await self._store.unfinished_requests():
            claim = await self._store.privacy(_unfinished(request_id))
            if claim is not None and claim.action == "export":
                await self._export(claim)
                finished += 1
        return finished

    async def _export(self, claim: Claim) -> Literal["mailed", "too_large", "gone"]:
        data = await export.build_export(self._store, claim.email, self._attachments, via="mail")
        if data is None:
            return "gone"
        blob: str | None = None
        key = b""
        if len(data) <= self._max_export:
            blob, key, _digest = await asyncio.to_thread(save_blob, self._attachments, data)
        now = datetime.now(UTC)

        def queue(tx: PrivacyTx) -> bool:
            if tx.unfinished_request(claim.id) is None:  # erased meanwhile, or done already
                return False
            if blob is not None:
                tx.own_export(claim.person_id, blob, key, len(data))
            self._rules.privacy_export(
                tx, claim.ticket_id, claim.email, blob=blob, size=len(data), at=now
            )
            tx.finish_request(claim.id, at=now)
            return True

        try:
            queued = await self._store.privacy(queue)
        except BaseException:
            if blob is not None:
                remove_blobs(self._attachments, [blob])
            raise
        if not queued:
            if blob is not None:
                remove_blobs(self._attachments, [blob])
            return "gone"
        return "mailed" if blob is not None else "too_large"


def _unfinished(request_id: int) -> Callable[[PrivacyTx], Claim | None]:
    return lambda tx: tx.unfinished_request(request_id)


def _reopen(request_id: int) -> Callable[[PrivacyTx], bool]:
    return lambda tx: tx.reopen_request(request_id)
