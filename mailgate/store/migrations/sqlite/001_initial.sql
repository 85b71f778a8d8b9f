-- Raw messages as intake committed them. Ingest moves each row from 'received' to
-- 'ingested' or 'quarantined' in the same transaction that writes the ticket.
CREATE TABLE inbound (
    id           TEXT PRIMARY KEY,            -- the queue id given in "250 2.0.0 Queued as <id>"
    received_at  REAL NOT NULL,               -- unix time of the commit
    mail_from    TEXT NOT NULL,
    rcpt_tos     TEXT NOT NULL,               -- JSON list
    peer         TEXT NOT NULL,
    helo         TEXT,
    smtputf8     INTEGER NOT NULL DEFAULT 0,
    raw          BLOB NOT NULL,
    state        TEXT NOT NULL DEFAULT 'received'
                 CHECK (state IN ('received', 'ingested', 'quarantined')),
    reason       TEXT,                        -- why it was quarantined (no personal data)
    processed_at REAL                         -- unix time ingest finished with it
);
CREATE INDEX inbound_received ON inbound (received_at, id) WHERE state = 'received';
CREATE INDEX inbound_quarantined ON inbound (received_at) WHERE state = 'quarantined';

CREATE TABLE requesters (
    id         INTEGER PRIMARY KEY,
    email      TEXT NOT NULL UNIQUE COLLATE NOCASE,  -- local parts compare case-blind in practice
    name       TEXT,
    created_at REAL NOT NULL
);

CREATE TABLE tickets (
    id           INTEGER PRIMARY KEY AUTOINCREMENT,   -- never reused, even after erasure
    subject      TEXT NOT NULL,
    status       TEXT NOT NULL DEFAULT 'open' CHECK (status IN ('open', 'closed')),
    requester_id INTEGER NOT NULL REFERENCES requesters (id),
    created_at   REAL NOT NULL,
    updated_at   REAL NOT NULL
);
CREATE INDEX tickets_status ON tickets (status, updated_at);

-- Addresses that may append to a ticket besides its requester: To/Cc of its messages.
CREATE TABLE participants (
    ticket_id INTEGER NOT NULL REFERENCES tickets (id) ON DELETE CASCADE,
    email     TEXT NOT NULL COLLATE NOCASE,
    PRIMARY KEY (ticket_id, email)
) WITHOUT ROWID;

CREATE TABLE messages (
    id            INTEGER PRIMARY KEY,
    ticket_id     INTEGER NOT NULL REFERENCES tickets (id) ON DELETE CASCADE,
    inbound_id    TEXT UNIQUE REFERENCES inbound (id),
    message_id    TEXT,                        -- the Message-ID header, without <>
    from_email    TEXT NOT NULL COLLATE NOCASE,
    from_name     TEXT,
    subject       TEXT NOT NULL,
    body_text     TEXT NOT NULL,
    body_html     TEXT,
    thread_reason TEXT NOT NULL CHECK (thread_reason IN ('new', 'references', 'subject_tag')),
    received_at   REAL NOT NULL
);
CREATE INDEX messages_ticket ON messages (ticket_id, received_at);
CREATE INDEX messages_message_id ON messages (message_id, from_email);

CREATE TABLE attachments (
    id           INTEGER PRIMARY KEY,
    message_id   INTEGER NOT NULL REFERENCES messages (id) ON DELETE CASCADE,
    position     INTEGER NOT NULL,
    sha256       TEXT NOT NULL,                -- the file's name under [storage] attachments
    filename     TEXT,                         -- sanitised original name, metadata only
    content_type TEXT NOT NULL,
    size         INTEGER NOT NULL,
    inline       INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX attachments_message ON attachments (message_id, position);
CREATE INDEX attachments_sha256 ON attachments (sha256);
