-- A message whose sender checks ran into DNS trouble waits, still 'received', for its next
-- check (as an MTA defers); `attempts` counts the checks so far.
ALTER TABLE inbound ADD COLUMN attempts INTEGER NOT NULL DEFAULT 0;
ALTER TABLE inbound ADD COLUMN retry_at REAL;                     -- unix time; NULL: due now
