"""The ledger through its use cases, on SQLite and PostgreSQL (the `db` fixture)."""

from __future__ import annotations

import secrets
from collections import Counter
from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy import insert, select, text, update
from sqlalchemy.exc import DBAPIError, IntegrityError

from tally.adapters.db import fast
from tally.adapters.db.repository import _LOCK_ACCOUNTS_LISTED
from tally.adapters.db.schema import entries, lots
from tally.adapters.db.uow import SqlUnitOfWork
from tally.domain.errors import (
    AccountNotFound,
    CaptureExceedsHold,
    HoldNotFound,
    HoldNotPending,
    IdempotencyKeyReused,
    InsufficientCredits,
    InvalidAmount,
    InvalidDuration,
    InvalidIdempotencyKey,
    InvalidInput,
    InvalidTime,
    LotNotFound,
    TallyError,
)
from tally.domain.model import EntryType, HoldStatus, Origin
from tally.service import ledger
from tests.support import FakeClock


def key() -> str:
    return secrets.token_hex(8)


def grant(uow: SqlUnitOfWork, account: str, amount: int, **extra: Any) -> Any:
    return ledger.grant(
        ledger.GrantCredits(account_id=account, amount=amount, idempotency_key=key(), **extra), uow
    )


def available(uow: SqlUnitOfWork, account: str) -> int:
    return ledger.get_balance(account, uow).available


def assert_conserved(uow: SqlUnitOfWork) -> None:
    report = ledger.check(uow)
    assert report.violations == []


def test_grant_hold_capture_release_debit(uow: SqlUnitOfWork, clock: FakeClock) -> None:
    soon = grant(uow, "alice", 5, valid_for="P30D")
    grant(uow, "alice", 10)
    hold = ledger.place_hold(
        ledger.PlaceHold(account_id="alice", amount=8, idempotency_key=key()), uow
    )
    assert next((a.lot_id, a.amount) for a in hold.allocations) == (soon.id, 5)
    balance = ledger.get_balance("alice", uow)
    assert (balance.available, balance.held) == (7, 8)
    captured = ledger.capture(
        ledger.CaptureHold(hold_id=hold.id, amount=6, idempotency_key=key()), uow
    )
    assert captured.status is HoldStatus.CAPTURED
    assert captured.captured == 6
    assert available(uow, "alice") == 9
    other = ledger.place_hold(
        ledger.PlaceHold(account_id="alice", amount=9, idempotency_key=key()), uow
    )
    ledger.release(ledger.ReleaseHold(hold_id=other.id, idempotency_key=key()), uow)
    done = ledger.debit(
        ledger.DebitCredits(account_id="alice", amount=9, idempotency_key=key()), uow
    )
    assert done.amount == 9
    assert available(uow, "alice") == 0
    with pytest.raises(InsufficientCredits) as refused:
        ledger.debit(ledger.DebitCredits(account_id="alice", amount=1, idempotency_key=key()), uow)
    assert refused.value.problem()["status"] == 402
    assert_conserved(uow)


def test_balance_next_expiry_and_expiry_without_sweep(uow: SqlUnitOfWork, clock: FakeClock) -> None:
    grant(uow, "bob", 4, valid_for="P1D")
    grant(uow, "bob", 6, valid_for="P2Y", source="purchase")
    balance = ledger.get_balance("bob", uow)
    assert balance.next_expiry is not None
    assert balance.next_expiry.amount == 4
    assert balance.next_expiry.at == clock() + timedelta(days=1)
    clock.advance(days=1)
    assert available(uow, "bob") == 6  # rule 2: counts as zero at once
    report = ledger.check(uow)
    assert report.due_lots == 1
    assert report.violations == []
    result = ledger.sweep(uow)
    assert (result.accounts, result.lots_expired) == (1, 1)
    assert ledger.sweep(uow).accounts == 0  # nothing left to do
    assert ledger.check(uow).due_lots == 0
    kinds = [e.type for e in ledger.list_entries("bob", uow).items]
    assert kinds[0] is EntryType.EXPIRE
    assert_conserved(uow)


def test_lapsed_hold_is_released_at_once_and_swept(uow: SqlUnitOfWork, clock: FakeClock) -> None:
    grant(uow, "carol", 5)
    hold = ledger.place_hold(
        ledger.PlaceHold(account_id="carol", amount=5, ttl_seconds=60, idempotency_key=key()), uow
    )
    assert available(uow, "carol") == 0
    clock.advance(seconds=60)
    assert available(uow, "carol") == 5
    with pytest.raises(HoldNotPending):
        ledger.capture(ledger.CaptureHold(hold_id=hold.id, idempotency_key=key()), uow)
    assert ledger.sweep(uow).holds_expired == 1
    with pytest.raises(HoldNotPending):
        ledger.release(ledger.ReleaseHold(hold_id=hold.id, idempotency_key=key()), uow)
    assert_conserved(uow)


def test_a_change_settles_what_time_decided(uow: SqlUnitOfWork, clock: FakeClock) -> None:
    grant(uow, "dave", 3, valid_for="PT1H")
    grant(uow, "dave", 3)
    clock.advance(hours=2)
    ledger.debit(ledger.DebitCredits(account_id="dave", amount=1, idempotency_key=key()), uow)
    assert ledger.check(uow).due_lots == 0
    assert_conserved(uow)


def test_debt_from_clawback_is_repaid_by_the_next_grant(uow: SqlUnitOfWork) -> None:
    pro = grant(uow, "erin", 25, source="purchase")
    ledger.debit(ledger.DebitCredits(account_id="erin", amount=7, idempotency_key=key()), uow)
    ledger.claw_back(
        ledger.ClawBack(
            account_id="erin", amount=25, lot_id=pro.id, reason="dispute", idempotency_key=key()
        ),
        uow,
    )
    balance = ledger.get_balance("erin", uow)
    assert (balance.available, balance.debt) == (0, 7)
    assert_conserved(uow)
    grant(uow, "erin", 10, source="purchase")
    balance = ledger.get_balance("erin", uow)
    assert (balance.available, balance.debt) == (3, 0)
    assert_conserved(uow)


def test_adjust_and_void(uow: SqlUnitOfWork) -> None:
    lot = grant(uow, "fay", 5)
    ledger.adjust(
        ledger.Adjust(account_id="fay", delta=-7, reason="correction", idempotency_key=key()), uow
    )
    assert ledger.get_balance("fay", uow).debt == 2
    ledger.adjust(
        ledger.Adjust(account_id="fay", delta=2, reason="forgiven", idempotency_key=key()), uow
    )
    assert ledger.get_balance("fay", uow).debt == 0
    other = grant(uow, "fay", 4)
    voided = ledger.void_lot(
        ledger.VoidLot(lot_id=other.id, reason="fraud", idempotency_key=key()), uow
    )
    assert voided.voided_at is not None
    assert voided.remaining == 0
    assert lot.id != other.id
    assert_conserved(uow)


def test_idempotent_replay_and_reuse(uow: SqlUnitOfWork) -> None:
    grant(uow, "gus", 10)
    cmd = ledger.DebitCredits(account_id="gus", amount=3, idempotency_key="once")
    first = ledger.debit(cmd, uow)
    again = ledger.debit(cmd, uow)
    assert again == first
    assert available(uow, "gus") == 7
    with pytest.raises(IdempotencyKeyReused):
        ledger.debit(ledger.DebitCredits(account_id="gus", amount=4, idempotency_key="once"), uow)
    with pytest.raises(IdempotencyKeyReused):
        ledger.place_hold(ledger.PlaceHold(account_id="gus", amount=3, idempotency_key="once"), uow)
    # Keys are per caller: another platform may use the same key.
    ledger.debit(
        ledger.DebitCredits(account_id="gus", amount=3, idempotency_key="once", platform_id="p2"),
        uow,
    )
    assert available(uow, "gus") == 4
    lot_cmd = ledger.GrantCredits(account_id="gus", amount=2, idempotency_key="g1")
    assert ledger.grant(lot_cmd, uow) == ledger.grant(lot_cmd, uow)
    assert available(uow, "gus") == 6
    assert_conserved(uow)


def test_a_failed_change_stores_no_key(uow: SqlUnitOfWork) -> None:
    grant(uow, "hal", 1)
    cmd = ledger.DebitCredits(account_id="hal", amount=2, idempotency_key="retry-me")
    with pytest.raises(InsufficientCredits):
        ledger.debit(cmd, uow)
    grant(uow, "hal", 1)
    assert ledger.debit(cmd, uow).amount == 2


def _journal_size(uow: SqlUnitOfWork) -> int:
    with uow.read_only():
        return len(uow.journal.entries("ivy", limit=500, before_seq=None))


BAD_CHANGES: list[tuple[str, Any, type[TallyError]]] = [
    (
        "float",
        lambda: ledger.GrantCredits(account_id="ivy", amount=1.5, idempotency_key=key()),  # type: ignore[arg-type]
        InvalidAmount,
    ),
    (
        "string",
        lambda: ledger.DebitCredits(account_id="ivy", amount="two", idempotency_key=key()),  # type: ignore[arg-type]
        InvalidAmount,
    ),
    (
        "zero",
        lambda: ledger.DebitCredits(account_id="ivy", amount=0, idempotency_key=key()),
        InvalidAmount,
    ),
    (
        "negative",
        lambda: ledger.PlaceHold(account_id="ivy", amount=-1, idempotency_key=key()),
        InvalidAmount,
    ),
    (
        "huge",
        lambda: ledger.GrantCredits(account_id="ivy", amount=2**53 + 1, idempotency_key=key()),
        InvalidAmount,
    ),
    (
        "bool",
        lambda: ledger.GrantCredits(account_id="ivy", amount=True, idempotency_key=key()),
        InvalidAmount,
    ),
    (
        "unknown account",
        lambda: ledger.DebitCredits(account_id="nobody", amount=1, idempotency_key=key()),
        AccountNotFound,
    ),
    (
        "bad account id",
        lambda: ledger.DebitCredits(account_id="no body", amount=1, idempotency_key=key()),
        InvalidInput,
    ),
    (
        "unknown hold",
        lambda: ledger.CaptureHold(
            hold_id="hold_00000000000000000000000000", idempotency_key=key()
        ),
        HoldNotFound,
    ),
    (
        "malformed hold id",
        lambda: ledger.ReleaseHold(hold_id="'; drop table", idempotency_key=key()),
        HoldNotFound,
    ),
    (
        "unknown lot",
        lambda: ledger.VoidLot(
            lot_id="lot_00000000000000000000000000", reason="x", idempotency_key=key()
        ),
        LotNotFound,
    ),
    (
        "bad duration",
        lambda: ledger.GrantCredits(
            account_id="ivy", amount=1, valid_for="2 years", idempotency_key=key()
        ),
        InvalidDuration,
    ),
    (
        "both validities",
        lambda: ledger.GrantCredits(
            account_id="ivy",
            amount=1,
            valid_for="P1D",
            expires_at=FakeClock()(),
            idempotency_key=key(),
        ),
        InvalidInput,
    ),
    (
        "past expiry",
        lambda: ledger.GrantCredits(
            account_id="ivy",
            amount=1,
            expires_at=FakeClock()() - timedelta(days=1),
            idempotency_key=key(),
        ),
        InvalidTime,
    ),
    (
        "unknown source",
        lambda: ledger.GrantCredits(
            account_id="ivy", amount=1, source="magic", idempotency_key=key()
        ),
        InvalidInput,
    ),
    (
        "long ttl",
        lambda: ledger.PlaceHold(
            account_id="ivy", amount=1, ttl_seconds=86_401, idempotency_key=key()
        ),
        InvalidInput,
    ),
    (
        "empty key",
        lambda: ledger.DebitCredits(account_id="ivy", amount=1, idempotency_key=""),
        InvalidIdempotencyKey,
    ),
    (
        "huge metadata",
        lambda: ledger.DebitCredits(
            account_id="ivy", amount=1, metadata={"x": "y" * 5000}, idempotency_key=key()
        ),
        InvalidInput,
    ),
]
RUNNERS: dict[type, Any] = {
    ledger.GrantCredits: ledger.grant,
    ledger.DebitCredits: ledger.debit,
    ledger.PlaceHold: ledger.place_hold,
    ledger.CaptureHold: ledger.capture,
    ledger.ReleaseHold: ledger.release,
    ledger.VoidLot: ledger.void_lot,
}


@pytest.mark.parametrize(("name", "make", "error"), BAD_CHANGES, ids=[b[0] for b in BAD_CHANGES])
def test_bad_input_is_refused_and_changes_nothing(
    uow: SqlUnitOfWork, name: str, make: Any, error: type[TallyError]
) -> None:
    grant(uow, "ivy", 5)
    before = (_journal_size(uow), ledger.get_balance("ivy", uow))
    with pytest.raises(error):
        cmd = make()
        RUNNERS[type(cmd)](cmd, uow)
    assert (_journal_size(uow), ledger.get_balance("ivy", uow)) == before


def test_capture_errors_change_nothing(uow: SqlUnitOfWork) -> None:
    grant(uow, "jan", 5)
    hold = ledger.place_hold(
        ledger.PlaceHold(account_id="jan", amount=3, idempotency_key=key()), uow
    )
    with pytest.raises(CaptureExceedsHold):
        ledger.capture(ledger.CaptureHold(hold_id=hold.id, amount=4, idempotency_key=key()), uow)
    ledger.capture(ledger.CaptureHold(hold_id=hold.id, amount=3, idempotency_key=key()), uow)
    with pytest.raises(HoldNotPending):
        ledger.capture(ledger.CaptureHold(hold_id=hold.id, amount=1, idempotency_key=key()), uow)
    assert available(uow, "jan") == 2
    assert_conserved(uow)


def test_balance_at_a_past_time_from_the_journal(uow: SqlUnitOfWork, clock: FakeClock) -> None:
    grant(uow, "kim", 10, valid_for="P1D")
    t_granted = clock()
    clock.advance(hours=1)
    ledger.debit(ledger.DebitCredits(account_id="kim", amount=4, idempotency_key=key()), uow)
    hold = ledger.place_hold(
        ledger.PlaceHold(account_id="kim", amount=2, idempotency_key=key()), uow
    )
    t_held = clock()
    clock.advance(minutes=1)
    ledger.capture(ledger.CaptureHold(hold_id=hold.id, idempotency_key=key()), uow)
    clock.advance(days=2)
    at_grant = ledger.get_balance("kim", uow, at=t_granted)
    at_hold = ledger.get_balance("kim", uow, at=t_held)
    assert (at_grant.available, at_grant.held) == (10, 0)
    assert (at_hold.available, at_hold.held) == (4, 2)
    assert ledger.get_balance("kim", uow).available == 0  # the lot expired
    with pytest.raises(InvalidTime):
        ledger.get_balance("kim", uow, at=clock() + timedelta(seconds=1))
    with pytest.raises(AccountNotFound):
        ledger.get_balance("nobody", uow)


def test_check_finds_a_tampered_projection(uow: SqlUnitOfWork) -> None:
    lot = grant(uow, "leo", 5)
    ledger.debit(ledger.DebitCredits(account_id="leo", amount=2, idempotency_key=key()), uow)
    assert_conserved(uow)
    with uow.database.engine.begin() as connection:
        connection.execute(update(lots).where(lots.c.lot_id == lot.id).values(remaining=1))
    report = ledger.check(uow)
    assert len(report.violations) >= 1
    assert any("rule 6" in v and lot.id in v for v in report.violations)


def test_the_journal_is_append_only_in_the_database(uow: SqlUnitOfWork) -> None:
    grant(uow, "max", 5)
    for statement in (
        update(entries).values(amount=500),
        entries.delete(),
    ):
        with (
            pytest.raises(DBAPIError, match="immutable"),
            uow.database.engine.begin() as connection,
        ):
            connection.execute(statement)
    assert_conserved(uow)


@pytest.mark.parametrize(
    "values",
    [
        {"amount": 5, "remaining": 6},
        {"amount": 5, "remaining": -1},
        {"amount": 0, "remaining": 0},
        {"amount": 5, "remaining": 5, "source": "stolen"},
        {"amount": 5, "remaining": 5, "is_open": False},
        {"amount": 5, "remaining": 0, "is_open": True},
    ],
)
def test_the_database_refuses_impossible_lots(
    uow: SqlUnitOfWork, clock: FakeClock, values: dict[str, Any]
) -> None:
    grant(uow, "ned", 1)
    row = {
        "lot_id": "lot_x",
        "account_id": "ned",
        "source": "gift",
        "priority": 0,
        "created_at": clock(),
        "is_open": values.get("remaining", 0) > 0,
        **values,
    }
    with pytest.raises(IntegrityError), uow.database.engine.begin() as connection:
        connection.execute(insert(lots).values(row))
    # The same row made possible is accepted: the refusal above was for the broken rule.
    fixed = {**row, "amount": 5, "remaining": 5, "is_open": True, "source": "gift"}
    with uow.database.engine.begin() as connection:
        connection.execute(insert(lots).values(fixed))


def test_entries_are_numbered_and_carry_the_key(uow: SqlUnitOfWork) -> None:
    grant(uow, "ola", 5)
    ledger.debit(
        ledger.DebitCredits(
            account_id="ola", amount=2, idempotency_key="job-9", platform_id="portraits"
        ),
        uow,
    )
    newest = ledger.list_entries("ola", uow, limit=1).items[0]
    assert (newest.seq, newest.type, newest.idempotency_key, newest.platform_id) == (
        2,
        EntryType.DEBIT,
        "job-9",
        "portraits",
    )
    older = ledger.list_entries("ola", uow, limit=5, before_seq=2).items
    assert [e.seq for e in older] == [1]
    with uow.read_only() as reader:
        count = reader.accounts.connection.execute(
            select(text("count(*)")).select_from(entries)
        ).scalar()
    assert count == 2


def test_put_account_creates_and_sets_email(uow: SqlUnitOfWork) -> None:
    account = ledger.put_account("pia", "pia@example.com", uow)
    assert account.email == "pia@example.com"
    assert ledger.get_balance("pia", uow).available == 0
    with pytest.raises(InvalidInput):
        ledger.put_account("pia", "not-an-email", uow)


def test_metadata_and_list_results_round_trip(uow: SqlUnitOfWork) -> None:
    meta = {"tool": "portrait", "images": [1, 2], "nested": {"ok": True}, "text": "ünï"}
    lot = ledger.grant(
        ledger.GrantCredits(account_id="quin", amount=5, metadata=meta, idempotency_key="m1"), uow
    )
    assert lot.metadata == meta
    hold = ledger.place_hold(
        ledger.PlaceHold(account_id="quin", amount=2, metadata=meta, idempotency_key="m2"), uow
    )
    assert hold.metadata == meta
    with uow.read_only():
        loaded = uow.accounts.get("quin")
    assert loaded is not None
    assert loaded.lots[lot.id].metadata == meta
    assert loaded.holds[hold.id].metadata == meta
    assert ledger.list_entries("quin", uow, limit=5).items[-1].metadata == meta
    cmd = ledger.ClawBack(account_id="quin", amount=9, reason="dispute", idempotency_key="m3")
    first = ledger.claw_back(cmd, uow)
    assert ledger.claw_back(cmd, uow) == first  # a list result replays from JSON
    assert ledger.get_balance("quin", uow).debt == 6


def test_one_save_writes_many_rows_of_each_kind(uow: SqlUnitOfWork) -> None:
    """A save of many changed rows (PostgreSQL: multi-row statements, 64 rows at most each)
    writes every one of them: the journal, the lots' remaining and the projection agree."""
    origin = Origin("bulk")
    with uow:
        now = uow.clock()
        account = uow.accounts.get_for_update("bulk", create_at=now)
        assert account is not None
        for priority in range(3):
            account.grant(
                amount=100,
                source="promotional",
                expires_at=None,
                priority=priority,
                now=now,
                origin=origin,
            )
        for _ in range(150):  # 100 from the first lot, 50 from the second
            account.debit(amount=1, now=now, origin=origin)
        uow.accounts.save(account)
        uow.commit()
    assert available(uow, "bulk") == 150
    page, _ = ledger.list_lots("bulk", uow, limit=10)
    remaining = sorted(lot.remaining for lot in page.items)
    assert remaining == [0, 50, 100]
    assert len(ledger.list_entries("bulk", uow, limit=500).items) == 3 + 150
    assert_conserved(uow)


def test_a_core_statement_cannot_run_among_deferred_writes(uow: SqlUnitOfWork) -> None:
    """On PostgreSQL the writes of a batch wait for its commit: a Core statement in between
    would run before them (and a read would miss them), so it fails at once. SQLite sends
    every write at once, where a Core statement is in order."""
    grant(uow, "deferred", 5)
    with uow:
        account = uow.accounts.get_for_update("deferred")
        assert account is not None
        account.debit(amount=2, now=uow.clock(), origin=Origin("deferred"))
        with uow.batch():
            uow.accounts.save(account)
            read = select(lots.c.remaining).where(lots.c.account_id == "deferred")
            if uow.database.dialect == "postgresql":
                with pytest.raises(AssertionError, match="Core statement inside deferred"):
                    uow.accounts.connection.execute(read)
            else:
                assert uow.accounts.connection.execute(read).scalar_one() == 3
            uow.commit()
    assert available(uow, "deferred") == 3
    assert_conserved(uow)


def test_debits_of_eight_accounts_write_in_one_statement(
    uow: SqlUnitOfWork, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A change that only adds entries rewrites its account's `entry_seq` alone: on PostgreSQL
    the writes of eight such debits (accounts, lots, entries) then go as one joined statement,
    not two. The accounts still read back whole."""
    names = [f"eight-{n}" for n in range(8)]
    for name in names:
        grant(uow, name, 5)
    real = fast._execute_joined
    joined: list[int] = []

    def counted(cursor: Any, run: list[tuple[str, Any]]) -> None:
        joined.append(len(run))
        real(cursor, run)

    monkeypatch.setattr(fast, "_execute_joined", counted)
    with uow:
        loaded = uow.accounts.get_many_for_update(names)
        for account in loaded.values():
            account.debit(amount=1, now=uow.clock(), origin=Origin("eight"))
        with uow.batch():
            uow.accounts.save_many(list(loaded.values()))
            uow.commit()
    assert joined == ([3] if uow.database.dialect == "postgresql" else [])
    for name in names:
        balance = ledger.get_balance(name, uow)
        assert (balance.available, balance.debt) == (4, 0)
        assert [e.seq for e in ledger.list_entries(name, uow, limit=5).items] == [2, 1]
    assert_conserved(uow)


@pytest.mark.parametrize("count", [2, 3, 64, 65, 130])
def test_a_locking_read_of_many_accounts_loads_each_once_with_its_lots(
    uow: SqlUnitOfWork, count: int
) -> None:
    """On PostgreSQL the accounts go in lists of fixed lengths, padded with repeats and split
    past the longest: every account comes back once, whole; an unknown one does not."""
    names = [f"many-{n:03d}" for n in range(count)]
    for n, name in enumerate(names):
        for amount in (n + 1, 1_000):
            grant(uow, name, amount)
    with uow:
        loaded = uow.accounts.get_many_for_update([*reversed(names), "nobody", names[0]])
        if uow.database.dialect == "postgresql":
            # The listed read alone, without the one-by-one path that fills in the rest.
            rows = uow.accounts._listed(_LOCK_ACCOUNTS_LISTED, [*names, "nobody"])
            per_account = Counter(row.account_id for row in rows)
            assert per_account == dict.fromkeys(names, 2), "one row per open lot"
    assert sorted(loaded) == names
    for n, name in enumerate(names):
        assert loaded[name].account_id == name
        assert sorted(lot.remaining for lot in loaded[name].lots.values()) == [n + 1, 1_000]
