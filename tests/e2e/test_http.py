"""The HTTP API v1 (docs/rules.md §3) against a real `tally serve`, on SQLite and PostgreSQL: every
endpoint with the values it answers, idempotency over the wire, bad input, and the edge (request
ids, problem+json, logs, metrics)."""

from __future__ import annotations

import json
import re
import secrets
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import httpx
import isodate
import pytest
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import text

from tally.adapters.db.engine import connect
from tests.e2e.server import Api, Server, ok, problem

BIG = 2**53


@pytest.fixture(scope="module")
def server(shared_server: Server) -> Server:
    return shared_server


@pytest.fixture(scope="module")
def admin_key(shared_admin_key: str) -> str:
    return shared_admin_key


@pytest.fixture(scope="module")
def api(server: Server, admin_key: str) -> Iterator[Api]:
    client = Api(server, admin_key)
    yield client
    client.close()


@pytest.fixture
def account() -> str:
    return f"http-{secrets.token_hex(6)}"


#: Far enough ahead to outlive any run, near enough to read: about four years from today, to the
#: second (a fixed date would start failing once it had passed).
FAR = (datetime.now(UTC) + timedelta(days=1500)).replace(microsecond=0)


def when(text: str) -> datetime:
    return datetime.fromisoformat(text)


def _wait_past(moment: datetime) -> None:
    """Until the wall clock (the server's too: same machine) is past `moment`."""
    while (left := (moment - datetime.now(UTC)).total_seconds()) >= 0:
        time.sleep(min(0.2, left + 0.01))


def funds(api: Api, account: str) -> tuple[int, int, int]:
    """(available, held, debt) of an account now."""
    balance = api.balance(account)
    return balance["available"], balance["held"], balance["debt"]


def rfc3339(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat().replace("+00:00", "Z")


# --- accounts -------------------------------------------------------------------------------


def test_put_account_creates_it_once_and_sets_its_email(api: Api, account: str) -> None:
    made = ok(api.put(f"/v1/accounts/{account}", {"email": "ana@example.com"}))
    assert made == {
        "object": "account",
        "account_id": account,
        "email": "ana@example.com",
        "created_at": made["created_at"],
    }
    again = ok(api.put(f"/v1/accounts/{account}", {"email": "ana@example.org"}))
    assert again["email"] == "ana@example.org"
    assert again["created_at"] == made["created_at"], "PUT does not make a second account"
    # PUT replaces: no email in the body means none on the account.
    assert ok(api.put(f"/v1/accounts/{account}"))["email"] is None
    assert api.balance(account) == {
        "account_id": account,
        "available": 0,
        "held": 0,
        "debt": 0,
        "allowances": {},
        "next_expiry": None,
    }
    every_char = "a.b_c:d@e-F9"
    assert ok(api.put(f"/v1/accounts/{every_char}"))["account_id"] == every_char


def test_reads_of_an_unknown_account_are_404(api: Api, account: str) -> None:
    for what in ("balance", "lots", "entries"):
        body = problem(api.get(f"/v1/accounts/{account}/{what}"), 404, "account_not_found")
        assert body["account_id"] == account
    problem(api.post(f"/v1/accounts/{account}/debits", {"amount": 1}), 404, "account_not_found")
    problem(api.post(f"/v1/accounts/{account}/holds", {"amount": 1}), 404, "account_not_found")


# --- grants and lots ------------------------------------------------------------------------


def test_a_grant_answers_its_lot_with_every_field(api: Api, account: str) -> None:
    lot = api.grant(
        account,
        12,
        source="support",
        expires_at=FAR.astimezone(timezone(timedelta(hours=2))).isoformat(),
        priority=-3,
        reason="make good",
        metadata={"ticket": 42, "tags": ["a"]},
    )
    assert lot == {
        "id": lot["id"],
        "object": "lot",
        "account_id": account,
        "source": "support",
        "amount": 12,
        "remaining": 12,
        "status": "active",
        "expires_at": rfc3339(FAR),  # answered in UTC
        "priority": -3,
        "created_at": lot["created_at"],
        "voided_at": None,
        "reason": "make good",
        "metadata": {"ticket": 42, "tags": ["a"]},
    }
    assert re.fullmatch(r"lot_[0-9a-z]{26}", lot["id"])
    assert abs(when(lot["created_at"]) - datetime.now(UTC)) < timedelta(minutes=1)


@pytest.mark.parametrize(
    ("fields", "validity"),
    [
        ({"source": "purchase"}, "P2Y"),  # rule 4: purchases last two years
        ({"source": "gift"}, "P2Y"),
        ({"source": "promotional"}, None),  # promotional credits never expire by default
        ({}, None),  # and promotional is the default source
        ({"source": "purchase", "valid_for": "never"}, None),
        ({"source": "promotional", "valid_for": "P7D"}, "P7D"),
        ({"source": "refund", "valid_for": "PT12H"}, "PT12H"),
        ({"valid_for": "P1M"}, "P1M"),
    ],
)
def test_grant_validity(
    api: Api, account: str, fields: dict[str, str], validity: str | None
) -> None:
    lot = api.grant(account, 1, **fields)
    assert lot["source"] == fields.get("source", "promotional")
    if validity is None:
        assert lot["expires_at"] is None
    else:
        expected = when(lot["created_at"]) + isodate.parse_duration(validity)
        assert when(lot["expires_at"]) == expected


def test_lots_list_in_spending_order_and_paginate(api: Api, account: str) -> None:
    later = api.grant(account, 3, expires_at=rfc3339(FAR), priority=5)
    first_of_same = api.grant(account, 2, expires_at=rfc3339(FAR), priority=-5)
    soonest = api.grant(account, 1, valid_for="P7D")
    never_old = api.grant(account, 4)
    never_new = api.grant(account, 5)
    # Rule 3: soonest expiry first, never-expiring last; then priority; then oldest.
    order = [soonest["id"], first_of_same["id"], later["id"], never_old["id"], never_new["id"]]

    everything = ok(api.get(f"/v1/accounts/{account}/lots"))
    assert [lot["id"] for lot in everything["data"]] == order
    assert everything["has_more"] is False

    seen: list[str] = []
    page = ok(api.get(f"/v1/accounts/{account}/lots", limit=2))
    while True:
        seen += [lot["id"] for lot in page["data"]]
        assert len(page["data"]) == (2 if page["has_more"] else 1)
        if not page["has_more"]:
            break
        page = ok(api.get(f"/v1/accounts/{account}/lots", limit=2, starting_after=seen[-1]))
    assert seen == order
    exact = ok(api.get(f"/v1/accounts/{account}/lots", limit=5))
    assert exact["has_more"] is False
    assert len(exact["data"]) == 5

    # The order the list shows is the order credits are spent in.
    spent = ok(api.post(f"/v1/accounts/{account}/debits", {"amount": 5}), 201)
    assert spent["allocations"] == [
        {"lot_id": soonest["id"], "amount": 1},
        {"lot_id": first_of_same["id"], "amount": 2},
        {"lot_id": later["id"], "amount": 2},
    ]
    after = ok(api.get(f"/v1/accounts/{account}/lots"))["data"]
    assert [(lot["remaining"], lot["status"]) for lot in after] == [
        (0, "spent"),
        (0, "spent"),
        (1, "active"),
        (4, "active"),
        (5, "active"),
    ]
    balance = api.balance(account)
    assert balance["available"] == 10
    assert balance["next_expiry"] == {"at": later["expires_at"], "amount": 1}


#: The life of the lot and hold that must expire during a test: the hold has to be placed
#: inside it (one request), so it is generous; the reads before expiry are made `?at=` an
#: instant inside it, so they may come as late as they like.
SHORT_LIFE = 5


def test_lots_and_holds_past_their_time_count_as_expired_at_once(api: Api, account: str) -> None:
    api.grant(account, 5)
    fleeting = api.grant(account, 3, valid_for=f"PT{SHORT_LIFE}S")
    hold = ok(
        api.post(f"/v1/accounts/{account}/holds", {"amount": 2, "ttl_seconds": SHORT_LIFE}), 201
    )
    placed = when(hold["created_at"])
    assert placed < when(fleeting["expires_at"]), f"the hold took over {SHORT_LIFE} s to place"
    assert hold["allocations"] == [{"lot_id": fleeting["id"], "amount": 2}]  # soonest first
    balance = api.balance(account, at=hold["created_at"])
    assert (balance["available"], balance["held"]) == (6, 2)
    assert balance["next_expiry"] == {"at": fleeting["expires_at"], "amount": 1}
    _wait_past(max(when(fleeting["expires_at"]), when(hold["expires_at"])))

    # No sweep runs (the worker is off): reads alone must count both as expired. The held
    # credits went back to a lot that has expired, so they are gone too.
    balance = api.balance(account)
    assert (balance["available"], balance["held"], balance["next_expiry"]) == (5, 0, None)
    lots = {lot["id"]: lot for lot in ok(api.get(f"/v1/accounts/{account}/lots"))["data"]}
    assert (lots[fleeting["id"]]["status"], lots[fleeting["id"]]["remaining"]) == ("expired", 0)
    refused = problem(api.post(f"/v1/holds/{hold['id']}/capture"), 409, "hold_not_pending")
    assert refused["hold_status"] == "expired"
    problem(api.post(f"/v1/accounts/{account}/debits", {"amount": 6}), 402, "insufficient_credits")
    assert ok(api.post(f"/v1/accounts/{account}/debits", {"amount": 5}), 201)["amount"] == 5


def test_balance_at_a_past_instant(api: Api, account: str) -> None:
    granted = api.grant(account, 10)
    ok(api.post(f"/v1/accounts/{account}/debits", {"amount": 3}), 201)
    held = ok(api.post(f"/v1/accounts/{account}/holds", {"amount": 2}), 201)
    assert api.balance(account)["available"] == 5
    assert api.balance(account)["held"] == 2

    at_grant = api.balance(account, at=granted["created_at"])
    assert (at_grant["available"], at_grant["held"]) == (10, 0)
    # The same instant written with another offset is the same instant.
    shifted = when(granted["created_at"]).astimezone(timezone(timedelta(hours=-5)))
    assert api.balance(account, at=shifted.isoformat())["available"] == 10
    before = rfc3339(when(granted["created_at"]) - timedelta(seconds=1))
    assert api.balance(account, at=before)["available"] == 0
    at_hold = api.balance(account, at=held["created_at"])
    assert (at_hold["available"], at_hold["held"]) == (5, 2)

    problem(api.get(f"/v1/accounts/{account}/balance", at="yesterday"), 422, "invalid_time")
    naive = "2026-01-01T00:00:00"
    problem(api.get(f"/v1/accounts/{account}/balance", at=naive), 422, "invalid_time")
    future = rfc3339(datetime.now(UTC) + timedelta(days=1))
    problem(api.get(f"/v1/accounts/{account}/balance", at=future), 422, "invalid_time")


def test_void_cancels_what_remains_of_a_lot(api: Api, account: str) -> None:
    lot = api.grant(account, 10)
    keep = api.grant(account, 1)
    ok(api.post(f"/v1/accounts/{account}/debits", {"amount": 3}), 201)
    held = ok(api.post(f"/v1/accounts/{account}/holds", {"amount": 4}), 201)
    assert held["allocations"] == [{"lot_id": lot["id"], "amount": 4}]

    voided = ok(api.post(f"/v1/lots/{lot['id']}/void", {"reason": "chargeback"}))
    assert voided["id"] == lot["id"]
    assert (voided["status"], voided["remaining"], voided["amount"]) == ("void", 0, 10)
    assert voided["voided_at"] is not None
    assert funds(api, account) == (1, 4, 0)
    newest = ok(api.get(f"/v1/accounts/{account}/entries", limit=1))["data"][0]
    assert (newest["type"], newest["amount"], newest["lot_id"]) == ("void", 3, lot["id"])
    assert newest["reason"] == "chargeback"

    # Credits held from a void lot do not come back when the hold is released.
    ok(api.post(f"/v1/holds/{held['id']}/release"))
    assert api.balance(account)["available"] == 1
    assert api.balance(account)["held"] == 0
    problem(api.post(f"/v1/lots/{lot['id']}/void", {"reason": "again"}), 409, "lot_voided")
    problem(api.post(f"/v1/lots/{keep['id']}/void", {}), 422, "invalid_input")  # reason needed
    problem(
        api.post("/v1/lots/lot_00000000000000000000000000/void", {"reason": "x"}),
        404,
        "lot_not_found",
    )


# --- holds and debits -----------------------------------------------------------------------


def test_a_hold_by_tool_is_priced_from_the_catalog_and_captured_by_quantity(
    api: Api, account: str
) -> None:
    lot = api.grant(account, 10)
    hold = ok(api.post(f"/v1/accounts/{account}/holds", {"tool": "video", "quantity": 3}), 201)
    assert hold == {
        "id": hold["id"],
        "object": "hold",
        "account_id": account,
        "amount": 6,  # a video costs 2
        "captured": 0,
        "status": "pending",
        "expires_at": hold["expires_at"],
        "created_at": hold["created_at"],
        "tool": "video",
        "quantity": 3,
        "allocations": [{"lot_id": lot["id"], "amount": 6}],
        "metadata": {},
    }
    assert re.fullmatch(r"hold_[0-9a-z]{26}", hold["id"])
    assert when(hold["expires_at"]) - when(hold["created_at"]) == timedelta(seconds=900)
    assert api.balance(account)["available"] == 4
    assert api.balance(account)["held"] == 6

    # Two of three videos delivered: 4 credits kept, 2 go back (rule 7).
    captured = ok(api.post(f"/v1/holds/{hold['id']}/capture", {"quantity": 2}))
    assert (captured["status"], captured["captured"], captured["amount"]) == ("captured", 4, 6)
    assert funds(api, account)[:2] == (6, 0)
    for action in ("capture", "release"):
        refused = problem(api.post(f"/v1/holds/{hold['id']}/{action}"), 409, "hold_not_pending")
        assert (refused["hold_id"], refused["hold_status"]) == (hold["id"], "captured")

    portraits = ok(
        api.post(f"/v1/accounts/{account}/holds", {"tool": "portrait", "quantity": 3}), 201
    )
    assert portraits["amount"] == 3  # a portrait costs 1
    body = problem(
        api.post(f"/v1/holds/{portraits['id']}/capture", {"quantity": 4}),
        422,
        "capture_exceeds_hold",
    )
    assert body["status"] == 422
    assert api.balance(account)["held"] == 3


def test_a_hold_by_amount_with_ttl_and_metadata_is_captured_in_part(api: Api, account: str) -> None:
    api.grant(account, 10)
    hold = ok(
        api.post(
            f"/v1/accounts/{account}/holds",
            {"amount": 5, "ttl_seconds": 60, "metadata": {"job": "j-1"}},
        ),
        201,
    )
    assert (hold["amount"], hold["tool"], hold["quantity"]) == (5, None, None)
    assert hold["metadata"] == {"job": "j-1"}
    assert when(hold["expires_at"]) - when(hold["created_at"]) == timedelta(seconds=60)
    problem(api.post(f"/v1/holds/{hold['id']}/capture", {"amount": 6}), 422, "capture_exceeds_hold")
    # A hold placed by amount has no unit price to capture a quantity at.
    problem(api.post(f"/v1/holds/{hold['id']}/capture", {"quantity": 1}), 422, "invalid_input")
    both = {"amount": 1, "quantity": 1}
    problem(api.post(f"/v1/holds/{hold['id']}/capture", both), 422, "invalid_input")
    captured = ok(api.post(f"/v1/holds/{hold['id']}/capture", {"amount": 2}))
    assert (captured["status"], captured["captured"]) == ("captured", 2)
    assert api.balance(account)["available"] == 8


@pytest.mark.parametrize("body", [None, {}], ids=["no-body", "empty-object"])
def test_capture_without_an_amount_keeps_everything(
    api: Api, account: str, body: dict[str, int] | None
) -> None:
    api.grant(account, 10)
    hold = ok(api.post(f"/v1/accounts/{account}/holds", {"tool": "ai_model", "quantity": 2}), 201)
    captured = ok(api.post(f"/v1/holds/{hold['id']}/capture", body))
    assert (captured["status"], captured["captured"]) == ("captured", 4)
    assert funds(api, account)[:2] == (6, 0)


@pytest.mark.parametrize("body", [None, {}, {"reason": "job failed"}])
def test_release_gives_everything_back(api: Api, account: str, body: dict[str, str] | None) -> None:
    lot = api.grant(account, 10)
    hold = ok(api.post(f"/v1/accounts/{account}/holds", {"amount": 7}), 201)
    assert api.balance(account)["available"] == 3
    released = ok(api.post(f"/v1/holds/{hold['id']}/release", body))
    assert (released["status"], released["captured"], released["amount"]) == ("released", 0, 7)
    assert funds(api, account)[:2] == (10, 0)
    lots = ok(api.get(f"/v1/accounts/{account}/lots"))["data"]
    assert [(x["id"], x["remaining"]) for x in lots] == [(lot["id"], 10)]
    newest = ok(api.get(f"/v1/accounts/{account}/entries", limit=1))["data"][0]
    assert (newest["type"], newest["amount"], newest["hold_id"]) == ("release", 7, hold["id"])
    assert newest["reason"] == (body or {}).get("reason")


def test_debits_by_amount_and_by_tool(api: Api, account: str) -> None:
    lot = api.grant(account, 20)
    by_amount = ok(api.post(f"/v1/accounts/{account}/debits", {"amount": 3}), 201)
    assert by_amount == {
        "id": by_amount["id"],
        "object": "entry",
        "type": "debit",
        "account_id": account,
        "amount": 3,
        "created_at": by_amount["created_at"],
        "allocations": [{"lot_id": lot["id"], "amount": 3}],
        "entries": by_amount["entries"],
    }
    journal = {e["id"]: e for e in ok(api.get(f"/v1/accounts/{account}/entries"))["data"]}
    assert by_amount["entries"]
    assert all(journal[e]["type"] == "debit" for e in by_amount["entries"])
    assert sum(journal[e]["amount"] for e in by_amount["entries"]) == 3

    videos = ok(api.post(f"/v1/accounts/{account}/debits", {"tool": "video", "quantity": 2}), 201)
    portraits = ok(
        api.post(
            f"/v1/accounts/{account}/debits",
            {"tool": "portrait", "quantity": 3, "metadata": {"job": 1}},
        ),
        201,
    )
    assert (videos["amount"], portraits["amount"]) == (4, 3)
    assert api.balance(account)["available"] == 10
    # The caller's metadata is kept on the journal entries the debit wrote.
    journal = {e["id"]: e for e in ok(api.get(f"/v1/accounts/{account}/entries"))["data"]}
    assert [journal[e]["metadata"] for e in portraits["entries"]] == [{"job": 1}]
    assert [journal[e]["metadata"] for e in videos["entries"]] == [{}]
    refused = problem(
        api.post(f"/v1/accounts/{account}/debits", {"tool": "video", "quantity": 6}),
        402,
        "insufficient_credits",
    )
    assert (refused["available"], refused["required"]) == (10, 12)
    assert api.balance(account)["available"] == 10


def test_entries_are_the_journal_newest_first_and_paginate(
    server: Server, api: Api, account: str
) -> None:
    steps = [
        ("grant", f"/v1/accounts/{account}/grants", {"amount": 10, "reason": "stock"}),
        ("debit", f"/v1/accounts/{account}/debits", {"amount": 2}),
        ("hold", f"/v1/accounts/{account}/holds", {"amount": 3}),
    ]
    keys = []
    for _, path, body in steps:
        keys.append(f"entries-{secrets.token_hex(4)}")
        answer = api.post(path, body, idempotency_key=keys[-1])
        assert answer.status_code == 201, answer.text
    hold_id = answer.json()["id"]
    keys.append(f"entries-{secrets.token_hex(4)}")
    ok(api.post(f"/v1/holds/{hold_id}/capture", {"amount": 1}, idempotency_key=keys[-1]))

    journal = ok(api.get(f"/v1/accounts/{account}/entries"))
    assert journal["has_more"] is False
    data = journal["data"]
    # The capture writes a capture and a release of what it did not keep.
    assert [(e["type"], e["amount"]) for e in data] == [
        ("release", 2),
        ("capture", 1),
        ("hold", 3),
        ("debit", 2),
        ("grant", 10),
    ]
    assert [e["seq"] for e in data] == [5, 4, 3, 2, 1]
    assert [e["idempotency_key"] for e in data] == [keys[3], keys[3], keys[2], keys[1], keys[0]]
    assert {e["platform_id"] for e in data} == {server.platform_ids["e2e-admin"]}
    assert all(re.fullmatch(r"ent_[0-9a-z]{26}", e["id"]) for e in data)
    assert all(e["account_id"] == account and e["object"] == "entry" for e in data)

    pages: list[dict[str, Any]] = []
    page = ok(api.get(f"/v1/accounts/{account}/entries", limit=2))
    pages.append(page)
    while page["has_more"]:
        after = page["data"][-1]["id"]
        page = ok(api.get(f"/v1/accounts/{account}/entries", limit=2, starting_after=after))
        pages.append(page)
    assert [len(p["data"]) for p in pages] == [2, 2, 1]
    assert [e for p in pages for e in p["data"]] == data


def test_pagination_limits(api: Api, account: str) -> None:
    api.grant(account, 1)
    for what in ("lots", "entries"):
        path = f"/v1/accounts/{account}/{what}"
        assert len(ok(api.get(path, limit=500))["data"]) == 1
        for bad in (0, 501, -1):
            problem(api.get(path, limit=bad), 422, "invalid_input")
        problem(api.get(path, limit="ten"), 422, "invalid_input")
    problem(api.get(f"/v1/accounts/{account}/lots", starting_after="nope"), 404, "lot_not_found")
    problem(api.get(f"/v1/accounts/{account}/entries", starting_after="nope"), 422, "invalid_input")


# --- catalog and operations -----------------------------------------------------------------


def test_the_catalog(api: Api) -> None:
    tools = ok(api.get("/v1/tools"))
    assert tools["has_more"] is False
    by_id = {tool["id"]: tool for tool in tools["data"]}
    assert len(by_id) == 10
    assert by_id["video"] == {
        "id": "video",
        "object": "tool",
        "name": "Video generator",
        "credits_per_unit": 2,
        "unit": "video",
    }
    assert by_id["portrait"]["credits_per_unit"] == 1
    prices = {tool: by_id[tool]["credits_per_unit"] for tool in by_id}
    assert prices == {
        "background": 1,
        "logo": 1,
        "recolor": 1,
        "image_extender": 1,
        "ai_model": 2,
        "footwear_model": 2,
        "video": 2,
        "portrait": 1,
        "fantasy_pet": 1,
        "concept_art": 1,
    }

    packages = {p["id"]: p for p in ok(api.get("/v1/packages"))["data"]}
    assert [(p["credits"], p["price"]) for p in packages.values()] == [
        (5, 500),
        (10, 900),
        (25, 2000),
        (40, 3000),
        (100, 5000),
        (None, 1000),
    ]
    assert packages["starter"] == {
        "id": "starter",
        "object": "package",
        "name": "Starter",
        "credits": 5,
        "surprise": None,
        "price": 500,
        "currency": "USD",
        "validity": "P2Y",
    }
    assert packages["lifetime"]["validity"] == "never"
    assert packages["surprise"]["surprise"] == {"min": 5, "max": 50}
    assert ok(api.get("/v1/plans")) == {"data": [], "has_more": False}


def test_health_openapi_and_docs_need_no_key(server: Server) -> None:
    health = httpx.get(f"{server.base_url}/healthz")
    assert ok(health) == {"status": "ok", "database": "ok"}

    spec = ok(httpx.get(f"{server.base_url}/openapi.json"))
    assert spec["openapi"].startswith("3.")
    operations = {
        (method.upper(), path)
        for path, item in spec["paths"].items()
        for method in item
        if path.startswith("/v1/")
    }
    assert operations == {
        ("PUT", "/v1/accounts/{account_id}"),
        ("GET", "/v1/accounts/{account_id}/balance"),
        ("GET", "/v1/accounts/{account_id}/lots"),
        ("GET", "/v1/accounts/{account_id}/entries"),
        ("POST", "/v1/accounts/{account_id}/grants"),
        ("POST", "/v1/lots/{lot_id}/void"),
        ("POST", "/v1/accounts/{account_id}/holds"),
        ("POST", "/v1/holds/{hold_id}/capture"),
        ("POST", "/v1/holds/{hold_id}/release"),
        ("POST", "/v1/accounts/{account_id}/debits"),
        ("GET", "/v1/tools"),
        ("GET", "/v1/packages"),
        ("GET", "/v1/plans"),
        ("POST", "/v1/redemptions"),
        ("GET", "/v1/codes/{code}"),
        ("GET", "/v1/orders"),
        ("POST", "/v1/orders/{order_id}/refund"),
        ("POST", "/v1/orders/{order_id}/reissue"),
    }
    grant_body = spec["components"]["schemas"]["GrantIn"]
    assert grant_body["additionalProperties"] is False
    assert set(grant_body["required"]) == {"amount", "reason"}

    docs = httpx.get(f"{server.base_url}/docs")
    assert docs.status_code == 200
    assert docs.headers["content-type"].startswith("text/html")
    assert "swagger-ui" in docs.text
    assert "/openapi.json" in docs.text


def _samples(server: Server) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    scraped = httpx.get(f"{server.base_url}/metrics")
    assert scraped.status_code == 200
    assert scraped.headers["content-type"].startswith("text/plain; version=0.0.4")
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(scraped.text)
        for sample in family.samples
    }


def _credits(samples: dict[tuple[str, frozenset[tuple[str, str]]], float]) -> dict[str, float]:
    return {
        flow: samples[(f"tally_credits_{flow}_total", frozenset())]
        for flow in ("granted", "spent", "expired")
    }


def _journal_totals(server: Server) -> dict[str, float]:
    """What the credit metrics must say, read from the journal directly."""
    db = connect(server.url, pool_size=1)
    try:
        with db.engine.connect() as connection:
            rows = connection.execute(text("SELECT type, SUM(amount) FROM entries GROUP BY type"))
            found = {kind: float(total) for kind, total in rows}
    finally:
        db.dispose()
    flows = {"granted": ("grant",), "spent": ("capture", "debit"), "expired": ("expire",)}
    return {flow: sum(found.get(t, 0.0) for t in types) for flow, types in flows.items()}


def test_metrics(server: Server, api: Api, account: str) -> None:
    before = _journal_totals(server)
    api.grant(account, 10)
    ok(api.post(f"/v1/accounts/{account}/debits", {"amount": 3}), 201)
    hold = ok(api.post(f"/v1/accounts/{account}/holds", {"amount": 5}), 201)
    ok(api.post(f"/v1/holds/{hold['id']}/capture", {"amount": 2}), 200)
    fleeting = api.grant(account, 4, valid_for="PT1S")  # after the spending, so none of it goes
    # A fresh process: the credit totals are cached for 15 s and the request counts start at 0.
    server.restart()
    _wait_past(when(fleeting["expires_at"]))
    api.grant(account, 1)  # the account's next change writes the expiry down

    for _ in range(3):
        ok(api.get("/v1/tools"))
    for _ in range(2):
        problem(httpx.get(f"{server.base_url}/v1/no-such-thing"), 404, "not_found")
    problem(httpx.get(f"{server.base_url}/v1/accounts/{account}/balance"), 401, "api_key_required")
    samples = _samples(server)
    after = _credits(samples)
    # Spent is what was kept: debits and captures, not holds; expired is what was left.
    assert {flow: after[flow] - before[flow] for flow in after} == {
        "granted": 15.0,
        "spent": 5.0,
        "expired": 4.0,
    }
    assert after == _journal_totals(server)

    def requests(method: str, route: str, status: int) -> float:
        labels = frozenset({"method": method, "route": route, "status": str(status)}.items())
        return samples.get(("tally_http_requests_total", labels), 0.0)

    assert requests("GET", "/v1/tools", 200) == 3
    assert requests("GET", "unmatched", 404) == 2
    assert requests("GET", "/v1/accounts/{account_id}/balance", 401) == 1
    assert requests("GET", "/healthz", 200) == 1  # the one the restart waited for
    assert requests("POST", "/v1/accounts/{account_id}/grants", 201) == 1
    latency = (
        "tally_http_request_duration_seconds_count",
        frozenset({"method": "GET", "route": "/v1/tools"}.items()),
    )
    assert samples[latency] == 3
    assert not any(
        name == "tally_http_requests_total"
        and re.search(r"/v1/accounts/(?!\{)", dict(labels)["route"])
        for name, labels in samples
    ), "routes are templates, never raw paths"


# --- idempotency over HTTP ------------------------------------------------------------------


def test_a_replay_answers_the_first_response(api: Api, account: str) -> None:
    def twice(path: str, body: Any, status: int) -> dict[str, Any]:
        key = f"replay-{secrets.token_hex(6)}"
        first = api.post(path, body, idempotency_key=key)
        assert first.status_code == status, first.text
        assert "idempotent-replayed" not in first.headers
        again = api.post(path, body, idempotency_key=key)
        assert again.status_code == status
        assert again.headers["idempotent-replayed"] == "true"
        assert again.content == first.content
        result: dict[str, Any] = first.json()
        return result

    lot = twice(f"/v1/accounts/{account}/grants", {"amount": 10, "reason": "r"}, 201)
    assert api.balance(account)["available"] == 10
    twice(f"/v1/accounts/{account}/debits", {"tool": "video", "quantity": 1}, 201)
    assert api.balance(account)["available"] == 8
    hold = twice(f"/v1/accounts/{account}/holds", {"amount": 3}, 201)
    twice(f"/v1/holds/{hold['id']}/capture", {"amount": 1}, 200)
    assert funds(api, account)[:2] == (7, 0)
    other = twice(f"/v1/accounts/{account}/holds", {"amount": 2}, 201)
    twice(f"/v1/holds/{other['id']}/release", None, 200)
    assert api.balance(account)["available"] == 7
    twice(f"/v1/lots/{lot['id']}/void", {"reason": "fraud"}, 200)
    assert api.balance(account)["available"] == 0
    entries = ok(api.get(f"/v1/accounts/{account}/entries"))["data"]
    assert [e["type"] for e in entries] == [
        "void",
        "release",
        "hold",
        "release",
        "capture",
        "hold",
        "debit",
        "grant",
    ], "each replay wrote nothing"


def test_a_key_reused_for_another_request_is_refused(api: Api, account: str) -> None:
    key = f"reuse-{secrets.token_hex(6)}"
    ok(
        api.post(
            f"/v1/accounts/{account}/grants", {"amount": 5, "reason": "r"}, idempotency_key=key
        ),
        201,
    )
    for path, body in [
        (f"/v1/accounts/{account}/grants", {"amount": 6, "reason": "r"}),
        (f"/v1/accounts/{account}/grants", {"amount": 5, "reason": "other"}),
        (f"/v1/accounts/{account}/debits", {"amount": 5}),  # same key, another endpoint
    ]:
        refused = api.post(path, body, idempotency_key=key)
        problem(refused, 422, "idempotency_key_reused")
        assert "idempotent-replayed" not in refused.headers
    assert api.balance(account)["available"] == 5


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/v1/accounts/{account}/grants", {"amount": 1, "reason": "r"}),
        ("/v1/accounts/{account}/holds", {"amount": 1}),
        ("/v1/accounts/{account}/debits", {"amount": 1}),
        ("/v1/holds/{hold}/capture", None),
        ("/v1/holds/{hold}/release", None),
        ("/v1/lots/{lot}/void", {"reason": "r"}),
    ],
)
def test_every_post_needs_an_idempotency_key(
    api: Api, account: str, path: str, body: dict[str, Any] | None
) -> None:
    lot = api.grant(account, 5)
    hold = ok(api.post(f"/v1/accounts/{account}/holds", {"amount": 2}), 201)
    url = path.format(account=account, hold=hold["id"], lot=lot["id"])
    problem(api.post(url, body, idempotency_key=""), 400, "idempotency_key_required")
    assert funds(api, account)[:2] == (3, 2)
    problem(api.post(url, body, idempotency_key="a\tb"), 422, "invalid_idempotency_key")
    problem(api.post(url, body, idempotency_key="k" * 256), 422, "invalid_idempotency_key")
    assert funds(api, account)[:2] == (3, 2)


@pytest.mark.parametrize("kind", ["grant", "debit"])
def test_one_key_from_eight_threads_has_one_effect(server: Server, api: Api, kind: str) -> None:
    account = f"race-{secrets.token_hex(6)}"
    if kind == "grant":  # the grant also creates the account, under the same race
        path, body, effect = f"/v1/accounts/{account}/grants", {"amount": 7, "reason": "r"}, 7
    else:
        api.grant(account, 100)
        path, body, effect = f"/v1/accounts/{account}/debits", {"amount": 7}, 93
    key = f"race-{secrets.token_hex(6)}"
    start = threading.Barrier(8)
    answers: list[httpx.Response] = []

    def call() -> None:
        with httpx.Client(base_url=server.base_url, headers=api.http.headers) as client:
            start.wait()
            answers.append(client.post(path, json=body, headers={"Idempotency-Key": key}))

    threads = [threading.Thread(target=call) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert [a.status_code for a in answers] == [201] * 8, [a.text for a in answers]
    assert len({a.content for a in answers}) == 1
    assert sorted(a.headers.get("idempotent-replayed", "") for a in answers) == [""] + ["true"] * 7
    assert api.balance(account)["available"] == effect
    types = [e["type"] for e in ok(api.get(f"/v1/accounts/{account}/entries"))["data"]]
    assert types.count(kind) == 1


def test_idempotency_keys_are_scoped_per_platform(server: Server, api: Api, account: str) -> None:
    other = Api(server, server.key("e2e-other-platform", "read,grant"))
    try:
        key = "same-key-on-two-platforms"
        body = {"amount": 5, "reason": "r"}
        mine = api.post(f"/v1/accounts/{account}/grants", body, idempotency_key=key)
        theirs = other.post(f"/v1/accounts/{account}/grants", body, idempotency_key=key)
        assert (mine.status_code, theirs.status_code) == (201, 201)
        assert "idempotent-replayed" not in theirs.headers
        assert mine.json()["id"] != theirs.json()["id"]
        # Each platform's replay answers its own first result.
        again = other.post(f"/v1/accounts/{account}/grants", body, idempotency_key=key)
        assert again.headers["idempotent-replayed"] == "true"
        assert again.content == theirs.content
        assert api.balance(account)["available"] == 10

        entries = ok(api.get(f"/v1/accounts/{account}/entries"))["data"]
        by_lot = {e["lot_id"]: e["platform_id"] for e in entries}
        assert by_lot == {
            mine.json()["id"]: server.platform_ids["e2e-admin"],
            theirs.json()["id"]: server.platform_ids["e2e-other-platform"],
        }
        # Each sees its own key; another platform's stays its own.
        keys = {e["lot_id"]: e["idempotency_key"] for e in entries}
        assert keys == {mine.json()["id"]: key, theirs.json()["id"]: None}
        seen = ok(other.get(f"/v1/accounts/{account}/entries"))["data"]
        keys = {e["lot_id"]: e["idempotency_key"] for e in seen}
        assert keys == {mine.json()["id"]: None, theirs.json()["id"]: key}
    finally:
        other.close()


# --- bad input ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def stocked(api: Api) -> dict[str, str]:
    """An account with credits, a pending hold by tool and a lot, for the refusal tests."""
    account = f"bad-{secrets.token_hex(6)}"
    lot = api.grant(account, 1000)
    hold = ok(api.post(f"/v1/accounts/{account}/holds", {"tool": "video", "quantity": 2}), 201)
    return {"account": account, "lot": lot["id"], "hold": hold["id"]}


# Each POST with a valid body; the refusal tests spoil one thing at a time.
BODIES: dict[str, tuple[str, dict[str, Any]]] = {
    "grants": ("/v1/accounts/{account}/grants", {"amount": 1, "reason": "r"}),
    "holds": ("/v1/accounts/{account}/holds", {"amount": 1}),
    "holds-by-tool": ("/v1/accounts/{account}/holds", {"tool": "video", "quantity": 1}),
    "debits": ("/v1/accounts/{account}/debits", {"amount": 1}),
    "debits-by-tool": ("/v1/accounts/{account}/debits", {"tool": "video", "quantity": 1}),
    "capture": ("/v1/holds/{hold}/capture", {"amount": 1}),
    "capture-by-quantity": ("/v1/holds/{hold}/capture", {"quantity": 1}),
}


def _unchanged(api: Api, stocked: dict[str, str]) -> None:
    balance = api.balance(stocked["account"])
    assert (balance["available"], balance["held"]) == (996, 4), "a refusal changed nothing"


@pytest.mark.parametrize(
    "raw", [b"{", b'{"amount": 1,}', b"{'amount': 1}", b"\xff\xfe", b"amount=1"]
)
def test_invalid_json_is_400(api: Api, stocked: dict[str, str], raw: bytes) -> None:
    for path, _ in BODIES.values():
        response = api.http.post(
            path.format(**stocked),
            content=raw,
            headers={"Idempotency-Key": secrets.token_hex(8), "Content-Type": "application/json"},
        )
        problem(response, 400, "invalid_json")
    _unchanged(api, stocked)


def test_a_body_that_is_not_json_is_400(api: Api, stocked: dict[str, str]) -> None:
    response = api.http.post(
        "/v1/accounts/{account}/grants".format(**stocked),
        content=b'{"amount": 1, "reason": "r"}',
        headers={"Idempotency-Key": secrets.token_hex(8), "Content-Type": "text/plain"},
    )
    problem(response, 400, "invalid_json")
    _unchanged(api, stocked)


@pytest.mark.parametrize(
    "value",
    [0, -1, BIG + 1, 10**30, 1.0, 1.5, "1", "one", True, [1], {"n": 1}],
    ids=repr,
)
@pytest.mark.parametrize("field", ["amount", "quantity"])
def test_credits_are_whole_numbers_from_1_to_2_53(
    api: Api, stocked: dict[str, str], field: str, value: Any
) -> None:
    for name, (path, valid) in BODIES.items():
        if field not in valid:
            continue
        body = {**valid, field: value}
        refused = problem(api.post(path.format(**stocked), body), 422, "invalid_amount")
        assert refused["errors"][0]["loc"] == ["body", field], name
    _unchanged(api, stocked)


def test_the_largest_amount_is_2_53(api: Api, account: str) -> None:
    assert api.grant(account, BIG)["amount"] == BIG
    assert api.balance(account)["available"] == BIG
    spent = ok(api.post(f"/v1/accounts/{account}/debits", {"amount": BIG}), 201)
    assert spent["amount"] == BIG
    assert api.balance(account)["available"] == 0


@pytest.mark.parametrize(
    ("name", "change"),
    [
        ("grants", {"unknown": 1}),
        ("grants", {"reason": 5}),
        ("grants", {"reason": ""}),
        ("grants", {"reason": "x" * 501}),
        ("grants", {"source": "free"}),
        ("grants", {"priority": "1"}),
        ("grants", {"metadata": [1]}),
        ("grants", {"metadata": {"big": "x" * 5000}}),
        ("grants", {"valid_for": "P2Y", "expires_at": rfc3339(FAR)}),
        ("holds", {"ttl_seconds": 0}),
        ("holds", {"ttl_seconds": 86401}),
        ("holds", {"ttl_seconds": 1.5}),
        ("holds", {"unknown": 1}),
        ("holds", {"tool": "video"}),  # a tool needs a quantity
        ("holds-by-tool", {"amount": 2}),  # tool and amount exclude each other
        ("holds-by-tool", {"tool": ""}),
        ("debits", {"unknown": 1}),
        ("debits-by-tool", {"tool": None, "quantity": 1}),
        ("capture", {"unknown": 1}),
    ],
)
def test_malformed_bodies_are_422(
    api: Api, stocked: dict[str, str], name: str, change: dict[str, Any]
) -> None:
    path, valid = BODIES[name]
    problem(api.post(path.format(**stocked), {**valid, **change}), 422, "invalid_input")
    _unchanged(api, stocked)


@pytest.mark.parametrize(
    ("field", "value", "code"),
    [
        ("valid_for", "forever", "invalid_duration"),
        ("expires_at", FAR.replace(tzinfo=None).isoformat(), "invalid_time"),  # no offset
        ("expires_at", "2020-01-01T00:00:00Z", "invalid_time"),  # in the past
        ("expires_at", "soon", "invalid_time"),
    ],
)
def test_grant_times_and_durations(
    api: Api, stocked: dict[str, str], field: str, value: str, code: str
) -> None:
    body = {"amount": 1, "reason": "r", field: value}
    problem(api.post("/v1/accounts/{account}/grants".format(**stocked), body), 422, code)


def test_unknown_fields_and_bodies_of_the_wrong_shape(api: Api, stocked: dict[str, str]) -> None:
    account = stocked["account"]
    refused = problem(api.put(f"/v1/accounts/{account}", {"emial": "a@b.c"}), 422, "invalid_input")
    assert refused["errors"][0]["loc"] == ["body", "emial"]
    problem(api.put(f"/v1/accounts/{account}", {"email": "not an address"}), 422, "invalid_email")
    for path in (f"/v1/holds/{stocked['hold']}/release", f"/v1/lots/{stocked['lot']}/void"):
        problem(api.post(path, {"reason": "r", "extra": True}), 422, "invalid_input")
        problem(api.post(path, [1, 2]), 422, "invalid_input")
    problem(api.post(f"/v1/accounts/{account}/holds", {}), 422, "invalid_input")
    problem(api.post(f"/v1/accounts/{account}/holds", "amount"), 422, "invalid_input")
    _unchanged(api, stocked)


# Text that is valid JSON but that PostgreSQL cannot store (NUL, lone surrogates) or that is
# not strict JSON (NaN): refused as input on both databases, never a 500.
UNSTORABLE = {
    "reason-nul": ("grants", '{"amount": 1, "reason": "a\\u0000b"}'),
    "metadata-value-nul": ("grants", '{"amount": 1, "reason": "r", "metadata": {"k": "\\u0000"}}'),
    "metadata-key-nul": ("grants", '{"amount": 1, "reason": "r", "metadata": {"\\u0000": 1}}'),
    "metadata-nan": ("grants", '{"amount": 1, "reason": "r", "metadata": {"k": [NaN]}}'),
    "metadata-infinity": ("grants", '{"amount": 1, "reason": "r", "metadata": {"k": -Infinity}}'),
    "metadata-surrogate": ("grants", '{"amount": 1, "reason": "r", "metadata": {"k": "\\ud800"}}'),
    "hold-metadata-nul": ("holds", '{"amount": 1, "metadata": {"k": "\\u0000"}}'),
    "debit-metadata-nul": ("debits", '{"amount": 1, "metadata": {"k": "\\u0000"}}'),
    "release-reason-nul": ("release", '{"reason": "\\u0000"}'),
    "void-reason-nul": ("void", '{"reason": "\\u0000"}'),
}


@pytest.mark.parametrize(("target", "raw"), UNSTORABLE.values(), ids=UNSTORABLE.keys())
def test_text_no_database_can_store_is_422(
    api: Api, stocked: dict[str, str], target: str, raw: str
) -> None:
    path = {
        "release": "/v1/holds/{hold}/release",
        "void": "/v1/lots/{lot}/void",
    }.get(target, f"/v1/accounts/{{account}}/{target}")
    answer = api.http.post(
        path.format(**stocked),
        content=raw.encode(),
        headers={"Idempotency-Key": secrets.token_hex(8), "Content-Type": "application/json"},
    )
    problem(answer, 422, "invalid_input")
    _unchanged(api, stocked)


def test_ids_and_emails_no_database_can_store(api: Api, stocked: dict[str, str]) -> None:
    account = stocked["account"]
    put = api.http.put(
        f"/v1/accounts/{account}",
        content=b'{"email": "a\\u0000b@example.com"}',
        headers={"Content-Type": "application/json"},
    )
    problem(put, 422, "invalid_email")
    lots = api.get(f"/v1/accounts/{account}/lots", starting_after="lot_\x00")
    problem(lots, 404, "lot_not_found")
    entries = api.get(f"/v1/accounts/{account}/entries", starting_after="ent_\x00")
    problem(entries, 422, "invalid_input")


@pytest.mark.parametrize("path", ["/v1/accounts/{account}/holds", "/v1/accounts/{account}/debits"])
def test_an_unknown_tool_is_422(api: Api, stocked: dict[str, str], path: str) -> None:
    body = {"tool": "teleporter", "quantity": 1}
    refused = problem(api.post(path.format(**stocked), body), 422, "unknown_tool")
    assert refused["tool"] == "teleporter"
    _unchanged(api, stocked)


def test_bodies_over_64_kib_are_413(api: Api, stocked: dict[str, str]) -> None:
    path = "/v1/accounts/{account}/grants".format(**stocked)
    headers = {"Idempotency-Key": secrets.token_hex(8), "Content-Type": "application/json"}

    def body(size: int) -> bytes:
        # Valid JSON of exactly `size` bytes: the refusal is about size, not shape.
        start = b'{"amount": 1, "reason": "r", "metadata": {"pad": "'
        return start + b"x" * (size - len(start) - 3) + b'"}}'

    at_limit = api.http.post(path, content=body(64 * 1024), headers=headers)
    assert len(body(64 * 1024)) == 65536
    problem(at_limit, 422, "invalid_input")  # within the limit: metadata is what is too big
    problem(
        api.http.post(path, content=body(64 * 1024 + 1), headers=headers), 413, "payload_too_large"
    )

    def chunks() -> Iterator[bytes]:
        # No Content-Length: the server must count what arrives.
        data = body(200 * 1024)
        for offset in range(0, len(data), 8192):
            yield data[offset : offset + 8192]

    chunked = api.http.post(path, content=chunks(), headers=headers)
    assert chunked.request.headers["transfer-encoding"] == "chunked"
    problem(chunked, 413, "payload_too_large")
    # The limit comes before authentication: nobody gets to send a large body.
    problem(
        httpx.post(f"{api.http.base_url}{path}", content=body(100_000)), 413, "payload_too_large"
    )
    _unchanged(api, stocked)


def test_path_ids_of_the_wrong_shape(api: Api, stocked: dict[str, str]) -> None:
    for action in ("capture", "release"):
        for hold_id in ("nope", "hold_00000000000000000000000000", stocked["lot"]):
            refused = problem(api.post(f"/v1/holds/{hold_id}/{action}"), 404, "hold_not_found")
            assert refused["hold_id"] == hold_id
        problem(api.post(f"/v1/holds/{'h' * 65}/{action}"), 422, "invalid_input")
    for lot_id in ("nope", stocked["hold"]):
        problem(api.post(f"/v1/lots/{lot_id}/void", {"reason": "r"}), 404, "lot_not_found")
    for account in ("a b", "a" * 129, "caf\u00e9", "a*b", "a%25b"):
        refused = problem(api.get(f"/v1/accounts/{account}/balance"), 422, "invalid_input")
        assert refused["errors"][0]["loc"] == ["path", "account_id"]
        problem(
            api.post(f"/v1/accounts/{account}/grants", {"amount": 1, "reason": "r"}),
            422,
            "invalid_input",
        )
    problem(api.get(f"/v1/accounts/{'a' * 128}/balance"), 404, "account_not_found")
    _unchanged(api, stocked)


def test_unknown_routes_and_methods(api: Api) -> None:
    for path in ("/v1/nope", "/nope", "/v1/accounts", "/v1/accounts/x/y/z", "/v2/tools"):
        problem(api.get(path), 404, "not_found")
    wrong = problem(api.http.delete("/v1/tools"), 405, "method_not_allowed")
    assert "DELETE" in wrong["detail"]
    for method, path in [
        ("POST", "/v1/tools"),
        ("GET", "/v1/accounts/x/grants"),
        ("PATCH", "/v1/accounts/x"),
        ("GET", "/v1/holds/hold_x/capture"),
    ]:
        refused = api.http.request(method, path)
        problem(refused, 405, "method_not_allowed")
        assert refused.headers["allow"], "RFC 9110: a 405 says which methods are allowed"
    assert api.http.delete("/v1/tools").headers["allow"] == "GET"


# --- the edge -------------------------------------------------------------------------------


def test_every_response_carries_a_request_id(server: Server, api: Api) -> None:
    answers = [
        api.get("/v1/tools"),
        api.get("/v1/nope"),
        httpx.get(f"{server.base_url}/v1/tools"),
        httpx.get(f"{server.base_url}/healthz"),
        httpx.get(f"{server.base_url}/metrics"),
        api.http.post("/v1/accounts/x/grants", content=b"x" * 70_000),
    ]
    ids = [answer.headers["x-request-id"] for answer in answers]
    assert all(re.fullmatch(r"[0-9a-f]{32}", found) for found in ids), ids
    assert len(set(ids)) == len(ids)

    for given in ("req-1", "A.b_c:d-9", "x" * 128):
        echoed = api.http.get("/v1/tools", headers={"X-Request-Id": given})
        assert echoed.headers["x-request-id"] == given
    refused = api.http.get("/v1/nope", headers={"X-Request-Id": "trace-404"})
    assert problem(refused, 404, "not_found")["request_id"] == "trace-404"
    # Anything that could forge a log line or grow without bound is replaced, not echoed.
    for insane in ("has space", "x" * 129, "a/b", "<script>", ""):
        replaced = api.http.get("/v1/tools", headers={"X-Request-Id": insane})
        assert re.fullmatch(r"[0-9a-f]{32}", replaced.headers["x-request-id"]), insane


def test_the_log_is_one_json_request_event_per_request_without_secrets_or_paths(
    server: Server, api: Api, admin_key: str
) -> None:
    marker = secrets.token_hex(6)
    account = f"who-{marker}"
    hold = f"hold_{marker}"
    sent = {
        f"log-{marker}-1": (
            "GET",
            f"/v1/accounts/{account}/balance",
            404,
            "/v1/accounts/{account_id}/balance",
        ),
        f"log-{marker}-2": (
            "POST",
            f"/v1/accounts/{account}/grants",
            201,
            "/v1/accounts/{account_id}/grants",
        ),
        f"log-{marker}-3": (
            "POST",
            f"/v1/holds/{hold}/capture",
            404,
            "/v1/holds/{hold_id}/capture",
        ),
        f"log-{marker}-4": ("GET", f"/v1/{marker}", 404, "unmatched"),
        f"log-{marker}-5": ("GET", "/openapi.json", 200, "/openapi.json"),
        f"log-{marker}-6": ("GET", "/v1/tools", 401, "/v1/tools"),
    }
    for request_id, (method, path, status, _) in sent.items():
        headers = {"X-Request-Id": request_id, "Idempotency-Key": secrets.token_hex(8)}
        if status == 401:
            headers["Authorization"] = (
                f"Bearer {admin_key[:-1]}{'0' if admin_key[-1] != '0' else '1'}"
            )
        body = {"amount": 1, "reason": "r"} if path.endswith("/grants") else None
        answer = api.http.request(method, path, json=body, headers=headers)
        assert answer.status_code == status, answer.text

    deadline = time.monotonic() + 5
    while True:  # the line is written just after the answer is sent
        events = [json.loads(line) for line in server.log_text().splitlines() if line.strip()]
        mine = [e for e in events if str(e.get("request_id", "")).startswith(f"log-{marker}")]
        if len(mine) >= len(sent) or time.monotonic() > deadline:
            break
        time.sleep(0.05)

    assert all(isinstance(event, dict) for event in events)
    assert all({"event", "level", "timestamp"} <= event.keys() for event in events)
    assert sorted(e["request_id"] for e in mine) == sorted(sent)
    for event in mine:
        method, _, status, route = sent[event["request_id"]]
        assert event["event"] == "request"
        assert (event["method"], event["route"], event["status"]) == (method, route, status)
        assert isinstance(event["duration_ms"], float | int)
    platform = {e["request_id"]: e["platform_id"] for e in mine}
    assert platform[f"log-{marker}-2"] == server.platform_ids["e2e-admin"]
    assert platform[f"log-{marker}-6"] is None

    text = server.log_text()
    assert marker not in text.replace(f"log-{marker}-", ""), "a raw path or id reached the log"
    assert admin_key.rsplit("_", 1)[1] not in text, "a key's secret reached the log"
    assert not re.search(r"/v1/(accounts|holds|lots)/(?!\{)", text), "raw paths reached the log"
    assert not re.search(r"tly_[0-9a-z]{10}_[0-9a-z]{32}", text)
