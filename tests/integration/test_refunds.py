"""Refunds and disputes on SQLite and PostgreSQL (docs/rules.md rules 8 and 9, §4): the refund
window, untouched credits only, one refund per order, nothing changed when the processor says no;
chargebacks that turn spent credits into debt repaid by the next purchase; processor events
applied once, before or after their sale; won disputes that give everything back."""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, select, text

from tally.adapters.db.engine import Database
from tally.adapters.db.migrate import upgrade
from tally.adapters.db.schema import codes as codes_table
from tally.adapters.db.schema import entries, outbox, processor_events
from tally.adapters.db.uow import SqlUnitOfWork
from tally.domain import values
from tally.domain.commerce import CodeStatus, Order, OrderStatus, Sale
from tally.domain.errors import (
    AlreadyRefunded,
    CodeInvalidOrUsed,
    CreditsUsed,
    IdempotencyKeyReused,
    InvalidInput,
    OrderNotFound,
    ProcessorFailed,
    RefundWindowPassed,
)
from tally.service import commerce, ledger, refunds
from tally.service.ports import ProcessorEvent, RefundFailed, RefundRequest
from tests.conftest import DATABASES
from tests.support import CATALOG, LINKS, PEPPER, FakeClock, database


class Gateway:
    """A processor that refunds, or refuses, and remembers what it was asked."""

    def __init__(self, fail: str | None = None) -> None:
        self.calls: list[RefundRequest] = []
        self.fail = fail
        self.during: Callable[[], None] | None = None  # runs while "the processor" works

    def refund(self, request: RefundRequest) -> str:
        self.calls.append(request)
        if self.during is not None:
            self.during()
        if self.fail is not None:
            raise RefundFailed(self.fail)
        return f"re_{len(self.calls)}"


def _sale(clock: FakeClock, sale_id: str = "sale-1", **changes: Any) -> Sale:
    sale = Sale(
        processor="gumroad",
        sale_id=sale_id,
        package=CATALOG.packages["pro"],
        email="ana@example.com",
        purchased_at=clock(),
        price=2000,
    )
    return replace(sale, **changes)


def _buy(uow: SqlUnitOfWork, clock: FakeClock, sale_id: str = "sale-1", **changes: Any) -> Order:
    return commerce.fulfil(_sale(clock, sale_id, **changes), uow, pepper=PEPPER, links=LINKS).order


def _plaintext(db: Database, order_id: str) -> str:
    """The newest code emailed for the order (the outbox holds it until sent)."""
    with db.engine.connect() as connection:
        rows = connection.execute(
            select(outbox.c.context)
            .where(outbox.c.order_id == order_id, outbox.c.template != "refund")
            .order_by(outbox.c.created_at.desc(), outbox.c.message_id.desc())
        ).all()
    assert rows, "no code was emailed"
    return str(rows[0][0]["code"])


def _redeem(db: Database, uow: SqlUnitOfWork, order: Order, account: str = "ana") -> None:
    commerce.redeem(
        commerce.Redeem(
            code=_plaintext(db, order.id), account_id=account, idempotency_key=f"r-{order.id}"
        ),
        uow,
        pepper=PEPPER,
    )


def _refund(
    uow: SqlUnitOfWork,
    order: Order,
    gateway: Gateway,
    *,
    key: str = "refund-1",
    reason: str = "asked by email",
    window_days: int = 30,
    platform_id: str | None = None,
) -> Order:
    return refunds.refund_order(
        refunds.RefundOrder(
            order_id=order.id, reason=reason, idempotency_key=key, platform_id=platform_id
        ),
        uow,
        gateway=gateway,
        window_days=window_days,
        links=LINKS,
        catalog=CATALOG,
    )


def _spend(uow: SqlUnitOfWork, amount: int, key: str, account: str = "ana") -> None:
    ledger.debit(ledger.DebitCredits(account_id=account, amount=amount, idempotency_key=key), uow)


def _event(
    clock: FakeClock, kind: str, sale_id: str | None = "sale-1", **changes: Any
) -> ProcessorEvent:
    fields: dict[str, Any] = {
        "processor": "gumroad",
        "event_key": f"{kind}:{sale_id}",
        "kind": kind,
        "sale_id": sale_id,
        "payment_ref": None,
        "payload": {"resource_name": kind, "sale_id": sale_id},
        "now": clock(),
        "dispute_ref": sale_id if kind.startswith("dispute") else None,
    }
    fields.update(changes)
    return refunds.new_event(**fields)


def _record(uow: SqlUnitOfWork, event: ProcessorEvent) -> str:
    return refunds.record_event(event, uow, pepper=PEPPER, links=LINKS, catalog=CATALOG)


def _order(uow: SqlUnitOfWork, order_id: str) -> Order:
    with uow.read_only():
        found = uow.commerce.order(order_id)
    assert found is not None
    return found


def _codes(uow: SqlUnitOfWork, order_id: str) -> list[CodeStatus]:
    with uow.read_only():
        return [code.status for code in uow.commerce.codes_of_order(order_id)]


def _count(db: Database, table: Any, *where: Any) -> int:
    with db.engine.connect() as connection:
        found: int = connection.execute(
            select(func.count()).select_from(table).where(*where)
        ).scalar_one()
    return found


def _audit_holds(uow: SqlUnitOfWork) -> None:
    report = ledger.check(uow)
    assert report.violations == []


def _balance(uow: SqlUnitOfWork, account: str = "ana") -> tuple[int, int]:
    balance = ledger.get_balance(account, uow)
    return balance.available, balance.debt


# --- support refunds (rule 9) ---------------------------------------------------------------------


@pytest.mark.parametrize(("days", "allowed"), [(0, True), (29, True), (30, True), (31, False)])
def test_the_refund_window_counts_days_from_the_purchase(
    db: Database, uow: SqlUnitOfWork, clock: FakeClock, days: int, allowed: bool
) -> None:
    order = _buy(uow, clock)
    clock.advance(days=days)
    gateway = Gateway()
    if not allowed:
        with pytest.raises(RefundWindowPassed) as refused:
            _refund(uow, order, gateway)
        assert refused.value.status == 409
        assert refused.value.extra["refundable_until"] == "2026-01-31T12:00:00Z"
        assert gateway.calls == []
        assert _order(uow, order.id).status is OrderStatus.FULFILLED
        return
    refunded = _refund(uow, order, gateway)
    assert refunded.status is OrderStatus.REFUNDED
    assert (refunded.refunded_amount, refunded.credits_taken) == (2000, 25)
    assert refunded.refund_reason == "asked by email"
    assert _order(uow, order.id) == refunded
    (call,) = gateway.calls
    assert (call.processor, call.sale_id, call.amount) == ("gumroad", "sale-1", 2000)
    assert _codes(uow, order.id) == [CodeStatus.VOID]
    with pytest.raises(CodeInvalidOrUsed):  # the unredeemed code no longer works
        _redeem(db, uow, order)
    with db.engine.connect() as connection:
        (mail,) = connection.execute(
            select(outbox.c.to_email, outbox.c.context).where(outbox.c.template == "refund")
        ).all()
    assert mail.to_email == "ana@example.com"
    assert mail.context["amount"] == "20.00 USD"
    assert mail.context["code_voided"] is True
    _audit_holds(uow)


def test_refunds_are_off_with_a_zero_window(uow: SqlUnitOfWork, clock: FakeClock) -> None:
    order = _buy(uow, clock)
    gateway = Gateway()
    with pytest.raises(RefundWindowPassed, match="turned off"):
        _refund(uow, order, gateway, window_days=0)
    assert gateway.calls == []


def test_a_redeemed_untouched_lot_is_voided_with_entries(
    db: Database, uow: SqlUnitOfWork, clock: FakeClock
) -> None:
    order = _buy(uow, clock)
    _redeem(db, uow, order)
    clock.advance(days=3)
    _refund(uow, order, Gateway(), reason="changed my mind", platform_id="staff_7")
    assert _balance(uow) == (0, 0)
    (lot,) = ledger.list_lots("ana", uow, limit=10)[0].items
    assert lot.voided_at == clock()
    assert lot.remaining == 0
    with db.engine.connect() as connection:
        voids = connection.execute(
            select(
                entries.c.type,
                entries.c.amount,
                entries.c.reason,
                entries.c.idempotency_key,
                entries.c.platform_id,
            ).where(entries.c.account_id == "ana", entries.c.type.in_(("clawback", "void")))
        ).all()
    assert [(v.type, v.amount) for v in voids] == [("void", 25)]
    assert voids[0].reason == f"refund of order {order.order_number}: changed my mind"
    assert voids[0].idempotency_key == "refund-1"
    assert voids[0].platform_id == "staff_7", "the console's staff member is in the journal"
    _audit_holds(uow)


def test_spent_or_held_credits_refuse_the_refund(
    db: Database, uow: SqlUnitOfWork, clock: FakeClock
) -> None:
    spent = _buy(uow, clock, "sale-spent")
    _redeem(db, uow, spent)
    _spend(uow, 1, "d1")
    gateway = Gateway()
    with pytest.raises(CreditsUsed) as refused:
        _refund(uow, spent, gateway)
    assert (refused.value.status, refused.value.code) == (409, "credits_used")

    held = _buy(uow, clock, "sale-held")
    _redeem(db, uow, held, account="ben")
    ledger.place_hold(ledger.PlaceHold(account_id="ben", amount=3, idempotency_key="h1"), uow)
    with pytest.raises(CreditsUsed):
        _refund(uow, held, gateway, key="refund-2")
    assert gateway.calls == [], "a refused refund never reaches the processor"
    assert _order(uow, spent.id).status is OrderStatus.FULFILLED
    assert _balance(uow, "ben") == (22, 0)


def test_a_gift_is_refunded_to_the_giver(
    db: Database, uow: SqlUnitOfWork, clock: FakeClock
) -> None:
    order = _buy(uow, clock, email="bo@example.com", gifter_email="ana@example.com", price=0)
    refunded = _refund(uow, order, Gateway())
    assert refunded.status is OrderStatus.REFUNDED
    assert _codes(uow, order.id) == [CodeStatus.VOID]
    with db.engine.connect() as connection:
        to = connection.execute(
            select(outbox.c.to_email).where(outbox.c.template == "refund")
        ).scalar_one()
    assert to == "ana@example.com"


def test_one_refund_per_order_and_replays_answer_the_first(
    db: Database, uow: SqlUnitOfWork, clock: FakeClock
) -> None:
    order = _buy(uow, clock)
    gateway = Gateway()
    first = _refund(uow, order, gateway)
    assert not uow.replayed
    again = _refund(uow, order, gateway)  # the same key: the stored answer
    assert uow.replayed
    assert again == first
    with pytest.raises(IdempotencyKeyReused):
        _refund(uow, order, gateway, reason="another reason")
    with pytest.raises(AlreadyRefunded) as refused:
        _refund(uow, order, gateway, key="refund-2")
    assert refused.value.code == "already_refunded"
    assert len(gateway.calls) == 1
    assert _count(db, outbox, outbox.c.template == "refund") == 1


def test_a_processor_failure_changes_nothing(
    db: Database, uow: SqlUnitOfWork, clock: FakeClock
) -> None:
    order = _buy(uow, clock)
    _redeem(db, uow, order)
    before = _count(db, entries)
    gateway = Gateway(fail="Gumroad refused the refund: sale already refunded")
    with pytest.raises(ProcessorFailed) as failed:
        _refund(uow, order, gateway)
    assert failed.value.status == 502
    assert "sale already refunded" in failed.value.detail
    assert "nothing changed" in failed.value.detail.lower()
    assert _order(uow, order.id) == order
    assert _count(db, entries) == before
    assert _balance(uow) == (25, 0)
    assert _count(db, outbox, outbox.c.template == "refund") == 0
    gateway.fail = None  # the same key again, once the processor works: refunded
    assert _refund(uow, order, gateway).status is OrderStatus.REFUNDED
    assert _balance(uow) == (0, 0)


def test_credits_spent_during_the_processor_call_become_debt(
    db: Database, uow: SqlUnitOfWork, clock: FakeClock
) -> None:
    order = _buy(uow, clock)
    _redeem(db, uow, order)
    gateway = Gateway()
    # Another request spends while the processor refunds: the money is gone, so rule 8.
    gateway.during = lambda: _spend(SqlUnitOfWork(db, clock), 4, "during")
    refunded = _refund(uow, order, gateway)
    assert (refunded.credits_taken, refunded.credits_owed) == (25, 4)
    assert _balance(uow) == (0, 4)
    _audit_holds(uow)


def test_bad_refund_requests(uow: SqlUnitOfWork, clock: FakeClock) -> None:
    order = _buy(uow, clock)
    gateway = Gateway()
    with pytest.raises(OrderNotFound):
        _refund(uow, replace(order, id="ord_missing"), gateway)
    with pytest.raises(InvalidInput):
        _refund(uow, order, gateway, reason="   ")
    with pytest.raises(InvalidInput):
        _refund(uow, order, gateway, reason="x" * 501)
    with pytest.raises(InvalidInput):
        _refund(uow, order, gateway, key="")
    assert gateway.calls == []


# --- chargebacks, debt and the next purchase (rule 8) ---------------------------------------------


def test_a_chargeback_after_spending_leaves_debt_the_next_purchase_repays(
    db: Database, uow: SqlUnitOfWork, clock: FakeClock
) -> None:
    """Buys Pro (25), spends 7, disputes: 18 voided, 7 owed; buys Popular (10): 3 left."""
    pro = _buy(uow, clock)
    _redeem(db, uow, pro)
    _spend(uow, 7, "d1")
    _audit_holds(uow)
    clock.advance(days=40)  # chargebacks come long after the refund window
    assert _record(uow, _event(clock, "dispute")) == "applied"
    disputed = _order(uow, pro.id)
    assert disputed.status is OrderStatus.DISPUTED
    assert disputed.disputed_at == clock()
    assert (disputed.credits_taken, disputed.credits_owed) == (25, 7)
    assert _balance(uow) == (0, 7)
    with db.engine.connect() as connection:
        taken = connection.execute(
            select(entries.c.type, entries.c.amount, entries.c.lot_id, entries.c.idempotency_key)
            .where(entries.c.type.in_(("void", "clawback")))
            .order_by(entries.c.seq)
        ).all()
    assert [(e.type, e.amount, e.lot_id is None) for e in taken] == [
        ("void", 18, False),
        ("clawback", 7, True),  # no lot: the account owes it
    ]
    assert {e.idempotency_key for e in taken} == {"gumroad:dispute:sale-1"}
    _audit_holds(uow)

    popular = _buy(uow, clock, "sale-2", package=CATALOG.packages["popular"], price=1000)
    _redeem(db, uow, popular)
    assert _balance(uow) == (3, 0)
    _audit_holds(uow)
    with pytest.raises(AlreadyRefunded):  # disputed: support cannot refund it again
        _refund(uow, pro, Gateway())


def test_a_chargeback_counts_held_credits_as_spent(
    db: Database, uow: SqlUnitOfWork, clock: FakeClock
) -> None:
    order = _buy(uow, clock)
    _redeem(db, uow, order)
    hold = ledger.place_hold(ledger.PlaceHold(account_id="ana", amount=5, idempotency_key="h"), uow)
    _record(uow, _event(clock, "refund"))
    assert _balance(uow) == (0, 5)
    ledger.release(ledger.ReleaseHold(hold_id=hold.id, idempotency_key="rel"), uow)
    assert _balance(uow) == (0, 5), "released credits of a refunded lot are voided"
    _audit_holds(uow)


def test_each_event_applies_once_however_often_it_arrives(
    db: Database, uow: SqlUnitOfWork, clock: FakeClock
) -> None:
    order = _buy(uow, clock)
    _redeem(db, uow, order)
    _spend(uow, 2, "d1")
    assert _record(uow, _event(clock, "refund")) == "applied"
    written = _count(db, entries)
    for _ in range(3):
        assert _record(uow, _event(clock, "refund")) == "duplicate"
    assert _count(db, entries) == written
    assert _count(db, processor_events) == 1
    assert _count(db, outbox, outbox.c.template == "refund") == 1
    refunded = _order(uow, order.id)
    assert refunded.status is OrderStatus.REFUNDED
    assert _balance(uow) == (0, 2)
    # A dispute of a refunded order takes nothing more.
    assert _record(uow, _event(clock, "dispute")) == "applied"
    assert _balance(uow) == (0, 2)
    assert _order(uow, order.id).status is OrderStatus.REFUNDED
    _audit_holds(uow)


def test_an_event_before_its_sale_is_applied_when_the_sale_arrives(
    db: Database, uow: SqlUnitOfWork, clock: FakeClock
) -> None:
    assert _record(uow, _event(clock, "refund")) == "pending"
    assert _record(uow, _event(clock, "refund")) == "duplicate"
    order = _buy(uow, clock)
    assert order.status is OrderStatus.REFUNDED
    assert order.credits_taken == 25
    assert _codes(uow, order.id) == [], "a refunded sale's code is never made nor emailed"
    assert _count(db, outbox, outbox.c.template != "refund") == 0
    assert _count(db, outbox, outbox.c.template == "refund") == 1
    with db.engine.connect() as connection:
        status, order_id = connection.execute(
            select(processor_events.c.status, processor_events.c.order_id)
        ).one()
    assert (status, order_id) == ("applied", order.id)
    again = commerce.fulfil(_sale(clock), uow, pepper=PEPPER, links=LINKS)
    assert not again.created
    assert again.order.status is OrderStatus.REFUNDED


def test_stripe_partial_refunds_take_credits_in_proportion(
    db: Database, uow: SqlUnitOfWork, clock: FakeClock
) -> None:
    """25 credits for 20.00: 10.00 back takes ceil(12.5) = 13 credits; the rest on the full
    refund; a late event with an older running total changes nothing."""

    def charge_refunded(event_id: str, refunded: int) -> ProcessorEvent:
        return refunds.new_event(
            processor="stripe",
            event_key=event_id,
            kind="refund",
            sale_id=None,
            payment_ref="pi_1",
            payload={"id": event_id},
            now=clock(),
            refunded_amount=refunded,
            charge_amount=2000,
        )

    assert _record(uow, charge_refunded("evt_1", 1000)) == "pending"  # before the sale
    order = _buy(uow, clock, "cs_1", processor="stripe", payment_ref="pi_1")
    assert order.status is OrderStatus.FULFILLED
    assert (order.credits_taken, order.credits_left, order.refunded_amount) == (13, 12, 1000)
    with db.engine.connect() as connection:
        context = connection.execute(
            select(outbox.c.context).where(
                outbox.c.order_id == order.id, outbox.c.template == "purchase_code"
            )
        ).scalar_one()
    assert context["credits"] == 12, "the code's email says what it grants"
    _redeem(db, uow, order)
    assert _balance(uow) == (12, 0)
    _spend(uow, 2, "d1")
    assert _record(uow, charge_refunded("evt_2", 2000)) == "applied"
    refunded = _order(uow, order.id)
    assert refunded.status is OrderStatus.REFUNDED
    assert (refunded.credits_taken, refunded.credits_owed) == (25, 2)
    assert _balance(uow) == (0, 2)
    assert _record(uow, charge_refunded("evt_0", 500)) == "applied"  # out of order
    assert _order(uow, order.id) == refunded
    _audit_holds(uow)


def test_a_won_dispute_restores_spent_and_unspent_credits(
    db: Database, uow: SqlUnitOfWork, clock: FakeClock
) -> None:
    order = _buy(uow, clock)
    _redeem(db, uow, order)
    _spend(uow, 7, "d1")
    _record(uow, _event(clock, "dispute"))
    assert _balance(uow) == (0, 7)
    clock.advance(days=20)
    assert _record(uow, _event(clock, "dispute_won")) == "applied"
    won = _order(uow, order.id)
    assert won.status is OrderStatus.FULFILLED
    assert (won.credits_taken, won.credits_owed) == (0, 0)
    assert _balance(uow) == (18, 0), "the debt repaid first, the rest back with its expiry"
    (lot,) = [lot for lot in ledger.list_lots("ana", uow, limit=10)[0].items if lot.remaining]
    assert lot.expires_at == order.expires_at
    assert _record(uow, _event(clock, "dispute_won")) == "duplicate"
    _audit_holds(uow)


def test_a_won_dispute_emails_a_new_code_for_a_voided_one(
    db: Database, uow: SqlUnitOfWork, clock: FakeClock
) -> None:
    order = _buy(uow, clock)
    old = _plaintext(db, order.id)
    _record(uow, _event(clock, "dispute"))
    assert _codes(uow, order.id) == [CodeStatus.VOID]
    clock.advance(days=20)
    _record(uow, _event(clock, "dispute_won"))
    assert _codes(uow, order.id) == [CodeStatus.VOID, CodeStatus.ISSUED]
    new = _plaintext(db, order.id)
    assert new != old
    _redeem(db, uow, order)
    assert _balance(uow) == (25, 0)


def test_a_lost_dispute_keeps_what_was_taken(
    db: Database, uow: SqlUnitOfWork, clock: FakeClock
) -> None:
    order = _buy(uow, clock, processor="stripe", payment_ref="pi_9", sale_id="cs_9")

    def dispute(event_id: str, kind: str) -> ProcessorEvent:
        return refunds.new_event(
            processor="stripe",
            event_key=event_id,
            kind=kind,
            sale_id=None,
            payment_ref="pi_9",
            payload={"id": event_id},
            now=clock(),
            dispute_ref="dp_9",
        )

    _record(uow, dispute("evt_a", "dispute"))
    _record(uow, dispute("evt_b", "dispute_lost"))
    lost = _order(uow, order.id)
    assert lost.status is OrderStatus.DISPUTED
    assert lost.credits_taken == 25
    assert _codes(uow, order.id) == [CodeStatus.VOID]


def _stripe_event(clock: FakeClock, event_id: str, kind: str, **changes: Any) -> ProcessorEvent:
    fields: dict[str, Any] = {
        "processor": "stripe",
        "event_key": event_id,
        "kind": kind,
        "sale_id": None,
        "payment_ref": "pi_7",
        "payload": {"id": event_id},
        "now": clock(),
    }
    fields.update(changes)
    return refunds.new_event(**fields)


def _lot_of(db: Database, order: Order) -> str:
    with db.engine.connect() as connection:
        lot_id = connection.execute(
            select(codes_table.c.lot_id).where(
                codes_table.c.order_id == order.id, codes_table.c.lot_id.is_not(None)
            )
        ).scalar_one()
    return str(lot_id)


@pytest.mark.parametrize("then", ["refund", "dispute"])
def test_a_reversal_after_a_won_dispute_takes_back_the_restored_credits(
    db: Database, uow: SqlUnitOfWork, clock: FakeClock, then: str
) -> None:
    """Buys 25, spends 5, dispute, won (20 back, the debt forgiven), then a refund or a second
    dispute: the restored lot is taken, the 5 spent are owed again."""
    order = _buy(uow, clock, "cs_7", processor="stripe", payment_ref="pi_7")
    _redeem(db, uow, order)
    _spend(uow, 5, "d1")
    _record(uow, _stripe_event(clock, "evt_1", "dispute", dispute_ref="dp_1"))
    assert _balance(uow) == (0, 5)
    clock.advance(days=10)
    _record(uow, _stripe_event(clock, "evt_2", "dispute_won", dispute_ref="dp_1"))
    assert _balance(uow) == (20, 0)
    assert _order(uow, order.id).status is OrderStatus.FULFILLED
    clock.advance(days=1)
    if then == "refund":
        event = _stripe_event(clock, "evt_3", "refund", refunded_amount=2000, charge_amount=2000)
    else:
        event = _stripe_event(clock, "evt_3", "dispute", dispute_ref="dp_2")
    assert _record(uow, event) == "applied"
    assert _balance(uow) == (0, 5)
    after = _order(uow, order.id)
    assert (after.credits_taken, after.credits_owed) == (25, 5)
    _audit_holds(uow)
    # A win of the second dispute restores it again, exactly.
    if then == "dispute":
        _record(uow, _stripe_event(clock, "evt_4", "dispute_won", dispute_ref="dp_2"))
        assert _balance(uow) == (20, 0)
        _audit_holds(uow)


def test_a_dispute_before_its_sale_won_after_it_emails_the_first_code(
    db: Database, uow: SqlUnitOfWork, clock: FakeClock
) -> None:
    assert _record(uow, _event(clock, "dispute")) == "pending"
    order = _buy(uow, clock)
    assert order.status is OrderStatus.DISPUTED
    assert _codes(uow, order.id) == []
    clock.advance(days=5)
    assert _record(uow, _event(clock, "dispute_won")) == "applied"
    won = _order(uow, order.id)
    assert won.status is OrderStatus.FULFILLED
    assert won.credits_left == 25
    assert _codes(uow, order.id) == [CodeStatus.ISSUED]
    assert _count(db, outbox, outbox.c.template == "purchase_code") == 1
    _redeem(db, uow, order)
    assert _balance(uow) == (25, 0)
    _audit_holds(uow)


def test_a_dispute_and_its_win_before_the_sale_make_one_code(
    db: Database, uow: SqlUnitOfWork, clock: FakeClock
) -> None:
    assert _record(uow, _event(clock, "dispute")) == "pending"
    clock.advance(seconds=1)
    assert _record(uow, _event(clock, "dispute_won")) == "pending"
    clock.advance(seconds=1)
    order = _buy(uow, clock)
    assert order.status is OrderStatus.FULFILLED
    assert _codes(uow, order.id) == [CodeStatus.ISSUED]
    assert _count(db, outbox) == 1
    _redeem(db, uow, order)
    assert _balance(uow) == (25, 0)


def test_a_won_dispute_does_not_restore_credits_support_voided_before_it(
    db: Database, uow: SqlUnitOfWork, clock: FakeClock
) -> None:
    order = _buy(uow, clock)
    _redeem(db, uow, order)
    _spend(uow, 5, "d1")
    ledger.void_lot(
        ledger.VoidLot(lot_id=_lot_of(db, order), reason="fraud check", idempotency_key="v"), uow
    )
    assert _balance(uow) == (0, 0)
    _record(uow, _event(clock, "dispute"))
    assert _balance(uow) == (0, 5)
    clock.advance(days=3)
    _record(uow, _event(clock, "dispute_won"))
    assert _balance(uow) == (0, 0), "the dispute's debt forgiven; the voided 20 stay void"
    won = _order(uow, order.id)
    assert (won.credits_taken, won.credits_owed) == (0, 0)
    _audit_holds(uow)


def test_a_won_dispute_forgives_only_its_own_debt(
    db: Database, uow: SqlUnitOfWork, clock: FakeClock
) -> None:
    """Pro (25): 5 spent, 20 expire. Popular (10): all spent, disputed: 10 owed. Pro
    disputed: 5 more owed. Pro's win forgives its 5, not Popular's 10, and gives back none
    of the 20 that expired before the dispute."""
    pro = _buy(uow, clock)
    _redeem(db, uow, pro)
    _spend(uow, 5, "d1")
    clock.advance(days=2 * 366)
    popular = _buy(uow, clock, "sale-2", package=CATALOG.packages["popular"], price=1000)
    _redeem(db, uow, popular)
    _spend(uow, 10, "d2")
    _record(uow, _event(clock, "dispute", sale_id="sale-2"))
    assert _balance(uow) == (0, 10)
    _record(uow, _event(clock, "dispute"))
    assert _balance(uow) == (0, 15)
    _record(uow, _event(clock, "dispute_won"))
    assert _balance(uow) == (0, 10)
    with db.engine.connect() as connection:
        taken, from_lots, owed, restored = connection.execute(
            select(
                processor_events.c.credits_taken,
                processor_events.c.credits_from_lots,
                processor_events.c.credits_owed,
                processor_events.c.credits_restored,
            ).where(processor_events.c.event_key == "dispute:sale-1")
        ).one()
    assert (taken, from_lots, owed, restored) == (25, 0, 5, 5)
    _audit_holds(uow)


def test_a_won_dispute_gives_back_debt_repaid_since_as_credits(
    db: Database, uow: SqlUnitOfWork, clock: FakeClock
) -> None:
    """Pro (25): 5 spent, disputed (5 owed); Popular (10) repays the 5; the win gives back
    the 20 and the 5 repaid: 30 in all, as if the dispute never happened."""
    pro = _buy(uow, clock)
    _redeem(db, uow, pro)
    _spend(uow, 5, "d1")
    _record(uow, _event(clock, "dispute"))
    popular = _buy(uow, clock, "sale-2", package=CATALOG.packages["popular"], price=1000)
    _redeem(db, uow, popular)
    assert _balance(uow) == (5, 0)
    _record(uow, _event(clock, "dispute_won"))
    assert _balance(uow) == (30, 0)
    _audit_holds(uow)


@pytest.mark.parametrize("sale_first", [True, False])
def test_a_win_reported_before_its_dispute_leaves_the_order_whole(
    db: Database, uow: SqlUnitOfWork, clock: FakeClock, sale_first: bool
) -> None:
    if sale_first:
        order = _buy(uow, clock)
        _redeem(db, uow, order)
        _spend(uow, 5, "d1")
    assert _record(uow, _event(clock, "dispute_won")) == ("applied" if sale_first else "pending")
    clock.advance(seconds=1)
    assert _record(uow, _event(clock, "dispute")) == ("applied" if sale_first else "pending")
    if not sale_first:
        clock.advance(seconds=1)
        order = _buy(uow, clock)
        assert _codes(uow, order.id) == [CodeStatus.ISSUED]
        _redeem(db, uow, order)
        _spend(uow, 5, "d1")
    whole = _order(uow, order.id)
    assert whole.status is OrderStatus.FULFILLED
    assert (whole.credits_taken, whole.credits_owed) == (0, 0)
    assert _balance(uow) == (20, 0)
    assert _count(db, entries, entries.c.type.in_(("void", "clawback"))) == 0
    _audit_holds(uow)


def test_events_refuse_what_names_nothing(clock: FakeClock) -> None:
    with pytest.raises(InvalidInput):
        _event(clock, "chargeback")
    with pytest.raises(InvalidInput):
        _event(clock, "refund", sale_id=None)
    with pytest.raises(InvalidInput):
        _event(clock, "refund", event_key="")
    with pytest.raises(InvalidInput):
        _event(clock, "refund", refunded_amount=-1)
    with pytest.raises(InvalidInput):
        _event(clock, "refund", sale_id="s\x00")
    with pytest.raises(InvalidInput):
        _event(clock, "refund", payload={"email": "a\x00b"})
    with pytest.raises(InvalidInput):
        _event(clock, "refund", sale_id="s" * 129)


def test_the_database_refuses_impossible_orders_and_events(
    db: Database, uow: SqlUnitOfWork, clock: FakeClock
) -> None:
    order = _buy(uow, clock)
    for sql in (
        "UPDATE orders SET credits_taken = credits + 1",
        "UPDATE orders SET credits_owed = 1",  # more owed than taken
        "UPDATE orders SET status = 'refunded'",  # without refunded_at
        "UPDATE orders SET refunded_amount = -1",
    ):
        with pytest.raises(Exception, match=r"(?i)check"), db.engine.begin() as connection:
            connection.execute(text(sql))
    _record(uow, _event(clock, "refund", sale_id="unknown"))
    with pytest.raises(Exception, match=r"(?i)check"), db.engine.begin() as connection:
        connection.execute(text("UPDATE processor_events SET status = 'applied'"))
    assert _order(uow, order.id).status is OrderStatus.FULFILLED


# --- the migration -------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", DATABASES)
def test_the_migration_keeps_existing_orders_and_codes(kind: str, tmp_path: Path) -> None:
    clock = FakeClock()
    order_id = values.new_id("ord", clock())
    with database(kind, str(tmp_path), create=False) as db:
        upgrade(db, "0003")
        with db.engine.begin() as connection:
            connection.execute(
                text(
                    "INSERT INTO orders (order_id, processor, sale_id, order_number, package_id, "
                    "quantity, credits, price, currency, validity, email, is_test, status, "
                    "purchased_at, created_at) VALUES (:id, 'gumroad', 's1', 's1', 'pro', 1, "
                    "25, 2000, 'USD', 'P2Y', 'a@example.com', false, 'fulfilled', "
                    "CURRENT_TIMESTAMP, CURRENT_TIMESTAMP)"
                ),
                {"id": order_id},
            )
            connection.execute(
                text(
                    "INSERT INTO codes (code_id, order_id, digest, last4, status, created_at) "
                    "VALUES ('code_1', :id, 'v1:x', 'ABCD', 'issued', CURRENT_TIMESTAMP)"
                ),
                {"id": order_id},
            )
        upgrade(db)
        uow = SqlUnitOfWork(db, clock)
        order = _order(uow, order_id)
        assert (order.credits_taken, order.refunded_amount, order.payment_ref) == (0, 0, None)
        assert _count(db, codes_table) == 1
        for sql in (  # the checks hold on migrated tables too
            "UPDATE orders SET credits_taken = credits + 1",
            "UPDATE orders SET status = 'disputed'",
        ):
            with pytest.raises(Exception, match=r"(?i)check"), db.engine.begin() as connection:
                connection.execute(text(sql))
        clock.set(order.purchased_at + timedelta(days=1))
        assert _refund(uow, order, Gateway()).status is OrderStatus.REFUNDED


def test_an_event_racing_its_sale_is_never_lost(
    db: Database, uow: SqlUnitOfWork, clock: FakeClock
) -> None:
    """The sale and its refund arrive at the same moment: whichever commits first, the order
    ends refunded and no code stays valid (the sale's lock serialises the two)."""
    sales = [f"race-{n}" for n in range(12)]

    def sell(sale_id: str) -> None:
        commerce.fulfil(_sale(clock, sale_id), SqlUnitOfWork(db, clock), pepper=PEPPER, links=LINKS)

    def refund(sale_id: str) -> None:
        _record(SqlUnitOfWork(db, clock), _event(clock, "refund", sale_id))

    with ThreadPoolExecutor(max_workers=4) as pool:
        futures = [pool.submit(job, sale) for sale in sales for job in (sell, refund)]
        for future in futures:
            future.result()
    for sale in sales:
        with uow.read_only():
            order = uow.commerce.order_by_sale("gumroad", sale)
        assert order is not None
        assert order.status is OrderStatus.REFUNDED, sale
        assert CodeStatus.ISSUED not in _codes(uow, order.id)
    assert _count(db, processor_events, processor_events.c.status == "pending") == 0
