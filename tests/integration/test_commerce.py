"""Fulfilment, redemption and the outbox on SQLite and PostgreSQL: one order per sale, one
lot per code, rate-limited guessing, and email that carries a code that redeems."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, select

from tally.adapters.db.engine import Database
from tally.adapters.db.schema import codes as codes_table
from tally.adapters.db.schema import orders, outbox
from tally.adapters.db.uow import SqlUnitOfWork
from tally.adapters.mail import MailboxSender, Templates
from tally.domain import codes, values
from tally.domain.commerce import Sale
from tally.domain.errors import CodeInvalidOrUsed, RateLimited
from tally.service import commerce, ledger, limits
from tally.service.ports import Email
from tests.conftest import DATABASES
from tests.support import CATALOG, LINKS, PEPPER, FakeClock, Outbox, database

#: A platform's id, as redemptions through the API carry it (service/limits.py).
TOOL = "plt_tool"
#: Rule 11's allowance per account and address, without the platform's ceiling.
UNCAPPED = limits.Allowance(per_platform=100_000)


def _sale(clock: FakeClock, sale_id: str = "sale-1", **changes: Any) -> Sale:
    sale = Sale(
        processor="gumroad",
        sale_id=sale_id,
        package=CATALOG.packages["pro"],
        email="ana@example.com",
        purchased_at=clock(),
        price=2000,
    )
    return replace(sale, **changes)


def _code_in(email: Email) -> str:
    for word in email.text.split():
        if codes.normalise(word) is not None:
            return word
    raise AssertionError("no code in the email")


def _count(db: Database, table: Any) -> int:
    with db.engine.connect() as connection:
        found: int = connection.execute(select(func.count()).select_from(table)).scalar_one()
        return found


def test_a_sale_becomes_an_order_a_code_and_one_email(
    db: Database, uow: SqlUnitOfWork, clock: FakeClock
) -> None:
    first = commerce.fulfil(_sale(clock), uow, pepper=PEPPER, links=LINKS)
    assert first.created
    assert first.order.credits == 25
    assert first.order.expires_at == clock().replace(year=clock().year + 2)
    for _ in range(3):  # the processor pings again, and again
        again = commerce.fulfil(_sale(clock), uow, pepper=PEPPER, links=LINKS)
        assert not again.created
        assert again.order.id == first.order.id
    assert (_count(db, orders), _count(db, codes_table), _count(db, outbox)) == (1, 1, 1)

    mail = Outbox()
    delivered = commerce.deliver_mail(uow, mail, Templates(), LINKS)
    assert delivered == commerce.Delivery(sent=1)
    (email,) = mail.sent
    assert email.to == "ana@example.com"
    assert "25 credits" in email.text
    assert email.message_id == f"<{email.message_id[1:-1]}>"
    assert commerce.deliver_mail(uow, mail, Templates(), LINKS) == commerce.Delivery()
    with db.engine.connect() as connection:
        context = connection.execute(select(outbox.c.context)).scalar_one()
    assert _code_in(email) not in str(context), "the plaintext leaves the database once sent"

    clock.advance(days=10)  # redeemed later: still valid from the purchase date
    lot = commerce.redeem(
        commerce.Redeem(code=_code_in(email).lower(), account_id="ana", idempotency_key="r1"),
        uow,
        pepper=PEPPER,
    )
    assert (lot.amount, lot.source) == (25, "purchase")
    assert lot.expires_at == first.order.expires_at
    assert ledger.get_balance("ana", uow).available == 25
    replay = commerce.redeem(
        commerce.Redeem(code=_code_in(email), account_id="ana", idempotency_key="r1"),
        uow,
        pepper=PEPPER,
    )
    assert replay.id == lot.id
    assert uow.replayed
    with pytest.raises(CodeInvalidOrUsed):
        commerce.redeem(
            commerce.Redeem(code=_code_in(email), account_id="bob", idempotency_key="r2"),
            uow,
            pepper=PEPPER,
        )
    assert ledger.check(uow).violations == []


def test_gifts_surprises_and_quantities(uow: SqlUnitOfWork, clock: FakeClock) -> None:
    gift = commerce.fulfil(
        _sale(clock, "gift-1", email="friend@example.com", gifter_email="ana@example.com"),
        uow,
        pepper=PEPPER,
        links=LINKS,
    )
    assert gift.order.source == "gift"
    surprise = CATALOG.packages["surprise"]
    assert surprise.surprise is not None
    drawn = commerce.fulfil(
        _sale(clock, "surprise-1", package=surprise, quantity=3), uow, pepper=PEPPER, links=LINKS
    )
    assert 3 * surprise.surprise.min <= drawn.order.credits <= 3 * surprise.surprise.max
    again = commerce.fulfil(
        _sale(clock, "surprise-1", package=surprise, quantity=3), uow, pepper=PEPPER, links=LINKS
    )
    assert again.order.credits == drawn.order.credits  # drawn once, recorded
    lifetime = commerce.fulfil(
        _sale(clock, "life-1", package=CATALOG.packages["lifetime"], quantity=2),
        uow,
        pepper=PEPPER,
        links=LINKS,
    )
    assert (lifetime.order.credits, lifetime.order.expires_at) == (200, None)
    mail = Outbox()
    commerce.deliver_mail(uow, mail, Templates(), LINKS)
    gift_mail = next(e for e in mail.sent if e.to == "friend@example.com")
    assert "ana@example.com" in gift_mail.text
    lot = commerce.redeem(
        commerce.Redeem(code=_code_in(gift_mail), account_id="friend", idempotency_key="g"),
        uow,
        pepper=PEPPER,
    )
    assert lot.source == "gift"


def test_wrong_codes_are_one_answer_then_a_lockout(uow: SqlUnitOfWork, clock: FakeClock) -> None:
    guess = codes.display(codes.new_code())  # well-formed, checks, matches no order
    address = values.client_address("203.0.113.9")
    for n in range(commerce.FAILURES_PER_WINDOW):
        with pytest.raises(CodeInvalidOrUsed):
            commerce.redeem(
                commerce.Redeem(
                    code=guess if n % 2 else "not a code",
                    account_id="eve",
                    client_address=address,
                    idempotency_key=f"g{n}",
                    platform_id=TOOL,
                ),
                uow,
                pepper=PEPPER,
            )
    with pytest.raises(RateLimited) as locked:
        commerce.redeem(
            commerce.Redeem(
                code=guess, account_id="eve", idempotency_key="g-last", platform_id=TOOL
            ),
            uow,
            pepper=PEPPER,
        )
    assert 1 <= locked.value.retry_after <= 3601
    # The address is locked too, for any account.
    with pytest.raises(RateLimited):
        commerce.redeem(
            commerce.Redeem(
                code=guess,
                account_id="mallory",
                client_address=address,
                idempotency_key="m",
                platform_id=TOOL,
            ),
            uow,
            pepper=PEPPER,
        )
    clock.advance(hours=1, seconds=1)
    with pytest.raises(CodeInvalidOrUsed):
        commerce.redeem(
            commerce.Redeem(
                code=guess, account_id="eve", idempotency_key="after", platform_id=TOOL
            ),
            uow,
            pepper=PEPPER,
        )


def test_mail_is_retried_with_backoff_and_never_sent_twice(
    uow: SqlUnitOfWork, clock: FakeClock
) -> None:
    commerce.fulfil(_sale(clock), uow, pepper=PEPPER, links=LINKS)
    mail = Outbox()
    mail.down = True
    assert commerce.deliver_mail(uow, mail, Templates(), LINKS) == commerce.Delivery(retried=1)
    mail.down = False
    assert commerce.deliver_mail(uow, mail, Templates(), LINKS) == commerce.Delivery()  # not due
    clock.advance(seconds=31)
    assert commerce.deliver_mail(uow, mail, Templates(), LINKS) == commerce.Delivery(sent=1)
    assert commerce.deliver_mail(uow, mail, Templates(), LINKS) == commerce.Delivery()
    assert len(mail.sent) == 1


def test_the_dev_mailbox_receives_the_purchase(
    uow: SqlUnitOfWork, clock: FakeClock, tmp_path: Path
) -> None:
    commerce.fulfil(_sale(clock), uow, pepper=PEPPER, links=LINKS)
    mailbox = MailboxSender(tmp_path / "mailbox")
    commerce.deliver_mail(uow, mailbox, Templates(), LINKS)
    (message,) = mailbox.messages()
    assert message["To"] == "ana@example.com"


@pytest.fixture(params=DATABASES)
def pooled(request: pytest.FixtureRequest, tmp_path: Path) -> Any:
    with database(request.param, str(tmp_path), pool_size=24) as db:
        yield db


@pytest.mark.slow
def test_concurrent_pings_make_one_order_and_concurrent_redemptions_one_lot(
    pooled: Database,
) -> None:
    clock = FakeClock()
    barrier = threading.Barrier(8)

    def ping(_: int) -> str:
        barrier.wait()
        done = commerce.fulfil(
            _sale(clock, "race-1"), SqlUnitOfWork(pooled, clock), pepper=PEPPER, links=LINKS
        )
        return done.order.id

    with ThreadPoolExecutor(8) as pool:
        assert len(set(pool.map(ping, range(8)))) == 1
    assert _count(pooled, orders) == _count(pooled, codes_table) == _count(pooled, outbox) == 1
    mail = Outbox()
    commerce.deliver_mail(SqlUnitOfWork(pooled, clock), mail, Templates(), LINKS)
    code = _code_in(mail.sent[0])

    racers = threading.Barrier(16)

    def spend(n: int) -> str:
        racers.wait()
        try:
            lot = commerce.redeem(
                commerce.Redeem(code=code, account_id=f"racer-{n}", idempotency_key=f"k{n}"),
                SqlUnitOfWork(pooled, clock),
                pepper=PEPPER,
                allowance=limits.Allowance(per_subject=100),
            )
        except CodeInvalidOrUsed:
            return "refused"
        return lot.id

    with ThreadPoolExecutor(16) as pool:
        outcomes = list(pool.map(spend, range(16)))
    assert outcomes.count("refused") == 15
    uow = SqlUnitOfWork(pooled, clock)
    assert ledger.check(uow).violations == []


def test_near_misses_of_a_code_find_nothing_and_guessers_are_locked_out(
    uow: SqlUnitOfWork, clock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The codes that check and lie nearest a real one (its 0/Z swap, which the check symbol
    cannot see, and every code one body symbol away with its own check symbol) are not in the
    database, and redeeming them is the one generic refusal; the real code still redeems."""
    body = "7K20ZXM4TD0HZ8R"  # "0Z" at 3 and 4: its swap checks too
    issued = body + codes.check_symbol(body)
    monkeypatch.setattr(codes, "new_code", lambda: issued)
    commerce.fulfil(_sale(clock), uow, pepper=PEPPER, links=LINKS)
    swapped = issued[:3] + "Z0" + issued[5:]
    assert codes.normalise(swapped) == swapped
    neighbours = [
        near + codes.check_symbol(near)
        for at in range(codes.RANDOM_SYMBOLS)
        for other in codes.ALPHABET
        if other != body[at]
        for near in [body[:at] + other + body[at + 1 :]]
    ]
    assert len(neighbours) == 15 * 31
    with uow:
        assert uow.commerce.code(codes.digest(issued, PEPPER)) is not None
        found = [uow.commerce.code(codes.digest(n, PEPPER)) for n in [swapped, *neighbours]]
    assert found == [None] * (1 + 15 * 31)

    for n, near in enumerate([swapped, neighbours[0], neighbours[-1]]):
        with pytest.raises(CodeInvalidOrUsed):
            commerce.redeem(
                commerce.Redeem(
                    code=near, account_id=f"near-{n}", idempotency_key=f"n{n}", platform_id=TOOL
                ),
                uow,
                pepper=PEPPER,
                allowance=UNCAPPED,
            )
    lot = commerce.redeem(
        commerce.Redeem(
            code=codes.display(issued), account_id="ana", idempotency_key="real", platform_id=TOOL
        ),
        uow,
        pepper=PEPPER,
        allowance=UNCAPPED,
    )
    assert lot.amount == 25

    # One guesser alone is stopped after ten tries, whatever codes it tries next.
    outcomes = []
    for n in range(12):
        try:
            commerce.redeem(
                commerce.Redeem(
                    code=neighbours[n],
                    account_id="one-guesser",
                    idempotency_key=f"o{n}",
                    platform_id=TOOL,
                ),
                uow,
                pepper=PEPPER,
                allowance=UNCAPPED,
            )
        except (CodeInvalidOrUsed, RateLimited) as refused:
            outcomes.append(refused.code)
    assert outcomes == ["code_invalid_or_used"] * 10 + ["rate_limited"] * 2
