"""Automatic mail and bounces, recognised from headers as real MTAs and clients write them."""

from __future__ import annotations

import pytest

from mailgate.ingest.parse import parse_mail

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
