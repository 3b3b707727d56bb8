"""The edge of every HTTP request, as plain ASGI middleware: a request id, a body limit, one
structured log line, the request metrics, and a problem+json 500 for anything unexpected; and
what the routes read of the client there: its address, and the rate limit it tripped."""

from __future__ import annotations

import json
import re
import time
import uuid
from typing import Any, Final

import structlog
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from tally.domain import values
from tally.domain.errors import (
    InternalError,
    InvalidClientAddress,
    PayloadTooLarge,
    RateLimited,
    TallyError,
)
from tally.entrypoints.http.metrics import Metrics

log = structlog.get_logger("tally.http")

#: Every request body is small JSON; anything larger is refused before it is parsed.
MAX_BODY_BYTES: Final = 64 * 1024
_REQUEST_ID: Final = re.compile(r"[A-Za-z0-9._:-]{1,128}")
PROBLEM_JSON: Final = b"application/problem+json"


def problem_body(error: TallyError, request_id: str | None = None) -> bytes:
    body = error.problem()
    if request_id:
        body["request_id"] = request_id
    return json.dumps(body, ensure_ascii=False).encode()


def peer_address(scope: Scope) -> values.ClientAddress | None:
    """The address the pages' rate limits count a visitor under: the connection's peer (behind
    a proxy, what uvicorn takes from a trusted `X-Forwarded-For`), normalised; None when the
    server names none it can parse (a Unix socket, a test client)."""
    client = scope.get("client")
    if not client:
        return None
    try:
        return values.client_address(str(client[0]))
    except InvalidClientAddress:
        return None


def note_rate_limited(scope: Scope, error: RateLimited) -> None:
    """Tell the edge which limit refused this request: it counts it in
    `tally_rate_limited_total{limit}` and logs a `rate_limited` event."""
    scope.setdefault("state", {})["rate_limited"] = (error.limit or "unnamed", error.retry_after)


class Edge:
    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        given = _header(scope, b"x-request-id")
        request_id = given if given and _REQUEST_ID.fullmatch(given) else uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = request_id
        status = 500
        response_started = False

        async def send_with_id(message: Message) -> None:
            nonlocal status, response_started
            if message["type"] == "http.response.start":
                status = message["status"]
                response_started = True
                headers = list(message.get("headers", []))
                headers.append((b"x-request-id", request_id.encode()))
                message = {**message, "headers": headers}
            await send(message)

        try:
            body = await _read_body(scope, receive)
            if body is None:
                await _send_problem(
                    send_with_id,
                    PayloadTooLarge(f"request bodies are at most {MAX_BODY_BYTES} bytes"),
                    request_id,
                )
            else:
                await self.app(scope, _replay(body, receive), send_with_id)
        except Exception:
            log.exception("unhandled_error", request_id=request_id)
            if not response_started:
                await _send_problem(
                    send_with_id,
                    InternalError("Tally failed to answer; the request id is in its log"),
                    request_id,
                )
        finally:
            elapsed = time.perf_counter() - started
            path = _route_of(scope)
            method = scope["method"]
            self.metrics.observe(method, path, status, elapsed)
            log.info(
                "request",
                request_id=request_id,
                method=method,
                route=path,
                status=status,
                duration_ms=round(elapsed * 1000, 2),
                platform_id=scope["state"].get("platform_id"),
            )
            tripped = scope["state"].get("rate_limited")
            if tripped is not None:
                limit, retry_after = tripped
                self.metrics.rate_limited.labels(limit).inc()
                log.warning(
                    "rate_limited",
                    request_id=request_id,
                    limit=limit,
                    route=path,
                    retry_after=retry_after,
                    platform_id=scope["state"].get("platform_id"),
                )


def _route_of(scope: Scope) -> str:
    """The matched route's template, never the raw path (it may hold a code). FastAPI puts
    its own routes in the scope; /openapi.json and /docs are plain Starlette routes, which
    leave only their endpoint there."""
    route = scope.get("route")
    endpoint = scope.get("endpoint")
    if route is None and endpoint is not None and "app" in scope:
        found = (r for r in scope["app"].routes if getattr(r, "endpoint", None) is endpoint)
        route = next(found, None)
    return getattr(route, "path", None) or "unmatched"


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope["headers"]:
        if key == name:
            return str(value.decode("latin-1"))
    return None


async def _read_body(scope: Scope, receive: Receive) -> bytes | None:
    """The whole body, or None when it is over the limit (told by Content-Length or counted)."""
    length = _header(scope, b"content-length")
    if length is not None and length.isdigit() and int(length) > MAX_BODY_BYTES:
        return None
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] != "http.request":
            break  # the client went away; the app sees an empty body
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            return None
        chunks.append(chunk)
        if not message.get("more_body", False):
            break
    return b"".join(chunks)


def _replay(body: bytes, receive: Receive) -> Receive:
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


async def _send_problem(send: Send, error: TallyError, request_id: str) -> None:
    body = problem_body(error, request_id)
    headers: list[tuple[bytes, bytes]] = [
        (b"content-type", PROBLEM_JSON),
        (b"content-length", str(len(body)).encode()),
    ]
    start: dict[str, Any] = {"type": "http.response.start", "status": error.status}
    start["headers"] = headers
    await send(start)
    await send({"type": "http.response.body", "body": body})
