-- Sender authentication per message, and flags that tell agents what not to trust.
ALTER TABLE messages ADD COLUMN auth TEXT;                       -- JSON; NULL when not checked
ALTER TABLE messages ADD COLUMN flags TEXT NOT NULL DEFAULT '[]'; -- e.g. unverified_sender
ALTER TABLE tickets ADD COLUMN flags TEXT NOT NULL DEFAULT '[]';
-- The global cap on automatic mail counts them all over a window.
CREATE INDEX outbox_automatic_all ON outbox (created_at) WHERE automatic = 1;
