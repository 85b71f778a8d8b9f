"""Property: whatever bytes arrive, ingest stores them or quarantines them, and goes on.

Hypothesis builds MIME messages (random headers, boundaries, charsets, transfer encodings,
nesting, RFC 2047 words and RFC 2231 parameters) and then mutates them (truncation, byte
flips, CR/LF/NUL and delimiter injection, repeated slices that nest deeper). Each goes through
the real ingest path: a row in a real SQLite store, `IngestWorker.ingest` with the real parser
process, in one batch with a normal mail. Bounded for CI; the open-ended search is
`bench/fuzz_parse.py`.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mailgate.config import load_config
from mailgate.errors import Unparseable
from mailgate.ingest.parse import parse_mail
from mailgate.ingest.prepare import ParserPool
from mailgate.ingest.worker import IngestWorker
from mailgate.model import Envelope
from mailgate.msgid import message_ids
from mailgate.store import SqliteStore, open_keyring
from tests.conftest import mail, write_config

CHARSETS = [
    "utf-8", "us-ascii", "iso-8859-1", "windows-1252", "koi8-r", "shift_jis", "iso-2022-jp",
    "euc-kr", "ks_c_5601-1987", "gb2312", "utf-16", "utf-7", "x-unknown", "", '"utf-8"',
]  # fmt: skip
ENCODINGS = ["7bit", "8bit", "binary", "base64", "quoted-printable", "x-uuencode", "bogus", ""]
TYPES = [
    "text/plain", "text/html", "application/octet-stream", "image/png", "message/rfc822",
    "message/delivery-status", "text/rfc822-headers", "multipart/mixed", "bogus", "",
]  # fmt: skip
NASTY = [
    b"\r", b"\n", b"\x00", b"\r\n", b"\r\n ", b"\n\n", b"--", b";", b'"', b"=?", b"?=", b"*",
    b"\xff", b"\xc3", b"\t", b"\\", b"%", b"<", b">", b"(", b")", b":", b"=", b"'",
]  # fmt: skip

nasty_bytes = st.lists(st.sampled_from(NASTY), max_size=12).map(b"".join)
text_bytes = st.one_of(
    st.binary(max_size=120),
    st.text(max_size=60).map(lambda t: t.encode("utf-8", "surrogatepass")),
    nasty_bytes,
)
token = st.text("abcxyzABC0129-_.", min_size=0, max_size=12).map(str.encode)


@st.composite
def encoded_word(draw: st.DrawFn) -> bytes:
    """An RFC 2047 word, well formed or not."""
    charset = draw(st.sampled_from(CHARSETS)).encode()
    kind = draw(st.sampled_from([b"q", b"b", b"Q", b"B", b"x", b""]))
    text = draw(text_bytes)
    if kind in (b"b", b"B") and draw(st.booleans()):
        import base64

        text = base64.b64encode(text)
    return b"=?" + charset + b"?" + kind + b"?" + text + b"?="


@st.composite
def parameters(draw: st.DrawFn) -> bytes:
    """`; name=value` parameters: plain, quoted, RFC 2231 (continued, charset'lang'%xx)."""
    out = b""
    for _ in range(draw(st.integers(0, 4))):
        name = draw(st.sampled_from([b"name", b"filename", b"charset", b"boundary", b"x"]))
        form = draw(st.integers(0, 4))
        value = draw(st.one_of(token, text_bytes, encoded_word()))
        if form == 0:
            out += b"; " + name + b"=" + value
        elif form == 1:
            out += b"; " + name + b'="' + value + b'"'
        elif form == 2:
            out += b"; " + name + b"*=" + draw(token) + b"'" + draw(token) + b"'" + value
        elif form == 3:
            out += b"; " + name + b"*" + str(draw(st.integers(-1, 3))).encode() + b"*=" + value
        else:
            out += b"; " + name + draw(st.sampled_from([b"*", b"*0*", b"=", b""]))
    return out


@st.composite
def header_value(draw: st.DrawFn) -> bytes:
    parts = draw(
        st.lists(
            st.one_of(
                text_bytes,
                encoded_word(),
                token.map(lambda t: b"<" + t + b"@example.org>"),
                token.map(lambda t: t + b"@" + t),
            ),
            max_size=4,
        )
    )
    return draw(st.sampled_from([b" ", b", ", b"", b"\r\n "])).join(parts)


@st.composite
def headers(draw: st.DrawFn, *, content_type: bytes | None) -> bytes:
    """A header block: random fields, and the part's own Content-Type if it has one."""
    names = [
        b"From", b"To", b"Cc", b"Subject", b"Message-ID", b"References", b"In-Reply-To",
        b"Content-Transfer-Encoding", b"Content-Disposition", b"Auto-Submitted", b"Reply-To",
        b"X-Random", b"MIME-Version",
    ]  # fmt: skip
    fields = []
    for _ in range(draw(st.integers(0, 5))):
        name = draw(st.sampled_from(names))
        if name == b"Content-Transfer-Encoding":
            value = draw(st.sampled_from(ENCODINGS)).encode()
        elif name == b"Content-Disposition":
            value = draw(st.sampled_from([b"inline", b"attachment", b""])) + draw(parameters())
        else:
            value = draw(header_value())
        fields.append(name + b": " + value)
    if content_type is not None:
        fields.insert(draw(st.integers(0, len(fields))), b"Content-Type: " + content_type)
    eol = draw(st.sampled_from([b"\r\n", b"\n"]))
    return b"".join(field + eol for field in fields) + eol


@st.composite
def leaf(draw: st.DrawFn) -> bytes:
    ctype = draw(st.sampled_from(TYPES)).encode()
    charset = draw(st.sampled_from(CHARSETS)).encode()
    content_type = ctype + b"; charset=" + charset + draw(parameters())
    body = draw(st.one_of(text_bytes, nasty_bytes, st.binary(max_size=400)))
    if draw(st.booleans()):
        import base64

        body = base64.encodebytes(body)
    return draw(headers(content_type=content_type)) + body


def multipart(children: st.SearchStrategy[bytes]) -> st.SearchStrategy[bytes]:
    @st.composite
    def build(draw: st.DrawFn) -> bytes:
        boundary = draw(st.one_of(token, st.text("ab '()+_,-./:=?", max_size=72).map(str.encode)))
        subtype = draw(st.sampled_from([b"mixed", b"alternative", b"related", b"report", b"x"]))
        quoted = draw(st.booleans())
        value = b'"' + boundary + b'"' if quoted else boundary
        content_type = b"multipart/" + subtype + b"; boundary=" + value + draw(parameters())
        eol = draw(st.sampled_from([b"\r\n", b"\n"]))
        body = draw(text_bytes) + eol  # the preamble
        for child in draw(st.lists(children, max_size=4)):
            body += b"--" + boundary + eol + child + eol
        if draw(st.booleans()):  # the closing delimiter, and an epilogue
            body += b"--" + boundary + b"--" + eol + draw(text_bytes)
        return draw(headers(content_type=content_type)) + body

    return build()


def nested_message(children: st.SearchStrategy[bytes]) -> st.SearchStrategy[bytes]:
    return children.map(lambda inner: b"Content-Type: message/rfc822\r\n\r\n" + inner)


mime_tree = st.recursive(
    leaf(), lambda children: st.one_of(multipart(children), nested_message(children)), max_leaves=8
)


@st.composite
def mutated(draw: st.DrawFn, raw: bytes) -> bytes:
    """Cut, flip, inject and repeat bytes of `raw`."""
    for _ in range(draw(st.integers(0, 4))):
        if not raw:
            break
        at = draw(st.integers(0, len(raw)))
        op = draw(st.sampled_from(["truncate", "flip", "insert", "repeat", "delete", "lf"]))
        if op == "truncate":
            raw = raw[:at]
        elif op == "flip" and at < len(raw):
            raw = raw[:at] + bytes([draw(st.integers(0, 255))]) + raw[at + 1 :]
        elif op == "insert":
            raw = raw[:at] + draw(nasty_bytes) + raw[at:]
        elif op == "repeat":  # repeated slices nest multiparts deeper than generated
            end = draw(st.integers(at, min(len(raw), at + 400)))
            raw = raw[:at] + raw[at:end] * draw(st.integers(2, 60)) + raw[end:]
        elif op == "delete":
            raw = raw[:at] + raw[draw(st.integers(at, len(raw))) :]
        elif op == "lf":
            raw = raw.replace(b"\r\n", b"\n")
    return raw


@st.composite
def messages(draw: st.DrawFn) -> bytes:
    """A whole message: usually a plausible From, then a MIME tree, then mutations."""
    sender = draw(
        st.one_of(
            st.just(b"From: Customer <customer@example.org>\r\n"),
            header_value().map(lambda v: b"From: " + v + b"\r\n"),
            st.just(b""),
        )
    )
    return draw(mutated(sender + draw(mime_tree)))


# -- the ingest path, for real ------------------------------------------------------------


@dataclass
class Harness:
    """A real store, parser process and ingest worker, on one event loop for all examples."""

    loop: asyncio.AbstractEventLoop
    store: SqliteStore
    parser: ParserPool
    worker: IngestWorker

    def ingest(self, raws: list[bytes]) -> list[tuple[str, str]]:
        """Ingest `raws` as one batch; return each row's (outcome state, state in the store)."""
        return self.loop.run_until_complete(self._ingest(raws))

    async def _ingest(self, raws: list[bytes]) -> list[tuple[str, str]]:
        envelope = Envelope("customer@example.org", ("support@example.com",), "127.0.0.1", None)
        ids = [uuid.uuid4().hex for _ in raws]
        await self.store.receive([(i, envelope, raw) for i, raw in zip(ids, raws, strict=True)])
        rows = [await self.store.get_inbound(i) for i in ids]
        outcomes = await self.worker.ingest([row for row in rows if row is not None])
        stored = [await self.store.get_inbound(i) for i in ids]
        return [
            (outcome.state, row.state if row else "lost")
            for outcome, row in zip(outcomes, stored, strict=True)
        ]


@pytest.fixture(scope="module")
def harness(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Harness]:
    folder: Path = tmp_path_factory.mktemp("property")
    config = load_config(write_config(folder))
    loop = asyncio.new_event_loop()
    store = loop.run_until_complete(SqliteStore.open(config.storage.database, open_keyring(config)))
    parser = ParserPool()
    loop.run_until_complete(parser.start())
    worker = IngestWorker(store, config, parser=parser, msgids=message_ids(config))
    try:
        yield Harness(loop, store, parser, worker)
    finally:
        parser.close()
        loop.run_until_complete(store.close())
        loop.close()


@settings(
    max_examples=100,
    deadline=None,
    database=None,  # no .hypothesis folder in the tree; failures print their example
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(raw=messages())
def test_every_message_is_stored_or_quarantined_and_ingest_goes_on(
    harness: Harness, raw: bytes
) -> None:
    normal = mail(subject=f"Normal {uuid.uuid4().hex}").as_bytes()
    hostile, after = harness.ingest([raw, normal])
    assert hostile[0] in ("ingested", "quarantined")
    assert hostile[1] == hostile[0]  # what ingest reported is what the store holds
    assert after == ("ingested", "ingested")


@settings(
    max_examples=300,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(raw=messages())
def test_parse_mail_raises_nothing_but_unparseable(raw: bytes) -> None:
    try:
        parsed = parse_mail(raw)
    except Unparseable:
        return
    assert "\r" not in parsed.subject and "\n" not in parsed.subject
    assert parsed.sender.name is None or not any(c in parsed.sender.name for c in "\r\n\x00")
