"""`mailgate stats` on a small data set with known times: every number checked, and no name or
address in the output."""

from __future__ import annotations

import hashlib
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

from mailgate.config import Config, load_config
from mailgate.model import Address, Author, ParsedMail, ThreadReason
from mailgate.store import IngestTx, store_for
from tests.conftest import run_cli, write_config

D = datetime(2024, 3, 1, tzinfo=UTC)
H = timedelta(hours=1)
AGENT = Address("agent@example.com", "Agent Smith")


def _mail(sender: Address, text: str) -> ParsedMail:
    return ParsedMail(
        sender=sender, to=(), cc=(), subject="A question", message_id=None, in_reply_to=(),
        references=(), body_text=text, body_html=None,
        body_digest=hashlib.sha256(text.encode()).hexdigest(),
    )  # fmt: skip


class Ticket:
    """One crafted ticket: mails at given times, status changes at given times."""

    def __init__(self, email: str, name: str, at: datetime) -> None:
        self.requester = Address(email, name)
        self.at = at
        self.events: list[tuple[datetime, str]] = []

    def customer(self, at: datetime) -> Ticket:
        self.events.append((at, "customer"))
        return self

    def agent(self, at: datetime) -> Ticket:
        self.events.append((at, "agent"))
        return self

    def close(self, at: datetime) -> Ticket:
        self.events.append((at, "closed"))
        return self

    def reopen(self, at: datetime) -> Ticket:
        self.events.append((at, "open"))
        return self

    def write(self, tx: IngestTx) -> None:
        ticket = tx.create_ticket("A question", self.requester, at=self.at)
        for n, (at, event) in enumerate(sorted([(self.at, "customer"), *self.events])):
            if event in ("open", "closed"):
                tx.set_status(ticket, "open" if event == "open" else "closed", at=at)
                continue
            author: Author = "agent" if event == "agent" else "customer"
            sender = AGENT if author == "agent" else self.requester
            reason: ThreadReason = (
                "agent" if author == "agent" else "new" if n == 0 else "references"
            )
            tx.add_message(ticket, _mail(sender, f"message {n}"), inbound_id=None, reason=reason,
                           attachments=(), at=at, author=author)  # fmt: skip


TICKETS = [
    Ticket("a1@big.example", "Alice One", D).agent(D + H).close(D + 2 * H),
    Ticket("a2@big.example", "Alan Two", D + 10 * H).agent(D + 10.5 * H).close(D + 34 * H),
    Ticket("a3@big.example", "Anna Three", D + 32 * H).agent(D + 34 * H),
    Ticket("a4@big.example", "Arno Four", D + 33 * H)
    .close(D + 36 * H)
    .reopen(D + 37 * H)
    .close(D + 57 * H),
    Ticket("a5@BIG.example", "Asta Five", D + 48 * H)
    .customer(D + 49 * H)
    .agent(D + 53 * H)
    .close(D + 54 * H),
    Ticket("solo@tiny.example", "Solo Person", D + 55 * H),
    Ticket("x@home.example", "Home Person", D + 56 * H).agent(D + 56.25 * H).close(D + 57 * H),
    # Left out: they restricted processing, or objected to it.
    Ticket("r@big.example", "Rita Restricted", D).agent(D + 0.01 * H).close(D + 0.02 * H),
    Ticket("o@big.example", "Otto Objecting", D).agent(D + 0.01 * H).close(D + 0.02 * H),
]


async def crafted(tmp_path: Path) -> Config:
    config = load_config(write_config(tmp_path))
    async with store_for(config) as store:

        def write(tx: IngestTx) -> None:
            for ticket in TICKETS:
                ticket.write(tx)

        await store.ingest(write)
    for command, email in (("restrict", "r@big.example"), ("object", "o@big.example")):
        assert run_cli("--config", str(config.path), "privacy", command, email).returncode == 0
    return config


def stats(config: Config, *args: str) -> str:
    result = run_cli("--config", str(config.path), "stats", *args)
    assert result.returncode == 0, result.stderr
    assert "@" not in result.stdout
    for t in TICKETS:
        assert t.requester.name and t.requester.name not in result.stdout
        assert t.requester.email.partition("@")[0] not in result.stdout.split()
    assert "tiny.example" not in result.stdout and "home.example" not in result.stdout
    return result.stdout


async def test_stats_numbers(tmp_path: Path) -> None:
    config = await crafted(tmp_path)
    shown = json.loads(stats(config, "--json"))
    assert shown["per_day"] == [
        {"day": "2024-03-01", "opened": 2, "closed": 1},
        {"day": "2024-03-02", "opened": 2, "closed": 1},
        {"day": "2024-03-03", "opened": 3, "closed": 3},
    ]
    assert (shown["tickets_opened"], shown["tickets_closed"]) == (7, 5)
    # First responses 3600, 1800, 7200, 18000 (from the first customer mail), 900.
    assert shown["first_response"] == {"median_seconds": 3600, "tickets": 5}
    # Resolutions 7200, 86400, 86400 (closed, reopened, closed again: the last close), 21600, 3600.
    assert shown["resolution"] == {"median_seconds": 21600, "tickets": 5}
    assert shown["reopen"] == {"reopened": 1, "ever_closed": 5, "rate": 0.2}
    # Five tickets from big.example (spellings of one domain); the two small ones are "other".
    assert shown["domains"] == {"big.example": 5, "other": 2}

    since = json.loads(stats(config, "--since", "2024-03-02", "--json"))
    assert since["since"] == "2024-03-02T00:00:00+00:00"
    assert since["per_day"] == [
        {"day": "2024-03-02", "opened": 2, "closed": 1},  # a2's close: opened before, closed now
        {"day": "2024-03-03", "opened": 3, "closed": 3},
    ]
    assert since["first_response"] == {"median_seconds": 7200, "tickets": 3}
    assert since["resolution"] == {"median_seconds": 21600, "tickets": 3}
    assert since["reopen"] == {"reopened": 1, "ever_closed": 3, "rate": 1 / 3}
    assert since["domains"] == {"other": 5}  # big.example has only 3 since then

    text = stats(config)
    assert "First response:  1h 00m median (5 tickets)" in text
    assert "Resolution:      6h 00m median (5 tickets)" in text
    assert "Reopened:        1 of 5 closed (20%)" in text
    assert "big.example" in text


async def test_stats_on_nothing_and_a_bad_date(tmp_path: Path) -> None:
    config = load_config(write_config(tmp_path))
    async with store_for(config):
        pass
    shown = json.loads(stats(config, "--json"))
    assert shown["first_response"] == {"median_seconds": None, "tickets": 0}
    assert shown["reopen"]["rate"] is None and shown["per_day"] == []
    bad = run_cli("--config", str(config.path), "stats", "--since", "last week")
    assert bad.returncode == 2 and "--since" in bad.stderr
