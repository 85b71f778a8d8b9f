"""The CPU the /metrics instrumentation costs one message, measured in-process.

    .venv/bin/python bench/metrics_calls.py

Makes the calls into mailgate.metrics that one accepted message causes on its way to a
ticket, as the components make them: four SMTP replies counted (MAIL, RCPT, DATA's 354, the
250), the DATA answer, ingest finishing the row (a ticket), and one outbox mail (the
acknowledgement) attempted and sent. The session's own calls (open, close, banner, EHLO,
QUIT) are timed apart, as a session may carry one message or many. Repeated in rounds;
the median and range of the rounds are printed. Compare with the server CPU per message in
`bench/intake.py` (its `srv ms/msg` column).
"""

from __future__ import annotations

import statistics
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime

from mailgate import metrics
from mailgate.model import IngestOutcome

ROUNDS = 7
CALLS = 50_000
PEER = ("127.0.0.1", 40000)


def one_message(outcome: IngestOutcome, received_at: datetime) -> None:
    for reply in ("250 2.1.0 OK", "250 2.1.5 OK", "354 End data with <CR><LF>.<CR><LF>"):
        metrics.smtp_replied(reply, metered=True)
    metrics.data_answered("250 2.0.0 Queued as <0F3A59C2D1E84B7A6C90>")
    metrics.smtp_replied("250 2.0.0 Queued as <0F3A59C2D1E84B7A6C90>", metered=True)
    metrics.ingest_finished(outcome, received_at=received_at)
    metrics.outbound_attempted()
    metrics.outbound_finished("ticket_created", "sent")


def one_session() -> None:
    metered = metrics.smtp_session_opened(PEER)
    for reply in ("220 mailgate ESMTP", "250-mailgate", "250 SMTPUTF8", "221 2.0.0 Bye"):
        metrics.smtp_replied(reply, metered=metered)
    metrics.smtp_session_closed(metered)


def per_call_us(work: Callable[..., None], *args: object) -> list[float]:
    rounds = []
    for _ in range(ROUNDS):
        t0 = time.perf_counter()
        for _ in range(CALLS):
            work(*args)
        rounds.append((time.perf_counter() - t0) / CALLS * 1e6)
    return rounds


def main() -> int:
    outcome = IngestOutcome("0F3A59C2D1E84B7A6C90", "ingested", ticket_id=1, created=True)
    now = datetime.now(UTC)
    for name, rounds in (
        ("per message", per_call_us(one_message, outcome, now)),
        ("per session", per_call_us(one_session)),
    ):
        print(
            f"{name}: {statistics.median(rounds):.1f} us "
            f"(rounds {min(rounds):.1f}-{max(rounds):.1f}, {ROUNDS} x {CALLS:,})"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
