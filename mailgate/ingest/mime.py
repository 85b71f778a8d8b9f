"""Raw bytes -> a tree of stdlib messages, read in one linear pass with hard limits.

The stdlib's feedparser nests one Python generator per MIME level (a few hundred levels raise
`RecursionError`), tests every line against every open boundary (quadratic in the nesting),
parses each header through the policy while it finds the structure (`policy.default` raises on
broken RFC 2231 parameters) and keeps everything it reads. Hostile mail aims at exactly that.
Here the structure is found by scanning the bytes once, under the limits below; the stdlib
only ever parses one capped header block at a time (compat32, which never raises on malformed
parameters) and never the structure, so it never sees the pathological input in full.

`message/*` parts are leaves: a forwarded or returned message is kept as its raw bytes, and
nested messages add no depth. Boundaries follow RFC 2046 as the feedparser reads them: a line
is a delimiter when it is `--boundary` (or `--boundary--`) plus trailing blanks, for the
boundary of any enclosing multipart; the line ending before it belongs to it.
"""

from __future__ import annotations

import email.policy
import re
from dataclasses import dataclass
from email.message import Message
from email.parser import BytesParser
from typing import NamedTuple

MAX_DEPTH = 50  # multipart nesting; a deeper multipart is kept as one unread part
MAX_PARTS = 1000  # MIME parts, the message itself included; the rest is not read
MAX_HEADER_BLOCK = 1024 * 1024  # one part's header block; fields past it are dropped
MAX_HEADER_FIELD = 64 * 1024  # one header field, its folded lines included; cut there
# Content-Type and Content-Disposition: the stdlib's parameter parsing copies the rest of the
# field for each `;` and runs a few times per part, so it is quadratic in these. Real ones,
# long RFC 2231 filenames included, stay far below both.
MAX_PARAMETER_FIELD = 4 * 1024
MAX_PARAMETERS = 64  # `;`-separated parts of those fields (real ones have a handful)
# Fields in one header block: the stdlib spends microseconds on each, and a 25 MiB message
# of two-byte fields would otherwise cost the whole time budget. A part's own header (not
# the message's) holds a few MIME fields; a nested message's header is not parsed.
MAX_HEADER_FIELDS = 1000
MAX_PART_HEADER_FIELDS = 100

# What each limit costs the reader, for the note on the ticket.
LIMIT_NOTES = {
    "parts": f"more than {MAX_PARTS} MIME parts: the rest of the message was not read",
    "depth": f"MIME parts nested over {MAX_DEPTH} levels deep: kept unread, as attachments",
    "header block": (
        f"a header block over {MAX_HEADER_BLOCK // 1024} KiB or {MAX_HEADER_FIELDS} fields"
        f" ({MAX_PART_HEADER_FIELDS} in a part): later fields dropped"
    ),
    "header field": f"a header field over {MAX_HEADER_FIELD // 1024} KiB: cut short",
    "parameter field": (
        f"a Content-Type or Content-Disposition over {MAX_PARAMETER_FIELD // 1024} KiB or"
        f" {MAX_PARAMETERS} parameters: cut short"
    ),
}

_EOL = re.compile(rb"\r\n|\r|\n")
_BARE_EOL = re.compile(rb"\r(?!\n)|(?<!\r)\n")
_FIELD_NAME = re.compile(rb"[\x21-\x39\x3b-\x7e]+")
# A header or continuation line, as the feedparser tells them from the body (its headerRE).
_HEADER_LINE = re.compile(rb"From |[\x21-\x39\x3b-\x7e]*:|[\t ]")
# Header lines (complete, with their line endings), as many as follow; possessive: no
# backtracking on a 10 MB line.
_HEADER_LINES = re.compile(rb"(?:(?:From |[\x21-\x39\x3b-\x7e]*+:|[\t ])[^\r\n]*+(?:\r\n|\r|\n))*+")
_PARAMETER_FIELD = re.compile(rb"content-(?:type|disposition)[ \t]*:", re.IGNORECASE)
_PARAMETERS = re.compile(rb"(?:[^;]*+;){%d}" % MAX_PARAMETERS)  # up to the last one allowed
# One header field: a line and its continuation lines (the last may lack its line ending).
_FIELD = re.compile(rb"[^\r\n]++(?:\r\n|\r|\n)?(?:[\t ][^\r\n]*+(?:\r\n|\r|\n)?)*+")


@dataclass(frozen=True, slots=True)
class HeaderView:
    """The message's own header block as the reader split it: the one view of the header
    that every reader (the stdlib, DKIM, the From that becomes the requester) gets.

    A line ends at CRLF, CR or LF alike (as the stdlib's parser reads it); `block` is capped
    as the limits say. `bare_line_ending` tells that some line did not end with CRLF: other
    software (dkimpy splits only at CRLF and LF) would have read other fields.
    """

    block: bytes
    body_start: int  # offset of the body in the raw message
    bare_line_ending: bool

    def fields(self) -> list[tuple[bytes, bytes]]:
        """(name, value) of each field, in order; the value's lines end with CRLF."""
        found = []
        for match in _FIELD.finditer(self.block):
            name, colon, value = match.group().partition(b":")
            if colon and _FIELD_NAME.fullmatch(name):
                found.append((name, _EOL.sub(b"\r\n", value.rstrip(b"\r\n")) + b"\r\n"))
        return found


class ReadMessage(NamedTuple):
    message: Message
    limits: frozenset[str]
    header: HeaderView


def read_message(raw: bytes) -> ReadMessage:
    """Parse `raw` into a compat32 message tree; also name the limits it ran into."""
    reader = _Reader(raw)
    root = reader.part(depth=0, fences=())
    assert reader.header is not None
    return ReadMessage(root, frozenset(reader.limits), reader.header)


def read_header(raw: bytes) -> HeaderView:
    """Read only the message's own header block, exactly as `read_message` reads it."""
    reader = _Reader(raw)
    reader.root_header()
    assert reader.header is not None
    return reader.header


class _Reader:
    """One pass over the bytes; `pos` is always at the start of a line."""

    def __init__(self, raw: bytes) -> None:
        self.raw = raw
        self.pos = 0
        self.parts = 0
        self.limits: set[str] = set()
        self._searches: dict[tuple[bytes, ...], re.Pattern[bytes]] = {}
        self._headers_parser = BytesParser(policy=email.policy.compat32)
        self.header: HeaderView | None = None  # the message's own, once read

    def root_header(self) -> Message:
        """Read the message's own header block (at `pos` 0) and keep its view."""
        start = self.pos
        msg, block = self._headers((), MAX_HEADER_FIELDS)
        self.header = HeaderView(
            block, self.pos, _BARE_EOL.search(self.raw, start, self.pos) is not None
        )
        return msg

    def part(self, *, depth: int, fences: tuple[bytes, ...]) -> Message:
        """Read one part from `pos`: its headers, then its body up to the next delimiter.

        `fences` are the delimiters (`--boundary`) of the enclosing multiparts, innermost last.
        """
        self.parts += 1
        msg = self.root_header() if not depth else self._headers(fences, MAX_PART_HEADER_FIELDS)[0]
        delimiter = _delimiter(msg)
        if delimiter is not None and depth >= MAX_DEPTH:
            self.limits.add("depth")
        elif delimiter is not None:
            self._multipart(msg, depth=depth, fences=fences, delimiter=delimiter)
            return msg
        end, _ = self._next_fence(fences)
        msg.set_payload(_text(self._body(end, trim=bool(fences))))
        return msg

    def _multipart(
        self, msg: Message, *, depth: int, fences: tuple[bytes, ...], delimiter: bytes
    ) -> None:
        inner = (*fences, delimiter)
        mine = len(fences)
        start, found = self._next_fence(inner)
        if found != (mine, False):
            # No opening delimiter: the body is text, as the feedparser reads it. After a
            # closing delimiter without an opening one, the rest of this part is dropped.
            msg.set_payload(_text(self._body(start, trim=bool(fences))))
            if found == (mine, True):
                self.pos, _ = self._next_fence(fences)
            return
        msg.preamble = _text(self._body(start, trim=True))
        repeats = re.compile(b"(?:" + re.escape(delimiter) + rb"[ \t]*+(?:\r\n|\r|\n))*+")
        children: list[Message | str] = []  # the type set_payload asks for
        while True:
            # At one of our delimiters; repeated ones make no empty parts.
            self.pos = _match_end(repeats, self.raw, self.pos)
            while self._fence_here(inner) == (mine, False):  # the last one, or one at the end
                self.pos = self._line_end(self.pos)
            if self.parts >= MAX_PARTS:
                self.limits.add("parts")
                self.pos = len(self.raw)
                break
            children.append(self.part(depth=depth + 1, fences=inner))
            found = self._fence_here(inner)
            if found is None or found[0] != mine:
                break  # the end of the message, or an enclosing multipart's delimiter
            if found[1]:
                self.pos = self._line_end(self.pos)
                end, _ = self._next_fence(fences)
                msg.epilogue = _text(self._body(end, trim=bool(fences)))
                break
        msg.set_payload(children)

    def _headers(self, fences: tuple[bytes, ...], max_fields: int) -> tuple[Message, bytes]:
        """Read a header block into a message, each field and the block capped; also return
        the block as the stdlib parsed it."""
        raw, start = self.raw, self.pos
        end = _match_end(_HEADER_LINES, raw, start)
        if end < len(raw) and _HEADER_LINE.match(raw, end) and not _EOL.search(raw, end):
            end = len(raw)  # a last header line without a line ending
        if fences:  # a delimiter ends the block, even one that looks like a header line
            end, _ = self._find_fence(fences, start, end)
        self.pos = end
        if raw.startswith((b"\r\n", b"\n", b"\r"), end):  # the blank line after the block
            self.pos = self._line_end(end)
        block = raw[start:end]
        lines = block.count(b"\n") + block.count(b"\r")  # at least the number of fields
        semicolons = block.count(b";")  # at least the parameters of any one field
        # Else no limit can be reached: the common case, with no look at each field.
        if len(block) > MAX_PARAMETER_FIELD or lines > max_fields or semicolons >= MAX_PARAMETERS:
            block = self._capped(start, end, max_fields)
        if block and not block.endswith((b"\n", b"\r")):
            block += b"\n"
        return self._headers_parser.parsebytes(block + b"\n", headersonly=True), block

    def _capped(self, start: int, end: int, max_fields: int) -> bytes:
        """The header fields in `raw[start:end]`, each cut at MAX_HEADER_FIELD, as many as fit
        in MAX_HEADER_BLOCK and `max_fields`; the rest are dropped."""
        kept: list[bytes] = []
        kept_size = 0
        for found in _FIELD.finditer(self.raw, start, end):
            field = found.group()
            if _PARAMETER_FIELD.match(field) and (
                len(field) > MAX_PARAMETER_FIELD or field.count(b";") >= MAX_PARAMETERS
            ):
                self.limits.add("parameter field")
                field = _cut_parameters(field)
            elif len(field) > MAX_HEADER_FIELD:
                self.limits.add("header field")
                field = _cut(field, MAX_HEADER_FIELD)
            if len(kept) == max_fields or kept_size + len(field) > MAX_HEADER_BLOCK:
                self.limits.add("header block")
                break
            if field:
                kept.append(field)
                kept_size += len(field)
        return b"".join(kept)

    def _body(self, end: int, *, trim: bool) -> bytes:
        """Take the bytes from `pos` to `end`; inside a multipart, the last line ending
        belongs to the delimiter that follows (RFC 2046 5.1.1)."""
        data = self.raw[self.pos : end]
        self.pos = end
        if trim:
            if data.endswith(b"\r\n"):
                return data[:-2]
            if data.endswith((b"\n", b"\r")):
                return data[:-1]
        return data

    def _line_end(self, pos: int) -> int:
        found = _EOL.search(self.raw, pos)
        return found.end() if found else len(self.raw)

    def _fence_here(self, fences: tuple[bytes, ...]) -> tuple[int, bool] | None:
        """Which delimiter the line at `pos` is: (index in `fences`, closing), or None."""
        return self._fence_at(self.pos, fences)

    def _fence_at(self, at: int, fences: tuple[bytes, ...]) -> tuple[int, bool] | None:
        if not fences or not self.raw.startswith(b"--", at):
            return None
        return _which_fence(self.raw[at : self._line_end(at)], fences)

    def _search(self, fences: tuple[bytes, ...]) -> re.Pattern[bytes]:
        """A search for a line ending followed by a delimiter line of any of `fences`."""
        search = self._searches.get(fences)
        if search is None:
            alternatives = b"|".join(re.escape(fence) for fence in set(fences))
            search = self._searches[fences] = re.compile(
                b"[\r\n](?:" + alternatives + rb")(?:--)?[ \t]*+(?:\r\n|\r|\n|\Z)"
            )
        return search

    def _next_fence(self, fences: tuple[bytes, ...]) -> tuple[int, tuple[int, bool] | None]:
        """Find the next delimiter line from `pos`: (its offset, which) or (the end, None)."""
        return self._find_fence(fences, self.pos, len(self.raw))

    def _find_fence(
        self, fences: tuple[bytes, ...], start: int, end: int
    ) -> tuple[int, tuple[int, bool] | None]:
        """The first delimiter line in `raw[start:end]`, `start` being the start of a line."""
        if not fences:
            return end, None
        which = self._fence_at(start, fences)
        if which is not None:
            return start, which
        # The search runs in C; what it finds is then told apart (which fence, closing).
        for candidate in self._search(fences).finditer(self.raw, start, end):
            which = self._fence_at(candidate.start() + 1, fences)
            if which is not None:
                return candidate.start() + 1, which
        return end, None


def _match_end(pattern: re.Pattern[bytes], data: bytes, pos: int) -> int:
    """Where a match of `pattern` (one that may be empty) at `pos` ends."""
    found = pattern.match(data, pos)
    return found.end() if found else pos


def _cut(field: bytes, limit: int) -> bytes:
    """A header field cut at `limit`: never blank (a blank line would end the block), and
    gone if its name alone is longer."""
    cut = field[:limit].rstrip(b"\r\n")
    return cut + b"\n" if _HEADER_LINE.match(cut) else b""


def _cut_parameters(field: bytes) -> bytes:
    """A Content-Type or Content-Disposition cut at MAX_PARAMETER_FIELD bytes and before its
    MAX_PARAMETERS-th `;` (quoted or not: the stdlib rescans the field for each one)."""
    cut = field[:MAX_PARAMETER_FIELD]
    found = _PARAMETERS.match(cut)
    if found:
        cut = cut[: found.end() - 1]
    return cut.rstrip(b" \t\r\n") + b"\n"


def _which_fence(line: bytes, fences: tuple[bytes, ...]) -> tuple[int, bool] | None:
    # `--boundary`, then `--` for the closing one, then blanks, then the line ending.
    token = line.rstrip(b"\r\n").rstrip(b" \t")
    for index in range(len(fences) - 1, -1, -1):  # innermost first, as the feedparser
        if token == fences[index]:
            return index, False
        if token == fences[index] + b"--":
            return index, True
    return None


def _delimiter(msg: Message) -> bytes | None:
    """`--boundary` of a multipart, or None if `msg` is not one (or names no boundary)."""
    try:
        if msg.get_content_maintype() != "multipart":
            return None
        boundary = msg.get_boundary()
    except Exception:  # noqa: BLE001 - malformed parameters: read the part as a leaf
        return None
    if boundary is None:
        return None
    try:
        delimiter = b"--" + boundary.encode("ascii", "surrogateescape")
    except UnicodeEncodeError:  # decoded from RFC 2231 to non-ASCII: never in the body
        return None
    # A delimiter is one line; a boundary that spans lines can never be found.
    return None if b"\r" in delimiter or b"\n" in delimiter else delimiter


def _text(data: bytes) -> str:
    """Payload bytes as the stdlib keeps them: 8-bit bytes as surrogates."""
    return data.decode("ascii", "surrogateescape")
