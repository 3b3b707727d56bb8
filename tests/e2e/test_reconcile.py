"""Reconciliation through the real CLI and worker, against local stand-ins for Gumroad's sales
API (`GET /v2/sales`, paged by `page_key`) and Stripe's Checkout Sessions list (paged by
`starting_after`, read by the official library): missed sales are fulfilled once, re-runs
change nothing, and a processor failure half-way changes nothing until the next run."""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import Iterator
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest
import sqlalchemy as sa
from sqlalchemy.engine import make_url

from tally.adapters.catalog_file import builtin
from tally.adapters.sales import GumroadSales
from tally.domain.errors import ProcessorFailed
from tests.conftest import DATABASES
from tests.e2e.fake_api import FakeApi, JsonHandler
from tests.e2e.server import Server, running
from tests.mailserver import Inbox

TOKEN = "reconcile-path-token"
SELLER = "seller-reconcile"
ACCESS_TOKEN = "gumroad-reconcile-token"
GUMROAD_PAGE = 3
STRIPE_PAGE = 2

#: Every date relative to today: the sales were made RECENT, inside the window from SINCE, all
#: but one made OLD, before it (a fixed date would pass only before or only after it).
_TODAY = datetime.now(UTC).replace(hour=9, minute=30, second=0, microsecond=0)
RECENT = _TODAY - timedelta(days=17)
OLD = _TODAY - timedelta(days=67)
SINCE = (_TODAY - timedelta(days=36)).date().isoformat()


def _stamp(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


class Processors(FakeApi):
    """Gumroad's sales list and Stripe's sessions list, in their documented shapes."""

    def __init__(self) -> None:
        self.gumroad: list[dict[str, Any]] = []  # newest first, as Gumroad lists them
        self.stripe: list[dict[str, Any]] = []
        self.fail_on_page: int | None = None  # answer 502 to this Gumroad page (1-based)
        self.text_on_page: int | None = None  # answer 200 with an HTML page instead of JSON
        self.requests: list[tuple[str, dict[str, list[str]]]] = []
        outer = self

        class Handler(JsonHandler):
            def do_GET(self) -> None:
                url = urlsplit(self.path)
                query = parse_qs(url.query)
                outer.requests.append((url.path, query))
                if url.path == "/v2/sales":
                    self._gumroad(query)
                elif url.path.startswith("/v2/sales/"):  # the webhook confirms a ping
                    wanted = url.path.rsplit("/", 1)[-1]
                    found = [s for s in outer.gumroad if s["id"] == wanted]
                    if found:
                        self._answer(200, {"success": True, "sale": found[0]})
                    else:
                        self._answer(404, {"success": False, "message": "not found"})
                elif url.path == "/v1/checkout/sessions":
                    self._stripe(query)
                elif url.path.endswith("/line_items"):
                    self._answer(200, {"object": "list", "data": [], "has_more": False})
                else:
                    self._answer(404, {"error": {"message": "no such route"}})

            def _gumroad(self, query: dict[str, list[str]]) -> None:
                if query.get("access_token") != [ACCESS_TOKEN]:
                    self._answer(401, {"success": False, "message": "The access token is bad"})
                    return
                after = query["after"][0]
                listed = [s for s in outer.gumroad if s["created_at"][:10] >= after]
                # page_key: where the page starts (an opaque key to the client).
                start = int(query.get("page_key", ["0"])[0].removeprefix("k"))
                page_number = start // GUMROAD_PAGE + 1
                if outer.fail_on_page == page_number:
                    self._answer(502, {"success": False, "message": "Bad gateway"})
                    return
                if outer.text_on_page == page_number:  # a proxy's page, answered 200
                    data = b"<html><body>Service temporarily unavailable</body></html>"
                    self.send_response(200)
                    self.send_header("Content-Type", "text/html")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                    return
                body: dict[str, Any] = {
                    "success": True,
                    "sales": listed[start : start + GUMROAD_PAGE],
                }
                if start + GUMROAD_PAGE < len(listed):
                    key = f"k{start + GUMROAD_PAGE}"
                    body["next_page_key"] = key
                    body["next_page_url"] = f"/v2/sales?page_key={key}&after={after}"
                self._answer(200, body)

            def _stripe(self, query: dict[str, list[str]]) -> None:
                if self.headers.get("Authorization") != "Bearer sk_test_reconcile":
                    self._answer(401, {"error": {"message": "Invalid API Key provided"}})
                    return
                since = int(query["created[gte]"][0])
                listed = [
                    s
                    for s in outer.stripe
                    if s["created"] >= since and s["status"] == query["status"][0]
                ]
                after = query.get("starting_after", [None])[0]
                start = 0 if after is None else [s["id"] for s in listed].index(after) + 1
                self._answer(
                    200,
                    {
                        "object": "list",
                        "url": "/v1/checkout/sessions",
                        "data": listed[start : start + STRIPE_PAGE],
                        "has_more": start + STRIPE_PAGE < len(listed),
                    },
                )

        super().__init__(Handler)


@pytest.fixture
def processors() -> Iterator[Processors]:
    fake = Processors()
    try:
        yield fake
    finally:
        fake.close()


def _env(processors: Processors, smtp_port: int, **more: str) -> dict[str, str]:
    return {
        "TALLY_SECRET_KEY": "reconcile-secret",
        "TALLY_PAYMENTS": "gumroad",
        "TALLY_GUMROAD_WEBHOOK_TOKEN": TOKEN,
        "TALLY_GUMROAD_SELLER_ID": SELLER,
        "TALLY_GUMROAD_ACCESS_TOKEN": ACCESS_TOKEN,
        "TALLY_GUMROAD_API_BASE": processors.base_url,
        "TALLY_STRIPE_API_KEY": "sk_test_reconcile",
        "TALLY_STRIPE_API_BASE": processors.base_url,
        "TALLY_SMTP_URL": f"smtp://127.0.0.1:{smtp_port}",
        "TALLY_WORKER": "inline",
        **more,
    }


def _gumroad_sale(sale_id: str, **fields: Any) -> dict[str, Any]:
    """A sale as `GET /v2/sales` lists it (not a ping: `id`, `created_at`, numbers, booleans,
    the short permalink)."""
    return {
        "id": sale_id,
        "email": f"{sale_id}@example.com",
        "seller_id": SELLER,
        "created_at": _stamp(RECENT),
        "product_name": "Pro",
        "product_id": "prod-pro",
        "product_permalink": "pro",
        "price": 2000,
        "currency": "usd",
        "quantity": 1,
        "order_id": secrets.randbelow(10**9),
        "refunded": False,
        "partially_refunded": False,
        "chargedback": False,
        "is_gift_receiver_purchase": False,
        "is_gift_sender_purchase": False,
        **fields,
    }


def _session(session_id: str, **fields: Any) -> dict[str, Any]:
    return {
        "id": session_id,
        "object": "checkout.session",
        "status": "complete",
        "payment_status": "paid",
        "created": int(RECENT.timestamp()),
        "amount_total": 6000,
        "currency": "usd",
        "livemode": False,
        "customer_details": {"email": f"{session_id}@example.com"},
        "metadata": {"package": "power"},
        **fields,
    }


def _orders(server: Server) -> dict[str, tuple[str, int, str]]:
    """sale id -> (processor, credits, email) of every order in the server's database."""
    url = make_url(server.url)
    if url.drivername == "postgresql":
        url = url.set(drivername="postgresql+psycopg")
    engine = sa.create_engine(url)
    try:
        with engine.connect() as connection:
            rows = connection.execute(
                sa.text("SELECT sale_id, processor, credits, email FROM orders")
            ).all()
    finally:
        engine.dispose()
    return {row.sale_id: (row.processor, row.credits, row.email) for row in rows}


def _reconcile(server: Server, *args: str) -> tuple[int, dict[str, Any]]:
    done = server._run("reconcile", *args)
    assert done.stdout, done.stderr
    reports = json.loads(done.stdout)["processors"]
    return done.returncode, {report["processor"]: report for report in reports}


@pytest.mark.parametrize("kind", DATABASES)
def test_missed_sales_are_fulfilled_once(
    kind: str, tmp_path: Path, processors: Processors, inbox: tuple[Inbox, int]
) -> None:
    box, smtp_port = inbox
    tag = secrets.token_hex(3)
    g = [f"g{tag}-{n}" for n in range(9)]
    processors.gumroad = [
        _gumroad_sale(g[0]),
        _gumroad_sale(g[1], refunded=True),
        _gumroad_sale(g[2], product_permalink="not-in-the-catalog", product_id="nope"),
        _gumroad_sale(g[3], test=True),
        _gumroad_sale(g[4], is_gift_sender_purchase=True, email=f"gifter-{tag}@example.com"),
        _gumroad_sale(
            g[5],
            is_gift_receiver_purchase=True,
            email=f"friend-{tag}@example.com",
            gifter_email=f"gifter-{tag}@example.com",
            price=0,
        ),
        _gumroad_sale(g[6], chargedback=True),
        _gumroad_sale(g[7], quantity=2, product_permalink="https://x.gumroad.com/l/pro"),
        _gumroad_sale(g[8], created_at=_stamp(OLD)),  # before --since
    ]
    s = [f"cs_test_{tag}{n}" for n in range(4)]
    processors.stripe = [
        _session(s[0]),
        _session(s[1], payment_status="unpaid"),
        _session(s[2], metadata={"package": "starter"}, amount_total=500),
        _session(s[3], status="open", payment_status="unpaid"),  # not listed: not complete
    ]
    with running(kind, tmp_path, env=_env(processors, smtp_port)) as server:
        # One sale reached the webhook: reconciliation must not fulfil it again.
        ping = {
            "seller_id": SELLER,
            "sale_id": g[0],
            "email": f"{g[0]}@example.com",
            "product_permalink": "https://x.gumroad.com/l/pro",
            "price": "2000",
            "order_number": "1",
        }
        answer = httpx.post(f"{server.base_url}/webhooks/gumroad/{TOKEN}", data=ping)
        assert answer.json()["created"] is True, answer.text
        assert set(_orders(server)) == {g[0]}

        # Gumroad fails on page 2 of 3: nothing of Gumroad's is fulfilled, exit status 1.
        processors.fail_on_page = 2
        status, reports = _reconcile(server, "--since", SINCE)
        assert status == 1
        assert "502" in reports["gumroad"]["error"]
        assert reports["gumroad"]["fulfilled"] == 0
        assert not any(sale.startswith("g") for sale in _orders(server) if sale != g[0])
        # Stripe answered: its run was independent.
        assert sorted(reports["stripe"]["fulfilled_sale_ids"]) == sorted([s[0], s[2]])
        assert reports["stripe"]["skipped"] == {"not paid": 1}

        processors.fail_on_page = None
        status, reports = _reconcile(server, "--since", SINCE)
        assert status == 0, reports
        gumroad = reports["gumroad"]
        assert gumroad["error"] is None
        assert gumroad["listed"] == 8  # three pages; the OLD sale is before --since
        assert sorted(gumroad["fulfilled_sale_ids"]) == sorted([g[5], g[7]])
        assert gumroad["already_fulfilled"] == 1
        assert gumroad["skipped"] == {"refunded": 1, "test": 1, "gift sender": 1, "disputed": 1}
        assert gumroad["unmatched_sale_ids"] == [g[2]]
        assert reports["stripe"]["fulfilled"] == 0
        assert reports["stripe"]["already_fulfilled"] == 2
        pages = [q for path, q in processors.requests if path == "/v2/sales"]
        assert [q.get("page_key") for q in pages[-3:]] == [None, ["k3"], ["k6"]]
        assert all(q["after"] == [SINCE] for q in pages)

        orders = _orders(server)
        assert orders[g[0]] == ("gumroad", 25, f"{g[0]}@example.com")
        assert orders[g[5]] == ("gumroad", 25, f"friend-{tag}@example.com")  # the recipient
        assert orders[g[7]] == ("gumroad", 50, f"{g[7]}@example.com")
        assert orders[s[0]] == ("stripe", 40, f"{s[0]}@example.com")
        assert orders[s[2]] == ("stripe", 5, f"{s[2]}@example.com")
        assert len(orders) == 5

        # Re-running changes nothing: no order, no unmatched record, no email.
        status, reports = _reconcile(server, "--since", SINCE)
        assert status == 0
        assert reports["gumroad"]["fulfilled"] == 0
        assert reports["gumroad"]["already_fulfilled"] == 3
        assert reports["gumroad"]["unmatched"] == 0
        assert reports["stripe"]["fulfilled"] == 0
        assert _orders(server) == orders

        box.wait_for(1)
        deadline = time.monotonic() + 20
        mine = {f"{g[0]}@example.com", f"friend-{tag}@example.com", f"{g[7]}@example.com"}
        mine |= {f"{s[0]}@example.com", f"{s[2]}@example.com"}
        while {m["To"] for m in box.messages} & mine != mine:
            assert time.monotonic() < deadline, "the fulfilled sales' emails did not arrive"
            time.sleep(0.1)
        assert server.wait_until_sent(mine) == {email: ["sent"] for email in mine}
        assert sum(1 for m in box.messages if m["To"] in mine) == 5
        assert not [m for m in box.messages if m["To"] == f"gifter-{tag}@example.com"]

        bad = server._run("reconcile", "--since", "yesterday")
        assert bad.returncode == 1
        assert json.loads(bad.stderr)["code"] == "invalid_input"
        later = (datetime.now(UTC) + timedelta(days=2)).date().isoformat()
        future = server._run("reconcile", "--since", later)
        assert future.returncode == 1


def test_a_gumroad_answer_that_is_not_json_is_gumroads_failure(processors: Processors) -> None:
    """A 200 answer that is not JSON is reported as Gumroad's error, like a 502."""
    processors.gumroad = [_gumroad_sale(f"t{n}") for n in range(5)]
    processors.text_on_page = 2
    source = GumroadSales(processors.base_url, ACCESS_TOKEN, builtin())
    since = date.fromisoformat(SINCE)
    listed = source.sales(since, datetime.now(UTC))
    with pytest.raises(ProcessorFailed, match="Gumroad answered something other than JSON"):
        list(listed)
    processors.text_on_page = None
    found = list(source.sales(since, datetime.now(UTC)))
    assert len(found) == 5


def test_the_worker_reconciles_on_its_schedule(
    tmp_path: Path, processors: Processors, inbox: tuple[Inbox, int]
) -> None:
    _, smtp_port = inbox
    sale = f"w{secrets.token_hex(3)}"
    today = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    processors.gumroad = [_gumroad_sale(sale, created_at=today)]
    env = _env(processors, smtp_port, TALLY_RECONCILE_INTERVAL_SECONDS="1")
    with running("sqlite", tmp_path, env=env) as server:
        deadline = time.monotonic() + 20
        while sale not in _orders(server) or '"event": "reconcile"' not in server.log_text():
            assert time.monotonic() < deadline, server.log_text()[-2000:]
            time.sleep(0.2)
    assert _orders(server)[sale][1] == 25
