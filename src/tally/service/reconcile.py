"""Reconciliation: ask each processor for its sales since a date and fulfil those Tally never
saw (a missed or failed webhook), exactly once. `fulfil`'s unique key on (processor, sale id)
makes a re-run, or a run racing the webhook, harmless.

A run first lists everything, then fulfils: a listing that fails half-way (a 5xx on page 3)
changes nothing, and the next run does the whole job."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import date, timedelta
from typing import Any, Final, Protocol

from tally.domain.commerce import Sale
from tally.domain.errors import InvalidInput, ProcessorFailed
from tally.service.commerce import fulfil
from tally.service.issuing import Links
from tally.service.ports import UnitOfWork

#: Without --since, a run looks this far back: the worker's hourly run overlaps the last
#: ones generously (Gumroad's `after` is a date, in the seller's time zone).
LOOKBACK_DAYS: Final = 3


@dataclass(frozen=True, kw_only=True)
class Listed:
    """One sale as a processor lists it: a sale to fulfil, or why not (`skipped`: nothing
    is owed, e.g. refunded; `unmatched`: owed but not matched to a package, for support)."""

    sale_id: str
    payload: Any
    sale: Sale | None = None
    skipped: str | None = None
    unmatched: str | None = None


class SalesSource(Protocol):
    processor: str

    def sales(self, since: date, now: Any) -> Iterator[Listed]:
        """Every sale created on or after `since`; raises ProcessorFailed when the
        processor cannot answer in full."""


@dataclass
class Reconciliation:
    """What one run found at one processor and what it fixed."""

    processor: str
    since: str
    listed: int = 0
    already_fulfilled: int = 0
    fulfilled: list[str] = field(default_factory=list)  # sale ids fulfilled by this run
    skipped: dict[str, int] = field(default_factory=dict)  # reason -> count
    unmatched: list[str] = field(default_factory=list)  # sale ids recorded for support
    error: str | None = None  # the listing failed: nothing was changed

    def as_json(self) -> dict[str, Any]:
        return {
            "processor": self.processor,
            "since": self.since,
            "listed": self.listed,
            "already_fulfilled": self.already_fulfilled,
            "fulfilled": len(self.fulfilled),
            "fulfilled_sale_ids": self.fulfilled,
            "skipped": self.skipped,
            "unmatched": len(self.unmatched),
            "unmatched_sale_ids": self.unmatched,
            "error": self.error,
        }


def default_since(today: date) -> date:
    return today - timedelta(days=LOOKBACK_DAYS)


def reconcile(
    sources: Sequence[SalesSource],
    uow: UnitOfWork,
    *,
    since: date | None = None,
    pepper: bytes,
    links: Links,
) -> list[Reconciliation]:
    """One Reconciliation per source. A source whose listing fails is reported with its
    `error` and left untouched; the others still run."""
    now = uow.clock()
    today = now.date()
    since = default_since(today) if since is None else since
    if since > today:
        raise InvalidInput("since must not be in the future")
    return [_one(source, uow, since, now, pepper=pepper, links=links) for source in sources]


def _one(
    source: SalesSource, uow: UnitOfWork, since: date, now: Any, *, pepper: bytes, links: Links
) -> Reconciliation:
    report = Reconciliation(source.processor, since.isoformat())
    try:
        listed = list(source.sales(since, now))
    except ProcessorFailed as error:
        report.error = error.detail
        return report
    report.listed = len(listed)
    for found in listed:
        if found.sale is not None:
            if fulfil(found.sale, uow, pepper=pepper, links=links).created:
                report.fulfilled.append(found.sale_id)
            else:
                report.already_fulfilled += 1
        elif found.unmatched is not None:
            if _record_unmatched_once(source.processor, found, uow):
                report.unmatched.append(found.sale_id)
        else:
            reason = found.skipped or "skipped"
            report.skipped[reason] = report.skipped.get(reason, 0) + 1
    return report


def _record_unmatched_once(processor: str, found: Listed, uow: UnitOfWork) -> bool:
    """Keep an unmatched sale for support once, however many runs list it; not at all when
    the sale has an order already (fulfilled before its product left the catalog)."""
    with uow:
        if uow.commerce.order_by_sale(processor, found.sale_id) is not None:
            return False
        if uow.commerce.unmatched_recorded(processor, found.sale_id):
            return False
        uow.commerce.add_unmatched(
            processor,
            found.sale_id or None,
            found.unmatched or "unmatched",
            found.payload,
            uow.clock(),
        )
        uow.commit()
    return True
