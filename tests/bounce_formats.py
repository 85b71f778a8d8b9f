"""Bounces as real MTAs write them, returning a mail of ours.

Each builder takes the failed recipient and the returned mail (the raw bytes the relay got)
and writes the bounce as that MTA does: the wording, headers and MIME shapes are those of the
real programs (as in Mailman's flufl.bounce test data), only hosts and addresses are ours.
Formats that quote the returned mail inline (Exim, qmail, old Sendmail) carry it whole;
the others attach it, or only its header block.
"""

from __future__ import annotations

from collections.abc import Callable
from email.utils import formatdate, make_msgid

SUPPORT = "support@example.com"
Builder = Callable[[str, bytes], bytes]


def _crlf(text: str) -> bytes:
    return text.replace("\r\n", "\n").replace("\n", "\r\n").encode()


def _headers_of(returned: bytes) -> bytes:
    return returned.partition(b"\r\n\r\n")[0] + b"\r\n"


def exim(recipient: str, returned: bytes) -> bytes:
    """Exim 4: X-Failed-Recipients, the copy after a dashed line, no MIME."""
    head = _crlf(
        f"""Return-path: <>
Received: from mail by mx.exim.example with local (Exim 4.96)
\tid 1tAbCd-000123-Xy
\tfor {SUPPORT}; {formatdate()}
X-Failed-Recipients: {recipient}
Auto-Submitted: auto-replied
From: Mail Delivery System <Mailer-Daemon@mx.exim.example>
To: {SUPPORT}
Content-Type: text/plain; charset=us-ascii
Subject: Mail delivery failed: returning message to sender
Message-Id: <E1tAbCd-000123-Xy@mx.exim.example>
Date: {formatdate()}

This message was created automatically by mail delivery software.

A message that you sent could not be delivered to one or more of its
recipients. This is a permanent error. The following address(es) failed:

  {recipient}
    host mx.exim.example [192.0.2.25]
    SMTP error from remote mail server after RCPT TO:<{recipient}>:
    550 5.1.1 <{recipient}>: Recipient address rejected: User unknown

------ This is a copy of the message, including all the headers. ------

"""
    )
    return head + returned


def qmail(recipient: str, returned: bytes) -> bytes:
    """qmail-send's QSBMF: the copy below a dashed line, no MIME."""
    head = _crlf(
        f"""Return-Path: <>
Date: {formatdate()}
From: MAILER-DAEMON@mail.qmail.example
To: {SUPPORT}
Subject: failure notice
Message-ID: {make_msgid(domain="mail.qmail.example")}

Hi. This is the qmail-send program at mail.qmail.example.
I'm afraid I wasn't able to deliver your message to the following addresses.
This is a permanent error; I've given up. Sorry it didn't work out.

<{recipient}>:
192.0.2.26 does not like recipient.
Remote host said: 550 5.1.1 Sorry, no mailbox here by that name.
Giving up on 192.0.2.26.

--- Below this line is a copy of the message.

"""
    )
    return head + returned


def exchange(recipient: str, returned: bytes) -> bytes:
    """Exchange 2000/2003 ("MSEXCH:"), the returned mail attached."""
    head = _crlf(
        f"""From: System Administrator <postmaster@corp.exchange.example>
To: {SUPPORT}
Subject: Undeliverable: We received your request
Date: {formatdate()}
Message-ID: {make_msgid(domain="corp.exchange.example")}
MIME-Version: 1.0
X-MS-Exchange-Message-Is-Ndr:
X-Mailer: Internet Mail Service (5.5.2653.19)
Content-Type: multipart/mixed; boundary="----_=_NextPart_000_01C0"

------_=_NextPart_000_01C0
Content-Type: text/plain; charset="iso-8859-1"

Your message

  To:      {recipient}
  Subject: We received your request
  Sent:    {formatdate()}

did not reach the following recipient(s):

{recipient} on {formatdate()}
    The recipient name is not recognized
    The MTS-ID of the original message is: c=US;a= ;p=Corp;l=EXCH0101
    MSEXCH:IMS:Corp:Site:EXCH01 0 (000C05A6) Unknown Recipient

------_=_NextPart_000_01C0
Content-Type: message/rfc822

"""
    )
    return head + returned + b"\r\n------_=_NextPart_000_01C0--\r\n"


def office365(recipient: str, returned: bytes) -> bytes:
    """Exchange Online: an RFC 3464 report (the NDR mark too), only the headers returned."""
    head = _crlf(
        f"""From: Microsoft Outlook <postmaster@tenant.onmicrosoft.example>
To: <{SUPPORT}>
Date: {formatdate()}
Content-Type: multipart/report; report-type=delivery-status;
\tboundary="a1b2c3d4-e5f6-7890-abcd-ef0123456789"
X-MS-Exchange-Message-Is-Ndr:
Content-Language: en-US
Message-ID: {make_msgid(domain="AM0PR01MB1234.eurprd01.prod.outlook.example")}
Subject: Undeliverable: We received your request
Auto-Submitted: auto-replied
MIME-Version: 1.0

--a1b2c3d4-e5f6-7890-abcd-ef0123456789
Content-Type: text/plain; charset="us-ascii"

Delivery has failed to these recipients or groups:

{recipient}
The email address you entered couldn't be found. Please check the recipient's
email address and try to resend the message.

--a1b2c3d4-e5f6-7890-abcd-ef0123456789
Content-Type: message/delivery-status

Reporting-MTA: dns;AM0PR01MB1234.eurprd01.prod.outlook.example
Received-From-MTA: dns;mailgate.test
Arrival-Date: {formatdate()}

Final-Recipient: rfc822;{recipient}
Action: failed
Status: 5.1.10
Diagnostic-Code: smtp;550 5.1.10 RESOLVER.ADR.RecipientNotFound; Recipient not found by SMTP
 address lookup

--a1b2c3d4-e5f6-7890-abcd-ef0123456789
Content-Type: text/rfc822-headers

"""
    )
    return head + _headers_of(returned) + b"\r\n--a1b2c3d4-e5f6-7890-abcd-ef0123456789--\r\n"


def domino(recipient: str, returned: bytes) -> bytes:
    """Lotus/HCL Domino's DELIVERY FAILURE, the returned mail attached."""
    head = _crlf(
        f"""From: Postmaster@domino.example
To: {SUPPORT}
Date: {formatdate()}
Message-ID: {make_msgid(domain="domino.example")}
Subject: DELIVERY FAILURE: User not listed in Domino Directory
MIME-Version: 1.0
Content-Type: multipart/mixed; boundary="=_mixed 0040A1B2C3D4E5F6_="

--=_mixed 0040A1B2C3D4E5F6_=
Content-Type: text/plain; charset="US-ASCII"

Your message

  Subject: We received your request

was not delivered to:

  {recipient}

because:

  User {recipient.split("@")[0]} ({recipient}) not listed in Domino Directory

--=_mixed 0040A1B2C3D4E5F6_=
Content-Type: message/rfc822

"""
    )
    return head + returned + b"\r\n--=_mixed 0040A1B2C3D4E5F6_=--\r\n"


def courier(recipient: str, returned: bytes) -> bytes:
    """Courier: an RFC 3464 report whose From is `<@>`, the headers returned."""
    head = _crlf(
        f"""From: "Courier mail server at mx.courier.example" <@>
To: {SUPPORT}
Subject: NOTICE: mail delivery status.
Mime-Version: 1.0
Content-Type: multipart/report; report-type=delivery-status;
    boundary="=_courier_0"
Content-Transfer-Encoding: 7bit
Message-ID: <courier.5F3A2B1C.00001234@mx.courier.example>
Date: {formatdate()}

This is a MIME-formatted message.  If you see this text it means that your
E-mail software does not support MIME-formatted messages.

--=_courier_0
Content-Type: text/plain; charset="utf-8"
Content-Transfer-Encoding: 7bit

This is a delivery status notification from mx.courier.example,
running the Courier mail server, version 1.1.8.

The original message was received on {formatdate()}
from mailgate.test [192.0.2.1]

---------------------------------------------------------------------------

                           UNDELIVERABLE MAIL

Your message to the following recipients cannot be delivered:

<{recipient}>:
    mx.courier.example [192.0.2.27]:
<<< 550 5.1.1 <{recipient}>... User unknown

---------------------------------------------------------------------------

--=_courier_0
Content-Type: message/delivery-status
Content-Transfer-Encoding: 7bit

Reporting-MTA: dns; mx.courier.example
Arrival-Date: {formatdate()}

Final-Recipient: rfc822; {recipient}
Action: failed
Status: 5.0.0
Remote-MTA: dns; mx.courier.example [192.0.2.27]
Diagnostic-Code: smtp; 550 5.1.1 <{recipient}>... User unknown

--=_courier_0
Content-Type: text/rfc822-headers; charset="iso-8859-1"
Content-Transfer-Encoding: 7bit

"""
    )
    return head + _headers_of(returned) + b"\r\n--=_courier_0--\r\n"


def sendmail(recipient: str, returned: bytes) -> bytes:
    """Sendmail 8: an RFC 3464 report with its transcript, the whole mail returned."""
    head = _crlf(
        f"""Return-Path: <>
Date: {formatdate()}
From: Mail Delivery Subsystem <MAILER-DAEMON@mx.sendmail.example>
Message-Id: <202611251000.5APA0abc012345@mx.sendmail.example>
To: <{SUPPORT}>
MIME-Version: 1.0
Content-Type: multipart/report; report-type=delivery-status;
\tboundary="5APA0abc012345.1764064800/mx.sendmail.example"
Subject: Returned mail: see transcript for details
Auto-Submitted: auto-generated (failure)

This is a MIME-encapsulated message

--5APA0abc012345.1764064800/mx.sendmail.example

The original message was received at {formatdate()}
from mailgate.test [192.0.2.1]

   ----- The following addresses had permanent fatal errors -----
<{recipient}>
    (reason: 550 5.1.1 <{recipient}>... User unknown)

   ----- Transcript of session follows -----
... while talking to mx2.sendmail.example.:
>>> DATA
<<< 550 5.1.1 <{recipient}>... User unknown
550 5.1.1 <{recipient}>... User unknown
<<< 503 5.0.0 Need RCPT (recipient)

--5APA0abc012345.1764064800/mx.sendmail.example
Content-Type: message/delivery-status

Reporting-MTA: dns; mx.sendmail.example
Received-From-MTA: DNS; mailgate.test
Arrival-Date: {formatdate()}

Final-Recipient: RFC822; {recipient}
Action: failed
Status: 5.1.1
Remote-MTA: DNS; mx2.sendmail.example
Diagnostic-Code: SMTP; 550 5.1.1 <{recipient}>... User unknown
Last-Attempt-Date: {formatdate()}

--5APA0abc012345.1764064800/mx.sendmail.example
Content-Type: message/rfc822

"""
    )
    return head + returned + b"\r\n--5APA0abc012345.1764064800/mx.sendmail.example--\r\n"


def old_sendmail(recipient: str, returned: bytes) -> bytes:
    """Sendmail before DSNs (and gateways that still write this): a plain transcript."""
    head = _crlf(
        f"""Date: {formatdate()}
From: Mail Delivery Subsystem <MAILER-DAEMON@old.sendmail.example>
Message-Id: <199811251000.KAA12345@old.sendmail.example>
To: {SUPPORT}
Subject: Returned mail: User unknown

The original message was received at {formatdate()}
from mailgate.test [192.0.2.1]

   ----- The following addresses had permanent fatal errors -----
{recipient}

   ----- Transcript of session follows -----
... while talking to mx.old.sendmail.example.:
>>> RCPT To:<{recipient}>
<<< 550 <{recipient}>... User unknown
550 {recipient}... User unknown

   ----- Original message follows -----

"""
    )
    return head + returned


def postfix(recipient: str, returned: bytes) -> bytes:
    """Postfix: an RFC 3464 report, the whole mail returned."""
    head = _crlf(
        f"""Return-Path: <>
From: MAILER-DAEMON@mx.postfix.example (Mail Delivery System)
Subject: Undelivered Mail Returned to Sender
To: {SUPPORT}
Auto-Submitted: auto-replied
MIME-Version: 1.0
Content-Type: multipart/report; report-type=delivery-status;
\tboundary="4F1A2B3C4D.1764064800/mx.postfix.example"
Message-Id: <20261125100000.4F1A2B3C4D@mx.postfix.example>
Date: {formatdate()}

This is a MIME-encapsulated message.

--4F1A2B3C4D.1764064800/mx.postfix.example
Content-Description: Notification
Content-Type: text/plain; charset=us-ascii

This is the mail system at host mx.postfix.example.

I'm sorry to have to inform you that your message could not
be delivered to one or more recipients.

<{recipient}>: host mx2.postfix.example[192.0.2.28] said: 550 5.1.1
    <{recipient}>: Recipient address rejected: User unknown (in reply to RCPT TO
    command)

--4F1A2B3C4D.1764064800/mx.postfix.example
Content-Description: Delivery report
Content-Type: message/delivery-status

Reporting-MTA: dns; mx.postfix.example
X-Postfix-Queue-ID: 4F1A2B3C4D
Arrival-Date: {formatdate()}

Final-Recipient: rfc822; {recipient}
Original-Recipient: rfc822;{recipient}
Action: failed
Status: 5.1.1
Remote-MTA: dns; mx2.postfix.example
Diagnostic-Code: smtp; 550 5.1.1 <{recipient}>: Recipient address rejected: User unknown

--4F1A2B3C4D.1764064800/mx.postfix.example
Content-Description: Undelivered Message
Content-Type: message/rfc822

"""
    )
    return head + returned + b"\r\n--4F1A2B3C4D.1764064800/mx.postfix.example--\r\n"


FORMATS: dict[str, Builder] = {
    "exim": exim,
    "qmail": qmail,
    "exchange": exchange,
    "office365": office365,
    "domino": domino,
    "courier": courier,
    "sendmail": sendmail,
    "old-sendmail": old_sendmail,
    "postfix": postfix,
}
# The status each format's bounce gives the failed recipient (flufl's detectors give none:
# RFC 3463's "other" status of their class).
STATUS = {
    "exim": "5.0.0",
    "qmail": "5.0.0",
    "exchange": "5.0.0",
    "office365": "5.1.10",
    "domino": "5.0.0",
    "courier": "5.0.0",
    "sendmail": "5.1.1",
    "old-sendmail": "5.0.0",
    "postfix": "5.1.1",
}
