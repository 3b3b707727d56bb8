"""What the use cases need from the outside world, as Protocols. Adapters implement them."""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from datetime import datetime
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
        create_at: datetime | None = None,
        lot_ids: Sequence[str] = (),
        hold_ids: Sequence[str] = (),
    ) -> dict[str, Account]:
        """Lock and load several accounts in sorted order (absent ones are left out)."""

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

    def next_due_message(self, now: datetime) -> Message | None: ...

    def message_sent(self, message_id: str, context: dict[str, object], now: datetime) -> None: ...

    def message_failed(
        self, message_id: str, *, attempts: int, retry_at: datetime | None, error: str
    ) -> None: ...

    def messages_of_order(self, order_id: str) -> list[dict[str, Any]]: ...

    def add_unmatched(
        self, processor: str, sale_id: str | None, reason: str, payload: Any, now: datetime
    ) -> None: ...

    def add_failure(self, subject: str, now: datetime) -> None: ...

    def failures_since(self, subject: str, since: datetime) -> tuple[int, datetime | None]: ...


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

    #: Whether the last change run through this unit of work answered a stored result.
    replayed: bool

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
