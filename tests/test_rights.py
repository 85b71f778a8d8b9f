"""The requester's rights end to end: mail in over SMTP to a real daemon, a real relay on
loopback for what goes out, the `mailgate` command line in a subprocess for each right.

Export (a zip whose document the published schema validates, attachments byte for byte),
correction (a new address verified again), restriction and objection (stored, no automatic
mail; an agent's reply still goes), erasure (nothing of the person in any file under the data
directory, in any charset it arrived in, before or after; finished after a kill -9).
"""

from __future__ import annotations

import base64
import json
import os
import re
import stat
import subprocess
import sys
import zipfile
from email.utils import formatdate
from pathlib import Path
from typing import Any

import jsonschema

from mailgate.config import Config
from mailgate.crashpoints import ENV_VAR
from mailgate.privacy.tokens import find_tokens
from mailgate.store import store_for
from tests.conftest import (
    REPO,
    Relay,
    Running,
    SubprocessDaemon,
    cli_json,
    daemon_running,
    mail,
    run_cli,
    wait_for_event,
)

SCHEMA = json.loads((REPO / "docs" / "export-schema.json").read_text(encoding="utf-8"))
VERIFY_SUBJECT = "Please confirm your email address"
ACK_SUBJECT = "We received your request"

# The person to erase, writing once in ISO-8859-1 and once in UTF-8.
EMAIL = "juergen.mueller@example.org"
NAME = "Jürgen Müller"
LATIN_SUBJECT = "Rechnung für März fehlerhaft"
LATIN_BODY = "die Überweisung für März ist fehlgeschlagen"
UTF8_SUBJECT = "Zweite Frage zum Kundenkonto"
UTF8_BODY = "Mein Kundenkonto zeigt falsche Beträge an"
PDF = b"%PDF-1.4 Kontoauszug vertraulich " + bytes(range(256)) * 8
LATIN_ATTACHMENT = "Anlage: Überweisungsbeleg Nr. 4711 für Jürgen".encode("latin-1") * 20


def latin1_mail() -> bytes:
    """A mail as an older client writes it: ISO-8859-1, 8bit, an encoded-word name."""
    boundary = "=-=latin1-boundary=-="
    return (
        b"From: =?ISO-8859-1?Q?J=FCrgen_M=FCller?= <" + EMAIL.encode() + b">\r\n"
        b"To: support@example.com\r\n"
        b"Subject: =?ISO-8859-1?Q?Rechnung_f=FCr_M=E4rz_fehlerhaft?=\r\n"
        b"Date: " + formatdate().encode() + b"\r\n"
        b"Message-ID: <latin1-juergen@client.example>\r\n"
        b"MIME-Version: 1.0\r\n"
        b'Content-Type: multipart/mixed; boundary="' + boundary.encode() + b'"\r\n'
        b"\r\n--" + boundary.encode() + b"\r\n"
        b"Content-Type: text/plain; charset=ISO-8859-1\r\n"
        b"Content-Transfer-Encoding: 8bit\r\n\r\n"
        + f"Grüße aus Köln: {LATIN_BODY}.\r\n".encode("latin-1")
        + b"\r\n--" + boundary.encode() + b"\r\n"
        b"Content-Type: text/plain; charset=ISO-8859-1; name=beleg.txt\r\n"
        b"Content-Disposition: attachment; filename=beleg.txt\r\n"
        b"Content-Transfer-Encoding: 8bit\r\n\r\n"
        + LATIN_ATTACHMENT
        + b"\r\n--" + boundary.encode() + b"--\r\n"
    )  # fmt: skip


def utf8_mail() -> bytes:
    message = mail(
        sender=f"{NAME} <{EMAIL}>",
        subject=UTF8_SUBJECT,
        body=f"Hallo, {UTF8_BODY}.\n",
        message_id="<utf8-juergen@client.example>",
    )
    message.add_attachment(PDF, maintype="application", subtype="pdf", filename="konto.pdf")
    return message.as_bytes()


def needles() -> dict[str, bytes]:
    """What of the person must never be in a file: each phrase in UTF-8 and ISO-8859-1, and
    the forms the mail carried them in on the wire."""
    phrases = {
        "address": EMAIL,
        "name": NAME,
        "latin subject": LATIN_SUBJECT,
        "latin body": LATIN_BODY,
        "utf-8 subject": UTF8_SUBJECT,
        "utf-8 body": UTF8_BODY,
    }
    found = {}
    for label, text in phrases.items():
        found[f"{label} (utf-8)"] = text.encode("utf-8")
        found[f"{label} (latin-1)"] = text.encode("latin-1")
    found["name (encoded-word)"] = b"J=FCrgen_M=FCller"
    found["pdf"] = PDF[:64]
    found["pdf (base64)"] = base64.b64encode(PDF[:57])
    found["latin attachment"] = LATIN_ATTACHMENT[:64]
    return found


def plaintext_in(folder: Path, wanted: dict[str, bytes]) -> list[str]:
    """Which of `wanted` any file under `folder` holds in its raw bytes (WAL included)."""
    hits = []
    files = [p for p in folder.rglob("*") if p.is_file()]
    assert files
    for path in files:
        data = path.read_bytes()
        hits += [f"{path.relative_to(folder)}: {label}" for label, b in wanted.items() if b in data]
    return hits


def blob_files(config: Config) -> list[Path]:
    return [p for p in config.storage.attachments.rglob("*") if p.is_file()]


def cli_at(folder: Path, config: Config, *args: str) -> subprocess.CompletedProcess[str]:
    """The CLI run from `folder` (where a default export lands)."""
    return subprocess.run(
        [sys.executable, "-m", "mailgate", "--config", str(config.path), *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=folder,
        check=False,
    )


def ok(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 0, (result.stdout, result.stderr)
    return result.stdout


def no_requester(result: subprocess.CompletedProcess[str], email: str) -> None:
    assert result.returncode == 1, (result.stdout, result.stderr)
    assert result.stderr.strip() == f"mailgate: no requester {email}"


# -- export ----------------------------------------------------------------------------------


async def test_export_is_a_zip_the_schema_validates_with_the_attachments(
    relay: Relay, relay_config: Config, tmp_path: Path
) -> None:
    hostile = "../../etc/pass wd\u202e.txt"
    async with daemon_running(relay_config) as running:
        first = mail(sender="Ann Example <ann@example.org>", subject="Invoice attached")
        first.add_attachment(PDF, maintype="application", subtype="pdf", filename="invoice.pdf")
        first.add_attachment(b"second file", maintype="text", subtype="plain", filename=hostile)
        await running.send(first)
        await relay.wait_for(2)  # the verification mail and the acknowledgement
        [ticket] = await running.tickets()
        body = tmp_path / "reply.txt"
        body.write_text("We are on it.\n", encoding="utf-8")
        ok(running.cli("reply", str(ticket.id), "--body-file", str(body)))
        await relay.wait_for(3)
        await running.send(mail(sender="ann@example.org", subject=f"Re: Invoice [#{ticket.id}]"))
        await running.settle()
        texts = [r.text() for r in relay.received]
        tokens = {t for text in texts for t in re.findall(r"/verify/([A-Za-z0-9_-]{43})", text)}
        tokens |= {t for text in texts for t in find_tokens(text)}  # and their hashes
        assert len(tokens) == 2

        out = tmp_path / "ann.zip"
        done = ok(running.cli("privacy", "export", "ann@example.org", "--out", str(out)))
    assert f"exported to {out}" in done
    assert stat.S_IMODE(out.stat().st_mode) == 0o600
    with zipfile.ZipFile(out) as archive:
        names = archive.namelist()
        doc = json.loads(archive.read("export.json"))
        jsonschema.validate(doc, SCHEMA)
        [exported] = doc["tickets"]
        assert exported["subject"] == "Invoice attached"
        assert [m["author"] for m in exported["messages"]] == ["customer", "agent", "customer"]
        first_message = exported["messages"][0]
        assert first_message["sender"] == {"email": "ann@example.org", "name": "Ann Example"}
        assert first_message["trust"] == "authenticated"
        assert exported["messages"][1]["sender"] is None  # the agent's identity is the team's
        assert exported["messages"][1]["body_text"].startswith("We are on it.")
        pdf, second = first_message["attachments"]
        assert pdf["filename"] == "invoice.pdf" and pdf["size"] == len(PDF)
        assert archive.read(pdf["path"]) == PDF
        assert archive.read(second["path"]) == b"second file"
        assert second["path"].startswith(f"attachments/{ticket.id}/")
        assert ".." not in second["path"] and "\u202e" not in second["path"]
        raws = [m["raw_path"] for m in exported["messages"]]
        assert raws[1] is None and raws[0] and raws[2]  # the agent's answer has none
        assert b"Subject: Invoice attached" in archive.read(raws[0])
        assert sorted(names) == sorted(["export.json", pdf["path"], second["path"], *raws[::2]])
        assert doc["requester"]["email"] == "ann@example.org"
        assert doc["verification"]["verified"] is False
        assert len(doc["verification"]["tokens"]) == 1
        assert sorted(o["kind"] for o in doc["outgoing"]) == [
            "agent_reply",
            "ticket_created",
            "verification",
        ]
        everything = b"".join(archive.read(n) for n in names).decode("utf-8", "replace")
    assert not any(token in everything for token in tokens)  # no link token, ever
    assert doc["processing"]["requests"] == []  # this export is audited after it was read


async def test_export_default_name_and_unknown_address(
    relay: Relay, relay_config: Config, tmp_path: Path
) -> None:
    async with daemon_running(relay_config) as running:
        await running.send(mail(sender="bea@example.org"))
        await running.settle()
    folder = tmp_path / "here"
    folder.mkdir()
    done = ok(cli_at(folder, relay_config, "privacy", "export", "Bea@Example.org"))
    [written] = list(folder.iterdir())
    assert re.fullmatch(r"mailgate-export-[0-9a-f]{16}\.zip", written.name), written.name
    assert "bea" not in written.name.lower()
    assert stat.S_IMODE(written.stat().st_mode) == 0o600
    assert str(written) in done
    again = cli_at(folder, relay_config, "privacy", "export", "bea@example.org")
    assert again.returncode == 2 and "exists" in again.stderr  # never over an earlier one
    no_requester(cli_at(folder, relay_config, "privacy", "export", "nobody@example.org"),
                 "nobody@example.org")  # fmt: skip


# -- correction ------------------------------------------------------------------------------


async def test_correction_of_name_and_address_verifies_the_new_address(
    relay: Relay, relay_config: Config
) -> None:
    async with daemon_running(relay_config) as running:
        await running.send(mail(sender="Ann Typo <ann@example.org>"))
        await running.send(mail(sender="bob@example.org", subject="Bob's own"))
        await relay.wait_for(4)
        [old_link] = [
            t for r in relay.received if r.rcpt_tos == ["ann@example.org"]
            for t in find_tokens(r.text())
        ]  # fmt: skip
        ok(running.cli("requesters", "verify", "ann@example.org"))

        taken = running.cli("requesters", "update", "ann@example.org", "--email", "BOB@example.org")
        assert taken.returncode == 1
        assert taken.stderr.strip() == "mailgate: another person has BOB@example.org"

        done = ok(
            running.cli(
                "requesters", "update", "ann@example.org",
                "--name", "Ann Right", "--email", "ann.new@example.org",
            )
        )  # fmt: skip
        assert "name corrected" in done
        assert "must be verified again" in done and "verification mail queued" in done
        [sent] = [r for r in await relay.wait_for(5) if r.rcpt_tos == ["ann.new@example.org"]]
        assert str(sent.message["Subject"]).startswith(VERIFY_SUBJECT)
        [new_link] = find_tokens(sent.text())

        no_requester(running.cli("requesters", "show", "ann@example.org"), "ann@example.org")
        shown = cli_json(running, "requesters", "show", "ann.new@example.org")
        assert shown["name"] == "Ann Right" and shown["verified"] is False
        [ticket] = [t for t in cli_json(running, "tickets", "list") if t["subject"] != "Bob's own"]
        assert ticket["requester"] == {"email": "ann.new@example.org", "name": "Ann Right"}

        async with store_for(running.config) as store:
            # The link the old address got verifies nothing now; the new one does.
            assert (await store.redeem_token(old_link))[0] == "revoked"
            assert await store.redeem_token(new_link) == ("verified", "ann.new@example.org")

        same = ok(running.cli("requesters", "update", "ann.new@example.org", "--email",
                              "Ann.New@example.org"))  # fmt: skip
        assert "verification kept" in same
        assert cli_json(running, "requesters", "show", "ann.new@example.org")["verified"] is True
    no_requester(
        run_cli("--config", str(relay_config.path), "requesters", "update", "x@example.org",
                "--name", "X"),
        "x@example.org",
    )  # fmt: skip


# -- restriction and objection ---------------------------------------------------------------


def outbox_of(running: Running, ticket_id: int) -> list[str]:
    return [r["kind"] for r in cli_json(running, "outbox", "list") if r["ticket_id"] == ticket_id]


async def test_restricted_person_mail_is_stored_and_gets_no_automatic_mail(
    relay: Relay, relay_config: Config, tmp_path: Path
) -> None:
    async with daemon_running(relay_config) as running:
        await running.send(mail(sender="Cleo <cleo@example.org>", subject="First"))
        await relay.wait_for(2)
        done = ok(running.cli("privacy", "restrict", "cleo@example.org"))
        assert "restricted" in done and "no automatic mail" in done
        assert cli_json(running, "requesters", "show", "cleo@example.org")["state"] == "restricted"

        await running.send(mail(sender="cleo@example.org", subject="Second, while restricted"))
        tickets = await running.tickets()  # settled: the ingest transaction wrote its mails
        second = next(t for t in tickets if t.subject == "Second, while restricted")
        assert second.message_count == 1  # the mail is kept, its ticket created
        assert outbox_of(running, second.id) == []  # no acknowledgement, no verification
        assert len(relay.received) == 2

        body = tmp_path / "reply.txt"
        body.write_text("An answer by hand.\n", encoding="utf-8")
        ok(running.cli("reply", str(second.id), "--body-file", str(body)))
        [*_, answer] = await relay.wait_for(3)  # an agent's reply still goes
        assert answer.rcpt_tos == ["cleo@example.org"] and "An answer by hand." in answer.text()

        assert "restriction lifted" in ok(running.cli("privacy", "unrestrict", "cleo@example.org"))
        await running.send(mail(sender="cleo@example.org", subject="Third, free again"))
        [*_, ack] = await relay.wait_for(4)
        assert str(ack.message["Subject"]).startswith(ACK_SUBJECT)

        objected = ok(running.cli("privacy", "object", "cleo@example.org"))
        assert "objection recorded" in objected
        shown = cli_json(running, "requesters", "show", "cleo@example.org")
        assert (shown["state"], shown["objected"]) == ("restricted", True)
        await running.send(mail(sender="cleo@example.org", subject="Fourth, objected"))
        tickets = await running.tickets()
        fourth = next(t for t in tickets if t.subject == "Fourth, objected")
        assert outbox_of(running, fourth.id) == []
        assert len(relay.received) == 4
    no_requester(
        run_cli("--config", str(relay_config.path), "privacy", "restrict", "nobody@example.org"),
        "nobody@example.org",
    )


# -- erasure ---------------------------------------------------------------------------------


async def send_juergen(running_send: Any) -> None:
    await running_send(latin1_mail(), sender=EMAIL)
    await running_send(utf8_mail(), sender=EMAIL)


async def test_erasure_leaves_nothing_of_the_person_in_any_file(
    relay: Relay, relay_config: Config
) -> None:
    data = relay_config.storage.database.parent
    async with daemon_running(relay_config) as running:
        await send_juergen(running.send)
        # Someone else's ticket on which Jürgen is a participant: it stays, he leaves it.
        await running.send(
            mail(sender="Keeper <keeper@example.org>", subject="Keeper's own", cc=EMAIL)
        )
        await relay.wait_for(5)  # his verification and two acknowledgements, Keeper's two
        tickets = await running.tickets()
        assert len(tickets) == 3
        assert len(blob_files(relay_config)) == 2
        ok(running.cli("privacy", "export", EMAIL, "--out", str(data.parent / "before.zip")))

        # The scan looks for what really was there: every phrase, in some of its forms, is
        # in what was sent or in the export's files (the document, the raw messages).
        with zipfile.ZipFile(data.parent / "before.zip") as archive:
            clear = b"".join(archive.read(n) for n in archive.namelist())
        clear += latin1_mail() + utf8_mail()
        found = {label.partition(" (")[0] for label, b in needles().items() if b in clear}
        assert found == {label.partition(" (")[0] for label in needles()}

        # Sealed while the person exists: no plaintext of theirs in any file.
        assert plaintext_in(data, needles()) == []

        done = ok(
            await running.cli_beside("privacy", "erase", EMAIL, "--reason", "asked by phone, twice")
        )
        assert "erased (reason: other)" in done
        assert "  tickets: 2\n" in done and "  messages: 2\n" in done
        assert "  attachments: 2\n" in done and "  files: 2\n" in done
        assert "  participations removed: 1\n" in done
        assert "open tickets closed and erased, not archived: 2" in done

        assert plaintext_in(data, needles()) == []
        assert blob_files(relay_config) == []
        no_requester(running.cli("requesters", "show", EMAIL), EMAIL)
        no_requester(running.cli("privacy", "erase", EMAIL), EMAIL)
        no_requester(running.cli("privacy", "export", EMAIL), EMAIL)
        [kept] = cli_json(running, "tickets", "list")
        assert kept["subject"] == "Keeper's own"
        [record] = [r for r in cli_json(running, "audit", "list") if r["action"] == "erase"]
        assert record["reason"] == "other" and record["counts"]["messages"] == 2
        assert "phone" not in json.dumps(cli_json(running, "audit", "list"))


async def test_under_16_is_its_own_reason(relay: Relay, relay_config: Config) -> None:
    async with daemon_running(relay_config) as running:
        await running.send(mail(sender="kid@example.org"))
        await running.settle()
        done = ok(
            await running.cli_beside("privacy", "erase", "kid@example.org", "--reason", "under-16")
        )
        assert "erased (reason: under-16)" in done
        [record] = cli_json(running, "audit", "list", "--subject", "kid@example.org")
        assert (record["action"], record["reason"], record["via"]) == ("erase", "under-16", "cli")


async def erasure_cut_short(tmp_path: Path, relay: Relay, point: str) -> SubprocessDaemon:
    """A daemon with Jürgen's mail, and `privacy erase` killed (SIGKILL) at `point`.

    The daemon's first retention purge (2 s after its start) finishes erasures left
    'erasing': it has run before the command is killed, or it could finish the erasure
    before the test looks (the next purge is a day later)."""
    daemon = SubprocessDaemon(tmp_path / "daemon", relay_port=relay.port, log_level="info")
    daemon.start()
    wait_for_event(daemon, "retention_purged")
    running = Running(daemon.config, "127.0.0.1", daemon.port, daemon.config.http.listen)
    await send_juergen(running.send)
    await running.settle()
    await relay.wait_for(3)  # verification, two acknowledgements
    assert len(blob_files(daemon.config)) == 2
    killed = run_cli(
        "--config", str(daemon.config_path), "privacy", "erase", EMAIL, env={ENV_VAR: point}
    )
    assert killed.returncode == -9, (killed.stdout, killed.stderr)
    assert killed.stdout == ""  # it died before printing anything
    return daemon


async def test_erasure_killed_after_the_mark_is_finished_when_the_daemon_restarts(
    tmp_path: Path, relay: Relay
) -> None:
    daemon = await erasure_cut_short(tmp_path, relay, "erase.marked")
    try:
        shown = cli_json(
            Running(daemon.config, "", 0, daemon.config.http.listen), "requesters", "show", EMAIL
        )
        assert shown["state"] == "erasing"  # marked; its key and rows still there
        daemon.kill(15)
        daemon.start()  # the daemon finishes it before it serves
        data = daemon.config.storage.database.parent
        assert plaintext_in(data, needles()) == []
        assert blob_files(daemon.config) == []
        no_requester(run_cli("--config", str(daemon.config_path), "requesters", "show", EMAIL),
                     EMAIL)  # fmt: skip
        records = json.loads(
            ok(run_cli("--config", str(daemon.config_path), "audit", "list", "--json"))
        )
        [record] = [r for r in records if r["action"] == "erase"]
        assert record["via"] == "resume" and record["counts"]["files"] == 2
    finally:
        daemon.kill()


async def test_erasure_killed_after_the_key_is_destroyed_is_finished_by_the_next_command(
    tmp_path: Path, relay: Relay
) -> None:
    daemon = await erasure_cut_short(tmp_path, relay, "erase.key_destroyed")
    try:
        # The key is gone: the rows are ciphertext without a key, the files too.
        data = daemon.config.storage.database.parent
        assert plaintext_in(data, needles()) == []
        # The next command (any that opens the store) deletes the rows; a privacy command
        # also removes the files.
        no_requester(run_cli("--config", str(daemon.config_path), "privacy", "erase", EMAIL),
                     EMAIL)  # fmt: skip
        assert blob_files(daemon.config) == []
        assert plaintext_in(data, needles()) == []
        records = json.loads(
            ok(run_cli("--config", str(daemon.config_path), "audit", "list", "--json"))
        )
        [record] = [r for r in records if r["action"] == "erase"]
        assert record["via"] == "reconcile" and record["subject"] is None
        assert record["counts"]["messages"] == 2
        assert (
            json.loads(
                ok(run_cli("--config", str(daemon.config_path), "tickets", "list", "--json"))
            )
            == []
        )
    finally:
        daemon.kill()


def test_privacy_commands_need_a_database(tmp_path: Path) -> None:
    config = tmp_path / "config.toml"
    config.write_text('[smtp]\naccept = ["a@example.com"]\n[outbound]\nsender = "a@example.com"\n')
    result = run_cli("--config", str(config), "privacy", "erase", EMAIL)
    assert result.returncode == 1 and "no database" in result.stderr
    assert not os.path.exists(tmp_path / "var" / "mailgate.db")
