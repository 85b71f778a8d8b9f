"""The DATA stream: where it ends and which dots are stuffing (RFC 5321 4.1.1.4, 4.5.2).

Lines may be of any length (Postfix takes them up to the message size), so the stream is not
read line by line: `DataReader` takes what the stream reader holds, at most `MAX_PIECE`,
whatever the lines are, and gives it out dot-unstuffed. A session therefore holds one piece
at a time, and a 25 MiB message costs a few hundred reads, not one per line.

Only CRLF "." CRLF ends the data (a dot between bare LFs or CRs is message text, so nothing
can be smuggled behind it), and only a dot right after a CRLF is stuffing. Both patterns
can straddle two reads; the bytes that may begin the end marker are held back until the
next read decides, and the reader never reads past the final dot: what a client pipelines
after it stays in the stream for the next command. For that, each read stops at the first
place where an end marker that may have begun could end (`StreamReader.readuntil` of the
marker's rest, or of the whole marker), never further.
"""

from __future__ import annotations

import asyncio

END = b"\r\n.\r\n"
MAX_PIECE = 64 * 1024
# What to read up to, by what is held: a marker that began in the held bytes (or begins in
# what comes) ends at the first of these; "" holds nothing that could begin one.
_UNTIL = {b"": END, b"\r": b".\r\n", b"\r\n": b".\r\n"}
_FINAL_DOT = len(END) - 2  # the ".\r\n" after the last line's CRLF


def _held_back(window: bytes) -> int:
    """How many bytes at the end of `window` could begin the end marker."""
    for n in range(min(len(END) - 1, len(window)), 0, -1):
        if window.endswith(END[:n]):
            return n
    return 0


class DataReader:
    """Reads one message's DATA from `reader`, piece by piece, up to the final dot."""

    def __init__(self, reader: asyncio.StreamReader, *, piece: int = MAX_PIECE) -> None:
        self._reader = reader
        self._piece = piece
        # Bytes read but not given out, because they may begin the end marker. At the start
        # it is the CRLF that ended the DATA command: the message starts at a line start.
        self._held = b"\r\n"
        self._first = True
        self._done = False
        self._consumed = 0

    @property
    def size(self) -> int:
        """The message's size on the wire (stuffed dots included), as far as it is known
        now: never more than it will be in the end, so a limit can be judged as it comes."""
        return max(self._consumed - _FINAL_DOT, 0)

    async def read(self) -> bytes | None:
        """The next piece of the message, dot-unstuffed; None once the final dot is read.

        Raises:
            asyncio.IncompleteReadError: the client closed the connection before the dot.
        """
        if self._done:
            return None
        until = _UNTIL.get(self._held)
        if until is None:  # "\r\n." or "\r\n.\r": the next byte or two decide
            piece = await self._reader.readexactly(len(END) - len(self._held))
        else:
            try:
                piece = await self._reader.readuntil(until)
            except asyncio.LimitOverrunError as exc:
                # Not in the buffer (or not within the limit): take what cannot end a marker
                # (what may stays in the reader's buffer), or a part of it.
                piece = await self._reader.readexactly(min(exc.consumed, self._piece))
        self._consumed += len(piece)
        window = self._held + piece if self._held else piece
        end = window.find(END)
        if end >= 0:
            assert end + len(END) == len(window), "read past the final dot"
            self._done = True
            out, self._held = window[: end + 2], b""  # the CRLF ends the last line
        else:
            keep = _held_back(window)
            out, self._held = window[: len(window) - keep], window[len(window) - keep :]
        # A held CRLF is always given out with what follows it, so every CRLF "." pattern is
        # whole in one `out`: unstuffing is a replace.
        out = out.replace(b"\r\n.", b"\r\n")
        if self._first and out:
            # The DATA command's CRLF comes out first, and whole: held bytes start with CR.
            out, self._first = out[2:], False
        return out
