"""Orders and codes (docs/rules.md rules 4, 10-12, §4). Pure rules: what a sale is worth, until when
its credits last, and what a code may do next."""

from __future__ import annotations

import re
import secrets
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from typing import Final

from tally.domain import values
from tally.domain.catalog import Package
from tally.domain.errors import InvalidInput

PROCESSORS: Final = ("gumroad", "stripe", "sandbox")
#: The most units one sale may buy: far above any real basket, small enough to stay exact.
MAX_SALE_QUANTITY: Final = 1_000
SALE_ID_MAX_LENGTH: Final = 128
ORDER_NUMBER_MAX_LENGTH: Final = 128
CURRENCY_PATTERN: Final = re.compile(r"[A-Z]{3}")


class CodeStatus(StrEnum):
    ISSUED = "issued"
    REDEEMED = "redeemed"
    VOID = "void"


class OrderStatus(StrEnum):
    FULFILLED = "fulfilled"
    REFUNDED = "refunded"
    DISPUTED = "disputed"


@dataclass(frozen=True)
class Sale:
    """A paid sale as a processor reports it, already matched to a package."""

    processor: str
    sale_id: str
    package: Package
    email: str  # who receives the code: the buyer, or the gift's recipient
    purchased_at: datetime
    quantity: int = 1
    price: int = 0  # what was paid, in the currency's minor unit
    currency: str = "USD"
    order_number: str | None = None
    gifter_email: str | None = None
    is_test: bool = False
    payment_ref: str | None = None  # Stripe: the payment intent its charges will name

    def __post_init__(self) -> None:
        """A sale is checked where it enters, whatever reported it: what the processor sent
        is refused here rather than fulfilled by guess, or failing later in the outbox."""
        if self.processor not in PROCESSORS:
            raise InvalidInput(f"processor is one of {', '.join(PROCESSORS)}")
        if not _printable(self.sale_id, SALE_ID_MAX_LENGTH):
            raise InvalidInput(f"a sale id is 1-{SALE_ID_MAX_LENGTH} printable characters")
        if not 1 <= self.quantity <= MAX_SALE_QUANTITY:
            raise InvalidInput(f"quantity is 1 to {MAX_SALE_QUANTITY}")
        price_ok = isinstance(self.price, int) and not isinstance(self.price, bool)
        if not price_ok or not 0 <= self.price <= values.MAX_AMOUNT:
            raise InvalidInput("price is a whole number of minor units from 0 to 2^53")
        if not isinstance(self.currency, str) or not CURRENCY_PATTERN.fullmatch(self.currency):
            raise InvalidInput("currency is three capital letters (ISO 4217)")
        if self.order_number is not None and not _printable(
            self.order_number, ORDER_NUMBER_MAX_LENGTH
        ):
            raise InvalidInput(
                f"an order number is 1-{ORDER_NUMBER_MAX_LENGTH} printable characters"
            )
        # The code goes to this address, and a gift's refund to the giver's: one bare
        # address each, normalised, or nothing is fulfilled.
        object.__setattr__(self, "email", values.email(self.email))
        if self.gifter_email is not None:
            gifter = values.email(self.gifter_email, field="gifter_email")
            object.__setattr__(self, "gifter_email", gifter)
        assert self.purchased_at.tzinfo is not None

    @property
    def is_gift(self) -> bool:
        return self.gifter_email is not None


def _printable(text: object, most: int) -> bool:
    return isinstance(text, str) and 0 < len(text) <= most and text.isprintable()


def draw_credits(package: Package, quantity: int) -> int:
    """The credits a sale buys. A surprise pack draws once per unit, with `secrets`; the
    caller records the result, so a repeated ping never draws again."""
    if package.surprise is not None:
        low, high = package.surprise.min, package.surprise.max
        total = sum(low + secrets.randbelow(high - low + 1) for _ in range(quantity))
    else:
        assert package.credits is not None
        total = package.credits * quantity
    return values.credits(total)


def credits_expire_at(package: Package, purchased_at: datetime) -> datetime | None:
    """Rule 4: a code's credits are valid from the purchase date for the package's validity,
    whenever the code is redeemed."""
    return values.Validity(package.validity).expires_at(purchased_at)


@dataclass(frozen=True)
class Order:
    id: str
    processor: str
    sale_id: str
    order_number: str
    package_id: str
    quantity: int
    credits: int
    price: int
    currency: str
    validity: str
    expires_at: datetime | None
    email: str
    gifter_email: str | None
    is_test: bool
    status: OrderStatus
    purchased_at: datetime
    created_at: datetime
    # --- refunds and disputes (rules 8, 9): what the order gave back so far
    payment_ref: str | None = None
    refunded_amount: int = 0  # minor units, the processor's running total
    credits_taken: int = 0  # every credit taken back: code value, lot credits, and debt
    credits_owed: int = 0  # the part of credits_taken that was spent already: debt
    refunded_at: datetime | None = None
    disputed_at: datetime | None = None
    refund_reason: str | None = None

    @property
    def credits_left(self) -> int:
        """What redeeming the order's code gives now: a partial refund before redemption
        takes its share from the code's value."""
        return self.credits - self.credits_taken

    @property
    def source(self) -> str:
        """The lot source of this order's credits."""
        return "gift" if self.gifter_email else "purchase"


@dataclass(frozen=True)
class Code:
    id: str
    order_id: str
    last4: str
    status: CodeStatus
    created_at: datetime
    redeemed_at: datetime | None = None
    account_id: str | None = None
    lot_id: str | None = None
    voided_at: datetime | None = None


@dataclass(frozen=True)
class Message:
    """One email in the outbox; `cause` makes it unique (rule 12)."""

    id: str
    cause: str
    template: str
    to_email: str
    subject: str
    context: dict[str, object]
    order_id: str | None
    attempts: int
    created_at: datetime
