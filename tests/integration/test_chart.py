"""The support console's chart (credits sold, spent and expired per UTC day) at its edges: an
entry a microsecond before UTC midnight counts for the day that ends, one at midnight for the
day that begins, whatever the database session's time zone, and the 30-day window starts at
midnight of its first day."""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import event

from tally.adapters.db.engine import Database
from tally.adapters.db.uow import SqlUnitOfWork
from tally.service import ledger, staff
from tally.service.ports import DayTotals
from tests.support import FakeClock

MIDNIGHT = datetime(2026, 3, 1, tzinfo=UTC)
JUST_BEFORE = MIDNIGHT - timedelta(microseconds=1)


@pytest.fixture
def far_zone(db: Database) -> Database:
    """On PostgreSQL, sessions in UTC+14, so a date taken in the session's zone, not UTC's,
    moves evening entries to the next day."""
    if db.dialect == "postgresql":

        @event.listens_for(db.engine, "connect")
        def _zone(dbapi_connection: Any, _record: Any) -> None:
            with dbapi_connection.cursor() as cursor:
                cursor.execute("SET TIME ZONE 'Pacific/Kiritimati'")
            dbapi_connection.commit()

        db.engine.dispose()
    return db


class At:
    """Ledger changes and reads, each at the moment the test names."""

    def __init__(self, db: Database, clock: FakeClock) -> None:
        self.db = db
        self.clock = clock

    def uow(self, when: datetime) -> SqlUnitOfWork:
        self.clock.set(when)
        return SqlUnitOfWork(self.db, self.clock)

    def grant(self, when: datetime, amount: int, source: str, **fields: Any) -> None:
        command = ledger.GrantCredits(
            account_id="buyer" if source == "purchase" else "promo",
            amount=amount,
            source=source,
            idempotency_key=f"grant-{when.isoformat()}-{amount}",
            **fields,
        )
        ledger.grant(command, self.uow(when))

    def debit(self, when: datetime, amount: int) -> None:
        command = ledger.DebitCredits(
            account_id="buyer", amount=amount, idempotency_key=f"debit-{amount}"
        )
        ledger.debit(command, self.uow(when))

    def sweep(self, when: datetime) -> int:
        return ledger.sweep(self.uow(when)).lots_expired

    def chart(self, when: datetime) -> list[DayTotals]:
        return staff.credit_chart(self.uow(when))


def _day(chart: list[DayTotals], day: date) -> tuple[int, int, int]:
    (found,) = [d for d in chart if d.day == day]
    return found.sold, found.spent, found.expired


def test_each_entry_counts_on_its_utc_day_at_midnight(far_zone: Database, clock: FakeClock) -> None:
    at = At(far_zone, clock)
    first_day = MIDNIGHT - timedelta(days=29)  # 31 January: the first of the 30 days shown
    at.grant(first_day - timedelta(microseconds=1), 11, "purchase")  # before the window
    at.grant(first_day, 3, "purchase")
    # Two promotional lots (not sold) that expire on each side of midnight.
    day_before = MIDNIGHT - timedelta(days=1)
    at.grant(day_before, 4, "promotional", expires_at=MIDNIGHT - timedelta(minutes=30))
    at.grant(day_before, 6, "promotional", expires_at=MIDNIGHT)
    at.grant(JUST_BEFORE, 5, "purchase")
    at.debit(JUST_BEFORE, 2)
    assert at.sweep(JUST_BEFORE) == 1  # the 4
    at.grant(MIDNIGHT, 7, "purchase")
    at.debit(MIDNIGHT, 1)
    assert at.sweep(MIDNIGHT) == 1  # the 6

    chart = at.chart(MIDNIGHT)
    assert [d.day for d in chart] == [date(2026, 1, 31) + timedelta(days=n) for n in range(30)]
    edges = {
        date(2026, 1, 31): (3, 0, 0),
        date(2026, 2, 28): (5, 2, 4),
        date(2026, 3, 1): (7, 1, 6),
    }
    assert {d.day: (d.sold, d.spent, d.expired) for d in chart if d.day in edges} == edges
    assert all((d.sold, d.spent, d.expired) == (0, 0, 0) for d in chart if d.day not in edges)

    # A microsecond before midnight, "today" is still the 28th: the window is 30 January to
    # 28 February, and the 11 bought a microsecond before 31 January is in it.
    earlier = at.chart(JUST_BEFORE)
    assert (earlier[0].day, earlier[-1].day) == (date(2026, 1, 30), date(2026, 2, 28))
    assert (earlier[0].sold, earlier[0].spent, earlier[0].expired) == (11, 0, 0)
    last = earlier[-1]
    assert (last.sold, last.spent, last.expired) == (5, 2, 4)
