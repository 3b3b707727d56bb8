"""A hypothesis state machine drives the ledger and a deliberately simple model side by side:
grants, holds, partial captures, releases, debits, voids, clawbacks, replays and clock jumps
past expiries. After every step the balance must equal the model's and rule 6 must hold."""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    consumes,
    initialize,
    invariant,
    rule,
    run_state_machine_as_test,
)

from tally.adapters.db.engine import Database
from tally.adapters.db.uow import SqlUnitOfWork
from tally.domain.errors import (
    CaptureExceedsHold,
    HoldNotPending,
    InsufficientCredits,
    LotVoided,
)
from tally.service import ledger
from tests.support import FakeClock


@dataclass
class ModelLot:
    remaining: int
    expires_at: datetime | None
    priority: int
    created: int
    voided: bool = False

    def live(self, now: datetime) -> bool:
        return not self.voided and (self.expires_at is None or self.expires_at > now)


@dataclass
class ModelHold:
    allocations: list[tuple[str, int]]
    expires_at: datetime
    pending: bool = True


@dataclass
class Model:
    lots: dict[str, ModelLot] = field(default_factory=dict)
    holds: dict[str, ModelHold] = field(default_factory=dict)
    debt: int = 0

    def give_back(self, lot_id: str, amount: int, now: datetime) -> None:
        lot = self.lots[lot_id]
        if lot.live(now):
            lot.remaining += amount

    def settle(self, now: datetime) -> None:
        for hold in self.holds.values():
            if hold.pending and hold.expires_at <= now:
                hold.pending = False
                for lot_id, amount in hold.allocations:
                    self.give_back(lot_id, amount, now)
        for lot in self.lots.values():
            if not lot.live(now):
                lot.remaining = 0

    def spendable(self, now: datetime) -> list[tuple[str, ModelLot]]:
        live = [(i, lot) for i, lot in self.lots.items() if lot.live(now) and lot.remaining]
        far = datetime.max.replace(tzinfo=now.tzinfo)
        return sorted(live, key=lambda p: (p[1].expires_at or far, p[1].priority, p[1].created))

    def available(self, now: datetime) -> int:
        return sum(lot.remaining for _, lot in self.spendable(now))

    def take(self, amount: int, now: datetime) -> list[tuple[str, int]]:
        taken = []
        for lot_id, lot in self.spendable(now):
            part = min(amount, lot.remaining)
            lot.remaining -= part
            amount -= part
            taken.append((lot_id, part))
            if amount == 0:
                break
        assert amount == 0
        return taken

    def held(self, now: datetime) -> int:
        return sum(
            sum(a for _, a in hold.allocations)
            for hold in self.holds.values()
            if hold.pending and hold.expires_at > now
        )


class LedgerMachine(RuleBasedStateMachine):
    database: Database
    clock: FakeClock

    lots = Bundle("lots")
    holds = Bundle("holds")

    def __init__(self) -> None:
        super().__init__()
        self.uow = SqlUnitOfWork(self.database, self.clock)
        self.account = f"acct-{secrets.token_hex(6)}"
        self.model = Model()
        self.created = 0
        self.done: list[tuple[Any, Any]] = []

    def now(self) -> datetime:
        return self.clock()

    def step(self) -> datetime:
        # Each change happens one millisecond after the last, so "oldest first" is well defined.
        now = self.clock.advance(milliseconds=1)
        self.model.settle(now)
        return now

    def key(self) -> str:
        return secrets.token_hex(8)

    @initialize(target=lots, amount=st.integers(1, 40))
    def first_grant(self, amount: int) -> str:
        lot_id: str = self.grant(amount, None, 0)  # type: ignore[assignment]
        return lot_id

    @rule(
        target=lots,
        amount=st.integers(1, 40),
        validity=st.sampled_from(
            [None, "PT1H", "P1D", "P30D", "midnight", "midnight", "next midnight"]
        ),
        priority=st.integers(0, 1),
    )
    def grant(self, amount: int, validity: str | None, priority: int) -> str:
        now = self.step()
        expires_at = valid_for = None
        if validity is not None and "midnight" in validity:
            # Absolute expiries shared by several lots, so priority and age break the ties.
            midnight = now.replace(hour=0, minute=0, second=0, microsecond=0)
            expires_at = midnight + timedelta(days=1 if validity == "midnight" else 2)
        else:
            valid_for = validity
        cmd = ledger.GrantCredits(
            account_id=self.account,
            amount=amount,
            valid_for=valid_for,
            expires_at=expires_at,
            priority=priority,
            idempotency_key=self.key(),
        )
        lot = ledger.grant(cmd, self.uow)
        self.done.append((cmd, lot))
        self.created += 1
        if valid_for is not None:
            expires_at = now + {"PT1H": timedelta(hours=1), "P1D": timedelta(days=1)}.get(
                valid_for, timedelta(days=30)
            )
        model_lot = ModelLot(amount, expires_at, priority, self.created)
        self.model.lots[lot.id] = model_lot
        repaid = min(self.model.debt, amount)
        model_lot.remaining -= repaid
        self.model.debt -= repaid
        return lot.id

    @rule(target=holds, amount=st.integers(1, 30), ttl=st.sampled_from([60, 3600]))
    def hold(self, amount: int, ttl: int) -> str:
        now = self.step()
        cmd = ledger.PlaceHold(
            account_id=self.account, amount=amount, ttl_seconds=ttl, idempotency_key=self.key()
        )
        if self.model.available(now) < amount:
            with pytest.raises(InsufficientCredits):
                ledger.place_hold(cmd, self.uow)
            return "hold_none"
        placed = ledger.place_hold(cmd, self.uow)
        self.done.append((cmd, placed))
        allocations = self.model.take(amount, now)
        assert [(a.lot_id, a.amount) for a in placed.allocations] == allocations
        self.model.holds[placed.id] = ModelHold(allocations, now + timedelta(seconds=ttl))
        return placed.id

    @rule(hold_id=consumes(holds), fraction=st.sampled_from([None, 0.0, 0.5, 1.0, 2.0]))
    def capture(self, hold_id: str, fraction: float | None) -> None:
        if hold_id == "hold_none":
            return
        now = self.step()
        hold = self.model.holds[hold_id]
        total = sum(a for _, a in hold.allocations)
        amount = None if fraction is None else max(1, int(total * fraction))
        cmd = ledger.CaptureHold(hold_id=hold_id, amount=amount, idempotency_key=self.key())
        if not hold.pending:
            with pytest.raises(HoldNotPending):
                ledger.capture(cmd, self.uow)
            return
        if amount is not None and amount > total:
            with pytest.raises(CaptureExceedsHold):
                ledger.capture(cmd, self.uow)
            return
        ledger.capture(cmd, self.uow)
        keep = total if amount is None else amount
        hold.pending = False
        for lot_id, allocated in hold.allocations:
            kept = min(keep, allocated)
            keep -= kept
            if allocated - kept:
                self.model.give_back(lot_id, allocated - kept, now)

    @rule(hold_id=consumes(holds))
    def release(self, hold_id: str) -> None:
        if hold_id == "hold_none":
            return
        now = self.step()
        hold = self.model.holds[hold_id]
        cmd = ledger.ReleaseHold(hold_id=hold_id, idempotency_key=self.key())
        if not hold.pending:
            with pytest.raises(HoldNotPending):
                ledger.release(cmd, self.uow)
            return
        ledger.release(cmd, self.uow)
        hold.pending = False
        for lot_id, allocated in hold.allocations:
            self.model.give_back(lot_id, allocated, now)

    @rule(amount=st.integers(1, 30))
    def debit(self, amount: int) -> None:
        now = self.step()
        cmd = ledger.DebitCredits(
            account_id=self.account, amount=amount, idempotency_key=self.key()
        )
        if self.model.available(now) < amount:
            with pytest.raises(InsufficientCredits):
                ledger.debit(cmd, self.uow)
            return
        done = ledger.debit(cmd, self.uow)
        self.done.append((cmd, done))
        assert [(a.lot_id, a.amount) for a in done.allocations] == self.model.take(amount, now)

    @rule(lot_id=lots)
    def void(self, lot_id: str) -> None:
        self.step()
        cmd = ledger.VoidLot(lot_id=lot_id, reason="test", idempotency_key=self.key())
        lot = self.model.lots[lot_id]
        if lot.voided:
            with pytest.raises(LotVoided):
                ledger.void_lot(cmd, self.uow)
            return
        ledger.void_lot(cmd, self.uow)
        lot.voided, lot.remaining = True, 0

    @rule(amount=st.integers(1, 40), lot_id=st.one_of(st.none(), lots))
    def clawback(self, amount: int, lot_id: str | None) -> None:
        now = self.step()
        cmd = ledger.ClawBack(
            account_id=self.account,
            amount=amount,
            lot_id=lot_id,
            reason="chargeback",
            idempotency_key=self.key(),
        )
        ledger.claw_back(cmd, self.uow)
        if lot_id is None:
            taken = min(amount, self.model.available(now))
            self.model.take(taken, now)
        else:
            lot = self.model.lots[lot_id]
            taken = min(amount, lot.remaining if lot.live(now) else 0)
            lot.remaining -= taken
        self.model.debt += amount - taken

    @rule(minutes=st.sampled_from([1, 59, 61, 60 * 24, 60 * 24 * 31]))
    def time_passes(self, minutes: int) -> None:
        self.clock.advance(minutes=minutes)

    @rule()
    def sweep(self) -> None:
        self.model.settle(self.now())
        ledger.sweep(self.uow)

    @rule(data=st.data())
    def replay(self, data: st.DataObject) -> None:
        if not self.done:
            return
        cmd, first = data.draw(st.sampled_from(self.done))
        runner: Any = {
            ledger.GrantCredits: ledger.grant,
            ledger.PlaceHold: ledger.place_hold,
            ledger.DebitCredits: ledger.debit,
        }[type(cmd)]
        assert runner(cmd, self.uow) == first

    @invariant()
    def balance_matches_model(self) -> None:
        now = self.now()
        self.model.settle(now)
        balance = ledger.get_balance(self.account, self.uow)
        assert (balance.available, balance.held, balance.debt) == (
            self.model.available(now),
            self.model.held(now),
            self.model.debt,
        )

    @invariant()
    def conservation(self) -> None:
        assert ledger.check(self.uow).violations == []


@pytest.mark.slow
def test_ledger_matches_the_model(db: Database, clock: FakeClock) -> None:
    LedgerMachine.database = db
    LedgerMachine.clock = clock
    run_state_machine_as_test(
        LedgerMachine,
        settings=settings(
            max_examples=75,
            stateful_step_count=25,
            deadline=None,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
        ),
    )
