"""Privacy requests by mail, end to end: mail to `[privacy] address` over SMTP to a real
daemon, the confirmation mail caught by a real relay on loopback, its link opened and its
button pressed over HTTP as a browser does (tests/browser.py), the outcome read back from the
command line, the relay, and the raw bytes of the files under the data directory.

Each right: export (a mail with the zip attached, its document valid against the schema),
erasure (nothing of the person left, a farewell mail that names nothing but the address),
restriction and objection (no automatic mail after). And the attacks: a forged From (the
owner gets the link, the forger nothing), a prefetching scanner (GET and HEAD use nothing),
a link used twice, an expired link, a link refused by the relay, a privacy link on the
verification route; and what is not a request (another subject, a reply, automatic mail).
"""

from __future__ import annotations

import asyncio
import json
import re
import sqlite3
import time
import zipfile
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from io import BytesIO
from pathlib import Path

import jsonschema
import pytest

from mailgate.config import Config, load_config
from mailgate.confirm import CsrfKey
from mailgate.model import Address, OutboxItem
from mailgate.msgid import daemon_secret
from mailgate.privacy import erasure
from mailgate.privacy.tokens import token_hash
from mailgate.store import store_for
from mailgate.tickets import privacy_action
from tests import browser
from tests.conftest import (
    Received,
    Relay,
    Running,
    cli_json,
    daemon_running,
    mail,
    open_test_store,
    run_cli,
    write_config,
)
from tests.dns_stub import shared_dns_stub
from tests.test_outbound import ACK_SUBJECT, VERIFY_SUBJECT, url
from tests.test_rights import (
    EMAIL,
    NAME,
    PDF,
    SCHEMA,
    blob_files,
    latin1_mail,
    needles,
    no_requester,
    outbox_of,
    plaintext_in,
    utf8_mail,
)

PRIVACY = "privacy@example.com"
CONFIRM_SUBJECT = "Please confirm your privacy request"
ERASED_SUBJECT = "Your data was erased"
_LINK = re.compile(r"https?://[^/\s]+(/privacy/confirm/([A-Za-z0-9_-]{43}))")


def privacy_config(tmp_path: Path, relay: Relay, extra: str = "") -> Config:
    path = write_config(tmp_path, relay_port=relay.port)
    path.write_text(path.read_text() + f'\n[privacy]\naddress = "{PRIVACY}"\n{extra}\n')
    return load_config(path)


@pytest.fixture
def config(tmp_path: Path, relay: Relay) -> Config:
    return privacy_config(tmp_path, relay)


async def ask(
    running: Running,
    subject: str,
    *,
    sender: str = "ann@example.org",
    envelope: str | None = None,
    **headers: str,
) -> None:
    """Mail the privacy address (as the envelope recipient, as an MTA delivers it)."""
    message = mail(sender=sender, to=PRIVACY, subject=subject)
    for name, value in headers.items():
        message[name.replace("_", "-")] = value
    address = re.sub(r".*<|>.*", "", sender)
    await running.send(message, sender=envelope or address, recipients=(PRIVACY,))


def link(received: Received) -> str:
    """The path of the privacy link in a confirmation mail's text."""
    match = _LINK.search(received.text())
    assert match, received.text()
    return match.group(1)


async def confirmation(relay: Relay, count: int, to: str = "ann@example.org") -> Received:
    """The `count`th mail at the relay, which must be a confirmation mail to `to`."""
    *_, last = await relay.wait_for(count)
    assert len(relay.received) == count, relay.kinds()
    assert str(last.message["Subject"]).startswith(CONFIRM_SUBJECT), last.message["Subject"]
    assert last.rcpt_tos == [to]
    return last


async def eventually(check: Callable[[], bool], within: float = 15) -> None:
    deadline = time.monotonic() + within
    while not check():
        assert time.monotonic() < deadline, "not within the time given"
        await asyncio.sleep(0.05)


def audit_actions(running: Running, email: str) -> list[tuple[str, str]]:
    records = cli_json(running, "audit", "list", "--subject", email)
    return [(r["action"], r["via"]) for r in records]


def state_of(running: Running, email: str) -> str:
    return str(cli_json(running, "requesters", "show", email)["state"])


# -- which mail is a request -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("subject", "action"),
    [
        ("access", "export"),
        ("Export my data, please", "export"),
        ("ERASE", "erase"),
        ("Delete: everything", "erase"),
        ("restrict processing", "restrict"),
        ("Object!", "object"),
        ("  \uff45\uff52\uff41\uff53\uff45 (full width)", "erase"),
        ("열람", "export"),
        ("삭제 요청합니다", "erase"),
        ("삭제요청", "erase"),
        ("처리정지 요청", "restrict"),
        ("Re: erase", None),
        ("Fwd: delete", None),
        ("[#12] erase", None),
        ("accessibility of your site", None),
        ("erasers", None),
        ("Please erase my data", None),
        ("erase요청", None),
        ("개인정보 삭제", None),
        ("", None),
    ],
)
def test_the_first_word_asks(subject: str, action: str | None) -> None:
    assert privacy_action(subject) == action


def test_check_config_names_the_privacy_address_and_refuses_an_agents(
    tmp_path: Path, relay: Relay
) -> None:
    """The address is accepted by SMTP without being in `smtp.accept` (every test here
    mails it); an agent's address or no address at all is a config error (exit 78)."""
    good = privacy_config(tmp_path / "good", relay)
    shown = run_cli("--config", str(good.path), "check-config")
    assert shown.returncode == 0, shown.stderr
    assert f"privacy: requests by mail to {PRIVACY}" in shown.stdout
    assert good.smtp.accepts(PRIVACY) and good.privacy.is_address("Privacy@Example.com")
    for wrong in ("agent@example.com", "not an address"):
        path = write_config(tmp_path / wrong.replace(" ", "-"), relay_port=relay.port)
        path.write_text(path.read_text() + f'\n[privacy]\naddress = "{wrong}"\n')
        refused = run_cli("--config", str(path), "check-config")
        assert refused.returncode == 78 and "privacy.address" in refused.stderr, refused.stderr


async def test_other_mail_to_the_privacy_address_is_a_normal_ticket(
    relay: Relay, config: Config
) -> None:
    """Another subject, a reply to the confirmation mail and an automatic mail are no
    requests: the first is a ticket as any (verification, acknowledgement), the reply joins
    the request's ticket, the automatic one gets nothing."""
    async with daemon_running(config) as running:
        await ask(running, "A question about your privacy policy")
        await relay.wait_for(2)
        assert sorted(str(r.message["Subject"]).split(" [")[0] for r in relay.received) == [
            VERIFY_SUBJECT,
            ACK_SUBJECT,
        ]
        [ticket] = cli_json(running, "tickets", "list")
        assert "privacy_request" not in ticket["flags"]

        await ask(running, "erase")
        sent = await confirmation(relay, 3)
        answer = mail(
            sender="ann@example.org",
            subject=f"Re: {sent.message['Subject']}",
            in_reply_to=sent.message["Message-ID"],
        )
        await running.send(answer)
        await ask(running, "erase", Auto_Submitted="auto-replied")
        await ask(running, "Re: erase")
        tickets = await running.tickets()
        request = next(t for t in tickets if "privacy_request" in t.flags)
        assert request.message_count == 2  # the reply joined it, asking nothing new
        assert [t.flags for t in tickets].count(("privacy_request",)) == 1
        assert len(tickets) == 4  # the question, the request, the automatic mail, "Re: erase"
        auto = next(t for t in tickets if t.id not in (ticket["id"], request.id) and
                    outbox_of(running, t.id) == [])  # fmt: skip
        assert auto.subject == "erase"
        assert state_of(running, "ann@example.org") == "active"
        assert len(relay.received) == 3 + 1  # an acknowledgement of "Re: erase" only


# -- export ----------------------------------------------------------------------------------


async def test_export_by_mail(relay: Relay, config: Config) -> None:
    """request -> confirmation mail -> the page shows a button and does nothing -> the press
    mails the export, attached; the link is then used (410)."""
    async with daemon_running(config) as running:
        first = mail(sender="Ann Example <ann@example.org>", subject="Invoice attached")
        first.add_attachment(PDF, maintype="application", subtype="pdf", filename="invoice.pdf")
        await running.send(first)
        await relay.wait_for(2)
        assert len(blob_files(config)) == 1

        await ask(running, "Export", sender="Ann Example <ann@example.org>")
        sent = await confirmation(relay, 3)
        assert sent.message["Auto-Submitted"] == "auto-replied"
        assert str(sent.message["To"]) == "ann@example.org"  # the bare address
        path = link(sent)
        assert "a copy of all the data we hold about you" in sent.text()

        for method in ("GET", "HEAD", "GET"):
            shown = await browser.fetch(url(running, path), method=method)
            assert shown.status == 200
        page = (await browser.fetch(url(running, path))).page
        assert "copy of all the data" in page
        assert "ann@example.org" not in page and "Ann Example" not in page  # nothing of hers
        assert "Invoice" not in page
        assert audit_actions(running, "ann@example.org") == []  # the GETs did nothing
        assert len(relay.received) == 3

        done = await browser.press_button(url(running, path), page)
        assert done.status == 200, done.page
        assert "on its way to you by mail" in done.page
        *_, exported = await relay.wait_for(4)
        assert exported.rcpt_tos == ["ann@example.org"]
        assert str(exported.message["Subject"]).startswith("Your data, as you asked [#")
        assert exported.message["Auto-Submitted"] == "auto-replied"
        [attachment] = list(exported.message.iter_attachments())
        assert attachment.get_content_type() == "application/zip"
        assert attachment.get_filename() == "mailgate-export.zip"
        with zipfile.ZipFile(BytesIO(attachment.get_content())) as archive:
            doc = json.loads(archive.read("export.json"))
            jsonschema.validate(doc, SCHEMA)
            assert doc["requester"]["email"] == "ann@example.org"
            subjects = sorted(t["subject"] for t in doc["tickets"])
            assert subjects == ["Export", "Invoice attached"]
            invoice = next(t for t in doc["tickets"] if t["subject"] == "Invoice attached")
            [pdf] = invoice["messages"][0]["attachments"]
            assert archive.read(pdf["path"]) == PDF
            kinds = {o["kind"] for o in doc["outgoing"]}
            assert "privacy_confirm" in kinds
            requests = [(r["action"], r["via"]) for r in doc["processing"]["requests"]]
            assert requests == [("request", "link")]

        # The zip is kept sealed only until its mail is sent.
        await eventually(lambda: len(blob_files(config)) == 1)
        [row] = [r for r in cli_json(running, "outbox", "list") if r["kind"] == "privacy_export"]
        assert row["state"] == "sent"
        assert audit_actions(running, "ann@example.org") == [
            ("request", "link"),
            ("export", "mail"),
        ]

        again = await browser.press_button(url(running, path), page)  # the same form again
        assert again.status == 410
        gone = await browser.fetch(url(running, path))
        assert gone.status == 410 and "already been used" in gone.page
        assert len(relay.received) == 4


async def test_an_export_too_large_to_mail_says_so(relay: Relay, tmp_path: Path) -> None:
    config = privacy_config(tmp_path, relay, "max_export_size = 200")
    async with daemon_running(config) as running:
        await ask(running, "access")
        done = await browser.confirm(url(running, link(await confirmation(relay, 1))))
        assert done.status == 200 and "too large to send by mail" in done.page
        *_, answer = await relay.wait_for(2)
        assert str(answer.message["Subject"]).startswith("Your data: too large to mail [#")
        assert list(answer.message.iter_attachments()) == []
        assert "Reply to this mail" in answer.text()
        assert blob_files(config) == []
        assert audit_actions(running, "ann@example.org") == [
            ("request", "link"),
            ("export", "mail"),
        ]


async def test_an_export_that_cannot_be_made_gives_the_link_back(
    relay: Relay, config: Config
) -> None:
    """The attachments' folder cannot take the zip (here: a file stands in its place): the
    press answers 503, the link is live again, and pressing later mails the export."""
    async with daemon_running(config) as running:
        await ask(running, "export")
        path = link(await confirmation(relay, 1))
        page = (await browser.fetch(url(running, path))).page
        folder = config.storage.attachments
        folder.rmdir()
        folder.write_bytes(b"not a folder")
        failed = await browser.press_button(url(running, path), page)
        assert failed.status == 503 and "try again" in failed.page
        assert (await browser.fetch(url(running, path))).status == 200  # live again
        folder.unlink()
        folder.mkdir()
        done = await browser.press_button(url(running, path), page)
        assert done.status == 200 and "on its way to you by mail" in done.page
        *_, exported = await relay.wait_for(2)
        assert len(list(exported.message.iter_attachments())) == 1


async def test_an_export_confirmed_before_a_crash_is_mailed_at_start(
    relay: Relay, config: Config
) -> None:
    """The confirmation committed, the export not yet queued (the process died between):
    the next start mails it."""
    async with daemon_running(config) as running:
        await ask(running, "export")
        path = link(await confirmation(relay, 1))
    token = path.rsplit("/", 1)[1]
    async with store_for(config) as store:
        claim = await store.privacy(
            lambda tx: tx.confirm_request(token_hash(token), at=datetime.now(UTC))
        )
    assert not isinstance(claim, str) and claim.action == "export"
    async with daemon_running(config) as running:
        *_, exported = await relay.wait_for(2)
        assert [a.get_filename() for a in exported.message.iter_attachments()] == [
            "mailgate-export.zip"
        ]
        assert (await browser.fetch(url(running, path))).status == 410


# -- erasure ---------------------------------------------------------------------------------


async def test_erasure_by_mail(relay: Relay, config: Config) -> None:
    """Erasure confirmed by its link: no requester, a farewell that names nothing but the
    address, and nothing of the person in any file under the data directory."""
    data = config.storage.database.parent
    async with daemon_running(config) as running:
        await running.send(latin1_mail(), sender=EMAIL)
        await running.send(utf8_mail(), sender=EMAIL)
        await relay.wait_for(3)  # verification, two acknowledgements
        await ask(running, "삭제 요청합니다", sender=f"{NAME} <{EMAIL}>")  # Korean: "deletion"
        sent = await confirmation(relay, 4, to=EMAIL)
        assert "the erasure of all the data we hold about you" in sent.text()
        path = link(sent)
        page = (await browser.fetch(url(running, path))).page
        assert "erased at once" in page and NAME not in page and EMAIL not in page

        done = await browser.press_button(url(running, path), page)
        assert done.status == 200, done.page
        assert "Your data was erased" in done.page
        *_, farewell = await relay.wait_for(5)
        assert farewell.rcpt_tos == [EMAIL]
        message = farewell.message
        assert str(message["Subject"]) == ERASED_SUBJECT  # no ticket, no tag
        assert message["In-Reply-To"] is None and message["References"] is None
        assert str(message["To"]) == EMAIL
        raw = farewell.raw.decode("utf-8", "replace")
        assert "Müller" not in raw and "Kundenkonto" not in raw and "März" not in raw

        no_requester(running.cli("requesters", "show", EMAIL), EMAIL)
        assert cli_json(running, "tickets", "list") == []
        [erase] = [r for r in cli_json(running, "audit", "list") if r["action"] == "erase"]
        assert (erase["via"], erase["reason"]) == ("mail", "request")
        assert erase["counts"]["tickets"] == 3 and erase["counts"]["files"] == 2
        assert audit_actions(running, EMAIL) == [("request", "link"), ("erase", "mail")]

        # The farewell's row and its one-off key go once it is sent.
        await eventually(lambda: cli_json(running, "outbox", "list") == [])
        assert blob_files(config) == []
        assert plaintext_in(data, needles()) == []
        keystore = config.security.keystore
        with sqlite3.connect(keystore) as db:
            destroyed = db.execute("SELECT count(*) FROM destroyed").fetchone()[0]
        assert destroyed == 2  # the person's data key and the farewell's own key
        assert (await browser.fetch(url(running, path))).status == 404  # gone with them


async def test_a_prefetched_link_acts_on_nothing(relay: Relay, config: Config) -> None:
    """A link scanner GETs and HEADs the link, again and again: nothing is erased, no mail
    goes, the link stays live for its owner."""
    async with daemon_running(config) as running:
        await ask(running, "delete")
        path = link(await confirmation(relay, 1))
        for method in ("HEAD", "GET", "GET", "HEAD"):
            assert (await browser.fetch(url(running, path), method=method)).status == 200
        assert state_of(running, "ann@example.org") == "active"
        assert len(cli_json(running, "tickets", "list")) == 1
        assert audit_actions(running, "ann@example.org") == []
        async with store_for(config) as store:
            assert await store.peek_privacy(token_hash(path.rsplit("/", 1)[1])) == (
                "live",
                "erase",
            )
        assert len(relay.received) == 1


# -- restriction and objection ---------------------------------------------------------------


async def test_restriction_and_objection_by_mail(relay: Relay, config: Config) -> None:
    async with daemon_running(config) as running:
        await running.send(mail(sender="Cleo <cleo@example.org>", subject="First"))
        await relay.wait_for(2)
        await ask(running, "처리정지 요청", sender="cleo@example.org")  # Korean: "suspension"
        path = link(await confirmation(relay, 3, to="cleo@example.org"))
        page = (await browser.fetch(url(running, path))).page
        assert "restrict the processing" in page
        assert state_of(running, "cleo@example.org") == "active"  # the GET did nothing

        done = await browser.press_button(url(running, path), page)
        assert done.status == 200 and "is restricted" in done.page
        *_, answer = await relay.wait_for(4)
        assert str(answer.message["Subject"]).startswith("Processing of your data is restricted")
        assert answer.rcpt_tos == ["cleo@example.org"]
        assert state_of(running, "cleo@example.org") == "restricted"
        assert audit_actions(running, "cleo@example.org") == [
            ("request", "link"),
            ("restrict", "mail"),
        ]

        # Restricted: the next mail is kept and gets no acknowledgement.
        await running.send(mail(sender="cleo@example.org", subject="Second, restricted"))
        tickets = await running.tickets()
        second = next(t for t in tickets if t.subject == "Second, restricted")
        assert outbox_of(running, second.id) == []
        assert len(relay.received) == 4

        # Her rights stay hers: a restricted person still gets a request's link.
        await ask(running, "object", sender="cleo@example.org")
        objected = await browser.confirm(
            url(running, link(await confirmation(relay, 5, to="cleo@example.org")))
        )
        assert objected.status == 200 and "objection is recorded" in objected.page
        *_, answer = await relay.wait_for(6)
        assert str(answer.message["Subject"]).startswith("Your objection is recorded")
        shown = cli_json(running, "requesters", "show", "cleo@example.org")
        assert (shown["state"], shown["objected"]) == ("restricted", True)
        assert ("object", "mail") in audit_actions(running, "cleo@example.org")


# -- attacks ---------------------------------------------------------------------------------


async def test_a_forged_from_gets_the_owner_the_link_and_the_forger_nothing(
    relay: Relay, config: Config
) -> None:
    """Mallory writes as the victim, whose domain publishes DMARC p=reject, so the mail
    fails authentication; Reply-To and the envelope name Mallory. The link goes to the
    victim's From address only: the mail proves nothing, the link is the proof."""
    stub, _port = shared_dns_stub()
    if ("_dmarc.strict.example", "TXT") not in stub.records:
        stub.txt("_dmarc.strict.example", "v=DMARC1; p=reject")
    victim, mallory = "victim@strict.example", "mallory@evil.example"
    async with daemon_running(config) as running:
        await ask(running, "erase", sender=f"Victim <{victim}>", envelope=mallory,
                  Reply_To=mallory)  # fmt: skip
        sent = await confirmation(relay, 1, to=victim)
        assert str(sent.message["To"]) == victim
        assert mallory not in sent.raw.decode()
        [ticket] = await running.tickets()
        assert set(ticket.flags) == {"unverified_sender", "privacy_request"}
        assert state_of(running, victim) == "active"  # nothing done without the link
        assert audit_actions(running, victim) == []
        assert all(r.rcpt_tos == [victim] for r in relay.received)


async def test_a_link_works_once_and_not_when_expired(relay: Relay, tmp_path: Path) -> None:
    """A link past `[privacy] ttl` (0 here: expired as it is made) is 410 to a GET and to a
    POST with the right CSRF value; nothing is done."""
    config = privacy_config(tmp_path, relay, "ttl = 0")
    async with daemon_running(config) as running:
        await ask(running, "erase")
        path = link(await confirmation(relay, 1))
        shown = await browser.fetch(url(running, path))
        assert shown.status == 410 and "expired" in shown.page
        csrf = CsrfKey(daemon_secret(config)).value("privacy", token_hash(path.rsplit("/")[-1]))
        posted = await browser.fetch(
            url(running, path), method="POST", data={"csrf": csrf}, headers=browser.SAME_ORIGIN
        )
        assert posted.status == 410
        assert state_of(running, "ann@example.org") == "active"
        assert audit_actions(running, "ann@example.org") == []


async def test_a_newer_request_revokes_the_older_link(relay: Relay, config: Config) -> None:
    async with daemon_running(config) as running:
        await ask(running, "erase")
        older = link(await confirmation(relay, 1))
        await ask(running, "erase")
        newer = link(await confirmation(relay, 2))
        shown = await browser.fetch(url(running, older))
        assert shown.status == 410 and "withdrawn" in shown.page
        assert (await browser.fetch(url(running, newer))).status == 200


async def test_a_link_the_relay_refused_is_revoked(relay: Relay, config: Config) -> None:
    relay.refuse["bea@example.org"] = "550 5.1.1 No such user"
    async with daemon_running(config) as running:
        await ask(running, "erase", sender="bea@example.org")
        await running.settle()

        def revoked() -> bool:
            with sqlite3.connect(config.storage.database) as db:
                row = db.execute("SELECT revoked_at FROM privacy_requests").fetchone()
            return row is not None and row[0] is not None

        await eventually(revoked)
        assert state_of(running, "bea@example.org") == "active"


async def test_a_privacy_link_on_the_verification_route_does_nothing(
    relay: Relay, config: Config
) -> None:
    """Another purpose: the verification route does not know the token, and the privacy
    page's CSRF value does not pass there."""
    async with daemon_running(config) as running:
        await ask(running, "erase")
        path = link(await confirmation(relay, 1))
        token = path.rsplit("/", 1)[1]
        page = (await browser.fetch(url(running, path))).page
        csrf = browser.the_form(page).fields["csrf"]
        assert (await browser.fetch(url(running, f"/verify/{token}"))).status == 404
        posted = await browser.fetch(
            url(running, f"/verify/{token}"),
            method="POST",
            data={"csrf": csrf},
            headers=browser.SAME_ORIGIN,
        )
        assert posted.status == 403
        assert cli_json(running, "requesters", "show", "ann@example.org")["verified"] is False
        assert (await browser.fetch(url(running, path))).status == 200  # still live


async def test_without_a_privacy_address_nothing_is_a_request(
    relay: Relay, relay_config: Config
) -> None:
    """The default: no `[privacy] address`, the route knows no link, an "erase" subject to
    support is a ticket like any other."""
    async with daemon_running(relay_config) as running:
        await running.send(mail(subject="erase"))
        await relay.wait_for(2)
        [ticket] = cli_json(running, "tickets", "list")
        assert ticket["flags"] == []
        assert (await browser.fetch(url(running, "/privacy/confirm/" + "A" * 43))).status == 404


# -- the farewell in the store ---------------------------------------------------------------


def farewell(to: str) -> OutboxItem:
    return OutboxItem("privacy_erased", None, Address(to), f"mg-system-{to}", True, {})


async def test_a_farewell_goes_once_its_person_is_gone_and_its_key_with_it(
    tmp_path: Path,
) -> None:
    now = datetime.now(UTC)
    async with open_test_store(tmp_path / "mailgate.db") as store:
        await store.ingest(lambda tx: tx.create_ticket("erase", Address(EMAIL), at=now))
        await store.ingest(lambda tx: tx.enqueue(farewell(EMAIL), at=now, held_for=EMAIL))
        assert await store.claim_outbox(limit=10) == []  # held: the person is there
        person = await store.begin_erasure(EMAIL)
        assert person is not None
        await erasure.finish(store, person, tmp_path / "attachments")
        [row] = await store.claim_outbox(limit=10)  # the person is gone: it is due
        assert (row.item.to.email, row.item.ticket_id) == (EMAIL, None)
        destroyed = store.keys.destroyed()
        await store.finish_outbox(row.id, "sent", error=None, retry_at=None)
        assert len(store.keys.destroyed() - destroyed) == 1  # its own key
        assert await store.list_outbox() == []
        assert await store.get_requester(EMAIL) is None  # sending made no person of it


async def test_a_system_row_whose_key_is_gone_is_dropped_not_sent(tmp_path: Path) -> None:
    """A crash between destroying a farewell's key and deleting its row (or an old copy of
    the database restored): the row is ciphertext without a key, dropped at the claim."""
    now = datetime.now(UTC)
    database = tmp_path / "mailgate.db"
    async with open_test_store(database) as store:
        await store.ingest(lambda tx: tx.enqueue(farewell(EMAIL), at=now))
        with sqlite3.connect(database) as db:
            [(seal_key,)] = db.execute("SELECT seal_key FROM outbox").fetchall()
        store.keys.destroy([seal_key])
        assert await store.claim_outbox(limit=10) == []
        assert await store.list_outbox() == []


# -- retention -------------------------------------------------------------------------------


async def test_a_used_link_goes_with_the_identification_records(
    relay: Relay, tmp_path: Path
) -> None:
    """A privacy request's link is an identification record: once confirmed (or expired, or
    revoked) it is kept `[retention] identification`, then purged; a live one is kept."""
    config = privacy_config(
        tmp_path, relay, 'ttl = 31536000\n[retention]\nidentification = "180d"'
    )  # links live a year: the second is still live when the first is due
    async with daemon_running(config) as running:
        await ask(running, "restrict")
        used = link(await confirmation(relay, 1))
        assert (await browser.confirm(url(running, used))).status == 200
        await ask(running, "export")
        await confirmation(relay, 3)  # the restriction's answer came between

    def requests() -> list[tuple[object, ...]]:
        with sqlite3.connect(config.storage.database) as db:
            return db.execute(
                "SELECT action, created_at FROM privacy_requests ORDER BY id"
            ).fetchall()

    [(_, made), (_, live_made)] = requests()
    later = datetime.fromtimestamp(float(str(live_made)), UTC) + timedelta(days=181)
    result = run_cli(
        "--config", str(config.path), "purge", "--json", env={"MAILGATE_NOW": later.isoformat()}
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["counts"]["privacy_requests"] == 1
    assert [action for action, _ in requests()] == ["export"]  # live: kept
    assert float(str(made)) <= float(str(live_made))
