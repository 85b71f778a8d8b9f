-- Addresses compare by a key (addresses.address_key: the local part with full Unicode case
-- folding, the domain a lower-case A-label) kept beside the sender's own spelling, not by
-- SQLite's NOCASE, which folds ASCII only (STRASSE@ and straße@ were two requesters). The
-- migration runs with `address_key` registered as an SQL function on its connection.
-- And a message keeps the SHA-256 of its body: the same Message-ID and sender with another
-- body is another message, stored; only an exact repeat is a duplicate.

-- Requesters that the key makes one: the oldest row stays, the others' tickets and
-- verification links move to it, and it is verified if any of them was.
CREATE TEMP TABLE requester_keys AS
    SELECT id, address_key(email) AS email_key,
           min(id) OVER (PARTITION BY address_key(email)) AS keep
    FROM requesters;
UPDATE tickets SET requester_id = (
    SELECT keep FROM temp.requester_keys k WHERE k.id = tickets.requester_id
) WHERE requester_id IN (SELECT id FROM temp.requester_keys WHERE id != keep);
UPDATE verification_tokens SET requester_id = (
    SELECT keep FROM temp.requester_keys k WHERE k.id = verification_tokens.requester_id
) WHERE requester_id IN (SELECT id FROM temp.requester_keys WHERE id != keep);

CREATE TABLE requesters_new (
    id          INTEGER PRIMARY KEY,
    email       TEXT NOT NULL,                -- as the requester spelled it first
    email_key   TEXT NOT NULL UNIQUE,         -- address_key(email): what lookups compare
    name        TEXT,
    created_at  REAL NOT NULL,
    verified_at REAL
);
INSERT INTO requesters_new (id, email, email_key, name, created_at, verified_at)
    SELECT r.id, r.email, k.email_key, r.name, r.created_at,
           (SELECT min(o.verified_at) FROM requesters o
            JOIN temp.requester_keys ok ON ok.id = o.id WHERE ok.keep = k.id)
    FROM requesters r JOIN temp.requester_keys k ON k.id = r.id
    WHERE k.id = k.keep;
DROP TABLE requesters;
ALTER TABLE requesters_new RENAME TO requesters;
DROP TABLE temp.requester_keys;

CREATE TABLE participants_new (
    ticket_id INTEGER NOT NULL REFERENCES tickets (id) ON DELETE CASCADE,
    email     TEXT NOT NULL,
    email_key TEXT NOT NULL,
    PRIMARY KEY (ticket_id, email_key)
) WITHOUT ROWID;
INSERT OR IGNORE INTO participants_new (ticket_id, email, email_key)
    SELECT ticket_id, email, address_key(email) FROM participants ORDER BY ticket_id, email;
DROP TABLE participants;
ALTER TABLE participants_new RENAME TO participants;

CREATE TABLE undeliverable_new (
    email_key TEXT PRIMARY KEY,
    email     TEXT NOT NULL,
    status    TEXT NOT NULL,                  -- the DSN status code, e.g. 5.1.1
    since     REAL NOT NULL
) WITHOUT ROWID;
INSERT OR REPLACE INTO undeliverable_new (email_key, email, status, since)
    SELECT address_key(email), email, status, since FROM undeliverable ORDER BY since;
DROP TABLE undeliverable;
ALTER TABLE undeliverable_new RENAME TO undeliverable;

-- Messages stored before this have no digest: a repeat of one is kept as its own message
-- (flagged duplicate_message_id), since nothing can tell it is the same.
ALTER TABLE messages ADD COLUMN from_key TEXT NOT NULL DEFAULT '';
ALTER TABLE messages ADD COLUMN body_sha256 TEXT;
UPDATE messages SET from_key = address_key(from_email);
DROP INDEX messages_message_id;
CREATE INDEX messages_message_id ON messages (message_id, from_key);
