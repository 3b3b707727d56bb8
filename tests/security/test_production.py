"""Production never gives credits away: it refuses to start without a real processor and that
processor's secrets, and the sandbox (its checkout, its webhook token, its refunds) and the dev
mailbox do not exist there. Orders are labelled by the processor their sale came through,
whatever TALLY_PAYMENTS says, and refunds go to that processor."""

from __future__ import annotations

import os
import secrets
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import sqlalchemy as sa

from tally.adapters.catalog_file import builtin
from tally.adapters.db.engine import Database
from tally.adapters.db.schema import orders
from tally.adapters.refunds import ProcessorRefunds
from tally.adapters.sales import GumroadSales, sources
from tally.bootstrap import SANDBOX_SELLER_ID, bootstrap
from tally.config import Settings
from tally.domain.errors import ConfigurationInvalid
from tally.service.ports import RefundFailed, RefundRequest
from tests.e2e.fake_api import FakeApi, JsonHandler
from tests.e2e.server import TALLY
from tests.security.conftest import MakeShop, Shop

TOKEN = "gumroad-path-token"
SELLER = "seller-production"
ACCESS_TOKEN = "gumroad-access-token"

GUMROAD: dict[str, Any] = {
    "payments": "gumroad",
    "gumroad_webhook_token": TOKEN,
    "gumroad_seller_id": SELLER,
}
STRIPE: dict[str, Any] = {
    "payments": "stripe",
    "stripe_webhook_secret": "whsec_x",
    "stripe_api_key": "sk_x",
}
SAFE: dict[str, Any] = {
    "env": "production",
    "secret_key": "production secret",
    "smtp_url": "smtp://mail.example:587",
}


# --- start-up ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("settings", "missing"),
    [
        ({"env": "production"}, ["TALLY_SECRET_KEY", "TALLY_PAYMENTS", "TALLY_SMTP_URL"]),
        ({**SAFE, **GUMROAD, "smtp_url": None}, ["TALLY_SMTP_URL"]),
        ({**SAFE}, ["TALLY_PAYMENTS"]),
        ({**SAFE, "payments": "sandbox"}, ["TALLY_PAYMENTS"]),
        ({**GUMROAD, "env": "production"}, ["TALLY_SECRET_KEY", "TALLY_SMTP_URL"]),
        ({**SAFE, **GUMROAD, "gumroad_webhook_token": ""}, ["TALLY_GUMROAD_WEBHOOK_TOKEN"]),
        ({**SAFE, **GUMROAD, "gumroad_seller_id": ""}, ["TALLY_GUMROAD_SELLER_ID"]),
        (
            {**SAFE, "payments": "gumroad"},
            ["TALLY_GUMROAD_WEBHOOK_TOKEN", "TALLY_GUMROAD_SELLER_ID"],
        ),
        ({**SAFE, **STRIPE, "stripe_webhook_secret": ""}, ["TALLY_STRIPE_WEBHOOK_SECRET"]),
        ({**SAFE, **STRIPE, "stripe_api_key": None}, ["TALLY_STRIPE_API_KEY"]),
        # Gumroad's secrets do not make a Stripe shop safe, nor the other way round.
        ({**SAFE, **STRIPE, **GUMROAD, "payments": "stripe", "stripe_api_key": None}, None),
    ],
)
def test_production_settings_without_each_piece_are_refused(
    settings: dict[str, Any], missing: list[str] | None
) -> None:
    with pytest.raises(ConfigurationInvalid) as refused:
        Settings(**settings).check()
    assert refused.value.code == "configuration_invalid"
    expected = missing or ["TALLY_STRIPE_API_KEY"]
    assert refused.value.extra["missing"] == expected
    for name in expected:
        assert name in refused.value.detail


def test_the_refusal_says_exactly_what_is_missing() -> None:
    with pytest.raises(ConfigurationInvalid) as refused:
        Settings(env="production").check()
    assert refused.value.detail == (
        "TALLY_ENV=production needs TALLY_SECRET_KEY; "
        "TALLY_PAYMENTS set to gumroad or stripe (the sandbox is for development); "
        "TALLY_SMTP_URL (codes reach buyers by email)"
    )
    with pytest.raises(ConfigurationInvalid) as refused:
        Settings(**SAFE, payments="stripe", stripe_api_key="sk_x").check()
    assert refused.value.detail == (
        "TALLY_ENV=production needs TALLY_STRIPE_WEBHOOK_SECRET for TALLY_PAYMENTS=stripe"
    )


@pytest.mark.parametrize("env", ["staging", "Production", ""])
def test_an_unknown_environment_is_refused(env: str) -> None:
    with pytest.raises(ConfigurationInvalid, match="TALLY_ENV is development or production"):
        Settings(env=env).check()


def test_complete_settings_start() -> None:
    Settings(**SAFE, **GUMROAD).check()
    Settings(**SAFE, **STRIPE).check()
    Settings().check()  # development, the sandbox: the one-command demo


def test_bootstrap_refuses_before_touching_the_database(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/never.db"
    with pytest.raises(ConfigurationInvalid, match="TALLY_PAYMENTS"):
        bootstrap(Settings(database_url=url, env="production", secret_key="s"))
    assert not (tmp_path / "never.db").exists()


@pytest.mark.parametrize("command", [["serve", "--port", "1"], ["worker"], ["check"]])
def test_tally_refuses_to_start_production_on_the_sandbox(
    command: list[str], tmp_path: Path
) -> None:
    """The README's old deployment block: production, a secret key, no payments."""
    env = {name: value for name, value in os.environ.items() if not name.startswith("TALLY_")}
    env |= {
        "TALLY_ENV": "production",
        "TALLY_SECRET_KEY": "a production secret",
        "TALLY_DATABASE_URL": f"sqlite:///{tmp_path}/tally.db",
    }
    done = subprocess.run(
        [TALLY, *command],
        check=False,
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=30,
    )
    assert done.returncode != 0
    assert "Traceback" not in done.stderr
    assert done.stdout == ""
    assert done.stderr.count("\n") == 1  # one message
    assert '"code": "configuration_invalid"' in done.stderr
    assert "TALLY_ENV=production needs TALLY_PAYMENTS set to gumroad or stripe" in done.stderr


# --- a production shop has no sandbox -----------------------------------------------------------


def _count_orders(db: Database) -> int:
    with db.engine.connect() as connection:
        return int(connection.execute(sa.select(sa.func.count()).select_from(orders)).scalar_one())


def _sandbox_ping(sale_id: str) -> dict[str, str]:
    return {
        "seller_id": SANDBOX_SELLER_ID,
        "sale_id": sale_id,
        "product_permalink": "http://tally.test/l/power",
        "email": f"{sale_id}@example.com",
        "price": "0",
        "currency": "usd",
        "quantity": "1",
        "resource_name": "sale",
        "test": "true",
    }


@pytest.mark.parametrize("payments", [{"payments": "sandbox"}, GUMROAD])
def test_a_production_shop_has_no_sandbox_and_no_dev_mailbox(
    make_shop: MakeShop, db: Database, payments: dict[str, Any]
) -> None:
    """Even with settings check() would refuse (a Tally built without bootstrap)."""
    development = make_shop()
    token = development.tally.sandbox_token
    assert token  # what the sandbox's own pings carry in development
    production = make_shop(env="production", **payments)
    http = production.client

    assert http.post("/checkout/power/pay", data={"email": "thief@example.com"}).status_code == 404
    checkout = http.get("/checkout/power", follow_redirects=False)
    assert checkout.status_code in (303, 404)  # to Gumroad, or nowhere; never the sandbox page
    assert "Pay" not in checkout.text
    assert http.post(f"/webhooks/gumroad/{token}", data=_sandbox_ping("s1")).status_code == 404
    assert http.get("/dev/mailbox").status_code == 404
    assert http.get("/dev/anything").status_code == 404
    assert _count_orders(db) == 0
    assert production.tally.sandbox_token == ""

    with pytest.raises(RefundFailed, match="no refunds for processor 'sandbox'"):
        production.tally.refund_gateway.refund(
            RefundRequest("sandbox", "s1", None, 4000, "USD", "tally-refund-1")
        )


# --- orders are labelled by where their sale came through ------------------------------------


class Gumroad(FakeApi):
    """Gumroad's sales API: confirms any sale, refunds any sale; records what it was asked."""

    def __init__(self) -> None:
        self.asked: list[tuple[str, str]] = []
        outer = self

        class Handler(JsonHandler):
            def do_GET(self) -> None:
                path = urlsplit(self.path).path
                outer.asked.append(("GET", path))
                self._answer(200, {"success": True, "sale": {"id": path.rsplit("/", 1)[-1]}})

            def do_PUT(self) -> None:
                self.rfile.read(int(self.headers.get("Content-Length", "0")))
                path = urlsplit(self.path).path
                outer.asked.append(("PUT", path))
                sale = {"id": path.split("/")[3], "refunded": True}
                self._answer(200, {"success": True, "sale": sale})

        super().__init__(Handler)


@pytest.fixture
def gumroad() -> Iterator[Gumroad]:
    fake = Gumroad()
    try:
        yield fake
    finally:
        fake.close()


def _gumroad_ping(sale_id: str, **fields: str) -> dict[str, str]:
    return {
        "seller_id": SELLER,
        "sale_id": sale_id,
        "product_permalink": "https://seller.gumroad.com/l/pro",
        "email": f"{sale_id}@example.com",
        "price": "2000",
        "currency": "usd",
        "quantity": "1",
        "resource_name": "sale",
        **fields,
    }


def _order(shop: Shop, email: str) -> dict[str, Any]:
    found = shop.client.get("/v1/orders", params={"email": email})
    assert found.status_code == 200, found.text
    (order,) = found.json()["data"]
    return dict(order)


def _refund(shop: Shop, order_id: str) -> dict[str, Any]:
    answer = shop.client.post(
        f"/v1/orders/{order_id}/refund",
        json={"reason": "asked"},
        headers={"Idempotency-Key": f"refund-{secrets.token_hex(4)}"},
    )
    assert answer.status_code == 200, answer.text
    return dict(answer.json())


def _development(make_shop: MakeShop, gumroad: Gumroad, payments: str) -> Shop:
    return make_shop(
        payments=payments,
        gumroad_webhook_token=TOKEN,
        gumroad_seller_id=SELLER,
        gumroad_access_token=ACCESS_TOKEN,
        gumroad_api_base=gumroad.base_url,
    )


def test_a_gumroad_ping_in_a_sandbox_shop_is_a_gumroad_order_refunded_at_gumroad(
    make_shop: MakeShop, gumroad: Gumroad
) -> None:
    shop = _development(make_shop, gumroad, "sandbox")
    sold = shop.client.post(f"/webhooks/gumroad/{TOKEN}", data=_gumroad_ping("g1"))
    assert sold.status_code == 200, sold.text
    order = _order(shop, "g1@example.com")
    assert order["processor"] == "gumroad"

    refunded = _refund(shop, order["id"])
    assert refunded["status"] == "refunded"
    assert ("PUT", "/v2/sales/g1/refund") in gumroad.asked  # the money goes back for real


def test_the_sandboxs_own_pings_are_sandbox_orders_refunded_locally(
    make_shop: MakeShop, gumroad: Gumroad
) -> None:
    shop = _development(make_shop, gumroad, "sandbox")
    token = shop.tally.sandbox_token
    sold = shop.client.post(f"/webhooks/gumroad/{token}", data=_sandbox_ping("sandbox-1"))
    assert sold.status_code == 200, sold.text
    order = _order(shop, "sandbox-1@example.com")
    assert order["processor"] == "sandbox"
    assert _refund(shop, order["id"])["status"] == "refunded"
    assert not [asked for asked in gumroad.asked if "sandbox-1" in asked[1]]  # Gumroad never knew

    # The sandbox's token with Gumroad's seller id, or Gumroad's token with the sandbox's: 404.
    crossed = {**_sandbox_ping("sandbox-2"), "seller_id": SELLER}
    assert shop.client.post(f"/webhooks/gumroad/{token}", data=crossed).status_code == 404
    crossed = _gumroad_ping("g-crossed", seller_id=SANDBOX_SELLER_ID)
    assert shop.client.post(f"/webhooks/gumroad/{TOKEN}", data=crossed).status_code == 404


def test_switching_payments_never_relabels_what_arrives_later(
    make_shop: MakeShop, gumroad: Gumroad
) -> None:
    """Sold through Gumroad while checkout was Gumroad; checkout switched to the sandbox; then
    Gumroad reports the refund. The refund reaches the Gumroad order."""
    selling = _development(make_shop, gumroad, "gumroad")
    assert selling.tally.sandbox_token == ""  # no sandbox while checkout is Gumroad
    assert selling.client.post(f"/webhooks/gumroad/{TOKEN}", data=_gumroad_ping("g2")).is_success
    assert _order(selling, "g2@example.com")["processor"] == "gumroad"

    switched = _development(make_shop, gumroad, "sandbox")
    reported = switched.client.post(
        f"/webhooks/gumroad/{TOKEN}", data=_gumroad_ping("g2", resource_name="refund")
    )
    assert reported.status_code == 200, reported.text
    order = _order(switched, "g2@example.com")
    assert (order["processor"], order["status"]) == ("gumroad", "refunded")

    # A later Gumroad sale is Gumroad's too, and a sandbox sale stays the sandbox's after
    # checkout moves back to Gumroad.
    assert switched.client.post(f"/webhooks/gumroad/{TOKEN}", data=_gumroad_ping("g3")).is_success
    ping = _sandbox_ping("sandbox-3")
    sandbox = switched.client.post(f"/webhooks/gumroad/{switched.tally.sandbox_token}", data=ping)
    assert sandbox.is_success
    back = _development(make_shop, gumroad, "gumroad")
    assert _order(back, "g3@example.com")["processor"] == "gumroad"
    assert _order(back, "sandbox-3@example.com")["processor"] == "sandbox"


def test_reconciliation_asks_gumroad_whatever_checkout_uses() -> None:
    """A sandbox-checkout shop that receives Gumroad pings also recovers Gumroad's missed
    sales (labelled gumroad); a shop with no processor credentials asks nobody."""
    catalog = builtin()
    settings = Settings(payments="sandbox", gumroad_access_token=ACCESS_TOKEN)
    assert [type(source) for source in sources(settings, catalog)] == [GumroadSales]
    assert sources(Settings(), catalog) == []


def test_development_keeps_refunding_the_sandboxs_orders_after_a_switch() -> None:
    gateway = ProcessorRefunds(Settings(payments="gumroad"))
    request = RefundRequest("sandbox", "sandbox-9", None, 0, "USD", "tally-refund-9")
    assert gateway.refund(request) == "sandbox:sandbox-9"


@pytest.mark.parametrize("value", ["ten", "-1", "0", "1e3", "\u0661\u0660", " "])
def test_a_limit_that_is_not_a_whole_number_stops_start_up(
    value: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TALLY_REDEEM_FAILURES_PER_HOUR", value)
    with pytest.raises(ConfigurationInvalid, match="TALLY_REDEEM_FAILURES_PER_HOUR") as refused:
        Settings.from_env()
    assert refused.value.extra["setting"] == "TALLY_REDEEM_FAILURES_PER_HOUR"


def test_reconciliation_may_be_turned_off_with_zero(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TALLY_RECONCILE_INTERVAL_SECONDS", "0")
    assert Settings.from_env().reconcile_interval_seconds == 0
