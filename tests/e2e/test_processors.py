"""Tally against local stand-ins for the processors' APIs, in their documented formats:
Gumroad's sales API confirming pings, Stripe's API creating Checkout Sessions and listing a
session's line items."""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest
import sqlalchemy as sa

from tests.e2e.fake_api import FakeApi, JsonHandler
from tests.e2e.server import Server, running

TOKEN = "path-token"
SELLER = "seller-7"
ACCESS_TOKEN = "gumroad-access-token"
STRIPE_SECRET = "whsec_processors"


class Processors(FakeApi):
    """One local HTTP server playing both processors' APIs; it records what it was asked."""

    def __init__(self) -> None:
        self.sales: dict[str, dict[str, str]] = {}
        self.down = False
        self.requests: list[tuple[str, str, dict[str, list[str]]]] = []
        self.line_items: dict[str, list[dict[str, Any]]] = {}
        outer = self

        class Handler(JsonHandler):
            def do_GET(self) -> None:
                url = urlsplit(self.path)
                outer.requests.append(("GET", url.path, parse_qs(url.query)))
                if outer.down:
                    self._answer(503, {"success": False})
                elif url.path.startswith("/v2/sales/"):
                    sale = outer.sales.get(url.path.rsplit("/", 1)[-1])
                    token = parse_qs(url.query).get("access_token", [""])[0]
                    if token != ACCESS_TOKEN:
                        self._answer(401, {"success": False, "message": "bad token"})
                    elif sale is None:
                        self._answer(404, {"success": False, "message": "not found"})
                    else:
                        self._answer(200, {"success": True, "sale": sale})
                elif url.path.endswith("/line_items"):
                    session = url.path.split("/")[-2]
                    data = outer.line_items.get(session, [])
                    self._answer(
                        200, {"object": "list", "data": data, "has_more": False, "url": url.path}
                    )
                else:
                    self._answer(404, {"error": {"message": "no such route"}})

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", "0"))
                form = parse_qs(self.rfile.read(length).decode())
                outer.requests.append(("POST", self.path, form))
                if self.path == "/v1/checkout/sessions":
                    session = f"cs_test_{secrets.token_hex(4)}"
                    self._answer(
                        200,
                        {
                            "id": session,
                            "object": "checkout.session",
                            "url": f"https://checkout.stripe.test/pay/{session}",
                        },
                    )
                else:
                    self._answer(404, {"error": {"message": "no such route"}})

        super().__init__(Handler)


@pytest.fixture(scope="module")
def processors() -> Iterator[Processors]:
    fake = Processors()
    try:
        yield fake
    finally:
        fake.close()


@pytest.fixture(scope="module")
def shop(processors: Processors, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    env = {
        "TALLY_SECRET_KEY": "processors-secret",
        "TALLY_PAYMENTS": "stripe",
        "TALLY_GUMROAD_WEBHOOK_TOKEN": TOKEN,
        "TALLY_GUMROAD_SELLER_ID": SELLER,
        "TALLY_GUMROAD_ACCESS_TOKEN": ACCESS_TOKEN,
        "TALLY_GUMROAD_API_BASE": processors.base_url,
        "TALLY_STRIPE_WEBHOOK_SECRET": STRIPE_SECRET,
        "TALLY_STRIPE_API_KEY": "sk_test_processors",
        "TALLY_STRIPE_API_BASE": processors.base_url,
    }
    directory: Path = tmp_path_factory.mktemp("processors")
    with running("sqlite", directory, env=env) as server:
        yield server


def _sale(sale_id: str, permalink: str = "pro", quantity: str = "1") -> dict[str, str]:
    return {
        "seller_id": SELLER,
        "sale_id": sale_id,
        "product_permalink": f"https://x.gumroad.com/l/{permalink}",
        "email": f"{sale_id}@example.com",
        "price": "2000",
        "currency": "usd",
        "quantity": quantity,
    }


def _order_credits(shop: Server, order_id: str) -> int:
    """The credits of an order, from the database it lives in (the API finds orders by code)."""
    engine = sa.create_engine(shop.url)
    with engine.connect() as connection:
        found = connection.execute(
            sa.text("SELECT credits FROM orders WHERE order_id = :id"), {"id": order_id}
        ).scalar_one()
    engine.dispose()
    return int(found)


def test_gumroad_pings_are_confirmed_with_the_sales_api(
    shop: Server, processors: Processors
) -> None:
    url = f"{shop.base_url}/webhooks/gumroad/{TOKEN}"
    known = f"sale-{secrets.token_hex(3)}"
    # The API's answer wins over the ping's: the ping says 1 unit, Gumroad says 2.
    processors.sales[known] = {**_sale(known, quantity="2"), "id": known}
    confirmed = httpx.post(url, data=_sale(known))
    assert confirmed.status_code == 200
    assert confirmed.json()["created"] is True
    assert _order_credits(shop, confirmed.json()["order_id"]) == 50
    asked = [r for r in processors.requests if r[1] == f"/v2/sales/{known}"]
    assert asked
    assert asked[0][2]["access_token"] == [ACCESS_TOKEN]

    stranger = httpx.post(url, data=_sale(f"forged-{secrets.token_hex(3)}"))
    assert stranger.status_code == 200
    assert stranger.json()["ignored"] == "unconfirmed"

    later = f"sale-{secrets.token_hex(3)}"
    processors.sales[later] = {**_sale(later), "id": later}
    processors.down = True
    try:
        unavailable = httpx.post(url, data=_sale(later))
    finally:
        processors.down = False
    assert unavailable.status_code == 503  # Gumroad retries 5xx
    assert unavailable.json()["code"] == "processor_unavailable"  # not the database's fault
    retried = httpx.post(url, data=_sale(later))
    assert retried.status_code == 200
    assert retried.json()["created"] is True


def test_stripe_checkout_creates_a_session_for_the_package(
    shop: Server, processors: Processors
) -> None:
    answer = httpx.get(
        f"{shop.base_url}/checkout/power",
        params={"email": "buyer@example.com", "gift_email": "friend@example.com"},
    )
    assert answer.status_code == 303
    assert answer.headers["location"].startswith("https://checkout.stripe.test/pay/cs_test_")
    method, path, form = processors.requests[-1]
    assert (method, path) == ("POST", "/v1/checkout/sessions")
    assert form["line_items[0][price]"] == ["price_power"]
    assert form["metadata[package]"] == ["power"]
    assert form["metadata[gift_email]"] == ["friend@example.com"]
    assert form["customer_email"] == ["buyer@example.com"]
    assert form["mode"] == ["payment"]


def test_a_stripe_session_without_metadata_is_priced_from_its_line_items(
    shop: Server, processors: Processors
) -> None:
    session = f"cs_test_{secrets.token_hex(4)}"
    processors.line_items[session] = [
        {
            "id": "li_1",
            "object": "item",
            "quantity": 2,
            "price": {"id": "price_power", "object": "price"},
        },
    ]
    event = {
        "id": f"evt_{session}",
        "object": "event",
        "type": "checkout.session.completed",
        "data": {
            "object": {
                "id": session,
                "object": "checkout.session",
                "payment_status": "paid",
                "amount_total": 6000,
                "currency": "usd",
                "livemode": False,
                "customer_details": {"email": "li@example.com"},
                "metadata": {},
            }
        },
    }
    body = json.dumps(event)
    stamp = int(time.time())
    mac = hmac.new(STRIPE_SECRET.encode(), f"{stamp}.{body}".encode(), hashlib.sha256).hexdigest()
    answer = httpx.post(
        f"{shop.base_url}/webhooks/stripe",
        content=body,
        headers={"Stripe-Signature": f"t={stamp},v1={mac}"},
    )
    assert answer.status_code == 200, answer.text
    assert _order_credits(shop, answer.json()["order_id"]) == 80  # 2 x Power
    assert any(r[1] == f"/v1/checkout/sessions/{session}/line_items" for r in processors.requests)
