"""Orders for support and for their buyers: find them, and replace a lost code (rule 10).

A reissue voids the order's unredeemed code and issues a new one with the order's original
validity (rule 4), emailed to the order's address only, in one transaction. Support calls it
with an idempotency key (rule 5); the public /lost-code page calls it at most once per order
per hour, keyed by the hour, and never says whether the pair it was given exists."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Final

from tally.domain import values
from tally.domain.catalog import Catalog
from tally.domain.commerce import Code, CodeStatus, Order, OrderStatus
from tally.domain.errors import (
    CodeAlreadyRedeemed,
    IdempotencyKeyReused,
    InvalidInput,
    OrderExpired,
    OrderNotFound,
    OrderReversed,
)
from tally.domain.model import REASON_MAX_LENGTH
from tally.service import limits, staff
from tally.service.changes import LOCAL_SCOPE, Command, adapter, fingerprint
from tally.service.issuing import Links, issue_code
from tally.service.ledger import PAGE_MAX, Page
from tally.service.ports import IdempotencyRace, UnitOfWork

#: The longest reason kept with a reissue.
#: /lost-code: attempts per client address per hour (every attempt counts, matched or not,
#: so the limit says nothing about which pairs exist), and at most one new code per order
#: per LOST_CODE_ORDER_WINDOW however often its pair is entered.
LOST_CODE_ATTEMPTS_PER_WINDOW: Final = 5
LOST_CODE_WINDOW: Final = timedelta(hours=1)
LOST_CODE_ORDER_WINDOW: Final = timedelta(hours=1)
#: Idempotency scope of the page's reissues: apart from every platform's own keys.
LOST_CODE_SCOPE: Final = "lost-code"
EMAIL_MAX: Final = 320
ORDER_NUMBER_MAX: Final = 128


@dataclass(frozen=True, kw_only=True)
class ReissueCode(Command):
    """Replace the order's unredeemed code. `platform_id` is whoever asked (a platform, or
    the support console's staff member); it is kept with the new code's email."""

    order_id: str
    reason: str | None = None


@dataclass(frozen=True)
class OrderSummary:
    """An order with its current code: the unredeemed one if there is one, else the newest."""

    order: Order
    code_status: CodeStatus | None
    code_last4: str | None


def current_code(codes_of_order: list[Code]) -> Code | None:
    """The code that speaks for the order: the one still issued, else the newest."""
    issued = [code for code in codes_of_order if code.status is CodeStatus.ISSUED]
    if issued:
        return issued[-1]
    return codes_of_order[-1] if codes_of_order else None


def find_orders(
    uow: UnitOfWork,
    *,
    email: str | None = None,
    order_number: str | None = None,
    limit: int,
    starting_after: str | None = None,
) -> Page[OrderSummary]:
    """Orders matching every filter given (at least one), newest first; the email matches
    whatever its case. A page starts after the order `starting_after`."""
    # A blank filter is no filter; anything else must be one address.
    email = values.email(email) if isinstance(email, str) and email.strip() else None
    order_number = _text(order_number, "order_number", ORDER_NUMBER_MAX)
    if email is None and order_number is None:
        raise InvalidInput("give an email or an order_number (or both)")
    if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= PAGE_MAX:
        raise InvalidInput(f"limit must be between 1 and {PAGE_MAX}")
    if starting_after is not None and not values.is_id(starting_after, "ord"):
        raise InvalidInput("starting_after names no order")
    with uow.read_only():
        found = uow.commerce.find_orders(
            email=email, order_number=order_number, limit=limit + 1, starting_after=starting_after
        )
        page = found[:limit]
        codes = uow.commerce.codes_of_orders([order.id for order in page])
    summaries = []
    for order in page:
        code = current_code(codes.get(order.id, []))
        summaries.append(
            OrderSummary(
                order,
                None if code is None else code.status,
                None if code is None else code.last4,
            )
        )
    return Page(summaries, len(found) > limit)


def reissue_code(
    cmd: ReissueCode,
    uow: UnitOfWork,
    *,
    pepper: bytes,
    links: Links,
    catalog: Catalog | None = None,
) -> Order:
    """Void the order's unredeemed code and email a new one, once per idempotency key.

    Raises OrderNotFound, OrderReversed (refunded or disputed), OrderExpired (its credits
    expired: a new code could not be redeemed) and CodeAlreadyRedeemed; a
    replay of a key that succeeded answers its stored order, whatever happened since."""
    key = values.idempotency_key(cmd.idempotency_key)
    reason = _text(cmd.reason, "reason", REASON_MAX_LENGTH)
    scope = cmd.platform_id or LOCAL_SCOPE
    request_hash = fingerprint(cmd)
    with uow:
        stored = uow.idempotency.get(scope, key)
        if stored is None:
            now = uow.clock()
            order = _reissue(
                cmd.order_id,
                uow,
                pepper=pepper,
                links=links,
                catalog=catalog,
                now=now,
                note={"reason": reason, "requested_by": cmd.platform_id},
            )
            # The console's staff member who asked, with the order: who replaced the code.
            staff.record_action(
                uow,
                platform_id=cmd.platform_id,
                action="reissue",
                subject=order.id,
                reason=reason,
                idempotency_key=key,
                now=now,
            )
            try:
                uow.idempotency.add(
                    scope,
                    key,
                    request_hash=request_hash,
                    response=adapter(Order).dump_python(order, mode="json"),
                    account_id=None,
                    now=now,
                )
                uow.commit()
            except IdempotencyRace:
                pass  # the same key, at once: it waited on the order lock and lost; replay
            else:
                uow.replayed = False
                return order
    if stored is None:
        with uow.read_only():
            stored = uow.idempotency.get(scope, key)
        assert stored is not None, "a key that lost a race has a stored winner"
    if stored.request_hash != request_hash:
        raise IdempotencyKeyReused
    uow.replayed = True
    replayed: Order = adapter(Order).validate_python(stored.response)
    return replayed


def request_lost_code(
    email: str,
    order_number: str,
    uow: UnitOfWork,
    *,
    client_address: str | None,
    pepper: bytes,
    links: Links,
    catalog: Catalog | None = None,
    limit: int = LOST_CODE_ATTEMPTS_PER_WINDOW,
) -> None:
    """The public /lost-code form: when `email` (the order's address or its gifter's) and
    `order_number` match an order whose code is unredeemed, a new code goes to the order's
    address. It answers the same (None) whether or not anything matched; only too many
    attempts from one client address are refused (RateLimited), and what is not an email
    address (InvalidEmail), before anything is counted or looked up."""
    email = values.email(email)
    order_number = (order_number or "").strip()
    asked = [
        limits.Limit(
            "lost_code_address",
            f"lost-code:address:{client_address or limits.UNKNOWN_ADDRESS}",
            limit,
            LOST_CODE_WINDOW,
        )
    ]
    with uow:
        now = uow.clock()
        limits.enforce(uow, asked, now, detail="too many requests: try again later")
        limits.record(uow, asked, now)
        uow.commit()
    if not 0 < len(order_number) <= ORDER_NUMBER_MAX:
        return
    if "\x00" in order_number:
        return  # PostgreSQL refuses NUL characters: never send it junk
    with uow:
        now = uow.clock()
        wanted = email.casefold()
        matches = [
            order
            for order in uow.commerce.find_orders(
                email=None, order_number=order_number, limit=PAGE_MAX, starting_after=None
            )
            if wanted in {order.email.casefold(), (order.gifter_email or "").casefold()}
        ]
        for found in matches:
            locked = uow.commerce.lock_order(found.id)  # the lock order of _reissue
            if locked is None or locked.status is not OrderStatus.FULFILLED:
                continue
            if locked.expires_at is not None and locked.expires_at <= now:
                continue  # a new code could not be redeemed either
            codes = uow.commerce.codes_of_order_for_update(locked.id)
            code = current_code(codes)
            if code is not None and code.status is not CodeStatus.ISSUED:
                continue  # redeemed: nothing to replace (and nothing to say)
            if len(codes) > 1 and max(c.created_at for c in codes) > now - LOST_CODE_ORDER_WINDOW:
                continue  # replaced within the hour already: the page cannot spam the inbox
            _reissue(
                locked.id,
                uow,
                pepper=pepper,
                links=links,
                catalog=catalog,
                now=now,
                note={"reason": "lost-code page", "requested_by": None},
            )
        uow.commit()


def _reissue(
    order_id: str,
    uow: UnitOfWork,
    *,
    pepper: bytes,
    links: Links,
    catalog: Catalog | None,
    now: datetime,
    note: dict[str, object],
) -> Order:
    """Inside the caller's transaction: lock the order and its codes, void the unredeemed
    code and issue the replacement with the order's own expiry (rule 4)."""
    # The order's row, then its codes: the lock order of a refund (order, then codes) and of
    # a redemption (the code), so none of them can deadlock with a reissue. A reissue that
    # waited here reads, afterwards, the code the one before it issued.
    order = uow.commerce.lock_order(order_id) if values.is_id(order_id, "ord") else None
    if order is None:
        raise OrderNotFound(order_id=order_id)
    if order.status is not OrderStatus.FULFILLED:
        raise OrderReversed(f"the order was {order.status.value}", order_id=order.id)
    if order.expires_at is not None and order.expires_at <= now:
        raise OrderExpired(
            f"the order's credits expired at {values.format_time(order.expires_at)}",
            order_id=order.id,
            expires_at=values.format_time(order.expires_at),
        )
    code = current_code(uow.commerce.codes_of_order_for_update(order.id))
    if code is not None and code.status is CodeStatus.REDEEMED:
        raise CodeAlreadyRedeemed("the order's code was redeemed", order_id=order.id)
    if (
        code is not None
        and code.status is CodeStatus.ISSUED
        and not uow.commerce.void_issued_code(code.id, now)
    ):
        # Cannot happen with the code locked above; refuse rather than issue a second code.
        raise CodeAlreadyRedeemed("the order's code was redeemed", order_id=order.id)
    package = None if catalog is None else catalog.packages.get(order.package_id)
    # A package since removed from the catalog is still named, by its id.
    name = order.package_id if package is None else package.name
    issue_code(order, "replacement_code", name, uow, pepper=pepper, links=links, now=now, note=note)
    return order


def _text(value: str | None, name: str, most: int) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or "\x00" in value:
        raise InvalidInput(f"{name} must be text")
    value = value.strip()
    if not value:
        return None
    if len(value) > most:
        raise InvalidInput(f"{name} is at most {most} characters")
    return value
