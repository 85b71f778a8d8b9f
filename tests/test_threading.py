"""Tickets and threading, end to end: real SMTP in, tickets read back from the store."""

from __future__ import annotations

from tests.conftest import Running, mail


async def test_new_mail_opens_ticket_with_requester(daemon: Running) -> None:
    await daemon.send(mail(sender="Ann Example <Ann@Example.ORG>", subject="Printer on fire"))
    [ticket] = await daemon.tickets()
    assert ticket.subject == "Printer on fire"
    assert ticket.status == "open"
    assert ticket.requester.email == "Ann@example.org"
    assert ticket.requester.name == "Ann Example"
    assert [m.thread_reason for m in ticket.messages] == ["new"]


async def test_reply_with_references_joins_ticket(daemon: Running) -> None:
    await daemon.send(mail(message_id="<first@client.example>"))
    await daemon.send(
        mail(
            subject="Completely different subject",
            in_reply_to="<first@client.example>",
            references="<first@client.example>",
        )
    )
    [ticket] = await daemon.tickets()
    assert [m.thread_reason for m in ticket.messages] == ["new", "references"]


async def test_subject_tag_joins_ticket(daemon: Running) -> None:
    await daemon.send(mail())
    [first] = await daemon.tickets()
    await daemon.send(mail(subject=f"AW: Re: [#{first.id}] Printer on fire"))
    [ticket] = await daemon.tickets()
    assert ticket.message_count == 2
    assert ticket.messages[1].thread_reason == "subject_tag"


async def test_stranger_quoting_tag_or_references_gets_own_ticket(daemon: Running) -> None:
    await daemon.send(mail(message_id="<victim@client.example>"))
    [victim] = await daemon.tickets()
    await daemon.send(
        mail(
            sender="Mallory <mallory@evil.example>",
            subject=f"Re: [#{victim.id}] Printer on fire",
            in_reply_to="<victim@client.example>",
        )
    )
    tickets = await daemon.tickets()
    assert len(tickets) == 2
    assert tickets[0].message_count == 1
    assert tickets[1].requester.email == "mallory@evil.example"
    assert tickets[1].messages[0].thread_reason == "new"


async def test_participant_on_cc_may_follow_up(daemon: Running) -> None:
    await daemon.send(mail(cc="Colleague <colleague@example.org>, support@example.com"))
    [ticket] = await daemon.tickets()
    await daemon.send(
        mail(sender="colleague@example.org", subject=f"Re: [#{ticket.id}] Printer on fire")
    )
    [ticket] = await daemon.tickets()
    assert ticket.message_count == 2
    assert ticket.messages[1].sender.email == "colleague@example.org"


async def test_support_address_on_cc_is_not_a_participant(daemon: Running) -> None:
    # Mail "from" a support address must not be able to hijack tickets it was cc'd on.
    await daemon.send(mail(cc="other@help.example.com"))
    [ticket] = await daemon.tickets()
    await daemon.send(mail(sender="other@help.example.com", subject=f"[#{ticket.id}] hi"))
    assert len(await daemon.tickets()) == 2


async def test_reply_reopens_closed_ticket(daemon: Running) -> None:
    await daemon.send(mail())
    [ticket] = await daemon.tickets()
    assert daemon.cli("close", str(ticket.id)).returncode == 0
    [ticket] = await daemon.tickets()
    assert ticket.status == "closed"
    await daemon.send(mail(subject=f"Re: [#{ticket.id}] thanks, but it burns again"))
    [ticket] = await daemon.tickets()
    assert ticket.status == "open"
    assert ticket.message_count == 2


async def test_same_message_twice_is_stored_once(daemon: Running) -> None:
    first = await daemon.send(mail(message_id="<twice@client.example>"))
    second = await daemon.send(mail(message_id="<twice@client.example>"))
    assert first != second  # both deliveries got their own 250
    [ticket] = await daemon.tickets()
    assert ticket.message_count == 1


async def test_same_message_id_from_another_sender_is_not_a_duplicate(daemon: Running) -> None:
    await daemon.send(mail(message_id="<clash@client.example>"))
    await daemon.send(mail(sender="other@example.net", message_id="<clash@client.example>"))
    assert len(await daemon.tickets()) == 2


async def test_reply_prefixes_are_stripped_from_ticket_subject(daemon: Running) -> None:
    for subject in (
        "Re: RE: Refund",
        "AW: Refund",
        "SV: Refund",
        "VS: Refund",
        "Antw: Refund",
        "답장: Refund",
    ):
        await daemon.send(mail(subject=subject))
    assert {t.subject for t in await daemon.tickets()} == {"Refund"}
