"""Buying, mailing and redeeming through a real server: the sandbox checkout, Gumroad pings
(form and JSON, repeated, forged), Stripe events (signed, wrong, stale), a real SMTP server,
and the redemption API with its lockout."""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tally.domain import codes
from tests.conftest import DATABASES
from tests.e2e.server import CODE, Server, running
from tests.mailserver import Inbox
from tests.support import free_port, recent_sale_time, stamp

TOKEN = "gumroad-path-token"
SELLER = "seller-42"
STRIPE_SECRET = "whsec_test_secret"


@pytest.fixture(scope="module", params=DATABASES)
def shop(
    request: pytest.FixtureRequest,
    tmp_path_factory: pytest.TempPathFactory,
    inbox: tuple[Inbox, int],
) -> Iterator[Server]:
    """A server that sells through Gumroad and Stripe and mails through the SMTP server."""
    env = {
        "TALLY_WORKER": "inline",
        "TALLY_SECRET_KEY": "e2e-secret",
        "TALLY_PAYMENTS": "gumroad",
        "TALLY_GUMROAD_WEBHOOK_TOKEN": TOKEN,
        "TALLY_GUMROAD_SELLER_ID": SELLER,
        "TALLY_STRIPE_WEBHOOK_SECRET": STRIPE_SECRET,
        "TALLY_SMTP_URL": f"smtp://127.0.0.1:{inbox[1]}",
    }
    with running(request.param, tmp_path_factory.mktemp("shop"), env=env) as server:
        yield server


SOLD_AT = recent_sale_time()


def _ping(sale_id: str, **fields: str) -> dict[str, str]:
    return {
        "seller_id": SELLER,
        "sale_id": sale_id,
        "sale_timestamp": stamp(SOLD_AT),
        "order_number": "524459995",
        "product_id": "prod-pro",
        "product_permalink": "https://seller.gumroad.com/l/pro",
        "product_name": "Pro",
        "email": f"{sale_id}@example.com",
        "price": "2000",
        "currency": "usd",
        "quantity": "1",
        "resource_name": "sale",
        "test": "false",
        "refunded": "false",
        **fields,
    }


def _code_for(inbox: Inbox, email: str) -> str:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        for message in inbox.messages:
            if message["To"] == email:
                body = message.get_body(("plain",))
                assert body is not None
                found = CODE.search(body.get_content())
                assert found, body.get_content()
                return found.group(0)
        time.sleep(0.1)
    raise AssertionError(f"no email to {email}")


def test_a_gumroad_sale_is_mailed_once_and_its_code_redeems(
    shop: Server, inbox: tuple[Inbox, int]
) -> None:
    box, _ = inbox
    sale = f"g{secrets.token_hex(4)}"
    url = f"{shop.base_url}/webhooks/gumroad/{TOKEN}"
    answers = [httpx.post(url, data=_ping(sale)) for _ in range(3)]  # Gumroad retries
    answers.append(httpx.post(url, json=_ping(sale)))  # and a JSON copy
    assert [a.status_code for a in answers] == [200] * 4
    assert len({a.json()["order_id"] for a in answers}) == 1
    code = _code_for(box, f"{sale}@example.com")
    # One row, sent: the worker's later rounds cannot send it again.
    assert shop.wait_until_sent({f"{sale}@example.com"}) == {f"{sale}@example.com": ["sent"]}
    assert sum(1 for m in box.messages if m["To"] == f"{sale}@example.com") == 1

    key = shop.key(f"shop-{sale}")
    headers = {"Authorization": f"Bearer {key}", "Idempotency-Key": f"redeem-{sale}"}
    lot = httpx.post(
        f"{shop.base_url}/v1/redemptions",
        json={"code": code.lower().replace("-", " "), "account_id": sale},
        headers=headers,
    )
    assert lot.status_code == 201, lot.text
    assert (lot.json()["amount"], lot.json()["source"]) == (25, "purchase")
    two_years_on = SOLD_AT.replace(year=SOLD_AT.year + 2)  # from the purchase date
    assert lot.json()["expires_at"] == stamp(two_years_on)
    again = httpx.post(
        f"{shop.base_url}/v1/redemptions",
        json={"code": code, "account_id": "someone-else"},
        headers={**headers, "Idempotency-Key": f"steal-{sale}"},
    )
    assert again.status_code == 422
    assert again.json()["code"] == "code_invalid_or_used"
    info = httpx.get(f"{shop.base_url}/v1/codes/{code}", headers=headers).json()
    assert (info["status"], info["account_id"], info["order"]["sale_id"]) == (
        "redeemed",
        sale,
        sale,
    )


_TABLES = ("orders", "codes", "outbox", "processor_events", "unmatched_pings")


def _totals(shop: Server) -> dict[str, int]:
    """How many rows each commerce table holds (the worker only updates the outbox's)."""
    return {table: shop.count(f"SELECT count(*) FROM {table}") for table in _TABLES}


def _orders_of(shop: Server, sale_prefix: str) -> int:
    return shop.count(
        "SELECT count(*) FROM orders WHERE sale_id LIKE :sale", sale=f"{sale_prefix}%"
    )


def test_forged_pings_change_nothing(shop: Server) -> None:
    sale = f"f{secrets.token_hex(4)}"
    before = _totals(shop)
    url = f"{shop.base_url}/webhooks/gumroad/{TOKEN}"
    wrong_token = httpx.post(f"{shop.base_url}/webhooks/gumroad/guess", data=_ping(f"{sale}t"))
    wrong_seller = httpx.post(url, data=_ping(f"{sale}s", seller_id="other"))
    no_seller = httpx.post(
        url, data={k: v for k, v in _ping(f"{sale}n").items() if k != "seller_id"}
    )
    assert [r.status_code for r in (wrong_token, wrong_seller, no_seller)] == [404, 404, 404]
    # Nothing at all was written: no order, code, email, event or unmatched ping.
    assert _totals(shop) == before
    assert _orders_of(shop, sale) == 0
    assert shop.count("SELECT count(*) FROM outbox WHERE to_email LIKE :e", e=f"{sale}%") == 0

    unknown = httpx.post(
        url,
        data=_ping(f"{sale}u", product_permalink="https://x.gumroad.com/l/mystery", product_id="?"),
    )
    assert unknown.status_code == 200
    assert unknown.json()["ignored"] == "unknown product"
    # Kept for support, and nothing else.
    assert _totals(shop) == {**before, "unmatched_pings": before["unmatched_pings"] + 1}
    [kept] = shop.rows(
        "SELECT sale_id, processor FROM unmatched_pings WHERE sale_id LIKE :s", s=f"{sale}%"
    )
    assert tuple(kept) == (f"{sale}u", "gumroad")

    key = shop.key(f"support-{sale}", "support")
    missing = httpx.get(
        f"{shop.base_url}/v1/codes/{codes.display(codes.new_code())}",
        headers={"Authorization": f"Bearer {key}"},
    )
    assert missing.status_code == 404


def _stripe(
    payload: dict[str, Any], *, secret: str = STRIPE_SECRET, age: int = 0
) -> dict[str, Any]:
    """Headers and body signed the way Stripe documents: HMAC-SHA256 of `t.payload`."""
    body = json.dumps(payload)
    stamp = int(time.time()) - age
    mac = hmac.new(secret.encode(), f"{stamp}.{body}".encode(), hashlib.sha256).hexdigest()
    return {"content": body, "headers": {"Stripe-Signature": f"t={stamp},v1={mac}"}}


def _session_event(session_id: str, **metadata: str) -> dict[str, Any]:
    return {
        "id": f"evt_{session_id}",
        "object": "event",
        "type": "checkout.session.completed",
        "data": {
            "object": {
                "id": session_id,
                "object": "checkout.session",
                "payment_status": "paid",
                "amount_total": 900,
                "currency": "usd",
                "created": int(SOLD_AT.timestamp()),
                "livemode": False,
                "customer_details": {"email": f"{session_id}@example.com"},
                "metadata": {"package": "popular", **metadata},
            }
        },
    }


def test_stripe_events_are_verified_and_fulfil_once(shop: Server, inbox: tuple[Inbox, int]) -> None:
    box, _ = inbox
    session = f"cs_test_{secrets.token_hex(4)}"
    url = f"{shop.base_url}/webhooks/stripe"
    event = _session_event(session, gift_email=f"friend-{session}@example.com")
    forged = httpx.post(url, **_stripe(event, secret="whsec_wrong"))
    stale = httpx.post(url, **_stripe(event, age=301))
    unsigned = httpx.post(url, content=json.dumps(event))
    assert [r.status_code for r in (forged, stale, unsigned)] == [400, 400, 400]
    assert _orders_of(shop, session) == 0  # refused before anything was written
    assert shop.count("SELECT count(*) FROM outbox WHERE to_email LIKE :e", e=f"%{session}%") == 0
    first = httpx.post(url, **_stripe(event))
    second = httpx.post(url, **_stripe(event))
    assert (first.status_code, second.status_code) == (200, 200)
    assert first.json()["order_id"] == second.json()["order_id"]
    assert (first.json()["created"], second.json()["created"]) == (True, False)
    code = _code_for(box, f"friend-{session}@example.com")
    gift = next(m for m in box.messages if m["To"] == f"friend-{session}@example.com")
    body = gift.get_body(("plain",))
    assert body is not None
    assert f"{session}@example.com" in body.get_content()  # names the giver
    assert codes.normalise(code) is not None


def test_guessing_codes_locks_the_account_out(shop: Server) -> None:
    key = shop.key(f"guesser-{secrets.token_hex(3)}", "spend")
    account = f"eve-{secrets.token_hex(3)}"
    statuses = []
    for n in range(12):
        answer = httpx.post(
            f"{shop.base_url}/v1/redemptions",
            json={"code": codes.display(codes.new_code()), "account_id": account},
            headers={"Authorization": f"Bearer {key}", "Idempotency-Key": f"{account}-{n}"},
        )
        statuses.append(answer.status_code)
        if answer.status_code == 429:
            assert int(answer.headers["Retry-After"]) > 0
            assert answer.json()["code"] == "rate_limited"
    assert statuses[:10] == [422] * 10
    assert statuses[10:] == [429, 429]


@pytest.mark.slow
@pytest.mark.parametrize("kind", DATABASES)
def test_the_sandbox_flow_over_http(kind: str, tmp_path: Path) -> None:
    """Choose a package, pay in the sandbox, read the dev mailbox, redeem on the page."""
    port = free_port()
    env = {
        "TALLY_WORKER": "inline",
        "TALLY_SECRET_KEY": "sandbox-secret",
        "TALLY_PUBLIC_URL": f"http://127.0.0.1:{port}",
        "TALLY_MAILBOX_DIR": str(tmp_path / "mailbox"),
    }
    with running(kind, tmp_path, env=env, port=port) as server:
        page = httpx.get(f"{server.base_url}/checkout/starter")
        assert page.status_code == 200
        assert "Pay" in page.text
        paid = httpx.post(
            f"{server.base_url}/checkout/starter/pay", data={"email": "buyer@example.com"}
        )
        assert paid.status_code == 200, paid.text
        deadline = time.monotonic() + 20
        while "buyer@example.com" not in (mail := httpx.get(f"{server.base_url}/dev/mailbox").text):
            assert time.monotonic() < deadline, "the purchase email never reached the mailbox"
            time.sleep(0.2)
        found = CODE.search(mail)
        assert found
        redeemed = httpx.post(
            f"{server.base_url}/redeem",
            data={"code": found.group(0), "account": "buyer@example.com"},
        )
        assert redeemed.status_code == 200
        assert 'id="available">5<' in redeemed.text
