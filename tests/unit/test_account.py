"""The account aggregate, with no I/ORIGIN: spending order, holds, expiry, debt, the journal."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from tally.domain.errors import (
    CaptureExceedsHold,
    HoldNotFound,
    HoldNotPending,
    InsufficientCredits,
    InvalidInput,
    InvalidTime,
    LotVoided,
)
from tally.domain.model import (
    Account,
    EntryType,
    HoldStatus,
    Lot,
    Origin,
    account_at,
    allocate,
    debt_effect,
    lot_effect,
)

T0 = datetime(2026, 1, 1, tzinfo=UTC)
ORIGIN = Origin(idempotency_key="k")


def account() -> Account:
    return Account("alice", None, 0, 0, T0)


def grant(
    acct: Account, amount: int, *, days: int | None = None, priority: int = 0, at: datetime = T0
) -> str:
    expires = None if days is None else at + timedelta(days=days)
    return acct.grant(
        amount=amount,
        source="purchase",
        expires_at=expires,
        priority=priority,
        now=at,
        origin=ORIGIN,
    ).id


def journal_matches_projection(acct: Account) -> None:
    """Rule 6 on the in-memory journal: every lot's remaining and the debt add up."""
    for lot in acct.lots.values():
        assert lot.remaining == sum(lot_effect(e) for e in acct.new_entries if e.lot_id == lot.id)
    assert acct.debt == sum(debt_effect(e) for e in acct.new_entries)
    assert [e.seq for e in acct.new_entries] == list(range(1, acct.entry_seq + 1))


def test_spending_order_soonest_expiry_then_priority_then_oldest() -> None:
    acct = account()
    never = grant(acct, 5)
    late = grant(acct, 5, days=60)
    soon_low = grant(acct, 5, days=10, priority=1, at=T0)
    soon_high = grant(acct, 5, days=10, priority=0, at=T0 + timedelta(seconds=1))
    hold = acct.place_hold(amount=20, ttl_seconds=60, now=T0 + timedelta(seconds=2), origin=ORIGIN)
    # soon_high's expiry is one second later, so soon_low (same priority order aside) goes first
    assert [a.lot_id for a in hold.allocations] == [soon_low, soon_high, late, never]


def test_priority_breaks_ties_on_equal_expiry() -> None:
    acct = account()
    expires = T0 + timedelta(days=10)
    first = acct.grant(
        amount=3, source="gift", expires_at=expires, priority=5, now=T0, origin=ORIGIN
    ).id
    second = acct.grant(
        amount=3, source="gift", expires_at=expires, priority=1, now=T0, origin=ORIGIN
    ).id
    debit = acct.debit(amount=4, now=T0, origin=ORIGIN)
    assert [(a.lot_id, a.amount) for a in debit.allocations] == [(second, 3), (first, 1)]


def _lot(lot_id: str, *, expires: datetime | None, priority: int, created: datetime) -> Lot:
    return Lot(lot_id, "alice", "gift", 1, 1, expires, priority, created)


LATER = T0 + timedelta(days=30)
SOONER = T0 + timedelta(days=10)
OLD = T0 - timedelta(days=5)
NEW = T0 - timedelta(days=1)


@pytest.mark.parametrize(
    ("first", "second"),
    [
        # Each case: the keys after the deciding one all point the other way.
        pytest.param(
            _lot("lot_b", expires=SOONER, priority=9, created=NEW),
            _lot("lot_a", expires=LATER, priority=0, created=OLD),
            id="sooner expiry beats priority, age and id",
        ),
        pytest.param(
            _lot("lot_b", expires=LATER, priority=9, created=NEW),
            _lot("lot_a", expires=None, priority=-9, created=OLD),
            id="any expiry beats never",
        ),
        pytest.param(
            _lot("lot_b", expires=SOONER, priority=0, created=NEW),
            _lot("lot_a", expires=SOONER, priority=1, created=OLD),
            id="same expiry: lower priority beats age and id",
        ),
        pytest.param(
            _lot("lot_b", expires=None, priority=0, created=NEW),
            _lot("lot_a", expires=None, priority=1, created=OLD),
            id="never expiring: lower priority beats age and id",
        ),
        pytest.param(
            _lot("lot_b", expires=SOONER, priority=3, created=OLD),
            _lot("lot_a", expires=SOONER, priority=3, created=NEW),
            id="same expiry and priority: older beats id",
        ),
        pytest.param(
            _lot("lot_a", expires=SOONER, priority=3, created=OLD),
            _lot("lot_b", expires=SOONER, priority=3, created=OLD),
            id="all equal: the id decides, so the order is total",
        ),
    ],
)
def test_each_spending_tie_break_alone(first: Lot, second: Lot) -> None:
    """Rule 3, one key at a time: soonest expiry (never last), then priority, then oldest."""
    for lots in ([first, second], [second, first]):
        taken = allocate(lots, 1, T0)
        assert [(a.lot_id, a.amount) for a in taken] == [(first.id, 1)]
        both = allocate(lots, 2, T0)
        assert [(a.lot_id, a.amount) for a in both] == [(first.id, 1), (second.id, 1)]


def test_the_same_tie_breaks_through_the_account() -> None:
    """Same expiry: the lower priority goes first although it is newer; same expiry and
    priority: the older goes first."""
    acct = account()
    expires = T0 + timedelta(days=30)

    def gift(priority: int, at: datetime) -> str:
        return acct.grant(
            amount=2, source="gift", expires_at=expires, priority=priority, now=at, origin=ORIGIN
        ).id

    old_high = gift(5, T0)
    old_low = gift(1, T0 + timedelta(hours=1))
    new_low = gift(1, T0 + timedelta(hours=2))
    new_lowest = gift(0, T0 + timedelta(hours=3))
    debit = acct.debit(amount=8, now=T0 + timedelta(hours=4), origin=ORIGIN)
    assert [a.lot_id for a in debit.allocations] == [new_lowest, old_low, new_low, old_high]


def test_partial_capture_keeps_soonest_lots_and_returns_the_rest() -> None:
    acct = account()
    soon = grant(acct, 3, days=1)
    never = grant(acct, 10)
    hold = acct.place_hold(amount=6, ttl_seconds=60, now=T0, origin=ORIGIN)
    assert acct.balance(T0).available == 7
    assert acct.balance(T0).held == 6
    acct.capture(hold.id, 4, T0, ORIGIN)
    assert hold.status is HoldStatus.CAPTURED
    assert hold.captured == 4
    assert acct.lots[soon].remaining == 0
    assert acct.lots[never].remaining == 9
    assert acct.balance(T0).available == 9
    assert acct.balance(T0).held == 0
    journal_matches_projection(acct)


def test_release_returns_everything_to_the_same_lots() -> None:
    acct = account()
    lot = grant(acct, 5)
    hold = acct.place_hold(amount=5, ttl_seconds=60, now=T0, origin=ORIGIN)
    assert acct.lots[lot].remaining == 0
    acct.release(hold.id, T0, ORIGIN)
    assert acct.lots[lot].remaining == 5
    assert hold.status is HoldStatus.RELEASED
    journal_matches_projection(acct)


def test_hold_state_errors() -> None:
    acct = account()
    grant(acct, 5)
    hold = acct.place_hold(amount=3, ttl_seconds=60, now=T0, origin=ORIGIN)
    with pytest.raises(CaptureExceedsHold):
        acct.capture(hold.id, 4, T0, ORIGIN)
    acct.capture(hold.id, None, T0, ORIGIN)
    with pytest.raises(HoldNotPending):
        acct.capture(hold.id, 1, T0, ORIGIN)
    with pytest.raises(HoldNotPending):
        acct.release(hold.id, T0, ORIGIN)
    with pytest.raises(HoldNotFound):
        acct.release("hold_nope", T0, ORIGIN)


def test_a_lapsed_hold_counts_as_released_at_once_and_cannot_be_captured() -> None:
    acct = account()
    grant(acct, 5)
    hold = acct.place_hold(amount=5, ttl_seconds=60, now=T0, origin=ORIGIN)
    later = T0 + timedelta(seconds=60)
    assert acct.balance(later).available == 5
    assert acct.balance(later).held == 0
    with pytest.raises(HoldNotPending, match="expired"):
        acct.capture(hold.id, None, later, ORIGIN)
    acct.settle(later)
    assert hold.status is HoldStatus.EXPIRED
    assert acct.new_entries[-1].type is EntryType.RELEASE
    journal_matches_projection(acct)


def test_expired_lot_counts_zero_before_the_sweep_and_settle_writes_it() -> None:
    acct = account()
    lot = grant(acct, 5, days=1)
    grant(acct, 2)
    after = T0 + timedelta(days=1)
    balance = acct.balance(after - timedelta(seconds=1))
    assert balance.available == 7
    assert balance.next_expiry is not None
    assert balance.next_expiry.amount == 5
    assert acct.balance(after).available == 2
    assert acct.balance(after).next_expiry is None
    with pytest.raises(InsufficientCredits) as refused:
        acct.debit(amount=3, now=after, origin=ORIGIN)
    assert refused.value.extra == {"available": 2, "required": 3}
    acct.settle(after)
    assert acct.lots[lot].remaining == 0
    assert acct.new_entries[-1].type is EntryType.EXPIRE
    assert acct.new_entries[-1].amount == 5
    journal_matches_projection(acct)


def test_credits_held_from_a_lot_that_expires_meanwhile_expire_when_released() -> None:
    acct = account()
    lot = grant(acct, 5, days=1)
    hold = acct.place_hold(amount=5, ttl_seconds=3600, now=T0 + timedelta(hours=23), origin=ORIGIN)
    acct.release(hold.id, T0 + timedelta(hours=23, minutes=30), ORIGIN)  # not expired yet
    hold = acct.place_hold(amount=5, ttl_seconds=7200, now=T0 + timedelta(hours=23), origin=ORIGIN)
    acct.release(hold.id, T0 + timedelta(days=1, hours=0, minutes=30), ORIGIN)
    assert acct.lots[lot].remaining == 0
    assert [e.type for e in acct.new_entries[-2:]] == [EntryType.RELEASE, EntryType.EXPIRE]
    journal_matches_projection(acct)


def test_capture_of_credits_from_an_expired_lot_is_allowed() -> None:
    """A job started before expiry may finish after it: held credits belong to the hold."""
    acct = account()
    grant(acct, 5, days=1)
    hold = acct.place_hold(amount=4, ttl_seconds=7200, now=T0 + timedelta(hours=23), origin=ORIGIN)
    acct.capture(hold.id, 4, T0 + timedelta(days=1, minutes=5), ORIGIN)
    assert hold.captured == 4
    journal_matches_projection(acct)


def test_void_lot_and_credits_held_from_it() -> None:
    acct = account()
    lot = grant(acct, 10)
    hold = acct.place_hold(amount=4, ttl_seconds=60, now=T0, origin=ORIGIN)
    acct.void_lot(lot, T0, ORIGIN)
    assert acct.balance(T0).available == 0
    with pytest.raises(LotVoided):
        acct.void_lot(lot, T0, ORIGIN)
    acct.release(hold.id, T0, ORIGIN)
    assert acct.lots[lot].remaining == 0
    assert [e.type for e in acct.new_entries[-2:]] == [EntryType.RELEASE, EntryType.VOID]
    journal_matches_projection(acct)


def test_story_buys_pro_spends_7_disputes_buys_popular_debt_repaid_3_left() -> None:
    acct = account()
    pro = grant(acct, 25)
    acct.debit(amount=7, now=T0, origin=ORIGIN)
    # The dispute takes the Pro lot back: 18 unspent are taken, 7 spent become debt.
    acct.clawback(amount=25, now=T0, origin=ORIGIN, lot_id=pro)
    assert acct.balance(T0).available == 0
    assert acct.debt == 7
    acct.grant(amount=10, source="purchase", expires_at=None, priority=0, now=T0, origin=ORIGIN)
    balance = acct.balance(T0)
    assert balance.debt == 0
    assert balance.available == 3
    assert [e.type for e in acct.new_entries[-3:]] == [
        EntryType.GRANT,
        EntryType.ADJUSTMENT,
        EntryType.ADJUSTMENT,
    ]
    journal_matches_projection(acct)


def test_adjustments_take_credits_or_forgive_debt_but_never_create_credits() -> None:
    acct = account()
    grant(acct, 3)
    acct.adjust(delta=-5, now=T0, origin=ORIGIN)
    assert acct.balance(T0).available == 0
    assert acct.debt == 2
    with pytest.raises(InvalidInput):
        acct.adjust(delta=3, now=T0, origin=ORIGIN)
    acct.adjust(delta=2, now=T0, origin=ORIGIN)
    assert acct.debt == 0
    journal_matches_projection(acct)


def test_grant_refuses_bad_values() -> None:
    acct = account()
    with pytest.raises(InvalidInput):
        acct.grant(amount=1, source="stolen", expires_at=None, priority=0, now=T0, origin=ORIGIN)
    with pytest.raises(InvalidTime):
        acct.grant(amount=1, source="gift", expires_at=T0, priority=0, now=T0, origin=ORIGIN)
    with pytest.raises(InvalidInput):
        acct.grant(amount=1, source="gift", expires_at=None, priority=10**9, now=T0, origin=ORIGIN)
    assert acct.new_entries == []
    assert acct.lots == {}


def test_ttl_bounds() -> None:
    acct = account()
    grant(acct, 5)
    for ttl in (0, 86_401):
        with pytest.raises(InvalidInput):
            acct.place_hold(amount=1, ttl_seconds=ttl, now=T0, origin=ORIGIN)


def test_account_at_replays_the_journal() -> None:
    acct = account()
    grant(acct, 5, days=2)
    t1 = T0 + timedelta(hours=1)
    acct.debit(amount=2, now=t1, origin=ORIGIN)
    hold = acct.place_hold(amount=1, ttl_seconds=7200, now=t1, origin=ORIGIN)
    snapshot = acct.balance(t1)
    t2 = T0 + timedelta(hours=2)
    acct.capture(hold.id, None, t2, ORIGIN)
    at_t1 = [e for e in acct.new_entries if e.created_at <= t1]
    replayed = account_at("alice", list(acct.lots.values()), [hold], at_t1, t1)
    assert replayed.balance(t1) == snapshot
    assert replayed.balance(t1).held == 1
