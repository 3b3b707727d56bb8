"""Payment processors: reading Gumroad pings and Stripe events into sales, and asking the
processors' APIs what they know. Formats are the processors' documented ones."""

from __future__ import annotations

import hmac
import json
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any, Final

import httpx
import stripe

from tally.domain.catalog import Catalog, Package
from tally.domain.commerce import Sale
from tally.domain.errors import (
    EventMalformed,
    InvalidInput,
    InvalidTime,
    ProcessorUnavailable,
    SignatureInvalid,
)
from tally.domain.values import in_time_range, time_from_epoch

HTTP_TIMEOUT_SECONDS: Final = 10.0
STRIPE_TOLERANCE_SECONDS: Final = 300
#: The longest event id kept with a malformed event (the column holding sale ids).
STRIPE_ID_MAX_LENGTH: Final = 128


def _true(value: object) -> bool:
    return str(value).strip().lower() == "true"


def _time(value: object, default: datetime) -> datetime:
    if not isinstance(value, str) or not value:
        return default
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
        aware = parsed.replace(tzinfo=UTC) if parsed.tzinfo is None else parsed.astimezone(UTC)
        return in_time_range(aware)
    except (ValueError, OverflowError, InvalidTime):  # year 1 or 9999 overflow in UTC
        return default


#: Digits in a whole number a ping may carry: 2^53 has 16.
_INT_DIGITS: Final = 16


def ping_number(ping: Mapping[str, str], name: str, default: int | None = None) -> int:
    """A ping's whole number: `default` when absent; else ASCII digits only (`int()` fails on
    a superscript digit and reads Arabic-Indic ones), or InvalidInput: kept, never guessed."""
    text = (ping.get(name) or "").strip()
    if not text and default is not None:
        return default
    if not (text.isascii() and text.isdigit() and len(text) <= _INT_DIGITS):
        raise InvalidInput(f"the ping's {name} is not a whole number")
    return int(text)


def matches_secret(given: str, expected: str) -> bool:
    """Constant-time comparison; an unset secret matches nothing."""
    return bool(expected) and hmac.compare_digest(given.encode(), expected.encode())


# --- Gumroad --------------------------------------------------------------------------------------


def gumroad_package(catalog: Catalog, ping: Mapping[str, str]) -> Package | None:
    """The package a ping is for: its `product_permalink` ends in `/l/<permalink>` (or is the
    short permalink itself, as the sales API answers), or its `product_id` is the package's."""
    permalink = (ping.get("product_permalink") or "").rstrip("/")
    product_id = ping.get("product_id") or ""
    for package in catalog.packages.values():
        wanted = package.gumroad_permalink
        if wanted and (permalink == wanted or permalink.endswith(f"/l/{wanted}")):
            return package
        if package.gumroad_product_id and product_id == package.gumroad_product_id:
            return package
    return None


def gumroad_sale(
    ping: Mapping[str, str], package: Package, *, processor: str, now: datetime
) -> Sale:
    """A sale from a ping (every value a string, as Gumroad sends them)."""
    sale_id = ping.get("sale_id") or ""
    email = (ping.get("email") or "").strip()
    gifter = (ping.get("gifter_email") or "").strip() or None
    is_gift = _true(ping.get("is_gift_receiver_purchase"))
    return Sale(
        processor=processor,
        sale_id=sale_id,
        package=package,
        email=email,
        purchased_at=_time(ping.get("sale_timestamp"), now),
        quantity=max(1, ping_number(ping, "quantity", 1)),
        price=ping_number(ping, "price", 0),
        currency=(ping.get("currency") or "usd").upper()[:3],
        order_number=ping.get("order_number") or None,
        gifter_email=gifter if is_gift else None,
        is_test=_true(ping.get("test")),
    )


def flatten(form: Mapping[str, Any]) -> dict[str, str]:
    """A ping's fields as strings (JSON pings may carry numbers or booleans)."""
    flat: dict[str, str] = {}
    for name, value in form.items():
        if isinstance(value, bool):
            flat[str(name)] = "true" if value else "false"
        elif value is None:
            flat[str(name)] = ""
        elif isinstance(value, str | int | float):
            flat[str(name)] = str(value)
    return flat


class GumroadApi:
    """`GET /v2/sales/{id}`: the sale as Gumroad knows it, to confirm a ping before fulfilling."""

    def __init__(self, base_url: str, access_token: str) -> None:
        self.base_url = base_url.rstrip("/")
        self.access_token = access_token

    def sale(self, sale_id: str) -> dict[str, str] | None:
        try:
            answer = httpx.get(
                f"{self.base_url}/v2/sales/{sale_id}",
                params={"access_token": self.access_token},
                timeout=HTTP_TIMEOUT_SECONDS,
            )
        except httpx.TransportError as error:
            raise ProcessorUnavailable(str(error)[:200]) from error
        if answer.status_code == 404:
            return None
        if answer.status_code >= 500 or answer.status_code == 429:
            raise ProcessorUnavailable(f"Gumroad answered {answer.status_code}")
        try:
            body = answer.json()
        except ValueError as error:
            raise ProcessorUnavailable("Gumroad answered something other than JSON") from error
        if not isinstance(body, dict) or not body.get("success") or "sale" not in body:
            return None
        sale = body["sale"]
        return flatten(sale) if isinstance(sale, dict) else None


# --- Stripe ---------------------------------------------------------------------------------------


def stripe_event(payload: bytes, signature: str | None, secret: str) -> dict[str, Any]:
    """The verified event as plain JSON. SignatureInvalid for a wrong, stale or missing
    signature (the official library checks it and its age); EventMalformed for a signed event
    that is not one in Stripe's documented shape: an object with string `id` and `type`,
    `created` (if given) in seconds, and `data.object` an object with a string `id`."""
    if not secret:
        raise SignatureInvalid("Stripe webhooks are not configured")
    try:
        stripe.WebhookSignature.verify_header(
            payload, signature, secret, tolerance=STRIPE_TOLERANCE_SECONDS
        )
    except (ValueError, stripe.SignatureVerificationError) as error:
        raise SignatureInvalid("the Stripe-Signature does not verify") from error
    try:
        event = json.loads(payload)  # plain JSON reads like the documented format
    except ValueError as error:
        raise EventMalformed("the event is not JSON") from error
    if not isinstance(event, dict):
        raise EventMalformed("the event is not a JSON object")
    for name in ("id", "type"):
        if not isinstance(event.get(name), str) or not event[name]:
            raise EventMalformed(f"the event has no {name}")
    if "created" in event:
        _stripe_time(event["created"], "the event's created")
    data = event.get("data")
    found = data.get("object") if isinstance(data, dict) else None
    if not isinstance(found, dict):
        raise EventMalformed("the event's data.object is not an object")
    if not isinstance(found.get("id"), str):
        raise EventMalformed("the event's data.object has no id")
    return event


def stripe_kept(payload: bytes) -> tuple[str | None, object]:
    """What support keeps of a signed but malformed event: its id (if it names one) and
    its body, as JSON when it is JSON."""
    try:
        body: object = json.loads(payload)
    except ValueError:
        return None, {"body": payload.decode("utf-8", "replace")}
    named = body.get("id") if isinstance(body, dict) else None
    return (named[:STRIPE_ID_MAX_LENGTH] if isinstance(named, str) else None), body


def _stripe_time(value: object, what: str) -> datetime:
    try:
        return time_from_epoch(value, field=what)
    except InvalidTime as error:
        raise EventMalformed(error.detail) from error


def _stripe_count(value: object, what: str, *, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise EventMalformed(f"{what} must be a whole number of at least {minimum}")
    return value


def stripe_package(
    catalog: Catalog, session: Mapping[str, Any], prices: list[str]
) -> Package | None:
    metadata = session.get("metadata") or {}
    named = metadata.get("package") if isinstance(metadata, Mapping) else None
    if isinstance(named, str) and named in catalog.packages:
        return catalog.packages[named]
    for package in catalog.packages.values():
        if package.stripe_price_id and package.stripe_price_id in prices:
            return package
    return None


def stripe_sale(
    session: Mapping[str, Any], package: Package, quantity: int, *, now: datetime
) -> Sale:
    details = session.get("customer_details") or {}
    buyer = (details.get("email") if isinstance(details, Mapping) else None) or session.get(
        "customer_email"
    )
    metadata = session.get("metadata") or {}
    gift = metadata.get("gift_email") if isinstance(metadata, Mapping) else None
    created = session.get("created")
    amount = session.get("amount_total")
    return Sale(
        processor="stripe",
        sale_id=str(session.get("id") or ""),
        package=package,
        email=str(gift or buyer or ""),
        purchased_at=now if created is None else _stripe_time(created, "the session's created"),
        quantity=max(1, quantity),
        price=0 if amount is None else _stripe_count(amount, "amount_total", minimum=0),
        currency=str(session.get("currency") or "usd").upper()[:3],
        order_number=str(session.get("id") or ""),
        gifter_email=str(buyer) if gift and buyer else None,
        is_test=not bool(session.get("livemode", False)),
        # Charges, refunds and disputes name the payment intent, not the session.
        payment_ref=intent if isinstance(intent := session.get("payment_intent"), str) else None,
    )


def stripe_line_items(
    session: Mapping[str, Any], api_key: str | None, api_base: str | None
) -> list[tuple[str, int]]:
    """(price id, quantity) of the session's line items: from the event when expanded, else
    from the API (`GET /v1/checkout/sessions/{id}/line_items`) when a key is configured."""
    items = session.get("line_items")
    data = items.get("data") if isinstance(items, Mapping) else None
    if data is None and api_key:
        try:
            client = stripe.StripeClient(
                api_key, base_addresses={"api": api_base} if api_base else None
            )
            listed = client.checkout.sessions.line_items.list(str(session["id"]))
            data = [item.to_dict() for item in listed.data]  # plain JSON, as from the event
        except stripe.StripeError as error:
            raise ProcessorUnavailable(str(error)[:200]) from error
    if data is not None and not isinstance(data, list):
        raise EventMalformed("the session's line_items.data is not a list")
    found = []
    for item in data or []:
        if not isinstance(item, Mapping):
            raise EventMalformed("a line item is not an object")
        price = item.get("price") or {}
        price_id = price.get("id") if isinstance(price, Mapping) else price
        quantity = item.get("quantity")
        if isinstance(price_id, str):
            count = 1 if quantity is None else _stripe_count(quantity, "quantity", minimum=1)
            found.append((price_id, count))
    return found
