"""mailgate: an email-to-ticket gateway that never loses a message."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("mailgate")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0"
