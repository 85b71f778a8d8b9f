"""The ticket rules (`mailgate/tickets.py`) through a real store, without a daemon.

Mail ingest is tested end to end elsewhere (test_threading, test_trust, test_bounces, ...);
here are the entry points that do not come by mail, `open_or_follow_up` (the HTTP intake
API, `api.py`) and `agent_reply` (`mailgate reply`), and who may post, on every store backend.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from mailgate.config import Config
from mailgate.model import Address
from mailgate.msgid import MessageIds
from mailgate.store import IngestTx, Store
from mailgate.tickets import Filed, Tickets
from tests.conftest import StoreOpener

ANN = Address("ann@example.org", "Ann")
NOW = datetime.now(UTC).replace(microsecond=0)


@pytest.fixture
def tickets(config: Config) -> Tickets:
    return Tickets(config, MessageIds(b"k" * 32, config.smtp.hostname))


async def request(
    store: Store,
    tickets: Tickets,
    requester: Address = ANN,
    ticket_id: int | None = None,
    *,
    subject: str = "Printer on fire",
    body: str = "It smokes.",
) -> Filed:
    return await store.ingest(
        lambda tx: tickets.open_or_follow_up(tx, requester, subject, body, ticket_id, at=NOW)
    )


async def test_a_request_opens_a_ticket_and_asks_to_verify(
    open_backend: StoreOpener, tickets: Tickets
) -> None:
    """A new request from the web form: a ticket for the requester, the message as the
    customer's (unauthenticated: the address is their word), a verification mail whose token
    is live, and the acknowledgement."""
    async with open_backend() as store:
        filed = await request(
            store, tickets, subject="Re: Printer\u202e on fire", body="It smokes.\r\n\x00"
        )
        ticket = await store.get_ticket(filed.ticket_id)
        outbox = await store.list_outbox()
        live = await store.ingest(lambda tx: tx.has_live_token("ANN@example.org", at=NOW))
    assert filed == Filed(ticket.id if ticket else 0, created=True, mails_queued=2)
    assert ticket is not None
    assert (ticket.subject, ticket.requester, ticket.flags) == (
        "Printer on fire",  # no reply prefix, no bidi override
        ANN,
        ("unauthenticated",),
    )
    [message] = ticket.messages
    assert (message.author, message.thread_reason, message.body_text) == (
        "customer",
        "new",
        "It smokes.\n",  # newlines normalised, controls dropped
    )
    assert message.auth == {"source": "web form", "trust": "unauthenticated"}
    assert [(r.item.kind, r.item.to.email, r.item.automatic) for r in outbox] == [
        ("verification", "ann@example.org", True),
        ("ticket_created", "ann@example.org", True),
    ]
    assert live


async def test_a_follow_up_joins_the_requesters_own_ticket(
    open_backend: StoreOpener, tickets: Tickets
) -> None:
    """Naming a ticket of the same requester (in any spelling) adds to it and reopens it if
    closed; while the first link is live no second verification mail goes, and a follow-up
    is not acknowledged."""
    async with open_backend() as store:
        first = await request(store, tickets)
        await store.set_ticket_status(first.ticket_id, "closed")
        again = await request(
            store, tickets, Address("ANN@Example.org", "Ann"), first.ticket_id, body="Still."
        )
        ticket = await store.get_ticket(first.ticket_id)
        outbox = await store.list_outbox()
    assert again == Filed(first.ticket_id, created=False, mails_queued=0)
    assert ticket is not None and ticket.status == "open"
    assert [(m.body_text, m.thread_reason) for m in ticket.messages] == [
        ("It smokes.", "new"),
        ("Still.", "references"),
    ]
    assert len(outbox) == 2  # the first request's two mails only


async def test_naming_someone_elses_ticket_opens_a_new_one(
    open_backend: StoreOpener, tickets: Tickets
) -> None:
    """A ticket number guessed or copied adds nothing to another person's ticket: the
    request opens a ticket of its own, as a stranger's reply by mail does; so does a number
    that names no ticket."""
    async with open_backend() as store:
        anns = await request(store, tickets)
        bobs = await request(store, tickets, Address("bob@example.org"), anns.ticket_id)
        nowhere = await request(store, tickets, Address("bob@example.org"), 999)
        ann_ticket = await store.get_ticket(anns.ticket_id)
        bob_ticket = await store.get_ticket(bobs.ticket_id)
    assert bobs.created and nowhere.created
    assert len({anns.ticket_id, bobs.ticket_id, nowhere.ticket_id}) == 3
    assert ann_ticket is not None and ann_ticket.message_count == 1
    assert bob_ticket is not None and bob_ticket.requester.email == "bob@example.org"


async def test_a_verified_requester_gets_only_the_acknowledgement(
    open_backend: StoreOpener, tickets: Tickets
) -> None:
    async with open_backend() as store:
        await request(store, tickets)
        assert await store.verify_requester("ann@example.org")
        second = await request(store, tickets, subject="Scanner")
        kinds = [r.item.kind for r in await store.list_outbox() if r.item.ticket_id == 2]
    assert (second.ticket_id, second.mails_queued) == (2, 1)
    assert kinds == ["ticket_created"]


async def test_requests_get_no_mail_where_automatic_mail_may_not_go(
    open_backend: StoreOpener, tickets: Tickets
) -> None:
    """An undeliverable address gets no automatic mail (and a web form cannot clear the mark:
    only authenticated mail can); our own and agents' addresses get none either; a
    web form never renames a known requester."""
    async with open_backend() as store:
        await request(store, tickets)
        await store.ingest(lambda tx: tx.set_undeliverable("ann@example.org", "5.1.1", at=NOW))
        bounced = await request(store, tickets, Address("ann@example.org", "Mallory"))
        own = await request(store, tickets, Address("support@example.com"))
        agent = await request(store, tickets, Address("sam@staff.example.com"))
        requester = await store.get_requester("ann@example.org")
    assert (bounced.mails_queued, own.mails_queued, agent.mails_queued) == (0, 0, 0)
    assert requester is not None and requester.undeliverable == "5.1.1"
    assert requester.name == "Ann"


async def test_automatic_mail_stays_within_the_rate_limit(
    open_backend: StoreOpener, tickets: Tickets, config: Config
) -> None:
    limit = config.outbound.auto_reply_limit
    async with open_backend() as store:
        await store.ingest(lambda tx: tx.create_ticket("x", ANN, at=NOW))
        assert await store.verify_requester("ann@example.org")
        queued = [(await request(store, tickets)).mails_queued for _ in range(limit + 2)]
    assert queued == [1] * limit + [0, 0]


async def test_who_may_post_on_a_ticket(open_backend: StoreOpener, tickets: Tickets) -> None:
    """The requester and the participants (compared by address key), an agent; not a
    stranger, and no one on a ticket that does not exist."""

    def work(tx: IngestTx) -> list[bool]:
        ticket = tx.create_ticket("s", Address("STRASSE@Bücher.example"), at=NOW)
        tx.add_participants(ticket, ["Ünal@example.org"])
        return [
            tickets.may_post(tx, ticket, "straße@xn--bcher-kva.example", agent=False),
            tickets.may_post(tx, ticket, "üNAL@EXAMPLE.org", agent=False),
            tickets.may_post(tx, ticket, "agent@example.com", agent=True),
            tickets.may_post(tx, ticket, "someone@example.org", agent=False),
            tickets.may_post(tx, 999, "straße@bücher.example", agent=False),
            tickets.may_post(tx, 999, "agent@example.com", agent=True),
        ]

    async with open_backend() as store:
        assert await store.ingest(work) == [True, True, True, False, False, False]


async def test_an_agent_reply_is_stored_and_mailed_with_the_participants_on_cc(
    open_backend: StoreOpener, tickets: Tickets
) -> None:
    """`mailgate reply`: the answer is the agent's message on the ticket and a mail to the
    requester, threaded under the customer's mail; participants are on Cc, but for the
    requester's other spelling, our own addresses and agents."""
    later = NOW + timedelta(minutes=5)
    async with open_backend() as store:
        filed = await request(store, tickets)
        await store.ingest(
            lambda tx: tx.add_participants(
                filed.ticket_id,
                [
                    "Ann@Example.org",
                    "carl@example.org",
                    "help@help.example.com",
                    "x@staff.example.com",
                ],
            )
        )
        outbox_id = await store.ingest(
            lambda tx: tickets.agent_reply(tx, filed.ticket_id, "Unplug it.", agent=None, at=later)
        )
        ticket = await store.get_ticket(filed.ticket_id)
        [row] = [r for r in await store.list_outbox() if r.id == outbox_id]
    assert ticket is not None
    answer = ticket.messages[-1]
    assert (answer.author, answer.thread_reason, answer.body_text) == (
        "agent",
        "agent",
        "Unplug it.",
    )
    assert answer.sender.email == "support@example.com"
    assert (row.item.kind, row.item.to, row.item.cc, row.item.automatic) == (
        "agent_reply",
        ANN,
        ("carl@example.org",),
        False,
    )
    assert row.item.message_id == answer.message_id
    assert row.item.context["body"] == "Unplug it."
    assert row.item.context["agent_email"] is None  # [agents] expose_address is off
