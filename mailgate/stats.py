"""Statistics without personal data: the trend analysis the privacy policy names as a purpose.

From the tickets opened or closed since a date (`--since`, default: all), leaving out every
ticket whose requester restricted processing, objected to it or is being erased:
- tickets opened and closed per day (UTC; a ticket counts as closed on the day it last closed);
- the median first-response time: from a ticket's first customer message to the first agent
  message after it (tickets opened since the date that have one);
- the median resolution time: `closed_at - created_at` of the tickets opened since the date
  that are closed now;
- the reopen rate: of the tickets opened since the date that were ever closed, the share that
  a reply opened again (`tickets.reopened`, migration 011);
- tickets per requester domain, where a domain with fewer than `MIN_DOMAIN` tickets is counted
  in "other": a personal domain (one family's, one consultant's) would otherwise name its
  person.
No name, address, subject or ticket id is in the output.
"""

from __future__ import annotations

import statistics
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from mailgate.domains import a_label, u_label
from mailgate.store.sqlite_rights import TicketFacts

MIN_DOMAIN = 5
OTHER = "other"


@dataclass(frozen=True, slots=True)
class Median:
    seconds: float | None
    count: int  # how many tickets the median is taken over

    def as_json(self) -> dict[str, Any]:
        return {"median_seconds": self.seconds, "tickets": self.count}


@dataclass(frozen=True, slots=True)
class Stats:
    since: datetime | None
    opened: dict[str, int]  # day (YYYY-MM-DD) -> tickets opened
    closed: dict[str, int]
    first_response: Median
    resolution: Median
    reopened: int
    ever_closed: int
    domains: dict[str, int]

    @property
    def reopen_rate(self) -> float | None:
        return self.reopened / self.ever_closed if self.ever_closed else None

    def as_json(self) -> dict[str, Any]:
        days = sorted(set(self.opened) | set(self.closed))
        return {
            "since": self.since.isoformat() if self.since else None,
            "per_day": [
                {"day": d, "opened": self.opened.get(d, 0), "closed": self.closed.get(d, 0)}
                for d in days
            ],
            "tickets_opened": sum(self.opened.values()),
            "tickets_closed": sum(self.closed.values()),
            "first_response": self.first_response.as_json(),
            "resolution": self.resolution.as_json(),
            "reopen": {
                "reopened": self.reopened,
                "ever_closed": self.ever_closed,
                "rate": self.reopen_rate,
            },
            "domains": self.domains,
            "min_domain_tickets": MIN_DOMAIN,
        }


def _day(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).date().isoformat()


def _median(values: Sequence[float]) -> Median:
    return Median(statistics.median(values) if values else None, len(values))


def _domain(domain: str) -> str:
    """One name per domain, however it was spelled (A-labels compared, U-labels shown)."""
    return u_label(a_label(domain))


def compute(facts: Sequence[TicketFacts], since: datetime | None) -> Stats:
    start = since.timestamp() if since else 0.0
    new = [f for f in facts if f.created_at >= start]
    per_domain = Counter(_domain(f.domain) for f in new)
    domains: Counter[str] = Counter()
    for domain, n in per_domain.items():
        domains[domain if n >= MIN_DOMAIN else OTHER] += n
    return Stats(
        since=since,
        opened=dict(Counter(_day(f.created_at) for f in new)),
        closed=dict(
            Counter(_day(f.closed_at) for f in facts if f.closed_at and f.closed_at >= start)
        ),
        first_response=_median(
            [
                f.first_response - f.first_customer
                for f in new
                if f.first_response is not None and f.first_customer is not None
            ]
        ),
        resolution=_median([f.closed_at - f.created_at for f in new if f.closed_at is not None]),
        reopened=sum(1 for f in new if f.reopened),
        ever_closed=sum(1 for f in new if f.reopened or f.closed_at is not None),
        domains=dict(sorted(domains.items(), key=lambda item: (item[0] == OTHER, -item[1]))),
    )


def duration(seconds: float | None) -> str:
    """`3d 4h`, `2h 05m`, `41s`; `-` for none."""
    if seconds is None:
        return "-"
    s = round(seconds)
    days, s = divmod(s, 86400)
    hours, s = divmod(s, 3600)
    minutes, s = divmod(s, 60)
    if days:
        return f"{days}d {hours}h"
    if hours:
        return f"{hours}h {minutes:02d}m"
    if minutes:
        return f"{minutes}m {s:02d}s"
    return f"{s}s"
