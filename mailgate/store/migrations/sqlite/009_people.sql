-- One person, one row, one key (issue 10). Every table that held an address in clear now
-- refers to `people`; every personal value is sealed (AES-256-GCM, `privacy/sealing.py`) under
-- the data key of the person it belongs to, kept in the key store (`privacy/keyring.py`), not
-- here. The tables of migrations 001-008 are renamed legacy_*; the store seals their rows into
-- the new tables when it first opens with its keys (`store/sqlite_adopt.py`) and drops them.
ALTER TABLE inbound RENAME TO legacy_inbound;
ALTER TABLE requesters RENAME TO legacy_requesters;
ALTER TABLE tickets RENAME TO legacy_tickets;
ALTER TABLE participants RENAME TO legacy_participants;
ALTER TABLE messages RENAME TO legacy_messages;
ALTER TABLE attachments RENAME TO legacy_attachments;
ALTER TABLE verification_tokens RENAME TO legacy_verification_tokens;
ALTER TABLE undeliverable RENAME TO legacy_undeliverable;
ALTER TABLE outbox RENAME TO legacy_outbox;
DROP INDEX IF EXISTS inbound_received;
DROP INDEX IF EXISTS inbound_quarantined;
DROP INDEX IF EXISTS tickets_status;
DROP INDEX IF EXISTS messages_ticket;
DROP INDEX IF EXISTS messages_message_id;
DROP INDEX IF EXISTS attachments_message;
DROP INDEX IF EXISTS attachments_sha256;
DROP INDEX IF EXISTS verification_tokens_requester;
DROP INDEX IF EXISTS verification_tokens_message;
DROP INDEX IF EXISTS outbox_due;
DROP INDEX IF EXISTS outbox_automatic;
DROP INDEX IF EXISTS outbox_automatic_all;

CREATE TABLE people (
    id            INTEGER PRIMARY KEY AUTOINCREMENT,
    blind         BLOB NOT NULL UNIQUE,       -- HMAC-SHA256(index key, address_key(email))
    key_id        TEXT NOT NULL UNIQUE,       -- the person's data key, in the key store
    email         BLOB NOT NULL,              -- sealed: the address as first spelled
    name          BLOB,                       -- sealed
    state         TEXT NOT NULL DEFAULT 'active'
                  CHECK (state IN ('active', 'restricted', 'erasing')),
    objected_at   REAL,                       -- an objection to processing (it also restricts)
    created_at    REAL NOT NULL,
    verified_at   REAL,
    undeliverable TEXT,                       -- DSN status of a permanent bounce, until it writes
    undeliverable_since REAL
);

-- Raw messages as intake committed them, sealed before the 250 under a key of their own
-- (`raw_key`): wrapped under the master key until ingest gives the message to a ticket, then
-- under that ticket's requester's data key (`owner_key`), so erasing them shreds it too.
CREATE TABLE inbound (
    id           TEXT PRIMARY KEY,            -- the queue id given in "250 2.0.0 Queued as <id>"
    received_at  REAL NOT NULL,
    envelope     BLOB NOT NULL,               -- sealed JSON: mail_from, rcpt_tos, peer, helo, ...
    raw          BLOB,                        -- sealed stream; NULL once retention removed it
    raw_key      BLOB NOT NULL,
    owner_key    TEXT,                        -- NULL: raw_key is wrapped under the master key
    size         INTEGER NOT NULL,            -- of the raw message in clear, bytes
    state        TEXT NOT NULL DEFAULT 'received'
                 CHECK (state IN ('received', 'ingested', 'quarantined')),
    reason       TEXT,                        -- why it was quarantined (no personal data)
    processed_at REAL,
    attempts     INTEGER NOT NULL DEFAULT 0,
    retry_at     REAL
);
CREATE INDEX inbound_received ON inbound (received_at, id) WHERE state = 'received';
CREATE INDEX inbound_quarantined ON inbound (received_at) WHERE state = 'quarantined';
CREATE INDEX inbound_owner ON inbound (owner_key) WHERE owner_key IS NOT NULL;
CREATE INDEX inbound_processed ON inbound (processed_at) WHERE raw IS NOT NULL;

CREATE TABLE tickets (
    id           INTEGER PRIMARY KEY AUTOINCREMENT,   -- never reused, even after erasure
    subject      BLOB NOT NULL,                       -- sealed under the requester's key
    status       TEXT NOT NULL DEFAULT 'open' CHECK (status IN ('open', 'closed')),
    requester_id INTEGER NOT NULL REFERENCES people (id),
    created_at   REAL NOT NULL,
    updated_at   REAL NOT NULL,
    closed_at    REAL,
    flags        TEXT NOT NULL DEFAULT '[]'
);
CREATE INDEX tickets_status ON tickets (status, updated_at);
CREATE INDEX tickets_requester ON tickets (requester_id);

CREATE TABLE participants (
    ticket_id INTEGER NOT NULL REFERENCES tickets (id) ON DELETE CASCADE,
    person_id INTEGER NOT NULL REFERENCES people (id) ON DELETE CASCADE,
    PRIMARY KEY (ticket_id, person_id)
) WITHOUT ROWID;
CREATE INDEX participants_person ON participants (person_id);

-- A message's text is sealed under its ticket's requester's key; who wrote it (address and
-- display name) under the sender's own key, so erasing a participant shreds their name on
-- every ticket they wrote on.
CREATE TABLE messages (
    id            INTEGER PRIMARY KEY,
    ticket_id     INTEGER NOT NULL REFERENCES tickets (id) ON DELETE CASCADE,
    inbound_id    TEXT UNIQUE REFERENCES inbound (id) ON DELETE SET NULL,
    message_id    TEXT,                        -- the Message-ID header, without <>
    sender_id     INTEGER REFERENCES people (id) ON DELETE SET NULL,
    sender_key    TEXT NOT NULL,               -- key id that seals `sender`
    sender        BLOB NOT NULL,               -- sealed JSON [email, name]
    subject       BLOB NOT NULL,
    body_text     BLOB NOT NULL,
    body_html     BLOB,
    body_digest   TEXT,                        -- keyed hash of the body (duplicates)
    thread_reason TEXT NOT NULL
                  CHECK (thread_reason IN ('new', 'references', 'subject_tag', 'agent', 'bounce')),
    author        TEXT NOT NULL DEFAULT 'customer' CHECK (author IN ('customer', 'agent', 'system')),
    received_at   REAL NOT NULL,
    auth          BLOB,                        -- sealed JSON; NULL when not checked
    flags         TEXT NOT NULL DEFAULT '[]'
);
CREATE INDEX messages_ticket ON messages (ticket_id, received_at);
CREATE INDEX messages_message_id ON messages (message_id, sender_id);
CREATE INDEX messages_sender ON messages (sender_id);

-- Attachment content: one sealed file per owner and content (reference-counted), under a key
-- of its own wrapped under the owner's data key. The file's name is random.
CREATE TABLE blobs (
    id       INTEGER PRIMARY KEY,
    owner_id INTEGER NOT NULL REFERENCES people (id),
    name     TEXT NOT NULL UNIQUE,
    digest   TEXT NOT NULL,                    -- keyed hash of owner and content
    key      BLOB NOT NULL,                    -- the file's key, sealed under the owner's key
    size     INTEGER NOT NULL,
    refs     INTEGER NOT NULL,
    UNIQUE (owner_id, digest)
);

CREATE TABLE attachments (
    id           INTEGER PRIMARY KEY,
    message_id   INTEGER NOT NULL REFERENCES messages (id) ON DELETE CASCADE,
    position     INTEGER NOT NULL,
    blob_id      INTEGER NOT NULL REFERENCES blobs (id),
    meta         BLOB NOT NULL,                -- sealed JSON: filename, sha256
    content_type TEXT NOT NULL,
    size         INTEGER NOT NULL,
    inline       INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX attachments_message ON attachments (message_id, position);
CREATE INDEX attachments_blob ON attachments (blob_id);

CREATE TABLE verification_tokens (
    id         INTEGER PRIMARY KEY,
    person_id  INTEGER NOT NULL REFERENCES people (id) ON DELETE CASCADE,
    token_hash TEXT NOT NULL UNIQUE,
    created_at REAL NOT NULL,
    expires_at REAL NOT NULL,
    used_at    REAL,
    message_id TEXT,
    revoked_at REAL
);
CREATE INDEX verification_tokens_person ON verification_tokens (person_id, expires_at);
CREATE INDEX verification_tokens_message ON verification_tokens (message_id)
    WHERE message_id IS NOT NULL;

-- Outgoing mail; `mail` is sealed JSON (to, cc, template context) under the ticket's
-- requester's key, and so are the relay's words about it (they quote addresses).
CREATE TABLE outbox (
    id              INTEGER PRIMARY KEY AUTOINCREMENT,
    kind            TEXT NOT NULL CHECK (kind IN ('verification', 'ticket_created', 'agent_reply')),
    ticket_id       INTEGER NOT NULL REFERENCES tickets (id) ON DELETE CASCADE,
    recipient_id    INTEGER NOT NULL REFERENCES people (id) ON DELETE CASCADE,
    mail            BLOB NOT NULL,
    message_id      TEXT NOT NULL UNIQUE,
    in_reply_to     TEXT,
    refs            TEXT NOT NULL DEFAULT '[]',
    automatic       INTEGER NOT NULL,
    state           TEXT NOT NULL DEFAULT 'queued'
                    CHECK (state IN ('queued', 'sending', 'sent', 'failed')),
    attempts        INTEGER NOT NULL DEFAULT 0,
    last_error      BLOB,
    reply           BLOB,
    created_at      REAL NOT NULL,
    next_attempt_at REAL NOT NULL,
    sent_at         REAL
);
CREATE INDEX outbox_due ON outbox (next_attempt_at) WHERE state = 'queued';
CREATE INDEX outbox_automatic ON outbox (recipient_id, created_at) WHERE automatic = 1;
CREATE INDEX outbox_automatic_all ON outbox (created_at) WHERE automatic = 1;
CREATE INDEX outbox_recipient ON outbox (recipient_id);

-- The data key ids of erased people (random ids, no personal data), reconciled with the key
-- store's log when the store opens.
CREATE TABLE erasures (
    key_id TEXT PRIMARY KEY,
    at     REAL NOT NULL
);
