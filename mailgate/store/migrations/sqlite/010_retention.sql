-- Retention (issue 10, `privacy/retention.py`): the daily purge finds what is due by its time,
-- through these indexes rather than a scan of every row.
CREATE INDEX inbound_done ON inbound (coalesce(processed_at, received_at))
    WHERE state != 'received';
CREATE INDEX tickets_closed ON tickets (closed_at) WHERE status = 'closed';
-- When a row was finished: sent_at, or for a failed row the time of its last attempt.
CREATE INDEX outbox_finished ON outbox (coalesce(sent_at, next_attempt_at))
    WHERE state IN ('sent', 'failed');
CREATE INDEX verification_tokens_created ON verification_tokens (created_at);
CREATE INDEX people_unverified ON people (created_at) WHERE verified_at IS NULL;
