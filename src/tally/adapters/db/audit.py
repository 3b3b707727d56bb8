"""`tally check`: prove rule 6 and the projection against the journal, for every row.

The audit reads the journal with grouped queries (one row per lot, hold and account), so it
scales with the number of lots, not entries, in memory.
"""

from __future__ import annotations

from collections import defaultdict
from datetime import datetime
from typing import Any

from sqlalchemy import Connection, case, func, literal, select

from tally.adapters.db.schema import accounts, entries, hold_allocations, holds, lots
from tally.domain.model import EntryType, HoldStatus
from tally.service.ports import AuditReport

#: Most violations listed one by one; the count is always exact.
MAX_LISTED_VIOLATIONS = 1_000


def _sum_of(kind: EntryType) -> Any:
    return func.coalesce(
        func.sum(case((entries.c.type == kind.value, entries.c.amount), else_=literal(0))), 0
    ).label(kind.value)


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
        pending_by_lot: dict[str, int] = dict(
            self.connection.execute(
                select(hold_allocations.c.lot_id, func.sum(hold_allocations.c.amount))
                .join(holds, holds.c.hold_id == hold_allocations.c.hold_id)
                .where(holds.c.status == HoldStatus.PENDING.value)
                .group_by(hold_allocations.c.lot_id)
            ).all()
        )
        # Aggregate the journal per lot first, then join: no index on entries.lot_id needed,
        # so debits do not pay for one.
        per_lot = (
            select(
                entries.c.lot_id,
                func.min(entries.c.account_id).label("first_account"),
                func.max(entries.c.account_id).label("last_account"),
                *[_sum_of(kind) for kind in EntryType],
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
                *[func.coalesce(per_lot.c[kind.value], 0).label(kind.value) for kind in EntryType],
            ).select_from(lots.outerjoin(per_lot, per_lot.c.lot_id == lots.c.lot_id))
        )
        for row in rows:
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
        allocated: dict[str, int] = dict(
            self.connection.execute(
                select(hold_allocations.c.hold_id, func.sum(hold_allocations.c.amount)).group_by(
                    hold_allocations.c.hold_id
                )
            ).all()
        )
        rows = self.connection.execute(
            select(
                holds.c.hold_id,
                holds.c.amount,
                holds.c.captured,
                holds.c.status,
                holds.c.expires_at,
                _sum_of(EntryType.HOLD),
                _sum_of(EntryType.CAPTURE),
                _sum_of(EntryType.RELEASE),
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
        for row in rows:
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
                func.coalesce(
                    func.sum(case((entries.c.lot_id.is_(None), debt_sign), else_=literal(0))),
                    0,
                ).label("debt"),
            ).group_by(entries.c.account_id)
        ):
            journal[row.account_id] = (row.entry_count, row.last, row.debt)
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
