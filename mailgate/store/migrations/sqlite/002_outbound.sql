-- Outbound mail: agent and system messages on tickets, verification tokens, the outbox and
-- the addresses that bounced.

-- messages gains its author and two thread reasons; SQLite changes a CHECK only by rebuilding
-- the table (foreign keys are off while migrations run, so attachments are kept).
CREATE TABLE messages_new (
    id            INTEGER PRIMARY KEY,
    ticket_id     INTEGER NOT NULL REFERENCES tickets (id) ON DELETE CASCADE,
    inbound_id    TEXT UNIQUE REFERENCES inbound (id),
    message_id    TEXT,                        -- the Message-ID header, without <>
    from_email    TEXT NOT NULL COLLATE NOCASE,
    from_name     TEXT,
    subject       TEXT NOT NULL,
    body_text     TEXT NOT NULL,
    body_html     TEXT,
    thread_reason TEXT NOT NULL
                  CHECK (thread_reason IN ('new', 'references', 'subject_tag', 'agent', 'bounce')),
    author        TEXT NOT NULL DEFAULT 'customer' CHECK (author IN ('customer', 'agent', 'system')),
    received_at   REAL NOT NULL
);
INSERT INTO messages_new (id, ticket_id, inbound_id, message_id, from_email, from_name, subject,
                          body_text, body_html, thread_reason, received_at)
    SELECT id, ticket_id, inbound_id, message_id, from_email, from_name, subject,
           body_text, body_html, thread_reason, received_at FROM messages;
DROP TABLE messages;
ALTER TABLE messages_new RENAME TO messages;
CREATE INDEX messages_ticket ON messages (ticket_id, received_at);
CREATE INDEX messages_message_id ON messages (message_id, from_email);

ALTER TABLE requesters ADD COLUMN verified_at REAL;

-- Verification links: only the SHA-256 of the token is stored; used or expired rows stay so a
-- second click can be told "already used" (410) rather than "unknown" (404).
CREATE TABLE verification_tokens (
    id           INTEGER PRIMARY KEY,
    requester_id INTEGER NOT NULL REFERENCES requesters (id) ON DELETE CASCADE,
    token_hash   TEXT NOT NULL UNIQUE,
    created_at   REAL NOT NULL,
    expires_at   REAL NOT NULL,
    used_at      REAL
);
CREATE INDEX verification_tokens_requester ON verification_tokens (requester_id, expires_at);

-- Addresses whose mail bounced permanently: no automatic mail until they write in again.
CREATE TABLE undeliverable (
    email  TEXT PRIMARY KEY COLLATE NOCASE,
    status TEXT NOT NULL,                      -- the DSN status code, e.g. 5.1.1
    since  REAL NOT NULL
) WITHOUT ROWID;

-- Outgoing mail, written in the transaction of the event that caused it and composed from
-- its template when sent. `context` holds the template's variables (JSON); a verification
-- token leaves it once the mail is sent.
CREATE TABLE outbox (
    id              INTEGER PRIMARY KEY AUTOINCREMENT,
    kind            TEXT NOT NULL CHECK (kind IN ('verification', 'ticket_created', 'agent_reply')),
    ticket_id       INTEGER NOT NULL REFERENCES tickets (id) ON DELETE CASCADE,
    recipient       TEXT NOT NULL COLLATE NOCASE,
    recipient_name  TEXT,
    cc              TEXT NOT NULL DEFAULT '[]',  -- JSON list of addresses
    message_id      TEXT NOT NULL UNIQUE,        -- mailgate's own, with its HMAC, without <>
    in_reply_to     TEXT,
    refs            TEXT NOT NULL DEFAULT '[]',  -- JSON list of Message-IDs
    context         TEXT NOT NULL,               -- JSON object
    automatic       INTEGER NOT NULL,            -- 1: RFC 3834 automatic mail, rate-limited
    state           TEXT NOT NULL DEFAULT 'queued'
                    CHECK (state IN ('queued', 'sending', 'sent', 'failed')),
    attempts        INTEGER NOT NULL DEFAULT 0,
    last_error      TEXT,
    created_at      REAL NOT NULL,
    next_attempt_at REAL NOT NULL,
    sent_at         REAL
);
CREATE INDEX outbox_due ON outbox (next_attempt_at) WHERE state = 'queued';
CREATE INDEX outbox_automatic ON outbox (recipient, created_at) WHERE automatic = 1;
