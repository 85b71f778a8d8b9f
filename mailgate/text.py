"""Decoding customer text: charsets, RFC 2047 header words, HTML to plain text.

Mail arrives in every charset, declared or not, right or wrong. Nothing here raises on bad
input: undecodable bytes become U+FFFD, so a broken part never costs a message.
"""

from __future__ import annotations

import base64
import binascii
import encodings
import re
from encodings.aliases import aliases as _PYTHON_ALIASES
from html import unescape

# The charsets mail is written in, by Python's canonical codec name: the WHATWG Encoding
# Standard's encodings and IANA's other mail charsets (DOS and Mac code pages, the ISO-2022 and
# HZ escape encodings of 7-bit East Asian mail, the JIS X 0213 family). Only these decode
# customer bytes. A label naming any other Python codec is an unknown charset: bytes-to-bytes
# codecs (zlib_codec, base64_codec, hex, rot13, ...) raise, punycode decodes in quadratic time,
# unicode_escape and raw_unicode_escape turn `\u202e` into the character, idna and punycode
# are for host names, and utf-7 (RFC 2152) is left out with them: WHATWG drops it, no current
# client writes it, and it spells the same ASCII text many ways (`+ADw-` is `<`), which only
# helps hide text from filters. EBCDIC, mbcs/oem (Windows only) and palmos are not mail charsets.
_TEXT_CODECS = frozenset(
    {
        *("utf-8", "utf-8-sig", "utf-16", "utf-16-le", "utf-16-be"),
        *("utf-32", "utf-32-le", "utf-32-be", "ascii"),
        *(f"iso8859-{n}" for n in (1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 13, 14, 15, 16)),
        *(f"cp{n}" for n in range(1250, 1259)),
        *("cp874", "tis-620", "koi8-r", "koi8-u", "koi8-t", "kz1048", "ptcp154"),
        *("mac-roman", "mac-cyrillic", "mac-greek", "mac-iceland", "mac-latin2", "mac-turkish"),
        *("mac-arabic", "mac-farsi", "mac-croatian", "mac-romanian"),
        *("cp437", "cp720", "cp737", "cp775", "cp850", "cp852", "cp855", "cp857", "cp858"),
        *(f"cp{n}" for n in range(860, 867)),
        *("cp869", "cp1125"),
        *("euc_jp", "euc_jis_2004", "euc_jisx0213", "shift_jis", "shift_jis_2004"),
        *("shift_jisx0213", "cp932", "iso2022_jp", "iso2022_jp_1", "iso2022_jp_2"),
        *("iso2022_jp_2004", "iso2022_jp_3", "iso2022_jp_ext"),
        *("euc_kr", "cp949", "johab", "iso2022_kr"),
        *("gb2312", "gbk", "gb18030", "hz", "big5", "big5hkscs", "cp950"),
    }
)

# WHATWG labels that Python does not know, to the codec WHATWG decodes them with.
_WHATWG_LABELS = {
    **dict.fromkeys(("unicode-1-1-utf-8", "unicode11utf8", "unicode20utf8"), "utf-8"),
    "x-unicode20utf8": "utf-8",
    **dict.fromkeys(("iso-8859-6-e", "iso-8859-6-i", "csiso88596e", "csiso88596i"), "iso8859-6"),
    **dict.fromkeys(("iso-8859-8-e", "iso-8859-8-i", "csiso88598e", "csiso88598i"), "iso8859-8"),
    **dict.fromkeys(("visual", "logical"), "iso8859-8"),
    "csisolatin9": "iso8859-15",
    **dict.fromkeys(("koi", "koi8"), "koi8-r"),
    "koi8-ru": "koi8-u",
    **dict.fromkeys(("csmacintosh", "mac", "x-mac-roman"), "mac-roman"),
    **dict.fromkeys(("x-mac-cyrillic", "x-mac-ukrainian"), "mac-cyrillic"),
    **dict.fromkeys(("dos-874", "windows-874"), "cp874"),
    **dict.fromkeys(("csgb2312", "gb_2312", "gb_2312-80", "x-gbk"), "gbk"),
    **dict.fromkeys(("cn-big5", "x-x-big5"), "big5"),
    **dict.fromkeys(("cseucpkdfmtjapanese", "x-euc-jp"), "euc_jp"),
    **dict.fromkeys(("windows-31j", "x-sjis"), "cp932"),
    **dict.fromkeys(("cseuckr", "csksc56011987", "iso-ir-149", "ks_c_5601-1989"), "euc_kr"),
    **dict.fromkeys(("ksc_5601", "windows-949"), "euc_kr"),
    "unicodefffe": "utf-16-be",
    **dict.fromkeys(("csunicode", "iso-10646-ucs-2", "ucs-2", "unicode"), "utf-16-le"),
    "unicodefeff": "utf-16-le",
}
_NO_DASH_ISO8859 = re.compile(r"iso8859(\d+)")  # WHATWG's "iso88592" for ISO-8859-2
_X_WINDOWS = re.compile(r"x-cp(125\d)")  # WHATWG's "x-cp1251" for windows-1251

# Labels that clients put on mail encoded in a superset charset. Decoding with the superset
# is lossless for the subset and right for what Outlook and friends actually send.
_SUPERSETS = {
    "euc_kr": "cp949",  # ks_c_5601-1987 (Outlook's label) resolves here too
    "shift_jis": "cp932",
    "gb2312": "gb18030",
    "gbk": "gb18030",
    "iso8859-1": "cp1252",  # browsers read ISO-8859-1 as windows-1252 (WHATWG Encoding)
    "iso8859-9": "cp1254",  # and ISO-8859-9 as windows-1254,
    "iso8859-11": "cp874",  # ISO-8859-11 and TIS-620 as windows-874
    "tis-620": "cp874",
    "ascii": "utf-8",  # undeclared 8-bit text is far more often UTF-8 than anything else
}

_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\u2028\u2029]")
# C0, DEL, C1, line/paragraph separators and lone surrogates (undecodable raw bytes).
_HEADER_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029\ud800-\udfff]+")
# Invisible characters that change how a line displays, not what it says: bidi embeddings and
# overrides (U+202A-U+202E; `invoice\u202egpj.exe` shows as "invoiceexe.jpg"), isolates
# (U+2066-U+2069), the marks U+200E, U+200F and U+061C, zero-width space and word joiner
# (U+200B, U+2060), the invisible operators U+2061-U+2064, the deprecated format controls
# U+206A-U+206F and the BOM/ZWNBSP U+FEFF. ZWNJ and ZWJ (U+200C, U+200D) stay: Persian and
# Indic names are spelt with them and emoji sequences are built with them, and neither can
# reorder text.
_INVISIBLE = re.compile(r"[\u061c\u200b\u200e\u200f\u202a-\u202e\u2060-\u2064\u2066-\u206f\ufeff]+")
_FOLD = re.compile(r"\r?\n(?=[ \t])")


def _codec_module(label: str) -> str:
    """The `encodings` module a label names, found as `codecs.lookup` finds it, importing nothing.

    Resolving a label this way means a codec outside the allowlist is never even looked up
    (`encodings` would also cache every unknown name for good).
    """
    name = encodings.normalize_encoding(label)
    return _PYTHON_ALIASES.get(name) or _PYTHON_ALIASES.get(name.replace(".", "_")) or name


_BY_MODULE = {_codec_module(name): name for name in _TEXT_CODECS}


def codec_for(charset: str | None) -> str | None:
    """Return the Python codec to decode `charset` with, or None if it is unknown.

    Only the text codecs of `_TEXT_CODECS` are ever returned, so no label in a mail can make
    mailgate run another of Python's codecs.
    """
    if not charset:
        return None
    label = charset.strip().strip('"').lower()
    label = _WHATWG_LABELS.get(label, label)
    label = _NO_DASH_ISO8859.sub(r"iso8859-\1", _X_WINDOWS.sub(r"cp\1", label))
    name = _BY_MODULE.get(_codec_module(label))
    if name is None:
        return None
    return _SUPERSETS.get(name, name)


def decode_bytes(data: bytes, charset: str | None) -> str:
    """Decode body or header bytes in their declared charset, falling back without raising."""
    codec = codec_for(charset)
    if codec not in (None, "utf-8"):
        return data.decode(codec, errors="replace")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:  # undeclared or mislabelled: the usual culprit is windows-1252
        return data.decode("cp1252", errors="replace")


def _unescape_raw(value: str) -> bytes:
    """Turn a raw header string (8-bit bytes kept as surrogates by the parser) back into bytes."""
    return value.encode("utf-8", errors="surrogateescape")


def decode_header_text(raw: str) -> str:
    """Decode an RFC 2047 header value (or raw UTF-8, RFC 6532) into clean one-line text."""
    unfolded = _FOLD.sub("", raw)
    return clean_line(decode_words(decode_bytes(_unescape_raw(unfolded), None)))


# An encoded word (RFC 2047 section 2, with the RFC 2231 language suffix): no white space and
# no "?" inside, so each try at a position ends at the next "?" and the search stays linear.
_ENCODED_WORD = re.compile(r"=\?([^?\s*]+)(?:\*[^?\s]*)?\?([bBqQ])\?([^?\s]*)\?=")
_WHITE = " \t\r\n"


def decode_words(text: str) -> str:
    """Decode the RFC 2047 encoded words in `text` (a str already); the rest stays as it is.

    White space between two encoded words is dropped (RFC 2047 section 6.2), and adjacent
    words of one charset are decoded together, so a character split across two words (as
    clients cut long names) survives. A word that does not decode is kept as written. The
    stdlib's `decode_header` is not used: it turns text beside an encoded word into
    `raw-unicode-escape` bytes, so `Жора =?utf-8?q?...?=` came out as `\\u0416...`.
    """
    out: list[str] = []
    pending = b""
    charset: str | None = None  # of `pending`; None: the last thing was not a decoded word
    pos = 0
    for word in _ENCODED_WORD.finditer(text):
        between = text[pos : word.start()]
        data = _word_bytes(word.group(2), word.group(3))
        label = word.group(1).lower()
        if charset is None or between.strip(_WHITE) or data is None or label != charset:
            if charset is not None:
                out.append(decode_bytes(pending, charset))
            out.append(between)
            pending, charset = b"", None
        if data is None:
            out.append(word.group())
        else:
            pending, charset = pending + data, label
        pos = word.end()
    if charset is not None:
        out.append(decode_bytes(pending, charset))
    out.append(text[pos:])
    return "".join(out)


def _word_bytes(encoding: str, encoded: str) -> bytes | None:
    """The bytes an encoded word's text stands for, or None if they cannot be had."""
    data = encoded.encode("utf-8", "surrogateescape")
    if encoding in "qQ":
        return binascii.a2b_qp(data, header=True)
    try:
        return base64.b64decode(data + b"=" * (-len(data) % 4))
    except (binascii.Error, ValueError):
        return None


def clean_line(text: str) -> str:
    """Strip CR, LF and every other control character; collapse runs of white space.

    Header values built from customer data go through this, since the stdlib of Python 3.11
    does not refuse CR/LF on serialising (CVE-2024-6923). So does every one-line value shown
    to people (names, subjects, filenames): bidi controls and zero-width characters are
    removed, so a name shows what it says.
    """
    return " ".join(_HEADER_CONTROL.sub(" ", _INVISIBLE.sub("", text)).split())


def clean_body(text: str) -> str:
    """Normalise newlines and drop control characters other than tab and newline."""
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    return _CONTROL.sub("", text)


# HTML to text is a small tokenizer of its own rather than html.parser: on unterminated tags
# (`<a <a <a ...`) html.parser rescans to the end of the document for each one, which is
# quadratic (hours for a megabyte). Here every search moves forward, so the time is linear.
_SKIP = frozenset({"script", "style", "head", "title", "template", "noscript"})
_RAW_TEXT = frozenset({"script", "style"})  # their content is not markup: skip to the end tag
_BLOCK = frozenset(
    {
        "p",
        "div",
        "br",
        "tr",
        "li",
        "ul",
        "ol",
        "table",
        "h1",
        "h2",
        "h3",
        "h4",
        "h5",
        "h6",
        "blockquote",
        "pre",
        "hr",
        "section",
        "article",
        "header",
        "footer",
    }
)
_MARKUP_START = re.compile(r"<[a-zA-Z/!?]")
_TAG_NAME = re.compile(r"<(/?)([a-zA-Z][^\t\n\r\f />\x00]*)")
# The rest of a tag up to its `>`, quoted attribute values included; possessive, so a tag
# that never ends costs one scan, not a backtracking search.
_TAG_REST = re.compile(r"""(?:[^>"']++|"[^"]*+"|'[^']*+')*+>""")
_SPACE = re.compile(r"\s+")


def html_to_text(html: str) -> str:
    """Render HTML as readable plain text: visible words, paragraphs kept, no markup or script."""
    out: list[str] = []
    skipping = 0
    pos, size = 0, len(html)
    while pos < size:
        # A `<` that starts no markup (`a < b`) is text, found along with the rest of it.
        found = _MARKUP_START.search(html, pos)
        start = found.start() if found else size
        if start > pos and not skipping:
            out.append(_SPACE.sub(" ", unescape(html[pos:start])))
        if start == size:
            break
        tag = _TAG_NAME.match(html, start)
        pos = _markup_end(html, start, is_tag=tag is not None)
        if pos < 0:
            break  # an unterminated tag or comment runs to the end of the document
        if tag is None:
            continue  # a comment, doctype or processing instruction
        closing, name = tag.group(1), tag.group(2).lower()
        if name in _SKIP:
            if closing:
                skipping = max(0, skipping - 1)
            elif name in _RAW_TEXT:
                pos = _raw_text_end(html, pos, name)
            else:
                skipping += 1
        elif name in _BLOCK:
            out.append("\n- " if name == "li" and not closing else "\n")
    lines = [" ".join(line.split()) for line in "".join(out).splitlines()]
    text = "\n".join(lines)
    return re.sub(r"\n{3,}", "\n\n", text).strip()


def _markup_end(html: str, start: int, *, is_tag: bool) -> int:
    """The position after the markup at `start` (a `<`), or -1 if it never ends."""
    if html.startswith("<!--", start):
        end = html.find("-->", start + 4)
        return end + 3 if end >= 0 else -1
    if is_tag:
        rest = _TAG_REST.match(html, start + 1)
        if rest:
            return rest.end()
    end = html.find(">", start)  # a declaration, or a tag with an unbalanced quote
    return end + 1 if end >= 0 else -1


def _raw_text_end(html: str, pos: int, name: str) -> int:
    """The position after `</name>`: script and style hold no markup, only their end tag."""
    end = re.compile(rf"</{re.escape(name)}[\s/>]", re.IGNORECASE).search(html, pos)
    if end is None:
        return len(html)
    close = html.find(">", end.end() - 1)
    return close + 1 if close >= 0 else len(html)
