"""Mail as real clients write it: charsets, RFC 2047 names, HTML-only, hostile attachments.

Each case in tests/data/mail goes through a real SMTP session and is read back from the store.
"""

from __future__ import annotations

import json
import sysconfig
from pathlib import Path
from typing import Any

import pytest
import structlog

from mailgate.store import store_for
from tests.conftest import MAIL_DATA, Running, eml

EXPECTED: dict[str, dict[str, Any]] = json.loads((MAIL_DATA / "expected.json").read_text())


async def send_case(daemon: Running, name: str) -> None:
    case = EXPECTED[name]
    if case["smtputf8"]:
        import aiosmtplib

        smtp = aiosmtplib.SMTP(hostname=daemon.host, port=daemon.port, start_tls=False)
        await smtp.connect()
        await smtp.sendmail(
            case["requester_email"], ["support@example.com"], eml(name), mail_options=["SMTPUTF8"]
        )
        await smtp.quit()
    else:
        await daemon.send(eml(name))


@pytest.mark.parametrize("name", sorted(EXPECTED))
async def test_corpus_mail_becomes_the_expected_ticket(daemon: Running, name: str) -> None:
    case = EXPECTED[name]
    await send_case(daemon, name)
    tickets = await daemon.tickets()
    if case["outcome"] == "quarantine":
        assert tickets == []
        result = daemon.cli("quarantine", "list", "--json")
        [row] = json.loads(result.stdout)
        assert row["reason"]
        return
    [ticket] = tickets
    [message] = ticket.messages
    assert ticket.requester.email == case["requester_email"]
    assert ticket.requester.name == case["requester_name"]
    assert message.subject == case["subject"]
    for text in case["body_contains"]:
        assert text in message.body_text
    for text in case["body_excludes"]:
        assert text not in message.body_text
    assert [(a.content_type, a.size) for a in message.attachments] == [
        (a["content_type"], a["size"]) for a in case["attachments"]
    ]


async def test_html_only_mail_keeps_the_html_too(daemon: Running) -> None:
    await send_case(daemon, "html_only")
    [ticket] = await daemon.tickets()
    html = ticket.messages[0].body_html
    assert html is not None and "<p" in html


async def test_hostile_filenames_are_metadata_only(daemon: Running) -> None:
    await send_case(daemon, "attachments_hostile")
    [ticket] = await daemon.tickets()
    attachments = ticket.messages[0].attachments
    names = [a.filename for a in attachments]
    assert names[0] == "passwd"
    assert names[1] is not None and "\x00" not in names[1] and names[1].endswith("name.txt")
    assert names[2] is not None and len(names[2]) <= 255 and names[2].endswith(".pdf")
    assert names[3] == "cmd.exe"
    root = daemon.config.storage.attachments
    async with store_for(daemon.config) as store:
        for a in attachments:
            assert a.id is not None
            content = await store.attachment_content(a.id, root)
            assert content is not None and len(content) == a.size
    # Only the sealed blob files, by their random names: no customer filename on disk.
    on_disk = {p.name for p in root.rglob("*") if p.is_file()}
    assert on_disk == {a.blob for a in attachments}
    assert not (root.parent.parent / "etc").exists()


# -- CPython's own email test corpus --------------------------------------------------------

STDLIB_DATA = Path(sysconfig.get_paths()["stdlib"]) / "test" / "test_email" / "data"
STDLIB_MESSAGES = sorted(STDLIB_DATA.glob("msg_*.txt"))


@pytest.mark.skipif(not STDLIB_MESSAGES, reason="this Python ships without its test suite")
async def test_every_stdlib_test_message_becomes_ticket_or_quarantine(daemon: Running) -> None:
    with structlog.testing.capture_logs() as logs:
        queue_ids = [
            await daemon.send(path.read_bytes().replace(b"\r\n", b"\n").replace(b"\n", b"\r\n"))
            for path in STDLIB_MESSAGES
        ]
        await daemon.settle(within=60)
    async with store_for(daemon.config) as store:
        rows = [await store.get_inbound(queue_id) for queue_id in queue_ids]
        tickets = await store.list_tickets()
    states = [row.state if row else None for row in rows]
    assert set(states) <= {"ingested", "quarantined"}, states
    for row in rows:
        assert row is not None
        if row.state == "quarantined":
            assert row.reason and "failed" not in row.reason  # a reason, not a crash
    # Several corpus files share a Message-ID and sender: those are stored once.
    duplicates = sum(1 for row in rows if row and row.reason == "duplicate")
    assert sum(t.message_count for t in tickets) == states.count("ingested") - duplicates
    assert not [e for e in logs if e["log_level"] in ("error", "critical") or "exc_info" in e]
