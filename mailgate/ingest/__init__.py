"""Ingest: stored raw bytes -> parsed mail -> ticket, after the 250 and off the SMTP path."""
