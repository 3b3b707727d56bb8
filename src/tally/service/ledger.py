"""Ledger use cases. Each validates its command and hands its change to `changes.run`, under
the caller's idempotency key (rule 5). That is why no `with uow:` appears here: with a group
commit the change joins other callers' changes in one transaction whose leader commits them
all (service/group_commit.py); without one, or when a batch cannot take it, `run_alone` opens
the unit of work and commits that change alone (docs/architecture.md follows one debit)."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Final, Generic, TypeVar

from tally.domain import values
from tally.domain.errors import (
    AccountNotFound,
    HoldNotFound,
    InvalidInput,
    InvalidTime,
    LotNotFound,
    NotFound,
)
from tally.domain.model import (
    DEFAULT_HOLD_TTL_SECONDS,
    Account,
    Balance,
    Debit,
    Entry,
    EntryType,
    Hold,
    HoldStatus,
    Lot,
    account_at,
)
from tally.service.changes import Change, Command, run
from tally.service.ports import AuditReport, UnitOfWork

#: Rule 4: purchased and gifted credits last two years unless the package says otherwise;
#: everything else never expires unless the grant says so.
DEFAULT_VALIDITY: Final = {"purchase": "P2Y", "gift": "P2Y"}
SWEEP_BATCH_SIZE: Final = 100
SWEEP_MAX_BATCHES: Final = 10_000
#: docs/rules.md §3: lists answer at most 500 items a page.
PAGE_MAX: Final = 500
METADATA_MAX_BYTES: Final = 4_096

R = TypeVar("R")
T = TypeVar("T")


@dataclass(frozen=True, kw_only=True)
class GrantCredits(Command):
    account_id: str
    amount: int
    source: str = "promotional"
    expires_at: datetime | None = None
    valid_for: str | None = None
    priority: int = 0
    reason: str | None = None
    metadata: dict[str, Any] | None = None


@dataclass(frozen=True, kw_only=True)
class PlaceHold(Command):
    account_id: str
    amount: int
    ttl_seconds: int = DEFAULT_HOLD_TTL_SECONDS
    metadata: dict[str, Any] | None = None
    # Set when the amount was priced from the catalog: `amount` pays for `quantity` units.
    tool: str | None = None
    quantity: int | None = None


@dataclass(frozen=True, kw_only=True)
class CaptureHold(Command):
    hold_id: str
    amount: int | None = None
    quantity: int | None = None  # units of the hold's tool, at the hold's price


@dataclass(frozen=True, kw_only=True)
class ReleaseHold(Command):
    hold_id: str
    reason: str | None = None


@dataclass(frozen=True, kw_only=True)
class DebitCredits(Command):
    account_id: str
    amount: int
    metadata: dict[str, Any] | None = None
    tool: str | None = None
    quantity: int | None = None


@dataclass(frozen=True, kw_only=True)
class VoidLot(Command):
    lot_id: str
    reason: str


@dataclass(frozen=True, kw_only=True)
class ClawBack(Command):
    account_id: str
    amount: int
    reason: str
    lot_id: str | None = None


@dataclass(frozen=True, kw_only=True)
class Adjust(Command):
    account_id: str
    delta: int
    reason: str


@dataclass(frozen=True)
class SweepResult:
    accounts: int = 0
    holds_expired: int = 0
    lots_expired: int = 0
    entries: list[str] = field(default_factory=list)


# --- use cases ------------------------------------------------------------------------------


def grant(cmd: GrantCredits, uow: UnitOfWork) -> Lot:
    values.account_id(cmd.account_id)
    amount = values.credits(cmd.amount)
    _check_metadata(cmd.metadata)
    if cmd.expires_at is not None and cmd.valid_for is not None:
        raise InvalidInput("give expires_at or valid_for, not both")
    if cmd.expires_at is not None and cmd.expires_at.tzinfo is None:
        raise InvalidTime("expires_at needs a time zone offset")
    validity_text = cmd.valid_for or DEFAULT_VALIDITY.get(cmd.source, values.NEVER)
    validity = None if cmd.expires_at is not None else values.Validity(validity_text)

    def action(account: Account, now: datetime) -> Lot:
        expires_at = cmd.expires_at if validity is None else validity.expires_at(now)
        return account.grant(
            amount=amount,
            source=cmd.source,
            expires_at=expires_at,
            priority=cmd.priority,
            now=now,
            origin=cmd.origin(cmd.reason),
            metadata=cmd.metadata,
        )

    return run(uow, Change(cmd, cmd.account_id, action, Lot, create=True))


def place_hold(cmd: PlaceHold, uow: UnitOfWork) -> Hold:
    return run(uow, place_hold_change(cmd))


def place_hold_change(cmd: PlaceHold) -> Change[Hold]:
    """`place_hold` as a change not yet run (for `changes.run_async`); refuses bad input now."""
    values.account_id(cmd.account_id)
    amount = values.credits(cmd.amount)
    _check_metadata(cmd.metadata)

    if (cmd.tool is None) != (cmd.quantity is None):
        raise InvalidInput("give tool and quantity together")
    if cmd.quantity is not None and amount % values.credits(cmd.quantity, field="quantity"):
        raise InvalidInput("amount must be a whole multiple of quantity")

    def action(account: Account, now: datetime) -> Hold:
        return account.place_hold(
            amount=amount,
            ttl_seconds=cmd.ttl_seconds,
            now=now,
            origin=cmd.origin(),
            metadata=cmd.metadata,
            tool=cmd.tool,
            quantity=cmd.quantity,
        )

    return Change(cmd, cmd.account_id, action, Hold)


def capture(cmd: CaptureHold, uow: UnitOfWork) -> Hold:
    return run(uow, capture_change(cmd))


def capture_change(cmd: CaptureHold) -> Change[Hold]:
    if cmd.amount is not None and cmd.quantity is not None:
        raise InvalidInput("give amount or quantity, not both")
    amount = None if cmd.amount is None else values.credits(cmd.amount)
    units = None if cmd.quantity is None else values.credits(cmd.quantity, field="quantity")
    _check_id(cmd.hold_id, "hold", HoldNotFound)

    def action(account: Account, now: datetime) -> Hold:
        wanted = amount
        if units is not None:
            wanted = account.hold(cmd.hold_id, cmd.origin()).credits_for(units)
        return account.capture(cmd.hold_id, wanted, now, cmd.origin())

    return Change(cmd, _owner_of_hold(cmd.hold_id), action, Hold, hold_ids=[cmd.hold_id])


def release(cmd: ReleaseHold, uow: UnitOfWork) -> Hold:
    return run(uow, release_change(cmd))


def release_change(cmd: ReleaseHold) -> Change[Hold]:
    _check_id(cmd.hold_id, "hold", HoldNotFound)

    def action(account: Account, now: datetime) -> Hold:
        return account.release(cmd.hold_id, now, cmd.origin(cmd.reason))

    return Change(cmd, _owner_of_hold(cmd.hold_id), action, Hold, hold_ids=[cmd.hold_id])


def debit(cmd: DebitCredits, uow: UnitOfWork) -> Debit:
    return run(uow, debit_change(cmd))


def debit_change(cmd: DebitCredits) -> Change[Debit]:
    values.account_id(cmd.account_id)
    amount = values.credits(cmd.amount)
    _check_metadata(cmd.metadata)

    def action(account: Account, now: datetime) -> Debit:
        return account.debit(amount=amount, now=now, origin=cmd.origin(), metadata=cmd.metadata)

    return Change(cmd, cmd.account_id, action, Debit)


def void_lot(cmd: VoidLot, uow: UnitOfWork) -> Lot:
    _check_id(cmd.lot_id, "lot", LotNotFound)

    def owner(uow: UnitOfWork) -> str:
        account_id = uow.accounts.account_of_lot(cmd.lot_id)
        if account_id is None:
            raise LotNotFound(lot_id=cmd.lot_id)
        return account_id

    def action(account: Account, now: datetime) -> Lot:
        return account.void_lot(cmd.lot_id, now, cmd.origin(cmd.reason))

    return run(uow, Change(cmd, owner, action, Lot, lot_ids=[cmd.lot_id]))


def claw_back(cmd: ClawBack, uow: UnitOfWork) -> list[Entry]:
    values.account_id(cmd.account_id)
    amount = values.credits(cmd.amount)

    def action(account: Account, now: datetime) -> list[Entry]:
        return account.clawback(
            amount=amount, now=now, origin=cmd.origin(cmd.reason), lot_id=cmd.lot_id
        )

    lot_ids = [cmd.lot_id] if cmd.lot_id else []
    return run(uow, Change(cmd, cmd.account_id, action, list[Entry], lot_ids=lot_ids))


def adjust(cmd: Adjust, uow: UnitOfWork) -> list[Entry]:
    values.account_id(cmd.account_id)
    if isinstance(cmd.delta, bool) or not isinstance(cmd.delta, int):
        raise InvalidInput("delta must be an integer")
    values.credits(abs(cmd.delta) or 1, field="delta")

    def action(account: Account, now: datetime) -> list[Entry]:
        return account.adjust(delta=cmd.delta, now=now, origin=cmd.origin(cmd.reason))

    return run(uow, Change(cmd, cmd.account_id, action, list[Entry]))


def put_account(account_id: str, email: str | None, uow: UnitOfWork) -> Account:
    """Create the account if new and set its email. Naturally idempotent."""
    values.account_id(account_id)
    if email is not None:
        email = values.email(email)
    with uow:
        account = uow.accounts.get_for_update(account_id, create_at=uow.clock())
        assert account is not None
        account.change_email(email)
        uow.accounts.save(account)
        uow.commit()
    return account


def get_balance(account_id: str, uow: UnitOfWork, at: datetime | None = None) -> Balance:
    """Balance now from the projection (constant time), or at a past instant from the journal."""
    values.account_id(account_id)
    with uow.read_only():
        now = uow.clock()
        if at is not None and at > now:
            raise InvalidTime("at must not be in the future")
        account = uow.accounts.get(account_id)
        if account is None:
            raise AccountNotFound(account_id=account_id)
        if at is None:
            return account.balance(now)
        history = uow.journal.history(account_id, at)
    return account_at(account_id, history.lots, history.holds, history.entries, at).balance(at)


@dataclass(frozen=True)
class Page(Generic[T]):
    """One page of a list (docs/rules.md §3): at most `limit` items and whether more follow."""

    items: list[T]
    has_more: bool


def list_entries(
    account_id: str,
    uow: UnitOfWork,
    *,
    limit: int = 100,
    before_seq: int | None = None,
    starting_after: str | None = None,
) -> Page[Entry]:
    """The journal, newest first; a page starts after the entry `starting_after`."""
    values.account_id(account_id)
    _check_limit(limit)
    with uow.read_only():
        if uow.accounts.get(account_id) is None:
            raise AccountNotFound(account_id=account_id)
        if starting_after is not None:
            known = values.is_id(starting_after, "ent")  # never send the database junk
            before_seq = uow.journal.seq_of(account_id, starting_after) if known else None
            if before_seq is None:
                raise InvalidInput("starting_after names no entry of this account")
        found = uow.journal.entries(account_id, limit=limit + 1, before_seq=before_seq)
    return Page(found[:limit], len(found) > limit)


def list_lots(
    account_id: str, uow: UnitOfWork, *, limit: int = 100, starting_after: str | None = None
) -> tuple[Page[Lot], datetime]:
    """The account's lots, soonest spent first, and the instant they were read at."""
    values.account_id(account_id)
    _check_limit(limit)
    with uow.read_only():
        if uow.accounts.get(account_id) is None:
            raise AccountNotFound(account_id=account_id)
        if starting_after is not None and not values.is_id(starting_after, "lot"):
            # Never send the database junk (PostgreSQL refuses NUL characters outright).
            raise LotNotFound("starting_after names no lot of this account")
        found = uow.accounts.lots(account_id, limit=limit + 1, starting_after=starting_after)
        return Page(found[:limit], len(found) > limit), uow.clock()


def _check_limit(limit: int) -> None:
    if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= PAGE_MAX:
        raise InvalidInput(f"limit must be between 1 and {PAGE_MAX}")


def credit_totals(uow: UnitOfWork) -> dict[str, int]:
    with uow.read_only():
        return uow.journal.totals()


def ping(uow: UnitOfWork) -> None:
    """Raises DatabaseUnavailable unless the database answers a read."""
    with uow.read_only(snapshot=False):
        uow.accounts.get("healthz")  # one indexed read; the answer does not matter


def check(uow: UnitOfWork) -> AuditReport:
    """Rule 6 for every account, lot and hold, in one consistent snapshot."""
    with uow.read_only():
        return uow.audit.run(uow.clock())


def sweep(uow: UnitOfWork, *, batch_size: int = SWEEP_BATCH_SIZE) -> SweepResult:
    """Write down the holds and lots that time has expired, `batch_size` accounts per
    transaction so no lock is held for long."""
    assert 1 <= batch_size <= 10_000
    accounts_done = holds_expired = lots_expired = 0
    for _ in range(SWEEP_MAX_BATCHES):
        with uow:
            now = uow.clock()
            due = uow.accounts.due(now, batch_size)
            for account_id in due:
                account = uow.accounts.get_for_update(account_id)
                assert account is not None
                before = {h.id for h in account.holds.values() if h.status is HoldStatus.PENDING}
                account.settle(now)
                holds_expired += sum(
                    1 for h in before if account.holds[h].status is HoldStatus.EXPIRED
                )
                lots_expired += len(
                    {e.lot_id for e in account.new_entries if e.type is EntryType.EXPIRE}
                )
                uow.accounts.save(account)
            uow.commit()
        accounts_done += len(due)
        if len(due) < batch_size:
            break
    return SweepResult(accounts_done, holds_expired, lots_expired)


# --- the idempotent change ------------------------------------------------------------------


def _check_id(value: str, prefix: str, error: type[NotFound]) -> None:
    if not values.is_id(value, prefix):
        raise error(f"no {prefix} has this id", **{f"{prefix}_id": str(value)[:64]})


def _owner_of_hold(hold_id: str) -> Callable[[UnitOfWork], str]:
    def owner(uow: UnitOfWork) -> str:
        account_id = uow.accounts.account_of_hold(hold_id)
        if account_id is None:
            raise HoldNotFound(hold_id=hold_id)
        return account_id

    return owner


def _check_metadata(metadata: dict[str, Any] | None) -> None:
    if metadata is None:
        return
    if not isinstance(metadata, dict):
        raise InvalidInput("metadata must be an object")
    try:
        # Strict JSON that both databases store: no NaN or Infinity, no lone surrogates
        # (UnicodeEncodeError is a ValueError).
        text = json.dumps(metadata, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
        size = len(text.encode())
    except (TypeError, ValueError) as error:
        raise InvalidInput("metadata must be JSON") from error
    if size > METADATA_MAX_BYTES:
        raise InvalidInput(f"metadata is at most {METADATA_MAX_BYTES} bytes of JSON")
    if _has_nul(metadata):
        raise InvalidInput("metadata must not contain NUL characters")  # nor can PostgreSQL


def _has_nul(value: Any) -> bool:
    if isinstance(value, str):
        return "\x00" in value
    if isinstance(value, dict):
        return any(_has_nul(k) or _has_nul(v) for k, v in value.items())
    if isinstance(value, list):
        return any(_has_nul(v) for v in value)
    return False
