"""Totals never overflow: an account holds and owes at most 2^53 credits, and the journal's
totals (`tally check`, `/metrics`) stay exact past 2^63 on both databases."""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tally.adapters.db.engine import Database
from tally.adapters.db.uow import SqlUnitOfWork
from tally.bootstrap import Tally
from tally.domain.errors import BalanceLimitExceeded, DatabaseUnavailable
from tally.domain.model import MAX_ACCOUNT_CREDITS, Account, Origin
from tally.entrypoints.http import metrics
from tally.service import ledger, staff
from tests.integration.test_group_commit import committed_together, grouped
from tests.security.conftest import MakeShop, Shop
from tests.support import FakeClock, one_batch

LIMIT = 2**53
ORIGIN = Origin("fill", "plt_fill")
#: More accounts at the bound than 2^63 / 2^53 = 1,024: their grants total past 2^63.
ACCOUNTS = 1_030


def grant(shop: Shop, account: str, amount: int, key: str) -> httpx.Response:
    return shop.client.post(
        f"/v1/accounts/{account}/grants",
        json={"amount": amount, "reason": "r"},
        headers={"Idempotency-Key": key},
    )


def observed(shop: Shop, account: str) -> tuple[Any, Any]:
    balance = shop.client.get(f"/v1/accounts/{account}/balance").json()
    journal = shop.client.get(f"/v1/accounts/{account}/entries", params={"limit": 500}).json()
    return balance, journal


def test_the_bound_is_what_json_reads_exactly() -> None:
    assert MAX_ACCOUNT_CREDITS == LIMIT
    assert float(LIMIT) == LIMIT
    assert float(LIMIT - 1) == LIMIT - 1


def test_a_grant_fills_an_account_to_the_bound_and_no_further(shop: Shop) -> None:
    assert grant(shop, "near", LIMIT - 1, "g1").status_code == 201
    assert observed(shop, "near")[0]["available"] == LIMIT - 1  # just under
    assert grant(shop, "near", 1, "g2").status_code == 201
    assert observed(shop, "near")[0]["available"] == LIMIT  # at: exact in JSON
    before = observed(shop, "near")

    over = grant(shop, "near", 1, "g3")
    assert over.status_code == 409
    problem = over.json()
    assert (problem["code"], problem["limit"], problem["total"], problem["requested"]) == (
        "balance_limit_exceeded",
        LIMIT,
        LIMIT,
        1,
    )
    assert observed(shop, "near") == before  # refused whole: no lot, no entry

    # Held credits are still the account's: a hold does not make room.
    hold = shop.client.post(
        "/v1/accounts/near/holds", json={"amount": 10}, headers={"Idempotency-Key": "h"}
    ).json()
    assert grant(shop, "near", 1, "g4").status_code == 409
    # Spent credits do: capture 10, and 10 fit again, 11 do not.
    shop.client.post(f"/v1/holds/{hold['id']}/capture", headers={"Idempotency-Key": "c"})
    assert grant(shop, "near", 11, "g5").status_code == 409
    assert grant(shop, "near", 10, "g6").status_code == 201
    assert observed(shop, "near")[0]["available"] == LIMIT

    # One grant of the whole bound on a fresh account is allowed; past it, the amount is
    # invalid before any account is read.
    assert grant(shop, "fresh", LIMIT, "g7").status_code == 201
    too_big = grant(shop, "other", LIMIT + 1, "g8")
    assert (too_big.status_code, too_big.json()["code"]) == (422, "invalid_amount")


def test_debt_is_bounded_too(uow: SqlUnitOfWork) -> None:
    def claw_back(amount: int, key: str) -> object:
        cmd = ledger.ClawBack(
            account_id="owes", amount=amount, reason="chargeback", idempotency_key=key
        )
        return ledger.claw_back(cmd, uow)

    ledger.grant(ledger.GrantCredits(account_id="owes", amount=5, idempotency_key="g"), uow)
    claw_back(LIMIT, "c1")  # takes the 5, owes the rest
    claw_back(5, "c2")
    assert ledger.get_balance("owes", uow).debt == LIMIT
    entries = ledger.list_entries("owes", uow).items

    with pytest.raises(BalanceLimitExceeded) as refused:
        claw_back(1, "c3")
    assert refused.value.extra == {"limit": LIMIT, "debt": LIMIT, "owed": 1}
    with pytest.raises(BalanceLimitExceeded):
        ledger.adjust(
            ledger.Adjust(account_id="owes", delta=-1, reason="r", idempotency_key="a"), uow
        )
    assert ledger.get_balance("owes", uow).debt == LIMIT
    assert ledger.list_entries("owes", uow).items == entries

    # A grant repays the debt first: the bound is on what the account has after it.
    ledger.grant(ledger.GrantCredits(account_id="owes", amount=LIMIT, idempotency_key="g2"), uow)
    balance = ledger.get_balance("owes", uow)
    assert (balance.available, balance.debt) == (0, 0)
    ledger.grant(ledger.GrantCredits(account_id="owes", amount=LIMIT, idempotency_key="g3"), uow)
    assert ledger.get_balance("owes", uow).available == LIMIT
    assert ledger.check(uow).violations == []


def test_a_batch_refuses_only_the_grant_that_would_pass_the_bound(
    db: Database, clock: FakeClock
) -> None:
    """In a shared transaction the grants apply in order to one loaded account: the one that
    would pass the bound is refused alone and changes nothing the others see."""
    group, uow = grouped(db, clock)
    ledger.grant(ledger.GrantCredits(account_id="full", amount=LIMIT - 5, idempotency_key="g"), uow)

    def add(amount: int, key: str) -> Callable[[], Any]:
        cmd = ledger.GrantCredits(account_id="full", amount=amount, idempotency_key=key)
        return lambda: ledger.grant(cmd, uow)

    results = one_batch(group, [add(3, "a"), add(3, "b"), add(2, "c")])
    assert isinstance(results[1], BalanceLimitExceeded)
    assert [results[0].amount, results[2].amount] == [3, 2]
    committed_together(group)
    assert ledger.get_balance("full", uow).available == LIMIT
    assert ledger.check(uow).violations == []


def fill(tally: Tally, account_ids: list[str], change: Callable[[Account, datetime], Any]) -> None:
    """Apply `change` to each account in one transaction: thousands of changes in a second."""
    uow = tally.uow()
    with uow:
        now = uow.clock()
        found: dict[str, Account] = {}
        for account_id in account_ids:
            account = uow.accounts.get_for_update(account_id, create_at=now)
            assert account is not None
            found[account_id] = account
        for account_id in account_ids:
            change(found[account_id], now)
        uow.accounts.save_many(list(found.values()))
        uow.commit()


def scrape(shop: Shop) -> dict[str, float]:
    answer = shop.client.get("/metrics")
    assert answer.status_code == 200, answer.text
    return {
        sample.name: sample.value
        for family in text_string_to_metric_families(answer.text)
        for sample in family.samples
        if not sample.labels
    }


def test_totals_of_many_accounts_at_the_bound_stay_exact(shop: Shop) -> None:
    accounts = [f"acct-{n:04}" for n in range(ACCOUNTS)]
    amounts = {account: LIMIT - n for n, account in enumerate(accounts)}

    def grant_and_spend(account: Account, now: datetime) -> None:
        account.grant(
            amount=amounts[account.account_id],
            source="gift",
            expires_at=None,
            priority=0,
            now=now,
            origin=ORIGIN,
        )
        account.debit(amount=amounts[account.account_id] - 1, now=now, origin=ORIGIN)

    fill(shop.tally, accounts, grant_and_spend)
    granted = sum(amounts.values())
    spent = granted - ACCOUNTS
    assert granted > 2**63
    assert spent > 2**63

    assert ledger.credit_totals(shop.tally.uow()) == {"grant": granted, "debit": spent}
    report = ledger.check(shop.tally.uow())
    assert (report.violations, report.accounts, report.lots) == ([], ACCOUNTS, ACCOUNTS)
    samples = scrape(shop)
    # Prometheus values are doubles: the nearest one to the exact total.
    assert samples["tally_credits_granted_total"] == float(granted)
    assert samples["tally_credits_spent_total"] == float(spent)
    assert samples["tally_credits_read_failures_total"] == 0
    # The support console's chart sums the same day exactly.
    today = staff.credit_chart(shop.tally.uow(), days=1)[0]
    assert (today.sold, today.spent, today.expired) == (granted, spent, 0)


def test_a_lot_held_and_released_past_2_63_audits_exactly(shop: Shop) -> None:
    """One lot's hold and release entries sum past 2^63 after 1,025 round trips of the whole
    bound: `tally check` and the metrics still read them."""
    cycles = 1_030

    def cycle(account: Account, now: datetime) -> None:
        account.grant(
            amount=LIMIT, source="gift", expires_at=None, priority=0, now=now, origin=ORIGIN
        )
        for _ in range(cycles):
            hold = account.place_hold(amount=LIMIT, ttl_seconds=60, now=now, origin=ORIGIN)
            account.release(hold.id, now, ORIGIN)

    fill(shop.tally, ["cycled"], cycle)
    totals = ledger.credit_totals(shop.tally.uow())
    assert totals == {"grant": LIMIT, "hold": cycles * LIMIT, "release": cycles * LIMIT}
    report = ledger.check(shop.tally.uow())
    assert (report.violations, report.holds, report.entries) == ([], cycles, 1 + 2 * cycles)
    assert scrape(shop)["tally_credits_granted_total"] == LIMIT


def test_metrics_answer_when_the_journal_cannot_be_read(
    make_shop: MakeShop, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(metrics, "CREDITS_CACHE_SECONDS", -1.0)  # read on every scrape
    shop = make_shop()
    assert grant(shop, "someone", 7, "g").status_code == 201
    assert scrape(shop)["tally_credits_granted_total"] == 7

    def unreadable(uow: object) -> dict[str, int]:
        raise DatabaseUnavailable

    monkeypatch.setattr(ledger, "credit_totals", unreadable)
    samples = scrape(shop)  # still 200, with the last totals read and the failure counted
    assert samples["tally_credits_granted_total"] == 7
    assert samples["tally_credits_read_failures_total"] == 1
    assert 'tally_http_requests_total{method="POST"' in shop.client.get("/metrics").text

    never_read = make_shop()
    samples = scrape(never_read)
    assert "tally_credits_granted_total" not in samples  # no totals rather than wrong ones
    assert samples["tally_credits_read_failures_total"] == 1
