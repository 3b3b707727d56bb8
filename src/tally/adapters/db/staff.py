"""The support console's tables in SQL: staff, their sessions, their actions, and the reads the
console makes across orders, accounts, the outbox and the journal."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import date, datetime
from typing import Any

from sqlalchemy import Connection, and_, case, delete, func, or_, select, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert

from tally.adapters.db.audit import exact_sum, summed
from tally.adapters.db.commerce import _order
from tally.adapters.db.schema import (
    accounts,
    codes,
    entries,
    lots,
    orders,
    outbox,
    redemption_failures,
    staff,
    staff_actions,
    staff_sessions,
)
from tally.domain.commerce import Order
from tally.domain.values import new_id
from tally.service.ports import DayTotals, StaffRecord, StaffSessionRecord

#: Lot sources that count as credits sold on the console's chart.
SOLD_SOURCES = ("purchase", "gift")
SPENT_TYPES = ("capture", "debit")


def _staff(row: Any) -> StaffRecord:
    return StaffRecord(
        staff_id=row.staff_id,
        email=row.email,
        password_hash=row.password_hash,
        created_at=row.created_at,
        disabled_at=row.disabled_at,
    )


class SqlStaff:
    def __init__(self, connection: Connection) -> None:
        self.connection = connection
        self.postgres = connection.dialect.name == "postgresql"

    # --- staff and sessions -------------------------------------------------------------------

    def add(self, record: StaffRecord) -> bool:
        insert = pg_insert if self.postgres else sqlite_insert
        done = self.connection.execute(
            insert(staff)
            .values(
                staff_id=record.staff_id,
                email=record.email,
                password_hash=record.password_hash,
                created_at=record.created_at,
                disabled_at=record.disabled_at,
            )
            .on_conflict_do_nothing()
            .returning(staff.c.staff_id)  # rowcount is not reliable on every driver
        )
        return done.first() is not None

    def by_email(self, email: str, *, lock: bool = False) -> StaffRecord | None:
        query = select(staff).where(staff.c.email == email)
        if lock and self.postgres:
            query = query.with_for_update()
        row = self.connection.execute(query).first()
        return None if row is None else _staff(row)

    def add_attempts(self, subjects: Sequence[str], now: datetime) -> list[str]:
        if not subjects:
            return []
        made = [new_id("fail", now) for _ in subjects]
        self.connection.execute(
            redemption_failures.insert(),
            [
                {"failure_id": made_id, "subject": subject[:200], "at": now}
                for made_id, subject in zip(made, subjects, strict=True)
            ],
        )
        return made

    def forget_attempts(self, attempt_ids: Sequence[str]) -> None:
        if attempt_ids:
            self.connection.execute(
                delete(redemption_failures).where(
                    redemption_failures.c.failure_id.in_(list(attempt_ids))
                )
            )

    def emails(self, staff_ids: Sequence[str]) -> dict[str, str]:
        if not staff_ids:
            return {}
        rows = self.connection.execute(
            select(staff.c.staff_id, staff.c.email).where(staff.c.staff_id.in_(list(staff_ids)))
        )
        return {row.staff_id: row.email for row in rows}

    def set_password_hash(self, staff_id: str, password_hash: str) -> None:
        self.connection.execute(
            update(staff).where(staff.c.staff_id == staff_id).values(password_hash=password_hash)
        )

    def disable(self, staff_id: str, now: datetime) -> None:
        self.connection.execute(
            update(staff)
            .where(staff.c.staff_id == staff_id, staff.c.disabled_at.is_(None))
            .values(disabled_at=now)
        )
        self.connection.execute(delete(staff_sessions).where(staff_sessions.c.staff_id == staff_id))

    def add_session(
        self, digest: str, staff_id: str, *, now: datetime, expires_at: datetime
    ) -> None:
        self.connection.execute(
            staff_sessions.insert().values(
                digest=digest,
                staff_id=staff_id,
                created_at=now,
                last_seen_at=now,
                expires_at=expires_at,
            )
        )

    def session(self, digest: str) -> StaffSessionRecord | None:
        row = self.connection.execute(
            select(
                staff_sessions,
                staff.c.email,
                staff.c.disabled_at.label("staff_disabled_at"),
            )
            .join_from(staff_sessions, staff)
            .where(staff_sessions.c.digest == digest)
        ).first()
        if row is None:
            return None
        return StaffSessionRecord(
            digest=row.digest,
            staff_id=row.staff_id,
            email=row.email,
            created_at=row.created_at,
            last_seen_at=row.last_seen_at,
            expires_at=row.expires_at,
            staff_disabled_at=row.staff_disabled_at,
        )

    def touch_session(self, digest: str, now: datetime) -> None:
        self.connection.execute(
            update(staff_sessions)
            .where(staff_sessions.c.digest == digest, staff_sessions.c.last_seen_at < now)
            .values(last_seen_at=now)
        )

    def delete_session(self, digest: str) -> None:
        self.connection.execute(delete(staff_sessions).where(staff_sessions.c.digest == digest))

    def delete_sessions_ended(self, staff_id: str, idle_since: datetime, now: datetime) -> int:
        done = self.connection.execute(
            delete(staff_sessions).where(
                staff_sessions.c.staff_id == staff_id,
                or_(
                    staff_sessions.c.expires_at <= now, staff_sessions.c.last_seen_at <= idle_since
                ),
            )
        )
        return int(done.rowcount)

    # --- what the console reads -----------------------------------------------------------------

    def search_orders(self, text: str, *, limit: int) -> list[Order]:
        matches = [
            func.lower(orders.c.email) == text.lower(),
            orders.c.order_number == text,
            orders.c.sale_id == text,
            orders.c.order_id == text,
        ]
        if len(text) == 4:
            by_last4 = select(codes.c.order_id).where(codes.c.last4 == text.upper())
            matches.append(orders.c.order_id.in_(by_last4))
        rows = self.connection.execute(
            select(orders)
            .where(or_(*matches))
            .order_by(orders.c.created_at.desc(), orders.c.order_id.desc())
            .limit(limit)
        )
        return [_order(row) for row in rows]

    def search_accounts(self, text: str, *, limit: int) -> list[tuple[str, str | None]]:
        rows = self.connection.execute(
            select(accounts.c.account_id, accounts.c.email)
            .where(or_(accounts.c.account_id == text, func.lower(accounts.c.email) == text.lower()))
            .order_by(accounts.c.account_id)
            .limit(limit)
        )
        return [(row.account_id, row.email) for row in rows]

    def message_for_update(self, message_id: str) -> dict[str, Any] | None:
        query = select(
            outbox.c.message_id,
            outbox.c.cause,
            outbox.c.order_id,
            outbox.c.status,
            outbox.c.attempts,
        ).where(outbox.c.message_id == message_id)
        if self.postgres:
            query = query.with_for_update()
        row = self.connection.execute(query).first()
        return None if row is None else dict(row._mapping)

    def requeue_message(self, message_id: str, now: datetime) -> None:
        done = self.connection.execute(
            update(outbox)
            .where(outbox.c.message_id == message_id, outbox.c.status.in_(["pending", "failed"]))
            .values(status="pending", next_attempt_at=now, attempts=0)
        )
        assert done.rowcount == 1, "a locked, unsent message is requeued once"

    def add_action(
        self,
        *,
        staff_id: str,
        action: str,
        subject: str,
        reason: str,
        idempotency_key: str,
        now: datetime,
    ) -> bool:
        insert = pg_insert if self.postgres else sqlite_insert
        done = self.connection.execute(
            insert(staff_actions)
            .values(
                action_id=new_id("act", now),
                staff_id=staff_id,
                action=action,
                subject=subject,
                reason=reason,
                idempotency_key=idempotency_key,
                created_at=now,
            )
            .on_conflict_do_nothing()
            .returning(staff_actions.c.action_id)
        )
        return done.first() is not None

    def daily_totals(self, since: datetime) -> list[DayTotals]:
        if self.postgres:
            day = func.date(func.timezone("UTC", entries.c.created_at))
        else:  # SQLite keeps naive UTC text: its date() is the UTC day
            day = func.date(entries.c.created_at)
        amount = entries.c.amount

        def total(condition: Any, name: str) -> list[Any]:
            # Exact past 2^63 on SQLite too: a day's credits are unbounded in count.
            return exact_sum(case((condition, amount), else_=0), name)

        query = (
            select(
                day.label("day"),
                *total(and_(entries.c.type == "grant", lots.c.source.in_(SOLD_SOURCES)), "sold"),
                *total(entries.c.type.in_(SPENT_TYPES), "spent"),
                *total(entries.c.type == "expire", "expired"),
            )
            .select_from(entries.outerjoin(lots, entries.c.lot_id == lots.c.lot_id))
            .where(
                entries.c.created_at >= since,
                entries.c.type.in_(["grant", *SPENT_TYPES, "expire"]),
            )
            .group_by(day)
            .order_by(day)
        )
        found = []
        for row in self.connection.execute(query):
            value = row[0]
            when = value if isinstance(value, date) else date.fromisoformat(str(value))
            found.append(
                DayTotals(when, summed(row, "sold"), summed(row, "spent"), summed(row, "expired"))
            )
        return found
