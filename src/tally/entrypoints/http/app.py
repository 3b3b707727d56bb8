"""The HTTP application (docs/rules.md §3): the v1 routes, operations endpoints, and the error
mapping that makes every failure RFC 9457 problem+json with Tally's `code`."""

from __future__ import annotations

import gc
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from typing import Final

from fastapi import FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException

from tally import logs, schemas
from tally.bootstrap import Tally, bootstrap
from tally.domain.errors import (
    InternalError,
    InvalidAmount,
    InvalidIdempotencyKey,
    InvalidInput,
    InvalidJson,
    MethodNotAllowed,
    NotFound,
    RateLimited,
    TallyError,
)
from tally.domain.values import IDEMPOTENCY_KEY_MAX_LENGTH, MAX_AMOUNT
from tally.entrypoints.http import admin, commerce, openapi, v1
from tally.entrypoints.http import orders as orders_http
from tally.entrypoints.http import refunds as refunds_http
from tally.entrypoints.http.edge import PROBLEM_JSON, Edge, note_rate_limited, problem_body
from tally.entrypoints.http.metrics import CONTENT_TYPE, Metrics
from tally.entrypoints.worker import Worker
from tally.service import ledger

#: At most this many validation errors are listed in one problem.
MAX_LISTED_ERRORS: Final = 20
_CREDIT_FIELDS: Final = frozenset({"amount", "quantity"})


def _problem(
    error: TallyError, request: Request, headers: Mapping[str, str] | None = None
) -> Response:
    extra = {**(headers or {})}
    if error.status == 401:
        extra["WWW-Authenticate"] = "Bearer"
    if isinstance(error, RateLimited):
        extra["Retry-After"] = str(error.retry_after)
        note_rate_limited(request.scope, error)
    return Response(
        problem_body(error, request.scope.get("state", {}).get("request_id")),
        error.status,
        media_type=PROBLEM_JSON.decode(),
        headers=extra or None,
    )


def _validation_error(error: RequestValidationError, request: Request) -> TallyError:
    found = error.errors()
    listed = [
        {"loc": [str(part) for part in e.get("loc", ())], "msg": e.get("msg"), "type": e["type"]}
        for e in found[:MAX_LISTED_ERRORS]
    ]
    if any(e["type"] == "json_invalid" for e in found):
        return InvalidJson("the body is not valid JSON", errors=listed)
    content_type = request.headers.get("content-type", "")
    if any(e["loc"] == ["body"] for e in listed) and "json" not in content_type:
        return InvalidJson("send the body as JSON, with Content-Type: application/json")
    if listed and all(e["loc"] and e["loc"][-1] in _CREDIT_FIELDS for e in listed):
        return InvalidAmount(
            f"credits and quantities are whole numbers from 1 to {MAX_AMOUNT}", errors=listed
        )
    if listed and all(e["loc"] == ["header", "Idempotency-Key"] for e in listed):
        # The same code as the keys the use cases refuse (an empty one, say).
        return InvalidIdempotencyKey(
            f"an idempotency key is 1-{IDEMPOTENCY_KEY_MAX_LENGTH} printable characters",
            errors=listed,
        )
    return InvalidInput("the request does not match the API", errors=listed)


def create_app(tally: Tally, *, worker: bool = False, owns: bool = False) -> FastAPI:
    """The API over one Tally. `worker`: run the scheduled jobs in this process; `owns`:
    close the Tally when the app stops."""
    metrics = Metrics(lambda: ledger.credit_totals(tally.uow()))

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        jobs = Worker(tally, metrics=metrics) if worker else None
        if jobs is not None:
            jobs.start()
        try:
            yield
        finally:
            if jobs is not None:
                jobs.stop()
            if owns:
                tally.close()

    app = FastAPI(
        title="Tally",
        version="1",
        summary="Credits for an ecosystem of AI tool sites",
        lifespan=lifespan,
        responses={500: {"model": schemas.Problem, "description": "A bug, logged by request id"}},
    )
    app.state.tally = tally
    app.add_middleware(Edge, metrics=metrics)
    app.include_router(v1.router)
    app.include_router(commerce.router)
    if not tally.settings.production:
        app.include_router(commerce.development_router)
    app.include_router(orders_http.router)  # /v1/orders, /lost-code
    app.include_router(admin.router)  # the support console, /admin
    app.include_router(refunds_http.router)  # /v1/orders/{id}/refund
    openapi.install(app, lambda: tally.catalog.tools)

    @app.exception_handler(TallyError)
    async def refused(request: Request, error: TallyError) -> Response:
        return _problem(error, request)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, error: RequestValidationError) -> Response:
        return _problem(_validation_error(error, request), request)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, error: HTTPException) -> Response:
        known: dict[int, TallyError] = {
            400: InvalidJson(str(error.detail)),
            404: NotFound("no such endpoint"),
            405: MethodNotAllowed(f"{request.method} is not allowed here"),
        }
        # A 405 keeps Starlette's Allow header: RFC 9110 requires it.
        allow = (
            {"Allow": error.headers["Allow"]}
            if error.headers and "Allow" in error.headers
            else None
        )
        return _problem(known.get(error.status_code, InternalError()), request, allow)

    @app.get("/healthz", response_model=schemas.Health, tags=["operations"])
    def healthz() -> Response:
        ledger.ping(tally.uow())
        return v1.json_response({"status": "ok", "database": "ok"})

    @app.get("/metrics", tags=["operations"], response_class=Response)
    def prometheus() -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE)

    return app


#: Allocations between young-generation collections (Python's default is 700): a request
#: allocates hundreds of short-lived objects, so the default collects several times a request.
GC_YOUNG_THRESHOLD: Final = 10_000


def quiet_garbage_collector() -> None:
    """Keep garbage collection from stalling requests. The app's start-up objects (routes,
    models, schemas, statements: over a hundred thousand) never die, yet every full collection
    walked them all: 80-120 ms pauses that held 5% of requests at 32 clients. Frozen, the
    collector skips them; collections also run less often."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(GC_YOUNG_THRESHOLD, 10, 10)


def app_from_env() -> FastAPI:
    """The app `tally serve` runs (and `uvicorn --factory` with several worker processes)."""
    logs.configure()
    tally = bootstrap()
    app = create_app(tally, worker=tally.settings.worker == "inline", owns=True)
    quiet_garbage_collector()
    return app
