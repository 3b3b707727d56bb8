"""The account aggregate: lots, holds, debt and the journal entries that explain every change.

An `Account` is loaded with its lock held (a row lock on PostgreSQL, the single writer on
SQLite), changed only through its methods, and saved whole. Every method that moves credits
appends the entries that explain the move, so the projection (`Lot.remaining`, `Account.debt`)
and the journal can never disagree. See `tally.domain` for the invariants.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Final

from tally.domain.errors import (
    BalanceLimitExceeded,
    CaptureExceedsHold,
    HoldNotFound,
    HoldNotPending,
    InsufficientCredits,
    InvalidInput,
    InvalidTime,
    LotNotFound,
    LotVoided,
    TooManyPendingHolds,
)
from tally.domain.values import new_id

SOURCES: Final = ("purchase", "gift", "membership", "promotional", "support", "refund")
DEFAULT_HOLD_TTL_SECONDS: Final = 900
MAX_HOLD_TTL_SECONDS: Final = 86_400
#: Limit on open holds per account: loading an account reads them all, so they must be bounded.
MAX_PENDING_HOLDS: Final = 1_000
#: Priority is a small ordering integer, not a free-form number.
PRIORITY_RANGE: Final = range(-1_000_000, 1_000_001)
REASON_MAX_LENGTH: Final = 500
#: Most credits an account can hold (lots' remaining plus pending holds) and most it can owe:
#: every balance stays exact as a JSON number (a double), and no per-account sum nears 2^63.
MAX_ACCOUNT_CREDITS: Final = 2**53
_END_OF_TIME: Final = datetime.max.replace(tzinfo=UTC)


class EntryType(enum.StrEnum):
    GRANT = "grant"
    HOLD = "hold"
    CAPTURE = "capture"
    RELEASE = "release"
    DEBIT = "debit"
    EXPIRE = "expire"
    VOID = "void"
    CLAWBACK = "clawback"
    ADJUSTMENT = "adjustment"


class HoldStatus(enum.StrEnum):
    PENDING = "pending"
    CAPTURED = "captured"
    RELEASED = "released"
    EXPIRED = "expired"


@dataclass(frozen=True)
class Origin:
    """Who asked for a change, and under which idempotency key: stamped on every entry."""

    idempotency_key: str | None = None
    platform_id: str | None = None
    reason: str | None = None


SYSTEM: Final = Origin(reason="system")


@dataclass
class Lot:
    id: str
    account_id: str
    source: str
    amount: int
    remaining: int
    expires_at: datetime | None
    priority: int
    created_at: datetime
    voided_at: datetime | None = None
    reason: str | None = None
    metadata: dict[str, Any] | None = None
    #: The platform that granted it (None: Tally itself, the operator's CLI).
    platform_id: str | None = None

    def is_expired(self, now: datetime) -> bool:
        """Rule 2: a lot stops counting at `expires_at`, whether or not the sweep has run."""
        return self.expires_at is not None and self.expires_at <= now

    def is_live(self, now: datetime) -> bool:
        return self.voided_at is None and not self.is_expired(now)

    def spending_key(self) -> tuple[bool, datetime, int, datetime, str]:
        """Rule 3: soonest expiry first (never last), then priority ascending, then oldest."""
        return (
            self.expires_at is None,
            self.expires_at or _END_OF_TIME,
            self.priority,
            self.created_at,
            self.id,
        )


@dataclass(frozen=True)
class Allocation:
    lot_id: str
    amount: int


@dataclass
class Hold:
    id: str
    account_id: str
    amount: int
    status: HoldStatus
    expires_at: datetime
    created_at: datetime
    allocations: list[Allocation]
    captured: int = 0
    metadata: dict[str, Any] | None = None
    # When placed as `{tool, quantity}`: the tool and how many units the amount pays for, so a
    # capture can be asked in units at the price the hold was placed at.
    tool: str | None = None
    quantity: int | None = None
    #: The platform that placed it: only that platform may capture or release it.
    platform_id: str | None = None

    def credits_for(self, units: int) -> int:
        """What `units` of the hold's tool cost at the hold's own price."""
        if self.tool is None or self.quantity is None:
            raise InvalidInput("this hold was placed by amount: capture an amount")
        return self.amount // self.quantity * units

    def is_lapsed(self, now: datetime) -> bool:
        """A pending hold past its TTL counts as released at once; the sweep records it."""
        return self.status is HoldStatus.PENDING and self.expires_at <= now

    def status_at(self, now: datetime) -> HoldStatus:
        return HoldStatus.EXPIRED if self.is_lapsed(now) else self.status


@dataclass(frozen=True)
class Entry:
    """One immutable journal row. `amount` is positive, except for `adjustment`, where it is
    the signed change to what the account has (see `tally.domain` for the sign rules)."""

    id: str
    account_id: str
    seq: int
    type: EntryType
    amount: int
    lot_id: str | None
    hold_id: str | None
    created_at: datetime
    idempotency_key: str | None
    platform_id: str | None
    reason: str | None
    metadata: dict[str, Any] | None = None


@dataclass(frozen=True)
class NextExpiry:
    at: datetime
    amount: int


@dataclass(frozen=True)
class Balance:
    account_id: str
    available: int
    held: int
    debt: int
    allowances: dict[str, int]
    next_expiry: NextExpiry | None


@dataclass(frozen=True)
class Debit:
    """The outcome of a one-step spend: its allocations and the ids of the entries it wrote,
    one per lot touched (the first id names the debit)."""

    id: str
    account_id: str
    amount: int
    created_at: datetime
    allocations: list[Allocation]
    entry_ids: list[str]


def allocate(lots: list[Lot], amount: int, now: datetime) -> list[Allocation]:
    """Rule 3: take `amount` from live lots in spending order, or refuse the whole amount."""
    assert amount > 0
    spendable = sorted(
        (lot for lot in lots if lot.remaining > 0 and lot.is_live(now)),
        key=Lot.spending_key,
    )
    available = sum(lot.remaining for lot in spendable)
    if available < amount:
        raise InsufficientCredits(available=available, required=amount)
    allocations = []
    wanted = amount
    for lot in spendable:
        take = min(wanted, lot.remaining)
        allocations.append(Allocation(lot.id, take))
        wanted -= take
        if wanted == 0:
            break
    assert sum(a.amount for a in allocations) == amount
    return allocations


def check_reason(reason: str | None) -> str | None:
    if reason is not None and len(reason) > REASON_MAX_LENGTH:
        raise InvalidInput(f"reason is at most {REASON_MAX_LENGTH} characters")
    if reason is not None and "\x00" in reason:
        raise InvalidInput("reason must not contain NUL characters")  # PostgreSQL cannot store it
    return reason


@dataclass
class Account:
    """One person's wallet with the lots and pending holds that its next change can touch."""

    account_id: str
    email: str | None
    debt: int
    entry_seq: int
    created_at: datetime
    #: Holds still `pending` in the database (lapsed or not): lets a load skip the holds query.
    pending_holds: int = 0
    lots: dict[str, Lot] = field(default_factory=dict)
    holds: dict[str, Hold] = field(default_factory=dict)
    # What changed since load, for the repository to write.
    new_lots: list[Lot] = field(default_factory=list)
    changed_lot_ids: set[str] = field(default_factory=set)
    new_holds: list[Hold] = field(default_factory=list)
    changed_hold_ids: set[str] = field(default_factory=set)
    new_entries: list[Entry] = field(default_factory=list)
    is_new: bool = False
    email_changed: bool = False

    # --- reading ------------------------------------------------------------------------

    def balance(self, now: datetime) -> Balance:
        """Available, held and debt at `now`, counting lapsed holds as released and expired
        lots as zero even when no sweep has written it down yet (rules 2 and 7)."""
        returned: dict[str, int] = {}
        held = 0
        for hold in self.holds.values():
            if hold.status is not HoldStatus.PENDING:
                continue
            if hold.is_lapsed(now):
                for allocation in hold.allocations:
                    returned[allocation.lot_id] = (
                        returned.get(allocation.lot_id, 0) + allocation.amount
                    )
            else:
                held += hold.amount
        available = 0
        by_expiry: dict[datetime, int] = {}
        for lot in self.lots.values():
            if not lot.is_live(now):
                continue
            usable = lot.remaining + returned.get(lot.id, 0)
            available += usable
            if lot.expires_at is not None and usable > 0:
                by_expiry[lot.expires_at] = by_expiry.get(lot.expires_at, 0) + usable
        next_expiry = None
        if by_expiry:
            soonest = min(by_expiry)
            next_expiry = NextExpiry(at=soonest, amount=by_expiry[soonest])
        assert available >= 0
        assert held >= 0
        assert self.debt >= 0
        return Balance(self.account_id, available, held, self.debt, {}, next_expiry)

    def lots_in_spending_order(self, now: datetime) -> list[Lot]:
        return sorted(
            (lot for lot in self.lots.values() if lot.remaining > 0 and lot.is_live(now)),
            key=Lot.spending_key,
        )

    def credits_total(self) -> int:
        """What the account has: its lots' remaining plus its pending holds (available
        plus held, counting what time has not yet been written down)."""
        pending = (h.amount for h in self.holds.values() if h.status is HoldStatus.PENDING)
        return sum(lot.remaining for lot in self.lots.values()) + sum(pending)

    # --- settling what time has already decided -----------------------------------------

    def settle(self, now: datetime) -> None:
        """Write down what time decided: lapsed holds give their credits back (`expired`),
        then lots past `expires_at` lose what remains. Idempotent."""
        for hold in list(self.holds.values()):
            if hold.is_lapsed(now):
                self._give_back(hold, hold.allocations, now, SYSTEM)
                hold.status = HoldStatus.EXPIRED
                self._hold_changed(hold)
        for lot in self.lots.values():
            if lot.remaining > 0 and lot.is_expired(now):
                self._take(lot, lot.remaining, EntryType.EXPIRE, now, SYSTEM)

    # --- changing -------------------------------------------------------------------------

    def grant(
        self,
        *,
        amount: int,
        source: str,
        expires_at: datetime | None,
        priority: int,
        now: datetime,
        origin: Origin,
        metadata: dict[str, Any] | None = None,
    ) -> Lot:
        """Add a lot; rule 8: outstanding debt is repaid from it first, in the same change."""
        if source not in SOURCES:
            raise InvalidInput(f"source must be one of {', '.join(SOURCES)}", source=source)
        if priority not in PRIORITY_RANGE:
            raise InvalidInput("priority must be between -1000000 and 1000000")
        if expires_at is not None and expires_at <= now:
            raise InvalidTime("expires_at must be in the future")
        check_reason(origin.reason)
        repaid = min(self.debt, amount)
        total = self.credits_total()
        if total + amount - repaid > MAX_ACCOUNT_CREDITS:
            raise BalanceLimitExceeded(
                f"an account holds at most {MAX_ACCOUNT_CREDITS} credits: it has {total}",
                limit=MAX_ACCOUNT_CREDITS,
                total=total,
                requested=amount,
            )
        lot = Lot(
            id=new_id("lot", now),
            account_id=self.account_id,
            source=source,
            amount=amount,
            remaining=amount,
            expires_at=expires_at,
            priority=priority,
            created_at=now,
            reason=origin.reason,
            metadata=metadata,
            platform_id=origin.platform_id,
        )
        self.lots[lot.id] = lot
        self.new_lots.append(lot)
        self._record(EntryType.GRANT, amount, now, origin, lot_id=lot.id, metadata=metadata)
        if repaid > 0:
            repayment = Origin(origin.idempotency_key, origin.platform_id, "debt repayment")
            self._take(lot, repaid, EntryType.ADJUSTMENT, now, repayment)
            self.debt -= repaid
            self._record(EntryType.ADJUSTMENT, repaid, now, repayment)
        return lot

    def place_hold(
        self,
        *,
        amount: int,
        ttl_seconds: int,
        now: datetime,
        origin: Origin,
        metadata: dict[str, Any] | None = None,
        tool: str | None = None,
        quantity: int | None = None,
    ) -> Hold:
        """Reserve credits for a job: they leave their lots now and return if released."""
        assert (tool is None) == (quantity is None)
        assert quantity is None or (quantity > 0 and amount % quantity == 0)
        if not 1 <= ttl_seconds <= MAX_HOLD_TTL_SECONDS:
            raise InvalidInput(f"ttl_seconds must be between 1 and {MAX_HOLD_TTL_SECONDS}")
        if self.pending_holds >= MAX_PENDING_HOLDS:
            raise TooManyPendingHolds(limit=MAX_PENDING_HOLDS)
        allocations = allocate(list(self.lots.values()), amount, now)
        hold = Hold(
            id=new_id("hold", now),
            account_id=self.account_id,
            amount=amount,
            status=HoldStatus.PENDING,
            expires_at=now + timedelta(seconds=ttl_seconds),
            created_at=now,
            allocations=allocations,
            metadata=metadata,
            tool=tool,
            quantity=quantity,
            platform_id=origin.platform_id,
        )
        for allocation in allocations:
            lot = self.lots[allocation.lot_id]
            self._take(lot, allocation.amount, EntryType.HOLD, now, origin, hold_id=hold.id)
        self.holds[hold.id] = hold
        self.new_holds.append(hold)
        self.pending_holds += 1
        return hold

    def capture(self, hold_id: str, amount: int | None, now: datetime, origin: Origin) -> Hold:
        """Rule 7: keep `amount` (default all) of a pending hold; the rest returns to the
        same lots. The soonest-spent lots keep the captured part."""
        hold = self._pending_hold(hold_id, now, origin)
        amount = hold.amount if amount is None else amount
        if amount > hold.amount:
            raise CaptureExceedsHold(held=hold.amount, requested=amount)
        captured: list[Allocation] = []
        returned: list[Allocation] = []
        wanted = amount
        for allocation in hold.allocations:
            take = min(wanted, allocation.amount)
            wanted -= take
            if take:
                captured.append(Allocation(allocation.lot_id, take))
            if allocation.amount - take:
                returned.append(Allocation(allocation.lot_id, allocation.amount - take))
        for allocation in captured:
            self._record(
                EntryType.CAPTURE,
                allocation.amount,
                now,
                origin,
                lot_id=allocation.lot_id,
                hold_id=hold.id,
            )
        self._give_back(hold, returned, now, origin)
        hold.status = HoldStatus.CAPTURED
        hold.captured = amount
        self._hold_changed(hold)
        assert sum(a.amount for a in captured) == amount
        assert sum(a.amount for a in captured) + sum(a.amount for a in returned) == hold.amount
        return hold

    def release(self, hold_id: str, now: datetime, origin: Origin) -> Hold:
        """Rule 7: a failed job's hold goes back in full to the lots it came from."""
        hold = self._pending_hold(hold_id, now, origin)
        check_reason(origin.reason)
        self._give_back(hold, hold.allocations, now, origin)
        hold.status = HoldStatus.RELEASED
        self._hold_changed(hold)
        return hold

    def debit(
        self,
        *,
        amount: int,
        now: datetime,
        origin: Origin,
        metadata: dict[str, Any] | None = None,
    ) -> Debit:
        """A hold and its full capture in one step: one `debit` entry per lot touched, each
        with the caller's metadata."""
        allocations = allocate(list(self.lots.values()), amount, now)
        entries = [
            self._take(
                self.lots[a.lot_id], a.amount, EntryType.DEBIT, now, origin, metadata=metadata
            )
            for a in allocations
        ]
        return Debit(
            id=entries[0].id,
            account_id=self.account_id,
            amount=amount,
            created_at=now,
            allocations=allocations,
            entry_ids=[entry.id for entry in entries],
        )

    def void_lot(self, lot_id: str, now: datetime, origin: Origin) -> Lot:
        """Cancel what remains of a lot; credits held from it are voided when released."""
        lot = self.lots.get(lot_id)
        if lot is None:
            raise LotNotFound(lot_id=lot_id)
        if lot.voided_at is not None:
            raise LotVoided(lot_id=lot_id)
        check_reason(origin.reason)
        lot.voided_at = now
        self.changed_lot_ids.add(lot.id)
        if lot.remaining > 0:
            self._take(lot, lot.remaining, EntryType.VOID, now, origin)
        return lot

    def clawback(
        self, *, amount: int, now: datetime, origin: Origin, lot_id: str | None = None
    ) -> list[Entry]:
        """Take credits back (a chargeback, a correction). What the lots no longer have
        becomes debt (rule 8). With `lot_id`, only that lot is taken from."""
        check_reason(origin.reason)
        return self._take_or_owe(amount, EntryType.CLAWBACK, now, origin, lot_id)

    def adjust(self, *, delta: int, now: datetime, origin: Origin) -> list[Entry]:
        """A support correction. Negative: credits are taken, the shortfall becomes debt.
        Positive: forgives debt; it never creates credits (that is a grant)."""
        check_reason(origin.reason)
        if delta == 0:
            raise InvalidInput("an adjustment must change something")
        if delta < 0:
            return self._take_or_owe(-delta, EntryType.ADJUSTMENT, now, origin, None)
        if delta > self.debt:
            raise InvalidInput(
                "a positive adjustment only forgives debt; use a grant to add credits",
                debt=self.debt,
            )
        self.debt -= delta
        return [self._record(EntryType.ADJUSTMENT, delta, now, origin)]

    def change_email(self, email: str | None) -> None:
        if email != self.email:
            self.email = email
            self.email_changed = True

    # --- internals ------------------------------------------------------------------------

    def _take_or_owe(
        self, amount: int, kind: EntryType, now: datetime, origin: Origin, lot_id: str | None
    ) -> list[Entry]:
        if lot_id is not None:
            if lot_id not in self.lots:
                raise LotNotFound(lot_id=lot_id)
            lots = [self.lots[lot_id]] if self.lots[lot_id].is_live(now) else []
        else:
            lots = self.lots_in_spending_order(now)
        taken: list[tuple[Lot, int]] = []
        wanted = amount
        for lot in lots:
            take = min(wanted, lot.remaining)
            if take:
                taken.append((lot, take))
                wanted -= take
            if wanted == 0:
                break
        if self.debt + wanted > MAX_ACCOUNT_CREDITS:
            raise BalanceLimitExceeded(
                f"an account owes at most {MAX_ACCOUNT_CREDITS} credits: it owes {self.debt}",
                limit=MAX_ACCOUNT_CREDITS,
                debt=self.debt,
                owed=wanted,
            )
        entries = [self._take(lot, take, kind, now, origin) for lot, take in taken]
        if wanted:
            self.debt += wanted
            # Credits already gone: the account now owes them. Clawback entries count owed
            # credits as positive; adjustment entries are signed changes, so owing is negative.
            owed = wanted if kind is EntryType.CLAWBACK else -wanted
            entries.append(self._record(kind, owed, now, origin))
        return entries

    def hold(self, hold_id: str, origin: Origin) -> Hold:
        """The hold, if `origin` may act on it. Platforms are isolated: a hold placed by
        another platform answers exactly as one that does not exist, so its id tells nothing
        and lets nothing be done. Tally itself (no platform: the operator's CLI) reaches all."""
        found = self.holds.get(hold_id)
        if found is None or (
            origin.platform_id is not None and origin.platform_id != found.platform_id
        ):
            raise HoldNotFound(hold_id=hold_id)
        return found

    def _pending_hold(self, hold_id: str, now: datetime, origin: Origin) -> Hold:
        hold = self.hold(hold_id, origin)
        status = hold.status_at(now)
        if status is not HoldStatus.PENDING:
            raise HoldNotPending(
                f"hold is {status.value}", hold_id=hold_id, hold_status=status.value
            )
        return hold

    def _give_back(
        self, hold: Hold, allocations: list[Allocation], now: datetime, origin: Origin
    ) -> None:
        """Return held credits to their lots; a lot voided or expired meanwhile loses them
        again at once, so nothing spends credits of a dead lot."""
        for allocation in allocations:
            lot = self.lots[allocation.lot_id]
            lot.remaining += allocation.amount
            assert lot.remaining <= lot.amount
            self.changed_lot_ids.add(lot.id)
            self._record(
                EntryType.RELEASE,
                allocation.amount,
                now,
                origin,
                lot_id=lot.id,
                hold_id=hold.id,
            )
            if lot.voided_at is not None:
                self._take(lot, allocation.amount, EntryType.VOID, now, SYSTEM)
            elif lot.is_expired(now):
                self._take(lot, allocation.amount, EntryType.EXPIRE, now, SYSTEM)

    def _take(
        self,
        lot: Lot,
        amount: int,
        kind: EntryType,
        now: datetime,
        origin: Origin,
        *,
        hold_id: str | None = None,
        metadata: dict[str, Any] | None = None,
    ) -> Entry:
        assert 0 < amount <= lot.remaining, (amount, lot.remaining)
        lot.remaining -= amount
        self.changed_lot_ids.add(lot.id)
        signed = -amount if kind is EntryType.ADJUSTMENT else amount
        return self._record(
            kind, signed, now, origin, lot_id=lot.id, hold_id=hold_id, metadata=metadata
        )

    def _hold_changed(self, hold: Hold) -> None:
        """Called once per hold when it leaves `pending`."""
        assert hold.status is not HoldStatus.PENDING
        self.changed_hold_ids.add(hold.id)
        self.pending_holds -= 1
        assert self.pending_holds >= 0

    def _record(
        self,
        kind: EntryType,
        amount: int,
        now: datetime,
        origin: Origin,
        *,
        lot_id: str | None = None,
        hold_id: str | None = None,
        metadata: dict[str, Any] | None = None,
    ) -> Entry:
        assert amount != 0
        assert amount > 0 or kind is EntryType.ADJUSTMENT
        self.entry_seq += 1
        entry = Entry(
            id=new_id("ent", now),
            account_id=self.account_id,
            seq=self.entry_seq,
            type=kind,
            amount=amount,
            lot_id=lot_id,
            hold_id=hold_id,
            created_at=now,
            idempotency_key=origin.idempotency_key,
            platform_id=origin.platform_id,
            reason=origin.reason,
            metadata=metadata,
        )
        self.new_entries.append(entry)
        return entry


# --- reading the journal ------------------------------------------------------------------

_TAKES_FROM_LOT: Final = frozenset(
    {EntryType.HOLD, EntryType.DEBIT, EntryType.EXPIRE, EntryType.VOID, EntryType.CLAWBACK}
)


def lot_effect(entry: Entry) -> int:
    """How an entry changed its lot's `remaining` (see the sign table in `tally.domain`)."""
    if entry.lot_id is None or entry.type is EntryType.CAPTURE:
        return 0
    if entry.type in _TAKES_FROM_LOT:
        return -entry.amount
    return entry.amount  # grant, release, adjustment (signed)


def debt_effect(entry: Entry) -> int:
    """How an entry changed the account's debt."""
    if entry.lot_id is not None:
        return 0
    if entry.type is EntryType.CLAWBACK:
        return entry.amount
    if entry.type is EntryType.ADJUSTMENT:
        return -entry.amount
    return 0


def account_at(
    account_id: str, lots: list[Lot], holds: list[Hold], entries: list[Entry], at: datetime
) -> Account:
    """Rebuild an account as it stood at `at` from the journal (entries up to `at`)."""
    remaining: dict[str, int] = {}
    debt = 0
    pending: dict[tuple[str, str], int] = {}
    for entry in entries:
        assert entry.created_at <= at
        if entry.lot_id is not None:
            remaining[entry.lot_id] = remaining.get(entry.lot_id, 0) + lot_effect(entry)
        debt += debt_effect(entry)
        if entry.hold_id is not None and entry.lot_id is not None:
            key = (entry.hold_id, entry.lot_id)
            change = entry.amount if entry.type is EntryType.HOLD else -entry.amount
            pending[key] = pending.get(key, 0) + change
    account = Account(account_id, None, debt, len(entries), at)
    for lot in lots:
        voided = lot.voided_at if lot.voided_at is not None and lot.voided_at <= at else None
        account.lots[lot.id] = Lot(
            id=lot.id,
            account_id=lot.account_id,
            source=lot.source,
            amount=lot.amount,
            remaining=remaining.get(lot.id, 0),
            expires_at=lot.expires_at,
            priority=lot.priority,
            created_at=lot.created_at,
            voided_at=voided,
        )
    for hold in holds:
        allocations = [
            Allocation(a.lot_id, pending.get((hold.id, a.lot_id), 0)) for a in hold.allocations
        ]
        if any(a.amount for a in allocations):
            account.holds[hold.id] = Hold(
                id=hold.id,
                account_id=hold.account_id,
                amount=sum(a.amount for a in allocations),
                status=HoldStatus.PENDING,
                expires_at=hold.expires_at,
                created_at=hold.created_at,
                allocations=[a for a in allocations if a.amount],
            )
    return account
