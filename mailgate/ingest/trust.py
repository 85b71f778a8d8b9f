"""How far a message's sender is proven: the one place the authentication verdict is made.

Every message ends in one of three trust levels, stored and shown with it:

- *authenticated*: DMARC passes; or, for a domain that publishes no DMARC record, a DKIM or
  SPF pass aligned with the From domain; or the trusted MTA's Authentication-Results say so.
  Only such mail may act as an agent, rename a requester, add participants or clear an
  undeliverable mark.
- *failed*: DMARC fails, or the header has a shape no check can vouch for (a bare CR or LF,
  several From fields or mailboxes). It joins no ticket and gets no automatic mail.
- *unauthenticated*: nothing proves or disproves the sender. The threading rule of the
  foundation applies, nothing more.

A message without a usable From (flag `from_missing`; its envelope sender is the requester)
is unauthenticated, whatever the checks say, and never failed: DMARC authenticates the From
domain and there is none, so an SPF pass for MAIL FROM proves nothing about who wrote it; but
a missing From is no sign of forgery either (scripts, cron jobs and old gateways send such
mail, and a forger would rather write a From), so it keeps the foundation's threading, and
the envelope sender, where RFC 3834 sends automatic answers anyway, gets them.

DNS trouble is no verdict: `decide` answers None (undecided), and the message waits to be
checked again; past `[auth] retry_for` it is decided as if the checks that did not answer
had not passed (`final=True`): unauthenticated at best, and failed where the From domain's
DMARC policy (quarantine or reject) asks receivers to refuse what it did not authenticate.
"""

from __future__ import annotations

from dataclasses import dataclass

from mailgate.ingest.auth import AuthResults
from mailgate.model import SenderEvidence, Trust

__all__ = ["UNCHECKED", "Trust", "Verdict", "decide"]


@dataclass(frozen=True, slots=True)
class Verdict:
    trust: Trust
    reason: str | None = None  # failed: dmarc_fail, dmarc_temperror, bare_line_ending, ...

    @property
    def flags(self) -> list[str]:
        """Message flags that tell agents how far to believe the sender."""
        if self.trust == "failed":
            return ["unverified_sender", *([self.reason] if self.reason else [])]
        if self.trust == "unauthenticated":
            return ["unauthenticated"]
        return []


UNCHECKED = Verdict("unauthenticated")


def decide(results: AuthResults, evidence: SenderEvidence, *, final: bool) -> Verdict | None:
    """The trust level of a message, or None while DNS trouble leaves it open."""
    shape = evidence.untrusted_shape
    if shape is not None:
        return Verdict("failed", shape)
    if evidence.from_missing:  # no From to authenticate: see the module's docstring
        return UNCHECKED
    if results.dmarc == "pass":
        return Verdict("authenticated")
    if results.dmarc == "fail":
        return Verdict("failed", "dmarc_fail")
    if results.source != "mailgate":  # the MTA's word is final: its headers will not change
        return Verdict("authenticated" if results.aligned else "unauthenticated")
    if results.dmarc == "temperror":
        if not final:
            return None
        # The domain asked receivers to refuse what it does not sign, and nothing was proven
        # in all the time given: its word stands. Without such a policy, nothing is decided.
        if results.policy in ("quarantine", "reject"):
            return Verdict("failed", "dmarc_temperror")
        return UNCHECKED
    if results.aligned:
        return Verdict("authenticated")
    # Only checks that could align were run: one that did not answer might still pass.
    if not final and "temperror" in (results.dkim, results.spf):
        return None
    return UNCHECKED
