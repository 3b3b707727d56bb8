"""Support's order API and the /lost-code page through a real server: finding orders with
their code's status and last 4, reissuing a code (idempotent, refused when it cannot help),
and a person asking for a new code themselves: one answer whether or not the pair exists,
email only to the order's address, and a rate limit per client address."""

from __future__ import annotations

import re
import secrets
import time
from collections.abc import Iterator
from email.message import EmailMessage

import httpx
import pytest

from tests.conftest import DATABASES
from tests.e2e.server import CODE, Server, running
from tests.mailserver import Inbox
from tests.support import recent_sale_time, stamp

TOKEN = "support-path-token"
SOLD_AT = recent_sale_time()
SELLER = "seller-support"
LOST_CODE_LIMIT = 20  # per client address per hour, for this server
SENT = "If this matches an order, we have emailed a new code to the order&#39;s address."


@pytest.fixture(scope="module", params=DATABASES)
def shop(
    request: pytest.FixtureRequest,
    tmp_path_factory: pytest.TempPathFactory,
    inbox: tuple[Inbox, int],
) -> Iterator[Server]:
    env = {
        "TALLY_WORKER": "inline",
        "TALLY_SECRET_KEY": "support-secret",
        "TALLY_PAYMENTS": "gumroad",
        "TALLY_GUMROAD_WEBHOOK_TOKEN": TOKEN,
        "TALLY_GUMROAD_SELLER_ID": SELLER,
        "TALLY_SMTP_URL": f"smtp://127.0.0.1:{inbox[1]}",
        "TALLY_LOST_CODE_PER_HOUR": str(LOST_CODE_LIMIT),
    }
    with running(request.param, tmp_path_factory.mktemp("support"), env=env) as server:
        yield server


@pytest.fixture(scope="module")
def keys(shop: Server) -> dict[str, str]:
    support, spend, read = shop.keys("support-desk", "support", "spend", "read")
    return {"support": support, "spend": spend, "read": read}


def _buy(shop: Server, email: str, **fields: str) -> dict[str, str]:
    sale = f"s{secrets.token_hex(5)}"
    ping = {
        "seller_id": SELLER,
        "sale_id": sale,
        "sale_timestamp": stamp(SOLD_AT),
        "order_number": str(secrets.randbelow(10**9)),
        "product_id": "prod-pro",
        "product_permalink": "https://seller.gumroad.com/l/pro",
        "email": email,
        "price": "2000",
        "currency": "usd",
        "quantity": "1",
        "resource_name": "sale",
        **fields,
    }
    answer = httpx.post(f"{shop.base_url}/webhooks/gumroad/{TOKEN}", data=ping)
    assert answer.status_code == 200, answer.text
    return {**ping, "order_id": answer.json()["order_id"]}


def _mail_to(box: Inbox, email: str, count: int) -> list[EmailMessage]:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        found = [m for m in box.messages if m["To"] == email]
        if len(found) >= count:
            return found
        time.sleep(0.1)
    raise AssertionError(f"fewer than {count} emails to {email}")


def _code(message: EmailMessage) -> str:
    body = message.get_body(("plain",))
    assert body is not None
    found = CODE.search(body.get_content())
    assert found is not None
    return found.group(0)


def _redeem(shop: Server, key: str, code: str, account: str) -> httpx.Response:
    return httpx.post(
        f"{shop.base_url}/v1/redemptions",
        json={"code": code, "account_id": account},
        headers={"Authorization": f"Bearer {key}", "Idempotency-Key": secrets.token_hex(8)},
    )


def _auth(key: str, idempotency_key: str | None = None) -> dict[str, str]:
    headers = {"Authorization": f"Bearer {key}"}
    if idempotency_key is not None:
        headers["Idempotency-Key"] = idempotency_key
    return headers


def test_support_finds_orders_with_their_code(shop: Server, keys: dict[str, str]) -> None:
    email = f"find-{secrets.token_hex(3)}@example.com"
    first = _buy(shop, email)
    second = _buy(shop, email.upper())
    url = f"{shop.base_url}/v1/orders"

    found = httpx.get(url, params={"email": email}, headers=_auth(keys["support"]))
    assert found.status_code == 200, found.text
    body = found.json()
    assert body["has_more"] is False
    assert [o["id"] for o in body["data"]] == [second["order_id"], first["order_id"]]
    order = body["data"][1]
    assert order["object"] == "order"
    assert order["order_number"] == first["order_number"]
    assert order["email"] == email
    assert order["status"] == "fulfilled"
    assert order["code"]["status"] == "issued"
    assert re.fullmatch(r"[0-9A-Z]{4}", order["code"]["last4"])

    page = httpx.get(url, params={"email": email, "limit": 1}, headers=_auth(keys["support"]))
    assert [o["id"] for o in page.json()["data"]] == [second["order_id"]]
    assert page.json()["has_more"] is True
    rest = httpx.get(
        url,
        params={"email": email, "limit": 1, "starting_after": second["order_id"]},
        headers=_auth(keys["support"]),
    )
    assert [o["id"] for o in rest.json()["data"]] == [first["order_id"]]
    assert rest.json()["has_more"] is False

    by_number = httpx.get(
        url, params={"order_number": first["order_number"]}, headers=_auth(keys["support"])
    )
    assert [o["id"] for o in by_number.json()["data"]] == [first["order_id"]]

    refusals: list[dict[str, str | int]] = [
        {},
        {"email": ""},
        {"email": email, "limit": 501},
        {"email": email, "limit": 0},
    ]
    for params in refusals:
        refused = httpx.get(url, params=params, headers=_auth(keys["support"]))
        assert refused.status_code == 422, (params, refused.text)
        assert refused.headers["content-type"].startswith("application/problem+json")
    wrong_scope = httpx.get(url, params={"email": email}, headers=_auth(keys["read"]))
    assert (wrong_scope.status_code, wrong_scope.json()["code"]) == (403, "scope_missing")
    assert httpx.get(url, params={"email": email}).status_code == 401


def test_reissue_over_http(shop: Server, keys: dict[str, str], inbox: tuple[Inbox, int]) -> None:
    box, _ = inbox
    email = f"re-{secrets.token_hex(3)}@example.com"
    bought = _buy(shop, email)
    [original] = _mail_to(box, email, 1)
    url = f"{shop.base_url}/v1/orders/{bought['order_id']}/reissue"

    no_key = httpx.post(url, json={"reason": "lost"}, headers=_auth(keys["support"]))
    assert (no_key.status_code, no_key.json()["code"]) == (400, "idempotency_key_required")
    assert httpx.post(url, headers=_auth(keys["spend"], "k")).status_code == 403
    bad_body = httpx.post(url, json={"reason": "x" * 501}, headers=_auth(keys["support"], "b"))
    assert bad_body.status_code == 422

    reissued = httpx.post(url, json={"reason": "lost"}, headers=_auth(keys["support"], "re-1"))
    assert reissued.status_code == 200, reissued.text
    assert reissued.json()["id"] == bought["order_id"]
    assert "Idempotent-Replayed" not in reissued.headers
    replay = httpx.post(url, json={"reason": "lost"}, headers=_auth(keys["support"], "re-1"))
    assert replay.json() == reissued.json()
    assert replay.headers["Idempotent-Replayed"] == "true"
    without_body = httpx.post(url, headers=_auth(keys["support"], "re-1"))
    assert (without_body.status_code, without_body.json()["code"]) == (
        422,
        "idempotency_key_reused",
    )

    [_, replacement] = _mail_to(box, email, 2)
    assert replacement["Subject"] == "Your new code for Pro"
    # The replay made no third row, and both rows are sent: nothing more can go out.
    assert shop.wait_until_sent({email}) == {email: ["sent", "sent"]}
    assert len([m for m in box.messages if m["To"] == email]) == 2
    old = _redeem(shop, keys["spend"], _code(original), "re-account")
    assert (old.status_code, old.json()["code"]) == (422, "code_invalid_or_used")
    new = _redeem(shop, keys["spend"], _code(replacement), "re-account")
    assert new.status_code == 201, new.text
    two_years_on = SOLD_AT.replace(year=SOLD_AT.year + 2)  # the original validity
    assert new.json()["expires_at"] == stamp(two_years_on)

    listed = httpx.get(
        f"{shop.base_url}/v1/orders", params={"email": email}, headers=_auth(keys["support"])
    )
    assert listed.json()["data"][0]["code"] == {
        "status": "redeemed",
        "last4": _code(replacement)[-4:],
    }
    redeemed = httpx.post(url, headers=_auth(keys["support"], "re-2"))
    assert (redeemed.status_code, redeemed.json()["code"]) == (409, "code_already_redeemed")
    missing = httpx.post(
        f"{shop.base_url}/v1/orders/ord_00000000000000000000000000/reissue",
        headers=_auth(keys["support"], "re-3"),
    )
    assert (missing.status_code, missing.json()["code"]) == (404, "order_not_found")


def test_a_gift_is_reissued_to_its_recipient(
    shop: Server, keys: dict[str, str], inbox: tuple[Inbox, int]
) -> None:
    box, _ = inbox
    recipient = f"to-{secrets.token_hex(3)}@example.com"
    gifter = f"from-{secrets.token_hex(3)}@example.com"
    bought = _buy(shop, recipient, is_gift_receiver_purchase="true", gifter_email=gifter, price="0")
    _mail_to(box, recipient, 1)
    url = f"{shop.base_url}/v1/orders/{bought['order_id']}/reissue"
    assert httpx.post(url, headers=_auth(keys["support"], "gift-1")).status_code == 200
    _mail_to(box, recipient, 2)
    assert not [m for m in box.messages if m["To"] == gifter]


def _lost(shop: Server, email: str, number: str, address: str) -> httpx.Response:
    return httpx.post(
        f"{shop.base_url}/lost-code",
        data={"email": email, "order_number": number},
        headers={"X-Forwarded-For": address},
    )


def test_the_lost_code_page(shop: Server, keys: dict[str, str], inbox: tuple[Inbox, int]) -> None:
    box, _ = inbox
    email = f"lost-{secrets.token_hex(3)}@example.com"
    bought = _buy(shop, email)
    [original] = _mail_to(box, email, 1)
    address = f"10.1.{secrets.randbelow(250)}.{secrets.randbelow(250)}"

    page = httpx.get(f"{shop.base_url}/lost-code")
    assert page.status_code == 200
    assert 'action="/lost-code"' in page.text
    assert "lost-code" in (original.get_body(("plain",)) or original).get_content()

    answers = [
        _lost(shop, "stranger@example.com", bought["order_number"], address),  # wrong email
        _lost(shop, email, "999999999999", address),  # wrong number
        _lost(shop, email, bought["order_number"], address),  # the pair
    ]
    assert [a.status_code for a in answers] == [200, 200, 200]
    texts = [a.text for a in answers]
    assert SENT in texts[0]
    assert texts[0] == texts[1] == texts[2]  # the answer never tells whether the pair exists
    assert bought["order_number"] not in texts[2]

    [_, replacement] = _mail_to(box, email, 2)
    assert not [m for m in box.messages if m["To"] == "stranger@example.com"]
    new = _redeem(shop, keys["spend"], _code(replacement), "lost-account")
    assert new.status_code == 201, new.text

    # Redeemed: asking again sends nothing, and says the same.
    again = _lost(shop, email, bought["order_number"], address)
    assert again.text == texts[0]
    # The answer came after its transaction: had it queued an email, the row would be there.
    assert shop.wait_until_sent({email}) == {email: ["sent", "sent"]}
    assert len([m for m in box.messages if m["To"] == email]) == 2


def test_the_lost_code_page_is_rate_limited_per_address(
    shop: Server, inbox: tuple[Inbox, int]
) -> None:
    box, _ = inbox
    email = f"limit-{secrets.token_hex(3)}@example.com"
    bought = _buy(shop, email)
    _mail_to(box, email, 1)
    address = f"10.2.{secrets.randbelow(250)}.{secrets.randbelow(250)}"
    for _ in range(LOST_CODE_LIMIT):
        assert _lost(shop, "nobody@example.com", "1", address).status_code == 200
    limited = _lost(shop, email, bought["order_number"], address)
    assert limited.status_code == 429
    assert 1 <= int(limited.headers["Retry-After"]) <= 3600
    assert 'id="error"' in limited.text
    assert shop.wait_until_sent({email}) == {email: ["sent"]}  # the limited one queued none
    assert len([m for m in box.messages if m["To"] == email]) == 1
    elsewhere = _lost(shop, email, bought["order_number"], "10.3.0.1")
    assert elsewhere.status_code == 200
    _mail_to(box, email, 2)


def test_the_lost_code_page_takes_junk(shop: Server) -> None:
    address = "10.4.0.1"
    too_long = _lost(shop, "x" * 400, "1", address)
    assert too_long.status_code == 422
    missing = httpx.post(f"{shop.base_url}/lost-code", data={"email": "a@b.c"})
    assert missing.status_code == 422
    nul = _lost(shop, "a\x00@b.c", "1\x00", address)
    assert nul.status_code == 422  # not an address: said next to the field
    assert 'id="email-error"' in nul.text
    junk_number = _lost(shop, "a@b.c", "1\x00", address)
    assert junk_number.status_code == 200
