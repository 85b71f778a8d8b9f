"""The daemon's Prometheus metrics: every definition, and the exposition `/metrics` serves.

The metrics live on a registry of their own (`REGISTRY`), not prometheus_client's global
default, so nothing a library registers there leaks into `/metrics`. Components count with
one line at the place where the event happens (the SMTP session, the ingest worker, the
outbox, the sender checks); the queues are read from the store at scrape time
(`exposition`). No label ever holds a string a client chose: SMTP replies are labelled by
their three-digit code, outbound mail by its kind (`MailKind`), failures by a fixed word.

This module imports nothing of mailgate's but the model, so every layer can count.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any, get_args

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from mailgate.model import ALREADY_PROCESSED, IngestOutcome, MailKind, Queues

REGISTRY = CollectorRegistry(auto_describe=True)

SMTP_SESSIONS = Counter(
    "mailgate_smtp_sessions",
    "SMTP connections accepted, refused ones included (not /healthz's own probes)",
    registry=REGISTRY,
)
SMTP_SESSIONS_OPEN = Gauge(
    "mailgate_smtp_sessions_open", "SMTP connections open now", registry=REGISTRY
)
SMTP_REPLIES = Counter(
    "mailgate_smtp_replies",
    "SMTP replies sent, by status code (the banner and 421 hang-ups included)",
    ["code"],
    registry=REGISTRY,
)
MESSAGES_ACCEPTED = Counter(
    "mailgate_messages_accepted",
    "Messages answered 250 at the end of DATA: committed to the store",
    registry=REGISTRY,
)
MESSAGES_REJECTED = Counter(
    "mailgate_messages_rejected",
    "Messages refused at the end of DATA (too big, a mail loop, the store unavailable), "
    "by status code",
    ["code"],
    registry=REGISTRY,
)
MESSAGES_QUARANTINED = Counter(
    "mailgate_messages_quarantined",
    "Accepted messages that ingest put in quarantine instead of a ticket",
    registry=REGISTRY,
)
TICKETS_CREATED = Counter("mailgate_tickets_created", "Tickets opened by ingest", registry=REGISTRY)
INGEST_LATENCY = Histogram(
    "mailgate_ingest_latency_seconds",
    "From a message's commit (its 250) to ingest finishing it: a ticket, a duplicate, a "
    "bounce or quarantine; sender checks deferred by DNS trouble included",
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600),
    registry=REGISTRY,
)
OUTBOUND_ATTEMPTS = Counter(
    "mailgate_outbound_delivery_attempts",
    "Deliveries of queued mail tried (each retry counts)",
    registry=REGISTRY,
)
OUTBOUND_FAILURES = Counter(
    "mailgate_outbound_delivery_failures",
    "Delivery attempts that did not hand the mail over: 'deferred' (tried again later) or "
    "'failed' (given up: a permanent refusal, or past max_lifetime)",
    ["result"],
    registry=REGISTRY,
)
OUTBOUND_SENT = Counter(
    "mailgate_outbound_mails_sent",
    "Mails handed to the relay, by kind (verification, ticket_created, ...)",
    ["kind"],
    registry=REGISTRY,
)
AUTH_DNS_SECONDS = Histogram(
    "mailgate_auth_dns_seconds",
    "The DNS lookups of one message's sender checks (DMARC policy, DKIM keys, SPF), all at once",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
    registry=REGISTRY,
)

for _result in ("deferred", "failed"):
    OUTBOUND_FAILURES.labels(result=_result)  # a series from the start, at 0
for _kind in get_args(MailKind):
    OUTBOUND_SENT.labels(kind=_kind)

# The client addresses of /healthz's SMTP probes under way (health.py): their sessions are
# not counted, so a monitor asking every few seconds does not swamp the session metrics.
_health_probes: set[tuple[str, int]] = set()


@contextmanager
def health_probe(client: tuple[str, int]) -> Iterator[None]:
    """Leave the SMTP session from `client` (host, port) out of the metrics while in here."""
    _health_probes.add(client)
    try:
        yield
    finally:
        _health_probes.discard(client)


def smtp_session_opened(peer: Any) -> bool:
    """Count a new SMTP connection from `peer` (its peername); False for a health probe,
    whose session then counts nothing."""
    if isinstance(peer, tuple) and tuple(peer[:2]) in _health_probes:
        return False
    SMTP_SESSIONS.inc()
    SMTP_SESSIONS_OPEN.inc()
    return True


def smtp_session_closed(metered: bool) -> None:
    if metered:
        SMTP_SESSIONS_OPEN.dec()


def smtp_replied(reply: str, *, metered: bool) -> None:
    """Count one reply of a metered session by its code (three digits, from our replies)."""
    if not metered or reply[3:4] == "-":  # a line of a multiline reply: its last one counts
        return
    _child(SMTP_REPLIES, reply[:3]).inc()


def data_answered(reply: str) -> None:
    """Count a message by the reply to its DATA: 250 accepted, anything else rejected."""
    if reply.startswith("250"):
        MESSAGES_ACCEPTED.inc()
    else:
        _child(MESSAGES_REJECTED, reply[:3]).inc()


# A metric's series by code, found once: `labels()` costs about 7 us a call (a lock, the
# labels checked), several times per message on the SMTP path. Codes come from our own
# replies, so there are a few dozen at most.
_by_code: dict[tuple[int, str], Counter] = {}


def _child(metric: Counter, code: str) -> Counter:
    key = (id(metric), code)
    child = _by_code.get(key)
    if child is None:
        child = _by_code[key] = metric.labels(code=code if code.isdigit() else "other")
    return child


def ingest_finished(outcome: IngestOutcome, *, received_at: datetime) -> None:
    """Count what ingest made of a row, and how long after its 250; deferred rows are not
    finished, and a row a replay finished meanwhile was counted there."""
    if outcome.state == "received" or outcome.reason == ALREADY_PROCESSED:
        return
    INGEST_LATENCY.observe(max(0.0, (datetime.now(UTC) - received_at).total_seconds()))
    if outcome.state == "quarantined":
        MESSAGES_QUARANTINED.inc()
    elif outcome.created:
        TICKETS_CREATED.inc()


def outbound_attempted() -> None:
    OUTBOUND_ATTEMPTS.inc()


def outbound_finished(kind: MailKind, state: str) -> None:
    """Count an outbox row's outcome: sent (by kind), deferred to a retry, or failed."""
    if state == "sent":
        OUTBOUND_SENT.labels(kind=kind).inc()
    else:
        OUTBOUND_FAILURES.labels(result="deferred" if state == "queued" else "failed").inc()


class _Queues(Collector):
    """The store's queues as they were read for this scrape."""

    def __init__(self, queues: Queues, now: datetime) -> None:
        self._queues = queues
        self._now = now

    def collect(self) -> Iterator[GaugeMetricFamily]:
        inbound, outbox = self._queues.inbound, self._queues.outbox
        yield GaugeMetricFamily(
            "mailgate_ingest_backlog",
            "Accepted messages not yet ingested (inbound rows 'received')",
            value=inbound.by_state.get("received", 0),
        )
        yield self._age(
            "mailgate_ingest_backlog_oldest_seconds",
            "Age of the oldest message not yet ingested (0: none)",
            inbound.oldest_pending,
        )
        rows = GaugeMetricFamily("mailgate_outbox_rows", "Outbox rows by state", labels=["state"])
        for state in ("queued", "sending", "sent", "failed"):
            rows.add_metric([state], outbox.by_state.get(state, 0))
        yield rows
        yield self._age(
            "mailgate_outbox_oldest_pending_seconds",
            "Age of the oldest outbox row still to be delivered, queued or sending (0: none)",
            outbox.oldest_pending,
        )

    def _age(self, name: str, documentation: str, since: datetime | None) -> GaugeMetricFamily:
        age = 0.0 if since is None else max(0.0, (self._now - since).total_seconds())
        return GaugeMetricFamily(name, documentation, value=age)


def exposition(queues: Queues | None, *, now: datetime) -> bytes:
    """The text `/metrics` serves: the counters, and the queues read for this scrape (left
    out when the store did not answer, rather than shown stale)."""
    text = generate_latest(REGISTRY)
    if queues is not None:
        snapshot = CollectorRegistry(auto_describe=False)
        snapshot.register(_Queues(queues, now))
        text += generate_latest(snapshot)
    return text
