"""Bounces as MTAs write them besides RFC 3464: flufl.bounce (Mailman's detectors).

Exim (X-Failed-Recipients), qmail's QSBMF ("Hi. This is the qmail-send program"), Exchange's
and Domino's texts, old Sendmail transcripts, Postfix notifications and a few dozen other
shapes are recognised by the heuristics Mailman has gathered over twenty years. They are
heuristics: a person's mail with "a@b.example," in a line could match one. So they run only
on mail that comes from an MTA by its own account (a null sender, `Return-Path: <>`, a
MAILER-DAEMON or postmaster From, Exim's or Exchange's bounce header), and only a detector
that names a failed recipient makes the mail a bounce.

They run in the parser process, on the tree `mime.read_message` built, never on a parse of
their own, and on a bounded view of it: some detectors read every line once per pattern
(SimpleMatch has forty), so a 25 MiB body would cost seconds. The notification, which is what
they read, comes first in every format; the returned message after it is cut.
"""

from __future__ import annotations

import copy
import logging
from email.message import Message as StdMessage

from flufl.bounce import all_failures

# flufl logs each detector at INFO and a detector's exception with its traceback; neither
# belongs in mailgate's log (a bounce's text is personal data), and a failure here only means
# "not recognised".
_FLUFL_LOG = logging.getLogger("flufl.bounce")
_FLUFL_LOG.addHandler(logging.NullHandler())
_FLUFL_LOG.propagate = False

MAX_VIEW = 256 * 1024  # characters of payload the detectors read in all
MAX_LEAF = 64 * 1024  # of one part
MAX_VIEW_PARTS = 64
PERMANENT, TEMPORARY = "5.0.0", "4.0.0"  # RFC 3463 "other or undefined" statuses
_ROLE_SENDERS = ("mailer-daemon", "postmaster", "mail-daemon")
# Headers only bounces carry: Exim's list of failed recipients, Exchange Online's NDR mark.
_BOUNCE_HEADERS = ("x-failed-recipients", "x-ms-exchange-message-is-ndr")


def from_an_mta(headers: dict[str, list[str]], envelope_sender: str) -> bool:
    """Whether the mail says it comes from a mail system rather than a person (RFC 3464
    section 2 and RFC 5321 section 4.5.5: bounces go out with a null reverse-path)."""
    if not envelope_sender or null_return_path(headers):
        return True
    if any(name in headers for name in _BOUNCE_HEADERS):
        return True
    sender = headers.get("from", [""])[0].lower()
    return any(f"{role}@" in sender for role in _ROLE_SENDERS)


def null_return_path(headers: dict[str, list[str]]) -> bool:
    """`Return-Path: <>`: the delivering MTA says the envelope sender was null."""
    value = headers.get("return-path", ["x"])[0]
    return "".join(value.split()) == "<>"


def is_ndr(headers: dict[str, list[str]]) -> bool:
    """Exchange's or Exim's own header says this is a non-delivery report."""
    return any(name in headers for name in _BOUNCE_HEADERS)


def mta_failures(msg: StdMessage) -> list[tuple[str, str]]:
    """(recipient, status) for each recipient the detectors find: permanent ones first.

    The detectors tell permanent from temporary failures but give no status code; the
    statuses are RFC 3463's undefined ones, 5.0.0 and 4.0.0. Empty if nothing matched or a
    detector broke (a malformed bounce is kept as an ordinary mail).
    """
    try:
        temporary, permanent = all_failures(_bounded(msg, [MAX_VIEW, MAX_VIEW_PARTS]))
    except Exception:  # noqa: BLE001 - a detector that breaks recognised nothing
        return []
    found: dict[str, str] = {}
    for addresses, status in ((permanent, PERMANENT), (temporary, TEMPORARY)):
        for address in sorted(addresses):
            text = address.decode("ascii", "replace").strip().strip("<>").lower()
            if "@" in text and len(text) <= 254:
                found.setdefault(text, status)
    return list(found.items())


def _bounded(part: StdMessage, left: list[int]) -> StdMessage:
    """A copy of the tree that shares the headers and holds at most `left` = [characters,
    parts] of payload; each leaf cut at MAX_LEAF."""
    view = copy.copy(part)  # shallow: the header list is shared, never changed
    left[1] -= 1
    payload = part.get_payload()
    if isinstance(payload, list):
        children: list[StdMessage | str] = []  # the type set_payload asks for
        for child in payload:
            if left[0] <= 0 or left[1] <= 0:
                break
            if isinstance(child, StdMessage):
                children.append(_bounded(child, left))
        view.set_payload(children)
    elif isinstance(payload, str):
        cut = payload[: min(MAX_LEAF, max(left[0], 0))]
        left[0] -= len(cut)
        view.set_payload(cut)
    return view
