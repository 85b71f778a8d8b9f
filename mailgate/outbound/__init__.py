"""The outgoing side: compose mails from templates, deliver them from the outbox."""
