"""Orders over HTTP: support finds them and replaces lost codes (`/v1/orders`), and a person
asks for a new code themselves on the /lost-code page."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Body, Depends, Form, Path, Query, Request, Response
from fastapi.responses import HTMLResponse
from pydantic import BaseModel, ConfigDict, Field

from tally.bootstrap import Tally
from tally.domain import values
from tally.domain.commerce import Order
from tally.domain.errors import InvalidEmail, RateLimited
from tally.domain.keys import Principal
from tally.domain.model import REASON_MAX_LENGTH
from tally.entrypoints.http.commerce import _page, email_field_error
from tally.entrypoints.http.edge import note_rate_limited, peer_address
from tally.entrypoints.http.v1 import (
    DEFAULT_PAGE,
    ERRORS,
    Caller,
    Cursor,
    IdempotencyKey,
    Limit,
    json_response,
    require_key,
    tally_dependency,
)
from tally.entrypoints.views import wait_in_words
from tally.service import orders
from tally.service.orders import OrderSummary

App = Annotated[Tally, Depends(tally_dependency)]
Support = Annotated[Principal, Depends(Caller("support"))]

router = APIRouter()

LOST_CODE_TITLE = "Lost your code?"
#: The one answer to every accepted request, whether or not the pair matched an order.
LOST_CODE_SENT = (
    "If this matches an order, we have emailed a new code to the order's address. "
    "The old code no longer works."
)


def order_view(order: Order, summary: OrderSummary | None = None) -> dict[str, Any]:
    view: dict[str, Any] = {
        "id": order.id,
        "object": "order",
        "processor": order.processor,
        "sale_id": order.sale_id,
        "order_number": order.order_number,
        "package_id": order.package_id,
        "quantity": order.quantity,
        "credits": order.credits,
        "price": order.price,
        "currency": order.currency,
        "email": order.email,
        "gifter_email": order.gifter_email,
        "is_test": order.is_test,
        "status": order.status.value,
        "purchased_at": values.format_time(order.purchased_at),
        "expires_at": values.format_time(order.expires_at),
        "created_at": values.format_time(order.created_at),
    }
    if summary is not None:
        view["code"] = (
            None
            if summary.code_status is None
            else {"status": summary.code_status.value, "last4": summary.code_last4}
        )
    return view


class CodeSummaryOut(BaseModel):
    status: str  # issued, redeemed or void
    last4: str


class OrderOut(BaseModel):
    id: str
    object: str
    processor: str
    sale_id: str
    order_number: str
    package_id: str
    quantity: int
    credits: int
    price: int
    currency: str
    email: str
    gifter_email: str | None
    is_test: bool
    status: str  # fulfilled, refunded or disputed
    purchased_at: str
    expires_at: str | None
    created_at: str
    code: CodeSummaryOut | None = None  # in lists: the current code


class OrderList(BaseModel):
    data: list[OrderOut]
    has_more: bool


class ReissueIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    reason: Annotated[str | None, Field(max_length=REASON_MAX_LENGTH)] = None


@router.get("/v1/orders", response_model=OrderList, tags=["orders"], responses=ERRORS)
def list_orders(
    tally: App,
    _: Support,
    email: Annotated[str | None, Query(max_length=orders.EMAIL_MAX)] = None,
    order_number: Annotated[str | None, Query(max_length=orders.ORDER_NUMBER_MAX)] = None,
    limit: Limit = DEFAULT_PAGE,
    starting_after: Cursor = None,
) -> Response:
    """Orders by the buyer's (or gift recipient's) email and/or order number, newest first,
    each with its current code's status and last 4 characters."""
    page = orders.find_orders(
        tally.uow(),
        email=email,
        order_number=order_number,
        limit=limit,
        starting_after=starting_after,
    )
    data = [order_view(found.order, found) for found in page.items]
    return json_response({"data": data, "has_more": page.has_more})


@router.post(
    "/v1/orders/{order_id}/reissue", response_model=OrderOut, tags=["orders"], responses=ERRORS
)
def reissue(
    tally: App,
    order_id: Annotated[str, Path(min_length=1, max_length=64)],
    who: Support,
    body: Annotated[ReissueIn | None, Body()] = None,
    idempotency_key: IdempotencyKey = None,
) -> Response:
    """Void the order's unredeemed code and email a new one to the order's address, with the
    original validity. 409 `code_already_redeemed`, `order_reversed` or `order_expired`."""
    key = require_key(idempotency_key)
    unit = tally.uow()
    order = orders.reissue_code(
        orders.ReissueCode(
            order_id=order_id,
            reason=None if body is None else body.reason,
            idempotency_key=key,
            platform_id=who.platform_id,
        ),
        unit,
        pepper=tally.pepper,
        links=tally.links,
        catalog=tally.catalog,
    )
    return json_response(order_view(order), replayed=unit.replayed)


# --- the page -----------------------------------------------------------------------------


@router.get("/lost-code", response_class=HTMLResponse, include_in_schema=False)
def lost_code_page() -> HTMLResponse:
    return _page("lost_code.html.j2", title=LOST_CODE_TITLE)


@router.post("/lost-code", response_class=HTMLResponse, include_in_schema=False)
def lost_code_form(
    request: Request,
    tally: App,
    order_number: Annotated[str, Form(max_length=orders.ORDER_NUMBER_MAX)],
    email: Annotated[str, Form(max_length=orders.EMAIL_MAX)] = "",  # blank: a field error
) -> HTMLResponse:
    address = peer_address(request.scope)
    try:
        orders.request_lost_code(
            values.email(email),
            order_number,
            tally.uow(),
            client_address=address,
            pepper=tally.pepper,
            links=tally.links,
            catalog=tally.catalog,
            limit=tally.settings.lost_code_requests_per_hour,
        )
    except InvalidEmail as error:
        # Says nothing about orders: only that what was typed is not an address.
        return _page(
            "lost_code.html.j2",
            error.status,
            title=LOST_CODE_TITLE,
            errors={"email": email_field_error(error)},
            email=email,
            order_number=order_number,
        )
    except RateLimited as error:
        page = _page(
            "lost_code.html.j2",
            error.status,
            title=LOST_CODE_TITLE,
            error="Too many requests came from your network in the last hour. "
            f"Please try again in {wait_in_words(error.retry_after)}.",
        )
        page.headers["Retry-After"] = str(error.retry_after)
        note_rate_limited(request.scope, error)
        return page
    return _page("lost_code.html.j2", title=LOST_CODE_TITLE, sent=LOST_CODE_SENT)
