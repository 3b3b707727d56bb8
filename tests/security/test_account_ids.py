"""Account ids are exact: they are the platforms' own user ids, so `User_A@Example.com` and
`user_a@example.com` are two wallets, on the public /redeem page and through the API alike."""

from __future__ import annotations

import re
from datetime import UTC, timedelta

from tests.security.conftest import Shop
from tests.support import FakeClock

MIXED = "User_A@Example.com"
LOWER = "user_a@example.com"


def _available(shop: Shop, account_id: str) -> int | None:
    """The account's available credits; None when no such account exists."""
    answer = shop.client.get(f"/v1/accounts/{account_id}/balance")
    if answer.status_code == 404 and answer.json()["code"] == "account_not_found":
        return None
    assert answer.status_code == 200, answer.text
    return int(answer.json()["available"])


def test_the_redeem_page_credits_the_account_id_exactly_as_typed(shop: Shop) -> None:
    page = shop.client.post("/redeem", data={"code": shop.code(), "account": MIXED})
    assert page.status_code == 200, page.text
    assert f"added to {MIXED}" in page.text
    assert (_available(shop, MIXED), _available(shop, LOWER)) == (25, None)

    # Surrounding spaces, which no account id may hold, are all the page takes away.
    page = shop.client.post("/redeem", data={"code": shop.code(), "account": f"  {MIXED}\t"})
    assert page.status_code == 200, page.text
    assert (_available(shop, MIXED), _available(shop, LOWER)) == (50, None)


def test_the_redeem_page_lets_people_type_any_account_id(shop: Shop) -> None:
    """Account ids are not emails (`user:42`), and phones must not capitalise them."""
    form = shop.client.get("/redeem").text
    found = re.search(r'<input id="account"[^>]*>', form)
    assert found is not None
    field = found.group(0)
    assert 'type="text"' in field
    assert 'autocapitalize="none"' in field
    page = shop.client.post("/redeem", data={"code": shop.code(), "account": "User:42"})
    assert page.status_code == 200, page.text
    assert (_available(shop, "User:42"), _available(shop, "user:42")) == (25, None)


def test_the_api_credits_the_account_id_exactly_as_sent(shop: Shop) -> None:
    redeemed = shop.client.post(
        "/v1/redemptions",
        json={"code": shop.code(), "account_id": MIXED},
        headers={"Idempotency-Key": "redeem-mixed"},
    )
    assert redeemed.status_code == 201, redeemed.text
    assert redeemed.json()["account_id"] == MIXED
    assert (_available(shop, MIXED), _available(shop, LOWER)) == (25, None)

    granted = shop.client.post(
        f"/v1/accounts/{LOWER}/grants",
        json={"amount": 3, "source": "promotional", "reason": "welcome"},
        headers={"Idempotency-Key": "grant-lower"},
    )
    assert granted.status_code == 201, granted.text
    assert (_available(shop, MIXED), _available(shop, LOWER)) == (25, 3)


def test_the_redeem_page_speaks_in_sentences_and_dates_in_words(
    shop: Shop, clock: FakeClock
) -> None:
    page = shop.client.post("/redeem", data={"code": shop.code(), "account": MIXED})
    expires = (clock() + timedelta(days=730)).astimezone(UTC)
    assert f"valid until {expires.day} {expires:%B %Y}." in page.text
    refused = shop.client.post("/redeem", data={"code": "AAAA-BBBB-CCCC-DDDD", "account": MIXED})
    assert refused.status_code == 422
    assert "This code is not valid or was used already." in refused.text
    assert '<a href="/lost-code">Ask for a new code</a>' in refused.text
    bad_id = shop.client.post("/redeem", data={"code": shop.code(), "account": "a b"})
    assert bad_id.status_code == 422
    found = re.search(r'<p class="error" id="error">([^<]*)</p>', bad_id.text)
    assert found is not None
    assert found.group(1)[0].isupper()
    assert found.group(1).endswith(".")
