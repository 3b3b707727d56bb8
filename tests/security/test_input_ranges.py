"""Bad input is a 4xx, never a 500: times out of Tally's range, durations that run past it,
and Stripe events that are correctly signed but not in Stripe's shape."""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest
from sqlalchemy import select

from tally.adapters.db.schema import unmatched_pings
from tally.domain.values import TIME_MAX, TIME_MIN
from tests.security.conftest import MakeShop, Shop

RANGE = "between 1970-01-01T00:00:00Z and 8999-12-31T23:59:59Z"
STRIPE_SECRET = "whsec_abuse_suite"


def _problem(response: httpx.Response, status: int, code: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/problem+json"
    body: dict[str, Any] = response.json()
    assert (body["status"], body["code"]) == (status, code), body
    return body


def _grant(shop: Shop, account: str, key: str, **fields: Any) -> httpx.Response:
    return shop.client.post(
        f"/v1/accounts/{account}/grants",
        json={"amount": 5, "reason": "range", **fields},
        headers={"Idempotency-Key": key},
    )


def test_the_range_is_the_documented_one() -> None:
    assert TIME_MIN.isoformat() == "1970-01-01T00:00:00+00:00"
    assert TIME_MAX.isoformat() == "8999-12-31T23:59:59.999999+00:00"


@pytest.mark.parametrize(
    "at",
    [
        "0001-01-01T00:00:00+01:00",
        "9999-12-31T23:59:59-01:00",
        "0000-01-01T00:00:00Z",
        "1969-12-31T23:59:59Z",
        "1970-01-01T00:59:59+01:00",  # 1969 in UTC
    ],
)
def test_a_balance_at_a_time_out_of_range_is_a_422(shop: Shop, at: str) -> None:
    assert _grant(shop, "ranger", "stock").status_code == 201
    body = _problem(
        shop.client.get("/v1/accounts/ranger/balance", params={"at": at}), 422, "invalid_time"
    )
    assert RANGE in body["detail"]


@pytest.mark.parametrize("at", ["1970-01-01T00:00:00Z", "1970-01-01T01:00:00+01:00"])
def test_a_balance_at_the_first_instant_of_the_range_answers(shop: Shop, at: str) -> None:
    assert _grant(shop, "ranger", "stock").status_code == 201
    answer = shop.client.get("/v1/accounts/ranger/balance", params={"at": at})
    assert answer.status_code == 200, answer.text
    assert answer.json()["available"] == 0


@pytest.mark.parametrize(
    "expires_at",
    ["9999-12-31T23:59:59-14:00", "9000-01-01T00:00:00Z", "8999-12-31T23:59:59-14:00"],
)
def test_a_grant_expiring_out_of_range_is_a_422(shop: Shop, expires_at: str) -> None:
    body = _problem(_grant(shop, "ranger", "late", expires_at=expires_at), 422, "invalid_time")
    assert RANGE in body["detail"]
    assert shop.client.get("/v1/accounts/ranger/lots").status_code == 404  # nothing made


def test_a_grant_expiring_at_the_last_instant_of_the_range_is_made(shop: Shop) -> None:
    answer = _grant(shop, "ranger", "last", expires_at="8999-12-31T23:59:59Z")
    assert answer.status_code == 201, answer.text
    assert answer.json()["expires_at"] == "8999-12-31T23:59:59Z"
    balance = shop.client.get("/v1/accounts/ranger/balance").json()
    assert balance["next_expiry"] == {"at": "8999-12-31T23:59:59Z", "amount": 5}


@pytest.mark.parametrize(
    "valid_for",
    [
        "P999999999999D",
        "PT99999999999999H",
        "P99999999Y",
        "P7030Y",  # longer than the whole range
        "P6974Y",  # from 2026-01-01T12:00Z: the year 9000
        "P6973Y11M30DT12H",  # from 2026-01-01T12:00Z: 9000-01-01T00:00Z
    ],
)
def test_a_grant_valid_past_the_range_is_a_422(shop: Shop, valid_for: str) -> None:
    body = _problem(_grant(shop, "ranger", "long", valid_for=valid_for), 422, "invalid_duration")
    assert "8999" in body["detail"]
    assert shop.client.get("/v1/accounts/ranger/lots").status_code == 404


def test_a_grant_valid_to_the_last_instant_of_the_range_is_made(shop: Shop) -> None:
    # The shop's clock stands at 2026-01-01T12:00:00Z.
    answer = _grant(shop, "ranger", "longest", valid_for="P6973Y11M30DT11H59M59S")
    assert answer.status_code == 201, answer.text
    assert answer.json()["expires_at"] == "8999-12-31T23:59:59Z"


# --- Stripe events, correctly signed -----------------------------------------------------------


def _session(**fields: Any) -> dict[str, Any]:
    return {
        "id": "cs_test_range",
        "object": "checkout.session",
        "payment_status": "paid",
        "amount_total": 900,
        "currency": "usd",
        "created": 1_767_225_600,
        "livemode": False,
        "customer_details": {"email": "buyer@example.com"},
        "metadata": {"package": "popular"},
        **fields,
    }


def _event(event_id: str, **fields: Any) -> dict[str, Any]:
    return {
        "id": event_id,
        "object": "event",
        "type": "checkout.session.completed",
        "created": 1_767_225_600,
        "data": {"object": _session()},
        **fields,
    }


def _kept(shop: Shop) -> list[tuple[str | None, str, Any]]:
    with shop.tally.database.engine.connect() as connection:
        rows = connection.execute(
            select(unmatched_pings.c.sale_id, unmatched_pings.c.reason, unmatched_pings.c.payload)
            .where(unmatched_pings.c.processor == "stripe")
            .order_by(unmatched_pings.c.ping_id)
        )
        return [(row.sale_id, row.reason, row.payload) for row in rows]


@pytest.fixture
def stripe_shop(make_shop: MakeShop) -> Shop:
    return make_shop(payments="stripe", stripe_webhook_secret=STRIPE_SECRET)


MALFORMED: dict[str, Any] = {
    "empty data": _event("evt_empty_data", data={}),
    "object a list": _event("evt_list", data={"object": [_session()]}),
    "no type": {k: v for k, v in _event("evt_no_type").items() if k != "type"},
    "non-numeric quantity": _event(
        "evt_quantity",
        data={
            "object": _session(
                line_items={"data": [{"price": {"id": "price_popular"}, "quantity": "two"}]}
            )
        },
    ),
    "session created in milliseconds": _event(
        "evt_millis", data={"object": _session(created=1_767_225_600_000)}
    ),
    "event created in milliseconds": _event("evt_event_millis", created=1_767_225_600_000),
    "fractional amount": _event("evt_amount", data={"object": _session(amount_total=9.5)}),
    "refund of a text amount": _event(
        "evt_refund",
        type="charge.refunded",
        data={"object": {"id": "ch_1", "payment_intent": "pi_1", "amount_refunded": "all"}},
    ),
    "refund past 2^53": _event(
        "evt_refund_big",
        type="charge.refunded",
        data={"object": {"id": "ch_2", "payment_intent": "pi_2", "amount_refunded": 10**20}},
    ),
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_a_signed_malformed_stripe_event_is_a_400_kept_for_support(
    stripe_shop: Shop, case: str
) -> None:
    event = MALFORMED[case]
    body = _problem(stripe_shop.stripe_event(event, STRIPE_SECRET), 400, "event_malformed")
    assert body["title"] == "Event malformed"
    [(sale_id, reason, payload)] = _kept(stripe_shop)
    assert (sale_id, payload) == (event["id"], event)
    assert reason.startswith("malformed: ")


def test_a_signed_event_that_is_not_json_is_a_400_kept_for_support(stripe_shop: Shop) -> None:
    _problem(stripe_shop.stripe_event("{not json", STRIPE_SECRET), 400, "event_malformed")
    assert _kept(stripe_shop) == [(None, "malformed: the event is not JSON", {"body": "{not json"})]


def test_an_unsigned_malformed_event_is_refused_and_not_kept(stripe_shop: Shop) -> None:
    answer = stripe_shop.client.post(
        "/webhooks/stripe", content=json.dumps({"data": {}}), headers={"Stripe-Signature": "t=1"}
    )
    _problem(answer, 400, "signature_invalid")
    assert _kept(stripe_shop) == []


def test_a_well_formed_event_at_the_edges_is_fulfilled(stripe_shop: Shop) -> None:
    session = _session(
        line_items={"data": [{"price": {"id": "price_popular"}, "quantity": 1}]},
        created=1_767_225_600,
    )
    answer = stripe_shop.stripe_event(_event("evt_fine", data={"object": session}), STRIPE_SECRET)
    assert answer.status_code == 200, answer.text
    assert answer.json()["created"] is True
    assert _kept(stripe_shop) == []


def _gumroad(make_shop: MakeShop) -> Shop:
    return make_shop(gumroad_webhook_token="gumroad-token", gumroad_seller_id="seller")


def _ping(shop: Shop, sale_id: str, **fields: str) -> httpx.Response:
    ping = {"seller_id": "seller", "sale_id": sale_id, "email": "buyer@example.com", **fields}
    return shop.client.post("/webhooks/gumroad/gumroad-token", data=ping)


@pytest.mark.parametrize("stamp", ["0001-01-01T00:00:00+01:00", "9999-12-31T23:59:59-01:00"])
def test_a_gumroad_sale_time_out_of_range_is_taken_as_now(make_shop: MakeShop, stamp: str) -> None:
    """Gumroad's `sale_timestamp` is informative: one Tally cannot read is the time it heard
    of the sale, never a 500 that Gumroad would retry."""
    shop = _gumroad(make_shop)
    answer = _ping(
        shop,
        f"sale-{stamp[:4]}",
        sale_timestamp=stamp,
        product_permalink="https://example.gumroad.com/l/popular",
        price="900",
        quantity="1",
    )
    assert answer.status_code == 200, answer.text
    assert answer.json()["created"] is True
    found = shop.client.get("/v1/orders", params={"email": "buyer@example.com"}).json()
    assert [order["purchased_at"] for order in found["data"]] == ["2026-01-01T12:00:00Z"]


def test_a_gumroad_sale_whose_credits_would_expire_past_the_range_is_kept(
    make_shop: MakeShop,
) -> None:
    """A Pro sale dated in 8999 would expire past the range: kept for support, answered 200
    (Gumroad stops resending), never a 4xx or 5xx that it retries."""
    shop = _gumroad(make_shop)
    answer = _ping(
        shop,
        "sale-8999",
        sale_timestamp="8999-06-01T00:00:00Z",
        product_permalink="https://example.gumroad.com/l/pro",
        price="2000",
    )
    assert answer.status_code == 200, answer.text
    assert answer.json()["ignored"] == "invalid_duration"
    with shop.tally.database.engine.connect() as connection:
        kept = connection.execute(select(unmatched_pings.c.sale_id)).scalars().all()
    assert kept == ["sale-8999"]


@pytest.mark.parametrize("cents", ["\u00b2", "9" * 17, "1" * 5000])
def test_a_gumroad_partial_refund_of_an_unreadable_amount_is_a_4xx(
    make_shop: MakeShop, cents: str
) -> None:
    answer = _ping(
        _gumroad(make_shop),
        "sale-refund",
        resource_name="refund",
        refunded="false",
        partially_refunded="true",
        amount_refunded_in_cents=cents,
    )
    assert 400 <= answer.status_code < 500, answer.text
