"""A value that a reload replaces while the daemon runs, and who wants to hear of it.

The daemon keeps its `Config` in one `Live[Config]` (`service.py`). A component whose
settings reload reads `live.current` where it uses them (at a session's start, at RCPT, at a
retention run), so the next use sees the new value and nothing needs rebuilding; one that
holds a derived object (a TLS context, a set of token hashes) registers `on_change` and
rebuilds it there. Imports nothing of mailgate: every layer may hold one.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Generic, TypeVar

T = TypeVar("T")
U = TypeVar("U")


class Live(Generic[T]):
    """The current value; `replace` swaps it and calls each `on_change` callback in turn."""

    def __init__(self, value: T) -> None:
        self._value = value
        self._callbacks: list[Callable[[T], None]] = []

    @staticmethod
    def of(value: U | Live[U]) -> Live[U]:
        """`value` itself if it is live, else a holder that no reload replaces (the CLI's
        commands and the tests hand components a plain value)."""
        return value if isinstance(value, Live) else Live(value)

    @property
    def current(self) -> T:
        return self._value

    def on_change(self, callback: Callable[[T], None]) -> None:
        """Call `callback(new)` after each `replace`, in the event loop: it must not block.

        What could be wrong with a new value is refused before `replace` (a reload checks
        the config and the templates first), so a callback only applies it.
        """
        self._callbacks.append(callback)

    def replace(self, value: T) -> None:
        self._value = value
        for callback in self._callbacks:
            callback(value)
