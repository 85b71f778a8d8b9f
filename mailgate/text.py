"""Decoding customer text: charsets, RFC 2047 header words, HTML to plain text.

Mail arrives in every charset, declared or not, right or wrong. Nothing here raises on bad
input: undecodable bytes become U+FFFD, so a broken part never costs a message.
"""

from __future__ import annotations

import codecs
import email.header
import re
from html.parser import HTMLParser

# Labels that clients put on mail encoded in a superset charset. Decoding with the superset
# is lossless for the subset and right for what Outlook and friends actually send.
_SUPERSETS = {
    "euc_kr": "cp949",  # ks_c_5601-1987 (Outlook's label) resolves here too
    "shift_jis": "cp932",
    "gb2312": "gb18030",
    "gbk": "gb18030",
    "iso8859-1": "cp1252",  # browsers read ISO-8859-1 as windows-1252 (WHATWG Encoding)
    "ascii": "utf-8",  # undeclared 8-bit text is far more often UTF-8 than anything else
}

_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\u2028\u2029]")
# C0, DEL, C1, line/paragraph separators and lone surrogates (undecodable raw bytes).
_HEADER_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029\ud800-\udfff]+")
_FOLD = re.compile(r"\r?\n(?=[ \t])")


def codec_for(charset: str | None) -> str | None:
    """Return the Python codec to decode `charset` with, or None if it is unknown."""
    if not charset:
        return None
    try:
        name = codecs.lookup(charset.strip().strip('"').lower()).name
    except (LookupError, ValueError):
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
    try:
        chunks = email.header.decode_header(unfolded)
    except (ValueError, LookupError, AssertionError):  # AssertionError: malformed b/q words
        chunks = [(unfolded, None)]
    parts = []
    for chunk, charset in chunks:
        data = _unescape_raw(chunk) if isinstance(chunk, str) else chunk
        parts.append(decode_bytes(data, charset))
    return clean_line("".join(parts))


def clean_line(text: str) -> str:
    """Strip CR, LF and every other control character; collapse runs of white space.

    Header values built from customer data go through this, since the stdlib of Python 3.11
    does not refuse CR/LF on serialising (CVE-2024-6923).
    """
    return " ".join(_HEADER_CONTROL.sub(" ", text).split())


def clean_body(text: str) -> str:
    """Normalise newlines and drop control characters other than tab and newline."""
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    return _CONTROL.sub("", text)


class _TextExtractor(HTMLParser):
    _SKIP = frozenset({"script", "style", "head", "title", "template", "noscript"})
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

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.out: list[str] = []
        self._skipping = 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in self._SKIP:
            self._skipping += 1
        elif tag in self._BLOCK:
            self.out.append("\n")
            if tag == "li":
                self.out.append("- ")

    def handle_endtag(self, tag: str) -> None:
        if tag in self._SKIP:
            self._skipping = max(0, self._skipping - 1)
        elif tag in self._BLOCK:
            self.out.append("\n")

    def handle_data(self, data: str) -> None:
        if not self._skipping:
            self.out.append(re.sub(r"\s+", " ", data))


def html_to_text(html: str) -> str:
    """Render HTML as readable plain text: visible words, paragraphs kept, no markup or script."""
    parser = _TextExtractor()
    try:
        parser.feed(html)
        parser.close()
    except (AssertionError, ValueError):  # malformed markup: keep what was read
        pass
    lines = [" ".join(line.split()) for line in "".join(parser.out).splitlines()]
    text = "\n".join(lines)
    return re.sub(r"\n{3,}", "\n\n", text).strip()
