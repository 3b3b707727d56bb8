"""Support refunds over HTTP: `POST /v1/orders/{order_id}/refund` (docs/rules.md §3, rule 9)."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Path, Response
from pydantic import BaseModel, ConfigDict, Field

from tally.bootstrap import Tally
from tally.domain import values
from tally.domain.commerce import Order
from tally.domain.keys import Principal
from tally.domain.model import REASON_MAX_LENGTH
from tally.entrypoints.http.orders import order_view
from tally.entrypoints.http.v1 import (
    ERRORS,
    Caller,
    IdempotencyKey,
    json_response,
    require_key,
    tally_dependency,
)
from tally.service import refunds

App = Annotated[Tally, Depends(tally_dependency)]
Support = Annotated[Principal, Depends(Caller("support"))]

router = APIRouter()


class RefundIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    reason: Annotated[str, Field(min_length=1, max_length=REASON_MAX_LENGTH)]


def refund_view(order: Order) -> dict[str, Any]:
    """The order as `GET /v1/orders` shows it, with what it gave back."""
    return {
        **order_view(order),
        "refunded_amount": order.refunded_amount,
        "credits_taken": order.credits_taken,
        "credits_owed": order.credits_owed,
        "refunded_at": values.format_time(order.refunded_at),
        "disputed_at": values.format_time(order.disputed_at),
        "refund_reason": order.refund_reason,
    }


@router.post(
    "/v1/orders/{order_id}/refund",
    tags=["orders"],
    responses={**ERRORS, 502: ERRORS[409] | {"description": "The processor refused the refund"}},
)
def refund(
    tally: App,
    order_id: Annotated[str, Path(min_length=1, max_length=64)],
    body: RefundIn,
    who: Support,
    idempotency_key: IdempotencyKey = None,
) -> Response:
    """Refund the order in full at its processor, then void its code or lot (rule 9): 409
    `refund_window_passed`, `credits_used` or `already_refunded` when not allowed, 502
    `processor_failed` (nothing changed) when the processor says no."""
    key = require_key(idempotency_key)
    unit = tally.uow()
    command = refunds.RefundOrder(
        order_id=order_id, reason=body.reason, idempotency_key=key, platform_id=who.platform_id
    )
    order = refunds.refund_order(  # a sync route: FastAPI runs it in a worker thread
        command,
        unit,
        gateway=tally.refund_gateway,
        window_days=tally.catalog.refund_window_days,
        links=tally.links,
        catalog=tally.catalog,
    )
    return json_response(refund_view(order), replayed=unit.replayed)
