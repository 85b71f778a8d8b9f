-- Rights, audit and statistics (issue 10).

-- What was done to personal data, when, by which command or link: the subject is a keyed hash
-- of the address (`privacy/audit.py`), never the address; `counts` is JSON of what was done,
-- in numbers; `reason` a category for erasures (no free text is kept).
CREATE TABLE audit (
    id      INTEGER PRIMARY KEY,
    at      REAL NOT NULL,
    action  TEXT NOT NULL,
    via     TEXT NOT NULL,
    subject TEXT,                                -- keyed hash; NULL: no person (a purge run)
    counts  TEXT NOT NULL DEFAULT '{}',
    reason  TEXT CHECK (reason IN ('request', 'under-16', 'other'))
);
CREATE INDEX audit_at ON audit (at);
CREATE INDEX audit_subject ON audit (subject) WHERE subject IS NOT NULL;

-- How often a closed ticket was opened again by a reply (statistics: the reopen rate).
ALTER TABLE tickets ADD COLUMN reopened INTEGER NOT NULL DEFAULT 0;

-- Attachment files of erased people still to be unlinked: written in the transaction that
-- deletes their rows, cleared once the files are gone, so an erasure cut short after its rows
-- went (or finished by `reconcile` at open) still removes every file.
CREATE TABLE erased_files (
    name TEXT PRIMARY KEY
) WITHOUT ROWID;
