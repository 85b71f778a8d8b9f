"""Outgoing mail end to end: a real mailgate, a real relay on loopback, real HTTP.

Verification, acknowledgement, agent replies (CLI and by mail) and how replies to them thread.
"""

from __future__ import annotations

import asyncio
import re
import shutil
from pathlib import Path

import pytest

from mailgate.config import Config, load_config
from tests import browser
from tests.conftest import (
    REPO,
    Received,
    Relay,
    Running,
    cli_json,
    daemon_running,
    mail,
    run_cli,
    write_config,
)

VERIFY_SUBJECT = "Please confirm your email address"
ACK_SUBJECT = "We received your request"


def link_path(received: Received) -> str:
    """The path of the verification link in the mail's text part."""
    match = re.search(r"https?://[^/\s]+(/verify/[A-Za-z0-9_-]+)", received.text())
    assert match, received.text()
    return match.group(1)


def url(running: Running, path: str) -> str:
    return f"http://{running.http.host}:{running.http.port}{path}"


async def get(running: Running, path: str) -> tuple[int, str]:
    """Open a link: shows its page, uses nothing."""
    answer = await browser.fetch(url(running, path))
    return answer.status, answer.page


async def confirm(running: Running, path: str) -> tuple[int, str]:
    """Open a link and press its button (the GET's answer if it shows none)."""
    answer = await browser.confirm(url(running, path))
    return answer.status, answer.page


def verified(running: Running, email: str) -> bool:
    return bool(cli_json(running, "requesters", "show", email)["verified"])


def subjects(relay: Relay) -> list[str]:
    return [str(r.message["Subject"]) for r in relay.received]


async def test_new_requester_gets_one_verification_and_one_acknowledgement(
    relay: Relay, relay_config: Config
) -> None:
    """The first mail brings both; a follow-up brings neither, a new ticket only its ack."""
    async with daemon_running(relay_config) as running:
        await running.send(mail(sender="Ann <ann@example.org>", subject="Printer on fire"))
        first = await relay.wait_for(2)
        assert sorted(subjects(relay)) == [f"{VERIFY_SUBJECT} [#1]", f"{ACK_SUBJECT} [#1]"]
        assert all(r.rcpt_tos == ["ann@example.org"] for r in first)
        assert all(r.message["Auto-Submitted"] == "auto-replied" for r in first)

        await running.send(mail(sender="ann@example.org", subject="Re: Printer on fire [#1]"))
        await running.send(mail(sender="ann@example.org", subject="Another problem"))
        await relay.wait_for(3)
        await asyncio.sleep(1.5)  # a second verification would be due by now
        assert subjects(relay)[2:] == [f"{ACK_SUBJECT} [#2]"]

    requester = cli_json(running, "requesters", "show", "ann@example.org")
    assert requester["name"] == "Ann"
    assert requester["verified"] is False
    listed = cli_json(running, "requesters", "list")
    assert [r["email"] for r in listed] == ["ann@example.org"]


async def test_automatic_mails_quote_nothing_the_sender_wrote(
    relay: Relay, relay_config: Config
) -> None:
    """A forged From must not turn mailgate into a relay for the forger's text."""
    async with daemon_running(relay_config) as running:
        await running.send(
            mail(
                sender="Buy Pills <victim@example.org>",
                subject="CHEAP PILLS http://spam.example",
                body="Visit http://spam.example for cheap pills\n",
            )
        )
        received = await relay.wait_for(2)
    for r in received:
        raw = r.raw.decode()
        assert "spam.example" not in raw
        assert "PILLS" not in raw and "Buy Pills" not in raw


async def test_verification_link_works_once(relay: Relay, relay_config: Config) -> None:
    """The link's page asks for a click; the click verifies (200), once: the same link is
    410 afterwards, to a GET and to the form posted again. The mail no longer holds the
    token, and the HTML part carries the same link as the text."""
    async with daemon_running(relay_config) as running:
        await running.send(mail(sender="ann@example.org"))
        await relay.wait_for(2)
        [verification] = [r for r in relay.received if VERIFY_SUBJECT in r.message["Subject"]]
        path = link_path(verification)
        assert len(path.rsplit("/", 1)[1]) >= 43  # 32 random bytes, URL-safe base64
        html = verification.message.get_body(("html",))
        assert html is not None and f'href="http://127.0.0.1:8080{path}"' in html.get_content()

        status, page = await get(running, path)
        assert status == 200
        assert not verified(running, "ann@example.org")  # the GET used nothing
        done = await browser.press_button(url(running, path), page)
        assert done.status == 200
        assert "ann@example.org" in done.page
        assert verified(running, "ann@example.org")

        status, again = await get(running, path)
        assert status == 410
        assert "already been used" in again
        posted_again = await browser.press_button(url(running, path), page)
        assert posted_again.status == 410
        assert "already been used" in posted_again.page

        token = path.rsplit("/", 1)[1]
        database = running.config.storage.database.read_bytes()
        assert token.encode() not in database  # only its SHA-256 is stored


async def test_forged_token_changes_nothing(relay: Relay, relay_config: Config) -> None:
    async with daemon_running(relay_config) as running:
        await running.send(mail(sender="ann@example.org"))
        await relay.wait_for(2)
        status, page = await get(running, "/verify/" + "A" * 43)
        assert status == 404
        assert "do not know this confirmation link" in page
        status, _ = await get(running, "/verify/" + "A" * 500)
        assert status == 404
        forged = await browser.fetch(
            url(running, "/verify/" + "A" * 43),
            method="POST",
            data={"csrf": "0" * 64},
            headers=browser.SAME_ORIGIN,
        )
        assert forged.status == 403
        assert not verified(running, "ann@example.org")


async def test_expired_token_changes_nothing_and_a_new_one_follows(
    relay: Relay, tmp_path: Path
) -> None:
    """After `[verification] ttl` the link is 410; the next mail brings a fresh link."""
    path = write_config(tmp_path, relay_port=relay.port)
    path.write_text(path.read_text() + "\n[verification]\nttl = 1\n")
    async with daemon_running(load_config(path)) as running:
        await running.send(mail(sender="ann@example.org"))
        await relay.wait_for(2)
        [first] = [r for r in relay.received if VERIFY_SUBJECT in r.message["Subject"]]
        await asyncio.sleep(1.2)
        status, page = await get(running, link_path(first))
        assert status == 410
        assert "expired" in page
        assert not verified(running, "ann@example.org")

        await running.send(mail(sender="ann@example.org", subject="Still broken [#1]"))
        await relay.wait_for(3)
        second = relay.received[2]
        assert VERIFY_SUBJECT in second.message["Subject"]
        status, _ = await confirm(running, link_path(second))
        assert status == 200
        assert verified(running, "ann@example.org")


async def test_verified_requester_gets_no_more_verification(
    relay: Relay, relay_config: Config
) -> None:
    """`requesters verify` (an agent's check) ends verification mails for that address."""
    async with daemon_running(relay_config) as running:
        await running.send(mail(sender="ann@example.org"))
        await relay.wait_for(2)
        result = running.cli("requesters", "verify", "ANN@example.org")
        assert result.returncode == 0, result.stderr
        assert verified(running, "ann@example.org")
        missing = running.cli("requesters", "verify", "nobody@example.org")
        assert missing.returncode == 1
        assert "no requester nobody@example.org" in missing.stderr


def reply(running: Running, ticket_id: int, body: str, tmp_path: Path) -> None:
    body_file = tmp_path / f"reply-{ticket_id}.txt"
    body_file.write_text(body, encoding="utf-8")
    result = running.cli("reply", str(ticket_id), "--body-file", str(body_file))
    assert result.returncode == 0, result.stderr


async def test_reply_threads_and_the_answer_joins_the_ticket(
    relay: Relay, relay_config: Config, tmp_path: Path
) -> None:
    """The agent's reply carries tag, In-Reply-To and an HMAC Message-ID; the customer's
    answer to it joins the ticket even with the subject edited and no tag."""
    async with daemon_running(relay_config) as running:
        await running.send(mail(sender="ann@example.org", message_id="<q1@client.example>"))
        await relay.wait_for(2)
        reply(running, 1, "Please unplug it.\n", tmp_path)
        [*_, answer] = await relay.wait_for(3)
        msg = answer.message
        assert msg["Subject"] == "Re: Printer on fire [#1]"
        assert msg["In-Reply-To"] == "<q1@client.example>"
        assert "<q1@client.example>" in msg["References"]
        assert re.fullmatch(r"<mg-1-[0-9a-f]{12}-[0-9a-f]{24}@mailgate\.test>", msg["Message-ID"])
        assert "Auto-Submitted" not in msg
        assert "Please unplug it." in answer.text()
        assert answer.rcpt_tos == ["ann@example.org"]

        await running.send(
            mail(
                sender="ann@example.org",
                subject="it is still smoking",
                in_reply_to=msg["Message-ID"],
                references=msg["Message-ID"],
            )
        )
        [ticket] = await running.tickets()
    assert [m.author for m in ticket.messages] == ["customer", "agent", "customer"]
    assert ticket.messages[-1].thread_reason == "references"


async def test_forged_message_id_does_not_join(relay: Relay, relay_config: Config) -> None:
    """A stranger's reference to a made-up mailgate Message-ID opens a new ticket."""
    async with daemon_running(relay_config) as running:
        await running.send(mail(sender="ann@example.org"))
        [first, *_] = await relay.wait_for(2)
        real = str(first.message["Message-ID"]).strip("<>")
        forged = re.sub(r"-[0-9a-f]{24}@", "-" + "0" * 24 + "@", real)
        await running.send(mail(sender="ann@example.org", subject="x", in_reply_to=f"<{forged}>"))
        # Ann may post to ticket 1, so only the HMAC stands between the forgery and the ticket.
        tickets = await running.tickets()
    assert [t.id for t in tickets] == [1, 2]


async def test_agent_answers_by_mail(relay: Relay, relay_config: Config) -> None:
    """An agent's mail on a ticket is relayed to the requester without exposing the agent;
    participants get it on Cc; it does not reopen the ticket or go back to the agent."""
    async with daemon_running(relay_config) as running:
        await running.send(
            mail(sender="ann@example.org", cc="Bob <bob@example.net>", message_id="<q@c.example>")
        )
        await relay.wait_for(2)
        await running.send(
            mail(
                sender="Agent Smith <smith@staff.example.com>",
                subject="Re: Printer on fire [#1]",
                body="Unplug it, then call us.\n",
                in_reply_to="<q@c.example>",
            ),
            sender="smith@staff.example.com",
        )
        [*_, relayed] = await relay.wait_for(3)
        [ticket] = await running.tickets()
    assert [m.author for m in ticket.messages] == ["customer", "agent"]
    assert relayed.rcpt_tos == ["ann@example.org", "bob@example.net"]
    assert relayed.message["Cc"] == "bob@example.net"
    assert "Unplug it, then call us." in relayed.text()
    assert "smith" not in relayed.raw.decode().lower()
    assert relayed.message["From"] == "support@example.com"


async def test_stranger_cannot_post_as_agent_reply(relay: Relay, relay_config: Config) -> None:
    """Only listed agents are relayed; anyone else's mail with the tag is a new ticket."""
    async with daemon_running(relay_config) as running:
        await running.send(mail(sender="ann@example.org"))
        await relay.wait_for(2)
        await running.send(
            mail(sender="mallory@evil.example", subject="Re: Printer on fire [#1]"),
            sender="mallory@evil.example",
        )
        tickets = await running.tickets()
        await relay.wait_for(4)  # mallory's own verification and acknowledgement
    assert [t.requester.email for t in tickets] == ["ann@example.org", "mallory@evil.example"]
    assert {tuple(r.rcpt_tos) for r in relay.received[2:]} == {("mallory@evil.example",)}


async def test_customer_text_is_escaped_in_html_mail(
    relay: Relay, relay_config: Config, tmp_path: Path
) -> None:
    """Names, subjects and bodies reach templates as data: escaped in HTML, `{{ }}` literal."""
    async with daemon_running(relay_config) as running:
        await running.send(
            mail(sender='"<script>x</script>" <ann@example.org>', subject="{{ 7*7 }} <b>hi</b>")
        )
        await relay.wait_for(2)
        reply(running, 1, "<img src=x onerror=alert(1)> {{ 7*7 }}\n", tmp_path)
        [*_, answer] = await relay.wait_for(3)
    html = answer.message.get_body(("html",))
    assert html is not None
    content = str(html.get_content())
    assert "<script>" not in content and "&lt;script&gt;" in content
    assert "<img" not in content and "&lt;img" in content
    assert "{{ 7*7 }}" in content and "49" not in content
    assert answer.message["Subject"] == "Re: {{ 7*7 }} <b>hi</b> [#1]"


@pytest.mark.parametrize(
    ("template", "source", "line"),
    [
        ("mail/ticket_created.html", "<p>ok</p>\n<p>{{ ticket_id </p>\n", 2),
        ("mail/verification.txt", "Hello\n\n{{ no_such_variable }}\n", 3),
        ("page/verified.html", "{% for x in %}\n", 1),
    ],
)
def test_check_config_reports_template_errors(
    tmp_path: Path, template: str, source: str, line: int
) -> None:
    """A broken template fails check-config (exit 78) and serve, naming file and line."""
    templates = tmp_path / "templates"
    shutil.copytree(REPO / "templates", templates)
    (templates / template).write_text(source)
    path = write_config(tmp_path, templates=templates)
    for command in ("check-config", "serve"):
        result = run_cli("--config", str(path), command)
        assert result.returncode == 78, result.stderr
        assert f"{templates / template}:{line}:" in result.stderr


async def test_head_and_health(relay: Relay, relay_config: Config) -> None:
    """A link checker's HEAD is answered as the GET, without its page, and uses nothing;
    /healthz answers; the privacy confirmation route, not configured, knows no token."""
    async with daemon_running(relay_config) as running:
        await running.send(mail(sender="ann@example.org"))
        await relay.wait_for(2)
        [verification] = [r for r in relay.received if VERIFY_SUBJECT in r.message["Subject"]]
        link = url(running, link_path(verification))
        head = await browser.fetch(link, method="HEAD")
        assert (head.status, head.page) == (200, "")
        unknown = await browser.fetch(url(running, "/verify/" + "A" * 43), method="HEAD")
        assert (unknown.status, unknown.page) == (404, "")
        health = await browser.fetch(url(running, "/healthz"))
        assert health.status == 200
        for method in ("GET", "POST"):
            privacy = await browser.fetch(url(running, "/privacy/confirm/x"), method=method)
            assert privacy.status == 404
            assert "do not know this confirmation link" in privacy.page
        assert not verified(running, "ann@example.org")
        status, _ = await confirm(running, link_path(verification))
        assert status == 200
        assert verified(running, "ann@example.org")


async def test_acknowledgement_can_be_switched_off(relay: Relay, tmp_path: Path) -> None:
    path = write_config(tmp_path, relay_port=relay.port, outbound_extra="acknowledge = false\n")
    async with daemon_running(load_config(path)) as running:
        await running.send(mail(sender="ann@example.org"))
        await relay.wait_for(1)
        await asyncio.sleep(1)
    assert subjects(relay) == [f"{VERIFY_SUBJECT} [#1]"]


async def test_agent_shown_when_configured(relay: Relay, tmp_path: Path) -> None:
    """With `agents.expose_address`, the relayed answer names the agent."""
    path = write_config(tmp_path, relay_port=relay.port)
    path.write_text(
        path.read_text().replace(
            '"@staff.example.com"]', '"@staff.example.com"]\nexpose_address = true'
        )
    )
    async with daemon_running(load_config(path)) as running:
        await running.send(mail(sender="ann@example.org"))
        await relay.wait_for(2)
        await running.send(
            mail(sender="Agent Smith <smith@staff.example.com>", subject="Re: [#1]", body="Hi\n"),
            sender="smith@staff.example.com",
        )
        [*_, relayed] = await relay.wait_for(3)
    assert "Agent Smith <smith@staff.example.com>, Support" in relayed.text()


async def test_a_subject_cut_to_the_limit_keeps_its_tag(
    relay: Relay, relay_config: Config, tmp_path: Path
) -> None:
    """A subject over the limit is cut before the tag, never through it: the answer to
    `Re: <long subject> [#1]` still names ticket 1, and a reply that keeps only the subject
    (no References) joins the ticket by its tag."""
    long_subject = "Printer " + "very " * 80 + "hot"
    async with daemon_running(relay_config) as running:
        await running.send(mail(sender="ann@example.org", subject=long_subject))
        await relay.wait_for(2)
        reply(running, 1, "Please unplug it.\n", tmp_path)
        received = await relay.wait_for(3)
        shown = [" ".join(str(r.message["Subject"]).split()) for r in received]
        await running.send(mail(sender="ann@example.org", subject=shown[2]))
        [ticket] = await running.tickets()
    for subject in shown:
        assert subject.endswith(" [#1]") and len(subject) <= 200, subject
    assert shown[2].startswith("Re: Printer very very")
    assert shown[2].endswith("... [#1]")
    assert [m.thread_reason for m in ticket.messages] == ["new", "agent", "subject_tag"]
