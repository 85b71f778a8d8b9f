"""Automatic mail and bounces, recognised from headers as real MTAs and clients write them."""

from __future__ import annotations

from email.message import Message as StdMessage

import pytest

from mailgate.ingest.mta_bounce import mta_failures
from mailgate.ingest.parse import parse_mail
from mailgate.privacy.tokens import token_hash
from tests.bounce_formats import FORMATS, STATUS

POSTFIX_BOUNCE = b"""\
From: MAILER-DAEMON@mx.example.org (Mail Delivery System)
To: support@example.com
Subject: Undelivered Mail Returned to Sender
Auto-Submitted: auto-replied
MIME-Version: 1.0
Content-Type: multipart/report; report-type=delivery-status;
\tboundary="B1"
Message-Id: <20261125.ABC@mx.example.org>

--B1
Content-Description: Notification
Content-Type: text/plain; charset=us-ascii

I'm sorry to have to inform you that your message could not
be delivered to one or more recipients.

<ann@example.org>: host mx.example.org said: 550 5.1.1 unknown user

--B1
Content-Description: Delivery report
Content-Type: message/delivery-status

Reporting-MTA: dns; mx.example.org
Arrival-Date: Wed, 25 Nov 2026 10:00:00 +0000

Final-Recipient: rfc822; Ann@example.org
Original-Recipient: rfc822;ann@example.org
Action: failed
Status: 5.1.1
Diagnostic-Code: smtp; 550 5.1.1 unknown user

Final-Recipient: rfc822; bob@example.org
Action: delayed
Status: 4.4.1

--B1
Content-Description: Undelivered Message Headers
Content-Type: text/rfc822-headers

From: support@example.com
To: ann@example.org
Subject: We received your request [#3]
Message-ID:
 <mg-3-0123456789ab-0123456789abcdef01234567@mailgate.test>

--B1--
"""

EXCHANGE_BOUNCE = b"""\
From: postmaster@outlook.example
To: support@example.com
Subject: Undeliverable: We received your request [#3]
Content-Type: multipart/report; report-type="delivery-status"; boundary="X"
MIME-Version: 1.0

--X
Content-Type: text/plain; charset="utf-8"

Delivery has failed to these recipients or groups.

--X
Content-Type: message/delivery-status

Reporting-MTA: dns;AM0PR01.outlook.example

Final-recipient: RFC822; carol@outlook.example
Action: failed
Status: 5.2.2
Diagnostic-code: smtp;554 5.2.2 mailbox full

--X
Content-Type: message/rfc822

From: support@example.com
To: carol@outlook.example
Message-ID: <mg-3-0123456789ab-0123456789abcdef01234567@mailgate.test>
Subject: We received your request [#3]

Hello
--X--
"""


def test_postfix_bounce_reports_the_permanent_failure_and_the_returned_id() -> None:
    mail = parse_mail(POSTFIX_BOUNCE)
    assert mail.bounce is not None
    assert mail.bounce.failed == (("ann@example.org", "5.1.1"), ("bob@example.org", "4.4.1"))
    assert mail.bounce.permanent == ("ann@example.org",)
    assert mail.bounce.returned_ids == ("mg-3-0123456789ab-0123456789abcdef01234567@mailgate.test",)
    assert mail.automatic == "auto-submitted"


def test_exchange_bounce_with_the_whole_message_returned() -> None:
    mail = parse_mail(EXCHANGE_BOUNCE)
    assert mail.bounce is not None
    assert mail.bounce.permanent == ("carol@outlook.example",)
    assert mail.bounce.returned_ids == ("mg-3-0123456789ab-0123456789abcdef01234567@mailgate.test",)


def test_other_reports_are_not_bounces() -> None:
    read_receipt = POSTFIX_BOUNCE.replace(b"delivery-status;", b"disposition-notification;")
    assert parse_mail(read_receipt).bounce is None


def headers(lines: str) -> bytes:
    return f"From: a@example.org\nTo: support@example.com\n{lines}\n\nbody\n".encode()


@pytest.mark.parametrize(
    ("header", "reason"),
    [
        ("Auto-Submitted: auto-replied", "auto-submitted"),
        ("Auto-Submitted: auto-generated; owner-email=x@example.org", "auto-submitted"),
        ("Precedence: bulk", "precedence"),
        ("Precedence: JUNK", "precedence"),
        ("Precedence: list", "precedence"),
        ("List-Id: <users.lists.example.org>", "list-id"),
        ("X-Auto-Response-Suppress: OOF, DR", "x-auto-response-suppress"),
        ("X-Auto-Response-Suppress: All", "x-auto-response-suppress"),
        ("X-Autoreply: yes", "x-autoreply"),
        ("X-Autorespond: vacation", "x-autoreply"),
    ],
)
def test_automatic_markers(header: str, reason: str) -> None:
    assert parse_mail(headers(header)).automatic == reason


@pytest.mark.parametrize(
    "header",
    ["Auto-Submitted: no", "Precedence: first-class", "X-Auto-Response-Suppress: DR, RN", ""],
)
def test_a_persons_mail_is_not_automatic(header: str) -> None:
    assert parse_mail(headers(header)).automatic is None


# -- bounces as MTAs write them (flufl.bounce beside RFC 3464) ----------------------------

OURS_ID = "mg-3-0123456789ab-0123456789abcdef01234567@mailgate.test"
LINK = "http://127.0.0.1:8080/verify/" + "T" * 43
OURS = (
    "From: support@example.com\r\nTo: ann@example.org\r\n"
    f"Subject: Please confirm your email address [#3]\r\nMessage-ID: <{OURS_ID}>\r\n"
    f"MIME-Version: 1.0\r\nContent-Type: text/plain\r\n\r\nOpen {LINK} to confirm.\r\n"
).encode()


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_each_mta_format_is_a_bounce_naming_the_recipient_and_our_mail(fmt: str) -> None:
    mail = parse_mail(FORMATS[fmt]("ann@example.org", OURS))  # the null envelope sender
    assert mail.bounce is not None
    assert mail.bounce.failed == (("ann@example.org", STATUS[fmt]),)
    assert mail.bounce.returned_ids == (OURS_ID,)


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_a_bounce_keeps_no_verification_link_and_names_its_token(fmt: str) -> None:
    mail = parse_mail(FORMATS[fmt]("ann@example.org", OURS))
    assert mail.bounce is not None
    assert "T" * 43 not in mail.body_text and "T" * 43 not in (mail.body_html or "")
    assert all(b"T" * 43 not in a.content for a in mail.attachments)
    # Formats that return only the header block hold no link; the others name its token.
    headers_only = fmt in ("office365", "courier")
    assert mail.bounce.tokens == (() if headers_only else (token_hash("T" * 43),))


def test_courier_bounce_from_nobody_is_the_reporting_mtas() -> None:
    """Courier's From is `<@>`: the bounce is the Reporting-MTA's MAILER-DAEMON's, not
    quarantined for having no sender."""
    mail = parse_mail(FORMATS["courier"]("ann@example.org", OURS))
    assert mail.sender.email == "MAILER-DAEMON@mx.courier.example"
    assert mail.evidence.from_missing


def test_return_path_null_is_automatic() -> None:
    assert parse_mail(headers("Return-Path: <>"), "a@example.org").automatic == "return-path"
    assert parse_mail(headers("Return-Path: < >"), "a@example.org").automatic == "return-path"
    assert parse_mail(headers("Return-Path: <a@example.org>"), "a@example.org").automatic is None


def test_mta_heuristics_run_only_on_mail_from_an_mta() -> None:
    """A person's text that one heuristic reads as a failure ("x, a@b.example, y") makes a
    bounce only of mail that comes from an MTA (null sender, MAILER-DAEMON, Return-Path <>)."""
    text = headers("Subject: hi").replace(b"body", b"Hello, bob@example.net, and you")
    assert parse_mail(text, "a@example.org").bounce is None
    assert parse_mail(text, "").bounce is not None


def test_exim_bounce_from_a_forwarder_is_recognised_by_its_headers() -> None:
    """Behind a forwarder the envelope sender is not null, but the header says it came from
    an MTA (Return-Path: <>, X-Failed-Recipients)."""
    mail = parse_mail(FORMATS["exim"]("ann@example.org", OURS), "forwarder@example.net")
    assert mail.bounce is not None and mail.bounce.permanent == ("ann@example.org",)


def test_a_huge_bounce_is_read_within_the_budget_by_a_bounded_view() -> None:
    """The detectors read at most MAX_VIEW characters: a 16 MiB bounce of short lines costs
    what its first part costs, and the recipient in the notification is still found."""
    huge = FORMATS["qmail"]("ann@example.org", OURS + b"x\r\n" * 5_000_000)
    small = FORMATS["qmail"]("ann@example.org", OURS)
    assert parse_mail(huge).bounce == parse_mail(small).bounce


def test_mta_failures_of_a_detector_that_breaks_are_none() -> None:
    assert mta_failures(StdMessage()) == []
