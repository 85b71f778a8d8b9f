"""Customer text as the store keeps it: one-line headers, safe filenames, readable subjects."""

from __future__ import annotations

import base64
import codecs
import encodings.aliases

import pytest

from mailgate import text
from mailgate.ingest.parse import sanitise_filename
from mailgate.text import clean_line, codec_for, decode_bytes, decode_header_text
from mailgate.tickets import display_subject, strip_reply_prefixes
from tests.conftest import Running, cli_json


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


# -- only text codecs decode mail --------------------------------------------------------------

# Python codecs a `charset=` could name that are not mail charsets: bytes-to-bytes codecs
# (which raised, and quarantined the message), punycode (quadratic), the escape codecs (which
# turn `\u202e` into the character), utf-7, and codecs of other platforms or none at all.
HOSTILE_CHARSETS = (
    "zlib_codec",
    "zlib",
    "punycode",
    "idna",
    "base64_codec",
    "base64",
    "rot13",
    "rot_13",
    "hex",
    "bz2",
    "uu",
    "quopri",
    "unicode_escape",
    "raw_unicode_escape",
    "utf_7",
    "UTF-7",
    "mbcs",
    "oem",
    "palmos",
    "undefined",
    "cp037",
    "encodings.aliases",
)
# ASCII that each of those codecs would read differently (or refuse), plus UTF-8 that only the
# unknown-charset fallback reads as written.
PLAIN = "Uryyb \\u202e +ADw-b+AD4- aGVsbG8= 48656c6c6f d-e caf\u00e9"


@pytest.mark.parametrize("charset", HOSTILE_CHARSETS)
def test_only_text_codecs_decode(charset: str) -> None:
    assert codec_for(charset) is None
    assert decode_bytes(PLAIN.encode(), charset) == PLAIN
    assert decode_header_text(f"=?{charset}?q?Uryyb_+ADw-?=") == "Uryyb +ADw-"


def test_a_large_punycode_body_is_not_run_through_punycode() -> None:
    """punycode's decoder is quadratic (a 200 KB body took seconds to minutes); it is never
    invoked, so the text is what was sent, as for any unknown charset."""
    payload = b"a" * 100_000 + b"-" + b"b" * 100_000
    assert decode_bytes(payload, "punycode") == payload.decode("ascii")


def test_charset_labels_resolve_as_python_resolves_them() -> None:
    """Every alias Python knows gives the codec `codecs.lookup` gives, if it is a text codec
    of mail (with the superset substitutions), and nothing otherwise."""
    for label in sorted({*encodings.aliases.aliases, *text._TEXT_CODECS}):
        try:
            name: str | None = codecs.lookup(label).name
        except LookupError:
            name = None
        expected = text._SUPERSETS.get(name, name) if name in text._TEXT_CODECS else None
        assert codec_for(label) == expected, label


@pytest.mark.parametrize(
    ("label", "codec"),
    [
        ("UTF-8", "utf-8"),
        ("us-ascii", "utf-8"),
        ("ISO-8859-1", "cp1252"),
        ("latin1", "cp1252"),
        ("ISO-8859-9", "cp1254"),
        ("iso88592", "iso8859-2"),  # WHATWG labels Python does not know
        ("x-cp1251", "cp1251"),
        ("windows-874", "cp874"),
        ("TIS-620", "cp874"),
        ("windows-31j", "cp932"),
        ("x-mac-cyrillic", "mac-cyrillic"),
        ("iso-8859-8-i", "iso8859-8"),
        ("koi8-r", "koi8-r"),
        ("IBM866", "cp866"),
        ("cp850", "cp850"),
        ("macintosh", "mac-roman"),
        ("euc-jp", "euc_jp"),
        ("iso-2022-jp", "iso2022_jp"),
        ("iso-2022-kr", "iso2022_kr"),
        ("big5", "big5"),
        ("big5-hkscs", "big5hkscs"),
        ("cp936", "gb18030"),
        ("gb18030", "gb18030"),
        ("hz-gb-2312", "hz"),
        ("utf-16le", "utf-16-le"),
        ("utf-32", "utf-32"),
        ('"windows-1252"', "cp1252"),
    ],
)
def test_mail_charsets_decode(label: str, codec: str) -> None:
    assert codec_for(label) == codec


async def test_hostile_charsets_through_the_daemon_become_tickets_decoded_as_unknown(
    daemon: Running,
) -> None:
    """Each codec name as a real mail (body and RFC 2047 subject): a ticket, not quarantined,
    its text as an unknown charset reads it."""
    for charset in HOSTILE_CHARSETS:
        await daemon.send(
            b"From: Ann <ann@example.org>\r\n"
            b"To: support@example.com\r\n"
            + f"Subject: =?{charset}?q?Uryyb_+ADw-?= {charset}\r\n".encode()
            + f"Message-ID: <{charset}@client.example>\r\n".encode()
            + b"MIME-Version: 1.0\r\n"
            + f"Content-Type: text/plain; charset={charset}\r\n".encode()
            + b"Content-Transfer-Encoding: 8bit\r\n\r\n"
            + PLAIN.encode()
            + b"\r\n"
        )
    tickets = await daemon.tickets()
    assert cli_json(daemon, "quarantine", "list") == []
    by_subject = {t.subject: t for t in tickets}
    for charset in HOSTILE_CHARSETS:
        ticket = by_subject.get(f"Uryyb +ADw- {charset}")
        assert ticket is not None, (charset, sorted(by_subject))
        assert ticket.messages[0].body_text == PLAIN, charset


async def test_a_large_punycode_body_through_the_daemon(daemon: Running) -> None:
    """~200 KB labelled punycode: a ticket with the text as sent (the quadratic decoder took the
    parser past its time budget, and delayed every ticket behind it)."""
    payload = b"a" * 100_000 + b"-" + b"b" * 100_000
    await daemon.send(
        b"From: ann@example.org\r\nTo: support@example.com\r\nSubject: big\r\n"
        b"MIME-Version: 1.0\r\nContent-Type: text/plain; charset=punycode\r\n"
        b"Content-Transfer-Encoding: base64\r\n\r\n" + base64.encodebytes(payload)
    )
    [ticket] = await daemon.tickets()
    assert ticket.messages[0].body_text == payload.decode("ascii")


# -- invisible characters that change how a line displays ---------------------------------------

BIDI_AND_INVISIBLE = (
    "\u202a\u202b\u202c\u202d\u202e"  # embeddings, overrides, pop
    "\u2066\u2067\u2068\u2069"  # isolates
    "\u200e\u200f\u061c"  # marks
    "\u200b\u2060\u2061\u2062\u2063\u2064\ufeff"  # zero width, invisible operators, BOM
)


@pytest.mark.parametrize("char", BIDI_AND_INVISIBLE)
def test_clean_line_removes_bidi_controls_and_zero_width_characters(char: str) -> None:
    assert clean_line(f"invoice{char}gpj.exe") == "invoicegpj.exe"
    assert decode_header_text(f"invoice{char}gpj.exe") == "invoicegpj.exe"
    assert sanitise_filename(f"invoice{char}gpj.exe") == "invoicegpj.exe"


def test_clean_line_keeps_the_joiners_names_and_emoji_are_spelt_with() -> None:
    persian = "\u0645\u06cc\u200c\u062e\u0648\u0627\u0647\u0645"  # ZWNJ inside a Persian word
    family = "\U0001f468\u200d\U0001f469\u200d\U0001f467"  # ZWJ sequence
    assert clean_line(persian) == persian
    assert clean_line(family) == family


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
