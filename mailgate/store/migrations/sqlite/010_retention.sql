-- Retention (issue 10, `privacy/retention.py`): the daily purge finds what is due by its time,
-- through these indexes rather than a scan of every row (a scan of inbound would read every
-- raw message to reach the columns after it). No expression indexes: SQLite refuses BLOB I/O
-- (`blobopen`, how large raw messages are written) on a table that has one.
CREATE INDEX inbound_ingested ON inbound (processed_at) WHERE state = 'ingested';
CREATE INDEX inbound_quarantined_at ON inbound (processed_at) WHERE state = 'quarantined';
CREATE INDEX tickets_closed ON tickets (closed_at) WHERE status = 'closed';
CREATE INDEX outbox_sent ON outbox (sent_at) WHERE state = 'sent';
CREATE INDEX outbox_failed ON outbox (next_attempt_at) WHERE state = 'failed';
CREATE INDEX verification_tokens_created ON verification_tokens (created_at);
CREATE INDEX people_unverified ON people (created_at) WHERE verified_at IS NULL;
