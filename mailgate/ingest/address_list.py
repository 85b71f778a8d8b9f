"""Address headers (From, To, Cc, Reply-To) -> mailboxes, read as RFC 5322 section 3.4 says,
with encoded words kept whole.

The stdlib's `getaddresses` splits the header first and decodes afterwards, so a display name
whose encoded word holds a comma (`=?iso-8859-1?Q?M=FCller,=20Hans?= <hm@example.net>`, as
Outlook writes it) became two broken mailboxes; and decoding the address it found let
`=?x?q?someone=40other.example=3e=00?=@attacker.example` turn into another address. Here the
header is cut into tokens once, an encoded word being one token wherever it stands. Display
names and RFC 822 `(Name)` comments are decoded as mail clients show them; an addr-spec never
is (RFC 2047 section 5): it goes to `addresses.validate_address` exactly as written, without
its comments and white space.

Linear in the field: every token is one regex match, and comments nest without recursion.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from typing import NamedTuple

from mailgate.text import clean_line, decode_bytes, decode_words

_TOKEN = re.compile(
    r"""
    (?P<space>[ \t\r\n]+)
    | (?P<ew>=\?[^?\s]+\?[bBqQ]\?[^?\s]*\?=)       # an encoded word: one token, specials or not
    | (?P<qstr>"(?:[^"\\]|\\.)*+"?)                # a quoted string (to the end if unclosed)
    | (?P<literal>\[(?:[^\[\]\\]|\\.)*+\]?)         # a domain literal
    | (?P<atom>[^\s()<>\[\]:;@\\,."]+)
    | (?P<comment>\()
    | (?P<special>.)
    """,
    re.VERBOSE | re.DOTALL,
)
_COMMENT_PART = re.compile(r"[^()\\]++|\\.|[()]|\\", re.DOTALL)
_QUOTED_PAIR = re.compile(r"\\(.)", re.DOTALL)
_WORDS = frozenset({"atom", "ew", "qstr", "literal"})


class _Token(NamedTuple):
    kind: str  # atom, ew, qstr, literal, comment, special
    text: str  # as written; a comment's content without its parentheses
    spaced: bool  # white space or a comment came before it


class Mailbox(NamedTuple):
    """One element of an address list: its addr-spec as written and its decoded name."""

    addr_spec: str | None  # None: no addr-spec could be read from it
    name: str | None


def mailboxes(values: Iterable[str], *, limit: int) -> Iterator[Mailbox]:
    """The mailboxes of address header `values` (raw header values, 8-bit bytes kept as
    surrogates), at most `limit` of them; group names are dropped, group members kept."""
    count = 0
    for value in values:
        text = decode_bytes(value.encode("utf-8", "surrogateescape"), None)
        for element in _elements(_tokens(text)):
            found = _mailbox(element)
            if found is None:
                continue
            yield found
            count += 1
            if count == limit:
                return


def _tokens(text: str) -> Iterator[_Token]:
    pos, spaced = 0, False
    while pos < len(text):
        match = _TOKEN.match(text, pos)
        assert match is not None  # the last alternative takes any character
        kind = match.lastgroup or "special"
        if kind == "space":
            pos, spaced = match.end(), True
            continue
        if kind == "comment":
            content, pos = _comment(text, pos)
            yield _Token("comment", content, spaced)
            spaced = True
            continue
        yield _Token(kind, match.group(), spaced)
        pos, spaced = match.end(), False


def _comment(text: str, pos: int) -> tuple[str, int]:
    """The content of the comment opening at `pos` (nested ones included) and its end."""
    depth = 0
    parts: list[str] = []
    for part in _COMMENT_PART.finditer(text, pos):
        piece = part.group()
        if piece == "(":
            depth += 1
            if depth == 1:
                continue
        elif piece == ")":
            depth -= 1
            if not depth:
                return "".join(parts), part.end()
        elif piece.startswith("\\"):
            piece = piece[1:]
        parts.append(piece)
    return "".join(parts), len(text)  # never closed: the rest of the field is comment


def _elements(tokens: Iterator[_Token]) -> Iterator[list[_Token]]:
    """The address list's elements: split at `,` (and a group's `;`) outside `<...>`; a
    group's display name (up to its `:`) is dropped."""
    current: list[_Token] = []
    in_angle = False
    for token in tokens:
        if token.kind == "special":
            if token.text == "<":
                in_angle = True
            elif token.text == ">":
                in_angle = False
            elif not in_angle and token.text in ",;":
                yield current
                current = []
                continue
            elif not in_angle and token.text == ":":
                current = []
                continue
        current.append(token)
    yield current


def _mailbox(tokens: list[_Token]) -> Mailbox | None:
    """A name-addr (`Name <addr>`) or a bare addr-spec (`addr (Name)`); None if the element
    holds neither an angle address nor an @ (an empty element or a stray word)."""
    opening = _special_at(tokens, "<", 0)
    if opening is not None:
        closing = _special_at(tokens, ">", opening + 1)
        end = len(tokens) if closing is None else closing
        name = _phrase(tokens[:opening]) or _comment_name(tokens[end:])
        return Mailbox(_addr_spec(tokens[opening + 1 : end]), name)
    if _special_at(tokens, "@", 0) is None:
        return None
    last = max(i for i, token in enumerate(tokens) if token.kind != "comment")
    return Mailbox(_addr_spec(tokens[: last + 1]), _comment_name(tokens[last + 1 :]))


def _special_at(tokens: list[_Token], char: str, start: int) -> int | None:
    for index in range(start, len(tokens)):
        if tokens[index].kind == "special" and tokens[index].text == char:
            return index
    return None


def _addr_spec(tokens: list[_Token]) -> str | None:
    """The addr-spec as written, comments and white space left out; an obsolete route
    (`@relay:`) dropped. None if it cannot be one: two words without a dot between them
    (`john doe@example.org`), or a special other than `.` and `@`."""
    parts = [token for token in tokens if token.kind != "comment"]
    route = max(
        (i for i, t in enumerate(parts) if t.kind == "special" and t.text == ":"), default=-1
    )
    written: list[str] = []
    after_word = False
    for token in parts[route + 1 :]:
        word = token.kind in _WORDS
        if (word and after_word) or (not word and token.text not in ".@"):
            return None
        written.append(token.text)
        after_word = word
    return "".join(written) or None


def _phrase(tokens: list[_Token]) -> str | None:
    """A display name as clients show it: quoted strings unquoted, encoded words decoded
    (inside quotes too, as Outlook writes them), comments left out."""
    pieces: list[str] = []
    for token in tokens:
        if token.kind == "comment":
            continue
        text = _unquote(token.text) if token.kind == "qstr" else token.text
        pieces.append(f" {text}" if token.spaced and pieces else text)
    return _display("".join(pieces))


def _comment_name(tokens: list[_Token]) -> str | None:
    """The RFC 822 form `addr (Name)`: the first comment after the address is the name."""
    return next((_display(t.text) for t in tokens if t.kind == "comment"), None)


def _unquote(quoted: str) -> str:
    inner = quoted[1:-1] if len(quoted) > 1 and quoted.endswith('"') else quoted[1:]
    return _QUOTED_PAIR.sub(r"\1", inner)


def _display(text: str) -> str | None:
    return clean_line(decode_words(text)) or None
