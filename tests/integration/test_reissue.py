"""Lost codes on SQLite and PostgreSQL: a reissue voids the old code and emails a new one with
the original validity, to the order's address only; refusals; idempotent replays; the public
/lost-code path (same answer, once per order per hour, rate limited per client address); and
support's order search."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from datetime import timedelta
from pathlib import Path
from typing import Any, Self

import pytest
from sqlalchemy import select, text, update
from sqlalchemy.exc import IntegrityError

from tally.adapters.db.engine import Database
from tally.adapters.db.schema import codes as codes_table
from tally.adapters.db.schema import orders as orders_table
from tally.adapters.db.uow import SqlUnitOfWork
from tally.adapters.mail import Templates
from tally.domain import codes, values
from tally.domain.commerce import CodeStatus, Order, OrderStatus, Sale
from tally.domain.errors import (
    AccountNotFound,
    CodeAlreadyRedeemed,
    CodeInvalidOrUsed,
    IdempotencyKeyReused,
    InvalidEmail,
    InvalidIdempotencyKey,
    InvalidInput,
    OrderExpired,
    OrderNotFound,
    OrderReversed,
    RateLimited,
)
from tally.domain.model import REASON_MAX_LENGTH
from tally.service import commerce, ledger, orders
from tally.service.ports import Email
from tests.conftest import DATABASES
from tests.support import CATALOG, LINKS, PEPPER, FakeClock, Outbox, database


def _deliver(uow: SqlUnitOfWork) -> list[Email]:
    mail = Outbox()
    commerce.deliver_mail(uow, mail, Templates(), LINKS)
    return mail.sent


def _code_in(email: Email) -> str:
    for word in email.text.split():
        if codes.normalise(word) is not None:
            return word
    raise AssertionError("no code in the email")


def _buy(uow: SqlUnitOfWork, clock: FakeClock, sale_id: str = "sale-1", **changes: Any) -> Order:
    sale = Sale(
        processor="gumroad",
        sale_id=sale_id,
        package=CATALOG.packages["pro"],
        email="ana@example.com",
        purchased_at=clock(),
        price=2000,
        order_number=f"n-{sale_id}",
    )
    order = commerce.fulfil(replace(sale, **changes), uow, pepper=PEPPER, links=LINKS).order
    clock.advance(seconds=1)  # codes listed oldest first: the original before its replacement
    return order


def _reissue(uow: SqlUnitOfWork, order_id: str, key: str = "r-1", **more: Any) -> Order:
    return orders.reissue_code(
        orders.ReissueCode(order_id=order_id, idempotency_key=key, **more),
        uow,
        pepper=PEPPER,
        links=LINKS,
        catalog=CATALOG,
    )


def _redeem(uow: SqlUnitOfWork, code: str, account: str = "ana", key: str = "k") -> int:
    lot = commerce.redeem(
        commerce.Redeem(code=code, account_id=account, idempotency_key=key), uow, pepper=PEPPER
    )
    return lot.amount


def _codes(db: Database, order_id: str) -> list[tuple[str, str]]:
    with db.engine.connect() as connection:
        rows = connection.execute(
            select(codes_table.c.status, codes_table.c.last4)
            .where(codes_table.c.order_id == order_id)
            .order_by(codes_table.c.created_at, codes_table.c.code_id)
        )
        return [(row.status, row.last4) for row in rows]


def test_a_reissue_voids_the_old_code_and_the_new_one_keeps_the_validity(
    db: Database, uow: SqlUnitOfWork, clock: FakeClock
) -> None:
    order = _buy(uow, clock)
    [first] = _deliver(uow)
    old = _code_in(first)
    clock.advance(days=200)

    again = _reissue(uow, order.id, reason="lost in spam", platform_id="plat_x")
    assert again == order
    [replacement] = _deliver(uow)
    assert replacement.to == "ana@example.com"
    assert replacement.subject == "Your new code for Pro"
    assert "http://tally.test/lost-code" in replacement.text
    new = _code_in(replacement)
    assert codes.normalise(new) != codes.normalise(old)
    assert [s for s, _ in _codes(db, order.id)] == ["void", "issued"]

    with pytest.raises(CodeInvalidOrUsed):
        _redeem(uow, old, key="old")
    assert _redeem(uow, new, key="new") == 25
    [lot] = ledger.list_lots("ana", uow)[0].items
    assert lot.expires_at == order.expires_at  # two years from the purchase, not the reissue
    assert order.expires_at is not None
    assert order.expires_at - order.purchased_at > timedelta(days=700)
    assert ledger.check(uow).violations == []


def test_a_gift_is_reissued_to_its_recipient(uow: SqlUnitOfWork, clock: FakeClock) -> None:
    order = _buy(uow, clock, email="bo@example.com", gifter_email="ana@example.com", price=0)
    _deliver(uow)
    _reissue(uow, order.id)
    [replacement] = _deliver(uow)
    assert replacement.to == "bo@example.com"
    assert _redeem(uow, _code_in(replacement), account="bo") == 25


def test_refusals(db: Database, uow: SqlUnitOfWork, clock: FakeClock) -> None:
    with pytest.raises(OrderNotFound):
        _reissue(uow, "ord_00000000000000000000000000")
    with pytest.raises(OrderNotFound):
        _reissue(uow, "not an id\x00")
    with pytest.raises(InvalidIdempotencyKey):
        _reissue(uow, "ord_00000000000000000000000000", key="")
    order = _buy(uow, clock)
    with pytest.raises(InvalidInput):
        _reissue(uow, order.id, reason="x" * (REASON_MAX_LENGTH + 1))

    _redeem(uow, _code_in(_deliver(uow)[0]))
    with pytest.raises(CodeAlreadyRedeemed) as redeemed:
        _reissue(uow, order.id, key="r-2")
    assert redeemed.value.status == 409
    assert redeemed.value.code == "code_already_redeemed"

    for status in (OrderStatus.REFUNDED, OrderStatus.DISPUTED):
        other = _buy(uow, clock, sale_id=f"sale-{status.value}")
        with db.engine.begin() as connection:
            connection.execute(
                update(orders_table)
                .where(orders_table.c.order_id == other.id)
                .values(status=status.value, **{f"{status.value}_at": clock()})
            )
        with pytest.raises(OrderReversed) as reversed_:
            _reissue(uow, other.id, key=f"r-{status.value}")
        assert reversed_.value.code == "order_reversed"
        assert [s for s, _ in _codes(db, other.id)] == ["issued"]  # nothing changed
    assert len(_deliver(uow)) == 2  # the two purchases' own emails, no replacement


def test_an_order_whose_credits_expired_is_not_reissued(
    db: Database, uow: SqlUnitOfWork, clock: FakeClock
) -> None:
    order = _buy(uow, clock)
    _deliver(uow)
    assert order.expires_at is not None
    clock.set(order.expires_at)
    with pytest.raises(OrderExpired) as expired:
        _reissue(uow, order.id, reason="lost")
    assert (expired.value.status, expired.value.code) == (409, "order_expired")
    assert expired.value.extra["expires_at"] == values.format_time(order.expires_at)
    assert [s for s, _ in _codes(db, order.id)] == ["issued"]  # nothing changed
    assert _deliver(uow) == []


def test_a_replay_answers_the_first_result_and_issues_no_second_code(
    db: Database, uow: SqlUnitOfWork, clock: FakeClock
) -> None:
    order = _buy(uow, clock)
    _deliver(uow)
    first = _reissue(uow, order.id, key="same", reason="lost")
    assert uow.replayed is False
    clock.advance(minutes=5)
    assert _reissue(uow, order.id, key="same", reason="lost") == first
    assert uow.replayed is True
    assert [s for s, _ in _codes(db, order.id)] == ["void", "issued"]
    [replacement] = _deliver(uow)
    with pytest.raises(IdempotencyKeyReused):
        _reissue(uow, order.id, key="same", reason="another reason")
    # Once the new code is redeemed, the replay still answers what it answered then.
    _redeem(uow, _code_in(replacement))
    assert _reissue(uow, order.id, key="same", reason="lost") == first
    assert uow.replayed is True
    with pytest.raises(CodeAlreadyRedeemed):
        _reissue(uow, order.id, key="another")


@pytest.mark.parametrize("kind", DATABASES)
def test_concurrent_reissues_with_one_key_make_one_code(
    kind: str, tmp_path: Path, clock: FakeClock
) -> None:
    with database(kind, str(tmp_path)) as db:
        order = _buy(SqlUnitOfWork(db, clock), clock)
        with ThreadPoolExecutor(4) as pool:
            answers = list(
                pool.map(lambda _: _reissue(SqlUnitOfWork(db, clock), order.id), range(4))
            )
        assert all(answer == order for answer in answers)
        assert sorted(s for s, _ in _codes(db, order.id)) == ["issued", "void"]


class _Paused(SqlUnitOfWork):
    """A unit of work that, once its commerce repository's `method` has returned (the rows it
    locks are locked), sets `holding` and waits for `go`: it keeps its transaction open while
    the other side starts."""

    def __init__(self, db: Database, clock: FakeClock, method: str) -> None:
        super().__init__(db, clock)
        self.method = method
        self.holding = threading.Event()
        self.go = threading.Event()

    def __enter__(self) -> Self:
        entered = super().__enter__()
        real = getattr(self.commerce, self.method)

        def held(*args: Any) -> Any:
            found = real(*args)
            self.holding.set()
            assert self.go.wait(30), "the test never let the first side go"
            return found

        setattr(self.commerce, self.method, held)
        return entered


class _Watched(SqlUnitOfWork):
    """A unit of work that tells which database session it runs in (PostgreSQL's backend pid)
    or, on SQLite, that it is about to wait for the in-process write lock."""

    def __init__(self, db: Database, clock: FakeClock) -> None:
        super().__init__(db, clock)
        self.pids: list[int] = []
        self.starting = threading.Event()

    def __enter__(self) -> Self:
        self.starting.set()
        entered = super().__enter__()
        if self.database.dialect == "postgresql":
            assert self._connection is not None
            driver = self._connection.connection.driver_connection
            assert driver is not None
            self.pids.append(driver.info.backend_pid)
        return entered


def _wait_until_blocked(db: Database, second: _Watched) -> None:
    """Until the second side waits for the first one's locks: on PostgreSQL its session waits on
    a lock; on SQLite it has begun taking the write lock the first side holds."""
    assert second.starting.wait(30)
    if db.dialect != "postgresql":
        return
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if second.pids:
            with db.engine.connect() as connection:
                waiting = connection.execute(
                    text("SELECT wait_event_type FROM pg_stat_activity WHERE pid = :pid"),
                    {"pid": second.pids[-1]},
                ).scalar()
            if waiting == "Lock":
                return
        time.sleep(0.01)
    raise AssertionError("the second side never waited for the first one's locks")


def _race_setup(db: Database, clock: FakeClock, sale_id: str = "sale-1") -> tuple[Order, str]:
    uow = SqlUnitOfWork(db, clock)
    _deliver(uow)  # an earlier round's replacement code
    order = _buy(uow, clock, sale_id)
    [purchase] = _deliver(uow)
    return order, _code_in(purchase)


def _credits(db: Database, clock: FakeClock, account: str) -> list[int]:
    """The amounts of the account's lots; none when the account was never credited."""
    try:
        page, _ = ledger.list_lots(account, SqlUnitOfWork(db, clock))
    except AccountNotFound:
        return []
    return [lot.amount for lot in page.items]


def _reissue_outcome(uow: SqlUnitOfWork, order_id: str) -> str:
    try:
        _reissue(uow, order_id, key=f"r-{order_id}")
    except CodeAlreadyRedeemed:
        return "refused"
    return "reissued"


def _redeem_outcome(uow: SqlUnitOfWork, code: str) -> str:
    try:
        _redeem(uow, code)
    except CodeInvalidOrUsed:
        return "refused"
    return "redeemed"


@pytest.mark.parametrize("first", ["reissue", "redeem"])
@pytest.mark.parametrize("kind", DATABASES)
def test_a_reissue_racing_a_redemption_leaves_one_usable_code(
    kind: str, first: str, tmp_path: Path, clock: FakeClock
) -> None:
    """Both orders, every run: the first side stops inside its transaction with its rows
    locked; the second starts and is seen waiting for those locks; then the first goes on."""
    with database(kind, str(tmp_path)) as db:
        order, code = _race_setup(db, clock)
        held = _Paused(
            db, clock, "codes_of_order_for_update" if first == "reissue" else "code_for_update"
        )
        waiting = _Watched(db, clock)
        reissuer, redeemer = (held, waiting) if first == "reissue" else (waiting, held)
        with ThreadPoolExecutor(2) as pool:
            if first == "reissue":
                one = pool.submit(_reissue_outcome, reissuer, order.id)
                assert held.holding.wait(30)
                other = pool.submit(_redeem_outcome, redeemer, code)
            else:
                one = pool.submit(_redeem_outcome, redeemer, code)
                assert held.holding.wait(30)
                other = pool.submit(_reissue_outcome, reissuer, order.id)
            _wait_until_blocked(db, waiting)
            held.go.set()
            outcome = (one.result(30), other.result(30))
        states = [s for s, _ in _codes(db, order.id)]
        if first == "reissue":
            # The redemption waited, then read the voided code: refused.
            assert outcome == ("reissued", "refused")
            assert states == ["void", "issued"]
            assert _credits(db, clock, "ana") == []
        else:
            # The reissue waited, then read the redeemed code: refused, nothing issued.
            assert outcome == ("redeemed", "refused")
            assert states == ["redeemed"]
            assert _credits(db, clock, "ana") == [25]
        assert ledger.check(SqlUnitOfWork(db, clock)).violations == []


@pytest.mark.parametrize("kind", DATABASES)
def test_a_reissue_and_a_redemption_started_together_leave_one_usable_code(
    kind: str, tmp_path: Path, clock: FakeClock
) -> None:
    """Unsteered: both released by one barrier, several times; whichever wins, the other is
    refused and exactly one code can still give credits."""
    with database(kind, str(tmp_path)) as db:
        for round_ in range(6):
            order, code = _race_setup(db, clock, f"sale-{round_}")
            account = f"ana-{round_}"
            barrier = threading.Barrier(2)

            def reissue(order_id: str = order.id, barrier: threading.Barrier = barrier) -> str:
                barrier.wait(10)
                return _reissue_outcome(SqlUnitOfWork(db, clock), order_id)

            def redeem(
                code: str = code, account: str = account, barrier: threading.Barrier = barrier
            ) -> str:
                barrier.wait(10)
                try:
                    _redeem(SqlUnitOfWork(db, clock), code, account=account, key=account)
                except CodeInvalidOrUsed:
                    return "refused"
                return "redeemed"

            with ThreadPoolExecutor(2) as pool:
                reissued, redeemed = pool.submit(reissue), pool.submit(redeem)
                outcome = (reissued.result(30), redeemed.result(30))
            states = [s for s, _ in _codes(db, order.id)]
            assert (outcome, states) in (
                (("reissued", "refused"), ["void", "issued"]),
                (("refused", "redeemed"), ["redeemed"]),
            )
            assert _credits(db, clock, account) == ([25] if outcome[1] == "redeemed" else [])
        assert ledger.check(SqlUnitOfWork(db, clock)).violations == []


# --- the /lost-code path ----------------------------------------------------------------------


def _lost(uow: SqlUnitOfWork, email: str, number: str, address: str = "10.0.0.1") -> None:
    orders.request_lost_code(
        email, number, uow, client_address=address, pepper=PEPPER, links=LINKS, catalog=CATALOG
    )


def test_the_page_reissues_to_the_order_address_once_an_hour(
    db: Database, uow: SqlUnitOfWork, clock: FakeClock
) -> None:
    order = _buy(uow, clock)
    gift = _buy(uow, clock, sale_id="g", email="bo@example.com", gifter_email="cy@example.com")
    _deliver(uow)

    _lost(uow, "someone@else.example", order.order_number)  # wrong pair: nothing happens
    _lost(uow, "ana@example.com", "n-nope")
    _lost(uow, "ana@example.com", gift.order_number)  # another person's order number
    assert _deliver(uow) == []
    assert [s for s, _ in _codes(db, order.id)] == ["issued"]

    _lost(uow, " ANA@example.com ", order.order_number, address="10.0.0.2")
    [sent] = _deliver(uow)
    assert sent.to == "ana@example.com"
    _lost(uow, "ana@example.com", order.order_number, address="10.0.0.2")  # within the hour
    assert _deliver(uow) == []
    clock.advance(minutes=61)
    _lost(uow, "ana@example.com", order.order_number, address="10.0.0.2")
    [again] = _deliver(uow)
    assert [s for s, _ in _codes(db, order.id)] == ["void", "void", "issued"]

    _lost(uow, "cy@example.com", gift.order_number, address="10.0.0.3")  # the gifter asks
    [to_recipient] = _deliver(uow)
    assert to_recipient.to == "bo@example.com"

    _redeem(uow, _code_in(again))
    clock.advance(hours=2)
    _lost(uow, "ana@example.com", order.order_number, address="10.0.0.4")
    assert _deliver(uow) == []  # redeemed: nothing to replace, and the same answer


def test_the_page_is_rate_limited_per_client_address(uow: SqlUnitOfWork, clock: FakeClock) -> None:
    for _ in range(orders.LOST_CODE_ATTEMPTS_PER_WINDOW):
        _lost(uow, "x@example.com", "1")
    with pytest.raises(RateLimited) as limited:
        _lost(uow, "x@example.com", "1")
    assert 1 <= limited.value.retry_after <= 3600
    _lost(uow, "x@example.com", "1", address="10.9.9.9")  # another address is not affected
    clock.advance(minutes=61)
    _lost(uow, "x@example.com", "1")


@pytest.mark.parametrize(
    ("email", "number"), [("a@b.c", ""), ("a@b.c", "1" * 200), ("a@b.c", "1\x00")]
)
def test_the_page_takes_junk_without_a_word(
    uow: SqlUnitOfWork, clock: FakeClock, email: str, number: str
) -> None:
    _lost(uow, email, number)
    assert _deliver(uow) == []


@pytest.mark.parametrize("email", ["", "x" * 400, "a\x00@b.c", "a@b.c\r\nBcc: c@d.e"])
def test_the_page_refuses_what_is_not_an_address(
    uow: SqlUnitOfWork, clock: FakeClock, email: str
) -> None:
    with pytest.raises(InvalidEmail):
        _lost(uow, email, "1")
    assert _deliver(uow) == []


# --- support's search -------------------------------------------------------------------------


def test_find_orders_by_email_or_number_with_the_code(uow: SqlUnitOfWork, clock: FakeClock) -> None:
    bought = []
    for n in range(5):
        bought.append(_buy(uow, clock, sale_id=f"s{n}"))
        clock.advance(seconds=1)
    other = _buy(uow, clock, sale_id="o", email="Bo@Example.com")
    _redeem(uow, _code_in(_deliver(uow)[0]))  # the first order's code
    _reissue(uow, bought[1].id)

    page = orders.find_orders(uow, email="ANA@example.com", limit=2)
    assert [s.order.id for s in page.items] == [bought[4].id, bought[3].id]  # newest first
    assert page.has_more
    rest = orders.find_orders(uow, email="ana@example.com", limit=10, starting_after=bought[3].id)
    assert [s.order.id for s in rest.items] == [bought[2].id, bought[1].id, bought[0].id]
    assert not rest.has_more
    statuses = {s.order.id: s.code_status for s in rest.items}
    assert statuses == {
        bought[2].id: CodeStatus.ISSUED,
        bought[1].id: CodeStatus.ISSUED,  # the replacement, not the voided one
        bought[0].id: CodeStatus.REDEEMED,
    }
    assert all(s.code_last4 is not None and len(s.code_last4) == 4 for s in rest.items)

    [found] = orders.find_orders(uow, order_number=other.order_number, limit=10).items
    assert found.order == other
    both = orders.find_orders(uow, email="bo@example.com", order_number="n-s1", limit=10)
    assert both.items == []

    bad_filters: list[dict[str, Any]] = [
        {},
        {"email": "  "},
        {"email": "a@b.c", "limit": 0},
        {"email": "a@b.c", "limit": 501},
        {"email": "a@b.c", "starting_after": "nope"},
        {"email": "a\x00"},
        {"order_number": "1" * 129},
    ]
    for bad in bad_filters:
        with pytest.raises(InvalidInput):
            orders.find_orders(uow, **{"limit": 10, **bad})


def test_the_page_sends_nothing_for_an_expired_order(uow: SqlUnitOfWork, clock: FakeClock) -> None:
    order = _buy(uow, clock)
    _deliver(uow)
    assert order.expires_at is not None
    clock.set(order.expires_at + timedelta(seconds=1))
    _lost(uow, "ana@example.com", order.order_number)
    assert _deliver(uow) == []


def test_the_database_refuses_a_second_live_code_for_an_order(
    db: Database, uow: SqlUnitOfWork, clock: FakeClock
) -> None:
    """Rule 10 checked twice: the reissue voids before it issues, and a unique index over an
    order's issued codes refuses anything that would leave two codes that redeem."""
    order = _buy(uow, clock)
    _reissue(uow, order.id)  # void then issue: allowed
    with db.engine.begin() as connection:
        live = connection.execute(
            select(codes_table).where(
                codes_table.c.order_id == order.id, codes_table.c.status == "issued"
            )
        ).one()
    row = {**live._mapping, "code_id": "code_second", "digest": "v1:second"}
    with pytest.raises(IntegrityError), db.engine.begin() as connection:
        connection.execute(codes_table.insert().values(**row))
