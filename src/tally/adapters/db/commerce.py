"""Orders, codes, the outbox and redemption failures in SQL."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import Connection, func, insert, select, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert

from tally.adapters.db.fast import FastStatement, Json, decode_time
from tally.adapters.db.schema import codes, orders, outbox, redemption_failures, unmatched_pings
from tally.domain.commerce import Code, CodeStatus, Message, Order, OrderStatus
from tally.domain.values import new_id
from tally.service.ports import DuplicateSale

# The fulfilment path's writes, compiled once (see fast.py): a sale costs three statements.
_ADD_ORDER_POSTGRES = FastStatement(pg_insert(orders).on_conflict_do_nothing())
_ADD_ORDER_SQLITE = FastStatement(sqlite_insert(orders).on_conflict_do_nothing())
_ADD_CODE = FastStatement(insert(codes))
_ADD_MESSAGE = FastStatement(insert(outbox))


def _order(row: Any) -> Order:
    return Order(
        id=row.order_id,
        processor=row.processor,
        sale_id=row.sale_id,
        order_number=row.order_number,
        package_id=row.package_id,
        quantity=row.quantity,
        credits=row.credits,
        price=row.price,
        currency=row.currency,
        validity=row.validity,
        expires_at=row.expires_at,
        email=row.email,
        gifter_email=row.gifter_email,
        is_test=bool(row.is_test),
        status=OrderStatus(row.status),
        purchased_at=row.purchased_at,
        created_at=row.created_at,
    )


def _code(row: Any) -> Code:
    return Code(
        id=row.code_id,
        order_id=row.order_id,
        last4=row.last4,
        status=CodeStatus(row.status),
        created_at=row.created_at,
        redeemed_at=row.redeemed_at,
        account_id=row.account_id,
        lot_id=row.lot_id,
        voided_at=row.voided_at,
    )


def _message(row: Any) -> Message:
    return Message(
        id=row.message_id,
        cause=row.cause,
        template=row.template,
        to_email=row.to_email,
        subject=row.subject,
        context=dict(row.context),
        order_id=row.order_id,
        attempts=row.attempts,
        created_at=row.created_at,
    )


class SqlCommerce:
    def __init__(self, connection: Connection) -> None:
        self.connection = connection
        self.postgres = connection.dialect.name == "postgresql"

    # --- orders ---------------------------------------------------------------------------

    def add_order(self, order: Order) -> None:
        """Raises DuplicateSale when the processor's sale has an order already: the unique key
        decides, with no read first and no savepoint (ON CONFLICT DO NOTHING)."""
        statement = _ADD_ORDER_POSTGRES if self.postgres else _ADD_ORDER_SQLITE
        added = statement.execute(
            self.connection,
            {
                "order_id": order.id,
                "processor": order.processor,
                "sale_id": order.sale_id,
                "order_number": order.order_number,
                "package_id": order.package_id,
                "quantity": order.quantity,
                "credits": order.credits,
                "price": order.price,
                "currency": order.currency,
                "validity": order.validity,
                "expires_at": order.expires_at,
                "email": order.email,
                "gifter_email": order.gifter_email,
                "is_test": order.is_test,
                "status": order.status.value,
                "purchased_at": order.purchased_at,
                "created_at": order.created_at,
            },
        )
        if added != 1:
            raise DuplicateSale(order.processor, order.sale_id)

    def order_by_sale(self, processor: str, sale_id: str) -> Order | None:
        row = self.connection.execute(
            select(orders).where(orders.c.processor == processor, orders.c.sale_id == sale_id)
        ).first()
        return None if row is None else _order(row)

    def order(self, order_id: str) -> Order | None:
        row = self.connection.execute(select(orders).where(orders.c.order_id == order_id)).first()
        return None if row is None else _order(row)

    # --- codes ------------------------------------------------------------------------------

    def add_code(self, code: Code, digest: str) -> None:
        _ADD_CODE.execute(
            self.connection,
            {
                "code_id": code.id,
                "order_id": code.order_id,
                "digest": digest,
                "last4": code.last4,
                "status": code.status.value,
                "created_at": code.created_at,
                "redeemed_at": None,
                "account_id": None,
                "lot_id": None,
                "voided_at": None,
            },
        )

    def code_for_update(self, digest: str) -> Code | None:
        """The code with this digest, locked against a concurrent redemption."""
        query = select(codes).where(codes.c.digest == digest)
        if self.postgres:
            query = query.with_for_update()
        row = self.connection.execute(query).first()
        return None if row is None else _code(row)

    def code(self, digest: str) -> Code | None:
        row = self.connection.execute(select(codes).where(codes.c.digest == digest)).first()
        return None if row is None else _code(row)

    def codes_of_order(self, order_id: str) -> list[Code]:
        rows = self.connection.execute(
            select(codes).where(codes.c.order_id == order_id).order_by(codes.c.created_at)
        )
        return [_code(row) for row in rows]

    def mark_redeemed(self, code_id: str, account_id: str, lot_id: str, now: datetime) -> None:
        done = self.connection.execute(
            update(codes)
            .where(codes.c.code_id == code_id, codes.c.status == CodeStatus.ISSUED.value)
            .values(
                status=CodeStatus.REDEEMED.value,
                account_id=account_id,
                lot_id=lot_id,
                redeemed_at=now,
            )
        )
        assert done.rowcount == 1, "a locked, issued code is redeemed exactly once"

    # --- the outbox -----------------------------------------------------------------------------

    def add_message(self, message: Message, now: datetime) -> None:
        _ADD_MESSAGE.execute(
            self.connection,
            {
                "message_id": message.id,
                "cause": message.cause,
                "template": message.template,
                "to_email": message.to_email,
                "subject": message.subject,
                "context": Json(message.context),
                "order_id": message.order_id,
                "status": "pending",
                "attempts": 0,
                "next_attempt_at": now,
                "created_at": message.created_at,
                "sent_at": None,
                "last_error": None,
            },
        )

    def next_due_message(self, now: datetime) -> Message | None:
        """The oldest message due to be sent, locked; other workers skip it (PostgreSQL)."""
        query = (
            select(outbox)
            .where(outbox.c.status == "pending", outbox.c.next_attempt_at <= now)
            .order_by(outbox.c.next_attempt_at)
            .limit(1)
        )
        if self.postgres:
            query = query.with_for_update(skip_locked=True)
        row = self.connection.execute(query).first()
        return None if row is None else _message(row)

    def message_sent(self, message_id: str, context: dict[str, object], now: datetime) -> None:
        self.connection.execute(
            update(outbox)
            .where(outbox.c.message_id == message_id)
            .values(status="sent", sent_at=now, context=context, last_error=None)
        )

    def message_failed(
        self, message_id: str, *, attempts: int, retry_at: datetime | None, error: str
    ) -> None:
        self.connection.execute(
            update(outbox)
            .where(outbox.c.message_id == message_id)
            .values(
                attempts=attempts,
                status="pending" if retry_at is not None else "failed",
                next_attempt_at=retry_at if retry_at is not None else outbox.c.next_attempt_at,
                last_error=error[:500],
            )
        )

    def messages_of_order(self, order_id: str) -> list[dict[str, Any]]:
        rows = self.connection.execute(
            select(
                outbox.c.message_id,
                outbox.c.template,
                outbox.c.status,
                outbox.c.attempts,
                outbox.c.sent_at,
                outbox.c.last_error,
            )
            .where(outbox.c.order_id == order_id)
            .order_by(outbox.c.created_at)
        )
        return [dict(row._mapping) for row in rows]

    # --- unmatched pings and redemption failures -------------------------------------------------

    def add_unmatched(
        self, processor: str, sale_id: str | None, reason: str, payload: Any, now: datetime
    ) -> None:
        self.connection.execute(
            insert(unmatched_pings).values(
                ping_id=new_id("ping", now),
                processor=processor,
                sale_id=sale_id,
                reason=reason[:200],
                payload=payload,
                created_at=now,
            )
        )

    def add_failure(self, subject: str, now: datetime) -> None:
        self.connection.execute(
            insert(redemption_failures).values(
                failure_id=new_id("fail", now), subject=subject[:200], at=now
            )
        )

    def failures_since(self, subject: str, since: datetime) -> tuple[int, datetime | None]:
        """How many failures `subject` had since then, and the oldest of them."""
        row = self.connection.execute(
            select(func.count(), func.min(redemption_failures.c.at)).where(
                redemption_failures.c.subject == subject, redemption_failures.c.at > since
            )
        ).one()
        oldest = row[1]
        if isinstance(oldest, str):  # SQLite answers MIN() of a datetime column as text
            oldest = decode_time(oldest)
        return int(row[0]), oldest
