"""Rate limits on failed redemptions hold under concurrency, cannot be turned against a person,
cap a platform however it rotates accounts and addresses, and count code look-ups too.

The scheme is service/limits.py's: through a platform, per account, per address and per
platform; on the public /redeem page, per address and for the page, never per account."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import func, select

from tally.adapters.db.engine import Database
from tally.adapters.db.schema import redemption_failures
from tally.adapters.db.uow import SqlUnitOfWork
from tally.adapters.mail import Templates
from tally.domain import codes, values
from tally.domain.commerce import Sale
from tally.domain.errors import CodeInvalidOrUsed, RateLimited, SignInFailed
from tally.entrypoints.http import edge
from tally.entrypoints.worker import Worker
from tally.service import commerce, limits, orders, staff
from tests.conftest import DATABASES
from tests.security.conftest import MakeShop, Shop
from tests.support import CATALOG, LINKS, PEPPER, FakeClock, Outbox, database

PARALLEL = 64
CONNECTIONS = 16
ALLOWED = 10  # rule 11's default, TALLY_REDEEM_FAILURES_PER_HOUR


def _guess() -> str:
    """A well-formed code (its check symbol is right) that matches no order."""
    return codes.display(codes.new_code())


def _redeem(
    shop: Shop, account: str, address: str | None, code: str | None = None, **headers: str
) -> httpx.Response:
    if address is not None:
        headers["X-Client-Address"] = address
    return shop.client.post(
        "/v1/redemptions",
        json={"code": code or _guess(), "account_id": account},
        headers={"Idempotency-Key": codes.new_code(), **headers},
    )


def _from_address(shop: Shop, address: str) -> None:
    """Later requests of `shop.client` arrive from this peer address, as a browser's would."""
    shop.client.http._transport.client = (address, 50_000)  # type: ignore[attr-defined]


# --- concurrency ---------------------------------------------------------------------------


@pytest.fixture(params=DATABASES)
def pooled(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Database]:
    # 16 connections race as hard as 64 and leave PostgreSQL room for other tests.
    with database(request.param, str(tmp_path), pool_size=CONNECTIONS) as db:
        yield db


def test_64_parallel_wrong_codes_have_exactly_the_limit_evaluated(pooled: Database) -> None:
    clock = FakeClock()
    address = values.client_address("203.0.113.9")
    start = threading.Barrier(PARALLEL)

    def guess(n: int) -> str:
        start.wait()
        try:
            commerce.redeem(
                commerce.Redeem(
                    code=_guess(),
                    account_id="ana",
                    client_address=address,
                    idempotency_key=f"guess-{n}",
                    platform_id="plt_tool",
                ),
                SqlUnitOfWork(pooled, clock),
                pepper=PEPPER,
            )
        except (CodeInvalidOrUsed, RateLimited) as refused:
            return refused.code
        return "redeemed"

    with ThreadPoolExecutor(PARALLEL) as pool:
        outcomes = list(pool.map(guess, range(PARALLEL)))
    assert outcomes.count("code_invalid_or_used") == ALLOWED
    assert outcomes.count("rate_limited") == PARALLEL - ALLOWED
    with pooled.engine.connect() as connection:
        counted: dict[str, int] = dict(
            connection.execute(
                select(redemption_failures.c.subject, func.count()).group_by(
                    redemption_failures.c.subject
                )
            ).all()
        )
    assert counted == {
        "redeem:plt_tool:account:ana": ALLOWED,
        "redeem:plt_tool:address:203.0.113.9": ALLOWED,
        "redeem:plt_tool": ALLOWED,
    }


def test_parallel_retries_of_one_redemption_all_get_its_lot(pooled: Database) -> None:
    """A client that retries a redemption (same key, same body) before the first answer came
    gets that answer: never a failure recorded against the person, never a 422."""
    clock = FakeClock()
    uow = SqlUnitOfWork(pooled, clock)
    sale = Sale(
        processor="gumroad",
        sale_id="retried",
        package=CATALOG.packages["pro"],
        email="ana@example.com",
        purchased_at=clock(),
        price=2000,
    )
    commerce.fulfil(sale, uow, pepper=PEPPER, links=LINKS)
    mail = Outbox()
    commerce.deliver_mail(SqlUnitOfWork(pooled, clock), mail, Templates(), LINKS)
    code = next(word for word in mail.sent[-1].text.split() if codes.normalise(word))
    start = threading.Barrier(CONNECTIONS)

    def redeem(_: int) -> str:
        start.wait()
        lot = commerce.redeem(
            commerce.Redeem(
                code=code, account_id="ana", idempotency_key="once", platform_id="plt_tool"
            ),
            SqlUnitOfWork(pooled, clock),
            pepper=PEPPER,
        )
        return lot.id

    with ThreadPoolExecutor(CONNECTIONS) as pool:
        lots = list(pool.map(redeem, range(CONNECTIONS)))
    assert len(set(lots)) == 1
    with pooled.engine.connect() as connection:
        failures = connection.execute(select(func.count()).select_from(redemption_failures))
        assert failures.scalar_one() == 0


def test_the_lost_code_form_and_sign_in_count_parallel_attempts_exactly(
    pooled: Database,
) -> None:
    clock = FakeClock()
    address = values.client_address("203.0.113.9")
    allowed = 5
    start = threading.Barrier(PARALLEL // 4)

    def ask(n: int) -> str:
        start.wait()
        try:
            orders.request_lost_code(
                "ana@example.com",
                f"order-{n}",
                SqlUnitOfWork(pooled, clock),
                client_address=address,
                pepper=PEPPER,
                links=LINKS,
                limit=allowed,
            )
        except RateLimited as refused:
            return refused.code
        return "asked"

    def sign_in(n: int) -> str:
        start.wait()
        try:  # a new email each time: only the address's limit can stop these
            staff.sign_in(
                f"guess-{n}@example.com",
                "not the password",
                SqlUnitOfWork(pooled, clock),
                client_address=address,
                per_address=allowed,
            )
        except (RateLimited, SignInFailed) as refused:
            return refused.code
        return "signed in"

    for attempt, evaluated in ((ask, "asked"), (sign_in, "sign_in_failed")):
        with ThreadPoolExecutor(PARALLEL // 4) as pool:
            outcomes = list(pool.map(attempt, range(PARALLEL // 4)))
        assert outcomes.count(evaluated) == allowed
        assert outcomes.count("rate_limited") == PARALLEL // 4 - allowed


# --- lockout -------------------------------------------------------------------------------


def test_strangers_on_the_page_never_block_a_persons_platform_redemption(
    make_shop: MakeShop,
) -> None:
    shop = make_shop(redeem_page_failures_per_hour=3 * ALLOWED)
    code = shop.code("sale-victim")
    # Strangers from many addresses post wrong codes for the person's account until the page
    # itself closes.
    answers = []
    for n in range(3 * ALLOWED + 5):
        _from_address(shop, f"198.51.100.{n // ALLOWED + 1}")
        page = shop.client.post("/redeem", data={"code": _guess(), "account": "victim"})
        answers.append(page.status_code)
    # The person's tool site redeems their code for them: it works.
    made = _redeem(shop, "victim", "203.0.113.50", code)
    assert made.status_code == 201, made.text
    # The fourth address had not failed: its first guess is spared the full ceiling, then no
    # more.
    assert answers == [422] * 3 * ALLOWED + [422] + [429] * 4
    assert "tried on this page in the last hour. Please try again in 1 hour." in page.text
    assert page.headers["Retry-After"] == "3600"
    assert made.json()["amount"] == CATALOG.packages["pro"].credits


def test_the_page_counts_per_address_and_its_429_says_when_in_words(shop: Shop) -> None:
    _from_address(shop, "::ffff:198.51.100.7")
    for _ in range(ALLOWED):
        assert (
            shop.client.post("/redeem", data={"code": _guess(), "account": "x"}).status_code == 422
        )
    _from_address(shop, "198.51.100.7")  # the same client, spelled as IPv4
    refused = shop.client.post("/redeem", data={"code": _guess(), "account": "y"})
    assert refused.status_code == 429
    assert refused.headers["Retry-After"] == "3600"
    assert "from your network in the last hour. Please try again in 1 hour." in refused.text
    _from_address(shop, "198.51.100.8")  # a neighbour is not refused
    assert shop.client.post("/redeem", data={"code": _guess(), "account": "y"}).status_code == 422


# --- the ceiling, the metric and the log ---------------------------------------------------


class Recorder:
    def __init__(self) -> None:
        self.events: list[tuple[str, dict[str, Any]]] = []

    def _record(self, event: str, **fields: Any) -> None:
        self.events.append((event, fields))

    info = warning = exception = _record


def test_a_platform_rotating_accounts_and_addresses_meets_its_ceiling(
    make_shop: MakeShop, monkeypatch: pytest.MonkeyPatch
) -> None:
    log = Recorder()
    monkeypatch.setattr(edge, "log", log)
    shop = make_shop(redeem_failures_per_platform_per_hour=25)
    answers = [_redeem(shop, f"acct-{n}", f"192.0.2.{n}").status_code for n in range(30)]
    assert answers == [422] * 25 + [429] * 5
    last = _redeem(shop, "someone-new", "192.0.2.200")
    assert last.json()["code"] == "rate_limited"
    assert last.headers["Retry-After"] == "3600"
    # Another platform is counted apart.
    other = shop.as_platform(shop.platform_key("other"))
    assert (
        _redeem(shop, "acct-0", "192.0.2.0", Authorization=other["Authorization"]).json()["code"]
        == "code_invalid_or_used"
    )
    metrics = shop.client.get("/metrics").text
    assert 'tally_rate_limited_total{limit="redeem_platform"} 6.0' in metrics
    tripped = [fields for event, fields in log.events if event == "rate_limited"]
    assert len(tripped) == 6
    assert tripped[0]["limit"] == "redeem_platform"
    assert tripped[0]["route"] == "/v1/redemptions"
    assert tripped[0]["retry_after"] == 3600


def test_the_page_has_its_own_ceiling_which_never_shuts_out_a_buyer(
    make_shop: MakeShop,
) -> None:
    """Used up, the page's ceiling refuses every address that guessed this hour, and lets
    through one that has not: a stranger who fills it cannot close the page to buyers."""
    shop = make_shop(redeem_page_failures_per_hour=5)

    def guess(n: int) -> int:
        _from_address(shop, f"2001:db8:{n}::1")
        page = shop.client.post("/redeem", data={"code": _guess(), "account": "a"})
        return page.status_code

    assert [guess(n) for n in range(5)] == [422] * 5
    assert [guess(0), guess(4)] == [429, 429]  # guessed already: the ceiling holds them
    refused = shop.client.post("/redeem", data={"code": _guess(), "account": "a"})
    assert "tried on this page in the last hour" in refused.text
    assert [guess(5), guess(5)] == [422, 429]  # new: one guess, then held too
    _from_address(shop, "2001:db8:6::1")
    bought = shop.client.post("/redeem", data={"code": shop.code("sale-buyer"), "account": "buyer"})
    assert bought.status_code == 200, bought.text
    assert "Credits added" in bought.text
    assert 'tally_rate_limited_total{limit="page"} 4.0' in shop.client.get("/metrics").text


# --- code look-ups ---------------------------------------------------------------------------


def test_code_look_ups_count_toward_the_same_limits(shop: Shop) -> None:
    address = {"X-Client-Address": "203.0.113.77"}
    for _ in range(ALLOWED):
        assert shop.client.get(f"/v1/codes/{_guess()}", headers=address).status_code == 404
    refused = shop.client.get(f"/v1/codes/{_guess()}", headers=address)
    assert refused.status_code == 429
    assert refused.json()["code"] == "rate_limited"
    assert refused.headers["Retry-After"] == "3600"
    # ... and the address's redemptions through the platform are refused too.
    assert _redeem(shop, "anyone", "203.0.113.77").status_code == 429
    assert _redeem(shop, "anyone", "203.0.113.78").status_code == 422


def test_code_look_up_misses_count_against_the_platform_ceiling(make_shop: MakeShop) -> None:
    shop = make_shop(redeem_failures_per_platform_per_hour=4)
    code = shop.code("sale-1")
    found = [shop.client.get(f"/v1/codes/{_guess()}").status_code for _ in range(4)]
    assert found == [404] * 4
    assert shop.client.get(f"/v1/codes/{code}").status_code == 429
    assert _redeem(shop, "ana", None, code).status_code == 429


def test_the_window_is_an_hour_and_retry_after_says_when_it_opens(
    shop: Shop, clock: FakeClock
) -> None:
    for _ in range(ALLOWED):
        _redeem(shop, "ana", None)
    assert _redeem(shop, "ana", None).status_code == 429
    clock.advance(minutes=30)
    assert _redeem(shop, "ana", None).headers["Retry-After"] == "1800"
    clock.advance(minutes=30, seconds=1)
    assert _redeem(shop, "ana", None).json()["code"] == "code_invalid_or_used"


def test_limits_name_what_they_count() -> None:
    allowance = limits.Allowance(per_subject=3, per_platform=9, page=7)
    address = values.client_address("2001:db8:1:2::5")
    assert [
        (limit.name, limit.subject, limit.allowed)
        for limit in limits.for_redemption("plt_a", "Ana", address, allowance)
    ] == [
        ("redeem_account", "redeem:plt_a:account:Ana", 3),
        ("redeem_platform", "redeem:plt_a", 9),
        ("redeem_address", "redeem:plt_a:address:2001:db8:1:2::/64", 3),
    ]
    assert [
        (limit.name, limit.subject, limit.allowed)
        for limit in limits.for_redemption(None, "Ana", address, allowance)
    ] == [
        ("page_address", "redeem-page:address:2001:db8:1:2::/64", 3),
        ("page", "redeem-page", 7),
    ]


def test_the_sweep_deletes_failures_no_window_counts_any_more(
    shop: Shop, db: Database, clock: FakeClock
) -> None:
    """The failures table holds about one window: the worker's sweep deletes older rows, in
    batches, and never one that a limit still counts."""
    subjects = [f"redeem:plt_x:account:guesser-{n}" for n in range(limits.PRUNE_BATCH * 2 + 5)]
    uow = shop.tally.uow()
    with uow:
        uow.commerce.add_failures(subjects, clock())
        uow.commit()
    for _ in range(ALLOWED):
        _redeem(shop, "ana", None)
    assert _count_failures(db) == len(subjects) + ALLOWED * 2

    clock.advance(minutes=59)
    worker = Worker(shop.tally)
    assert worker.run_job("sweep")
    assert _count_failures(db) == len(subjects) + ALLOWED * 2  # all still inside the hour
    assert _redeem(shop, "ana", None).status_code == 429

    clock.advance(minutes=1, seconds=1)
    assert worker.run_job("sweep")
    assert _count_failures(db) == 0
    assert limits.prune(shop.tally.uow()) == 0
    assert _redeem(shop, "ana", None).json()["code"] == "code_invalid_or_used"


def _count_failures(db: Database) -> int:
    with db.engine.connect() as connection:
        count = connection.execute(select(func.count()).select_from(redemption_failures))
        return int(count.scalar_one())


def test_a_sign_in_with_the_longest_address_is_one_more_failure(uow: SqlUnitOfWork) -> None:
    """An address of 254 characters names a subject longer than its column: it is kept as a
    head and a digest, so the attempt counts like any other instead of failing the page."""
    longest = f"{'a' * 64}@{'b' * 63}.{'c' * 63}.{'d' * 61}"
    assert len(longest) == 254
    other = longest[:-1] + "e"
    for address in (longest, other):
        with pytest.raises(SignInFailed):
            staff.sign_in(address, "a wrong password!", uow, client_address="203.0.113.7")
    with uow:
        subjects = uow.commerce.failures_within(
            {f"sign-in-email:{a}": datetime(2000, 1, 1, tzinfo=UTC) for a in (longest, other)}
        )
    assert subjects == {}  # stored under their fitted names, not the raw ones
    fitted = {
        limits.Limit("sign_in_email", f"sign-in-email:{a}", 5, timedelta(minutes=15)).subject
        for a in (longest, other)
    }
    assert len(fitted) == 2
    assert all(len(subject) == limits.SUBJECT_MAX_LENGTH for subject in fitted)
    with uow:
        counted = uow.commerce.failures_within(
            dict.fromkeys(fitted, datetime(2000, 1, 1, tzinfo=UTC))
        )
    assert sorted(count for count, _ in counted.values()) == [1, 1]


def test_strangers_guessing_a_staff_password_never_lock_the_member_out(
    uow: SqlUnitOfWork,
) -> None:
    staff.create_staff("support@example.com", "the real long password", uow)
    wrong = "a wrong long password"
    for n in range(staff.SIGN_IN_ATTEMPTS_PER_EMAIL):
        with pytest.raises(SignInFailed):
            staff.sign_in("support@example.com", wrong, uow, client_address=f"198.51.100.{n}")
    # The email's allowance is used up: an address that guessed gets no more...
    with pytest.raises(RateLimited) as held:
        staff.sign_in("support@example.com", wrong, uow, client_address="198.51.100.0")
    assert held.value.limit == "sign_in_email"
    # ...and so does a new one after its one guess, while the member, who has not failed
    # from their address, signs in.
    with pytest.raises(SignInFailed):
        staff.sign_in("support@example.com", wrong, uow, client_address="198.51.100.99")
    with pytest.raises(RateLimited):
        staff.sign_in("support@example.com", wrong, uow, client_address="198.51.100.99")
    member = staff.sign_in(
        "support@example.com", "the real long password", uow, client_address="203.0.113.5"
    )
    assert member.email == "support@example.com"
