-- Privacy requests by mail (issue 10, `privacy/requests.py`, architecture rule 18).

-- A request asked by mail to `[privacy] address`, waiting for its link to be confirmed: bound
-- to the person, the action and the request's ticket, and to the address the link was mailed
-- to (its blind index: a corrected address confirms nothing). Only the token's SHA-256 is
-- kept, as for verification tokens; it is used once (`confirmed_at`), expires, and is revoked
-- by a bounce of its mail, by a newer request for the same action, or by an erasure.
CREATE TABLE privacy_requests (
    id           INTEGER PRIMARY KEY,
    person_id    INTEGER NOT NULL REFERENCES people (id) ON DELETE CASCADE,
    ticket_id    INTEGER NOT NULL REFERENCES tickets (id) ON DELETE CASCADE,
    action       TEXT NOT NULL CHECK (action IN ('export', 'erase', 'restrict', 'object')),
    blind        BLOB NOT NULL,              -- the blind index of the address mailed the link
    token_hash   TEXT NOT NULL UNIQUE,
    message_id   TEXT,                       -- the mail that carries the link
    created_at   REAL NOT NULL,
    expires_at   REAL NOT NULL,
    confirmed_at REAL,                       -- the link was confirmed (used): act
    done_at      REAL,                       -- acted on, its answer queued
    revoked_at   REAL
);
CREATE INDEX privacy_requests_person ON privacy_requests (person_id, action);
CREATE INDEX privacy_requests_ticket ON privacy_requests (ticket_id);
CREATE INDEX privacy_requests_message ON privacy_requests (message_id)
    WHERE message_id IS NOT NULL;
CREATE INDEX privacy_requests_unfinished ON privacy_requests (confirmed_at)
    WHERE confirmed_at IS NOT NULL AND done_at IS NULL;

-- The outbox, rebuilt (SQLite cannot change a CHECK or a NOT NULL in place) for:
-- * the privacy mails' kinds;
-- * system rows: a mail about no ticket to no person (`ticket_id`, `recipient_id` NULL),
--   sealed under a one-off key of its own in the key store (`seal_key`), which is destroyed
--   and the row deleted once the mail is sent or has failed. An erasure's confirmation is
--   one: it must outlive the person, their tickets and their key;
-- * `held_for`: a row is not sent while the person row with this id exists (the farewell
--   waits for its erasure to finish, a crash included: ids are never reused).
-- Rebuilding drops the table's indexes: each is made again below, 009's and 010's (as must
-- be any that a later migration numbered before this one adds to `outbox`).
CREATE TABLE outbox_new (
    id              INTEGER PRIMARY KEY AUTOINCREMENT,
    kind            TEXT NOT NULL CHECK (kind IN ('verification', 'ticket_created', 'agent_reply',
                    'privacy_confirm', 'privacy_export', 'privacy_done', 'privacy_erased')),
    ticket_id       INTEGER REFERENCES tickets (id) ON DELETE CASCADE,
    recipient_id    INTEGER REFERENCES people (id) ON DELETE CASCADE,
    seal_key        TEXT,
    held_for        INTEGER,
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
    sent_at         REAL,
    CHECK ((ticket_id IS NULL) = (seal_key IS NOT NULL))
);
INSERT INTO outbox_new (id, kind, ticket_id, recipient_id, mail, message_id, in_reply_to, refs,
    automatic, state, attempts, last_error, reply, created_at, next_attempt_at, sent_at)
SELECT id, kind, ticket_id, recipient_id, mail, message_id, in_reply_to, refs, automatic, state,
    attempts, last_error, reply, created_at, next_attempt_at, sent_at FROM outbox;
-- Ids are never reused: the high-water mark moves with the table.
DELETE FROM sqlite_sequence WHERE name = 'outbox_new';
INSERT INTO sqlite_sequence (name, seq) SELECT 'outbox_new', seq FROM sqlite_sequence
    WHERE name = 'outbox';
DROP TABLE outbox;
ALTER TABLE outbox_new RENAME TO outbox;
CREATE INDEX outbox_due ON outbox (next_attempt_at) WHERE state = 'queued';
CREATE INDEX outbox_automatic ON outbox (recipient_id, created_at) WHERE automatic = 1;
CREATE INDEX outbox_automatic_all ON outbox (created_at) WHERE automatic = 1;
CREATE INDEX outbox_recipient ON outbox (recipient_id);
CREATE INDEX outbox_sent ON outbox (sent_at) WHERE state = 'sent';
CREATE INDEX outbox_failed ON outbox (next_attempt_at) WHERE state = 'failed';
CREATE INDEX outbox_held ON outbox (held_for) WHERE held_for IS NOT NULL;
