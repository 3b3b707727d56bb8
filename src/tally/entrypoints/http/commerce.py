"""Commerce over HTTP: processor webhooks, redemption and code look-up in the API, and the
pages people use (checkout in the sandbox, redeem, the development mailbox)."""

from __future__ import annotations

import json
import secrets
from datetime import UTC, datetime
from typing import Annotated, Any, Final

import httpx
from fastapi import APIRouter, Depends, Form, Header, Path, Request, Response
from fastapi.responses import HTMLResponse, RedirectResponse
from jinja2 import Environment, PackageLoader, select_autoescape
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool

from tally import schemas
from tally.adapters import payments
from tally.adapters.mail import MailboxSender
from tally.bootstrap import Tally
from tally.domain import values
from tally.domain.commerce import Sale
from tally.domain.errors import (
    CodeInvalidOrUsed,
    EventMalformed,
    InvalidEmail,
    InvalidInput,
    NotFound,
    ProcessorUnavailable,
    RateLimited,
    TallyError,
)
from tally.domain.keys import Principal
from tally.entrypoints.http.edge import note_rate_limited, peer_address
from tally.entrypoints.http.v1 import (
    ERRORS,
    Caller,
    ClientAddress,
    IdempotencyKey,
    json_response,
    require_key,
    tally_dependency,
    tally_of,
)
from tally.entrypoints.views import as_sentence, date_in_words, lot_view, wait_in_words
from tally.service import commerce, ledger, limits, refunds
from tally.service.ports import ProcessorEvent

SANDBOX_TIMEOUT_SECONDS: Final = 10.0
_pages = Environment(
    loader=PackageLoader("tally", "templates/pages"),
    autoescape=select_autoescape(enabled_extensions=("html.j2",)),
)

App = Annotated[Tally, Depends(tally_dependency)]
Spend = Annotated[Principal, Depends(Caller("spend"))]
Support = Annotated[Principal, Depends(Caller("support"))]

router = APIRouter()
#: Routes that do not exist in production (create_app leaves them out there): the sandbox's
#: Pay button, which makes paid orders for anyone, and the dev mailbox, which shows codes.
development_router = APIRouter()


def _page(name: str, status: int = 200, **context: Any) -> HTMLResponse:
    return HTMLResponse(_pages.get_template(name).render(**context), status)


def _accepted(**body: Any) -> Response:
    return json_response({"ok": True, **body})


def _fulfil(tally: Tally, sale: Sale) -> commerce.Fulfilment:
    return commerce.fulfil(sale, tally.uow(), pepper=tally.pepper, links=tally.links)


def _unusable(
    tally: Tally, processor: str, sale_id: str | None, payload: object, error: InvalidInput
) -> Response:
    """A paid sale reported with what Tally cannot act on (an unusable address, a price out
    of range): kept for support and answered 200, since the processor would resend the same
    thing for days; never fulfilled to a guess."""
    reason = f"{error.code}: {error.detail}"
    commerce.record_unmatched(processor, sale_id, reason, payload, tally.uow())
    return _accepted(ignored=error.code, reason=error.detail)


def email_field_error(error: InvalidEmail) -> str:
    """What a form says next to an address it refused."""
    return f"Enter one email address, such as name@example.com. {error.extra.get('reason', '')}"


# --- webhooks -------------------------------------------------------------------------------------


async def _ping(request: Request) -> dict[str, str]:
    """A Gumroad ping: form-encoded (what Gumroad sends) or JSON, as strings."""
    if "json" in request.headers.get("content-type", ""):
        try:
            body = json.loads(await request.body())
        except ValueError as error:
            raise InvalidInput("the ping is not JSON") from error
        if not isinstance(body, dict):
            raise InvalidInput("the ping is not an object")
        return payments.flatten(body)
    form = await request.form()
    return payments.flatten({name: value for name, value in form.items() if isinstance(value, str)})


@router.post("/webhooks/gumroad/{token}", tags=["webhooks"], responses=ERRORS)
async def gumroad_webhook(
    request: Request, token: Annotated[str, Path(max_length=200)]
) -> Response:
    """Fulfil a Gumroad sale once. A wrong token or seller is a 404 with no side effect; a
    temporary failure is a 503, so Gumroad tries again. The token says whose ping it is:
    Gumroad's, or (in development) the sandbox checkout's own."""
    tally = tally_of(request)
    processor = tally.webhook_processor(token)
    if processor is None:
        raise NotFound("no such endpoint")
    ping = await _ping(request)
    if not payments.matches_secret(ping.get("seller_id", ""), tally.seller_id(processor)):
        raise NotFound("no such endpoint")
    resource = ping.get("resource_name") or "sale"
    sale_id = ping.get("sale_id") or None
    if resource in _GUMROAD_REVERSALS and sale_id is not None:
        return await run_in_threadpool(_gumroad_reversal, tally, processor, ping, resource, sale_id)
    if resource != "sale":
        return _accepted(ignored=resource)  # subscriptions: not sold yet
    if sale_id is None:
        raise InvalidInput("the ping has no sale_id")
    return await run_in_threadpool(_gumroad_sale, tally, processor, ping, sale_id)


# --- refunds and disputes reported by the processors ----------------------------------------------

#: Gumroad's refund and dispute pings (docs/rules.md §4). Gumroad sends no event id: one of
#: each kind per sale is applied, however often it arrives.
_GUMROAD_REVERSALS: Final = ("refund", "dispute", "dispute_won")


def _gumroad_reversal(
    tally: Tally, processor: str, ping: dict[str, str], resource: str, sale_id: str
) -> Response:
    key = f"{resource}:{sale_id}"
    refunded = None  # the whole sale, unless Gumroad says a part, and how much in all
    partial = ping.get("partially_refunded", "").lower() == "true"
    if resource == "refund" and partial and ping.get("refunded", "").lower() != "true":
        refunded = payments.ping_number(ping, "amount_refunded_in_cents")
        key = f"{key}:{refunded}"  # each partial refund is its own running total
    event = refunds.new_event(
        processor=processor,
        event_key=key,
        kind=resource,
        sale_id=sale_id,
        payment_ref=None,
        payload=dict(ping),
        now=tally.clock(),
        dispute_ref=sale_id if resource.startswith("dispute") else None,
        refunded_amount=refunded,
    )
    return _accepted(event=_record(tally, event))


def _stripe_reversal(tally: Tally, event: dict[str, Any]) -> Response:
    """`charge.refunded` (the refund's running total), `charge.dispute.created` and
    `charge.dispute.closed`; each names the payment intent the order recorded."""
    kind = event["type"]
    found = event["data"]["object"]
    if not isinstance(found, dict):
        raise InvalidInput("the event has no object")
    intent = found.get("payment_intent")
    payment_ref = intent if isinstance(intent, str) else None
    if payment_ref is None:
        return _accepted(ignored="no payment intent")  # not a Checkout payment of Tally's
    common: dict[str, Any] = {
        "processor": "stripe",
        "event_key": str(event.get("id") or ""),
        "sale_id": None,
        "payment_ref": payment_ref,
        "payload": event,
        "now": tally.clock(),
    }
    if kind == "charge.refunded":
        made = refunds.new_event(
            kind="refund",
            refunded_amount=_amount(found.get("amount_refunded")),
            charge_amount=_amount(found.get("amount")),
            **common,
        )
    else:
        status = found.get("status")
        if kind == "charge.dispute.created":
            reversal = "dispute"
        elif status in ("won", "warning_closed"):  # the money stayed with the seller
            reversal = "dispute_won"
        elif status == "lost":
            reversal = "dispute_lost"
        else:
            return _accepted(ignored=f"dispute {status}")
        made = refunds.new_event(kind=reversal, dispute_ref=str(found.get("id") or ""), **common)
    return _accepted(event=_record(tally, made))


def _amount(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= values.MAX_AMOUNT:
        raise EventMalformed("amounts are whole numbers of minor units from 0 to 2^53")
    return value


def _record(tally: Tally, event: ProcessorEvent) -> str:
    return refunds.record_event(
        event, tally.uow(), pepper=tally.pepper, links=tally.links, catalog=tally.catalog
    )


def _gumroad_sale(tally: Tally, processor: str, ping: dict[str, str], sale_id: str) -> Response:
    settings = tally.settings
    if processor == "gumroad" and settings.gumroad_access_token:  # Gumroad never saw the sandbox
        api = payments.GumroadApi(settings.gumroad_api_base, settings.gumroad_access_token)
        try:
            confirmed = api.sale(sale_id)
        except ProcessorUnavailable as error:
            raise ProcessorUnavailable(f"Gumroad could not confirm the sale: {error}") from error
        if confirmed is None:
            commerce.record_unmatched(
                "gumroad", sale_id, "unknown to the sales API", ping, tally.uow()
            )
            return _accepted(ignored="unconfirmed")
        ping = {**ping, **{k: v for k, v in confirmed.items() if k in _CONFIRMED_FIELDS}}
    package = payments.gumroad_package(tally.catalog, ping)
    if package is None:
        commerce.record_unmatched(
            processor, sale_id, "no package for this product", ping, tally.uow()
        )
        return _accepted(ignored="unknown product")
    try:
        sale = payments.gumroad_sale(ping, package, processor=processor, now=tally.clock())
        # Inside: a sale whose credits would expire past the time range is unusable too.
        done = _fulfil(tally, sale)
    except InvalidInput as error:
        return _unusable(tally, processor, sale_id, ping, error)
    return _accepted(order_id=done.order.id, created=done.created)


#: What the sales API's answer may correct in a ping before fulfilment.
_CONFIRMED_FIELDS: Final = frozenset(
    {"email", "product_id", "product_permalink", "quantity", "price", "currency", "sale_timestamp"}
)


@router.post("/webhooks/stripe", tags=["webhooks"], responses=ERRORS)
async def stripe_webhook(
    request: Request,
    stripe_signature: Annotated[str | None, Header(alias="Stripe-Signature")] = None,
) -> Response:
    tally = tally_of(request)
    payload = await request.body()
    secret = tally.settings.stripe_webhook_secret
    try:
        return await _stripe_dispatch(
            tally, payments.stripe_event(payload, stripe_signature, secret)
        )
    except EventMalformed as error:
        # Signed by Stripe yet unreadable: kept for support, and a 400, never a 5xx that
        # Stripe would retry for days.
        await run_in_threadpool(_keep_malformed, tally, payload, error)
        raise


def _keep_malformed(tally: Tally, payload: bytes, error: EventMalformed) -> None:
    event_id, kept = payments.stripe_kept(payload)
    commerce.record_unmatched("stripe", event_id, f"malformed: {error.detail}", kept, tally.uow())


async def _stripe_dispatch(tally: Tally, event: dict[str, Any]) -> Response:
    kind = event["type"]
    if kind in ("charge.refunded", "charge.dispute.created", "charge.dispute.closed"):
        return await run_in_threadpool(_stripe_reversal, tally, event)
    if kind not in ("checkout.session.completed", "checkout.session.async_payment_succeeded"):
        return _accepted(ignored=kind)
    session = event["data"]["object"]
    if session.get("payment_status") != "paid":
        return _accepted(ignored="not paid yet")
    return await run_in_threadpool(_stripe_sale, tally, session)


def _stripe_sale(tally: Tally, session: Any) -> Response:
    settings = tally.settings
    try:
        items = payments.stripe_line_items(
            session, settings.stripe_api_key, settings.stripe_api_base
        )
    except ProcessorUnavailable as error:
        raise ProcessorUnavailable(f"Stripe could not list the line items: {error}") from error
    package = payments.stripe_package(tally.catalog, session, [price for price, _ in items])
    if package is None:
        commerce.record_unmatched(
            "stripe", str(session.get("id")), "no package", dict(session), tally.uow()
        )
        return _accepted(ignored="unknown product")
    quantity = next((q for price, q in items if price == package.stripe_price_id), 1)
    try:
        sale = payments.stripe_sale(session, package, quantity, now=tally.clock())
        done = _fulfil(tally, sale)
    except EventMalformed:
        raise  # not in Stripe's shape: the webhook's 400, kept for support there
    except InvalidInput as error:  # in shape, but nothing Tally can fulfil
        return _unusable(tally, "stripe", str(session.get("id")), dict(session), error)
    return _accepted(order_id=done.order.id, created=done.created)


# --- the API --------------------------------------------------------------------------------------


class RedemptionIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    code: Annotated[str, Field(min_length=1, max_length=64)]
    account_id: Annotated[str, Field(min_length=1, max_length=128)]


_LIMITED: Final = {**ERRORS, 429: ERRORS[409] | {"description": "Too many failed attempts"}}


@router.post(
    "/v1/redemptions",
    status_code=201,
    response_model=schemas.LotOut,
    responses=_LIMITED,
    tags=["codes"],
)
def redeem(
    tally: App,
    body: RedemptionIn,
    who: Spend,
    client_address: ClientAddress,
    idempotency_key: IdempotencyKey = None,
) -> Response:
    key = require_key(idempotency_key)
    unit = tally.uow()
    lot = commerce.redeem(
        commerce.Redeem(
            code=body.code,
            account_id=body.account_id,
            client_address=client_address,
            idempotency_key=key,
            platform_id=who.platform_id,
        ),
        unit,
        pepper=tally.pepper,
        allowance=_allowance(tally),
    )
    return json_response(lot_view(lot, tally.clock()), 201, replayed=unit.replayed)


def _allowance(tally: Tally) -> limits.Allowance:
    settings = tally.settings
    return limits.Allowance(
        per_subject=settings.redeem_failures_per_hour,
        per_platform=settings.redeem_failures_per_platform_per_hour,
        page=settings.redeem_page_failures_per_hour,
    )


@router.get("/v1/codes/{code}", tags=["codes"], responses=_LIMITED)
def code_info(
    tally: App,
    code: Annotated[str, Path(max_length=64)],
    who: Support,
    client_address: ClientAddress,
) -> Response:
    """A miss counts as a failed redemption through this platform (429 past its limits)."""
    found = commerce.look_up_code(
        code,
        tally.uow(),
        pepper=tally.pepper,
        platform_id=who.platform_id,
        client_address=client_address,
        allowance=_allowance(tally),
    )
    c, order = found.code, found.order
    return json_response(
        {
            "id": c.id,
            "object": "code",
            "last4": c.last4,
            "status": c.status.value,
            "created_at": values.format_time(c.created_at),
            "redeemed_at": values.format_time(c.redeemed_at),
            "account_id": c.account_id,
            "lot_id": c.lot_id,
            "order": {
                "id": order.id,
                "processor": order.processor,
                "sale_id": order.sale_id,
                "order_number": order.order_number,
                "package_id": order.package_id,
                "credits": order.credits,
                "email": order.email,
                "status": order.status.value,
                "purchased_at": values.format_time(order.purchased_at),
                "expires_at": values.format_time(order.expires_at),
            },
        }
    )


# --- pages ----------------------------------------------------------------------------------------


@router.get("/redeem", response_class=HTMLResponse, include_in_schema=False)
def redeem_page() -> HTMLResponse:
    return _page("redeem.html.j2", title="Redeem a code")


@router.post("/redeem", response_class=HTMLResponse, include_in_schema=False)
def redeem_form(
    request: Request,
    tally: App,
    code: Annotated[str, Form(max_length=64)],
    account: Annotated[str, Form(max_length=128)],
) -> HTMLResponse:
    # Exactly as typed, case and all: account ids are the platforms' own user ids, not emails,
    # and `User_A` and `user_a` are two people. Only surrounding spaces (never valid) go.
    account_id = account.strip()
    try:
        lot = commerce.redeem(
            commerce.Redeem(
                code=code,
                account_id=account_id,
                client_address=peer_address(request.scope),
                idempotency_key=f"page-{secrets.token_hex(12)}",
            ),
            tally.uow(),
            pepper=tally.pepper,
            allowance=_allowance(tally),
        )
    except (CodeInvalidOrUsed, RateLimited, InvalidInput) as error:
        limited = error if isinstance(error, RateLimited) else None
        page = _page(
            "redeem.html.j2",
            error.status,
            title="Redeem a code",
            error=None if limited else _redeem_refusal(error),
            lost_link=isinstance(error, CodeInvalidOrUsed),
            retry_in=wait_in_words(limited.retry_after) if limited else None,
            limit=limited.limit if limited else None,
            account_id=account_id,
        )
        if limited:
            page.headers["Retry-After"] = str(limited.retry_after)
            note_rate_limited(request.scope, limited)
        return page
    available = ledger.get_balance(account_id, tally.uow()).available
    shown = {"amount": lot.amount, "expires_on": date_in_words(lot.expires_at)}
    return _page(
        "redeem.html.j2",
        title="Credits added",
        lot=shown,
        account_id=account_id,
        available=available,
    )


def _redeem_refusal(error: TallyError) -> str:
    if isinstance(error, CodeInvalidOrUsed):
        return "This code is not valid or was used already. Check it against your email."
    return as_sentence(error.detail)


@router.get("/checkout/{package_id}", include_in_schema=False)
def checkout(
    tally: App,
    package_id: Annotated[str, Path(max_length=64)],
    email: str | None = None,
    gift_email: str | None = None,
) -> Response:
    package = tally.catalog.packages.get(package_id)
    if package is None:
        raise NotFound(f"no package {package_id!r}")
    settings = tally.settings
    if settings.payments == "gumroad":
        permalink = package.gumroad_permalink or package.id
        return RedirectResponse(f"https://gumroad.com/l/{permalink}", 303)
    if settings.payments == "stripe":
        return RedirectResponse(_stripe_checkout(tally, package.id, email, gift_email), 303)
    if not settings.sandbox:
        raise NotFound("the sandbox checkout is off")
    return _page(
        "checkout.html.j2",
        title=f"Buy {package.name}",
        package=package,
        email=email,
        gift_email=gift_email,
    )


def _stripe_checkout(tally: Tally, package_id: str, email: str | None, gift: str | None) -> str:
    import stripe

    # Stripe is handed only addresses the webhook would accept back.
    email = values.email(email) if email else None
    gift = values.email(gift, field="gift_email") if gift else None
    settings = tally.settings
    package = tally.catalog.packages[package_id]
    if not settings.stripe_api_key or not package.stripe_price_id:
        raise InvalidInput("Stripe checkout needs TALLY_STRIPE_API_KEY and a price id")
    client = stripe.StripeClient(
        settings.stripe_api_key,
        base_addresses={"api": settings.stripe_api_base} if settings.stripe_api_base else None,
    )
    metadata = {"package": package.id, **({"gift_email": gift} if gift else {})}
    params: dict[str, Any] = {
        "mode": "payment",
        "line_items": [{"price": package.stripe_price_id, "quantity": 1}],
        "success_url": f"{settings.public_url}/redeem",
        "cancel_url": f"{settings.public_url}/checkout/{package.id}",
        "metadata": metadata,
    }
    if email:
        params["customer_email"] = email
    try:
        session = client.checkout.sessions.create(params=params)  # type: ignore[arg-type]
    except stripe.StripeError as error:
        raise ProcessorUnavailable(f"Stripe could not start the checkout: {error}") from error
    return str(session.url)


@development_router.post(
    "/checkout/{package_id}/pay", response_class=HTMLResponse, include_in_schema=False
)
def sandbox_pay(
    tally: App,
    package_id: Annotated[str, Path(max_length=64)],
    # Blank is the validator's to refuse, as a field error on the form, like any bad address.
    email: Annotated[str, Form(max_length=320)] = "",
    gift_email: Annotated[str, Form(max_length=320)] = "",
) -> HTMLResponse:
    """The sandbox's Pay button: a Gumroad-format ping to Tally's own webhook, over HTTP."""
    if not tally.settings.sandbox:
        raise NotFound("the sandbox checkout is off")
    package = tally.catalog.packages.get(package_id)
    if package is None:
        raise NotFound(f"no package {package_id!r}")
    errors: dict[str, str] = {}
    buyer = gift = ""
    try:
        buyer = values.email(email)
    except InvalidEmail as error:
        errors["email"] = email_field_error(error)
    try:
        gift = values.email(gift_email, field="gift_email") if gift_email.strip() else ""
    except InvalidEmail as error:
        errors["gift_email"] = email_field_error(error)
    if errors:  # the form again, with what was typed and what to fix
        return _page(
            "checkout.html.j2",
            422,
            title=f"Buy {package.name}",
            package=package,
            email=email,
            gift_email=gift_email,
            errors=errors,
        )
    sale_id = f"sandbox-{secrets.token_hex(8)}"
    ping = {
        "seller_id": tally.seller_id("sandbox"),
        "sale_id": sale_id,
        "sale_timestamp": datetime.now(UTC).isoformat().replace("+00:00", "Z"),
        "order_number": str(secrets.randbelow(10**9)),
        "product_id": package.gumroad_product_id or package.id,
        "product_permalink": f"{tally.settings.public_url}/l/{package.gumroad_permalink}",
        "product_name": package.name,
        "email": gift or buyer,
        "price": "0" if gift else str(package.price),
        "currency": package.currency.lower(),
        "quantity": "1",
        "resource_name": "sale",
        "test": "true",
        "is_gift_receiver_purchase": "true" if gift else "false",
        "gifter_email": buyer if gift else "",
        "refunded": "false",
    }
    url = f"{tally.settings.public_url}/webhooks/gumroad/{tally.sandbox_token}"
    try:
        answer = httpx.post(url, data=ping, timeout=SANDBOX_TIMEOUT_SECONDS)
    except httpx.TransportError as error:
        raise ProcessorUnavailable(
            f"the sandbox could not reach {tally.settings.public_url}"
        ) from error
    if answer.status_code != 200:
        raise TallyError(f"the webhook answered {answer.status_code}")
    shown = gift or buyer
    return _page(
        "paid.html.j2", title="Thank you", email=shown, mailbox=not tally.settings.smtp_url
    )


@development_router.get("/dev/mailbox", response_class=HTMLResponse, include_in_schema=False)
def mailbox(tally: App) -> HTMLResponse:
    if tally.settings.production or tally.settings.smtp_url:
        raise NotFound("the development mailbox is off")
    messages = []
    for message in MailboxSender(tally.settings.mailbox_dir).messages():
        body = message.get_body(("plain",))
        messages.append(
            {
                "subject": message["Subject"],
                "to": message["To"],
                "date": message["Date"],
                "text": body.get_content() if body is not None else "",
            }
        )
    return _page("mailbox.html.j2", title="Mailbox", messages=messages)
