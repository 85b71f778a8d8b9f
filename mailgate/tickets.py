"""The ticket rules: which ticket a message joins, who may post, and what mail follows.

Every way in goes through `Tickets`, inside one store unit of work (`Store.ingest`, on the
writer thread, synchronous): mail ingest (`take_mail`, with `seen` first), an agent's answer
from `mailgate reply` (`agent_reply`) and the HTTP intake API (`open_or_follow_up`). The
rules take the sender's proven identity as an input (`Proof`, the trust verdict of
`ingest/trust.py` in the rules' terms) and decide from facts the store returns (a ticket's
requester and participants, the requester's verification, the outbox's counts); the store
only persists, and `reactions.py` queues the mails the rules call for.

- *Threading* (ARCHITECTURE rule 4): a message joins ticket T when its In-Reply-To or
  References name a Message-ID issued by mailgate for T (its HMAC checked) or stored for T,
  or its subject carries T's tag, and its sender may post on T. Anything else opens a new
  ticket, so a stranger can never append to someone else's ticket.
- *Who may post*: the ticket's requester, one of its participants, or an agent address; an
  agent's mail acts as the team's only if authenticated (rule 14), else it is a note. A
  failed sender joins no ticket.
- *What follows* (rule 12): an unverified requester gets a verification mail, a new ticket an
  acknowledgement; automatic mail never answers automatic mail, bounces, our own or role
  addresses, agents or a failed sender. An authenticated agent's answer is relayed to the
  requester with the participants on Cc.
- *Bounces*: a bounce that returns one of our Message-IDs is a system note on its ticket;
  it marks undeliverable only addresses the returned mail went to.
- *Privacy requests* (rule 18): mail to `[privacy] address` (an envelope recipient) whose
  subject's first word asks for a right (`privacy_action`), which joins no ticket and is no
  automatic mail, opens a privacy-request ticket, and the mail that follows is the link that
  confirms it, to the From address (never Reply-To): the mailbox whose data it is. Nothing
  is done until that link is confirmed (`privacy/requests.py`), so the From may be forged.
  A failed sender is answered too: the link, not the mail's authentication, proves who asks.
  Anything else sent there is a normal ticket.

Imports `store` (its Protocol), `reactions`, `config`, `msgid` and the shared modules;
never `ingest`, `outbound`, `smtp`, `web` or `cli`, which call it.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime

import structlog

from mailgate.addresses import address_key, same_address
from mailgate.config import AgentsConfig, Config
from mailgate.live import Live
from mailgate.model import (
    Address,
    ParsedMail,
    PrivacyAction,
    StoredAttachment,
    ThreadReason,
    Trust,
)
from mailgate.msgid import MessageIds
from mailgate.reactions import Context, Reactions
from mailgate.store import IngestTx
from mailgate.text import clean_body, clean_line

log = structlog.get_logger(__name__)

# The trust flags that a ticket carries from the message that opened it.
_TICKET_FLAGS = frozenset({"unverified_sender", "unauthenticated"})
# Local parts that never get automatic mail (RFC 3834 section 2, RFC 5321 section 4.5.1).
_ROLE_SENDERS = frozenset({"mailer-daemon", "postmaster"})

# Reply prefixes of common clients and languages (RFC 5322 3.6.5 names only "Re:").
_REPLY_PREFIX = re.compile(
    r"^\s*(?:(?:re|aw|sv|vs|antw|ant|rif|odp|vá|ynt|atb|res|réf|ref|回复|回覆|答复|답장|ΑΠ|Отв)"
    r"\s*(?:\[\d+\]|\(\d+\))?\s*[:：]\s*)+",  # noqa: RUF001 - CJK clients send U+FF1A
    re.IGNORECASE,
)


def strip_reply_prefixes(subject: str) -> str:
    """Remove leading Re:/AW:/SV:/VS:/Antw:/답장: and similar, however often repeated."""
    return _REPLY_PREFIX.sub("", subject).strip()


# The first word of a privacy request's subject, and the right it asks for. Korean: 열람
# (access), 삭제 (deletion), 처리정지 (suspension of processing), also written with 요청
# ("request") or 신청 ("application") joined on, as Hangul compounds are.
PRIVACY_WORDS: Mapping[str, PrivacyAction] = {
    "access": "export",
    "export": "export",
    "erase": "erase",
    "delete": "erase",
    "restrict": "restrict",
    "object": "object",
    "열람": "export",
    "삭제": "erase",
    "처리정지": "restrict",
}
_KOREAN_SUFFIXES = ("요청", "신청")
_FIRST_WORD = re.compile(r"[^\W\d_]+")


def privacy_action(subject: str) -> PrivacyAction | None:
    """The right a subject asks for: its first word (NFKC, case-folded; letters only, so
    `Erase:` and `ERASE my data` ask, `erasers` and `accessibility` do not), or None.

    A reply prefix is not stripped: `Re: erase` answers a mail (ours, perhaps the
    confirmation itself) and asks for nothing new.
    """
    match = _FIRST_WORD.match(unicodedata.normalize("NFKC", subject).lstrip())
    if match is None:
        return None
    word = match.group(0).casefold()
    for suffix in ("", *_KOREAN_SUFFIXES):
        found = PRIVACY_WORDS.get(word.removesuffix(suffix)) if word.endswith(suffix) else None
        if found is not None and (not suffix or not word.removesuffix(suffix).isascii()):
            return found
    return None


def tag_pattern(prefix: str) -> re.Pattern[str]:
    return re.compile(r"\[" + re.escape(prefix) + r"(\d{1,18})\]")


def display_subject(subject: str, prefix: str) -> str:
    """The subject people see for a ticket: no reply prefixes, no ticket tag."""
    cleaned = strip_reply_prefixes(tag_pattern(prefix).sub("", subject))
    return strip_reply_prefixes(cleaned) or "(no subject)"


@dataclass(frozen=True, slots=True)
class Proof:
    """Who a message's sender proved to be (ARCHITECTURE rule 14), as the rules need it."""

    trust: Trust
    flags: tuple[str, ...] = ()  # what the verdict tells agents: unauthenticated, ...
    checks: Mapping[str, object] | None = None  # the checks' results as stored; None: unchecked
    covered: frozenset[str] | None = None  # the header fields the proof covers; None: all
    partial_body: bool = False  # a DKIM signature covers only part of the body (l=)
    forged_results: bool = False  # Authentication-Results claimed our trusted MTA's id


# A request from the web form: its address is the requester's word until the link is clicked.
WEB_FORM = Proof("unauthenticated", ("unauthenticated",), checks={"source": "web form"})


@dataclass(frozen=True, slots=True)
class Arrival:
    """A parsed message and where it came from, for `Tickets.take_mail`."""

    mail: ParsedMail
    proof: Proof
    envelope_sender: str  # MAIL FROM; "" for the null sender
    received_at: datetime
    inbound_id: str | None = None  # the inbound row it came in as
    recipients: tuple[str, ...] = ()  # RCPT TO: which of our addresses it was sent to
    attachments: tuple[StoredAttachment, ...] = ()
    mentioned_ids: tuple[str, ...] = ()  # a bounce's strings shaped like our Message-IDs


@dataclass(frozen=True, slots=True)
class Seen:
    """What the store already holds of a message (`Tickets.seen`)."""

    duplicate_of: int | None = None  # the ticket holding this very message: a repeat delivery
    reused_id: bool = False  # another message from this sender carries its Message-ID


@dataclass(frozen=True, slots=True)
class Filed:
    """Where a message went, and what followed."""

    ticket_id: int
    created: bool = False
    mails_queued: int = 0
    bounce: bool = False  # filed as a bounce (a system note)


@dataclass(frozen=True, slots=True)
class ThreadMatch:
    ticket_id: int | None  # None: open a new ticket
    reason: ThreadReason


class Tickets:
    """The rules, with the configuration they read; every method runs inside a unit of work."""

    def __init__(self, config: Config | Live[Config], msgids: MessageIds) -> None:
        # In the daemon the config is live: the accept list and the agents a reload changes
        # are read at each use (the other keys read here need a restart).
        self._live = Live.of(config)
        config = self._live.current
        self._config = config
        self._msgids = msgids
        self._reactions = Reactions(config, msgids)
        self._tag_prefix = config.tickets.tag_prefix
        self._own_sender = address_key(config.outbound.sender)
        self._privacy = config.privacy

    def _is_support(self, address: str) -> bool:
        return self._live.current.smtp.accepts(address)

    @property
    def _agents(self) -> AgentsConfig:
        return self._live.current.agents

    # The ways in.

    def seen(self, tx: IngestTx, mail: ParsedMail) -> Seen:
        """Tell what the store holds of `mail` already; ingest asks before the sender checks
        are done, since a repeat delivery needs none.

        A repeat delivery (an SMTP client that never saw our 250 sends again) carries the same
        Message-ID, sender and body: it is stored once. The same Message-ID and sender with
        another body is another message (a client that reuses IDs, an edited resend): it is
        kept, flagged `duplicate_message_id`. Nothing accepted disappears.
        """
        if not mail.message_id:
            return Seen()
        sender = mail.sender.email
        if mail.body_digest is not None:
            ticket_id = tx.duplicate_ticket(mail.message_id, sender, mail.body_digest)
            if ticket_id is not None:
                return Seen(duplicate_of=ticket_id, reused_id=True)
        return Seen(reused_id=tx.has_message_id(mail.message_id, sender))

    def take_mail(self, tx: IngestTx, arrival: Arrival, *, seen: Seen, at: datetime) -> Filed:
        """File a message that is no repeat delivery (`seen`) on its ticket, a new one or, for
        a bounce of our mail, the ticket of that mail; queue what follows."""
        mail, proof = arrival.mail, arrival.proof
        if mail.bounce is not None and mail.bounce.tokens:
            # Whatever its trust: a link in a stored copy of our mail must verify no one.
            tx.revoke_tokens(hashes=mail.bounce.tokens, at=at)
        if mail.bounce is not None and proof.trust != "failed":  # a failed one is no bounce
            bounced = self._bounced_ticket(tx, arrival)
            if bounced is not None:
                return self._file_bounce(tx, arrival, bounced, at)
        failed = proof.trust == "failed"
        # A failed sender is not who it claims: it joins no ticket, is no agent, and gets no
        # automatic mail (which would go to the forged address).
        automatic = "untrusted sender" if failed else self._automatic_reason(arrival)
        claims_agent = automatic == "agent"  # a person on the team (their out-of-office is not)
        match = ThreadMatch(None, "new") if failed else self._thread(tx, mail, agent=claims_agent)
        privacy = self._privacy_request(arrival) if match.ticket_id is None else None
        return self._file(
            tx, arrival, match, automatic, reused_id=seen.reused_id, at=at, privacy=privacy
        )

    def agent_reply(
        self, tx: IngestTx, ticket_id: int, body: str, *, agent: Address | None, at: datetime
    ) -> int:
        """Store an agent's answer on the ticket and queue it to the requester; return the
        outbox id. `agent` None is the team (`[outbound] sender`), as `mailgate reply` is."""
        subject, _requester = tx.ticket_head(ticket_id)
        message_id = self._msgids.new(ticket_id)
        outbound = self._config.outbound
        answer = ParsedMail(
            sender=agent or Address(outbound.sender, outbound.sender_name),
            to=(),
            cc=(),
            subject=subject,
            message_id=message_id,
            in_reply_to=(),
            references=(),
            body_text=body,
            body_html=None,
        )
        tx.add_message(
            ticket_id,
            answer,
            inbound_id=None,
            reason="agent",
            attachments=(),
            at=at,
            author="agent",
        )
        return self.relay_agent_reply(
            tx, ticket_id, body, agent=agent, at=at, message_id=message_id
        )

    def open_or_follow_up(
        self,
        tx: IngestTx,
        requester: Address,
        subject: str,
        body: str,
        ticket_id: int | None,
        *,
        at: datetime,
    ) -> Filed:
        """Take a request from the web form (the HTTP intake API, `POST /api/tickets`).

        A follow-up joins `ticket_id` if that names a ticket of `requester` (reopening it if
        closed); anything else opens a new ticket, as mail does, so a number guessed or
        copied adds nothing to another person's ticket and tells nothing of it. The address
        is the requester's word (`WEB_FORM`: unauthenticated), so the same mails follow as
        for mail: the verification mail while the address is unverified, the acknowledgement
        of a new ticket, both within the automatic-mail limits.

        Args:
            requester: the address, validated at the edge (`addresses.validate_address`),
                and the name given.
            subject, body: as typed; cleaned here like a mail's (`text.clean_line`,
                `text.clean_body`).
        """
        mail = ParsedMail(
            sender=Address(requester.email, clean_line(requester.name or "") or None),
            to=(),
            cc=(),
            subject=clean_line(subject),
            message_id=None,
            in_reply_to=(),
            references=(),
            body_text=clean_body(body),
            body_html=None,
        )
        arrival = Arrival(mail, WEB_FORM, envelope_sender=requester.email, received_at=at)
        joins = ticket_id is not None and self._is_requester(tx, ticket_id, requester.email)
        # A follow-up names its ticket as a reply's References do (the stored thread reasons
        # have no other word for it yet).
        match = ThreadMatch(ticket_id, "references") if joins else ThreadMatch(None, "new")
        automatic = self._automatic_reason(arrival)
        return self._file(tx, arrival, match, automatic, reused_id=False, at=at)

    def relay_agent_reply(
        self,
        tx: IngestTx,
        ticket_id: int,
        body: str,
        *,
        agent: Address | None,
        at: datetime,
        message_id: str | None = None,
    ) -> int:
        """Queue an agent's (already stored) answer to the requester, the participants on Cc
        but for our own addresses and agents; the agent's address only if exposed."""
        subject, requester = tx.ticket_head(ticket_id)
        expose = agent is not None and self._agents.expose_address
        context: Context = {
            "subject": subject,
            "body": body,
            "requester_name": requester.name,
            "agent_name": agent.name if expose and agent else None,
            "agent_email": agent.email if expose and agent else None,
        }
        cc = tuple(
            email
            for email in tx.participants(ticket_id)
            if not same_address(email, requester.email)
            and not self._is_support(email)
            and not self._agents.includes(email)
        )
        return self._reactions.queue(
            tx,
            "agent_reply",
            ticket_id,
            requester,
            context,
            automatic=False,
            at=at,
            cc=cc,
            message_id=message_id,
        )

    def address_corrected(
        self, tx: IngestTx, ticket_id: int, new_email: str, *, at: datetime
    ) -> int | None:
        """A requester's address was corrected (`requesters update --email`): the new one is
        verified again, by a verification mail about their latest ticket, to the bare address
        (architecture rule 13). None if a limit (or a restriction) says no."""
        return self._reactions.verification(
            tx, ticket_id, Address(new_email, None), sender=new_email, at=at
        )

    # Which ticket, and who may post there.

    def may_post(self, tx: IngestTx, ticket_id: int, sender: str, *, agent: bool) -> bool:
        """Tell whether `sender` may post on the ticket: it exists, and the sender is an
        agent (`agent`: an agent address; its mail is relayed only if authenticated, else it
        is a note), the ticket's requester or one of its participants."""
        if tx.ticket_status(ticket_id) is None:
            return False
        if agent:
            return True
        _subject, requester = tx.ticket_head(ticket_id)
        if same_address(requester.email, sender):
            return True
        return any(same_address(p, sender) for p in tx.participants(ticket_id))

    def _is_requester(self, tx: IngestTx, ticket_id: int, sender: str) -> bool:
        if tx.ticket_status(ticket_id) is None:
            return False
        _subject, requester = tx.ticket_head(ticket_id)
        return same_address(requester.email, sender)

    def _thread(self, tx: IngestTx, mail: ParsedMail, *, agent: bool) -> ThreadMatch:
        """Choose the ticket `mail` belongs to, checking the sender may post there.

        A stored Message-ID names the ticket of the message that carried it from that sender:
        a stranger who copies someone's Message-ID onto a ticket of their own cannot make
        replies to it land there.
        """
        sender = mail.sender.email
        referenced = list(dict.fromkeys([*reversed(mail.in_reply_to), *reversed(mail.references)]))
        issued = [t for t in map(self._msgids.ticket_of, referenced) if t is not None]
        stored = tx.tickets_by_message_ids(referenced, sender)
        for ticket_id in dict.fromkeys([*issued, *stored]):
            if self.may_post(tx, ticket_id, sender, agent=agent):
                return ThreadMatch(ticket_id, "references")
        for tag in tag_pattern(self._tag_prefix).findall(mail.subject):
            if self.may_post(tx, int(tag), sender, agent=agent):
                return ThreadMatch(int(tag), "subject_tag")
        return ThreadMatch(None, "new")

    # Filing a message, and what follows.

    def _file(
        self,
        tx: IngestTx,
        arrival: Arrival,
        match: ThreadMatch,
        automatic: str | None,
        *,
        reused_id: bool,
        at: datetime,
        privacy: PrivacyAction | None = None,
    ) -> Filed:
        """Store the message on the matched ticket (or a new one) and queue what follows;
        `privacy`: it opens a privacy request (a new ticket, no participants, the link)."""
        mail, proof = arrival.mail, arrival.proof
        trusted = proof.trust == "authenticated"
        claims_agent = automatic == "agent"
        on_ticket = match.ticket_id is not None
        if match.ticket_id is None:
            ticket_id = tx.create_ticket(
                display_subject(mail.subject, self._tag_prefix),
                mail.sender,
                at=arrival.received_at,
                flags=[
                    *(f for f in proof.flags if f in _TICKET_FLAGS),
                    *(["privacy_request"] if privacy else []),
                ],
                rename=trusted,  # only a proven sender renames a known requester
            )
        else:
            ticket_id = match.ticket_id
            # A reply reopens the ticket; an out-of-office or an agent's answer does not.
            if tx.ticket_status(ticket_id) == "closed" and automatic is None:
                tx.set_status(ticket_id, "open", at=at)
        # An agent's answer is relayed to the customer only when the agent is proven; else it
        # is a note that only agents see.
        relayed = claims_agent and on_ticket and trusted
        note = claims_agent and on_ticket and not trusted
        flags = _flags(mail, proof, reused_id=reused_id)
        checks = {**proof.checks, "trust": proof.trust} if proof.checks is not None else None
        tx.add_message(
            ticket_id,
            mail,
            inbound_id=arrival.inbound_id,
            reason=match.reason,
            attachments=arrival.attachments,
            at=arrival.received_at,
            author="agent" if relayed else "system" if note else "customer",
            auth=checks or {"trust": proof.trust, "source": "not checked"},
            flags=[*flags, "not_relayed"] if note else flags,
        )
        if privacy is not None:
            queued = self._privacy_link(tx, mail, ticket_id, privacy, trusted=trusted, at=at)
        elif relayed:
            self.relay_agent_reply(tx, ticket_id, mail.body_text, agent=mail.sender, at=at)
            queued = 1
        elif note:
            log.warning(
                "agent_mail_not_authenticated", ticket_id=ticket_id, queue_id=arrival.inbound_id
            )
            queued = 0
        else:
            if trusted:  # only a proven sender may let others post on the ticket
                tx.add_participants(ticket_id, self._participants(mail, proof.covered))
            queued = self._after_customer_mail(
                tx, mail, automatic, ticket_id, created=not on_ticket, trusted=trusted, at=at
            )
        return Filed(ticket_id, created=not on_ticket, mails_queued=queued)

    def _after_customer_mail(
        self,
        tx: IngestTx,
        mail: ParsedMail,
        automatic: str | None,
        ticket_id: int,
        *,
        created: bool,
        trusted: bool,
        at: datetime,
    ) -> int:
        """Queue the verification mail and the acknowledgement that `mail` calls for."""
        if automatic is not None:
            log.info("automatic_mail_suppressed", ticket_id=ticket_id, because=automatic)
            return 0
        sender = mail.sender.email
        if trusted:  # it wrote in again; a claim to be that address proves nothing
            tx.set_undeliverable(sender, None, at=at)
        queued = []
        requester = tx.requester(sender)
        if (
            requester is not None
            and not requester.verified
            and not tx.has_live_token(sender, at=at)
        ):
            to = Address(requester.email, requester.name)
            queued.append(self._reactions.verification(tx, ticket_id, to, sender=sender, at=at))
        if created and self._config.outbound.acknowledge:
            _subject, to = tx.ticket_head(ticket_id)
            queued.append(self._reactions.automatic(tx, "ticket_created", ticket_id, to, {}, at=at))
        return sum(1 for outbox_id in queued if outbox_id is not None)

    # Privacy requests by mail (rule 18).

    def _privacy_request(self, arrival: Arrival) -> PrivacyAction | None:
        """The right this mail asks for, if it is a privacy request: sent to the privacy
        address (as an envelope recipient: the To header is the sender's word) and no
        automatic mail (RFC 3834: a bounce or an out-of-office asks for nothing); whatever
        the sender's trust, which the link decides."""
        if not any(self._privacy.is_address(r) for r in arrival.recipients):
            return None
        if self._automatic_reason(arrival) is not None:
            return None
        return privacy_action(arrival.mail.subject)

    def _privacy_link(
        self,
        tx: IngestTx,
        mail: ParsedMail,
        ticket_id: int,
        action: PrivacyAction,
        *,
        trusted: bool,
        at: datetime,
    ) -> int:
        """Queue the link that confirms a privacy request, to the From address: only its
        mailbox can confirm, so a forged From makes mailgate ask the real owner, never act."""
        sender = mail.sender.email
        if trusted:  # it wrote in again; a claim to be that address proves nothing
            tx.set_undeliverable(sender, None, at=at)
        queued = self._reactions.privacy_confirmation(tx, ticket_id, sender, action, at=at)
        log.info(
            "privacy_request_received", ticket_id=ticket_id, action=action, link=queued is not None
        )
        return int(queued is not None)

    def privacy_done(
        self, tx: IngestTx, ticket_id: int, to: str, action: PrivacyAction, *, at: datetime
    ) -> int:
        """A confirmed restriction or objection was applied: say so, on its ticket. It is
        the answer to the person's own request, not processing for support, so it goes
        although they are restricted now."""
        context: Context = {"action": action}
        return self._reactions.privacy_answer(tx, "privacy_done", ticket_id, to, context, at=at)

    def privacy_export(
        self,
        tx: IngestTx,
        ticket_id: int,
        to: str,
        *,
        blob: str | None,
        size: int,
        at: datetime,
    ) -> int:
        """Mail a confirmed export: the zip in `blob` (attached at send time), or, with no
        blob, why not (past `[privacy] max_export_size`: an agent sends it another way)."""
        context: Context = {
            "export_blob": blob,
            "export_size": size,
            "max_size": self._privacy.max_export_size,
            "too_large": int(blob is None),
        }
        return self._reactions.privacy_answer(tx, "privacy_export", ticket_id, to, context, at=at)

    def privacy_erased(self, tx: IngestTx, to: str, *, at: datetime) -> int:
        """Tell `to` their data was erased, once the person with that address (being erased)
        is gone: a system mail that names nothing of them but the address it goes to."""
        return self._reactions.farewell(tx, to, at=at)

    def _participants(self, mail: ParsedMail, covered: frozenset[str] | None) -> list[str]:
        """To and Cc addresses besides the sender and ours, one spelling of each; only fields
        the proof covers (`covered`, None for all): a replayed signed mail with a Cc added
        adds no one."""
        sender = address_key(mail.sender.email)
        fields = [
            addresses
            for name, addresses in (("to", mail.to), ("cc", mail.cc))
            if covered is None or name in covered
        ]
        found: dict[str, str] = {}  # by key: one spelling of each address
        for a in (address for addresses in fields for address in addresses):
            key = address_key(a.email)
            if not self._is_support(a.email) and key != sender:
                found.setdefault(key, a.email)
        return sorted(found.values())

    def _automatic_reason(self, arrival: Arrival) -> str | None:
        """Why no automatic mail may answer this one (RFC 3834, rule 12), or None."""
        mail = arrival.mail
        sender = mail.sender.email
        if not arrival.envelope_sender:
            return "null sender"
        if mail.bounce is not None:
            return "bounce"
        if mail.automatic:
            return mail.automatic
        for address in (sender, arrival.envelope_sender):
            if address.partition("@")[0].lower() in _ROLE_SENDERS:
                return "mailer-daemon"
        if self._is_support(sender) or address_key(sender) == self._own_sender:
            return "own address"
        if self._agents.includes(sender):
            return "agent"  # the team's own people need no verification or acknowledgement
        return None

    # Bounces of our mail.

    def _bounced_ticket(self, tx: IngestTx, arrival: Arrival) -> int | None:
        """The ticket of the mail of ours a bounce returns, if it names one with a valid HMAC."""
        tickets = [t for t in map(self._msgids.ticket_of, self._returned_ids(arrival)) if t]
        return next((t for t in tickets if tx.ticket_status(t) is not None), None)

    def _returned_ids(self, arrival: Arrival) -> list[str]:
        """Our Message-IDs (valid HMAC) of the mail a bounce returns: those of its returned
        part, or, where it returns only some headers or nothing (many formats besides RFC
        3464), those anywhere in the bounce (found by the parser process: `mentioned_ids`)."""
        bounce = arrival.mail.bounce
        assert bounce is not None
        ours = self._msgids.ticket_of
        own = [i for i in bounce.returned_ids if ours(i) is not None]
        return own or list(dict.fromkeys(i for i in arrival.mentioned_ids if ours(i) is not None))

    def _file_bounce(self, tx: IngestTx, arrival: Arrival, ticket_id: int, at: datetime) -> Filed:
        """File a bounce as a system note; a permanent failure stops automatic mail there."""
        mail = arrival.mail
        assert mail.bounce is not None
        tx.add_message(
            ticket_id,
            mail,
            inbound_id=arrival.inbound_id,
            reason="bounce",
            attachments=arrival.attachments,
            at=arrival.received_at,
            author="system",
        )
        # Only an address the returned mail went to can be marked: a bounce that names others
        # would let anyone holding one of our mails silence a third party. And no address
        # bounces its own mail: the "failure" an auto-reply names as its sender is a heuristic
        # read of its text, not a mail system's report.
        returned = self._returned_ids(arrival)
        sent_to = {address_key(a) for i in returned for a in tx.sent_to(i)}
        sent_to.discard(address_key(mail.sender.email))
        for recipient, status in mail.bounce.failed:
            if status.startswith("5") and address_key(recipient) in sent_to:
                tx.set_undeliverable(recipient, status, at=at)
        if mail.bounce.permanent:  # a verification mail that never arrived verifies no one
            tx.revoke_tokens(message_ids=returned, at=at)
        log.info("bounce_filed", ticket_id=ticket_id, permanent=len(mail.bounce.permanent))
        return Filed(ticket_id, bounce=True)


def _flags(mail: ParsedMail, proof: Proof, *, reused_id: bool) -> list[str]:
    """What an agent should know before trusting this message: its trust level, the shape of
    its header (whether or not it was checked), then the rest; each flag once."""
    flags = [*proof.flags, *mail.evidence.flags]
    if any(not same_address(a.email, mail.sender.email) for a in mail.reply_to):
        flags.append("reply_to_differs")  # stored and shown; it never changes the requester
    if proof.partial_body:
        flags.append("dkim_partial_body")
    if proof.forged_results:
        flags.append("forged_authentication_results")
    if reused_id:
        flags.append("duplicate_message_id")
    return list(dict.fromkeys(flags))
