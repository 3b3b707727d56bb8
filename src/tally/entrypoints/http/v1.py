"""The routes of the HTTP API v1 (docs/rules.md §3): one plain function per endpoint, each
calling one use case. FastAPI runs them on its thread pool, so concurrent requests share
transactions through the group commit just as in-process callers do."""

from __future__ import annotations

import hashlib
import json
from typing import Annotated, Any, Final

from fastapi import APIRouter, Body, Depends, Header, Path, Query, Request, Response
from starlette.concurrency import run_in_threadpool

from tally import schemas
from tally.bootstrap import Tally
from tally.domain import values
from tally.domain.errors import IdempotencyKeyRequired
from tally.domain.keys import Principal
from tally.entrypoints.views import (
    account_view,
    balance_view,
    debit_view,
    entry_view,
    hold_view,
    lot_view,
    package_view,
    tool_view,
)
from tally.service import ledger, platforms
from tally.service.changes import run_async
from tally.service.ports import UnitOfWork

DEFAULT_PAGE: Final = 100
#: Authenticated keys remembered per app (see KeyedCaller); the cache is emptied when full.
PRINCIPALS_MAX: Final = 10_000

ERRORS: dict[int | str, dict[str, Any]] = {
    status: {"model": schemas.Problem, "description": description}
    for status, description in (
        (400, "Malformed request"),
        (401, "No key, or a bad one"),
        (403, "The key lacks the scope"),
        (404, "Unknown"),
        (409, "Wrong state"),
        (413, "Body over 64 KiB"),
        (422, "Invalid input"),
        (503, "Database unavailable"),
    )
}
SPEND_ERRORS = {**ERRORS, 402: {"model": schemas.Problem, "description": "Insufficient credits"}}


def tally_of(request: Request) -> Tally:
    found: Tally = request.app.state.tally
    return found


async def tally_dependency(request: Request) -> Tally:
    """The same, as an async dependency: FastAPI runs a plain one on its thread pool, a
    thread hop per request for an attribute read."""
    return tally_of(request)


App = Annotated[Tally, Depends(tally_dependency)]


def client_address_header(
    x_client_address: Annotated[
        str | None,
        Header(
            alias="X-Client-Address",
            max_length=values.CLIENT_ADDRESS_MAX_LENGTH,
            description="the person's IP address, as the platform saw it; the rate limits "
            "count per address (an IPv6 /64 is one), so send it whenever a person is behind "
            "the request",
        ),
    ] = None,
) -> values.ClientAddress | None:
    """`X-Client-Address`, normalised; a malformed one is `422 invalid_client_address`."""
    return None if x_client_address is None else values.client_address(x_client_address)


ClientAddress = Annotated[values.ClientAddress | None, Depends(client_address_header)]


class Caller:
    """A dependency: the platform behind the request's key, which must hold `scope`. Every
    request reads its key, so a revoked key stops working at once."""

    def __init__(self, scope: str) -> None:
        self.scope = scope

    def __call__(
        self,
        request: Request,
        authorization: Annotated[str | None, Header(description="Bearer <api key>")] = None,
    ) -> Principal:
        found = platforms.authenticate(authorization, tally_of(request).uow())
        found.require(self.scope)
        request.scope["state"]["platform_id"] = found.platform_id
        return found


class KeyedCaller(Caller):
    """The same for routes whose change runs through `changes.run` and so re-checks its key
    in its own transaction (`UnitOfWork.credential`, set by `change_unit`): a revoked key
    still stops working at once, but the key is read from the database once per process,
    not once per request. Async, so a known key costs no thread hop."""

    async def __call__(  # type: ignore[override]
        self,
        request: Request,
        authorization: Annotated[str | None, Header(description="Bearer <api key>")] = None,
    ) -> Principal:
        state = request.app.state
        cache: dict[bytes, Principal] | None = getattr(state, "principals", None)
        if cache is None:
            cache = state.principals = {}
        digest = hashlib.sha256(authorization.encode()).digest() if authorization else b""
        found = cache.get(digest) if digest else None
        if found is None:
            found = await run_in_threadpool(
                platforms.authenticate, authorization, tally_of(request).uow()
            )
            if len(cache) >= PRINCIPALS_MAX:
                cache.clear()
            cache[digest] = found
        found.require(self.scope)
        request.scope["state"]["platform_id"] = found.platform_id
        return found


def change_unit(tally: Tally, who: Principal) -> UnitOfWork:
    """A unit of work whose change checks, in its own transaction, that `who`'s key is still
    in force (for principals from KeyedCaller)."""
    unit = tally.uow()
    unit.credential = who.key_prefix
    return unit


Read = Annotated[Principal, Depends(Caller("read"))]
Spend = Annotated[Principal, Depends(Caller("spend"))]
Grant = Annotated[Principal, Depends(Caller("grant"))]
Support = Annotated[Principal, Depends(Caller("support"))]
SpendChange = Annotated[Principal, Depends(KeyedCaller("spend"))]
GrantChange = Annotated[Principal, Depends(KeyedCaller("grant"))]
SupportChange = Annotated[Principal, Depends(KeyedCaller("support"))]

AccountId = Annotated[str, Path(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9._:@-]+$")]
ObjectId = Annotated[str, Path(min_length=1, max_length=64)]
IdempotencyKey = Annotated[
    str | None,
    Header(
        alias="Idempotency-Key",
        max_length=values.IDEMPOTENCY_KEY_MAX_LENGTH,
        description="required: the same key with the same request answers the first result",
    ),
]
Limit = Annotated[int, Query(ge=1, le=ledger.PAGE_MAX)]
Cursor = Annotated[str | None, Query(max_length=64)]


def json_response(data: Any, status: int = 200, *, replayed: bool = False) -> Response:
    body = json.dumps(data, ensure_ascii=False, separators=(",", ":")).encode()
    headers = {"Idempotent-Replayed": "true"} if replayed else None
    return Response(body, status, headers=headers, media_type="application/json")


def _answer(data: Any, unit: UnitOfWork, status: int = 200) -> Response:
    return json_response(data, status, replayed=unit.replayed)


def require_key(given: str | None) -> str:
    if given is None:
        raise IdempotencyKeyRequired("send an Idempotency-Key header with every POST")
    return values.idempotency_key(given)


def _priced(
    tally: Tally, body: schemas.HoldIn | schemas.DebitIn
) -> tuple[int, str | None, int | None]:
    """The credits a request asks for: `{amount}` as is, `{tool, quantity}` at catalog price."""
    if body.tool is None:
        assert body.amount is not None
        return body.amount, None, None
    assert body.quantity is not None
    return tally.catalog.tool(body.tool).cost(body.quantity), body.tool, body.quantity


router = APIRouter(prefix="/v1", responses=ERRORS)

# --- accounts -----------------------------------------------------------------------------


@router.put("/accounts/{account_id}", response_model=schemas.AccountOut, tags=["accounts"])
def put_account(
    tally: App,
    account_id: AccountId,
    _: Grant,
    body: Annotated[schemas.AccountIn | None, Body()] = None,
) -> Response:
    account = ledger.put_account(account_id, body.email if body else None, tally.uow())
    return json_response(account_view(account))


@router.get("/accounts/{account_id}/balance", response_model=schemas.BalanceOut, tags=["accounts"])
def balance(
    tally: App,
    account_id: AccountId,
    _: Read,
    at: Annotated[str | None, Query(max_length=64)] = None,
) -> Response:
    when = None if at is None else values.parse_time(at, field="at")
    return json_response(balance_view(ledger.get_balance(account_id, tally.uow(), at=when)))


@router.get("/accounts/{account_id}/lots", response_model=schemas.LotList, tags=["accounts"])
def lots(
    tally: App,
    account_id: AccountId,
    who: Read,
    limit: Limit = DEFAULT_PAGE,
    starting_after: Cursor = None,
) -> Response:
    page, now = ledger.list_lots(
        account_id, tally.uow(), limit=limit, starting_after=starting_after
    )
    data = [lot_view(lot, now, who.platform_id) for lot in page.items]
    return json_response({"data": data, "has_more": page.has_more})


@router.get("/accounts/{account_id}/entries", response_model=schemas.EntryList, tags=["accounts"])
def entries(
    tally: App,
    account_id: AccountId,
    who: Read,
    limit: Limit = DEFAULT_PAGE,
    starting_after: Cursor = None,
) -> Response:
    page = ledger.list_entries(account_id, tally.uow(), limit=limit, starting_after=starting_after)
    data = [entry_view(entry, who.platform_id) for entry in page.items]
    return json_response({"data": data, "has_more": page.has_more})


# --- credits ------------------------------------------------------------------------------


@router.post(
    "/accounts/{account_id}/grants",
    status_code=201,
    response_model=schemas.LotOut,
    tags=["credits"],
)
def grant(
    tally: App,
    account_id: AccountId,
    body: schemas.GrantIn,
    who: GrantChange,
    idempotency_key: IdempotencyKey = None,
) -> Response:
    key = require_key(idempotency_key)
    expires_at = None if body.expires_at is None else values.parse_time(body.expires_at)
    unit = change_unit(tally, who)
    lot = ledger.grant(
        ledger.GrantCredits(
            account_id=account_id,
            amount=body.amount,
            source=body.source,
            expires_at=expires_at,
            valid_for=body.valid_for,
            priority=body.priority,
            reason=body.reason,
            metadata=body.metadata,
            idempotency_key=key,
            platform_id=who.platform_id,
        ),
        unit,
    )
    return _answer(lot_view(lot, tally.clock()), unit, 201)


@router.post("/lots/{lot_id}/void", response_model=schemas.LotOut, tags=["credits"])
def void(
    tally: App,
    lot_id: ObjectId,
    body: schemas.VoidIn,
    who: SupportChange,
    idempotency_key: IdempotencyKey = None,
) -> Response:
    key = require_key(idempotency_key)
    unit = change_unit(tally, who)
    lot = ledger.void_lot(
        ledger.VoidLot(
            lot_id=lot_id, reason=body.reason, idempotency_key=key, platform_id=who.platform_id
        ),
        unit,
    )
    return _answer(lot_view(lot, tally.clock(), who.platform_id), unit)


# --- spending -----------------------------------------------------------------------------


@router.post(
    "/accounts/{account_id}/holds",
    status_code=201,
    response_model=schemas.HoldOut,
    responses=SPEND_ERRORS,
    tags=["spending"],
)
async def hold(
    tally: App,
    account_id: AccountId,
    body: schemas.HoldIn,
    who: SpendChange,
    idempotency_key: IdempotencyKey = None,
) -> Response:
    key = require_key(idempotency_key)
    amount, tool, quantity = _priced(tally, body)
    unit = change_unit(tally, who)
    placed = await run_async(
        unit,
        ledger.place_hold_change(
            ledger.PlaceHold(
                account_id=account_id,
                amount=amount,
                ttl_seconds=body.ttl_seconds,
                metadata=body.metadata,
                tool=tool,
                quantity=quantity,
                idempotency_key=key,
                platform_id=who.platform_id,
            )
        ),
    )
    return _answer(hold_view(placed, tally.clock()), unit, 201)


@router.post("/holds/{hold_id}/capture", response_model=schemas.HoldOut, tags=["spending"])
async def capture(
    tally: App,
    hold_id: ObjectId,
    who: SpendChange,
    body: Annotated[schemas.CaptureIn | None, Body()] = None,
    idempotency_key: IdempotencyKey = None,
) -> Response:
    key = require_key(idempotency_key)
    unit = change_unit(tally, who)
    captured = await run_async(
        unit,
        ledger.capture_change(
            ledger.CaptureHold(
                hold_id=hold_id,
                amount=body.amount if body else None,
                quantity=body.quantity if body else None,
                idempotency_key=key,
                platform_id=who.platform_id,
            )
        ),
    )
    return _answer(hold_view(captured, tally.clock()), unit)


@router.post("/holds/{hold_id}/release", response_model=schemas.HoldOut, tags=["spending"])
async def release(
    tally: App,
    hold_id: ObjectId,
    who: SpendChange,
    body: Annotated[schemas.ReleaseIn | None, Body()] = None,
    idempotency_key: IdempotencyKey = None,
) -> Response:
    key = require_key(idempotency_key)
    unit = change_unit(tally, who)
    released = await run_async(
        unit,
        ledger.release_change(
            ledger.ReleaseHold(
                hold_id=hold_id,
                reason=body.reason if body else None,
                idempotency_key=key,
                platform_id=who.platform_id,
            )
        ),
    )
    return _answer(hold_view(released, tally.clock()), unit)


@router.post(
    "/accounts/{account_id}/debits",
    status_code=201,
    response_model=schemas.DebitOut,
    responses=SPEND_ERRORS,
    tags=["spending"],
)
async def debit(
    tally: App,
    account_id: AccountId,
    body: schemas.DebitIn,
    who: SpendChange,
    idempotency_key: IdempotencyKey = None,
) -> Response:
    key = require_key(idempotency_key)
    amount, tool, quantity = _priced(tally, body)
    unit = change_unit(tally, who)
    done = await run_async(
        unit,
        ledger.debit_change(
            ledger.DebitCredits(
                account_id=account_id,
                amount=amount,
                metadata=body.metadata,
                tool=tool,
                quantity=quantity,
                idempotency_key=key,
                platform_id=who.platform_id,
            )
        ),
    )
    return _answer(debit_view(done), unit, 201)


# --- catalog ------------------------------------------------------------------------------


@router.get("/tools", response_model=schemas.ToolList, tags=["catalog"])
def tools(tally: App, _: Read) -> Response:
    data = [tool_view(tool) for tool in tally.catalog.tools.values()]
    return json_response({"data": data, "has_more": False})


@router.get("/packages", response_model=schemas.PackageList, tags=["catalog"])
def packages(tally: App, _: Read) -> Response:
    data = [package_view(package) for package in tally.catalog.packages.values()]
    return json_response({"data": data, "has_more": False})


@router.get("/plans", response_model=schemas.PlanList, tags=["catalog"])
def plans(_: Read) -> Response:
    return json_response({"data": [], "has_more": False})
