"""Orders, codes, the outbox and redemption failures in SQL."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import (
    Connection,
    and_,
    bindparam,
    case,
    delete,
    func,
    insert,
    or_,
    select,
    text,
    update,
)
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert

from tally.adapters.db.fast import FastStatement, Json, decode_json, decode_time
from tally.adapters.db.schema import (
    codes,
    entries,
    orders,
    outbox,
    processor_events,
    redemption_failures,
    unmatched_pings,
)
from tally.domain.commerce import Code, CodeStatus, Message, Order, OrderStatus
from tally.domain.values import new_id
from tally.service.ports import DuplicateSale, ProcessorEvent, UnmatchedPing

# The fulfilment path's writes, compiled once (see fast.py): a sale costs three statements.
_ADD_ORDER_POSTGRES = FastStatement(pg_insert(orders).on_conflict_do_nothing())
_ADD_ORDER_SQLITE = FastStatement(sqlite_insert(orders).on_conflict_do_nothing())
_ADD_CODE = FastStatement(insert(codes))
_ADD_MESSAGE = FastStatement(insert(outbox))


_ADVISORY_LOCK = text("SELECT pg_advisory_xact_lock(:key)")


def _lock_key(subject: str) -> int:
    """A subject's advisory lock: 64 bits of its hash, as PostgreSQL's signed bigint."""
    digest = hashlib.blake2b(subject.encode(), digest_size=8, person=b"tally-limit").digest()
    return int.from_bytes(digest, "big", signed=True)


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
        # refunds and disputes
        payment_ref=row.payment_ref,
        refunded_amount=row.refunded_amount,
        credits_taken=row.credits_taken,
        credits_owed=row.credits_owed,
        refunded_at=row.refunded_at,
        disputed_at=row.disputed_at,
        refund_reason=row.refund_reason,
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

    # --- orders -----------------------------------------------------------------------------------

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
                # refunds and disputes
                "payment_ref": order.payment_ref,
                "refunded_amount": order.refunded_amount,
                "credits_taken": order.credits_taken,
                "credits_owed": order.credits_owed,
                "refunded_at": order.refunded_at,
                "disputed_at": order.disputed_at,
                "refund_reason": order.refund_reason,
            },
        )
        assert added is not None, "added outside a batch: the row count decides"
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

    # --- codes ------------------------------------------------------------------------------------

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

    # --- the outbox -------------------------------------------------------------------------------

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

    def claim_message(self, now: datetime, *, until: datetime) -> tuple[str, int] | None:
        """The oldest due message, claimed: its attempt counted and not due again until
        `until`. Answers (its id, its attempts with this one). Reads no more than the id, so
        a row that cannot be decoded is claimed, and failed, like any other. Concurrent
        claims skip a row being claimed (PostgreSQL); SQLite's writers take turns."""
        query = (
            select(outbox.c.message_id, outbox.c.attempts)
            .where(outbox.c.status == "pending", outbox.c.next_attempt_at <= now)
            .order_by(outbox.c.next_attempt_at)
            .limit(1)
        )
        if self.postgres:
            query = query.with_for_update(skip_locked=True)
        row = self.connection.execute(query).first()
        if row is None:
            return None
        attempts = int(row.attempts) + 1
        self.connection.execute(
            update(outbox)
            .where(outbox.c.message_id == row.message_id)
            .values(attempts=attempts, next_attempt_at=until)
        )
        return str(row.message_id), attempts

    def message(self, message_id: str) -> Message | None:
        row = self.connection.execute(
            select(outbox).where(outbox.c.message_id == message_id)
        ).first()
        return None if row is None else _message(row)

    def message_sent(
        self, message_id: str, context: dict[str, object], now: datetime, *, attempts: int
    ) -> bool:
        """Recorded only while the claim that made `attempts` holds (not requeued since)."""
        done = self.connection.execute(
            update(outbox)
            .where(*_claim_holds(message_id, attempts))
            .values(status="sent", sent_at=now, context=context, last_error=None)
        )
        return done.rowcount == 1

    def message_failed(
        self, message_id: str, *, attempts: int, retry_at: datetime | None, error: str
    ) -> bool:
        """Recorded only while the claim that made `attempts` holds (not requeued since)."""
        done = self.connection.execute(
            update(outbox)
            .where(*_claim_holds(message_id, attempts))
            .values(
                status="pending" if retry_at is not None else "failed",
                next_attempt_at=retry_at if retry_at is not None else outbox.c.next_attempt_at,
                last_error=error[:500],
            )
        )
        return done.rowcount == 1

    def messages_of_order(self, order_id: str) -> list[dict[str, Any]]:
        rows = self.connection.execute(
            select(
                outbox.c.message_id,
                outbox.c.template,
                outbox.c.status,
                outbox.c.attempts,
                outbox.c.sent_at,
                outbox.c.last_error,
                outbox.c.next_attempt_at,
            )
            .where(outbox.c.order_id == order_id)
            .order_by(outbox.c.created_at)
        )
        return [dict(row._mapping) for row in rows]

    # --- unmatched pings and redemption failures --------------------------------------------------

    def add_unmatched(
        self, processor: str, sale_id: str | None, reason: str, payload: Any, now: datetime
    ) -> None:
        """Kept as it came, except what neither database can store: a NUL becomes U+FFFD and
        a sale id over 128 characters is cut, so a hostile ping is kept, not a 500."""
        self.connection.execute(
            insert(unmatched_pings).values(
                ping_id=new_id("ping", now),
                processor=processor,
                sale_id=_storable_sale_id(sale_id),
                reason=_storable(reason)[:200],
                payload=_storable(payload),
                created_at=now,
            )
        )

    def lock_subjects(self, subjects: Sequence[str]) -> None:
        """PostgreSQL: a transaction-scoped advisory lock per subject, taken in the order of
        their keys, so two transactions naming the same subjects never deadlock. SQLite
        needs none: its one writer (BEGIN IMMEDIATE) holds every subject already."""
        if self.connection.dialect.name != "postgresql":
            return
        for key in sorted({_lock_key(subject) for subject in subjects}):
            self.connection.execute(_ADVISORY_LOCK, {"key": key})

    def failures_within(self, windows: Mapping[str, datetime]) -> dict[str, tuple[int, datetime]]:
        """Per subject, in one query: its failures after its own `since`, and the oldest."""
        if not windows:
            return {}
        failure = redemption_failures.c
        rows = self.connection.execute(
            select(failure.subject, func.count(), func.min(failure.at))
            .where(
                or_(
                    *(
                        and_(failure.subject == subject, failure.at > since)
                        for subject, since in windows.items()
                    )
                )
            )
            .group_by(failure.subject)
        )
        found: dict[str, tuple[int, datetime]] = {}
        for subject, count, at in rows:
            # SQLite answers MIN() of a datetime column as text.
            found[subject] = (int(count), decode_time(at) if isinstance(at, str) else at)
        return found

    def add_failures(self, subjects: Sequence[str], now: datetime) -> None:
        if subjects:
            self.connection.execute(
                insert(redemption_failures),
                [
                    {"failure_id": new_id("fail", now), "subject": subject, "at": now}
                    for subject in subjects
                ],
            )

    def unmatched(self, limit: int) -> list[UnmatchedPing]:
        ping = unmatched_pings.c
        rows = self.connection.execute(
            select(unmatched_pings)
            .order_by(ping.created_at.desc(), ping.ping_id.desc())
            .limit(limit)
        )
        return [
            UnmatchedPing(
                row.ping_id,
                row.processor,
                row.sale_id,
                row.reason,
                row.payload,
                decode_time(row.created_at) if isinstance(row.created_at, str) else row.created_at,
            )
            for row in rows
        ]

    def remove_failures_before(self, before: datetime, limit: int) -> int:
        failure = redemption_failures.c
        oldest = (
            select(failure.failure_id).where(failure.at < before).order_by(failure.at).limit(limit)
        )
        done = self.connection.execute(
            delete(redemption_failures).where(failure.failure_id.in_(oldest))
        )
        return int(done.rowcount)

    # --- lost codes and reconciliation ------------------------------------------------------------

    def void_issued_code(self, code_id: str, now: datetime) -> bool:
        done = self.connection.execute(
            update(codes)
            .where(codes.c.code_id == code_id, codes.c.status == CodeStatus.ISSUED.value)
            .values(status=CodeStatus.VOID.value, voided_at=now)
        )
        return done.rowcount == 1

    def find_orders(
        self,
        *,
        email: str | None,
        order_number: str | None,
        limit: int,
        starting_after: str | None,
    ) -> list[Order]:
        query = select(orders).order_by(orders.c.order_id.desc()).limit(limit)
        if email is not None:
            # Processors keep the buyer's spelling; support types it however it comes.
            query = query.where(func.lower(orders.c.email) == email.lower())
        if order_number is not None:
            query = query.where(orders.c.order_number == order_number)
        if starting_after is not None:
            query = query.where(orders.c.order_id < starting_after)
        return [_order(row) for row in self.connection.execute(query)]

    def codes_of_orders(self, order_ids: Sequence[str]) -> dict[str, list[Code]]:
        found: dict[str, list[Code]] = {order_id: [] for order_id in order_ids}
        if not order_ids:
            return found
        rows = self.connection.execute(
            select(codes)
            .where(codes.c.order_id.in_(list(order_ids)))
            .order_by(codes.c.order_id, codes.c.created_at, codes.c.code_id)
        )
        for row in rows:
            found[row.order_id].append(_code(row))
        return found

    def unmatched_recorded(self, processor: str, sale_id: str) -> bool:
        row = self.connection.execute(
            select(unmatched_pings.c.ping_id)
            .where(
                unmatched_pings.c.processor == processor,
                unmatched_pings.c.sale_id == _storable_sale_id(sale_id),
            )
            .limit(1)
        ).first()
        return row is not None

    # --- refunds and disputes ---------------------------------------------------------------------

    def lock_sale(self, processor: str, key: str) -> None:
        if self.postgres:  # SQLite: BEGIN IMMEDIATE serialises writers already
            _LOCK_SALE.rows(self.connection, {"lock_key": _sale_lock_key(processor, key)})

    def order_by_payment_ref(self, processor: str, payment_ref: str) -> Order | None:
        query = select(orders).where(
            orders.c.processor == processor, orders.c.payment_ref == payment_ref
        )
        if self.postgres:
            query = query.with_for_update()
        row = self.connection.execute(query).first()
        return None if row is None else _order(row)

    def lock_order(self, order_id: str) -> Order | None:
        query = select(orders).where(orders.c.order_id == order_id)
        if self.postgres:
            query = query.with_for_update()
        row = self.connection.execute(query).first()
        return None if row is None else _order(row)

    def codes_of_order_for_update(self, order_id: str) -> list[Code]:
        query = (
            select(codes)
            .where(codes.c.order_id == order_id)
            .order_by(codes.c.created_at, codes.c.code_id)
        )
        if self.postgres:
            query = query.with_for_update()
        return [_code(row) for row in self.connection.execute(query)]

    def save_reversal(self, order: Order) -> None:
        done = self.connection.execute(
            update(orders)
            .where(orders.c.order_id == order.id)
            .values(
                status=order.status.value,
                refunded_amount=order.refunded_amount,
                credits_taken=order.credits_taken,
                credits_owed=order.credits_owed,
                refunded_at=order.refunded_at,
                disputed_at=order.disputed_at,
                refund_reason=order.refund_reason,
            )
        )
        assert done.rowcount == 1

    def lot_consumed(self, account_id: str, lot_id: str) -> int:
        # Adjustment entries on a lot are debt repayments, signed negative (see Account.grant).
        spent = case(
            (entries.c.type.in_(("capture", "debit")), entries.c.amount),
            (entries.c.type == "adjustment", -entries.c.amount),
            else_=0,
        )
        total = self.connection.execute(
            select(func.coalesce(func.sum(spent), 0)).where(
                entries.c.account_id == account_id, entries.c.lot_id == lot_id
            )
        ).scalar_one()
        return int(total)

    def add_processor_event(self, event: ProcessorEvent) -> bool:
        values = _event_values(event)
        insert_into = pg_insert if self.postgres else sqlite_insert
        statement = (
            insert_into(processor_events)
            .values(values)
            .on_conflict_do_nothing()
            .returning(processor_events.c.event_id)
        )
        # RETURNING: through psycopg, this INSERT answers rowcount -1 whether or not it wrote.
        return self.connection.execute(statement).first() is not None

    def pending_events(
        self, processor: str, sale_id: str, payment_ref: str | None
    ) -> list[ProcessorEvent]:
        """On every fulfilment: the sale's lock and this read go in one round trip."""
        params = {
            "lock_key": _sale_lock_key(processor, payment_ref or sale_id),
            "processor": processor,
            "sale_id": sale_id,
            "payment_ref": payment_ref,
        }
        if self.postgres:
            rows = _PENDING_EVENTS_LOCKED.rows(self.connection, params, after=_LOCK_SALE)
        else:
            rows = _PENDING_EVENTS.rows(self.connection, params)
        return [_event(row) for row in rows]

    def dispute_event(
        self, processor: str, dispute_ref: str, kind: str = "dispute"
    ) -> ProcessorEvent | None:
        query = (
            select(processor_events)
            .where(
                processor_events.c.processor == processor,
                processor_events.c.dispute_ref == dispute_ref,
                processor_events.c.kind == kind,
                processor_events.c.status == "applied",
            )
            .order_by(processor_events.c.created_at.desc())
            .limit(1)
        )
        if self.postgres:
            query = query.with_for_update()
        row = self.connection.execute(query).first()
        return None if row is None else _event(row)

    def event_applied(self, event: ProcessorEvent) -> None:
        assert event.status == "applied"
        self.connection.execute(
            update(processor_events)
            .where(processor_events.c.event_id == event.id)
            .values(
                status=event.status,
                order_id=event.order_id,
                credits_taken=event.credits_taken,
                credits_restored=event.credits_restored,
                code_voided=event.code_voided,
                applied_at=event.applied_at,
                credits_from_lots=event.credits_from_lots,
                credits_owed=event.credits_owed,
                restored_lot_id=event.restored_lot_id,
                restored_at=event.restored_at,
            )
        )

    def restored_lots(self, order_id: str) -> list[str]:
        rows = self.connection.execute(
            select(processor_events.c.restored_lot_id)
            .where(
                processor_events.c.order_id == order_id,
                processor_events.c.restored_lot_id.is_not(None),
            )
            .order_by(processor_events.c.restored_at, processor_events.c.event_id)
        ).all()
        return [str(row[0]) for row in rows]


def _storable(value: Any) -> Any:
    """JSON as given, with every NUL (which PostgreSQL refuses in text and JSONB) as U+FFFD."""
    if isinstance(value, str):
        return value.replace("\x00", "\ufffd")
    if isinstance(value, dict):
        return {_storable(str(k)): _storable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_storable(v) for v in value]
    return value


def _storable_sale_id(sale_id: str | None) -> str | None:
    return None if sale_id is None else _storable(sale_id)[:128]


def _claim_holds(message_id: str, attempts: int) -> tuple[Any, ...]:
    return (
        outbox.c.message_id == message_id,
        outbox.c.status == "pending",
        outbox.c.attempts == attempts,
    )


def _sale_lock_key(processor: str, key: str) -> str:
    return f"sale:{processor}:{key}"


#: A transaction-scoped lock per sale, taken by fulfilment and by the events about the sale,
#: so neither misses the other (PostgreSQL; SQLite has one writer).
_LOCK_SALE = FastStatement(
    select(func.pg_advisory_xact_lock(func.hashtextextended(bindparam("lock_key"), 0)))
)
_PENDING_QUERY = (
    select(processor_events)
    .where(
        processor_events.c.processor == bindparam("processor"),
        processor_events.c.status == "pending",
        (processor_events.c.sale_id == bindparam("sale_id"))
        | (processor_events.c.payment_ref == bindparam("payment_ref")),
    )
    .order_by(processor_events.c.created_at, processor_events.c.event_id)
)
_PENDING_EVENTS = FastStatement(_PENDING_QUERY)
_PENDING_EVENTS_LOCKED = FastStatement(_PENDING_QUERY.with_for_update())


def _event_values(event: ProcessorEvent) -> dict[str, Any]:
    return {
        "event_id": event.id,
        "processor": event.processor,
        "event_key": event.event_key,
        "kind": event.kind,
        "sale_id": event.sale_id,
        "payment_ref": event.payment_ref,
        "dispute_ref": event.dispute_ref,
        "refunded_amount": event.refunded_amount,
        "charge_amount": event.charge_amount,
        "order_id": event.order_id,
        "status": event.status,
        "credits_taken": event.credits_taken,
        "credits_restored": event.credits_restored,
        "code_voided": event.code_voided,
        "credits_from_lots": event.credits_from_lots,
        "credits_owed": event.credits_owed,
        "restored_lot_id": event.restored_lot_id,
        "restored_at": event.restored_at,
        "payload": event.payload,
        "created_at": event.created_at,
        "applied_at": event.applied_at,
    }


def _event(row: Any) -> ProcessorEvent:
    return ProcessorEvent(
        id=row.event_id,
        processor=row.processor,
        event_key=row.event_key,
        kind=row.kind,
        sale_id=row.sale_id,
        payment_ref=row.payment_ref,
        payload=dict(decode_json(row.payload)),  # raw driver rows come from FastStatement
        created_at=decode_time(row.created_at),
        dispute_ref=row.dispute_ref,
        refunded_amount=row.refunded_amount,
        charge_amount=row.charge_amount,
        status=row.status,
        order_id=row.order_id,
        credits_taken=row.credits_taken,
        credits_restored=row.credits_restored,
        code_voided=bool(row.code_voided),
        applied_at=decode_time(row.applied_at),
        credits_from_lots=row.credits_from_lots,
        credits_owed=row.credits_owed,
        restored_lot_id=row.restored_lot_id,
        restored_at=decode_time(row.restored_at),
    )
