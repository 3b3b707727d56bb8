"""Refunds at the processors, in their documented formats: Gumroad `PUT /v2/sales/{id}/refund`,
Stripe `POST /v1/refunds` through the official library, and the sandbox, which refunds locally.
Every answer that is not a clear success becomes `RefundFailed` with the processor's words."""

from __future__ import annotations

from typing import Final
from urllib.parse import quote

import httpx
import stripe

from tally.config import Settings
from tally.service.ports import RefundFailed, RefundGateway, RefundRequest

HTTP_TIMEOUT_SECONDS: Final = 15.0
#: Stripe's library retries network errors and 5xx answers under our idempotency key, so a
#: retry never refunds twice; two retries keep a support click under half a minute.
STRIPE_MAX_NETWORK_RETRIES: Final = 2
MESSAGE_MAX_LENGTH: Final = 200


def _short(text: object) -> str:
    return str(text)[:MESSAGE_MAX_LENGTH]


class GumroadRefunds:
    """`PUT /v2/sales/{sale_id}/refund` with the seller's access token. Gumroad answers
    `{"success": true, "sale": {...}}`, or `{"success": false, "message": "..."}` (with 4xx)."""

    def __init__(self, base_url: str, access_token: str | None) -> None:
        self.base_url = base_url.rstrip("/")
        self.access_token = access_token

    def refund(self, request: RefundRequest) -> str:
        if not self.access_token:
            raise RefundFailed("Gumroad refunds need TALLY_GUMROAD_ACCESS_TOKEN")
        try:
            answer = httpx.put(
                # One path segment, whatever the id holds (`/`, `?`, `#`, `=`).
                f"{self.base_url}/v2/sales/{quote(request.sale_id, safe='')}/refund",
                data={"access_token": self.access_token},
                timeout=HTTP_TIMEOUT_SECONDS,
            )
        except httpx.HTTPError as error:
            raise RefundFailed(f"Gumroad could not be reached: {_short(error)}") from error
        try:
            body = answer.json()
        except ValueError:
            body = None
        if not isinstance(body, dict):
            raise RefundFailed(f"Gumroad answered {answer.status_code} without JSON")
        if answer.status_code != 200 or body.get("success") is not True:
            if self._refunded_already(request.sale_id):
                # An earlier attempt refunded it and Tally could not record it then, or the
                # seller refunded it in Gumroad: either way the money is back, so is Tally.
                return f"gumroad:{request.sale_id}"
            message = body.get("message") or f"status {answer.status_code}"
            raise RefundFailed(f"Gumroad refused the refund: {_short(message)}")
        sale = body.get("sale")
        if isinstance(sale, dict) and sale.get("refunded") is False:
            raise RefundFailed("Gumroad answered success but the sale is not refunded")
        return f"gumroad:{request.sale_id}"

    def _refunded_already(self, sale_id: str) -> bool:
        """Whether Gumroad's sale says it is refunded (`GET /v2/sales/{id}`); any doubt is no."""
        try:
            answer = httpx.get(
                f"{self.base_url}/v2/sales/{quote(sale_id, safe='')}",
                params={"access_token": self.access_token},
                timeout=HTTP_TIMEOUT_SECONDS,
            )
            sale = answer.json().get("sale") if answer.status_code == 200 else None
        except (httpx.HTTPError, ValueError, AttributeError):
            return False
        return isinstance(sale, dict) and sale.get("refunded") is True


class StripeRefunds:
    """A full refund of the Checkout Session's PaymentIntent, under our idempotency key."""

    def __init__(self, api_key: str | None, api_base: str | None) -> None:
        self.api_key = api_key
        self.api_base = api_base

    def _client(self) -> stripe.StripeClient:
        assert self.api_key
        return stripe.StripeClient(
            self.api_key,
            base_addresses={"api": self.api_base} if self.api_base else None,
            max_network_retries=STRIPE_MAX_NETWORK_RETRIES,
        )

    def refund(self, request: RefundRequest) -> str:
        if not self.api_key:
            raise RefundFailed("Stripe refunds need TALLY_STRIPE_API_KEY")
        client = self._client()
        try:
            payment_intent = request.payment_ref
            if not payment_intent:  # an order fulfilled before payment intents were recorded
                session = client.v1.checkout.sessions.retrieve(request.sale_id)
                found = session.payment_intent
                payment_intent = found if isinstance(found, str) else getattr(found, "id", None)
            if not payment_intent:
                raise RefundFailed("the Stripe session has no payment to refund")
            refund = client.v1.refunds.create(
                params={"payment_intent": payment_intent, "reason": "requested_by_customer"},
                options={"idempotency_key": request.idempotency_key},
            )
        except stripe.StripeError as error:
            message = error.user_message or (error.error.message if error.error else None)
            raise RefundFailed(f"Stripe refused the refund: {_short(message or error)}") from error
        if refund.status in ("failed", "canceled"):
            raise RefundFailed(f"Stripe's refund {refund.id} is {refund.status}")
        return str(refund.id)


class SandboxRefunds:
    """The sandbox has no money: its refunds always succeed, locally."""

    def refund(self, request: RefundRequest) -> str:
        return f"sandbox:{request.sale_id}"


class ProcessorRefunds:
    """Each order is refunded by the processor that sold it, whatever checkout uses today.
    Production has no sandbox refunds: a sandbox order there was never paid for, and a local
    "refund" would report money returned that nobody received."""

    def __init__(self, settings: Settings) -> None:
        self.gateways: dict[str, RefundGateway] = {
            "gumroad": GumroadRefunds(settings.gumroad_api_base, settings.gumroad_access_token),
            "stripe": StripeRefunds(settings.stripe_api_key, settings.stripe_api_base),
        }
        if not settings.production:
            # Also after switching TALLY_PAYMENTS: the sandbox's past orders stay its own.
            self.gateways["sandbox"] = SandboxRefunds()

    def refund(self, request: RefundRequest) -> str:
        gateway = self.gateways.get(request.processor)
        if gateway is None:
            raise RefundFailed(f"no refunds for processor {request.processor!r}")
        return gateway.refund(request)


def gateway(settings: Settings) -> RefundGateway:
    return ProcessorRefunds(settings)
