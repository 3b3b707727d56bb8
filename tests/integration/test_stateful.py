"""A hypothesis state machine drives the ledger and a deliberately simple model side by side.

Three accounts per example; every change the ledger offers (grants with a validity or an
absolute expiry, holds by amount or by units, partial captures, releases, debits, voids,
clawbacks of an account or of one lot, adjustments both ways, debt and its repayment, sweeps,
replays and reused keys), each run directly, through the group commit alone, or in a batch
of up to seven changes that share one transaction; the clock jumps, and stops at exact
expiry instants. After every step the balances, lots and
holds of each account must equal the model's, and `tally check`'s audit must pass.

A batch keeps every change's meaning (service/group_commit.py): changes apply in order; one
that is refused in the batch, whose key repeats, or whose account does not exist yet, runs
alone after it; if the shared transaction fails (a key stored before), every change runs
alone. Changes run alone after a batch are let through in batch order, one of the orders
real callers may take, so that the model can follow.
"""

from __future__ import annotations

import copy
import secrets
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from functools import partial
from typing import Any

import pytest
from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    rule,
    run_state_machine_as_test,
)

from tally.adapters.db.engine import Database
from tally.adapters.db.uow import SqlUnitOfWork
from tally.domain import values
from tally.domain.errors import (
    AccountNotFound,
    CaptureExceedsHold,
    HoldNotFound,
    HoldNotPending,
    IdempotencyKeyReused,
    InsufficientCredits,
    InvalidInput,
    InvalidTime,
    LotNotFound,
    LotVoided,
    TallyError,
)
from tally.domain.model import Debit, Entry, EntryType, Hold, HoldStatus, Lot, NextExpiry
from tally.service import ledger
from tally.service.changes import Command
from tally.service.group_commit import GroupCommit
from tests.support import FakeClock, one_batch

FAR = datetime.max.replace(tzinfo=UTC)
ACCOUNTS = 3
VALIDITIES = [None, None, "PT1H", "P1D", "P30D", "midnight", "midnight", "next midnight", "past"]
#: How often each kind of change is drawn; replays and reused keys last (none before a success).
KINDS = (
    ["grant"] * 4
    + ["hold"] * 3
    + ["capture"] * 3
    + ["release", "void"]
    + ["debit"] * 3
    + ["clawback"] * 2
    + ["adjust"] * 2
    + ["replay", "reuse"]
)
DURATIONS = {"PT1H": timedelta(hours=1), "P1D": timedelta(days=1), "P30D": timedelta(days=30)}

# --- the model --------------------------------------------------------------------------------


@dataclass
class ModelLot:
    id: str
    account: str
    amount: int
    remaining: int
    expires_at: datetime | None
    priority: int
    created_at: datetime
    voided: bool = False

    def live(self, now: datetime) -> bool:
        return not self.voided and (self.expires_at is None or self.expires_at > now)

    def order(self) -> tuple[datetime, int, datetime, str]:
        """Soonest expiry (never last), then priority, then oldest, then id."""
        return (self.expires_at or FAR, self.priority, self.created_at, self.id)


@dataclass
class ModelHold:
    id: str
    account: str
    amount: int
    allocations: list[tuple[str, int]]
    expires_at: datetime
    quantity: int | None
    status: str = "pending"


@dataclass
class Model:
    debt: dict[str, int] = field(default_factory=dict)  # one item per existing account
    lots: dict[str, ModelLot] = field(default_factory=dict)
    holds: dict[str, ModelHold] = field(default_factory=dict)
    #: Successful changes by idempotency key: the command and the ledger's answer.
    stored: dict[str, tuple[Command, Any]] = field(default_factory=dict)
    dry_ids: int = 0

    def exists(self, account: str) -> None:
        if account not in self.debt:
            raise AccountNotFound(account_id=account)

    def new_id(self, prefix: str, result: Any) -> str:
        """The id the ledger gave, or one made up when the model runs on its own."""
        if result is not None:
            found: str = result.id
            return found
        self.dry_ids += 1
        return f"{prefix}_dry{self.dry_ids:06}"

    def give_back(self, lot_id: str, amount: int, now: datetime) -> None:
        lot = self.lots[lot_id]
        if lot.live(now):
            lot.remaining += amount

    def settle(self, now: datetime) -> None:
        for hold in self.holds.values():
            if hold.status == "pending" and hold.expires_at <= now:
                hold.status = "expired"
                for lot_id, amount in hold.allocations:
                    self.give_back(lot_id, amount, now)
        for lot in self.lots.values():
            if not lot.live(now):
                lot.remaining = 0

    def spendable(self, account: str, now: datetime) -> list[ModelLot]:
        return sorted(
            (
                lot
                for lot in self.lots.values()
                if lot.account == account and lot.live(now) and lot.remaining
            ),
            key=ModelLot.order,
        )

    def available(self, account: str, now: datetime) -> int:
        return sum(lot.remaining for lot in self.spendable(account, now))

    def held(self, account: str) -> int:
        return sum(
            h.amount for h in self.holds.values() if h.account == account and h.status == "pending"
        )

    def next_expiry(self, account: str, now: datetime) -> NextExpiry | None:
        dated = [lot for lot in self.spendable(account, now) if lot.expires_at is not None]
        if not dated:
            return None
        soonest = min(lot.expires_at for lot in dated if lot.expires_at is not None)
        return NextExpiry(soonest, sum(lot.remaining for lot in dated if lot.expires_at == soonest))

    def take(self, account: str, amount: int, now: datetime) -> list[tuple[str, int]]:
        available = self.available(account, now)
        if available < amount:
            raise InsufficientCredits(available=available, required=amount)
        taken = []
        for lot in self.spendable(account, now):
            part = min(amount, lot.remaining)
            lot.remaining -= part
            amount -= part
            taken.append((lot.id, part))
            if amount == 0:
                break
        return taken

    def take_or_owe(
        self, account: str, amount: int, lot_id: str | None, now: datetime
    ) -> tuple[list[tuple[str, int]], int]:
        if lot_id is None:
            lots = self.spendable(account, now)
        else:
            lot = self.lots[lot_id]
            lots = [lot] if lot.live(now) else []
        taken = []
        for lot in lots:
            part = min(amount, lot.remaining)
            if part:
                lot.remaining -= part
                amount -= part
                taken.append((lot.id, part))
        self.debt[account] += amount
        return taken, amount

    def balance(self, account: str, now: datetime) -> tuple[int, int, int, NextExpiry | None]:
        return (
            self.available(account, now),
            self.held(account),
            self.debt[account],
            self.next_expiry(account, now),
        )


Apply = Callable[[Any], None]
Expected = list[tuple[str | None, int, EntryType]]


def two_years_after(now: datetime) -> datetime:
    try:
        return now.replace(year=now.year + 2)
    except ValueError:  # 29 February
        return now.replace(year=now.year + 2, day=28)


def entries_of(result: list[Entry]) -> list[tuple[str | None, int, EntryType]]:
    return [(e.lot_id, e.amount, e.type) for e in result]


# --- the changes ------------------------------------------------------------------------------


@dataclass
class Op:
    """One change: how to ask the ledger, and what the model expects of it."""

    cmd: Any

    def call(self, uow: SqlUnitOfWork) -> Any:
        raise NotImplementedError

    def owner(self, m: Model) -> str:
        """The account the change is to; raises like the ledger when it names nothing."""
        account: str = self.cmd.account_id
        return account

    def expect(self, m: Model, now: datetime) -> Apply:
        """Raise the refusal the ledger must answer, or change the model and return what
        checks the ledger's answer (None when the model runs on its own)."""
        raise NotImplementedError

    def changed(self) -> Op:
        """The same change with a different request under the same key."""
        return type(self)(replace(self.cmd, reason="changed"))


class Grant(Op):
    def call(self, uow: SqlUnitOfWork) -> Lot:
        return ledger.grant(self.cmd, uow)

    def expect(self, m: Model, now: datetime) -> Apply:
        cmd: ledger.GrantCredits = self.cmd
        expires_at = cmd.expires_at
        if expires_at is not None and expires_at <= now:
            raise InvalidTime
        if cmd.valid_for is not None:
            expires_at = now + DURATIONS[cmd.valid_for]
        elif expires_at is None and cmd.source == "purchase":
            expires_at = two_years_after(now)  # the default validity, P2Y
        repaid = min(m.debt.get(cmd.account_id, 0), cmd.amount)
        m.debt[cmd.account_id] = m.debt.get(cmd.account_id, 0) - repaid

        def apply(lot: Lot | None) -> None:
            lot_id = m.new_id("lot", lot)
            m.lots[lot_id] = model = ModelLot(
                lot_id,
                cmd.account_id,
                cmd.amount,
                cmd.amount - repaid,
                expires_at,
                cmd.priority,
                now,
            )
            if lot is not None:
                assert (lot.account_id, lot.amount, lot.remaining, lot.source) == (
                    cmd.account_id,
                    cmd.amount,
                    model.remaining,
                    cmd.source,
                )
                assert (lot.expires_at, lot.priority, lot.created_at) == (
                    expires_at,
                    cmd.priority,
                    now,
                )

        return apply


class PlaceHold(Op):
    def call(self, uow: SqlUnitOfWork) -> Hold:
        return ledger.place_hold(self.cmd, uow)

    def expect(self, m: Model, now: datetime) -> Apply:
        cmd: ledger.PlaceHold = self.cmd
        if cmd.quantity is not None and cmd.amount % cmd.quantity:
            raise InvalidInput
        m.exists(cmd.account_id)
        allocations = m.take(cmd.account_id, cmd.amount, now)

        def apply(hold: Hold | None) -> None:
            hold_id = m.new_id("hold", hold)
            expires_at = now + timedelta(seconds=cmd.ttl_seconds)
            m.holds[hold_id] = ModelHold(
                hold_id, cmd.account_id, cmd.amount, allocations, expires_at, cmd.quantity
            )
            if hold is not None:
                assert [(a.lot_id, a.amount) for a in hold.allocations] == allocations
                assert (hold.status, hold.amount, hold.expires_at, hold.quantity) == (
                    HoldStatus.PENDING,
                    cmd.amount,
                    expires_at,
                    cmd.quantity,
                )

        return apply

    def changed(self) -> Op:
        return PlaceHold(replace(self.cmd, metadata={"changed": True}))


class HoldChange(Op):
    def owner(self, m: Model) -> str:
        if self.cmd.hold_id not in m.holds:
            raise HoldNotFound(hold_id=self.cmd.hold_id)
        return m.holds[self.cmd.hold_id].account


class Capture(HoldChange):
    def call(self, uow: SqlUnitOfWork) -> Hold:
        return ledger.capture(self.cmd, uow)

    def expect(self, m: Model, now: datetime) -> Apply:
        cmd: ledger.CaptureHold = self.cmd
        if cmd.amount is not None and cmd.quantity is not None:
            raise InvalidInput  # refused before the hold is looked up
        self.owner(m)
        hold = m.holds[cmd.hold_id]
        wanted = cmd.amount
        if cmd.quantity is not None:
            if hold.quantity is None:
                raise InvalidInput
            wanted = hold.amount // hold.quantity * cmd.quantity
        if hold.status != "pending":
            raise HoldNotPending(hold_id=hold.id, hold_status=hold.status)
        keep = hold.amount if wanted is None else wanted
        if keep > hold.amount:
            raise CaptureExceedsHold(held=hold.amount, requested=keep)
        hold.status = "captured"
        for lot_id, allocated in hold.allocations:
            kept = min(keep, allocated)
            keep -= kept
            if allocated - kept:
                m.give_back(lot_id, allocated - kept, now)
        captured = hold.amount if wanted is None else wanted

        def apply(result: Hold | None) -> None:
            if result is not None:
                assert (result.id, result.status, result.captured) == (
                    hold.id,
                    HoldStatus.CAPTURED,
                    captured,
                )

        return apply

    def changed(self) -> Op:
        amount = 1 if self.cmd.amount is None else self.cmd.amount + 1
        return Capture(replace(self.cmd, amount=amount, quantity=None))


class Release(HoldChange):
    def call(self, uow: SqlUnitOfWork) -> Hold:
        return ledger.release(self.cmd, uow)

    def expect(self, m: Model, now: datetime) -> Apply:
        self.owner(m)
        hold = m.holds[self.cmd.hold_id]
        if hold.status != "pending":
            raise HoldNotPending(hold_id=hold.id, hold_status=hold.status)
        hold.status = "released"
        for lot_id, allocated in hold.allocations:
            m.give_back(lot_id, allocated, now)

        def apply(result: Hold | None) -> None:
            if result is not None:
                assert (result.id, result.status) == (hold.id, HoldStatus.RELEASED)

        return apply


class DebitOp(Op):
    def call(self, uow: SqlUnitOfWork) -> Debit:
        return ledger.debit(self.cmd, uow)

    def expect(self, m: Model, now: datetime) -> Apply:
        m.exists(self.cmd.account_id)
        allocations = m.take(self.cmd.account_id, self.cmd.amount, now)

        def apply(result: Debit | None) -> None:
            if result is not None:
                assert [(a.lot_id, a.amount) for a in result.allocations] == allocations
                assert (result.amount, result.created_at) == (self.cmd.amount, now)

        return apply

    def changed(self) -> Op:
        return DebitOp(replace(self.cmd, metadata={"changed": True}))


class Void(Op):
    def call(self, uow: SqlUnitOfWork) -> Lot:
        return ledger.void_lot(self.cmd, uow)

    def owner(self, m: Model) -> str:
        if self.cmd.lot_id not in m.lots:
            raise LotNotFound(lot_id=self.cmd.lot_id)
        return m.lots[self.cmd.lot_id].account

    def expect(self, m: Model, now: datetime) -> Apply:
        self.owner(m)
        lot = m.lots[self.cmd.lot_id]
        if lot.voided:
            raise LotVoided(lot_id=lot.id)
        lot.voided, lot.remaining = True, 0

        def apply(result: Lot | None) -> None:
            if result is not None:
                assert (result.id, result.voided_at, result.remaining) == (lot.id, now, 0)

        return apply


class ClawBack(Op):
    def call(self, uow: SqlUnitOfWork) -> list[Entry]:
        return ledger.claw_back(self.cmd, uow)

    def expect(self, m: Model, now: datetime) -> Apply:
        cmd: ledger.ClawBack = self.cmd
        m.exists(cmd.account_id)
        if cmd.lot_id is not None:
            lot = m.lots.get(cmd.lot_id)
            if lot is None or lot.account != cmd.account_id:
                raise LotNotFound(lot_id=cmd.lot_id)
        taken, owed = m.take_or_owe(cmd.account_id, cmd.amount, cmd.lot_id, now)
        expected: Expected = [(lot_id, part, EntryType.CLAWBACK) for lot_id, part in taken]
        if owed:
            expected.append((None, owed, EntryType.CLAWBACK))

        def apply(result: list[Entry] | None) -> None:
            if result is not None:
                assert entries_of(result) == expected

        return apply


class Adjust(Op):
    def call(self, uow: SqlUnitOfWork) -> list[Entry]:
        return ledger.adjust(self.cmd, uow)

    def expect(self, m: Model, now: datetime) -> Apply:
        cmd: ledger.Adjust = self.cmd
        m.exists(cmd.account_id)
        if cmd.delta == 0:
            raise InvalidInput
        if cmd.delta > m.debt[cmd.account_id]:
            raise InvalidInput(debt=m.debt[cmd.account_id])
        expected: Expected
        if cmd.delta > 0:
            m.debt[cmd.account_id] -= cmd.delta
            expected = [(None, cmd.delta, EntryType.ADJUSTMENT)]
        else:
            taken, owed = m.take_or_owe(cmd.account_id, -cmd.delta, None, now)
            expected = [(lot_id, -part, EntryType.ADJUSTMENT) for lot_id, part in taken]
            if owed:
                expected.append((None, -owed, EntryType.ADJUSTMENT))

        def apply(result: list[Entry] | None) -> None:
            if result is not None:
                assert entries_of(result) == expected

        return apply


def outcome(answer: Any) -> str:
    return answer.code if isinstance(answer, TallyError) else "ok"


def refusal(error: BaseException) -> tuple[str, dict[str, Any]]:
    assert isinstance(error, TallyError), error
    return error.code, error.extra


def alone(op: Op, m: Model, now: datetime) -> Apply:
    """What a change run on its own does (rule 5): a stored key answers its first result."""
    key = op.cmd.idempotency_key
    if key in m.stored:
        first, result = m.stored[key]
        if first != op.cmd:
            raise IdempotencyKeyReused

        def replayed(answer: Any) -> None:
            assert answer == result

        return replayed
    apply = op.expect(m, now)

    def applied(answer: Any) -> None:
        apply(answer)
        m.stored[key] = (op.cmd, answer)

    return applied


def given(apply: Apply) -> Apply:
    return apply


def check(expect: Callable[[], Apply], answer: Any) -> bool:
    """Compare the ledger's answer (a result or a TallyError) with the model's expectation;
    True if the change took effect."""
    try:
        apply = expect()
    except TallyError as error:
        expected = error
    else:
        assert not isinstance(answer, BaseException), f"model accepted, ledger raised {answer!r}"
        apply(answer)
        return True
    assert isinstance(answer, TallyError), f"model refused {expected!r}, ledger answered"
    assert refusal(answer) == refusal(expected)
    return False


def shared_part(
    m: Model, ops: list[Op], now: datetime, answers: list[Any] | None
) -> tuple[bool, list[int]]:
    """Apply to the model what a batch does in its shared transaction, checking the
    ledger's answers if given: in order, on the accounts that existed when it began. Answers
    whether that transaction fails (it would store a key stored before), and which changes
    run alone after it."""
    existing, stored = set(m.debt), set(m.stored)
    seen: set[str] = set()
    later: list[int] = []
    fails = False
    for index, op in enumerate(ops):
        key = op.cmd.idempotency_key
        try:
            account = op.owner(m)
        except TallyError:
            later.append(index)
            continue
        if key in seen:
            later.append(index)
            continue
        seen.add(key)
        try:
            if account not in existing:
                raise AccountNotFound
            apply = op.expect(m, now)
        except TallyError:
            later.append(index)
            continue
        answer = None if answers is None else answers[index]
        check(partial(given, apply), answer)
        m.stored[key] = (op.cmd, answer)
        fails = fails or key in stored
    return fails, later


# --- batches ----------------------------------------------------------------------------------


class Turnstile:
    """A unit-of-work factory for the group commit. Inside a batch, a change run alone
    (refused in the batch, or after a failed batch) starts only once every change queued
    before it has been answered: the order callers would see if they ran one after another."""

    def __init__(self, database: Database, clock: FakeClock) -> None:
        self.database, self.clock = database, clock
        self.local = threading.local()
        self.answered: set[int] = set()
        self.changed = threading.Condition()

    def __call__(self) -> SqlUnitOfWork:
        index: int | None = getattr(self.local, "index", None)
        if index:
            with self.changed:
                ok = self.changed.wait_for(lambda: self.answered >= set(range(index)), 30)
                assert ok, "a change before this one was never answered"
        return SqlUnitOfWork(self.database, self.clock)

    def run(self, group: GroupCommit, calls: Sequence[Callable[[], Any]]) -> list[Any]:
        """Queue every call behind a pretend leader, in order, then let the first lead; each
        records when it was answered, so changes run alone afterwards keep the batch's order."""
        self.answered = set()

        def numbered(index: int, call: Callable[[], Any]) -> Any:
            self.local.index = index
            try:
                return call()
            finally:
                with self.changed:
                    self.answered.add(index)
                    self.changed.notify_all()

        answers = one_batch(group, [partial(numbered, n, call) for n, call in enumerate(calls)])
        assert (group._active, group._queue) == (0, [])
        return answers


class CountingIds:
    """Ids whose random part counts up: lots made in the same millisecond are spent in the
    order they were made, so an example replays the same way when hypothesis shrinks it."""

    def __init__(self) -> None:
        self.issued = 0
        self.lock = threading.Lock()

    def take(self, size: int) -> bytes:
        with self.lock:
            self.issued += 1
            return self.issued.to_bytes(size, "big")


# --- the machine ------------------------------------------------------------------------------


class LedgerMachine(RuleBasedStateMachine):
    database: Database
    clock: FakeClock
    turnstile: Turnstile
    group: GroupCommit

    def __init__(self) -> None:
        super().__init__()
        self.direct = SqlUnitOfWork(self.database, self.clock)
        self.grouped = SqlUnitOfWork(self.database, self.clock, self.group)
        # Every example starts at noon, so that outcomes depend on its steps alone.
        day = (self.clock() + timedelta(days=1)).replace(hour=12, minute=0, second=0, microsecond=0)
        self.clock.set(day)
        prefix = secrets.token_hex(4)
        self.accounts = [f"{prefix}-{n}" for n in range(ACCOUNTS)]
        self.model = Model()
        self.done: list[Op] = []
        self.past: list[tuple[datetime, dict[str, tuple[int, int, int]]]] = []

    def now(self) -> datetime:
        return self.clock()

    def step(self) -> datetime:
        # Each step happens one millisecond after the last, so "oldest first" is well defined.
        now = self.clock.advance(milliseconds=1)
        self.model.settle(now)
        return now

    def remember(self, now: datetime) -> None:
        self.past.append(
            (
                now,
                {a: self.model.balance(a, now)[:3] for a in self.accounts if a in self.model.debt},
            )
        )

    # --- drawing changes ----------------------------------------------------------------------

    def draw(self, data: st.DataObject, *, batched: bool) -> Op:
        """A change of any kind; in a batch, none that is refused before it is queued."""
        key = secrets.token_hex(8)
        account = data.draw(st.sampled_from(self.accounts))
        lots = list(self.model.lots)
        pending = [h.id for h in self.model.holds.values() if h.status == "pending"]
        holds = [*pending, *pending, *self.model.holds]  # mostly the ones that can change
        kind = data.draw(st.sampled_from(KINDS if self.done else KINDS[:-2]))
        if kind in ("replay", "reuse"):
            op = data.draw(st.sampled_from(self.done))
            return op if kind == "replay" else op.changed()
        if kind == "grant":
            validity = data.draw(st.sampled_from(VALIDITIES))
            now = self.now()
            midnight = now.replace(hour=0, minute=0, second=0, microsecond=0)
            expires_at = valid_for = None
            if validity == "past":
                expires_at = now - timedelta(minutes=1)
            elif validity is not None and "midnight" in validity:
                # Absolute expiries shared by several lots, so priority and age break ties.
                expires_at = midnight + timedelta(days=1 if validity == "midnight" else 2)
            else:
                valid_for = validity
            return Grant(
                ledger.GrantCredits(
                    account_id=account,
                    amount=data.draw(st.integers(1, 40)),
                    source=data.draw(st.sampled_from(["promotional", "purchase"])),
                    valid_for=valid_for,
                    expires_at=expires_at,
                    priority=data.draw(st.integers(0, 1)),
                    idempotency_key=key,
                )
            )
        if kind == "hold":
            quantity = data.draw(st.sampled_from([None, None, 2, 3]))
            amount = data.draw(st.integers(1, 10)) * (quantity or 3)
            if not batched and data.draw(st.booleans()):
                amount += 1  # not a whole multiple of the quantity: refused at once
            return PlaceHold(
                ledger.PlaceHold(
                    account_id=account,
                    amount=amount,
                    ttl_seconds=data.draw(st.sampled_from([60, 3600])),
                    tool=None if quantity is None else "render",
                    quantity=quantity,
                    idempotency_key=key,
                )
            )
        if kind in ("capture", "release"):
            hold_id = data.draw(st.sampled_from([*holds, values.new_id("hold", self.now())]))
            if kind == "release":
                return Release(ledger.ReleaseHold(hold_id=hold_id, idempotency_key=key))
            how = data.draw(st.sampled_from(["all", "amount", "amount", "units", "both"]))
            kept = data.draw(st.integers(1, 40)) if how in ("amount", "both") else None
            units = data.draw(st.integers(1, 12)) if how in ("units", "both") else None
            if how == "both" and batched:
                units = None  # refused before it is queued
            return Capture(
                ledger.CaptureHold(
                    hold_id=hold_id, amount=kept, quantity=units, idempotency_key=key
                )
            )
        if kind == "debit":
            return DebitOp(
                ledger.DebitCredits(
                    account_id=account, amount=data.draw(st.integers(1, 30)), idempotency_key=key
                )
            )
        if kind == "void":
            lot_id = data.draw(st.sampled_from([*lots, values.new_id("lot", self.now())]))
            return Void(ledger.VoidLot(lot_id=lot_id, reason="test", idempotency_key=key))
        if kind == "clawback":
            return ClawBack(
                ledger.ClawBack(
                    account_id=account,
                    amount=data.draw(st.integers(1, 40)),
                    lot_id=data.draw(st.sampled_from([None, None, *lots])),
                    reason="chargeback",
                    idempotency_key=key,
                )
            )
        return Adjust(
            ledger.Adjust(
                account_id=account,
                delta=data.draw(st.integers(-30, 30)),
                reason="correction",
                idempotency_key=key,
            )
        )

    # --- rules --------------------------------------------------------------------------------

    @initialize(priorities=st.tuples(st.integers(0, 1), st.integers(0, 1)))
    def first_grants(self, priorities: tuple[int, int]) -> None:
        """Two accounts start with credits that never expire; the third does not exist until
        a grant."""
        for account, priority in zip(self.accounts, priorities, strict=False):
            cmd = ledger.GrantCredits(
                account_id=account, amount=30, priority=priority, idempotency_key=account
            )
            now = self.step()
            check(partial(alone, Grant(cmd), self.model, now), ledger.grant(cmd, self.direct))

    @rule(data=st.data(), grouped=st.booleans())
    def change(self, data: st.DataObject, grouped: bool) -> None:
        """One change, directly or through the group commit (a batch of one)."""
        op = self.draw(data, batched=False)
        now = self.step()
        try:
            answer = op.call(self.grouped if grouped else self.direct)
        except TallyError as error:
            answer = error
        if check(partial(alone, op, self.model, now), answer):
            self.done.append(op)
        event(f"{type(op).__name__}: {outcome(answer)}")
        self.remember(now)

    @rule(data=st.data(), size=st.integers(2, 6))
    def batch(self, data: st.DataObject, size: int) -> None:
        """Several changes, to several accounts, in one group-commit batch."""
        ops = [self.draw(data, batched=True) for _ in range(size)]
        if data.draw(st.booleans()):
            ops.insert(data.draw(st.integers(1, size)), ops[0])  # one key twice
        now = self.step()
        fallbacks = self.group.fallbacks
        calls = [partial(op.call, self.grouped) for op in ops]
        answers = self.turnstile.run(self.group, calls)

        # A key stored before fails the shared transaction: every change runs alone.
        fell_back, _ = shared_part(copy.deepcopy(self.model), ops, now, None)
        assert self.group.fallbacks == fallbacks + fell_back
        later = list(range(len(ops)))
        if not fell_back:
            trial = copy.deepcopy(self.model)
            _, later = shared_part(trial, ops, now, answers)
            self.done += [op for index, op in enumerate(ops) if index not in later]
            self.model = trial
        event(f"batch of {len(ops)}: {len(ops) - len(later)} shared, fell back: {fell_back}")
        for op, answer in zip(ops, answers, strict=True):
            event(f"{type(op).__name__} in a batch: {outcome(answer)}")
        for index in later:
            op = ops[index]
            if check(partial(alone, op, self.model, now), answers[index]):
                self.done.append(op)
        self.remember(now)

    @rule(account=st.integers(0, ACCOUNTS - 1), email=st.sampled_from([None, "a@example.com"]))
    def put_account(self, account: int, email: str | None) -> None:
        self.step()
        ledger.put_account(self.accounts[account], email, self.direct)
        self.model.debt.setdefault(self.accounts[account], 0)

    @rule(minutes=st.sampled_from([1, 59, 61, 60 * 24, 60 * 24 * 31]))
    def time_passes(self, minutes: int) -> None:
        self.clock.advance(minutes=minutes)

    @rule(data=st.data())
    def to_an_expiry(self, data: st.DataObject) -> None:
        """The clock stops at the very instant a pending hold or a lot expires."""
        now = self.now()
        holds = {h.expires_at for h in self.model.holds.values() if h.status == "pending"}
        lots = {lot.expires_at for lot in self.model.lots.values() if lot.live(now)}
        instants = sorted(holds | {at for at in lots if at is not None})
        if instants:
            self.clock.set(data.draw(st.sampled_from(instants)))

    @rule(batch_size=st.sampled_from([1, 100]))
    def sweep(self, batch_size: int) -> None:
        """After a sweep the stored lots and holds are what time decided, with nothing due."""
        now = self.now()
        self.model.settle(now)
        ledger.sweep(self.direct, batch_size=batch_size)
        assert ledger.sweep(self.direct) == ledger.SweepResult()
        for account in self.accounts:
            if account in self.model.debt:
                page, _ = ledger.list_lots(account, self.direct, limit=500)
                assert {lot.id: lot.remaining for lot in page.items} == {
                    lot.id: lot.remaining
                    for lot in self.model.lots.values()
                    if lot.account == account
                }

    @rule(data=st.data())
    def balance_in_the_past(self, data: st.DataObject) -> None:
        """A balance at an earlier instant, rebuilt from the journal, is what it was then."""
        if not self.past:
            return
        at, balances = data.draw(st.sampled_from(self.past))
        for account, expected in balances.items():
            balance = ledger.get_balance(account, self.direct, at=at)
            assert (balance.available, balance.held, balance.debt) == expected

    # --- after every step ---------------------------------------------------------------------

    @invariant()
    def accounts_match_the_model(self) -> None:
        now = self.now()
        self.model.settle(now)
        for account in self.accounts:
            if account not in self.model.debt:
                with pytest.raises(AccountNotFound):
                    ledger.get_balance(account, self.direct)
                continue
            balance = ledger.get_balance(account, self.direct)
            assert (
                balance.available,
                balance.held,
                balance.debt,
                balance.next_expiry,
            ) == self.model.balance(account, now)
            with self.direct.read_only():
                loaded = self.direct.accounts.get(account)
            assert loaded is not None
            loaded.settle(now)  # what the next change to it sees, without writing it
            assert {lot.id: lot.remaining for lot in loaded.lots.values() if lot.remaining} == {
                lot.id: lot.remaining for lot in self.model.spendable(account, now)
            }
            assert {
                hold.id: (hold.amount, [(a.lot_id, a.amount) for a in hold.allocations])
                for hold in loaded.holds.values()
                if hold.status is HoldStatus.PENDING
            } == {
                hold.id: (hold.amount, hold.allocations)
                for hold in self.model.holds.values()
                if hold.account == account and hold.status == "pending"
            }
            page, _ = ledger.list_lots(account, self.direct, limit=500)
            mine = sorted(
                (lot for lot in self.model.lots.values() if lot.account == account),
                key=ModelLot.order,
            )
            assert [
                (lot.id, lot.amount, lot.expires_at, lot.priority, lot.voided_at is not None)
                for lot in page.items
            ] == [(lot.id, lot.amount, lot.expires_at, lot.priority, lot.voided) for lot in mine]

    @invariant()
    def audit_passes(self) -> None:
        assert ledger.check(self.direct).violations == []


@pytest.mark.slow
def test_ledger_matches_the_model(
    db: Database, clock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(values, "_random_pool", CountingIds())
    LedgerMachine.database = db
    LedgerMachine.clock = clock
    LedgerMachine.turnstile = Turnstile(db, clock)
    LedgerMachine.group = GroupCommit(LedgerMachine.turnstile)
    run_state_machine_as_test(
        LedgerMachine,
        settings=settings(
            max_examples=75,
            stateful_step_count=40,
            deadline=None,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
        ),
    )
