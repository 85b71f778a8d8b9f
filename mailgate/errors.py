"""The MailgateError tree.

Imports nothing of mailgate, so every module can raise these without import loops.
"""


class MailgateError(Exception):
    """Base for every error mailgate raises on purpose."""


class ConfigError(MailgateError):
    """The configuration is unreadable or invalid; the message names the key."""


class StoreError(MailgateError):
    """The store refused an operation."""


class StoreUnavailable(StoreError, ConnectionError):
    """Transient (disk full, I/O error, locked): SMTP answers 451 and the sender retries."""


class NotFound(MailgateError, LookupError):
    """A ticket, message or quarantined row that the caller named does not exist."""


class Unparseable(MailgateError):
    """A stored message that cannot become a ticket; it goes to quarantine with this reason."""


class UsageError(MailgateError):
    """A command-line argument is unusable; the CLI exits with status 2, naming it."""
