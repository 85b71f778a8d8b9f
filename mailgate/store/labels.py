"""What each sealed column is sealed for: the associated data of its AES-GCM seal, so that a
ciphertext copied into another column does not open there. Shared by every backend."""

from __future__ import annotations

EMAIL = "person.email"
NAME = "person.name"
SUBJECT = "subject"
BODY = "body.text"
HTML = "body.html"
SENDER = "message.sender"
AUTH = "message.auth"
ATTACHMENT = "attachment.meta"
OUTBOX = "outbox.mail"
OUTBOX_ERROR = "outbox.reply"
ENVELOPE = "inbound.envelope"
RAW = "inbound.raw"
MESSAGE_KEY = "inbound.key"
BLOB_KEY = "blob.key"
BLOB = "blob.content"

# What a value whose key was destroyed (its person erased) reads as.
ERASED = "[erased]"
