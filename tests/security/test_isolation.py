"""Platforms share accounts (one wallet) but not their operations: another platform's hold is
one that does not exist, and another platform's idempotency keys and metadata are not shown."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import text

from tally.adapters.db.engine import Database
from tally.adapters.db.migrate import downgrade, upgrade
from tally.adapters.db.uow import SqlUnitOfWork
from tally.domain.errors import HoldNotFound
from tally.service import ledger
from tests.conftest import DATABASES
from tests.integration.test_group_commit import committed_together, grouped
from tests.security.conftest import Shop
from tests.support import FakeClock, database, one_batch

ACCOUNT = "shared-wallet"
#: Well-formed, and no hold has it.
UNKNOWN_HOLD = "hold_00000000000000000000000000"


def post(shop: Shop, url: str, body: Any, key: str, platform: str | None = None) -> httpx.Response:
    headers = {"Idempotency-Key": key}
    if platform is not None:
        headers |= shop.as_platform(platform)
    return shop.client.post(url, json=body, headers=headers)


def state(shop: Shop) -> tuple[Any, Any]:
    """What anyone can observe of the wallet: its balance and its whole journal."""
    balance = shop.client.get(f"/v1/accounts/{ACCOUNT}/balance").json()
    journal = shop.client.get(f"/v1/accounts/{ACCOUNT}/entries", params={"limit": 500}).json()
    return balance, journal


def without_ids(problem: dict[str, Any]) -> dict[str, Any]:
    return {name: value for name, value in problem.items() if name not in ("hold_id", "request_id")}


def test_another_platform_cannot_capture_or_release_a_hold(shop: Shop) -> None:
    other = shop.platform_key("other", "admin")
    granted = post(
        shop, f"/v1/accounts/{ACCOUNT}/grants", {"amount": 100, "reason": "welcome"}, "grant"
    )
    assert granted.status_code == 201
    by_amount = post(shop, f"/v1/accounts/{ACCOUNT}/holds", {"amount": 30}, "hold-1").json()
    by_tool = post(
        shop, f"/v1/accounts/{ACCOUNT}/holds", {"tool": "video", "quantity": 3}, "hold-2"
    ).json()
    before = state(shop)
    unknown = post(shop, f"/v1/holds/{UNKNOWN_HOLD}/capture", {}, "x", other)
    assert unknown.status_code == 404

    attempts = [
        (f"/v1/holds/{by_amount['id']}/capture", {}),
        (f"/v1/holds/{by_amount['id']}/capture", {"amount": 1}),
        (f"/v1/holds/{by_amount['id']}/release", {"reason": "mine now"}),
        # Priced by units: must not reach the hold's price (or say it was placed by amount).
        (f"/v1/holds/{by_tool['id']}/capture", {"quantity": 1}),
        (f"/v1/holds/{by_amount['id']}/capture", {"quantity": 1}),
        (f"/v1/holds/{by_tool['id']}/release", None),
    ]
    for number, (url, body) in enumerate(attempts):
        answer = post(shop, url, body, f"steal-{number}", other)
        assert answer.status_code == 404, (url, answer.text)
        problem = answer.json()
        assert problem["code"] == "hold_not_found"
        # Exactly the answer for a hold that does not exist: nothing tells B it is real.
        assert without_ids(problem) == without_ids(unknown.json())
        assert problem["hold_id"] == url.split("/")[3]
        assert answer.headers["content-type"] == unknown.headers["content-type"]
    assert state(shop) == before  # nothing changed: no entry, no balance move

    # The platform that placed them still can, with the same idempotency keys B tried.
    captured = post(shop, f"/v1/holds/{by_amount['id']}/capture", {"amount": 10}, "steal-1")
    assert captured.status_code == 200, captured.text
    assert (captured.json()["status"], captured.json()["captured"]) == ("captured", 10)
    released = post(shop, f"/v1/holds/{by_tool['id']}/release", None, "steal-5")
    assert released.status_code == 200, released.text
    assert released.json()["status"] == "released"
    balance = shop.client.get(f"/v1/accounts/{ACCOUNT}/balance").json()
    assert (balance["available"], balance["held"]) == (90, 0)


def test_a_platform_sees_its_own_hold_again_only(shop: Shop) -> None:
    """B's own hold on the shared wallet is B's: A cannot release it either."""
    other = shop.platform_key("other", "admin")
    post(shop, f"/v1/accounts/{ACCOUNT}/grants", {"amount": 50, "reason": "welcome"}, "grant")
    held = post(shop, f"/v1/accounts/{ACCOUNT}/holds", {"amount": 20}, "h", other).json()
    refused = post(shop, f"/v1/holds/{held['id']}/release", None, "r")
    assert (refused.status_code, refused.json()["code"]) == (404, "hold_not_found")
    done = post(shop, f"/v1/holds/{held['id']}/release", None, "r", other)
    assert (done.status_code, done.json()["status"]) == (200, "released")


def test_a_batch_refuses_another_platforms_hold_and_commits_the_rest(
    db: Database, clock: FakeClock
) -> None:
    """The group commit runs the same rule: in a shared transaction, B's capture is refused
    alone, A's changes beside it commit, and the hold stays pending for A."""
    group, uow = grouped(db, clock)
    ledger.grant(ledger.GrantCredits(account_id="dee", amount=40, idempotency_key="g"), uow)
    hold = ledger.place_hold(
        ledger.PlaceHold(account_id="dee", amount=15, idempotency_key="h", platform_id="plt_a"),
        uow,
    )

    def capture(platform: str, key: str) -> Any:
        cmd = ledger.CaptureHold(hold_id=hold.id, idempotency_key=key, platform_id=platform)
        return lambda: ledger.capture(cmd, uow)

    def debit(platform: str, key: str) -> Any:
        cmd = ledger.DebitCredits(
            account_id="dee", amount=5, idempotency_key=key, platform_id=platform
        )
        return lambda: ledger.debit(cmd, uow)

    results = one_batch(
        group,
        [debit("plt_a", "d1"), capture("plt_b", "c"), debit("plt_a", "d2")],
    )
    assert isinstance(results[1], HoldNotFound)
    assert results[1].extra == {"hold_id": hold.id}
    assert [results[0].amount, results[2].amount] == [5, 5]
    committed_together(group)
    balance = ledger.get_balance("dee", uow)
    assert (balance.available, balance.held) == (15, 15)
    assert (
        ledger.capture(
            ledger.CaptureHold(hold_id=hold.id, idempotency_key="c", platform_id="plt_a"), uow
        ).captured
        == 15
    )
    assert ledger.check(uow).violations == []


def test_a_batch_records_the_platform_of_each_lot_and_hold(db: Database, clock: FakeClock) -> None:
    """Several lots and holds written in one statement (PostgreSQL's many-row insert) each
    keep their own platform."""
    group, uow = grouped(db, clock)
    ledger.grant(ledger.GrantCredits(account_id="eve", amount=40, idempotency_key="g"), uow)

    def place(platform: str) -> Any:
        cmd = ledger.PlaceHold(
            account_id="eve", amount=5, idempotency_key="h", platform_id=platform
        )
        return lambda: ledger.place_hold(cmd, uow)

    def give(platform: str) -> Any:
        cmd = ledger.GrantCredits(
            account_id="eve", amount=1, idempotency_key="g", platform_id=platform
        )
        return lambda: ledger.grant(cmd, uow)

    results = one_batch(group, [place("plt_a"), place("plt_b"), give("plt_a"), give("plt_b")])
    committed_together(group)
    page, _ = ledger.list_lots("eve", uow)
    assert sorted((lot.amount, lot.platform_id) for lot in page.items) == [
        (1, "plt_a"),
        (1, "plt_b"),
        (40, None),
    ]
    for hold, owner, stranger in ((results[0], "plt_a", "plt_b"), (results[1], "plt_b", "plt_a")):
        with pytest.raises(HoldNotFound):
            ledger.release(
                ledger.ReleaseHold(hold_id=hold.id, idempotency_key=hold.id, platform_id=stranger),
                uow,
            )
        released = ledger.release(
            ledger.ReleaseHold(hold_id=hold.id, idempotency_key=hold.id, platform_id=owner), uow
        )
        assert (released.status.value, released.platform_id) == ("released", owner)
    assert ledger.get_balance("eve", uow).available == 42


def test_a_listing_hides_another_platforms_keys_and_metadata(shop: Shop, clock: FakeClock) -> None:
    other = shop.platform_key("other", "admin")
    secret = {"prompt": "a private prompt", "job": "job-7"}
    post(
        shop,
        f"/v1/accounts/{ACCOUNT}/grants",
        {"amount": 60, "reason": "spring", "metadata": {"campaign": "spring"}},
        "a-grant-key",
    )
    clock.advance(seconds=1)  # lots list in spending order: oldest first
    post(shop, f"/v1/accounts/{ACCOUNT}/debits", {"amount": 4, "metadata": secret}, "a-debit-key")
    post(shop, f"/v1/accounts/{ACCOUNT}/grants", {"amount": 5, "reason": "b"}, "b-grant-key", other)

    def listed(platform: str | None) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        headers = shop.as_platform(platform) if platform else {}
        entries = shop.client.get(f"/v1/accounts/{ACCOUNT}/entries", headers=headers)
        lots = shop.client.get(f"/v1/accounts/{ACCOUNT}/lots", headers=headers)
        assert entries.status_code == lots.status_code == 200
        return entries.json()["data"], lots.json()["data"]

    mine, my_lots = listed(None)
    theirs, their_lots = listed(other)
    # A sees its own keys and metadata, and B's entry without B's key.
    assert [(e["type"], e["amount"], e["idempotency_key"], e["metadata"]) for e in mine] == [
        ("grant", 5, None, {}),
        ("debit", 4, "a-debit-key", secret),
        ("grant", 60, "a-grant-key", {"campaign": "spring"}),
    ]
    # B sees the same wallet: amounts, kinds, times, who; never A's keys or metadata.
    assert [(e["type"], e["amount"], e["idempotency_key"], e["metadata"]) for e in theirs] == [
        ("grant", 5, "b-grant-key", {}),
        ("debit", 4, None, {}),
        ("grant", 60, None, {}),
    ]
    assert [e["created_at"] for e in theirs] == [e["created_at"] for e in mine]
    assert [e["platform_id"] for e in theirs] == [e["platform_id"] for e in mine]
    assert "a private prompt" not in str(theirs) + str(their_lots)
    assert [(lot["amount"], lot["metadata"]) for lot in my_lots] == [
        (60, {"campaign": "spring"}),
        (5, {}),
    ]
    assert [(lot["amount"], lot["remaining"], lot["metadata"]) for lot in their_lots] == [
        (60, 56, {}),
        (5, 5, {}),
    ]


@pytest.mark.parametrize("kind", DATABASES)
def test_the_migration_records_the_platform_of_existing_lots_and_holds(
    kind: str, tmp_path: Path
) -> None:
    with database(kind, str(tmp_path), create=False) as db:
        upgrade(db, "0006")
        clock = FakeClock()
        with db.engine.begin() as connection:
            for statement in (
                "INSERT INTO accounts (account_id, debt, entry_seq, pending_holds, created_at) "
                "VALUES ('acc', 0, 4, 1, CURRENT_TIMESTAMP)",
                "INSERT INTO lots (lot_id, account_id, source, amount, remaining, is_open, "
                "priority, created_at) VALUES "
                "('lot_a', 'acc', 'gift', 10, 3, true, 0, CURRENT_TIMESTAMP), "
                "('lot_t', 'acc', 'refund', 4, 4, true, 0, CURRENT_TIMESTAMP)",
                "INSERT INTO holds (hold_id, account_id, amount, captured, status, expires_at, "
                "created_at) VALUES ('hold_a', 'acc', 7, 0, 'pending', CURRENT_TIMESTAMP, "
                "CURRENT_TIMESTAMP)",
                "INSERT INTO hold_allocations (hold_id, position, lot_id, account_id, amount) "
                "VALUES ('hold_a', 0, 'lot_a', 'acc', 7)",
                "INSERT INTO entries (entry_id, account_id, seq, type, amount, lot_id, hold_id, "
                "platform_id, idempotency_key, created_at) VALUES "
                "('e1', 'acc', 1, 'grant', 10, 'lot_a', NULL, 'plt_a', 'k1', CURRENT_TIMESTAMP),"
                "('e2', 'acc', 2, 'grant', 4, 'lot_t', NULL, NULL, NULL, CURRENT_TIMESTAMP),"
                "('e3', 'acc', 3, 'hold', 7, 'lot_a', 'hold_a', 'plt_b', 'k3', CURRENT_TIMESTAMP),"
                # Another platform's later entries on the same lot say nothing of who made it.
                "('e4', 'acc', 4, 'debit', 1, 'lot_a', NULL, 'plt_c', 'k4', CURRENT_TIMESTAMP)",
            ):
                connection.execute(text(statement))
        upgrade(db)

        def platforms() -> tuple[list[Any], list[Any]]:
            with db.engine.connect() as connection:
                lots = connection.execute(
                    text("SELECT lot_id, platform_id FROM lots ORDER BY lot_id")
                ).all()
                holds = connection.execute(text("SELECT hold_id, platform_id FROM holds")).all()
            return [tuple(row) for row in lots], [tuple(row) for row in holds]

        assert platforms() == ([("lot_a", "plt_a"), ("lot_t", None)], [("hold_a", "plt_b")])
        # Loaded through the repository, the hold is plt_b's alone.
        uow = SqlUnitOfWork(db, clock)
        with uow:
            account = uow.accounts.get_for_update("acc")
            assert account is not None
            assert account.holds["hold_a"].platform_id == "plt_b"
            assert account.lots["lot_a"].platform_id == "plt_a"
        downgrade(db, "0006")
        with db.engine.connect() as connection:
            for table in ("lots", "holds"):
                columns = list(connection.execute(text(f"SELECT * FROM {table}")).keys())
                assert "platform_id" not in columns
        upgrade(db)  # and up again, backfilled the same
        assert platforms() == ([("lot_a", "plt_a"), ("lot_t", None)], [("hold_a", "plt_b")])
