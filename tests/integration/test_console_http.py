"""The support console over HTTP, in-process, on SQLite and PostgreSQL: sessions and their
cookie, CSRF on every form, rate-limited sign-in, and the actions with their refusals shown on
the page. The same flows run in Chromium in tests/e2e/test_console.py."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from dataclasses import replace
from datetime import UTC, timedelta
from typing import Any

import httpx
import pytest
from sqlalchemy import func, select, update

from tally.adapters.catalog_file import builtin
from tally.adapters.db.engine import Database
from tally.adapters.db.schema import entries, outbox
from tally.bootstrap import Tally, group_commit
from tally.config import Settings
from tally.domain.commerce import Order, Sale
from tally.entrypoints.http.admin import SESSION_COOKIE
from tally.entrypoints.http.app import create_app
from tally.service import commerce, ledger, staff
from tests.support import FakeClock

pytestmark = pytest.mark.anyio

BASE = "http://tally.test"
EMAIL = "sam@support.example"
PASSWORD = "correct horse battery"
_HIDDEN = re.compile(r'name="(csrf|key)" value="([^"]+)"')


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def tally(db: Database, clock: FakeClock) -> Tally:
    settings = Settings(public_url=BASE, secret_key="console test")
    made = Tally(settings, db, clock, group_commit(db, clock), builtin(), "console test")
    staff.create_staff(EMAIL, PASSWORD, made.uow())
    return made


def _client(tally: Tally, base: str = BASE) -> httpx.AsyncClient:
    transport = httpx.ASGITransport(app=create_app(tally), client=("10.0.0.7", 50000))
    return httpx.AsyncClient(transport=transport, base_url=base)


@pytest.fixture
async def http(tally: Tally) -> AsyncIterator[httpx.AsyncClient]:
    async with _client(tally) as client:
        yield client


def _hidden(html: str) -> dict[str, str]:
    """The hidden csrf and the first form's idempotency key of a page."""
    found: dict[str, str] = {}
    for name, value in _HIDDEN.findall(html):
        found.setdefault(name, value)
    return found


async def _sign_in(
    http: httpx.AsyncClient, password: str = PASSWORD, email: str = EMAIL
) -> httpx.Response:
    form = await http.get("/admin/sign-in")
    assert form.status_code == 200
    token = _hidden(form.text)["csrf"]
    return await http.post(
        "/admin/sign-in",
        data={"email": email, "password": password, "csrf": token, "next": "/admin"},
        headers={"Origin": BASE},
    )


async def _form(http: httpx.AsyncClient, path: str) -> dict[str, str]:
    page = await http.get(path)
    assert page.status_code == 200, page.text
    return _hidden(page.text)


def _balance(tally: Tally, account_id: str) -> int:
    return ledger.get_balance(account_id, tally.uow()).available


def _grant(tally: Tally, account_id: str = "ana", amount: int = 5) -> None:
    ledger.grant(
        ledger.GrantCredits(account_id=account_id, amount=amount, idempotency_key="seed"),
        tally.uow(),
    )


# --- sessions -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "path",
    ["/admin", "/admin/search?q=ana", "/admin/accounts/ana", "/admin/orders/ord_x", "/admin/pings"],
)
async def test_every_page_without_a_session_redirects_to_sign_in(
    http: httpx.AsyncClient, path: str
) -> None:
    answer = await http.get(path)
    assert answer.status_code == 303
    assert answer.headers["location"].startswith("/admin/sign-in?next=%2Fadmin")
    # A made-up or stale cookie is no session either.
    http.cookies.set(SESSION_COOKIE, "not-a-session", domain="tally.test", path="/admin")
    assert (await http.get(path)).status_code == 303


async def test_an_action_without_a_session_changes_nothing(
    http: httpx.AsyncClient, tally: Tally
) -> None:
    _grant(tally)
    answer = await http.post(
        "/admin/accounts/ana/grant",
        data={"amount": "100", "reason": "x", "key": "k", "csrf": "guess"},
    )
    assert answer.status_code == 303
    assert answer.headers["location"] == "/admin/sign-in?next=%2Fadmin"
    assert _balance(tally, "ana") == 5


async def test_sign_in_sets_a_strict_http_only_cookie_for_admin_only(
    http: httpx.AsyncClient,
) -> None:
    answer = await _sign_in(http)
    assert answer.status_code == 303
    assert answer.headers["location"] == "/admin"
    cookie = next(c for c in answer.headers.get_list("set-cookie") if c.startswith(SESSION_COOKIE))
    flags = {part.strip().split("=")[0].lower(): part.strip() for part in cookie.split(";")}
    assert "httponly" in flags
    assert flags["samesite"].lower() == "samesite=strict"
    assert flags["path"] == "Path=/admin"
    assert "secure" not in flags  # plain http in development
    home = await http.get("/admin")
    assert home.status_code == 200
    assert EMAIL in home.text
    assert 'id="chart"' in home.text
    for name, value in {
        "cache-control": "no-store",
        "x-frame-options": "DENY",
        "x-content-type-options": "nosniff",
    }.items():
        assert home.headers[name] == value
    assert "frame-ancestors 'none'" in home.headers["content-security-policy"]


async def test_the_cookie_is_secure_when_tally_is_served_over_https(tally: Tally) -> None:
    secure = replace(tally, settings=replace(tally.settings, public_url="https://tally.test"))
    async with _client(secure, "https://tally.test") as http:
        form = await http.get("/admin/sign-in")
        assert "secure" in form.headers["set-cookie"].lower()
        answer = await http.post(
            "/admin/sign-in",
            data={"email": EMAIL, "password": PASSWORD, "csrf": _hidden(form.text)["csrf"]},
            headers={"Origin": "https://tally.test"},
        )
        assert answer.status_code == 303
        session = next(
            c for c in answer.headers.get_list("set-cookie") if c.startswith(SESSION_COOKIE)
        )
        assert "; secure" in session.lower()
    production = replace(tally, settings=replace(tally.settings, env="production"))
    async with _client(production) as http:
        assert "secure" in (await http.get("/admin/sign-in")).headers["set-cookie"].lower()


async def test_a_wrong_password_and_an_unknown_email_get_the_same_page(
    http: httpx.AsyncClient,
) -> None:
    wrong = await _sign_in(http, password="not the password")
    unknown = await _sign_in(http, email="nobody@support.example")
    for answer in (wrong, unknown):
        assert answer.status_code == 401
        assert "The email or the password is wrong." in answer.text
        assert SESSION_COOKIE not in answer.headers.get("set-cookie", "")
    assert (await http.get("/admin")).status_code == 303


async def test_sign_in_is_rate_limited_with_a_429_page(http: httpx.AsyncClient) -> None:
    for _ in range(staff.SIGN_IN_ATTEMPTS_PER_EMAIL):
        assert (await _sign_in(http, password="wrong wrong wrong")).status_code == 401
    limited = await _sign_in(http)  # even the right password, until the window passes
    assert limited.status_code == 429
    assert int(limited.headers["retry-after"]) > 0
    assert "Too many attempts" in limited.text
    assert (await http.get("/admin")).status_code == 303


async def test_sign_in_needs_its_form_token(http: httpx.AsyncClient) -> None:
    await http.get("/admin/sign-in")
    for token in (None, "forged"):
        data = {"email": EMAIL, "password": PASSWORD, **({"csrf": token} if token else {})}
        answer = await http.post("/admin/sign-in", data=data)
        assert answer.status_code == 403
        assert "csrf_rejected" in answer.text
    fresh = httpx.AsyncClient(transport=http._transport, base_url=BASE)  # no sign-in cookie
    async with fresh:
        page = await http.get("/admin/sign-in")
        answer = await fresh.post(
            "/admin/sign-in",
            data={"email": EMAIL, "password": PASSWORD, "csrf": _hidden(page.text)["csrf"]},
        )
        assert answer.status_code == 403


async def test_after_sign_in_the_page_asked_for_opens_but_never_another_site(
    http: httpx.AsyncClient,
) -> None:
    for asked, landed in [
        ("/admin/accounts/ana", "/admin/accounts/ana"),
        ("//evil.example/admin", "/admin"),
        ("https://evil.example/", "/admin"),
        ("/admin\\@evil.example", "/admin"),
    ]:
        http.cookies.clear()  # signed out again
        form = await http.get("/admin/sign-in", params={"next": asked})
        answer = await http.post(
            "/admin/sign-in",
            data={
                "email": EMAIL,
                "password": PASSWORD,
                "csrf": _hidden(form.text)["csrf"],
                "next": asked,
            },
        )
        assert answer.headers["location"] == landed


async def test_sign_out_ends_the_session(http: httpx.AsyncClient) -> None:
    await _sign_in(http)
    old = http.cookies.get(SESSION_COOKIE, path="/admin")
    csrf = (await _form(http, "/admin"))["csrf"]
    answer = await http.post("/admin/sign-out", data={"csrf": csrf})
    assert answer.status_code == 303
    assert answer.headers["location"] == "/admin/sign-in"
    http.cookies.set(SESSION_COOKIE, str(old), domain="tally.test", path="/admin")
    assert (await http.get("/admin")).status_code == 303


# --- CSRF ---------------------------------------------------------------------------------------


async def test_a_form_without_its_token_or_from_another_site_is_refused(
    http: httpx.AsyncClient, tally: Tally
) -> None:
    _grant(tally)
    await _sign_in(http)
    good = await _form(http, "/admin/accounts/ana")
    base = {"amount": "100", "reason": "free money", "key": good["key"]}
    for data, headers in [
        (base, {}),  # no token
        ({**base, "csrf": "0" * 64}, {}),  # a wrong one
        ({**base, "csrf": good["csrf"]}, {"Origin": "https://evil.example"}),
        ({**base, "csrf": good["csrf"]}, {"Origin": "null"}),
        ({**base, "csrf": good["csrf"]}, {"Referer": "https://evil.example/page"}),
        ({**base, "csrf": good["csrf"]}, {"Sec-Fetch-Site": "cross-site"}),
        ({**base, "csrf": good["csrf"]}, {"Sec-Fetch-Site": "same-site"}),
    ]:
        answer = await http.post("/admin/accounts/ana/grant", data=data, headers=headers)
        assert answer.status_code == 403, (data, headers)
        assert "csrf_rejected" in answer.text
    assert _balance(tally, "ana") == 5
    # The same form from the console itself works.
    answer = await http.post(
        "/admin/accounts/ana/grant",
        data={**base, "csrf": good["csrf"]},
        headers={"Origin": BASE, "Referer": f"{BASE}/admin/accounts/ana"},
    )
    assert answer.status_code == 303
    assert _balance(tally, "ana") == 105


# --- actions ------------------------------------------------------------------------------------


async def test_a_grant_is_recorded_with_the_staff_member_and_a_double_submit_counts_once(
    http: httpx.AsyncClient, tally: Tally, db: Database
) -> None:
    _grant(tally)
    await _sign_in(http)
    form = await _form(http, "/admin/accounts/ana")
    data = {**form, "amount": "12", "valid_for": "P30D", "reason": "sorry for the outage"}
    for _ in range(2):
        answer = await http.post("/admin/accounts/ana/grant", data=data)
        assert answer.status_code == 303
        assert answer.headers["location"] == "/admin/accounts/ana?done=granted"
    assert _balance(tally, "ana") == 17
    with db.engine.connect() as connection:
        row = connection.execute(
            select(entries.c.platform_id, entries.c.reason, entries.c.amount)
            .where(entries.c.account_id == "ana")
            .order_by(entries.c.seq.desc())
        ).first()
    assert row is not None
    assert row.platform_id.startswith("stf_")
    assert (row.reason, row.amount) == ("sorry for the outage", 12)
    page = await http.get("/admin/accounts/ana?done=granted")
    assert "Credits granted." in page.text
    assert f"staff {EMAIL}" in page.text
    assert 'id="available">17<' in page.text


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"amount": "12", "reason": " "}, "give a reason"),
        ({"amount": "1.5", "reason": "r"}, "whole number"),
        ({"amount": "-3", "reason": "r"}, "whole number"),
        ({"amount": "0", "reason": "r"}, "Invalid amount"),
        ({"amount": "99999999999999999999", "reason": "r"}, "Invalid amount"),
        ({"amount": "5", "reason": "r", "valid_for": "soon"}, "Invalid duration"),
        ({"amount": "5", "reason": "r" * 501}, "at most 500"),
        ({"amount": "5", "reason": "r", "key": ""}, "idempotency key"),
    ],
)
async def test_bad_grant_forms_are_shown_on_the_page(
    http: httpx.AsyncClient, tally: Tally, fields: dict[str, str], message: str
) -> None:
    _grant(tally)
    await _sign_in(http)
    form = await _form(http, "/admin/accounts/ana")
    answer = await http.post("/admin/accounts/ana/grant", data={**form, **fields})
    assert answer.status_code == 422
    assert 'id="error"' in answer.text
    assert message in answer.text
    assert _balance(tally, "ana") == 5


async def test_voiding_a_lot_twice_shows_the_refusal(http: httpx.AsyncClient, tally: Tally) -> None:
    _grant(tally)
    await _sign_in(http)
    page = await http.get("/admin/accounts/ana")
    lot_id = re.search(r"/admin/lots/(lot_[0-9a-z]+)/void", page.text)
    assert lot_id is not None
    path = f"/admin/lots/{lot_id.group(1)}/void"
    form = _hidden(page.text)
    data = {**form, "account_id": "ana", "reason": "bought by mistake"}
    answer = await http.post(path, data={**data, "key": "void-1"})
    assert answer.status_code == 303
    assert _balance(tally, "ana") == 0
    again = await http.post(path, data={**data, "key": "void-2"})
    assert again.status_code == 409
    assert "lot_voided" in again.text
    missing = await http.post(
        "/admin/lots/lot_00000000000000000000000000/void", data={**data, "key": "void-3"}
    )
    assert missing.status_code == 404


async def _order(tally: Tally, sale_id: str = "sandbox-1", **changes: Any) -> Order:
    sale = Sale(
        processor="sandbox",
        sale_id=sale_id,
        package=tally.catalog.packages["pro"],
        email="Ana@Example.com",
        purchased_at=tally.clock(),
        order_number="1001",
        **changes,
    )
    return commerce.fulfil(sale, tally.uow(), pepper=tally.pepper, links=tally.links).order


async def test_search_finds_an_order_and_a_failed_email_is_resent(
    http: httpx.AsyncClient, tally: Tally, db: Database
) -> None:
    order = await _order(tally)
    with db.engine.begin() as connection:
        connection.execute(update(outbox).values(status="failed", attempts=12, last_error="550"))
    await _sign_in(http)
    found = await http.get("/admin/search", params={"q": "ana@example.com"})
    assert found.status_code == 303
    assert found.headers["location"] == f"/admin/orders/{order.id}"
    page = await http.get(found.headers["location"])
    assert "purchase_code" in page.text
    assert "failed" in page.text
    resend = re.search(r"/admin/messages/(msg_[0-9a-z]+)/resend", page.text)
    assert resend is not None
    form = _hidden(page.text)
    data = {**form, "order_id": order.id, "reason": "customer asked"}
    for _ in range(2):  # a double submit
        answer = await http.post(resend.group(0), data=data)
        assert answer.status_code == 303
        assert answer.headers["location"] == f"/admin/orders/{order.id}?done=resent"
    with db.engine.connect() as connection:
        row = connection.execute(select(outbox.c.status, outbox.c.attempts)).one()
    assert tuple(row) == ("pending", 0)
    with db.engine.begin() as connection:
        connection.execute(update(outbox).values(status="sent"))
    refused = await http.post(resend.group(0), data={**data, "key": "another"})
    assert refused.status_code == 409
    assert "message_not_resendable" in refused.text
    assert "reissue" in refused.text


async def test_search_lists_several_matches_and_says_when_nothing_matches(
    http: httpx.AsyncClient, tally: Tally, db: Database
) -> None:
    await _order(tally)
    ledger.put_account("ana-account", "ana@example.com", tally.uow())
    await _sign_in(http)
    both = await http.get("/admin/search", params={"q": "ANA@example.com"})
    assert both.status_code == 200
    assert 'id="orders"' in both.text
    assert "/admin/accounts/ana-account" in both.text
    none = await http.get("/admin/search", params={"q": "<script>nobody</script>"})
    assert none.status_code == 200
    assert "nothing matches" in none.text
    assert "<script>nobody" not in none.text  # escaped
    empty = await http.get("/admin/search", params={"q": ""})
    assert empty.status_code == 422
    with db.engine.connect() as connection:
        assert connection.execute(select(func.count()).select_from(entries)).scalar_one() == 0


async def test_an_order_is_refunded_and_its_code_reissued_from_the_order_page(
    http: httpx.AsyncClient, tally: Tally, db: Database
) -> None:
    order = await _order(tally)
    await _sign_in(http)
    path = f"/admin/orders/{order.id}"
    page = await http.get(path)
    first_code = re.search(r'id="code">…([0-9A-Z]{4}) issued', page.text)
    assert first_code is not None
    form = _hidden(page.text)

    # Reissue, submitted twice: one new code, the old one void.
    data = {"csrf": form["csrf"], "key": form["key"] + "-reissue", "reason": "lost it"}
    for _ in range(2):
        answer = await http.post(f"{path}/reissue", data=data)
        assert answer.status_code == 303
        assert answer.headers["location"] == f"{path}?done=reissued"
    page = await http.get(answer.headers["location"])
    assert "A new code was issued" in page.text
    assert page.text.count(">void<") == 1
    assert page.text.count("issued</td>") == 1  # the codes table: one void, one issued
    assert "replacement_code" in page.text

    # Refund: the code is voided; a second refund (another key) is refused on the page.
    data = {"csrf": form["csrf"], "key": form["key"] + "-refund", "reason": "asked in time"}
    answer = await http.post(f"{path}/refund", data=data)
    assert answer.status_code == 303, answer.text
    page = await http.get(answer.headers["location"])
    assert 'id="status">refunded<' in page.text
    assert 'id="refunded"' in page.text
    assert "asked in time" in page.text
    again = await http.post(f"{path}/refund", data={**data, "key": "second"})
    assert again.status_code == 409
    assert "already_refunded" in again.text
    reissue = await http.post(f"{path}/reissue", data={**data, "key": "third"})
    assert reissue.status_code == 409
    assert "order_reversed" in reissue.text
    missing = await http.post("/admin/orders/ord_00000000000000000000000000/refund", data=data)
    assert missing.status_code == 404


async def test_refunding_a_redeemed_order_is_journaled_under_the_staff_member(
    http: httpx.AsyncClient, tally: Tally, db: Database
) -> None:
    order = await _order(tally)
    with db.engine.connect() as connection:
        context = connection.execute(select(outbox.c.context)).scalar_one()
    commerce.redeem(
        commerce.Redeem(code=context["code"], account_id="ana", idempotency_key="r1"),
        tally.uow(),
        pepper=tally.pepper,
    )
    assert _balance(tally, "ana") == order.credits
    await _sign_in(http)
    form = await _form(http, f"/admin/orders/{order.id}")
    answer = await http.post(
        f"/admin/orders/{order.id}/refund",
        data={"csrf": form["csrf"], "key": form["key"], "reason": "unused, asked in time"},
    )
    assert answer.status_code == 303
    assert _balance(tally, "ana") == 0
    page = await http.get("/admin/accounts/ana")
    journal = page.text[page.text.index('id="journal"') :]
    assert f"staff {EMAIL}" in journal
    assert "unused, asked in time" in journal


async def test_a_refund_after_credits_were_used_is_refused_on_the_page(
    http: httpx.AsyncClient, tally: Tally, db: Database
) -> None:
    order = await _order(tally, "sandbox-used")
    with db.engine.connect() as connection:
        context = connection.execute(select(outbox.c.context)).scalar_one()
    commerce.redeem(
        commerce.Redeem(code=context["code"], account_id="bo", idempotency_key="r1"),
        tally.uow(),
        pepper=tally.pepper,
    )
    ledger.debit(ledger.DebitCredits(account_id="bo", amount=1, idempotency_key="d1"), tally.uow())
    await _sign_in(http)
    form = await _form(http, f"/admin/orders/{order.id}")
    answer = await http.post(
        f"/admin/orders/{order.id}/refund",
        data={"csrf": form["csrf"], "key": form["key"], "reason": "asked"},
    )
    assert answer.status_code == 409
    assert "credits_used" in answer.text
    assert 'id="status">fulfilled<' in answer.text
    assert _balance(tally, "bo") == order.credits - 1


async def test_support_sees_the_pings_tally_kept_instead_of_acting_on(
    http: httpx.AsyncClient, tally: Tally, clock: FakeClock
) -> None:
    assert (await _sign_in(http)).status_code == 303
    empty = await http.get("/admin/pings")
    assert empty.status_code == 200
    assert 'id="no-pings"' in empty.text
    hostile = {"email": "<script>alert(1)</script>@x.com", "sale_id": "s-1"}
    commerce.record_unmatched(
        "gumroad", "s-1", "invalid_email: not one address", hostile, tally.uow()
    )
    clock.advance(minutes=5)
    commerce.record_unmatched("stripe", "evt_2", "malformed: no type", {"id": "evt_2"}, tally.uow())
    page = await http.get("/admin/pings")
    assert page.status_code == 200
    rows = re.findall(r"<tr>\s*<td>([^<]*)</td>\s*<td>([^<]*)</td>\s*<td>([^<]*)</td>", page.text)
    when = clock().astimezone(UTC)
    assert rows == [
        (f"{when.day} {when:%B %Y, %H:%M} UTC", "stripe", "evt_2"),
        (
            f"{(when - timedelta(minutes=5)).day} {when - timedelta(minutes=5):%B %Y, %H:%M} UTC",
            "gumroad",
            "s-1",
        ),
    ]
    assert "invalid_email: not one address" in page.text
    assert "<script>" not in page.text
    assert "&lt;script&gt;" in page.text
