"""`tally check`: prove rule 6 and the projection against the journal, for every row.

The audit reads the journal with grouped queries (one row per lot, hold and account), so it
scales with the number of lots, not entries, in memory. Every sum is exact however long the
journal grows (`exact_sum`).
"""

from __future__ import annotations

from collections import defaultdict
from datetime import datetime
from typing import Any, Final

from sqlalchemy import (
    BigInteger,
    Connection,
    Integer,
    case,
    func,
    literal,
    literal_column,
    select,
)

from tally.adapters.db.schema import accounts, entries, hold_allocations, holds, lots
from tally.domain.model import EntryType, HoldStatus
from tally.service.ports import AuditReport

#: Most violations listed one by one; the count is always exact.
MAX_LISTED_VIOLATIONS = 1_000

#: Where `exact_sum` splits each value. Entries and lots are at most 2^53 credits, so each
#: part of a value is below 2^27 in magnitude and a part's sum stays within 64 bits for up to
#: 2^36 rows in one group: far more than any database Tally runs on holds.
_SPLIT_BITS: Final = 27
_LOW_MASK: Final = (1 << _SPLIT_BITS) - 1


def exact_sum(value: Any, name: str) -> list[Any]:
    """SUM(value) as two columns, `<name>_high` and `<name>_low`, for `summed` to join.

    SQLite sums integers in 64 bits and fails the whole query when a sum passes 2^63 (the
    journal's totals do, in time: it only grows); PostgreSQL's sum of bigint is exact. The
    high and low bits of each value summed apart stay small on both, and Python joins them
    exactly. Two's complement makes it hold for negative values too (`>>` keeps the sign)."""
    # Constants in the text: PostgreSQL shifts a bigint by an integer, not by a bigint.
    high = value.bitwise_rshift(literal_column(str(_SPLIT_BITS), Integer))
    low = value.bitwise_and(literal_column(str(_LOW_MASK), BigInteger))
    return [
        func.coalesce(func.sum(high), 0).label(f"{name}_high"),
        func.coalesce(func.sum(low), 0).label(f"{name}_low"),
    ]


def summed(row: Any, name: str) -> int:
    """The exact sum of the `exact_sum` columns named `name` in `row`."""
    high, low = getattr(row, f"{name}_high"), getattr(row, f"{name}_low")
    return (int(high) << _SPLIT_BITS) + int(low)


def _sum_of(kind: EntryType) -> list[Any]:
    return exact_sum(
        case((entries.c.type == kind.value, entries.c.amount), else_=literal(0)), kind.value
    )


class SqlAudit:
    def __init__(self, connection: Connection) -> None:
        self.connection = connection

    def run(self, now: datetime) -> AuditReport:
        report = AuditReport()
        violations: list[str] = []
        self._lots(report, violations, now)
        self._holds(report, violations, now)
        self._accounts(report, violations)
        report.violations = violations
        return report

    def _lots(self, report: AuditReport, violations: list[str], now: datetime) -> None:
        pending_by_lot = {
            row.lot_id: summed(row, "amount")
            for row in self.connection.execute(
                select(hold_allocations.c.lot_id, *exact_sum(hold_allocations.c.amount, "amount"))
                .join(holds, holds.c.hold_id == hold_allocations.c.hold_id)
                .where(holds.c.status == HoldStatus.PENDING.value)
                .group_by(hold_allocations.c.lot_id)
            )
        }
        # Aggregate the journal per lot first, then join: no index on entries.lot_id needed,
        # so debits do not pay for one.
        per_lot = (
            select(
                entries.c.lot_id,
                func.min(entries.c.account_id).label("first_account"),
                func.max(entries.c.account_id).label("last_account"),
                *[column for kind in EntryType for column in _sum_of(kind)],
            )
            .where(entries.c.lot_id.is_not(None))
            .group_by(entries.c.lot_id)
            .subquery()
        )
        rows = self.connection.execute(
            select(
                lots.c.lot_id,
                lots.c.account_id,
                lots.c.amount,
                lots.c.remaining,
                lots.c.expires_at,
                per_lot.c.first_account,
                per_lot.c.last_account,
                *[
                    func.coalesce(per_lot.c[f"{kind.value}_{part}"], 0).label(
                        f"{kind.value}_{part}"
                    )
                    for kind in EntryType
                    for part in ("high", "low")
                ],
            ).select_from(lots.outerjoin(per_lot, per_lot.c.lot_id == lots.c.lot_id))
        )
        for found in rows:
            row = _Sums(found)
            report.lots += 1
            lot = row.lot_id
            pending = pending_by_lot.get(lot, 0)
            if row.expires_at is not None and row.expires_at <= now and row.remaining > 0:
                report.due_lots += 1
            if row.grant != row.amount:
                violations.append(f"lot {lot}: amount {row.amount} but granted {row.grant}")
            rule6 = (
                row.grant
                - row.capture
                - row.debit
                - row.expire
                - row.void
                - row.clawback
                + row.adjustment
                - pending
            )
            if rule6 != row.remaining:
                violations.append(
                    f"lot {lot}: rule 6 gives {rule6} (granted {row.grant} - captured "
                    f"{row.capture} - debited {row.debit} - expired {row.expire} - voided "
                    f"{row.void} - clawed back {row.clawback} + adjusted {row.adjustment} - "
                    f"pending holds {pending}) but remaining is {row.remaining}"
                )
            if row.hold - row.capture - row.release != pending:
                violations.append(
                    f"lot {lot}: held {row.hold} - captured {row.capture} - released "
                    f"{row.release} != {pending} in pending holds"
                )
            if not 0 <= row.remaining <= row.amount:
                violations.append(f"lot {lot}: remaining {row.remaining} outside 0..{row.amount}")
            if row.first_account is not None and not (
                row.first_account == row.last_account == row.account_id
            ):
                violations.append(f"lot {lot}: entries of another account")

    def _holds(self, report: AuditReport, violations: list[str], now: datetime) -> None:
        allocated = {
            row.hold_id: summed(row, "amount")
            for row in self.connection.execute(
                select(
                    hold_allocations.c.hold_id, *exact_sum(hold_allocations.c.amount, "amount")
                ).group_by(hold_allocations.c.hold_id)
            )
        }
        rows = self.connection.execute(
            select(
                holds.c.hold_id,
                holds.c.amount,
                holds.c.captured,
                holds.c.status,
                holds.c.expires_at,
                *_sum_of(EntryType.HOLD),
                *_sum_of(EntryType.CAPTURE),
                *_sum_of(EntryType.RELEASE),
            )
            .select_from(holds.outerjoin(entries, entries.c.hold_id == holds.c.hold_id))
            .group_by(
                holds.c.hold_id,
                holds.c.amount,
                holds.c.captured,
                holds.c.status,
                holds.c.expires_at,
            )
        )
        for found in rows:
            row = _Sums(found)
            report.holds += 1
            hold = row.hold_id
            status = HoldStatus(row.status)
            if status is HoldStatus.PENDING and row.expires_at <= now:
                report.due_holds += 1
            if allocated.get(hold, 0) != row.amount:
                violations.append(
                    f"hold {hold}: amount {row.amount} but allocations {allocated.get(hold, 0)}"
                )
            if row.hold != row.amount:
                violations.append(f"hold {hold}: amount {row.amount} but hold entries {row.hold}")
            expected_capture = row.captured
            expected_release = {
                HoldStatus.PENDING: 0,
                HoldStatus.CAPTURED: row.amount - row.captured,
                HoldStatus.RELEASED: row.amount,
                HoldStatus.EXPIRED: row.amount,
            }[status]
            if row.capture != expected_capture or row.release != expected_release:
                violations.append(
                    f"hold {hold} ({status.value}): captured {row.capture}/released "
                    f"{row.release}, expected {expected_capture}/{expected_release}"
                )

    def _accounts(self, report: AuditReport, violations: list[str]) -> None:
        debt_sign = case(
            (entries.c.type == EntryType.CLAWBACK.value, entries.c.amount),
            (entries.c.type == EntryType.ADJUSTMENT.value, -entries.c.amount),
            else_=literal(0),
        )
        journal: dict[str, tuple[int, int, int]] = defaultdict(lambda: (0, 0, 0))
        for row in self.connection.execute(
            select(
                entries.c.account_id,
                func.count().label("entry_count"),
                func.max(entries.c.seq).label("last"),
                *exact_sum(case((entries.c.lot_id.is_(None), debt_sign), else_=literal(0)), "debt"),
            ).group_by(entries.c.account_id)
        ):
            journal[row.account_id] = (row.entry_count, row.last, summed(row, "debt"))
        pending: dict[str, int] = dict(
            self.connection.execute(
                select(holds.c.account_id, func.count())
                .where(holds.c.status == HoldStatus.PENDING.value)
                .group_by(holds.c.account_id)
            ).all()
        )
        for row in self.connection.execute(
            select(
                accounts.c.account_id,
                accounts.c.debt,
                accounts.c.entry_seq,
                accounts.c.pending_holds,
            )
        ):
            report.accounts += 1
            if row.pending_holds != pending.get(row.account_id, 0):
                violations.append(
                    f"account {row.account_id}: pending_holds {row.pending_holds} but "
                    f"{pending.get(row.account_id, 0)} holds are pending"
                )
            count, last, debt = journal.get(row.account_id, (0, 0, 0))
            report.entries += count
            if debt != row.debt:
                violations.append(
                    f"account {row.account_id}: debt {row.debt} but the journal says {debt}"
                )
            if not count == last == row.entry_seq:
                violations.append(
                    f"account {row.account_id}: entry_seq {row.entry_seq} but {count} entries "
                    f"numbered up to {last}"
                )


class _Sums:
    """A row whose `exact_sum` pairs read as one attribute each (`row.grant`), and whose other
    columns read as they are."""

    __slots__ = ("_row",)

    def __init__(self, row: Any) -> None:
        self._row = row

    def __getattr__(self, name: str) -> Any:
        try:
            return getattr(self._row, name)
        except AttributeError:
            return summed(self._row, name)
