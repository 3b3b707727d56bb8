"""Real concurrency: threads with their own connections spending from one account at once.
Row locks on PostgreSQL, the single writer on SQLite: neither may overdraw or double-apply."""

from __future__ import annotations

import secrets
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, select, text

from tally.adapters.db.engine import Database
from tally.adapters.db.schema import entries
from tally.adapters.db.uow import SqlUnitOfWork
from tally.domain.errors import AccountNotFound, IdempotencyKeyReused, InsufficientCredits
from tally.domain.model import Origin
from tally.service import ledger
from tally.service.group_commit import GroupCommit
from tests.conftest import DATABASES
from tests.support import FakeClock, database

THREADS = 16
ATTEMPTS = 2_000
PRICE = 2
STOCK = 3_000  # less than ATTEMPTS * PRICE, so the account runs dry under load


@pytest.fixture(params=DATABASES)
def pooled(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Database]:
    with database(request.param, str(tmp_path), pool_size=THREADS + 4) as db:
        yield db


def _run_together(count: int, work: Callable[[int], Any]) -> list[Any]:
    barrier = threading.Barrier(count)

    def start(index: int) -> Any:
        barrier.wait()
        try:
            return work(index)
        except Exception as error:  # collected and asserted on by the caller
            return error

    with ThreadPoolExecutor(count) as pool:
        return list(pool.map(start, range(count)))


@pytest.mark.slow
@pytest.mark.parametrize("leaders", [0, 1, 3], ids=["alone", "group-commit", "three-leaders"])
def test_many_threads_never_overdraw(pooled: Database, leaders: int) -> None:
    clock = FakeClock()
    group = None
    if leaders:
        group = GroupCommit(lambda: SqlUnitOfWork(pooled, clock), max_leaders=leaders)
    uow = SqlUnitOfWork(pooled, clock)
    ledger.grant(ledger.GrantCredits(account_id="hot", amount=STOCK, idempotency_key="stock"), uow)
    outcomes: Counter[str] = Counter()
    lock = threading.Lock()

    def attempt(index: int) -> None:
        worker_uow = SqlUnitOfWork(pooled, clock, group)
        for n in range(index, ATTEMPTS, THREADS):
            key = f"spend-{n}"
            try:
                if n % 3:
                    ledger.debit(
                        ledger.DebitCredits(account_id="hot", amount=PRICE, idempotency_key=key),
                        worker_uow,
                    )
                    result = "debited"
                else:
                    # A job that reserves 2 and delivers 1: the other credit must come back.
                    hold = ledger.place_hold(
                        ledger.PlaceHold(account_id="hot", amount=PRICE, idempotency_key=key),
                        worker_uow,
                    )
                    ledger.capture(
                        ledger.CaptureHold(hold_id=hold.id, amount=1, idempotency_key=key + "c"),
                        worker_uow,
                    )
                    result = "captured"
            except InsufficientCredits:
                result = "refused"
            with lock:
                outcomes[result] += 1

    errors = [e for e in _run_together(THREADS, attempt) if e is not None]
    assert errors == []
    assert sum(outcomes.values()) == ATTEMPTS
    assert outcomes["refused"] > 0, f"the test must run the account dry: {outcomes}"
    spent = outcomes["debited"] * PRICE + outcomes["captured"] * 1
    balance = ledger.get_balance("hot", uow)
    assert balance.available == STOCK - spent >= 0
    assert balance.available < PRICE  # it ran dry: every refusal was a real shortage
    with pooled.engine.connect() as connection:
        journal_spent = connection.execute(
            select(func.sum(entries.c.amount)).where(entries.c.type.in_(["debit", "capture"]))
        ).scalar_one()
    assert journal_spent == spent
    assert ledger.check(uow).violations == []


@pytest.mark.slow
def test_batches_in_flight_at_once_keep_every_account_exact(pooled: Database) -> None:
    """Several leaders lock overlapping sets of accounts, some created on the fly: sorted
    locking means no deadlock, and every account ends exactly where its own changes put it."""
    clock = FakeClock()
    group = GroupCommit(lambda: SqlUnitOfWork(pooled, clock), max_leaders=3)
    names = [f"many-{n}" for n in range(12)]
    spent: Counter[str] = Counter()
    granted: Counter[str] = Counter()
    lock = threading.Lock()

    def work(index: int) -> None:
        uow = SqlUnitOfWork(pooled, clock, group)
        choose = secrets.SystemRandom().choice
        for n in range(60):
            name = choose(names)
            key = f"t{index}-{n}"
            try:
                if n % 4 == 0:
                    ledger.grant(
                        ledger.GrantCredits(account_id=name, amount=3, idempotency_key=key), uow
                    )
                    counter = granted
                else:
                    ledger.debit(
                        ledger.DebitCredits(account_id=name, amount=1, idempotency_key=key), uow
                    )
                    counter = spent
            except (InsufficientCredits, AccountNotFound):
                continue
            with lock:
                counter[name] += 1

    errors = [e for e in _run_together(THREADS, work) if e is not None]
    assert errors == []
    assert group.batches < group.changes, "changes must have shared transactions"
    uow = SqlUnitOfWork(pooled, clock)
    for name in names:
        if granted[name]:
            assert ledger.get_balance(name, uow).available == 3 * granted[name] - spent[name]
    assert sum(spent.values()) > 0
    assert ledger.check(uow).violations == []


@pytest.mark.slow
def test_one_key_from_eight_threads_has_exactly_one_effect(pooled: Database) -> None:
    clock = FakeClock()
    uow = SqlUnitOfWork(pooled, clock)
    ledger.grant(ledger.GrantCredits(account_id="dup", amount=100, idempotency_key="seed"), uow)
    cmd = ledger.DebitCredits(account_id="dup", amount=7, idempotency_key="same-key")
    results = _run_together(8, lambda _: ledger.debit(cmd, SqlUnitOfWork(pooled, clock)))
    assert all(not isinstance(r, Exception) for r in results), results
    assert len({r.id for r in results}) == 1
    assert ledger.get_balance("dup", uow).available == 93

    # A grant that creates the account races on the account row and on the key.
    new_account = f"new-{secrets.token_hex(4)}"
    grant = ledger.GrantCredits(account_id=new_account, amount=5, idempotency_key="first-grant")
    lots = _run_together(8, lambda _: ledger.grant(grant, SqlUnitOfWork(pooled, clock)))
    assert all(not isinstance(r, Exception) for r in lots), lots
    assert len({lot.id for lot in lots}) == 1
    assert ledger.get_balance(new_account, uow).available == 5
    assert ledger.check(uow).violations == []


@pytest.mark.slow
def test_one_key_for_different_accounts_at_once_applies_once(pooled: Database) -> None:
    """Different accounts do not share a row lock, so the key's unique constraint decides."""
    clock = FakeClock()
    uow = SqlUnitOfWork(pooled, clock)
    for n in range(8):
        ledger.grant(
            ledger.GrantCredits(account_id=f"acct-{n}", amount=10, idempotency_key=f"s{n}"), uow
        )

    def spend(n: int) -> Any:
        cmd = ledger.DebitCredits(account_id=f"acct-{n}", amount=1, idempotency_key="shared")
        return ledger.debit(cmd, SqlUnitOfWork(pooled, clock))

    results = _run_together(8, spend)
    succeeded = [r for r in results if not isinstance(r, Exception)]
    refused = [r for r in results if isinstance(r, IdempotencyKeyReused)]
    assert len(succeeded) == 1
    assert len(refused) == 7
    total = sum(ledger.get_balance(f"acct-{n}", uow).available for n in range(8))
    assert total == 79
    assert ledger.check(uow).violations == []


@pytest.mark.postgres
@pytest.mark.parametrize("many", [False, True], ids=["one-account", "a-batch"])
def test_a_locking_read_that_waited_sees_the_lots_the_holder_wrote(
    tmp_path: Path, many: bool
) -> None:
    """PostgreSQL re-reads only the locked account row after a wait; the lots joined to it
    must still be the ones the lock holder committed (a new lot, a spent one), or the next
    save would write back stale remainders."""
    with database("postgresql", str(tmp_path)) as db:
        clock = FakeClock()
        uow = SqlUnitOfWork(db, clock)
        for name in ("waited", "bystander"):
            ledger.grant(ledger.GrantCredits(account_id=name, amount=10, idempotency_key=name), uow)
        holder_locked = threading.Event()

        def holder() -> None:
            holder_uow = SqlUnitOfWork(db, clock)
            with holder_uow:
                now = clock()
                account = holder_uow.accounts.get_for_update("waited")
                assert account is not None
                account.debit(amount=4, now=now, origin=Origin("spend"))
                account.grant(
                    amount=5,
                    source="promotional",
                    expires_at=None,
                    priority=0,
                    now=now,
                    origin=Origin("top-up"),
                )
                holder_uow.accounts.save(account)
                holder_locked.set()
                _wait_for_a_lock_waiter(db)
                holder_uow.commit()

        with ThreadPoolExecutor(1) as pool:
            done = pool.submit(holder)
            assert holder_locked.wait(10)
            reader = SqlUnitOfWork(db, clock)
            with reader:
                if many:
                    loaded = reader.accounts.get_many_for_update(["bystander", "waited"])
                    account = loaded["waited"]
                else:
                    found = reader.accounts.get_for_update("waited")
                    assert found is not None
                    account = found
            done.result()
        assert sorted(lot.remaining for lot in account.lots.values()) == [5, 6]
        assert ledger.check(uow).violations == []


def _wait_for_a_lock_waiter(db: Database) -> None:
    """Block until another session waits on a row lock (the reader, behind the holder)."""
    deadline = time.monotonic() + 10
    with db.engine.connect() as connection:
        while time.monotonic() < deadline:
            waiting = connection.execute(
                text(
                    "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
                    "AND datname = current_database()"
                )
            ).scalar_one()
            connection.rollback()
            if waiting:
                return
            time.sleep(0.01)
    raise AssertionError("the reader never waited for the lock")
