"""Customer text as the store keeps it: one-line headers, safe filenames, readable subjects."""

from __future__ import annotations

import pytest

from mailgate.ingest.match import display_subject, strip_reply_prefixes
from mailgate.ingest.parse import sanitise_filename
from mailgate.text import clean_line, codec_for, decode_bytes, decode_header_text
from tests.conftest import Running


@pytest.mark.parametrize(
    "raw",
    [
        "=?utf-8?q?Eve=0D=0ABcc=3A_victim=40example=2Enet?=",
        "=?utf-8?b?RXZlDQpCY2M6IHZpY3RpbUBleGFtcGxlLm5ldA==?=",
        "Eve\r\nBcc: victim@example.net",
        "Eve\u2028Bcc: victim@example.net",
        "Eve\x00\x1b[31m\x85Bcc: victim@example.net",
    ],
)
def test_decoded_header_text_is_one_line_without_controls(raw: str) -> None:
    # Python 3.11 serialises CR/LF in header values (CVE-2024-6923): strip them on the way in.
    text = decode_header_text(raw)
    assert text.startswith("Eve") and text.endswith("Bcc: victim@example.net")
    assert not any(ord(ch) < 32 or 0x7F <= ord(ch) <= 0x9F for ch in text)
    assert "\u2028" not in text


async def test_injected_name_is_stored_on_one_line(daemon: Running) -> None:
    await daemon.send(
        b"From: =?utf-8?q?Eve=0D=0ABcc=3A_victim=40example=2Enet?= <eve@example.org>\r\n"
        b"To: support@example.com\r\nSubject: hello\r\n\r\nHi.\r\n"
    )
    [ticket] = await daemon.tickets()
    assert ticket.requester.name == "Eve Bcc: victim@example.net"


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("../../etc/passwd", "passwd"),
        ("..\\..\\windows\\system32\\cmd.exe", "cmd.exe"),
        ("evil\x00name.txt", "evil name.txt"),
        (".htaccess", "htaccess"),
        ("/", None),
        ("", None),
        ("a" * 600 + ".pdf", "a" * 251 + ".pdf"),
    ],
)
def test_filenames_are_reduced_to_a_harmless_last_component(
    name: str, expected: str | None
) -> None:
    assert sanitise_filename(name) == expected


@pytest.mark.parametrize(
    ("subject", "expected"),
    [
        ("Re: RE: re:Refund", "Refund"),
        ("AW: WG: Rechnung", "WG: Rechnung"),  # forwards are not replies: kept
        ("SV: VS: Antw: Vraag", "Vraag"),
        ("답장: 문의", "문의"),
        ("Re[2]: Order", "Order"),
        ("Refund: please", "Refund: please"),
    ],
)
def test_reply_prefixes_are_stripped(subject: str, expected: str) -> None:
    assert strip_reply_prefixes(subject) == expected


def test_display_subject_drops_the_tag_and_never_is_empty() -> None:
    assert display_subject("Re: [#42] Printer", "#") == "Printer"
    assert display_subject("Re: ", "#") == "(no subject)"


def test_mislabelled_charsets_decode_as_their_supersets() -> None:
    assert codec_for("ks_c_5601-1987") == "cp949"
    assert codec_for("Shift_JIS") == "cp932"
    assert codec_for("x-no-such-charset") is None
    assert decode_bytes("똠".encode("cp949"), "euc-kr") == "똠"
    assert decode_bytes("café".encode("cp1252"), "utf-8") == "café"  # declared wrong
    assert decode_bytes(b"\xff\xfe", "x-no-such-charset") == "ÿþ"
    assert clean_line("  a \t b\r\n c ") == "a b c"


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("Жора =?utf-8?q?M=C3=BCller?=", "Жора Müller"),  # raw UTF-8 beside a word
        ("=?utf-8?b?w6Q=?= =?utf-8?b?w7Y=?=", "äö"),  # white space between words dropped
        ("=?UTF-8?B?SsM=?= =?utf-8?B?vHJnZW4=?=", "Jürgen"),  # one character, two words
        ("=?iso-8859-1?Q?M=FCller,=20Hans?=", "Müller, Hans"),  # a comma inside the word
        ("=?utf-8*de?q?Gr=C3=BC=C3=9Fe?=", "Grüße"),  # RFC 2231 language suffix
        ("=?utf-8?q?a?= b =?utf-8?q?c?=", "a b c"),
    ],
)
def test_encoded_words_decode_as_clients_show_them(raw: str, expected: str) -> None:
    assert decode_header_text(raw) == expected
