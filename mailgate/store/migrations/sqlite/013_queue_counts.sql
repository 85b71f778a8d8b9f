-- The queues' counts (`Store.queues`: `mailgate status`, `/healthz`, `/metrics`, systemd's
-- STATUS=) read one partial index per state, never the tables: a scan of inbound reads every
-- raw message's pages (0.4 s at 100,000 rows, where a health check has 2 s). 'sending' was
-- the one state without an index of its own.
CREATE INDEX outbox_sending ON outbox (created_at) WHERE state = 'sending';
