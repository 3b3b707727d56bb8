"""Refunds and disputes through a real server, against local stand-ins for the processors'
refund APIs in their documented formats: Gumroad `PUT /v2/sales/{id}/refund` answering
`{"success": ...}`, Stripe `POST /v1/refunds` answering refund or error objects; Gumroad
refund and dispute pings; Stripe `charge.refunded` and `charge.dispute.*` events, signed."""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest
import sqlalchemy as sa

from tally.adapters.refunds import GumroadRefunds, ProcessorRefunds, StripeRefunds
from tally.config import Settings
from tally.service.ports import RefundFailed, RefundRequest
from tests.conftest import DATABASES
from tests.e2e.fake_api import FakeApi, JsonHandler
from tests.e2e.server import Api, Server, ok, problem, running

TOKEN = "refunds-path-token"
SELLER = "seller-refunds"
ACCESS_TOKEN = "gumroad-refunds-token"
STRIPE_KEY = "sk_test_refunds"
STRIPE_SECRET = "whsec_refunds"


class Processors(FakeApi):
    """Gumroad's and Stripe's refund APIs on one local server; it records what it was asked.
    `gumroad_refusals` / `stripe_errors` make it answer the documented error shapes."""

    def __init__(self) -> None:
        self.requests: list[dict[str, Any]] = []
        self.gumroad_refusals: dict[str, tuple[int, str]] = {}
        self.gumroad_refunded: set[str] = set()  # sales Gumroad's API says are refunded
        self.stripe_errors: dict[str, tuple[int, dict[str, Any]]] = {}
        self.sessions: dict[str, str] = {}  # Checkout Session id -> payment intent
        outer = self

        class Handler(JsonHandler):
            def _record(self, method: str) -> tuple[str, dict[str, list[str]]]:
                url = urlsplit(self.path)
                length = int(self.headers.get("Content-Length", "0"))
                form = parse_qs(self.rfile.read(length).decode()) if length else {}
                form.update(parse_qs(url.query))
                outer.requests.append(
                    {
                        "method": method,
                        "path": url.path,
                        "form": form,
                        "idempotency_key": self.headers.get("Idempotency-Key"),
                        "authorization": self.headers.get("Authorization"),
                    }
                )
                return url.path, form

            def do_GET(self) -> None:
                path, _ = self._record("GET")
                if path.startswith("/v2/sales/"):  # the sale confirmation before fulfilment
                    sale_id = path.rsplit("/", 1)[-1]
                    refunded = sale_id in outer.gumroad_refunded
                    self._answer(
                        200, {"success": True, "sale": {"id": sale_id, "refunded": refunded}}
                    )
                elif path.startswith("/v1/checkout/sessions/"):
                    session = path.rsplit("/", 1)[-1]
                    intent = outer.sessions.get(session)
                    if intent is None:
                        self._stripe_error(404, "resource_missing", "No such checkout.session")
                    else:
                        self._answer(
                            200,
                            {"id": session, "object": "checkout.session", "payment_intent": intent},
                        )
                else:
                    self._answer(404, {"success": False, "message": "no such route"})

            def do_PUT(self) -> None:
                path, form = self._record("PUT")
                parts = path.split("/")
                if len(parts) != 5 or parts[1:3] != ["v2", "sales"] or parts[4] != "refund":
                    self._answer(404, {"success": False, "message": "no such route"})
                    return
                sale_id = parts[3]
                if form.get("access_token") != [ACCESS_TOKEN]:
                    self._answer(401, {"success": False, "message": "The access token is bad."})
                elif sale_id in outer.gumroad_refusals:
                    status, message = outer.gumroad_refusals[sale_id]
                    self._answer(status, {"success": False, "message": message})
                else:
                    self._answer(
                        200,
                        {"success": True, "sale": {"id": sale_id, "refunded": True}},
                    )

            def do_POST(self) -> None:
                path, form = self._record("POST")
                if path != "/v1/refunds":
                    self._stripe_error(404, "resource_missing", "Unrecognized request URL")
                    return
                if self.headers.get("Authorization") != f"Bearer {STRIPE_KEY}":
                    self._stripe_error(401, None, "Invalid API Key provided", "authentication")
                    return
                intent = form.get("payment_intent", [""])[0]
                if intent in outer.stripe_errors:
                    status, error = outer.stripe_errors[intent]
                    self._answer(status, {"error": error})
                    return
                self._answer(
                    200,
                    {
                        "id": f"re_{secrets.token_hex(4)}",
                        "object": "refund",
                        "amount": 2000,
                        "currency": "usd",
                        "payment_intent": intent,
                        "status": "succeeded",
                    },
                )

            def _stripe_error(
                self, status: int, code: str | None, message: str, kind: str = "invalid_request"
            ) -> None:
                self._answer(
                    status, {"error": {"type": f"{kind}_error", "code": code, "message": message}}
                )

        super().__init__(Handler)

    def asked(self, method: str, path: str) -> list[dict[str, Any]]:
        return [r for r in self.requests if (r["method"], r["path"]) == (method, path)]


@pytest.fixture(scope="module")
def processors() -> Iterator[Processors]:
    fake = Processors()
    try:
        yield fake
    finally:
        fake.close()


@pytest.fixture(scope="module", params=DATABASES)
def shop(
    request: pytest.FixtureRequest,
    processors: Processors,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Server]:
    env = {
        "TALLY_SECRET_KEY": "refunds-secret",
        "TALLY_PAYMENTS": "gumroad",
        "TALLY_GUMROAD_WEBHOOK_TOKEN": TOKEN,
        "TALLY_GUMROAD_SELLER_ID": SELLER,
        "TALLY_GUMROAD_ACCESS_TOKEN": ACCESS_TOKEN,
        "TALLY_GUMROAD_API_BASE": processors.base_url,
        "TALLY_STRIPE_WEBHOOK_SECRET": STRIPE_SECRET,
        "TALLY_STRIPE_API_KEY": STRIPE_KEY,
        "TALLY_STRIPE_API_BASE": processors.base_url,
    }
    directory: Path = tmp_path_factory.mktemp("refunds")
    with running(request.param, directory, env=env) as server:
        yield server


@pytest.fixture(scope="module")
def support(shop: Server) -> Iterator[Api]:
    api = Api(shop, shop.key("refunds-support", "read,spend,support"))
    try:
        yield api
    finally:
        api.close()


# --- helpers -------------------------------------------------------------------------------------


def _now() -> str:
    return datetime.now(UTC).isoformat().replace("+00:00", "Z")


def _ping(sale_id: str, resource: str = "sale", **fields: str) -> dict[str, str]:
    return {
        "seller_id": SELLER,
        "sale_id": sale_id,
        "sale_timestamp": _now(),
        "order_number": sale_id,
        "product_permalink": "https://x.gumroad.com/l/pro",
        "email": f"{sale_id}@example.com",
        "price": "2000",
        "currency": "usd",
        "quantity": "1",
        "resource_name": resource,
        **fields,
    }


def _gumroad(shop: Server, sale_id: str, resource: str = "sale") -> httpx.Response:
    return httpx.post(f"{shop.base_url}/webhooks/gumroad/{TOKEN}", data=_ping(sale_id, resource))


def _sell(shop: Server) -> tuple[str, str]:
    """A Gumroad sale: (sale id, order id)."""
    sale = f"g{secrets.token_hex(5)}"
    answer = ok(_gumroad(shop, sale))
    return sale, str(answer["order_id"])


def _stripe(shop: Server, event: dict[str, Any], secret: str = STRIPE_SECRET) -> httpx.Response:
    """An event signed as Stripe documents it: HMAC-SHA256 of `timestamp.payload`."""
    body = json.dumps(event)
    stamp = int(time.time())
    mac = hmac.new(secret.encode(), f"{stamp}.{body}".encode(), hashlib.sha256).hexdigest()
    return httpx.post(
        f"{shop.base_url}/webhooks/stripe",
        content=body,
        headers={"Stripe-Signature": f"t={stamp},v1={mac}"},
    )


def _event(kind: str, data: dict[str, Any]) -> dict[str, Any]:
    return {
        "id": f"evt_{secrets.token_hex(6)}",
        "object": "event",
        "type": kind,
        "data": {"object": data},
    }


def _session(session_id: str, intent: str) -> dict[str, Any]:
    return _event(
        "checkout.session.completed",
        {
            "id": session_id,
            "object": "checkout.session",
            "payment_status": "paid",
            "payment_intent": intent,
            "amount_total": 2000,
            "currency": "usd",
            "created": int(time.time()),
            "livemode": False,
            "customer_details": {"email": f"{session_id}@example.com"},
            "metadata": {"package": "pro"},
            "line_items": {
                "object": "list",
                "data": [{"price": {"id": "price_pro"}, "quantity": 1}],
            },
        },
    )


def _charge(intent: str, refunded: int) -> dict[str, Any]:
    return _event(
        "charge.refunded",
        {
            "id": f"ch_{intent}",
            "object": "charge",
            "amount": 2000,
            "amount_refunded": refunded,
            "payment_intent": intent,
            "refunded": refunded == 2000,
        },
    )


def _dispute(kind: str, intent: str, dispute_id: str, status: str) -> dict[str, Any]:
    return _event(
        kind,
        {
            "id": dispute_id,
            "object": "dispute",
            "amount": 2000,
            "charge": f"ch_{intent}",
            "payment_intent": intent,
            "status": status,
        },
    )


def _row(shop: Server, sql: str, **params: Any) -> Any:
    engine = sa.create_engine(shop.url)
    try:
        with engine.connect() as connection:
            return connection.execute(sa.text(sql), params).first()
    finally:
        engine.dispose()


def _order(shop: Server, order_id: str) -> Any:
    return _row(
        shop,
        "SELECT status, credits_taken, credits_owed, refunded_amount, payment_ref "
        "FROM orders WHERE order_id = :id",
        id=order_id,
    )


def _codes(shop: Server, order_id: str) -> list[str]:
    engine = sa.create_engine(shop.url)
    try:
        with engine.connect() as connection:
            rows = connection.execute(
                sa.text("SELECT status FROM codes WHERE order_id = :id ORDER BY created_at"),
                {"id": order_id},
            )
            return [row[0] for row in rows]
    finally:
        engine.dispose()


def _code(shop: Server, order_id: str) -> str:
    found = _row(
        shop,
        "SELECT context FROM outbox WHERE order_id = :id AND template <> 'refund' "
        "ORDER BY created_at DESC",
        id=order_id,
    )
    context = found[0] if isinstance(found[0], dict) else json.loads(found[0])
    return str(context["code"])


def _refunds_emailed(shop: Server, order_id: str) -> int:
    found = _row(
        shop,
        "SELECT count(*) FROM outbox WHERE order_id = :id AND template = 'refund'",
        id=order_id,
    )
    return int(found[0])


# --- support refunds over HTTP -------------------------------------------------------------------


def test_a_support_refund_calls_gumroad_then_voids_the_code(
    shop: Server, support: Api, processors: Processors
) -> None:
    sale, order_id = _sell(shop)
    path = f"/v1/orders/{order_id}/refund"
    first = support.post(path, {"reason": "asked by email"}, idempotency_key=f"rf-{sale}")
    order = ok(first)
    assert first.headers.get("Idempotent-Replayed") is None
    assert (order["id"], order["status"], order["credits_taken"]) == (order_id, "refunded", 25)
    assert order["refund_reason"] == "asked by email"
    (call,) = processors.asked("PUT", f"/v2/sales/{sale}/refund")
    assert call["form"]["access_token"] == [ACCESS_TOKEN]
    assert _codes(shop, order_id) == ["void"]
    assert _refunds_emailed(shop, order_id) == 1

    replay = support.post(path, {"reason": "asked by email"}, idempotency_key=f"rf-{sale}")
    assert ok(replay) == order
    assert replay.headers["Idempotent-Replayed"] == "true"
    problem(
        support.post(path, {"reason": "again"}, idempotency_key=f"rf2-{sale}"),
        409,
        "already_refunded",
    )
    assert len(processors.asked("PUT", f"/v2/sales/{sale}/refund")) == 1

    redeemed = support.post(
        "/v1/redemptions", {"code": _code(shop, order_id), "account_id": f"acct-{sale}"}
    )
    problem(redeemed, 422, "code_invalid_or_used")


def test_bad_refund_requests_are_refused(shop: Server, support: Api) -> None:
    _, order_id = _sell(shop)
    path = f"/v1/orders/{order_id}/refund"
    problem(
        support.post(path, {"reason": "x"}, idempotency_key=""), 400, "idempotency_key_required"
    )
    problem(support.post(path, {}), 422, "invalid_input")
    problem(support.post(path, {"reason": ""}), 422, "invalid_input")
    problem(support.post(path, {"reason": "x" * 501}), 422, "invalid_input")
    problem(support.post(path, {"reason": "x", "note": 5}), 422, "invalid_input")
    problem(support.post(path, [1, 2]), 422, "invalid_input")
    problem(support.post("/v1/orders/ord_nothing/refund", {"reason": "x"}), 404, "order_not_found")
    for junk in ("ord_%00", "%E2%80%8B", "x" * 64):
        problem(support.post(f"/v1/orders/{junk}/refund", {"reason": "x"}), 404, "order_not_found")
    spender = Api(shop, shop.key("refunds-spender", "read,spend"))
    try:
        problem(spender.post(path, {"reason": "x"}), 403, "scope_missing")
    finally:
        spender.close()
    assert _order(shop, order_id).status == "fulfilled"


def test_spent_credits_refuse_the_refund(shop: Server, support: Api) -> None:
    sale, order_id = _sell(shop)
    account = f"acct-{sale}"
    ok(support.post("/v1/redemptions", {"code": _code(shop, order_id), "account_id": account}), 201)
    ok(support.post(f"/v1/accounts/{account}/debits", {"amount": 1}), 201)
    refused = problem(
        support.post(f"/v1/orders/{order_id}/refund", {"reason": "x"}), 409, "credits_used"
    )
    assert refused["lot_id"].startswith("lot_")


def test_a_gumroad_refusal_is_a_502_that_changes_nothing(
    shop: Server, support: Api, processors: Processors
) -> None:
    sale, order_id = _sell(shop)
    processors.gumroad_refusals[sale] = (404, "The sale was unable to be modified.")
    try:
        failed = problem(
            support.post(f"/v1/orders/{order_id}/refund", {"reason": "x"}), 502, "processor_failed"
        )
    finally:
        del processors.gumroad_refusals[sale]
    assert "The sale was unable to be modified." in failed["detail"]
    assert failed["order_id"] == order_id
    assert _order(shop, order_id).status == "fulfilled"
    assert _codes(shop, order_id) == ["issued"]
    assert _refunds_emailed(shop, order_id) == 0
    account = f"acct-{sale}"
    lot = ok(
        support.post("/v1/redemptions", {"code": _code(shop, order_id), "account_id": account}),
        201,
    )
    assert lot["amount"] == 25, "the code still works"


def test_a_stripe_order_is_refunded_through_its_payment_intent(
    shop: Server, support: Api, processors: Processors
) -> None:
    session, intent = f"cs_{secrets.token_hex(4)}", f"pi_{secrets.token_hex(4)}"
    order_id = ok(_stripe(shop, _session(session, intent)))["order_id"]
    assert _order(shop, order_id).payment_ref == intent
    processors.stripe_errors[intent] = (
        400,
        {
            "type": "invalid_request_error",
            "code": "charge_already_refunded",
            "message": "Charge ch_1 has already been refunded.",
        },
    )
    try:
        failed = problem(
            support.post(f"/v1/orders/{order_id}/refund", {"reason": "x"}), 502, "processor_failed"
        )
    finally:
        del processors.stripe_errors[intent]
    assert "Charge ch_1 has already been refunded." in failed["detail"]
    assert _order(shop, order_id).status == "fulfilled"

    refunded = ok(support.post(f"/v1/orders/{order_id}/refund", {"reason": "duplicate purchase"}))
    assert refunded["status"] == "refunded"
    calls = processors.asked("POST", "/v1/refunds")
    mine = [c for c in calls if c["form"]["payment_intent"] == [intent]]
    assert len(mine) == 2
    assert {c["idempotency_key"] for c in mine} == {f"tally-refund-{order_id}"}
    assert mine[-1]["authorization"] == f"Bearer {STRIPE_KEY}"
    # Stripe then reports the refund it made: nothing more happens.
    assert ok(_stripe(shop, _charge(intent, 2000)))["event"] == "applied"
    assert _refunds_emailed(shop, order_id) == 1


def test_the_cli_refunds_an_order(shop: Server, processors: Processors) -> None:
    sale, order_id = _sell(shop)
    printed = json.loads(shop.cli("refund", order_id, "--reason", "from the terminal"))
    assert (printed["status"], printed["refund_reason"]) == ("refunded", "from the terminal")
    assert processors.asked("PUT", f"/v2/sales/{sale}/refund")
    done = shop._run("refund", order_id, "--reason", "twice")
    assert done.returncode == 1
    assert json.loads(done.stderr)["code"] == "already_refunded"


# --- processor-side refunds and disputes ---------------------------------------------------


def _events(shop: Server, sale_id: str) -> int:
    return shop.count("SELECT count(*) FROM processor_events WHERE sale_id = :s", s=sale_id)


def test_forged_refund_and_dispute_pings_leave_a_live_order_alone(
    shop: Server, support: Api
) -> None:
    """Against an order whose credits are in use: were any forgery accepted, the order would
    turn refunded or disputed and the account would lose its credits."""
    sale, order_id = _sell(shop)
    account = f"acct-{sale}"
    ok(support.post("/v1/redemptions", {"code": _code(shop, order_id), "account_id": account}), 201)
    ok(support.post(f"/v1/accounts/{account}/debits", {"amount": 5}), 201)
    url = f"{shop.base_url}/webhooks/gumroad"
    for resource in ("refund", "dispute"):
        forged = [
            httpx.post(f"{url}/guess", data=_ping(sale, resource)),
            httpx.post(f"{url}/{TOKEN}", data=_ping(sale, resource, seller_id="x")),
            httpx.post(f"{url}/{TOKEN}", data={**_ping(sale, resource), "seller_id": ""}),
        ]
        assert [r.status_code for r in forged] == [404, 404, 404]
    intent = f"pi_{secrets.token_hex(4)}"
    problem(_stripe(shop, _charge(intent, 2000), secret="whsec_wrong"), 400, "signature_invalid")

    order = _order(shop, order_id)
    assert (order.status, order.credits_taken, order.credits_owed) == ("fulfilled", 0, 0)
    assert _codes(shop, order_id) == ["redeemed"]
    assert _events(shop, sale) == 0
    assert shop.count("SELECT count(*) FROM processor_events WHERE payment_ref = :p", p=intent) == 0
    assert _refunds_emailed(shop, order_id) == 0
    balance = ok(support.get(f"/v1/accounts/{account}/balance"))
    assert (balance["available"], balance["debt"]) == (20, 0)
    # The genuine ping still works afterwards: the forgeries left no "duplicate" behind.
    assert ok(_gumroad(shop, sale, "refund"))["event"] == "applied"
    assert _order(shop, order_id).status == "refunded"


def test_gumroad_refund_and_dispute_pings(shop: Server, support: Api) -> None:
    sale, order_id = _sell(shop)
    account = f"acct-{sale}"
    ok(support.post("/v1/redemptions", {"code": _code(shop, order_id), "account_id": account}), 201)
    ok(support.post(f"/v1/accounts/{account}/debits", {"amount": 5}), 201)

    assert ok(_gumroad(shop, sale, "dispute"))["event"] == "applied"
    assert ok(_gumroad(shop, sale, "dispute"))["event"] == "duplicate"
    balance = ok(support.get(f"/v1/accounts/{account}/balance"))
    assert (balance["available"], balance["debt"]) == (0, 5)
    assert _order(shop, order_id).status == "disputed"

    assert ok(_gumroad(shop, sale, "dispute_won"))["event"] == "applied"
    balance = ok(support.get(f"/v1/accounts/{account}/balance"))
    assert (balance["available"], balance["debt"]) == (20, 0)
    assert _order(shop, order_id).status == "fulfilled"

    assert ok(_gumroad(shop, sale, "refund"))["event"] == "applied"
    assert _order(shop, order_id).status == "refunded"
    assert _events(shop, sale) == 3


def _check(shop: Server) -> None:
    """The real `tally check` on the server's database: exit 0, conservation holds."""
    done = shop._run("check")
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.startswith("ok: conservation holds"), done.stdout


def test_a_chargeback_after_spending_leaves_debt_and_tally_check_holds_throughout(
    shop: Server, support: Api
) -> None:
    """Pro (25), 7 spent, charged back: 18 voided, 7 owed; Popular (10) repays the debt
    first: 3 left. Then the same after a won dispute and a refund: the restored credits are
    taken back too. `tally check` proves conservation after every step."""
    sale, order_id = _sell(shop)
    account = f"acct-{sale}"
    ok(support.post("/v1/redemptions", {"code": _code(shop, order_id), "account_id": account}), 201)
    ok(support.post(f"/v1/accounts/{account}/debits", {"amount": 7}), 201)
    _check(shop)
    assert ok(_gumroad(shop, sale, "dispute"))["event"] == "applied"
    balance = ok(support.get(f"/v1/accounts/{account}/balance"))
    assert (balance["available"], balance["debt"]) == (0, 7)
    _check(shop)
    popular = f"g{secrets.token_hex(5)}"
    ping = _ping(popular, product_permalink="https://x.gumroad.com/l/popular", price="1000")
    ping["email"] = f"{sale}@example.com"
    second = ok(httpx.post(f"{shop.base_url}/webhooks/gumroad/{TOKEN}", data=ping))["order_id"]
    ok(support.post("/v1/redemptions", {"code": _code(shop, second), "account_id": account}), 201)
    balance = ok(support.get(f"/v1/accounts/{account}/balance"))
    assert (balance["available"], balance["debt"]) == (3, 0)
    _check(shop)
    # Won: the 18 and the 7 repaid since come back; a refund afterwards takes all 25 back.
    assert ok(_gumroad(shop, sale, "dispute_won"))["event"] == "applied"
    balance = ok(support.get(f"/v1/accounts/{account}/balance"))
    assert (balance["available"], balance["debt"]) == (28, 0)
    _check(shop)
    assert ok(_gumroad(shop, sale, "refund"))["event"] == "applied"
    balance = ok(support.get(f"/v1/accounts/{account}/balance"))
    assert (balance["available"], balance["debt"]) == (3, 0)
    _check(shop)


def test_gumroad_partial_refund_pings_take_credits_in_proportion(shop: Server) -> None:
    sale, order_id = _sell(shop)
    url = f"{shop.base_url}/webhooks/gumroad/{TOKEN}"
    partial = _ping(
        sale, "refund", partially_refunded="true", refunded="false", amount_refunded_in_cents="1000"
    )
    assert ok(httpx.post(url, data=partial))["event"] == "applied"
    assert ok(httpx.post(url, data=partial))["event"] == "duplicate"
    order = _order(shop, order_id)
    assert (order.status, order.credits_taken, order.refunded_amount) == ("fulfilled", 13, 1000)
    vague = _ping(sale, "refund", partially_refunded="true", refunded="false")
    problem(httpx.post(url, data=vague), 422, "invalid_input")
    assert ok(_gumroad(shop, sale, "refund"))["event"] == "applied"
    assert _order(shop, order_id).status == "refunded"
    assert _codes(shop, order_id) == ["void"]


def test_a_gumroad_refund_before_its_sale_means_no_code_is_sent(shop: Server) -> None:
    sale = f"g{secrets.token_hex(5)}"
    assert ok(_gumroad(shop, sale, "refund"))["event"] == "pending"
    order_id = ok(_gumroad(shop, sale))["order_id"]
    assert _order(shop, order_id).status == "refunded"
    assert _codes(shop, order_id) == []


def test_stripe_charge_refunded_and_disputes(shop: Server, support: Api) -> None:
    session, intent = f"cs_{secrets.token_hex(4)}", f"pi_{secrets.token_hex(4)}"
    # The partial refund arrives before the session: kept, then applied at fulfilment.
    assert ok(_stripe(shop, _charge(intent, 1000)))["event"] == "pending"
    order_id = ok(_stripe(shop, _session(session, intent)))["order_id"]
    order = _order(shop, order_id)
    assert (order.status, order.credits_taken, order.refunded_amount) == ("fulfilled", 13, 1000)
    account = f"acct-{session}"
    lot = ok(
        support.post("/v1/redemptions", {"code": _code(shop, order_id), "account_id": account}),
        201,
    )
    assert lot["amount"] == 12

    dispute_id = f"dp_{secrets.token_hex(4)}"
    created = _dispute("charge.dispute.created", intent, dispute_id, "needs_response")
    assert ok(_stripe(shop, created))["event"] == "applied"
    assert ok(_stripe(shop, created))["event"] == "duplicate"
    assert _order(shop, order_id).status == "disputed"
    assert ok(support.get(f"/v1/accounts/{account}/balance"))["available"] == 0
    won = _dispute("charge.dispute.closed", intent, dispute_id, "won")
    assert ok(_stripe(shop, won))["event"] == "applied"
    assert _order(shop, order_id).status == "fulfilled"
    assert ok(support.get(f"/v1/accounts/{account}/balance"))["available"] == 12

    bad = _stripe(shop, _charge(intent, 2000), secret="whsec_wrong")
    problem(bad, 400, "signature_invalid")
    assert _order(shop, order_id).status == "fulfilled"
    no_intent = _charge(intent, 2000)
    no_intent["data"]["object"]["payment_intent"] = None
    assert ok(_stripe(shop, no_intent))["ignored"] == "no payment intent"
    negative = _charge(intent, -5)
    problem(_stripe(shop, negative), 400, "event_malformed")


# --- the adapters against the processors' documented answers ------------------------------------


def _request(processor: str, sale_id: str = "s1", payment_ref: str | None = None) -> RefundRequest:
    return RefundRequest(
        processor=processor,
        sale_id=sale_id,
        payment_ref=payment_ref,
        amount=2000,
        currency="USD",
        idempotency_key=f"tally-refund-{sale_id}",
    )


def test_the_gumroad_adapter_reads_gumroad_answers(processors: Processors) -> None:
    gumroad = GumroadRefunds(processors.base_url, ACCESS_TOKEN)
    assert gumroad.refund(_request("gumroad", "ok-sale")) == "gumroad:ok-sale"
    processors.gumroad_refusals["refused"] = (404, "The sale was unable to be modified.")
    with pytest.raises(RefundFailed, match="unable to be modified"):
        gumroad.refund(_request("gumroad", "refused"))
    with pytest.raises(RefundFailed, match="access token is bad"):
        GumroadRefunds(processors.base_url, "wrong").refund(_request("gumroad"))
    with pytest.raises(RefundFailed, match="ACCESS_TOKEN"):
        GumroadRefunds(processors.base_url, None).refund(_request("gumroad"))
    with pytest.raises(RefundFailed, match="could not be reached"):
        GumroadRefunds("http://127.0.0.1:9", ACCESS_TOKEN).refund(_request("gumroad"))


def test_a_gumroad_refusal_of_a_sale_already_refunded_is_a_refund(
    processors: Processors,
) -> None:
    """A retry after Tally failed to record a refund Gumroad made (or one the seller made in
    Gumroad) is refused by Gumroad; the sale says it is refunded, so the refund stands."""
    gumroad = GumroadRefunds(processors.base_url, ACCESS_TOKEN)
    processors.gumroad_refusals["done-before"] = (404, "The sale was unable to be modified.")
    processors.gumroad_refunded.add("done-before")
    assert gumroad.refund(_request("gumroad", "done-before")) == "gumroad:done-before"
    assert processors.asked("GET", "/v2/sales/done-before")
    processors.gumroad_refunded.discard("done-before")  # refused and not refunded: a failure
    with pytest.raises(RefundFailed, match="unable to be modified"):
        gumroad.refund(_request("gumroad", "done-before"))


def test_the_gumroad_adapter_quotes_the_sale_id(processors: Processors) -> None:
    """A sale id is one path segment, whatever it holds (Gumroad's ids can end in `==`)."""
    gumroad = GumroadRefunds(processors.base_url, ACCESS_TOKEN)
    sale_id = "a/../b?c=d#e f=="
    assert gumroad.refund(_request("gumroad", sale_id)) == f"gumroad:{sale_id}"
    (asked,) = processors.asked("PUT", "/v2/sales/a%2F..%2Fb%3Fc%3Dd%23e%20f%3D%3D/refund")
    assert asked["form"]["access_token"] == [ACCESS_TOKEN]


def test_the_stripe_adapter_reads_stripe_answers(processors: Processors) -> None:
    stripe_refunds = StripeRefunds(STRIPE_KEY, processors.base_url)
    assert stripe_refunds.refund(_request("stripe", payment_ref="pi_ok")).startswith("re_")
    processors.sessions["cs_old"] = "pi_old"  # an order from before payment intents were kept
    assert stripe_refunds.refund(_request("stripe", "cs_old")).startswith("re_")
    assert processors.asked("GET", "/v1/checkout/sessions/cs_old")
    processors.stripe_errors["pi_declined"] = (
        402,
        {"type": "card_error", "code": "expired_card", "message": "The card has expired."},
    )
    with pytest.raises(RefundFailed, match="The card has expired"):
        stripe_refunds.refund(_request("stripe", payment_ref="pi_declined"))
    processors.stripe_errors["pi_down"] = (
        500,
        {"type": "api_error", "message": "Something went wrong on Stripe's end."},
    )
    before = len(processors.asked("POST", "/v1/refunds"))
    with pytest.raises(RefundFailed, match="Something went wrong"):
        stripe_refunds.refund(_request("stripe", payment_ref="pi_down"))
    retried = processors.asked("POST", "/v1/refunds")[before:]
    assert len(retried) == 3, "two retries, under one idempotency key"
    assert {r["idempotency_key"] for r in retried} == {"tally-refund-s1"}
    with pytest.raises(RefundFailed, match="Invalid API Key"):
        StripeRefunds("sk_test_wrong", processors.base_url).refund(
            _request("stripe", payment_ref="pi_ok")
        )
    with pytest.raises(RefundFailed, match=r"No such checkout\.session"):
        stripe_refunds.refund(_request("stripe", "cs_unknown"))
    with pytest.raises(RefundFailed, match="API_KEY"):
        StripeRefunds(None, processors.base_url).refund(_request("stripe", payment_ref="pi_ok"))


def test_sandbox_orders_refund_locally() -> None:
    gateway = ProcessorRefunds(Settings())
    assert gateway.refund(_request("sandbox", "sandbox-1")) == "sandbox:sandbox-1"
    with pytest.raises(RefundFailed, match="no refunds"):
        gateway.refund(_request("paypal"))
