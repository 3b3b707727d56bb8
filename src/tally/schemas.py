"""Request and response bodies of the HTTP API v1 (docs/rules.md §3), as pydantic models:
the server validates with them and the SDK (tally.client) reads with them, so this module
needs pydantic and the domain's constants only.

Requests are strict: unknown fields, floats and strings where credits go are refused (rule 1).
Responses are documented here for /openapi.json; the handlers send the view dicts of
`tally.entrypoints.views`, which these models describe field for field.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictInt, model_validator

from tally.domain.model import MAX_HOLD_TTL_SECONDS, REASON_MAX_LENGTH
from tally.domain.values import MAX_AMOUNT

Credits = Annotated[
    StrictInt, Field(ge=1, le=MAX_AMOUNT, description=f"whole credits, 1 to {MAX_AMOUNT}")
]
Quantity = Annotated[StrictInt, Field(ge=1, le=1_000_000, description="units of the tool")]
Reason = Annotated[str, Field(min_length=1, max_length=REASON_MAX_LENGTH)]
Metadata = Annotated[dict[str, Any], Field(description="at most 4 KiB of JSON")]
Time = Annotated[str, Field(description="RFC 3339 time in UTC", examples=["2026-01-01T00:00:00Z"])]
Source = Literal["purchase", "gift", "membership", "promotional", "support", "refund"]


class _In(BaseModel):
    model_config = ConfigDict(extra="forbid")


#: One bare address; the use case checks it (`invalid_email`, with the reason).
EmailIn = Annotated[str, Field(max_length=320, json_schema_extra={"format": "email"})]


class AccountIn(_In):
    email: EmailIn | None = None


class GrantIn(_In):
    amount: Credits
    source: Source = "promotional"
    expires_at: Time | None = None
    valid_for: Annotated[str, Field(max_length=40, examples=["P2Y", "never"])] | None = None
    priority: Annotated[StrictInt, Field(ge=-1_000_000, le=1_000_000)] = 0
    reason: Reason
    metadata: Metadata | None = None


class _Priced(_In):
    """`{tool, quantity}` priced from the catalog, or a plain `{amount}`."""

    tool: Annotated[str, Field(min_length=1, max_length=64)] | None = None
    quantity: Quantity | None = None
    amount: Credits | None = None

    @model_validator(mode="after")
    def _one_way(self) -> _Priced:
        by_tool = self.tool is not None or self.quantity is not None
        if by_tool and (self.tool is None or self.quantity is None or self.amount is not None):
            raise ValueError("give {tool, quantity} or {amount}")
        if not by_tool and self.amount is None:
            raise ValueError("give {tool, quantity} or {amount}")
        return self


class HoldIn(_Priced):
    ttl_seconds: Annotated[StrictInt, Field(ge=1, le=MAX_HOLD_TTL_SECONDS)] = 900
    metadata: Metadata | None = None


class DebitIn(_Priced):
    metadata: Metadata | None = None


class CaptureIn(_In):
    quantity: Quantity | None = None
    amount: Credits | None = None

    @model_validator(mode="after")
    def _at_most_one(self) -> CaptureIn:
        if self.quantity is not None and self.amount is not None:
            raise ValueError("give quantity or amount, not both")
        return self


class ReleaseIn(_In):
    reason: Reason | None = None


class VoidIn(_In):
    reason: Reason


# --- responses ------------------------------------------------------------------------------


class AllocationOut(BaseModel):
    lot_id: str
    amount: int


class AccountOut(BaseModel):
    object: Literal["account"]
    account_id: str
    email: str | None
    created_at: Time


class LotOut(BaseModel):
    id: str
    object: Literal["lot"]
    account_id: str
    source: str
    amount: int
    remaining: int
    status: Literal["active", "spent", "expired", "void"]
    expires_at: Time | None
    priority: int
    created_at: Time
    voided_at: Time | None
    reason: str | None
    metadata: dict[str, Any]


class HoldOut(BaseModel):
    id: str
    object: Literal["hold"]
    account_id: str
    amount: int
    captured: int
    status: Literal["pending", "captured", "released", "expired"]
    expires_at: Time
    created_at: Time
    tool: str | None
    quantity: int | None
    allocations: list[AllocationOut]
    metadata: dict[str, Any]


class EntryOut(BaseModel):
    id: str
    object: Literal["entry"]
    account_id: str
    seq: int
    type: str
    amount: int
    lot_id: str | None
    hold_id: str | None
    created_at: Time
    idempotency_key: str | None
    platform_id: str | None
    reason: str | None
    metadata: dict[str, Any]


class DebitOut(BaseModel):
    id: str
    object: Literal["entry"]
    type: Literal["debit"]
    account_id: str
    amount: int
    created_at: Time
    allocations: list[AllocationOut]
    entries: list[str]


class NextExpiryOut(BaseModel):
    at: Time
    amount: int


class BalanceOut(BaseModel):
    account_id: str
    available: int
    held: int
    debt: int
    allowances: dict[str, int]
    next_expiry: NextExpiryOut | None


class ToolOut(BaseModel):
    id: str
    object: Literal["tool"]
    name: str
    credits_per_unit: int
    unit: str


class SurpriseOut(BaseModel):
    min: int
    max: int


class PackageOut(BaseModel):
    id: str
    object: Literal["package"]
    name: str
    credits: int | None
    surprise: SurpriseOut | None
    price: int
    currency: str
    validity: str


class LotList(BaseModel):
    data: list[LotOut]
    has_more: bool


class EntryList(BaseModel):
    data: list[EntryOut]
    has_more: bool


class ToolList(BaseModel):
    data: list[ToolOut]
    has_more: bool


class PackageList(BaseModel):
    data: list[PackageOut]
    has_more: bool


class PlanList(BaseModel):
    data: list[dict[str, Any]]
    has_more: bool


class Health(BaseModel):
    status: Literal["ok"]
    database: Literal["ok"]


class Problem(BaseModel):
    """RFC 9457 problem details, with Tally's stable `code`."""

    model_config = ConfigDict(extra="allow")

    type: str
    title: str
    status: int
    code: str
    detail: str | None = None
