"""The DATA stream reader against the rule it implements, on streams cut at every place.

The rule (RFC 5321 4.1.1.4, 4.5.2), as the line-by-line reader it replaced applied it: lines
end at CRLF only, the line "." ends the data, a leading dot of any other line is removed.
`DataReader` reads pieces instead of lines; what it gives out, and where it stops reading,
must be the same whatever the lines' lengths and wherever the network cuts the stream.
"""

from __future__ import annotations

import asyncio

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mailgate.smtp_data import DataReader

LIMIT = 64  # a small stream limit, so that pieces and long lines are the common case


def by_lines(stream: bytes) -> tuple[bytes, int] | None:
    """The content and the bytes consumed up to the final dot, read line by line."""
    out = bytearray()
    pos = 0
    while (end := stream.find(b"\r\n", pos)) >= 0:
        line, pos = stream[pos : end + 2], end + 2
        if line == b".\r\n":
            return bytes(out), pos
        out += line[1:] if line.startswith(b".") else line
    return None


async def by_pieces(
    chunks: list[bytes], *, limit: int = LIMIT, piece: int = LIMIT
) -> tuple[bytes, bytes, int]:
    """Feed `chunks` one by one as a network would; return content, what is left in the
    stream for the next command, and the size the reader judged."""
    reader = asyncio.StreamReader(limit=limit)

    async def network() -> None:
        for chunk in chunks:
            reader.feed_data(chunk)
            await asyncio.sleep(0)
        reader.feed_eof()

    feeding = asyncio.create_task(network())
    data = DataReader(reader, piece=piece)
    out = bytearray()
    while (got := await data.read()) is not None:
        out += got
    await feeding
    return bytes(out), await reader.read(), data.size


# Lines built of the bytes that matter (dots, CR, LF) and filler, some far longer than LIMIT.
_LINE = st.lists(
    st.sampled_from([b".", b"\r", b"\n", b"\r\n", b"x", b"..", b"\r\n.", b"y" * 100]),
    max_size=12,
).map(b"".join)


@st.composite
def streams(draw: st.DrawFn) -> tuple[bytes, list[bytes]]:
    body = b"".join(line + b"\r\n" for line in draw(st.lists(_LINE, max_size=10)))
    stream = body + b".\r\n" + draw(st.sampled_from([b"", b"QUIT\r\n", b".\r\n", b"\r\n.\r\n"]))
    cuts = sorted(draw(st.sets(st.integers(1, max(len(stream) - 1, 1)), max_size=8)))
    chunks = [stream[a:b] for a, b in zip([0, *cuts], [*cuts, len(stream)], strict=True)]
    return stream, [c for c in chunks if c]


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=streams(), limit=st.integers(5, 40), piece=st.integers(1, 50))
def test_pieces_give_what_lines_give_and_stop_at_the_final_dot(
    case: tuple[bytes, list[bytes]], limit: int, piece: int
) -> None:
    # Small stream limits and pieces: every way a marker or a stuffed dot can straddle.
    stream, chunks = case
    expected = by_lines(stream)
    assert expected is not None
    content, consumed = expected
    got, left, size = asyncio.run(by_pieces(chunks, limit=limit, piece=piece))
    assert got == content
    assert left == stream[consumed:]  # nothing read past the dot: pipelined commands stay
    assert size == consumed - 3  # the wire size, stuffed dots in, final ".\r\n" out


def test_a_line_of_a_megabyte_comes_in_pieces() -> None:
    line = b"." + b"z" * 1_000_000 + b"\r\n"  # stuffed: its first dot goes

    async def pieces() -> list[int]:
        reader = asyncio.StreamReader(limit=LIMIT)
        reader.feed_data(line + b".\r\nQUIT\r\n")
        data = DataReader(reader, piece=LIMIT)
        sizes = []
        while (piece := await data.read()) is not None:
            sizes.append(len(piece))
        assert await reader.readexactly(6) == b"QUIT\r\n"
        return sizes

    sizes = asyncio.run(pieces())
    assert sum(sizes) == len(line) - 1
    assert max(sizes) <= LIMIT + len(b"\r\n.\r\n")
    assert len(sizes) < 2 * len(line) / LIMIT  # pieces, not bytes: no read of a few bytes


def test_empty_lines_are_read_in_pieces_too() -> None:
    # CRLF after CRLF: each piece ends with a CR or a CRLF that may begin the marker; the
    # next read must still be a piece, not the few bytes that decide.
    async def reads() -> int:
        reader = asyncio.StreamReader(limit=LIMIT)
        reader.feed_data(b"\r\n" * 100_000 + b".\r\n")
        data = DataReader(reader, piece=LIMIT)
        count = 0
        while await data.read() is not None:
            count += 1
        return count

    assert asyncio.run(reads()) < 2 * 200_000 / LIMIT


def test_an_empty_message_and_a_lone_dot_line() -> None:
    assert asyncio.run(by_pieces([b".\r\nNOOP\r\n"]))[:2] == (b"", b"NOOP\r\n")
    assert asyncio.run(by_pieces([b"..\r\n.\r\n"]))[0] == b".\r\n"
    # Bare LF and CR around a dot are message text (no smuggling).
    smuggle = b"a\n.\nb\r.\rc\n.\r\nd\r\n.\r\n"
    assert asyncio.run(by_pieces([smuggle]))[0] == b"a\n.\nb\r.\rc\n.\r\nd\r\n"
