-- A verification link knows the mail that carried it (its Message-ID), so a permanent bounce
-- of that mail revokes it; a link found in a stored bounce is revoked too. A revoked link
-- answers 410 and verifies no one. Links issued before this have no Message-ID: only the
-- copy of one found in a bounce revokes them.
ALTER TABLE verification_tokens ADD COLUMN message_id TEXT;
ALTER TABLE verification_tokens ADD COLUMN revoked_at REAL;
CREATE INDEX verification_tokens_message ON verification_tokens (message_id)
    WHERE message_id IS NOT NULL;

-- The relay's whole reply to the last attempt (per refused recipient and to DATA), as text.
ALTER TABLE outbox ADD COLUMN reply TEXT;
