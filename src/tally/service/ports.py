"""What the use cases need from the outside world, as Protocols. Adapters implement them."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from datetime import date, datetime
from types import TracebackType
from typing import TYPE_CHECKING, Any, Protocol, Self

from tally.domain.commerce import Code, Message, Order
from tally.domain.model import Account, Entry, Hold, Lot

if TYPE_CHECKING:
    from tally.service.group_commit import GroupCommit


class Clock(Protocol):
    def __call__(self) -> datetime: ...


class IdempotencyRace(Exception):
    """Another transaction stored a result under the same key first; look it up and replay."""


@dataclass(frozen=True)
class StoredResult:
    request_hash: str
    response: Any


@dataclass(frozen=True)
class KeyRecord:
    """A result to remember under an idempotency key."""

    scope: str
    key: str
    request_hash: str
    response: Any
    account_id: str | None


@dataclass(frozen=True)
class History:
    """An account's rows as of a past instant, for balances `at` a time (rule 2 replayed)."""

    lots: list[Lot]
    holds: list[Hold]
    entries: list[Entry]


@dataclass
class AuditReport:
    accounts: int = 0
    lots: int = 0
    holds: int = 0
    entries: int = 0
    due_lots: int = 0
    due_holds: int = 0
    violations: list[str] = field(default_factory=list)


class Accounts(Protocol):
    def get_for_update(
        self,
        account_id: str,
        *,
        create_at: datetime | None = None,
        lot_ids: Sequence[str] = (),
        hold_ids: Sequence[str] = (),
    ) -> Account | None:
        """Lock the account (creating it when `create_at` is given) and load what a change
        can touch: open lots, pending holds, and the named lots and holds."""

    def get_many_for_update(
        self,
        account_ids: Sequence[str],
        *,
        lot_ids: Sequence[str] = (),
        hold_ids: Sequence[str] = (),
    ) -> dict[str, Account]:
        """Lock and load several accounts in sorted order (absent ones are left out, never
        created)."""

    def get(self, account_id: str) -> Account | None:
        """The same, without a lock, for reads."""

    def save(self, account: Account) -> None: ...

    def save_many(self, changed: Sequence[Account]) -> None:
        """Save several accounts with one statement per kind of row."""

    def account_of_lot(self, lot_id: str) -> str | None: ...

    def account_of_hold(self, hold_id: str) -> str | None: ...

    def lots(self, account_id: str, *, limit: int, starting_after: str | None) -> list[Lot]:
        """Every lot of the account, soonest spent first (rule 3), a page at a time."""

    def due(self, now: datetime, limit: int) -> list[str]:
        """Accounts with a lapsed hold or an expired lot not yet written down."""


class Journal(Protocol):
    def entries(self, account_id: str, *, limit: int, before_seq: int | None) -> list[Entry]: ...

    def seq_of(self, account_id: str, entry_id: str) -> int | None: ...

    def totals(self) -> dict[str, int]:
        """Credits per entry type over the whole journal."""

    def history(self, account_id: str, until: datetime) -> History: ...


class IdempotencyStore(Protocol):
    def get(self, scope: str, key: str) -> StoredResult | None: ...

    def add(
        self,
        scope: str,
        key: str,
        *,
        request_hash: str,
        response: Any,
        account_id: str | None,
        now: datetime,
    ) -> None:
        """Store a result; raise `IdempotencyRace` if the key was stored meanwhile."""

    def add_many(self, records: Sequence[KeyRecord], now: datetime) -> None:
        """Store several results in one statement; a race on any raises `IdempotencyRace`."""


@dataclass(frozen=True)
class PlatformRecord:
    platform_id: str
    name: str
    created_at: datetime


@dataclass(frozen=True)
class KeyRecordOfPlatform:
    """An API key as stored: its visible prefix and digest, never the plaintext."""

    prefix: str
    platform_id: str
    platform_name: str
    digest: str
    scopes: tuple[str, ...]
    created_at: datetime
    revoked_at: datetime | None


class Platforms(Protocol):
    def add(self, platform: PlatformRecord) -> None: ...

    def by_name(self, name: str) -> PlatformRecord | None: ...

    def add_key(self, key: KeyRecordOfPlatform) -> None: ...

    def key(self, prefix: str) -> KeyRecordOfPlatform | None: ...

    def keys(self, *, limit: int) -> list[KeyRecordOfPlatform]: ...

    def revoke_key(self, prefix: str, now: datetime) -> None: ...

    def in_force(self, prefix: str) -> bool:
        """Whether a key with this prefix exists and is not revoked."""


class MailTemporary(Exception):
    """The message could not be sent now; the worker retries with backoff."""


class MailRefused(Exception):
    """The mail server refused the message for good (a 5xx answer); retrying will not help."""


@dataclass(frozen=True)
class Email:
    message_id: str  # stable per outbox row: a resend is recognisably the same message
    sender: str
    to: str
    subject: str
    text: str
    html: str


class Mailer(Protocol):
    def send(self, email: Email, now: datetime) -> None:
        """Deliver or raise MailTemporary / MailRefused."""


class Renderer(Protocol):
    def render(self, kind: str, subject: str, context: dict[str, Any]) -> tuple[str, str]:
        """(text, html) of one message."""


class DuplicateSale(Exception):
    """The processor's sale has an order already (the unique key decided)."""


class Commerce(Protocol):
    def add_order(self, order: Order) -> None: ...

    def order_by_sale(self, processor: str, sale_id: str) -> Order | None: ...

    def order(self, order_id: str) -> Order | None: ...

    def add_code(self, code: Code, digest: str) -> None: ...

    def code_for_update(self, digest: str) -> Code | None: ...

    def code(self, digest: str) -> Code | None: ...

    def codes_of_order(self, order_id: str) -> list[Code]: ...

    def mark_redeemed(self, code_id: str, account_id: str, lot_id: str, now: datetime) -> None: ...

    def add_message(self, message: Message, now: datetime) -> None: ...

    def claim_message(self, now: datetime, *, until: datetime) -> tuple[str, int] | None:
        """The oldest due message, its attempt counted, not due again until `until`:
        (its id, its attempts with this one)."""

    def message(self, message_id: str) -> Message | None: ...

    def message_sent(
        self, message_id: str, context: dict[str, object], now: datetime, *, attempts: int
    ) -> bool:
        """Only while the claim that made `attempts` holds."""

    def message_failed(
        self, message_id: str, *, attempts: int, retry_at: datetime | None, error: str
    ) -> bool:
        """Only while the claim that made `attempts` holds; `retry_at` None: failed."""

    def messages_of_order(self, order_id: str) -> list[dict[str, Any]]: ...

    def add_unmatched(
        self, processor: str, sale_id: str | None, reason: str, payload: Any, now: datetime
    ) -> None: ...

    def unmatched(self, limit: int) -> list[UnmatchedPing]:
        """The newest pings and events Tally kept without acting on them."""

    def lock_subjects(self, subjects: Sequence[str]) -> None:
        """Until the transaction ends, no other transaction counts or adds failures of these
        subjects (service/limits.py)."""

    def failures_within(self, windows: Mapping[str, datetime]) -> dict[str, tuple[int, datetime]]:
        """Per subject, its failures after its own time and the oldest; none: absent."""

    def add_failures(self, subjects: Sequence[str], now: datetime) -> None: ...

    def remove_failures_before(self, before: datetime, limit: int) -> int:
        """Delete at most `limit` failures recorded before `before`; how many went."""

    # --- lost codes and reconciliation

    def void_issued_code(self, code_id: str, now: datetime) -> bool:
        """Void the code if it is still issued; False if it is not (redeemed or void)."""

    def find_orders(
        self,
        *,
        email: str | None,
        order_number: str | None,
        limit: int,
        starting_after: str | None,
    ) -> list[Order]:
        """Orders matching every filter given (email in any case), newest first."""

    def codes_of_orders(self, order_ids: Sequence[str]) -> dict[str, list[Code]]:
        """Each order's codes, oldest first."""

    def unmatched_recorded(self, processor: str, sale_id: str) -> bool:
        """Whether an unmatched sale was kept for support already."""

    # --- refunds and disputes

    def lock_sale(self, processor: str, key: str) -> None:
        """Serialise the fulfilment of a sale with the events about it (PostgreSQL: an
        advisory lock until the transaction ends; SQLite has one writer already)."""

    def order_by_payment_ref(self, processor: str, payment_ref: str) -> Order | None: ...

    def lock_order(self, order_id: str) -> Order | None:
        """The order, locked (PostgreSQL) while what it gave back changes."""

    def codes_of_order_for_update(self, order_id: str) -> list[Code]:
        """The order's codes, locked against a concurrent redemption, oldest first."""

    def save_reversal(self, order: Order) -> None:
        """Write the order's status and what it gave back (refunded_amount ... refund_reason)."""

    def lot_consumed(self, account_id: str, lot_id: str) -> int:
        """Credits of the lot spent for good: captured, debited, or repaying debt."""

    def add_processor_event(self, event: ProcessorEvent) -> bool:
        """Store the event once; False when its (processor, event_key) was stored before."""

    def pending_events(
        self, processor: str, sale_id: str, payment_ref: str | None
    ) -> list[ProcessorEvent]:
        """Events stored before their sale was known, oldest first, locked; the sale's lock
        (see `lock_sale`, on `payment_ref` or else `sale_id`) is taken first."""

    def dispute_event(
        self, processor: str, dispute_ref: str, kind: str = "dispute"
    ) -> ProcessorEvent | None:
        """The newest applied event of `kind` about this dispute (by default the `dispute`
        that opened it), locked."""

    def restored_lots(self, order_id: str) -> list[str]:
        """The lots won disputes granted back for the order, oldest first."""

    def event_applied(self, event: ProcessorEvent) -> None:
        """Mark the event applied, with its order and what it took or restored."""


# --- refunds and disputes -------------------------------------------------------------------------


class RefundFailed(Exception):
    """The processor refused the refund or could not be reached; nothing was refunded."""


@dataclass(frozen=True)
class RefundRequest:
    """What a processor needs to refund one order in full."""

    processor: str
    sale_id: str
    payment_ref: str | None  # Stripe: the session's payment_intent
    amount: int  # minor units
    currency: str
    idempotency_key: str  # passed to the processor where it takes one (Stripe)


@dataclass(frozen=True)
class ProcessorEvent:
    """A refund or dispute a processor reported (docs/rules.md §4), kept once per event."""

    id: str
    processor: str  # gumroad, stripe or sandbox
    event_key: str  # the processor's event id; Gumroad sends none: `<resource>:<sale_id>`
    kind: str  # refund, dispute, dispute_won, dispute_lost
    sale_id: str | None
    payment_ref: str | None
    payload: dict[str, Any]
    created_at: datetime
    dispute_ref: str | None = None
    refunded_amount: int | None = None  # Stripe's running total; None: the whole sale
    charge_amount: int | None = None
    status: str = "pending"  # pending until the sale is known, then applied
    order_id: str | None = None
    credits_taken: int = 0
    credits_restored: int = 0
    code_voided: bool = False
    applied_at: datetime | None = None
    # A dispute: of credits_taken, what came out of lots and what became debt; a won dispute
    # restores exactly those once (restored_at), into restored_lot_id if it granted credits.
    credits_from_lots: int = 0
    credits_owed: int = 0
    restored_lot_id: str | None = None
    restored_at: datetime | None = None


class RefundGateway(Protocol):
    def refund(self, request: RefundRequest) -> str:
        """Refund the sale in full at the processor; answer the processor's refund id or
        raise RefundFailed with the processor's own words."""


# --- the support console --------------------------------------------------------------------------


@dataclass(frozen=True)
class StaffRecord:
    staff_id: str
    email: str
    password_hash: str
    created_at: datetime
    disabled_at: datetime | None


@dataclass(frozen=True)
class StaffSessionRecord:
    """A session as stored (by the digest of its token) with its staff member."""

    digest: str
    staff_id: str
    email: str
    created_at: datetime
    last_seen_at: datetime
    expires_at: datetime
    staff_disabled_at: datetime | None


@dataclass(frozen=True)
class UnmatchedPing:
    """A processor's ping or event kept for support instead of acted on (no package, an
    unusable address, out of the processor's shape...), as it came."""

    ping_id: str
    processor: str
    sale_id: str | None
    reason: str
    payload: Any
    created_at: datetime


@dataclass(frozen=True)
class DayTotals:
    day: date
    sold: int
    spent: int
    expired: int


class Staff(Protocol):
    def add(self, staff: StaffRecord) -> bool:
        """Store a staff member; False if the email has one already (the unique key decides)."""

    def by_email(self, email: str, *, lock: bool = False) -> StaffRecord | None:
        """With `lock`, sign-ins to one email take turns (PostgreSQL)."""

    def add_attempts(self, subjects: Sequence[str], now: datetime) -> list[str]:
        """Count a sign-in attempt against each subject (the redemption failures table, its
        subjects prefixed `sign-in-`); answers the rows' ids."""

    def forget_attempts(self, attempt_ids: Sequence[str]) -> None:
        """A sign-in succeeded: its attempt is not a failure."""

    def emails(self, staff_ids: Sequence[str]) -> dict[str, str]: ...

    def set_password_hash(self, staff_id: str, password_hash: str) -> None: ...

    def disable(self, staff_id: str, now: datetime) -> None:
        """Refuse the staff member's sign-ins from now on and end their sessions."""

    def add_session(
        self, digest: str, staff_id: str, *, now: datetime, expires_at: datetime
    ) -> None: ...

    def session(self, digest: str) -> StaffSessionRecord | None: ...

    def touch_session(self, digest: str, now: datetime) -> None: ...

    def delete_session(self, digest: str) -> None: ...

    def delete_sessions_ended(self, staff_id: str, idle_since: datetime, now: datetime) -> int:
        """Forget the staff member's sessions past their absolute or idle expiry."""

    def search_orders(self, text: str, *, limit: int) -> list[Order]:
        """Orders whose email (any case), order number, sale id, id, or code's last 4 is
        `text`, newest first."""

    def search_accounts(self, text: str, *, limit: int) -> list[tuple[str, str | None]]:
        """(account_id, email) of accounts whose id or email (any case) is `text`."""

    def message_for_update(self, message_id: str) -> dict[str, Any] | None:
        """An outbox row (without its context), locked."""

    def requeue_message(self, message_id: str, now: datetime) -> None:
        """Put an unsent message back to pending, due now, with a fresh set of attempts."""

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
        """Record an action; False if this staff member's key recorded this action already."""

    def daily_totals(self, since: datetime) -> list[DayTotals]:
        """Credits sold, spent and expired per UTC day from `since`, from the journal."""


class Audit(Protocol):
    def run(self, now: datetime) -> AuditReport: ...


class UnitOfWork(Protocol):
    # Read-only properties, so adapters may narrow them to their own repository types.
    @property
    def accounts(self) -> Accounts: ...

    @property
    def journal(self) -> Journal: ...

    @property
    def idempotency(self) -> IdempotencyStore: ...

    @property
    def audit(self) -> Audit: ...

    @property
    def platforms(self) -> Platforms: ...

    @property
    def commerce(self) -> Commerce: ...

    @property
    def staff(self) -> Staff: ...

    #: Whether the last change run through this unit of work answered a stored result.
    replayed: bool
    #: The prefix of the API key a change is made under, when the caller was authenticated
    #: from a cache: the change's own transaction checks that the key is not revoked.
    credential: str | None

    @property
    def clock(self) -> Clock: ...

    @property
    def group(self) -> GroupCommit | None:
        """Where changes go to share a transaction with concurrent ones; None: run alone."""

    def __enter__(self) -> Self: ...

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None: ...

    def commit(self) -> None: ...

    def batch(self) -> AbstractContextManager[None]:
        """Writes inside may be sent together; their errors surface when the block ends."""

    def read_only(self, *, snapshot: bool = True) -> AbstractContextManager[Self]:
        """A transaction that only reads (no write lock on SQLite); with `snapshot`, all its
        reads see one instant (REPEATABLE READ on PostgreSQL), else each read is current."""
