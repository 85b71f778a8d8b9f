"""The Received trace field (trace.py): what the client chose cannot break out of its clause."""

from __future__ import annotations

from datetime import datetime

from mailgate.trace import Hop, received_field
from tests.conftest import SUPPORT


def test_the_received_field_keeps_client_text_inside_its_clause() -> None:
    """A HELO name with parentheses, semicolons, spaces or non-ASCII cannot open a comment,
    end the field's date or add a clause; it is cut to 255 characters. Without TLS: ESMTP
    and no comment; an IPv6 peer is an IPv6 literal."""
    hop = Hop(
        helo="evil.example) (by trusted.example; " + "x" * 400,
        peer_ip="2001:db8::1",
        esmtp=True,
        smtputf8=False,
        tls=None,
        recipients=(SUPPORT,),
    )
    when = datetime(2026, 12, 1, 14, 0, 0).astimezone()
    field = received_field(hop, hostname="mailgate.test", queue_id="ABC", when=when).decode()
    lines = field.split("\r\n")
    assert lines[-1] == "" and all(line.isascii() for line in lines)
    assert lines[0].startswith("Received: from evil.example___by_trusted.example__xxx")
    assert lines[0].endswith("x ([IPv6:2001:db8::1])")
    assert len(lines[0]) == len("Received: from ") + 255 + len(" ([IPv6:2001:db8::1])")
    assert lines[1] == "\tby mailgate.test (mailgate) with ESMTP id ABC"
    assert lines[2].startswith(f"\tfor <{SUPPORT}>; ")
    assert field.count("(") == field.count(")") == 2
    # A recipient that is not a plain address is not named.
    odd = received_field(
        Hop("h", "192.0.2.1", False, False, None, ('"a>b"@help.example.com',)),
        hostname="mailgate.test", queue_id="ABC", when=when,
    ).decode()  # fmt: skip
    assert "for" not in odd and "with SMTP id ABC; " in odd
