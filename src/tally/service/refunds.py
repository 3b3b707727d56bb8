"""Refunds and disputes (docs/rules.md rules 8 and 9, §4): support refunds through the processor,
and the processors' own refunds and disputes reported by webhook.

Taking an order back (rule 8) works on what the order became:
- its code unredeemed: a full reversal voids the code; a partial refund lowers what the code
  is worth (`Order.credits_left`), so redeeming it later grants the rest;
- its code redeemed: the lot's remaining credits are clawed back and, for a full reversal, the
  lot is voided; what the buyer already spent from the lot (captured, debited, repaid debt, or
  held by a job still running: the money is gone either way) becomes debt on the account,
  repaid first from the next credits it receives. Credits that expired unused are not debt.
Every change writes journal entries with the idempotency key of what caused it (the support
call, or `<processor>:<event key>`) and the platform of the support caller.

A partial refund (Stripe's `amount_refunded` is a running total) takes back
`ceil(credits * refunded / paid)` credits in all: the buyer's disfavour, by less than one
credit, only because credits are whole (rule 1).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from typing import Final

from tally.domain import values
from tally.domain.catalog import Catalog
from tally.domain.commerce import CodeStatus, Message, Order, OrderStatus
from tally.domain.errors import (
    AlreadyRefunded,
    CreditsUsed,
    IdempotencyKeyReused,
    InvalidInput,
    OrderNotFound,
    ProcessorFailed,
    RefundWindowPassed,
)
from tally.domain.model import REASON_MAX_LENGTH, Account, HoldStatus, Origin, check_reason
from tally.service import issuing, staff
from tally.service.changes import LOCAL_SCOPE, Command, adapter, fingerprint
from tally.service.ports import (
    IdempotencyRace,
    ProcessorEvent,
    RefundFailed,
    RefundGateway,
    RefundRequest,
    StoredResult,
    UnitOfWork,
)

EVENT_KINDS: Final = ("refund", "dispute", "dispute_won", "dispute_lost")
EVENT_KEY_MAX_LENGTH: Final = 200
#: Currencies without minor units, for the amount shown in the refund email.
_ZERO_DECIMAL: Final = frozenset({"BIF", "CLP", "JPY", "KRW", "PYG", "VND", "XAF", "XOF"})


@dataclass(frozen=True, kw_only=True)
class RefundOrder(Command):
    order_id: str
    reason: str


@dataclass(frozen=True)
class Taken:
    """What one reversal took back from an order."""

    credits: int = 0
    owed: int = 0  # of which spent already: now debt
    code_voided: bool = False
    from_lots: int = 0  # of which taken out of the order's lots


# --- support refunds (rule 9) --------------------------------------------------------------------


def refund_order(
    cmd: RefundOrder,
    uow: UnitOfWork,
    *,
    gateway: RefundGateway,
    window_days: int,
    links: issuing.Links,
    catalog: Catalog | None = None,
) -> Order:
    """Refund an order in full through its processor, when rule 9 allows it.

    Two transactions around the processor's call, so no database lock waits on the network:
    the first checks rule 9, the second re-checks under the order's lock and takes the
    credits back. Credits spent in between are gone with the money: they become debt (rule 8).
    A processor failure raises `ProcessorFailed` with nothing changed in Tally.
    """
    key = values.idempotency_key(cmd.idempotency_key)
    reason = _reason(cmd.reason)
    scope = cmd.platform_id or LOCAL_SCOPE
    request_hash = fingerprint(cmd)
    with uow.read_only():
        now = uow.clock()
        stored = uow.idempotency.get(scope, key)
        if stored is not None:
            return _replay(uow, stored, request_hash)
        # Never send the database junk (PostgreSQL refuses NUL characters outright).
        order = uow.commerce.order(cmd.order_id) if values.is_id(cmd.order_id, "ord") else None
        if order is None:
            raise OrderNotFound(f"no order {cmd.order_id[:64]!r}", order_id=cmd.order_id[:64])
        check_refundable(order, uow, now=now, window_days=window_days)
    request = RefundRequest(
        processor=order.processor,
        sale_id=order.sale_id,
        payment_ref=order.payment_ref,
        amount=order.price,
        currency=order.currency,
        # Per order, not per call: two support calls for one order refund once at Stripe.
        idempotency_key=f"tally-refund-{order.id}",
    )
    try:
        gateway.refund(request)
    except RefundFailed as error:
        raise ProcessorFailed(
            f"{error}. Nothing was refunded and nothing changed in Tally.", order_id=order.id
        ) from error
    try:
        with uow:
            now = uow.clock()
            locked = uow.commerce.lock_order(order.id)
            assert locked is not None, "orders are never deleted"
            if locked.status is not OrderStatus.REFUNDED:  # else a webhook applied it meanwhile
                origin = Origin(
                    key, cmd.platform_id, _cut(f"refund of order {locked.order_number}: {reason}")
                )
                locked, taken = take_back(locked, locked.credits, uow, now=now, origin=origin)
                locked = replace(
                    locked,
                    status=OrderStatus.REFUNDED,
                    refunded_amount=max(locked.refunded_amount, locked.price),
                    refunded_at=now,
                    refund_reason=reason,
                )
                uow.commerce.save_reversal(locked)
                _refund_email(
                    locked, taken, uow, links=links, catalog=catalog, now=now, cause=locked.id
                )
            # The console's staff member who asked: the record even when no entry is written.
            staff.record_action(
                uow,
                platform_id=cmd.platform_id,
                action="refund",
                subject=order.id,
                reason=reason,
                idempotency_key=key,
                now=now,
            )
            uow.idempotency.add(
                scope,
                key,
                request_hash=request_hash,
                response=adapter(Order).dump_python(locked, mode="json"),
                account_id=None,
                now=now,
            )
            uow.commit()
    except IdempotencyRace:
        with uow.read_only():
            stored = uow.idempotency.get(scope, key)
        assert stored is not None
        return _replay(uow, stored, request_hash)
    uow.replayed = False
    return locked


def check_refundable(order: Order, uow: UnitOfWork, *, now: datetime, window_days: int) -> None:
    """Rule 9: within the window, and the credits untouched: the code unredeemed, or redeemed
    into a lot that still has all its credits and no hold on them."""
    if (
        order.status is not OrderStatus.FULFILLED
        or order.refunded_amount > 0
        or order.credits_taken > 0
    ):
        raise AlreadyRefunded(
            f"order {order.order_number} was {order.status.value} already", order_id=order.id
        )
    if window_days <= 0:
        raise RefundWindowPassed("refunds are turned off (refund_window_days = 0)")
    until = order.purchased_at + timedelta(days=window_days)
    if now > until:
        raise RefundWindowPassed(
            f"refunds are possible for {window_days} days after purchase",
            refundable_until=values.format_time(until),
        )
    for code in uow.commerce.codes_of_order(order.id):
        if code.status is not CodeStatus.REDEEMED:
            continue
        assert code.account_id is not None
        assert code.lot_id is not None
        account = uow.accounts.get(code.account_id)
        lot = None if account is None else account.lots.get(code.lot_id)
        # An untouched lot is open (remaining = amount > 0), so it is among the loaded lots.
        if account is None or lot is None or lot.remaining != lot.amount or not lot.is_live(now):
            raise CreditsUsed(
                "some of the order's credits were spent, held or voided", lot_id=code.lot_id
            )
        if _held(account, lot.id, now):  # implied by remaining == amount; checked for clarity
            raise CreditsUsed("some of the order's credits are held for a job", lot_id=lot.id)


# --- taking credits back and giving them back (rule 8) ----------------------------------------


def take_back(
    order: Order, target: int, uow: UnitOfWork, *, now: datetime, origin: Origin
) -> tuple[Order, Taken]:
    """Bring the credits taken back from the order up to `target` (all of them: a full
    reversal). Call with the order locked; answers the order to save.

    The order's credits live in the lot its code was redeemed into and in the lots won
    disputes granted back (`restored_lots`): what those still have is taken, oldest lot
    first, and only what the order's lots spent beyond what the order owes already becomes
    debt."""
    target = min(target, order.credits)
    delta = target - order.credits_taken
    if delta <= 0:
        return order, Taken()
    full = target == order.credits
    codes = uow.commerce.codes_of_order_for_update(order.id)  # no redemption meanwhile
    redeemed = next((c for c in codes if c.status is CodeStatus.REDEEMED), None)
    owed = 0
    from_lots = 0
    code_voided = False
    if redeemed is None:
        if full:  # else the code's value shrinks: see Order.credits_left
            for code in codes:
                if code.status is CodeStatus.ISSUED:
                    code_voided |= uow.commerce.void_issued_code(code.id, now)
    else:
        assert redeemed.account_id is not None
        assert redeemed.lot_id is not None
        lot_ids = [redeemed.lot_id, *uow.commerce.restored_lots(order.id)]
        account = uow.accounts.get_for_update(redeemed.account_id, lot_ids=lot_ids)
        assert account is not None, "a redeemed code names its account"
        account.settle(now)
        lots = [account.lots[lot_id] for lot_id in lot_ids]
        for lot in lots:
            take = min(delta - from_lots, lot.remaining) if lot.is_live(now) else 0
            if full and lot.voided_at is None:
                # `void` entries for what remains; held credits given back later are voided too.
                account.void_lot(lot.id, now, origin)
            elif take:
                account.clawback(amount=take, now=now, origin=origin, lot_id=lot.id)
            from_lots += take
        rest = delta - from_lots
        if rest:
            spent = sum(
                uow.commerce.lot_consumed(account.account_id, lot.id) + _held(account, lot.id, now)
                for lot in lots
            )
            owed = min(rest, max(0, spent - order.credits_owed))
            if owed:  # the lots have nothing left to take: all of it becomes debt
                account.clawback(amount=owed, now=now, origin=origin, lot_id=lots[0].id)
        uow.accounts.save(account)
    order = replace(order, credits_taken=target, credits_owed=order.credits_owed + owed)
    return order, Taken(delta, owed, code_voided, from_lots)


def _give_back(
    order: Order,
    dispute: ProcessorEvent,
    uow: UnitOfWork,
    *,
    now: datetime,
    origin: Origin,
    pepper: bytes,
    links: issuing.Links,
    package_name: str,
    fulfilling: bool,
) -> tuple[Order, ProcessorEvent, int]:
    """A won dispute restores exactly what the dispute took, once: the debt it created is
    forgiven as far as the account still owes it; what it took from the lots, and its debt
    repaid since, is granted back with the order's own expiry (the grant repays any other debt
    first, rule 8). Credits that had expired or been voided before the dispute stay gone. When
    the order has no code left to redeem (the dispute voided it, or came before the sale),
    a new one is emailed. Answers the order, the dispute marked restored, and the credits
    restored."""
    if dispute.restored_at is not None:
        return order, dispute, 0
    taken = min(dispute.credits_taken, order.credits_taken)
    owed = min(dispute.credits_owed, order.credits_owed)
    order = replace(
        order, credits_taken=order.credits_taken - taken, credits_owed=order.credits_owed - owed
    )
    restored = 0
    lot_id = None
    codes = uow.commerce.codes_of_order_for_update(order.id)
    redeemed = next((c for c in codes if c.status is CodeStatus.REDEEMED), None)
    if redeemed is not None:
        if dispute.credits_from_lots or owed:
            assert redeemed.account_id is not None
            account = uow.accounts.get_for_update(redeemed.account_id)
            assert account is not None
            account.settle(now)
            forgiven = min(owed, account.debt)
            if forgiven:
                account.adjust(delta=forgiven, now=now, origin=origin)
            grant = dispute.credits_from_lots + owed - forgiven
            if grant and (order.expires_at is None or order.expires_at > now):
                lot = account.grant(
                    amount=grant,
                    source=order.source,
                    expires_at=order.expires_at,
                    priority=0,
                    now=now,
                    origin=origin,
                    metadata={"order_id": order.id, "restores": dispute.id},
                )
                lot_id = lot.id
                restored += grant
            restored += forgiven
            uow.accounts.save(account)
    else:
        restored = taken  # the code's value: Order.credits_left
    if (
        redeemed is None
        and not fulfilling  # fulfilment issues the first code itself
        and order.status is not OrderStatus.REFUNDED
        and order.credits_left > 0
        and not any(c.status is CodeStatus.ISSUED for c in codes)
    ):
        # The dispute voided the unredeemed code, or came before the sale so none was made.
        first = not codes
        issuing.issue_code(
            order,
            ("gift_code" if order.gifter_email else "purchase_code")
            if first
            else "replacement_code",
            package_name,
            uow,
            pepper=pepper,
            links=links,
            now=now,
            note=None if first else {"replaces": "dispute won"},
        )
    dispute = replace(dispute, credits_restored=restored, restored_lot_id=lot_id, restored_at=now)
    return order, dispute, restored


def _held(account: Account, lot_id: str, now: datetime) -> int:
    return sum(
        allocation.amount
        for hold in account.holds.values()
        if hold.status is HoldStatus.PENDING and not hold.is_lapsed(now)
        for allocation in hold.allocations
        if allocation.lot_id == lot_id
    )


# --- processor-side refunds and disputes (§4) --------------------------------------------------


def new_event(
    *,
    processor: str,
    event_key: str,
    kind: str,
    sale_id: str | None,
    payment_ref: str | None,
    payload: dict[str, object],
    now: datetime,
    dispute_ref: str | None = None,
    refunded_amount: int | None = None,
    charge_amount: int | None = None,
) -> ProcessorEvent:
    """A processor's report, checked: what the webhook hands to `record_event`."""
    if kind not in EVENT_KINDS:
        raise InvalidInput(f"an event is one of {', '.join(EVENT_KINDS)}")
    if not event_key or len(event_key) > EVENT_KEY_MAX_LENGTH:
        raise InvalidInput(f"an event key is 1-{EVENT_KEY_MAX_LENGTH} characters")
    if not sale_id and not payment_ref:
        raise InvalidInput("the event names no sale")
    for ref in (sale_id, payment_ref, dispute_ref):
        if ref is not None and (len(ref) > 128 or "\x00" in ref):
            raise InvalidInput("a processor reference is 1-128 characters, without NUL")
    if "\x00" in event_key or "\\u0000" in json.dumps(payload):
        raise InvalidInput("the event contains NUL characters")  # PostgreSQL cannot store them
    for amount in (refunded_amount, charge_amount):
        if amount is not None and not 0 <= amount <= values.MAX_AMOUNT:
            raise InvalidInput("amounts are whole numbers of minor units from 0 to 2^53")
    return ProcessorEvent(
        id=values.new_id("pev", now),
        processor=processor,
        event_key=event_key,
        kind=kind,
        sale_id=sale_id or None,
        payment_ref=payment_ref or None,
        payload=payload,
        created_at=now,
        dispute_ref=dispute_ref,
        refunded_amount=refunded_amount,
        charge_amount=charge_amount,
    )


def record_event(
    event: ProcessorEvent,
    uow: UnitOfWork,
    *,
    pepper: bytes,
    links: issuing.Links,
    catalog: Catalog,
) -> str:
    """Apply a refund or dispute once however often it is reported: `applied`, `pending`
    (its sale is unknown yet: fulfilling the sale applies it) or `duplicate`."""
    with uow:
        now = uow.clock()
        # Taken by fulfilment too: the event and its sale never miss each other.
        uow.commerce.lock_sale(event.processor, event.payment_ref or event.sale_id or "")
        if not uow.commerce.add_processor_event(event):
            return "duplicate"
        order = None
        if event.sale_id:
            order = uow.commerce.order_by_sale(event.processor, event.sale_id)
        if order is None and event.payment_ref:
            order = uow.commerce.order_by_payment_ref(event.processor, event.payment_ref)
        if order is None:
            uow.commit()
            return "pending"
        locked = uow.commerce.lock_order(order.id)
        assert locked is not None
        package = catalog.packages.get(locked.package_id)
        _apply(
            event,
            locked,
            uow,
            now=now,
            pepper=pepper,
            links=links,
            package_name=package.name if package else locked.package_id,
            catalog=catalog,
        )
        uow.commit()
    return "applied"


def apply_pending(
    order: Order,
    uow: UnitOfWork,
    *,
    pepper: bytes,
    links: issuing.Links,
    package_name: str,
    now: datetime,
) -> Order:
    """Inside fulfilment, before the code is issued: the events that arrived before their
    sale. Answers the order as they left it."""
    # The sale's lock comes with the read: an event about this sale waits for this COMMIT.
    for event in uow.commerce.pending_events(order.processor, order.sale_id, order.payment_ref):
        order = _apply(
            event,
            order,
            uow,
            now=now,
            pepper=pepper,
            links=links,
            package_name=package_name,
            fulfilling=True,
        )
    return order


def needs_code(order: Order) -> bool:
    """Whether fulfilment issues and emails a code: not for a refunded or disputed order."""
    return order.status is OrderStatus.FULFILLED and order.credits_left > 0


def _apply(
    event: ProcessorEvent,
    order: Order,
    uow: UnitOfWork,
    *,
    now: datetime,
    pepper: bytes,
    links: issuing.Links,
    package_name: str,
    catalog: Catalog | None = None,
    fulfilling: bool = False,
) -> Order:
    origin = Origin(
        _cut(f"{event.processor}:{event.event_key}", 255),
        None,
        f"{event.kind.replace('_', ' ')} of order {order.order_number} ({event.processor})",
    )
    taken = Taken()
    restored = 0
    match event.kind:
        case "refund":
            full, target = _refund_target(order, event)
            if order.status is not OrderStatus.REFUNDED:
                order, taken = take_back(
                    order, max(target, order.credits_taken), uow, now=now, origin=origin
                )
                paid = event.refunded_amount if event.refunded_amount is not None else order.price
                order = replace(
                    order,
                    status=OrderStatus.REFUNDED if full else order.status,
                    refunded_amount=max(order.refunded_amount, paid),
                    refunded_at=now,
                )
                if taken.credits or full:
                    cause = order.id if full else event.id
                    _refund_email(
                        order,
                        taken,
                        uow,
                        links=links,
                        catalog=catalog,
                        now=now,
                        cause=cause,
                        package_name=package_name,
                    )
        case "dispute" | "dispute_lost" as kind:
            opened = won = None
            if kind == "dispute_lost" and event.dispute_ref:
                opened = uow.commerce.dispute_event(event.processor, event.dispute_ref)
            if kind == "dispute" and event.dispute_ref:
                # Won before Tally heard it was opened: nothing is taken, nothing restored.
                won = uow.commerce.dispute_event(event.processor, event.dispute_ref, "dispute_won")
            if opened is None and won is None:  # a lost dispute keeps what its opening took
                order, taken = take_back(order, order.credits, uow, now=now, origin=origin)
                status = (
                    OrderStatus.REFUNDED
                    if order.status is OrderStatus.REFUNDED
                    else OrderStatus.DISPUTED
                )
                order = replace(order, status=status, disputed_at=order.disputed_at or now)
        case "dispute_won":
            opened = None
            if event.dispute_ref:
                opened = uow.commerce.dispute_event(event.processor, event.dispute_ref)
            if opened is not None and opened.restored_at is None:
                order, opened, restored = _give_back(
                    order,
                    opened,
                    uow,
                    now=now,
                    origin=origin,
                    pepper=pepper,
                    links=links,
                    package_name=package_name,
                    fulfilling=fulfilling,
                )
                uow.commerce.event_applied(opened)
            if order.status is OrderStatus.DISPUTED:
                order = replace(order, status=OrderStatus.FULFILLED)
    uow.commerce.save_reversal(order)
    uow.commerce.event_applied(
        replace(
            event,
            status="applied",
            order_id=order.id,
            applied_at=now,
            credits_taken=taken.credits,
            credits_restored=restored,
            code_voided=taken.code_voided,
            credits_from_lots=taken.from_lots,
            credits_owed=taken.owed,
        )
    )
    return order


def _refund_target(order: Order, event: ProcessorEvent) -> tuple[bool, int]:
    """(whether the refund is whole, the credits to have taken back in all)."""
    paid = event.charge_amount or order.price
    if event.refunded_amount is None or paid <= 0 or event.refunded_amount >= paid:
        return True, order.credits
    return False, math.ceil(order.credits * event.refunded_amount / paid)


# --- helpers -------------------------------------------------------------------------------------


def _reason(reason: str) -> str:
    text = reason.strip()
    if not text:
        raise InvalidInput("a refund needs a reason")
    check_reason(text)
    return text


def _cut(text: str, limit: int = REASON_MAX_LENGTH) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _replay(uow: UnitOfWork, stored: StoredResult, request_hash: str) -> Order:
    if stored.request_hash != request_hash:
        raise IdempotencyKeyReused
    uow.replayed = True
    replayed: Order = adapter(Order).validate_python(stored.response)
    return replayed


def _money(amount: int, currency: str) -> str:
    if currency.upper() in _ZERO_DECIMAL:
        return f"{amount} {currency.upper()}"
    return f"{amount // 100}.{amount % 100:02d} {currency.upper()}"


def _refund_email(
    order: Order,
    taken: Taken,
    uow: UnitOfWork,
    *,
    links: issuing.Links,
    catalog: Catalog | None,
    now: datetime,
    cause: str,
    package_name: str | None = None,
) -> None:
    """Rule 12: the refund email, once per cause, in the transaction that refunds. It goes to
    whoever paid: the giver of a gift."""
    if package_name is None:
        package = None if catalog is None else catalog.packages.get(order.package_id)
        package_name = package.name if package is not None else order.package_id
    amount = order.refunded_amount if order.refunded_amount else order.price
    uow.commerce.add_message(
        Message(
            id=values.new_id("msg", now),
            cause=f"refund:{cause}",
            template="refund",
            to_email=order.gifter_email or order.email,
            subject=f"Your refund for order {order.order_number}",
            context={
                "package_name": package_name,
                "order_number": order.order_number,
                "amount": _money(amount, order.currency),
                "credits_taken": taken.credits,
                "credits_owed": taken.owed,
                "code_voided": taken.code_voided,
                "redeem_url": links.redeem_url,
                "lost_code_url": links.lost_code_url,
            },
            order_id=order.id,
            attempts=0,
            created_at=now,
        ),
        now,
    )
