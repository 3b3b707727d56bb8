"""Hostile email addresses at every door: a processor's ping or event, the sandbox's pay
form, the lost-code form, the API and the command line. Nothing that is not one bare address
becomes an order, a code or a message; a paid sale carrying one is kept for support and
answered 200, once however often it is repeated."""

from __future__ import annotations

import json
from typing import Any

import pytest
import sqlalchemy as sa
from markupsafe import escape
from typer.testing import CliRunner

from tally.adapters.db.engine import Database
from tally.adapters.db.schema import codes, orders, outbox, staff, unmatched_pings
from tally.domain import values
from tally.entrypoints import cli
from tally.service import staff as staff_service
from tally.service.ports import StaffRecord
from tests.security.conftest import MakeShop, Shop

TOKEN = "gumroad-path-token"
SELLER = "seller-9"
STRIPE_SECRET = "whsec_abuse_suite"

#: Each is refused as a whole: never trimmed, split or guessed into an address.
NASTY = {
    "header injection": "a@x.com\r\nBcc: evil@x.com",
    "bare line feed": "a@x.com\nBcc: evil@x.com",
    "display name": '"Evil" <a@x.com>',
    "comma list": "a@x.com, b@y.com",
    "comma list, no space": "a@x.com,b@y.com",
    "NUL": "a\x00@x.com",
    "300 characters": "a" * 288 + "@example.com",
    "unicode local part": "é@x.com",
    "empty": "",
}
CASES = pytest.mark.parametrize("address", list(NASTY.values()), ids=list(NASTY))


def _count(db: Database, table: sa.Table) -> int:
    with db.engine.connect() as connection:
        return int(connection.execute(sa.select(sa.func.count()).select_from(table)).scalar_one())


def _nothing_made(db: Database) -> None:
    assert [_count(db, table) for table in (orders, codes, outbox)] == [0, 0, 0]


def _unmatched(db: Database) -> list[dict[str, Any]]:
    with db.engine.connect() as connection:
        rows = connection.execute(sa.select(unmatched_pings).order_by(unmatched_pings.c.ping_id))
        return [dict(row._mapping) for row in rows]


def _ping(sale_id: str, **fields: str) -> dict[str, str]:
    return {
        "seller_id": SELLER,
        "sale_id": sale_id,
        "sale_timestamp": "2026-01-01T10:00:00Z",
        "order_number": "524459995",
        "product_permalink": "https://seller.gumroad.com/l/power",
        "product_id": "prod-power",
        "email": "buyer@example.com",
        "price": "4000",
        "currency": "usd",
        "quantity": "1",
        "resource_name": "sale",
        **fields,
    }


@pytest.fixture
def gumroad(make_shop: MakeShop) -> Shop:
    return make_shop(payments="gumroad", gumroad_webhook_token=TOKEN, gumroad_seller_id=SELLER)


@CASES
def test_a_gumroad_ping_with_an_unusable_address_is_kept_for_support_not_fulfilled(
    gumroad: Shop, db: Database, address: str
) -> None:
    url = f"/webhooks/gumroad/{TOKEN}"
    answers = [gumroad.client.post(url, data=_ping("g-1", email=address)) for _ in range(3)]
    answers.append(gumroad.client.post(url, json=_ping("g-1", email=address)))  # and as JSON
    for answer in answers:
        assert answer.status_code == 200, answer.text  # Gumroad stops resending
        body = answer.json()
        assert (body["ok"], body["ignored"]) == (True, "invalid_email")
        assert body["reason"].startswith("email is not one email address: ")
        assert "order_id" not in body
    _nothing_made(db)
    [kept] = _unmatched(db)  # one row for four deliveries
    assert (kept["processor"], kept["sale_id"]) == ("gumroad", "g-1")
    assert kept["reason"].startswith("invalid_email: email is not one email address: ")
    assert kept["payload"]["email"] == address.replace("\x00", "\ufffd")


def test_a_gift_from_an_unusable_giver_is_not_fulfilled_either(gumroad: Shop, db: Database) -> None:
    gift = _ping(
        "g-2",
        email="friend@example.com",
        price="0",
        is_gift_receiver_purchase="true",
        gifter_email="a@x.com\r\nBcc: evil@x.com",
    )
    answer = gumroad.client.post(f"/webhooks/gumroad/{TOKEN}", data=gift)
    assert answer.status_code == 200
    assert answer.json()["ignored"] == "invalid_email"
    _nothing_made(db)
    [kept] = _unmatched(db)
    assert kept["reason"].startswith("invalid_email: gifter_email is not one email address: ")


@pytest.mark.parametrize(
    ("fields", "reason"),
    [
        ({"price": str(2**53 + 1)}, "price is a whole number of minor units from 0 to 2^53"),
        ({"order_number": "9" * 129}, "an order number is 1-128 printable characters"),
        ({"currency": "u$"}, "currency is three capital letters (ISO 4217)"),
        # Digits Python's int() misreads or refuses, and numbers past 2^53's 16 digits.
        ({"quantity": "\u00b2"}, "the ping's quantity is not a whole number"),
        ({"price": "\u0661\u0660"}, "the ping's price is not a whole number"),
        ({"quantity": "1.5"}, "the ping's quantity is not a whole number"),
        ({"price": "9" * 17}, "the ping's price is not a whole number"),
    ],
)
def test_a_sale_out_of_bounds_is_kept_for_support_not_fulfilled(
    gumroad: Shop, db: Database, fields: dict[str, str], reason: str
) -> None:
    answer = gumroad.client.post(f"/webhooks/gumroad/{TOKEN}", data=_ping("g-3", **fields))
    assert answer.status_code == 200
    assert answer.json() == {"ok": True, "ignored": "invalid_input", "reason": reason}
    _nothing_made(db)
    assert [row["reason"] for row in _unmatched(db)] == [f"invalid_input: {reason}"]


def test_a_usable_address_is_normalised_and_fulfilled(gumroad: Shop, db: Database) -> None:
    answer = gumroad.client.post(
        f"/webhooks/gumroad/{TOKEN}", data=_ping("g-4", email="  Ana@EXAMPLE.com ")
    )
    assert answer.status_code == 200
    assert answer.json()["created"] is True
    with db.engine.connect() as connection:
        kept = connection.execute(sa.select(orders.c.email)).scalar_one()
        to = connection.execute(sa.select(outbox.c.to_email)).scalar_one()
    assert (kept, to) == ("Ana@example.com", "Ana@example.com")
    assert _unmatched(db) == []


# --- Stripe ---------------------------------------------------------------------------------


def _stripe(shop: Shop, session: str, email: str) -> Any:
    event = {
        "id": f"evt_{session}",
        "object": "event",
        "type": "checkout.session.completed",
        "data": {
            "object": {
                "id": session,
                "object": "checkout.session",
                "payment_status": "paid",
                "amount_total": 4000,
                "currency": "usd",
                "livemode": False,
                "customer_details": {"email": email},
                "metadata": {"package": "power"},
            }
        },
    }
    return shop.stripe_event(event, STRIPE_SECRET)


@CASES
def test_a_stripe_event_with_an_unusable_address_is_kept_for_support_not_fulfilled(
    make_shop: MakeShop, db: Database, address: str
) -> None:
    shop = make_shop(payments="stripe", stripe_webhook_secret=STRIPE_SECRET)
    for _ in range(2):  # Stripe resends anything but a 2xx
        answer = _stripe(shop, "cs_test_1", address)
        assert answer.status_code == 200, answer.text
        assert answer.json()["ignored"] == "invalid_email"
    _nothing_made(db)
    [kept] = _unmatched(db)
    assert (kept["processor"], kept["sale_id"]) == ("stripe", "cs_test_1")
    assert kept["reason"].startswith("invalid_email: ")
    assert kept["payload"]["customer_details"]["email"] == address.replace("\x00", "\ufffd")


# --- the two public forms -------------------------------------------------------------------


@CASES
def test_the_sandbox_pay_form_says_what_to_fix_and_sells_nothing(
    shop: Shop, db: Database, address: str
) -> None:
    answer = shop.client.post("/checkout/power/pay", data={"email": address})
    assert answer.status_code == 422
    assert answer.headers["content-type"].startswith("text/html")
    page = answer.text
    assert '<p class="error" id="email-error">Enter one email address' in page
    assert f'value="{escape(address)}"' in page  # what was typed, to correct
    assert 'aria-invalid="true"' in page
    if address:  # a blank recipient is no gift
        gift = shop.client.post(
            "/checkout/power/pay", data={"email": "me@example.com", "gift_email": address}
        )
        assert gift.status_code == 422
        assert 'id="gift_email-error"' in gift.text
        assert 'id="email-error"' not in gift.text
    _nothing_made(db)
    assert _unmatched(db) == []


@CASES
def test_the_lost_code_form_says_what_to_fix_and_sends_nothing(
    shop: Shop, db: Database, address: str
) -> None:
    answer = shop.client.post("/lost-code", data={"email": address, "order_number": "524459995"})
    assert answer.status_code == 422
    page = answer.text
    assert '<p class="error" id="email-error">Enter one email address' in page
    assert f'value="{escape(address)}"' in page
    assert 'value="524459995"' in page
    _nothing_made(db)


# --- the API and the command line -----------------------------------------------------------


@CASES
def test_the_api_refuses_them_with_invalid_email(shop: Shop, db: Database, address: str) -> None:
    put = shop.client.put("/v1/accounts/ana", json={"email": address})
    assert put.status_code == 422
    problem = put.json()
    assert (problem["code"], problem["field"]) == ("invalid_email", "email")
    assert problem["reason"]
    assert shop.client.get("/v1/accounts/ana/balance").status_code == 404  # not created

    found = shop.client.get("/v1/orders", params={"email": address})
    assert found.status_code == 422
    # An empty filter is no filter: the list then names none.
    assert found.json()["code"] == ("invalid_input" if address == "" else "invalid_email")


def test_the_stripe_checkout_hands_stripe_no_unusable_address(make_shop: MakeShop) -> None:
    shop = make_shop(payments="stripe", stripe_api_key="sk_test_unused")
    for query in ({"email": "a@x.com, b@y.com"}, {"gift_email": "a@x.com\r\nBcc: evil@x.com"}):
        answer = shop.client.get("/checkout/power", params=query)
        assert answer.status_code == 422
        assert answer.json()["code"] == "invalid_email"
        assert answer.json()["field"] == next(iter(query))


@CASES
def test_the_cli_refuses_them_before_asking_for_a_password(
    db: Database, monkeypatch: pytest.MonkeyPatch, address: str
) -> None:
    monkeypatch.setenv("TALLY_DATABASE_URL", db.engine.url.render_as_string(hide_password=False))
    monkeypatch.setenv("TALLY_SECRET_KEY", "cli secret")
    runner = CliRunner()
    codes = []
    for args in (["staff", "create", address, "--password-stdin"], ["staff", "disable", address]):
        done = runner.invoke(cli.app, args, input="a good long password\n")
        assert done.exit_code == 1, done.output
        codes.append(json.loads(done.stderr.strip().splitlines()[-1])["code"])
    # Disabling looks members up leniently (older rows may hold addresses refused today), so
    # an address that is plain text without line breaks is simply nobody's.
    assert codes[0] == "invalid_email"
    assert codes[1] in {"invalid_email", "staff_not_found"}
    assert _count(db, staff) == 0


@pytest.mark.parametrize(
    ("public_url", "domain"),
    [
        ("https://credits.example.com", "credits.example.com"),
        ("https://Credits.Example.com:8443/tally", "credits.example.com"),
        ("http://127.0.0.1:8000", "127.0.0.1"),
        ("http://[::1]:8000", "localhost"),  # no Message-ID domain in an IPv6 literal
    ],
)
def test_every_public_url_gives_messages_a_usable_domain(
    make_shop: MakeShop, public_url: str, domain: str
) -> None:
    assert make_shop(public_url=public_url).tally.links.mail_domain == domain


@pytest.mark.parametrize("stored", ["ops@corp.local", "admin@localhost", "ops@bücher.de"])
def test_staff_stored_before_addresses_were_checked_still_sign_in_and_can_be_disabled(
    shop: Shop, stored: str
) -> None:
    """Older members may hold addresses `values.email` refuses or spells otherwise: they keep
    signing in, and above all an operator can still disable them."""
    uow = shop.tally.uow()
    with uow:
        now = uow.clock()
        record = StaffRecord(
            values.new_id(staff_service.STAFF_PREFIX, now),
            stored,
            staff_service.hash_password("a good long password"),
            now,
            None,
        )
        assert uow.staff.add(record)
        uow.commit()
    signed_in = staff_service.sign_in(
        stored.upper(), "a good long password", shop.tally.uow(), client_address=None
    )
    assert signed_in.staff_id == record.staff_id
    disabled = staff_service.disable_staff(f" {stored} ", shop.tally.uow())
    assert disabled.staff_id == record.staff_id
    assert staff_service.authenticate(signed_in.token, shop.tally.uow()) is None
