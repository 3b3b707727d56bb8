"""The processors' lists of sales, for reconciliation: Gumroad's `GET /v2/sales` (paged by
`page_key`) and Stripe's completed Checkout Sessions (the official library, auto-paging). Each
listed sale is read the way its webhook reads it, so a sale fulfilled by reconciliation is the
order the webhook would have made."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from datetime import UTC, date, datetime, time
from typing import Any, Final

import httpx
import stripe

from tally.adapters import payments
from tally.config import Settings
from tally.domain.catalog import Catalog
from tally.domain.errors import InvalidInput, ProcessorFailed, ProcessorUnavailable
from tally.service.reconcile import Listed, SalesSource

HTTP_TIMEOUT_SECONDS: Final = 20.0
#: A run reads at most this many pages from one processor, so a listing that never ends
#: (a processor bug, a loop of page keys) ends here, as a failure.
MAX_PAGES: Final = 1_000
#: Stripe's largest page.
STRIPE_PAGE_SIZE: Final = 100


class GumroadSales:
    """`GET {base}/v2/sales?after=YYYY-MM-DD&access_token=...`, then each `next_page_key`.

    What it skips, and why: refunded or charged-back sales (nothing is owed; a refund ping
    handles an order that exists), a gift's sender purchase (the receiver's purchase, with
    the recipient's email, is the one that carries the code), unpaid sales and test sales
    (a creator's own test purchase is not a customer waiting for credits)."""

    processor = "gumroad"

    def __init__(self, base_url: str, access_token: str, catalog: Catalog) -> None:
        self.base_url = base_url.rstrip("/")
        self.access_token = access_token
        self.catalog = catalog

    def sales(self, since: date, now: datetime) -> Iterator[Listed]:
        try:
            yield from self._sales(since, now)
        except ProcessorUnavailable as error:
            raise ProcessorFailed(f"Gumroad: {error}"[:200]) from error

    def _sales(self, since: date, now: datetime) -> Iterator[Listed]:
        with httpx.Client(base_url=self.base_url, timeout=HTTP_TIMEOUT_SECONDS) as client:
            params: dict[str, str] = {
                "after": since.isoformat(),
                "access_token": self.access_token,
            }
            seen_keys: set[str] = set()
            for _ in range(MAX_PAGES):
                body = self._page(client, params)
                listed = body.get("sales")
                if not isinstance(listed, list):
                    raise ProcessorUnavailable("Gumroad's answer has no list of sales")
                for raw in listed:
                    if isinstance(raw, dict):
                        yield self._listed(raw, now)
                key = body.get("next_page_key")
                if not isinstance(key, str) or not key:
                    return
                if key in seen_keys:
                    raise ProcessorUnavailable("Gumroad repeated a page key")
                seen_keys.add(key)
                params = {**params, "page_key": key}
        raise ProcessorUnavailable(f"Gumroad listed more than {MAX_PAGES} pages")

    def _page(self, client: httpx.Client, params: dict[str, str]) -> dict[str, Any]:
        try:
            answer = client.get("/v2/sales", params=params)
        except httpx.TransportError as error:
            raise ProcessorUnavailable(f"Gumroad could not be reached: {error}"[:200]) from error
        if answer.status_code != 200:
            message = ""
            try:
                found = answer.json()
                if isinstance(found, dict):
                    message = str(found.get("message") or "")
            except ValueError:
                pass
            raise ProcessorUnavailable(
                f"Gumroad answered {answer.status_code} {message}".strip()[:200]
            )
        try:
            body = answer.json()
        except ValueError as error:  # JSONDecodeError, or bytes that are not text
            raise ProcessorUnavailable("Gumroad answered something other than JSON") from error
        if not isinstance(body, dict) or body.get("success") is not True:
            raise ProcessorUnavailable("Gumroad did not answer success")
        return body

    def _listed(self, raw: dict[str, Any], now: datetime) -> Listed:
        sale = payments.flatten(raw)
        sale_id = sale.get("id") or sale.get("sale_id") or ""
        if not sale_id:
            return Listed(sale_id="", skipped="no sale id", payload=raw)
        skipped = _gumroad_skip(sale)
        if skipped is not None:
            return Listed(sale_id=sale_id, skipped=skipped, payload=raw)
        # The sales API's names for what a ping calls sale_id, sale_timestamp, order_number.
        ping = {
            **sale,
            "sale_id": sale_id,
            "sale_timestamp": sale.get("created_at") or sale.get("timestamp") or "",
            "order_number": sale.get("order_id") or sale.get("order_number") or "",
        }
        package = payments.gumroad_package(self.catalog, ping)
        if package is None:
            return Listed(sale_id=sale_id, unmatched="no package for this product", payload=raw)
        try:
            found = payments.gumroad_sale(ping, package, processor=self.processor, now=now)
        except InvalidInput as error:  # no email, a quantity out of range
            return Listed(sale_id=sale_id, unmatched=str(error)[:200], payload=raw)
        return Listed(sale_id=sale_id, sale=found, payload=raw)


class StripeSales:
    """Completed Checkout Sessions created since the date, through the official library
    (`TALLY_STRIPE_API_BASE` overrides the host, as for the webhook's calls). A paid session
    becomes the sale the `checkout.session.completed` webhook would make; unpaid ones (an
    async payment still pending) are skipped until they are paid."""

    processor = "stripe"

    def __init__(self, api_key: str, api_base: str | None, catalog: Catalog) -> None:
        self.api_key = api_key
        self.api_base = api_base
        self.catalog = catalog

    def sales(self, since: date, now: datetime) -> Iterator[Listed]:
        client = stripe.StripeClient(
            self.api_key, base_addresses={"api": self.api_base} if self.api_base else None
        )
        created = int(datetime.combine(since, time(), UTC).timestamp())
        params: dict[str, Any] = {
            "status": "complete",
            "created": {"gte": created},
            "limit": STRIPE_PAGE_SIZE,
        }
        try:
            listed = client.checkout.sessions.list(params=params)  # type: ignore[arg-type]
            for count, session in enumerate(listed.auto_paging_iter()):
                if count >= MAX_PAGES * STRIPE_PAGE_SIZE:
                    raise ProcessorFailed("Stripe listed too many sessions")
                yield self._listed(session.to_dict(), now)
        except (stripe.StripeError, ProcessorUnavailable) as error:
            raise ProcessorFailed(f"Stripe: {error}"[:200]) from error

    def _listed(self, session: dict[str, Any], now: datetime) -> Listed:
        sale_id = str(session.get("id") or "")
        if session.get("payment_status") != "paid":
            return Listed(sale_id=sale_id, skipped="not paid", payload=session)
        items = payments.stripe_line_items(session, self.api_key, self.api_base)
        package = payments.stripe_package(self.catalog, session, [price for price, _ in items])
        if package is None:
            return Listed(sale_id=sale_id, unmatched="no package", payload=session)
        quantity = next((q for price, q in items if price == package.stripe_price_id), 1)
        try:
            found = payments.stripe_sale(session, package, quantity, now=now)
        except InvalidInput as error:
            return Listed(sale_id=sale_id, unmatched=str(error)[:200], payload=session)
        return Listed(sale_id=sale_id, sale=found, payload=session)


def _gumroad_skip(sale: Mapping[str, str]) -> str | None:
    """Why nothing is owed for this listed sale, if so (see GumroadSales)."""
    reasons = (
        ("refunded", _true(sale, "refunded")),
        ("disputed", _true(sale, "chargedback") or _true(sale, "disputed")),
        ("gift sender", _true(sale, "is_gift_sender_purchase")),
        ("unpaid", sale.get("paid", "true").strip().lower() == "false"),
        ("test", _true(sale, "test")),
    )
    return next((reason for reason, applies in reasons if applies), None)


def _true(sale: Mapping[str, str], name: str) -> bool:
    return sale.get(name, "").strip().lower() == "true"


def sources(settings: Settings, catalog: Catalog) -> list[SalesSource]:
    """The processors configured to be asked: Gumroad with an access token, Stripe with an
    API key, whatever TALLY_PAYMENTS says (a shop whose checkout is the sandbox may still
    receive Gumroad pings). The sandbox has nothing to fetch: its sales reach the webhook
    in-process."""
    found: list[SalesSource] = []
    if settings.gumroad_access_token:
        found.append(
            GumroadSales(settings.gumroad_api_base, settings.gumroad_access_token, catalog)
        )
    if settings.stripe_api_key:
        found.append(StripeSales(settings.stripe_api_key, settings.stripe_api_base, catalog))
    return found
