"""Access and portability: everything stored of one person, as a zip they can read and take
elsewhere.

The zip holds `export.json` (the schema is `docs/export-schema.json`, JSON Schema 2020-12),
each attachment's content, opened from its sealed file, at
`attachments/<ticket>/<message>/<position>-<name>` (the name sanitised: no folders, no
controls, no leading dot), and each of the person's own messages as it arrived, while
retention still keeps it, at `messages/<ticket>/<message>.eml`.

The document holds the person's record, their tickets with every message (who else wrote on
them is withheld: that is another person's data, and an agent's address is the team's), their
own messages on other people's tickets, the mail sent about their tickets (kind, recipients,
state, times; never the template's variables, which hold a queued verification's token), their
verification tokens' times (never the tokens or their hashes), their processing state
(restricted, objected) and the requests they made (from the audit log). mailgate records no
consents: processing rests on the support request itself, so `consents` is empty; the field
is there for a deployment that adds them.

`build_export` is what the CLI (`mailgate privacy export`) and a confirmed privacy request by
mail both call; each export is audited.
"""

from __future__ import annotations

import asyncio
import io
import json
import re
import unicodedata
import zipfile
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from mailgate.privacy import audit
from mailgate.store.blobs import read_blob
from mailgate.store.sqlite import SqliteStore
from mailgate.store.sqlite_rights import PersonRecord

FORMAT = "mailgate-export"
VERSION = 1
DOCUMENT = "export.json"
_UNSAFE = re.compile(r"[^\w.\-]+")
MAX_NAME = 100


def safe_name(filename: str | None) -> str:
    """A file name that is one path component anywhere: letters, digits, `.`, `-`, `_`."""
    name = unicodedata.normalize("NFC", filename or "")
    name = _UNSAFE.sub("_", name).lstrip("._")[-MAX_NAME:]
    return name or "attachment"


def attachment_path(ticket_id: int, message_id: int, position: int, filename: str | None) -> str:
    return f"attachments/{ticket_id}/{message_id}/{position}-{safe_name(filename)}"


def raw_path(ticket_id: int, message_id: int) -> str:
    return f"messages/{ticket_id}/{message_id}.eml"


def _messages(record: PersonRecord) -> list[dict[str, Any]]:
    return [m for t in record.tickets for m in t["messages"]] + record.contributions


def document(record: PersonRecord, *, at: datetime, raw: set[int]) -> dict[str, Any]:
    """The export document: attachments' and raw messages' `path` set (`raw`: the messages
    whose raw message is in the zip)."""
    for message in _messages(record):
        message["raw_path"] = (
            raw_path(message["ticket_id"], message["id"]) if message["id"] in raw else None
        )
        for a in message["attachments"]:
            a["path"] = attachment_path(
                message["ticket_id"], message["id"], a["position"], a["filename"]
            )
    return {
        "format": FORMAT,
        "version": VERSION,
        "exported_at": at.isoformat(),
        "requester": record.requester,
        "verification": record.verification,
        "processing": {
            "state": record.requester["state"],
            "restricted": record.requester["restricted"],
            "objected": record.requester["objected"],
            "objected_at": record.requester["objected_at"],
            "consents": [],
            "requests": record.requests,
        },
        "tickets": record.tickets,
        "participant_of": record.participant_of,
        "contributions": record.contributions,
        "outgoing": record.outgoing,
    }


def _paths(doc: dict[str, Any]) -> dict[int, str]:
    """Attachment id -> path in the zip; the ids leave the document."""
    paths = {}
    for message in [m for t in doc["tickets"] for m in t["messages"]] + doc["contributions"]:
        for a in message["attachments"]:
            paths[a.pop("id")] = a["path"]
    return paths


def _zip(
    record: PersonRecord, doc: dict[str, Any], raw: dict[str, bytes], attachments_root: Path
) -> bytes:
    paths = _paths(doc)
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        archive.writestr(DOCUMENT, json.dumps(doc, ensure_ascii=False, indent=2) + "\n")
        for name, message in raw.items():
            archive.writestr(name, message)
        for file in record.files:
            content = read_blob(attachments_root, file.blob, file.key)
            path = paths.get(file.attachment_id)
            if content is not None and path is not None:
                archive.writestr(path, content)
    return out.getvalue()


async def build_export(
    store: SqliteStore, email: str, attachments_root: Path, *, via: str = "cli"
) -> bytes | None:
    """The export zip of the person with this address, audited; None if there is none."""
    record = await store.person_record(email, audit.subject_hash(store.keys, email))
    if record is None:
        return None
    raw: dict[str, bytes] = {}
    kept: set[int] = set()
    for message in _messages(record):
        inbound_id = message.pop("inbound_id")
        content = await store.read_raw(inbound_id) if inbound_id else None
        if content is not None:
            raw[raw_path(message["ticket_id"], message["id"])] = content
            kept.add(message["id"])
    doc = document(record, at=datetime.now(UTC), raw=kept)
    data = await asyncio.to_thread(_zip, record, doc, raw, attachments_root)
    counts = {
        "tickets": len(record.tickets),
        "messages": sum(len(t["messages"]) for t in record.tickets) + len(record.contributions),
        "attachments": len(record.files),
        "raw_messages": len(raw),
        "outgoing": len(record.outgoing),
        "bytes": len(data),
    }
    await audit.record(store, "export", via, email, counts)
    return data
