"""Group commit keeps every change's meaning: refusals, keys and replays behave as alone."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Coroutine
from datetime import timedelta
from typing import Any

import pytest

from tally.adapters.db.engine import Database
from tally.adapters.db.uow import SqlUnitOfWork
from tally.domain.errors import (
    AccountNotFound,
    ApiKeyInvalid,
    HoldNotFound,
    IdempotencyKeyReused,
    InsufficientCredits,
    InvalidTime,
)
from tally.domain.model import Debit, Lot
from tally.service import ledger, platforms
from tally.service.changes import run_async
from tally.service.group_commit import GroupCommit
from tests.support import FakeClock, one_batch


def grouped(db: Database, clock: FakeClock) -> tuple[GroupCommit, SqlUnitOfWork]:
    group = GroupCommit(lambda: SqlUnitOfWork(db, clock))
    return group, SqlUnitOfWork(db, clock, group)


def committed_together(group: GroupCommit) -> None:
    assert group.fallbacks == 0, "the shared transaction must have committed"
    settled(group)


def settled(group: GroupCommit) -> None:
    """Every submitted change was answered and left: none is counted as still about."""
    assert (group._active, group._queue) == (0, [])


def test_a_batch_applies_in_order_and_refusals_stay_alone(db: Database, clock: FakeClock) -> None:
    group, uow = grouped(db, clock)
    ledger.grant(ledger.GrantCredits(account_id="ann", amount=10, idempotency_key="g"), uow)
    ledger.grant(ledger.GrantCredits(account_id="bob", amount=10, idempotency_key="g2"), uow)

    def debit(account: str, amount: int, key: str) -> Callable[[], Any]:
        cmd = ledger.DebitCredits(account_id=account, amount=amount, idempotency_key=key)
        return lambda: ledger.debit(cmd, uow)

    results = one_batch(
        group,
        [
            debit("ann", 4, "a1"),
            debit("bob", 7, "b1"),
            debit("ann", 100, "a2"),  # refused alone: insufficient
            debit("ann", 6, "a3"),  # sees the first debit of the same batch
            lambda: ledger.capture(
                ledger.CaptureHold(hold_id="hold_00000000000000000000000000", idempotency_key="c"),
                uow,
            ),
        ],
    )
    assert [r.amount for r in (results[0], results[1], results[3])] == [4, 7, 6]
    assert isinstance(results[2], InsufficientCredits)
    assert results[2].extra == {"available": 0, "required": 100}
    assert isinstance(results[4], HoldNotFound)
    committed_together(group)
    assert ledger.get_balance("ann", uow).available == 0
    assert ledger.get_balance("bob", uow).available == 3
    assert ledger.check(uow).violations == []


def test_one_key_twice_in_a_batch_has_one_effect(db: Database, clock: FakeClock) -> None:
    group, uow = grouped(db, clock)
    ledger.grant(ledger.GrantCredits(account_id="cy", amount=10, idempotency_key="g"), uow)
    same = ledger.DebitCredits(account_id="cy", amount=2, idempotency_key="k")
    other = ledger.DebitCredits(account_id="cy", amount=3, idempotency_key="k")
    results = one_batch(
        group,
        [
            lambda: ledger.debit(same, uow),
            lambda: ledger.debit(same, uow),
            lambda: ledger.debit(other, uow),
        ],
    )
    assert results[0] == results[1]
    assert isinstance(results[2], IdempotencyKeyReused)
    committed_together(group)
    assert ledger.get_balance("cy", uow).available == 8


def test_a_stored_key_in_a_batch_replays_and_the_rest_still_apply(
    db: Database, clock: FakeClock
) -> None:
    """The shared transaction loses to the stored key; every change then runs alone."""
    group, uow = grouped(db, clock)
    ledger.grant(ledger.GrantCredits(account_id="di", amount=10, idempotency_key="g"), uow)
    first = ledger.debit(ledger.DebitCredits(account_id="di", amount=1, idempotency_key="old"), uow)
    again = ledger.DebitCredits(account_id="di", amount=1, idempotency_key="old")
    fresh = ledger.DebitCredits(account_id="di", amount=2, idempotency_key="new")
    results = one_batch(group, [lambda: ledger.debit(fresh, uow), lambda: ledger.debit(again, uow)])
    assert results[0].amount == 2
    assert results[1] == first
    assert group.fallbacks == 1  # the stored key made the shared transaction fail
    assert ledger.get_balance("di", uow).available == 7
    assert ledger.check(uow).violations == []


def test_results_are_snapshots_taken_when_each_change_applied(
    db: Database, clock: FakeClock
) -> None:
    group, uow = grouped(db, clock)
    results = one_batch(
        group,
        [
            lambda: ledger.grant(
                ledger.GrantCredits(account_id="ed", amount=5, idempotency_key="g"), uow
            ),
            lambda: ledger.debit(
                ledger.DebitCredits(account_id="ed", amount=5, idempotency_key="d"), uow
            ),
        ],
    )
    lot = results[0]
    assert lot.remaining == 5  # as granted, not as the debit later in the batch left it
    committed_together(group)
    assert (
        ledger.grant(ledger.GrantCredits(account_id="ed", amount=5, idempotency_key="g"), uow)
        == lot
    )


@pytest.mark.slow
def test_many_threads_through_the_group_never_overdraw(db: Database, clock: FakeClock) -> None:
    group, uow = grouped(db, clock)
    ledger.grant(ledger.GrantCredits(account_id="hot", amount=500, idempotency_key="s"), uow)
    outcomes: list[str] = []
    lock = threading.Lock()

    def spend(index: int) -> None:
        for n in range(index, 600, 12):
            cmd = ledger.DebitCredits(account_id="hot", amount=1, idempotency_key=f"k{n}")
            try:
                ledger.debit(cmd, uow)
                result = "ok"
            except InsufficientCredits:
                result = "refused"
            with lock:
                outcomes.append(result)

    threads = [threading.Thread(target=spend, args=(i,)) for i in range(12)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert outcomes.count("ok") == 500
    assert outcomes.count("refused") == 100
    assert ledger.get_balance("hot", uow).available == 0
    assert ledger.check(uow).violations == []
    assert group.changes >= 600


def test_a_change_under_a_revoked_key_is_refused_in_the_shared_transaction(
    db: Database, clock: FakeClock
) -> None:
    """The HTTP spend routes trust a cached key; the batch re-checks it (UnitOfWork.credential),
    so a key revoked a moment ago is refused, while its batch-mates commit."""
    group, uow = grouped(db, clock)
    good = platforms.create_platform("site", "spend", SqlUnitOfWork(db, clock)).record.prefix
    gone = platforms.create_key("site", "spend", SqlUnitOfWork(db, clock)).record.prefix
    platforms.revoke_key(gone, SqlUnitOfWork(db, clock))
    for account in ("ann", "bob"):
        ledger.grant(
            ledger.GrantCredits(account_id=account, amount=10, idempotency_key=account), uow
        )

    def debit(account: str, key: str, credential: str) -> Callable[[], Any]:
        unit = SqlUnitOfWork(db, clock, group)
        unit.credential = credential
        cmd = ledger.DebitCredits(account_id=account, amount=3, idempotency_key=key)
        return lambda: ledger.debit(cmd, unit)

    results = one_batch(
        group,
        [
            debit("ann", "k1", good),
            debit("bob", "k2", gone),
            debit("bob", "k3", "tly_nosuchkey"),
            debit("bob", "k4", good),
        ],
    )
    assert [type(result) for result in results] == [Debit, ApiKeyInvalid, ApiKeyInvalid, Debit]
    committed_together(group)
    assert ledger.get_balance("ann", uow).available == 7
    assert ledger.get_balance("bob", uow).available == 7  # only k4 spent


# --- changes submitted from an event loop (the HTTP spend routes) ---------------------------


async def awaited_debit(
    db: Database, clock: FakeClock, group: GroupCommit, account: str, key: str
) -> Debit:
    """A debit of 1 as the HTTP spend route makes it: built, then awaited in the group."""
    unit = SqlUnitOfWork(db, clock, group)
    cmd = ledger.DebitCredits(account_id=account, amount=1, idempotency_key=key)
    return await run_async(unit, ledger.debit_change(cmd))


def test_changes_from_an_event_loop_share_batches_and_refusals_surface(
    db: Database, clock: FakeClock
) -> None:
    """Many debits awaited at once on one loop: they share transactions, each caller gets its
    own result or its own refusal, and the account ends exact."""
    group, uow = grouped(db, clock)
    ledger.grant(ledger.GrantCredits(account_id="loop", amount=50, idempotency_key="g"), uow)

    async def everything() -> list[Any]:
        spends = (awaited_debit(db, clock, group, "loop", f"d{n}") for n in range(80))
        return await asyncio.gather(*spends, return_exceptions=True)

    results = asyncio.run(everything())
    debits = [r for r in results if isinstance(r, Debit)]
    refused = [r for r in results if isinstance(r, InsufficientCredits)]
    assert len(debits) == 50, [r for r in results if not isinstance(r, Debit)][:3]
    assert len(refused) == 30
    assert len({d.id for d in debits}) == 50
    assert group.batches < group.changes, "awaited changes must have shared transactions"
    settled(group)
    assert ledger.get_balance("loop", uow).available == 0
    assert ledger.check(uow).violations == []


def test_an_awaited_change_replays_its_key_like_a_threaded_one(
    db: Database, clock: FakeClock
) -> None:
    group, uow = grouped(db, clock)
    ledger.grant(ledger.GrantCredits(account_id="rep", amount=9, idempotency_key="g"), uow)
    cmd = ledger.DebitCredits(account_id="rep", amount=2, idempotency_key="once")
    first = ledger.debit(cmd, SqlUnitOfWork(db, clock, group))
    unit = SqlUnitOfWork(db, clock, group)
    again = asyncio.run(run_async(unit, ledger.debit_change(cmd)))
    assert again == first
    assert unit.replayed
    other = ledger.DebitCredits(account_id="rep", amount=3, idempotency_key="once")
    with pytest.raises(IdempotencyKeyReused):
        asyncio.run(run_async(SqlUnitOfWork(db, clock, group), ledger.debit_change(other)))
    assert ledger.get_balance("rep", uow).available == 7


def test_cancelled_waiters_neither_stall_the_queue_nor_lose_a_lead(
    db: Database, clock: FakeClock
) -> None:
    """A request cancelled while its change waits (a client gone) must not leave a lead
    untaken: every later change still completes, and what committed is exactly what the
    journal shows."""
    group, uow = grouped(db, clock)
    ledger.grant(ledger.GrantCredits(account_id="gone", amount=1_000, idempotency_key="g"), uow)

    def spend(n: int) -> Coroutine[Any, Any, Debit]:
        return awaited_debit(db, clock, group, "gone", f"c{n}")

    async def everything() -> list[Any]:
        tasks = [asyncio.create_task(spend(n)) for n in range(60)]
        await asyncio.sleep(0)  # every task has queued its change
        for task in tasks[::3]:
            task.cancel()
        # A stalled queue fails here, after the timeout, rather than hanging the run.
        done = await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 30)
        later = await asyncio.wait_for(spend(1_000), timeout=30)  # the queue still moves
        return [*done, later]

    results = asyncio.run(everything())
    completed = [r for r in results if isinstance(r, Debit)]
    assert len(completed) >= 41  # the 40 never cancelled, and the one after
    assert all(isinstance(r, Debit | asyncio.CancelledError) for r in results), results
    spent = 1_000 - ledger.get_balance("gone", uow).available
    assert len(completed) <= spent <= 61  # cancelled changes may still have committed
    settled(group)
    assert ledger.check(uow).violations == []


def test_threads_and_an_event_loop_share_one_group(db: Database, clock: FakeClock) -> None:
    group, uow = grouped(db, clock)
    ledger.grant(ledger.GrantCredits(account_id="mix", amount=400, idempotency_key="g"), uow)

    def threaded(index: int) -> None:
        unit = SqlUnitOfWork(db, clock, group)
        for n in range(25):
            cmd = ledger.DebitCredits(account_id="mix", amount=1, idempotency_key=f"t{index}-{n}")
            ledger.debit(cmd, unit)

    async def awaited() -> None:
        await asyncio.gather(*(awaited_debit(db, clock, group, "mix", f"a{n}") for n in range(200)))

    threads = [threading.Thread(target=threaded, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    asyncio.run(awaited())
    for thread in threads:
        thread.join(timeout=60)
    settled(group)
    assert ledger.get_balance("mix", uow).available == 100
    assert ledger.check(uow).violations == []


def test_a_second_lead_waits_until_the_first_batch_is_decided(
    db: Database, clock: FakeClock
) -> None:
    """With two leads, a change that arrives while the first leader still reads and decides
    its batch does not lead a batch of its own at once: it waits, and starts as soon as the
    first batch goes to the database. Both changes then apply."""
    entered, release = threading.Event(), threading.Event()
    readers: list[str] = []

    def gated_clock() -> Any:
        # Every unit of work of the group reads the clock first: who reads it, leads.
        name = threading.current_thread().name
        readers.append(name)
        if name == "first" and not release.is_set():
            entered.set()
            assert release.wait(10)
        return clock()

    group = GroupCommit(lambda: SqlUnitOfWork(db, gated_clock), max_leaders=2)
    ledger.grant(
        ledger.GrantCredits(account_id="two", amount=10, idempotency_key="g"),
        SqlUnitOfWork(db, clock),
    )
    results: dict[str, Debit] = {}

    def spend(key: str) -> None:
        cmd = ledger.DebitCredits(account_id="two", amount=1, idempotency_key=key)
        results[key] = ledger.debit(cmd, SqlUnitOfWork(db, clock, group))

    first = threading.Thread(target=spend, args=("a",), name="first")
    first.start()
    assert entered.wait(10), "the first change leads"
    second = threading.Thread(target=spend, args=("b",), name="second")
    second.start()
    time.sleep(0.2)  # long enough for a promoted second leader to read its clock
    assert readers == ["first"], "a second leader started while the first was deciding"
    release.set()
    for thread in (first, second):
        thread.join(timeout=30)
    assert sorted(results) == ["a", "b"]
    assert readers == ["first", "second"]
    assert ledger.get_balance("two", SqlUnitOfWork(db, clock)).available == 8


def test_a_batch_larger_than_one_statement_lands_whole(db: Database, clock: FakeClock) -> None:
    """On PostgreSQL a batch's writes go joined into statements of limited size: a batch of
    new lots, new holds with their allocations, and debits across two lots per account
    spans several, each part naming rows another part of the same statement adds."""
    group, uow = grouped(db, clock)
    people = [f"p{n:02d}" for n in range(20)]  # 60 changes: one batch of at most 64
    for person in people:
        for lot in range(2):
            cmd = ledger.GrantCredits(
                account_id=person, amount=5, idempotency_key=f"g{lot}-{person}"
            )
            ledger.grant(cmd, uow)

    def grant(person: str) -> Callable[[], Any]:
        cmd = ledger.GrantCredits(account_id=person, amount=3, idempotency_key=f"g-{person}")
        return lambda: ledger.grant(cmd, uow)

    def hold(person: str) -> Callable[[], Any]:
        cmd = ledger.PlaceHold(account_id=person, amount=2, idempotency_key=f"h-{person}")
        return lambda: ledger.place_hold(cmd, uow)

    def debit(person: str) -> Callable[[], Any]:
        cmd = ledger.DebitCredits(account_id=person, amount=7, idempotency_key=f"d-{person}")
        return lambda: ledger.debit(cmd, uow)

    calls = [make(person) for person in people for make in (debit, grant, hold)]
    results = one_batch(group, calls)
    assert not [r for r in results if isinstance(r, Exception)], results
    committed_together(group)
    for person in people:
        balance = ledger.get_balance(person, uow)
        assert (balance.available, balance.held) == (5 + 5 - 7 + 3 - 2, 2)
    assert ledger.check(uow).violations == []


def test_a_leader_with_company_pauses_until_callers_stop_arriving(
    db: Database, clock: FakeClock
) -> None:
    """A caller answered a moment ago is still about (in a closed loop it submits again at
    once): the next leader pauses, the caller's new change joins its batch, and the leader
    stops pausing at the first pause that brings nobody."""
    pauses: list[int] = []

    def pause() -> None:
        pauses.append(len(group._queue))
        if len(pauses) == 1:  # the caller on its way back submits during the first pause
            group._active -= 1  # it left...
            late.start()  # ...and comes back with a new change
            wait_for_queue(2)

    def wait_for_queue(length: int) -> None:
        deadline = time.monotonic() + 10
        while len(group._queue) < length:
            assert time.monotonic() < deadline, "a caller never queued"
            time.sleep(0.001)

    group = GroupCommit(lambda: SqlUnitOfWork(db, clock), pause=pause)
    uow = SqlUnitOfWork(db, clock, group)
    ledger.grant(ledger.GrantCredits(account_id="co", amount=10, idempotency_key="g"), uow)
    assert pauses == [], "a change alone does not pause"

    def spend(key: str) -> None:
        cmd = ledger.DebitCredits(account_id="co", amount=1, idempotency_key=key)
        ledger.debit(cmd, SqlUnitOfWork(db, clock, group))

    late = threading.Thread(target=spend, args=("late",))
    first = threading.Thread(target=spend, args=("first",))
    with group._lock:
        group._leaders = group._max_leaders  # every lead taken: the first change queues
        group._active += 1  # and one caller, just answered, is on its way back
    first.start()
    wait_for_queue(1)
    batches, changes = group.batches, group.changes
    with group._lock:
        group._queue[0].decide("lead")
    first.join(timeout=30)
    assert pauses == [1, 2], "one pause brought a change, the next brought none"
    late.join(timeout=30)
    assert (group.batches - batches, group.changes - changes) == (1, 2)
    committed_together(group)
    assert ledger.get_balance("co", uow).available == 8


def test_a_batch_creates_no_account(db: Database, clock: FakeClock) -> None:
    """A grant creates its own account only, and only if it succeeds: a change to an account
    that does not exist answers as it would alone."""
    group, uow = grouped(db, clock)
    ledger.grant(ledger.GrantCredits(account_id="dee", amount=10, idempotency_key="g"), uow)
    past = clock() - timedelta(minutes=1)

    def call(change: Callable[..., Any], **fields: Any) -> Callable[[], Any]:
        command = {ledger.grant: ledger.GrantCredits, ledger.debit: ledger.DebitCredits}
        return lambda: change(command[change](**fields), uow)

    results = one_batch(
        group,
        [
            call(ledger.grant, account_id="eve", amount=5, idempotency_key="g1"),
            call(ledger.debit, account_id="bob", amount=1, idempotency_key="d2"),
            call(ledger.grant, account_id="cy", amount=5, expires_at=past, idempotency_key="g2"),
            call(ledger.debit, account_id="dee", amount=4, idempotency_key="d3"),
        ],
    )
    assert [type(r) for r in results] == [Lot, AccountNotFound, InvalidTime, Debit]
    assert ledger.get_balance("eve", uow).available == 5
    assert ledger.get_balance("dee", uow).available == 6
    for absent in ("bob", "cy"):
        with pytest.raises(AccountNotFound):
            ledger.get_balance(absent, uow)
    assert ledger.check(uow).violations == []
    committed_together(group)
