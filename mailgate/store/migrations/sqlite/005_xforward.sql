-- The original client behind a trusted proxy (Postfix XFORWARD), as JSON: addr, name, helo,
-- proto, ident. NULL when the peer was the client itself. peer and helo stay the proxy's.
ALTER TABLE inbound ADD COLUMN forwarded TEXT;
