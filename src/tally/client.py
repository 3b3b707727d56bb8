"""The Python SDK: `Tally` and `AsyncTally`, for AI tool sites that check and spend credits.

    from tally.client import Tally

    tally = Tally("https://credits.example.com", api_key="tly_...")
    with tally.charge("user-42", tool="portrait", quantity=4) as job:
        images = generate(4)          # raises? the hold is released, nothing is spent
        job.delivered(len(images))    # fewer than 4? only those are captured

Every POST carries an `Idempotency-Key` (made once per call, reused on its retries), so network
errors and 5xx answers are retried with backoff without ever charging twice. Errors are raised
as Tally's own error classes (`tally.domain.errors`), chosen by the server's `code`.
"""

from __future__ import annotations

import asyncio
import random
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from typing import Any, Final, Generic, TypeVar

import httpx
from pydantic import BaseModel

from tally.domain.errors import TallyError, by_code
from tally.schemas import (
    AccountOut,
    BalanceOut,
    DebitOut,
    EntryList,
    HoldOut,
    LotList,
    LotOut,
    PackageList,
    ToolList,
)

__all__ = [
    "AsyncTally",
    "Job",
    "Tally",
    "TallyError",
]

DEFAULT_TIMEOUT: Final = 10.0
DEFAULT_RETRIES: Final = 5
#: Backoff before retry n is BACKOFF_BASE * 2**n seconds (with jitter), at most BACKOFF_MAX:
#: five retries ride out about eight seconds of a server restarting.
BACKOFF_BASE: Final = 0.25
BACKOFF_MAX: Final = 4.0
#: Answers worth retrying with the same key: the server or database was briefly away, or the
#: same key is still being processed by an earlier attempt.
_RETRY_STATUSES: Final = frozenset({429, 500, 502, 503, 504})

M = TypeVar("M", bound=BaseModel)
_ERRORS: Final = by_code()


@dataclass(frozen=True)
class _Call(Generic[M]):
    """One API call, described once for both clients."""

    method: str
    path: str
    answer: type[M]
    json: dict[str, Any] | None = None
    params: dict[str, Any] | None = None
    key: str | None = None  # set for every POST

    def headers(self) -> dict[str, str]:
        return {"Idempotency-Key": self.key} if self.key is not None else {}


def _new_key() -> str:
    return f"sdk-{uuid.uuid4().hex}"


def _clean(values: dict[str, Any]) -> dict[str, Any]:
    return {name: value for name, value in values.items() if value is not None}


def _error(response: httpx.Response) -> TallyError:
    """The server's problem+json as the matching error class, with its members."""
    try:
        body = response.json()
    except ValueError:
        body = {}
    if not isinstance(body, dict):
        body = {}
    code = str(body.get("code", ""))
    kind = _ERRORS.get(code, TallyError)
    error = kind.__new__(kind)
    extra = {
        name: value
        for name, value in body.items()
        if name not in {"type", "title", "status", "code", "detail"}
    }
    TallyError.__init__(error, str(body.get("detail") or response.reason_phrase), **extra)
    if kind is TallyError:  # a code this SDK does not know: keep the server's words
        error.code = code or "http_error"  # type: ignore[misc]
        error.status = response.status_code  # type: ignore[misc]
    return error


def _retryable(response: httpx.Response) -> bool:
    return response.status_code in _RETRY_STATUSES


def _delay(attempt: int, response: httpx.Response | None) -> float:
    if response is not None and response.status_code == 429:
        after = response.headers.get("retry-after", "")
        if after.isdigit():
            return min(float(after), BACKOFF_MAX * 4)
    jitter = random.uniform(0.5, 1.0)  # noqa: S311 - spreads retries, not a secret
    return float(min(BACKOFF_MAX, BACKOFF_BASE * 2**attempt) * jitter)


class _Calls:
    """What each endpoint takes and answers (docs/rules.md §3); the clients only send them."""

    @staticmethod
    def put_account(account_id: str, email: str | None) -> _Call[AccountOut]:
        return _Call("PUT", f"/v1/accounts/{account_id}", AccountOut, json=_clean({"email": email}))

    @staticmethod
    def balance(account_id: str, at: str | None) -> _Call[BalanceOut]:
        return _Call(
            "GET", f"/v1/accounts/{account_id}/balance", BalanceOut, params=_clean({"at": at})
        )

    @staticmethod
    def lots(account_id: str, limit: int, starting_after: str | None) -> _Call[LotList]:
        params = _clean({"limit": limit, "starting_after": starting_after})
        return _Call("GET", f"/v1/accounts/{account_id}/lots", LotList, params=params)

    @staticmethod
    def entries(account_id: str, limit: int, starting_after: str | None) -> _Call[EntryList]:
        params = _clean({"limit": limit, "starting_after": starting_after})
        return _Call("GET", f"/v1/accounts/{account_id}/entries", EntryList, params=params)

    @staticmethod
    def grant(account_id: str, body: dict[str, Any], key: str | None) -> _Call[LotOut]:
        path = f"/v1/accounts/{account_id}/grants"
        return _Call("POST", path, LotOut, json=_clean(body), key=key or _new_key())

    @staticmethod
    def void_lot(lot_id: str, reason: str, key: str | None) -> _Call[LotOut]:
        path = f"/v1/lots/{lot_id}/void"
        return _Call("POST", path, LotOut, json={"reason": reason}, key=key or _new_key())

    @staticmethod
    def hold(account_id: str, body: dict[str, Any], key: str | None) -> _Call[HoldOut]:
        path = f"/v1/accounts/{account_id}/holds"
        return _Call("POST", path, HoldOut, json=_clean(body), key=key or _new_key())

    @staticmethod
    def capture(hold_id: str, body: dict[str, Any], key: str | None) -> _Call[HoldOut]:
        path = f"/v1/holds/{hold_id}/capture"
        return _Call("POST", path, HoldOut, json=_clean(body), key=key or _new_key())

    @staticmethod
    def release(hold_id: str, reason: str | None, key: str | None) -> _Call[HoldOut]:
        path = f"/v1/holds/{hold_id}/release"
        body = _clean({"reason": reason})
        return _Call("POST", path, HoldOut, json=body, key=key or _new_key())

    @staticmethod
    def debit(account_id: str, body: dict[str, Any], key: str | None) -> _Call[DebitOut]:
        path = f"/v1/accounts/{account_id}/debits"
        return _Call("POST", path, DebitOut, json=_clean(body), key=key or _new_key())

    @staticmethod
    def tools() -> _Call[ToolList]:
        return _Call("GET", "/v1/tools", ToolList)

    @staticmethod
    def packages() -> _Call[PackageList]:
        return _Call("GET", "/v1/packages", PackageList)


def _spend_body(
    tool: str | None, quantity: int | None, amount: int | None, **more: Any
) -> dict[str, Any]:
    return {"tool": tool, "quantity": quantity, "amount": amount, **more}


@dataclass
class Job:
    """A held charge for one job. Call `delivered(n)` if the tool produced fewer outputs than
    it asked for (for a charge by `amount`, n is credits); leaving the block captures them (or
    all; none releases the hold), an exception releases the hold."""

    hold: HoldOut
    quantity: int | None
    key: str
    _delivered: int | None = field(default=None, repr=False)
    result: HoldOut | None = None

    def delivered(self, count: int) -> None:
        if isinstance(count, bool) or not isinstance(count, int) or count < 0:
            raise ValueError("delivered(count) takes a whole number of outputs, 0 or more")
        limit = self.quantity if self.quantity is not None else self.hold.amount
        if count > limit:
            raise ValueError(f"delivered({count}) is more than the {limit} held")
        self._delivered = count

    def _settlement(self) -> tuple[str, dict[str, Any]]:
        """('capture', body) or ('release', {}) for a clean exit."""
        whole = self.quantity if self.quantity is not None else self.hold.amount
        if self._delivered is None or self._delivered == whole:
            return "capture", {}
        if self._delivered == 0:
            return "release", {}
        # A charge by tool counts outputs; a charge by amount counts credits.
        unit = "quantity" if self.quantity is not None else "amount"
        return "capture", {unit: self._delivered}


class Tally:
    """A blocking client; one per process is enough (it pools keep-alive connections)."""

    def __init__(
        self,
        base_url: str,
        api_key: str,
        *,
        timeout: float = DEFAULT_TIMEOUT,
        max_retries: int = DEFAULT_RETRIES,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        assert max_retries >= 0
        self.max_retries = max_retries
        self._http = httpx.Client(
            base_url=base_url.rstrip("/"),
            headers={"Authorization": f"Bearer {api_key}", "User-Agent": "tally-python"},
            timeout=timeout,
            transport=transport,
        )

    def __enter__(self) -> Tally:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def _send(self, call: _Call[M]) -> M:
        response: httpx.Response | None = None
        for attempt in range(self.max_retries + 1):
            last = attempt == self.max_retries
            try:
                response = self._http.request(
                    call.method,
                    call.path,
                    json=call.json,
                    params=call.params,
                    headers=call.headers(),
                )
            except httpx.TransportError:
                if last:
                    raise
                time.sleep(_delay(attempt, None))
                continue
            if response.is_success:
                return call.answer.model_validate_json(response.content)
            if last or not _retryable(response):
                raise _error(response)
            time.sleep(_delay(attempt, response))
        raise AssertionError("unreachable: the last attempt returns or raises")

    # --- the API ------------------------------------------------------------------------------

    def put_account(self, account_id: str, *, email: str | None = None) -> AccountOut:
        return self._send(_Calls.put_account(account_id, email))

    def balance(self, account_id: str, *, at: str | None = None) -> BalanceOut:
        return self._send(_Calls.balance(account_id, at))

    def lots(
        self, account_id: str, *, limit: int = 100, starting_after: str | None = None
    ) -> LotList:
        return self._send(_Calls.lots(account_id, limit, starting_after))

    def entries(
        self, account_id: str, *, limit: int = 100, starting_after: str | None = None
    ) -> EntryList:
        return self._send(_Calls.entries(account_id, limit, starting_after))

    def grant(
        self,
        account_id: str,
        amount: int,
        *,
        reason: str,
        source: str | None = None,
        valid_for: str | None = None,
        expires_at: str | None = None,
        priority: int | None = None,
        metadata: dict[str, Any] | None = None,
        idempotency_key: str | None = None,
    ) -> LotOut:
        body = {
            "amount": amount,
            "reason": reason,
            "source": source,
            "valid_for": valid_for,
            "expires_at": expires_at,
            "priority": priority,
            "metadata": metadata,
        }
        return self._send(_Calls.grant(account_id, body, idempotency_key))

    def void_lot(self, lot_id: str, *, reason: str, idempotency_key: str | None = None) -> LotOut:
        return self._send(_Calls.void_lot(lot_id, reason, idempotency_key))

    def hold(
        self,
        account_id: str,
        *,
        tool: str | None = None,
        quantity: int | None = None,
        amount: int | None = None,
        ttl_seconds: int | None = None,
        metadata: dict[str, Any] | None = None,
        idempotency_key: str | None = None,
    ) -> HoldOut:
        body = _spend_body(tool, quantity, amount, ttl_seconds=ttl_seconds, metadata=metadata)
        return self._send(_Calls.hold(account_id, body, idempotency_key))

    def capture(
        self,
        hold_id: str,
        *,
        quantity: int | None = None,
        amount: int | None = None,
        idempotency_key: str | None = None,
    ) -> HoldOut:
        body = {"quantity": quantity, "amount": amount}
        return self._send(_Calls.capture(hold_id, body, idempotency_key))

    def release(
        self, hold_id: str, *, reason: str | None = None, idempotency_key: str | None = None
    ) -> HoldOut:
        return self._send(_Calls.release(hold_id, reason, idempotency_key))

    def debit(
        self,
        account_id: str,
        *,
        tool: str | None = None,
        quantity: int | None = None,
        amount: int | None = None,
        metadata: dict[str, Any] | None = None,
        idempotency_key: str | None = None,
    ) -> DebitOut:
        body = _spend_body(tool, quantity, amount, metadata=metadata)
        return self._send(_Calls.debit(account_id, body, idempotency_key))

    def tools(self) -> ToolList:
        return self._send(_Calls.tools())

    def packages(self) -> PackageList:
        return self._send(_Calls.packages())

    @contextmanager
    def charge(
        self,
        account_id: str,
        *,
        tool: str | None = None,
        quantity: int | None = None,
        amount: int | None = None,
        ttl_seconds: int | None = None,
        metadata: dict[str, Any] | None = None,
    ) -> Iterator[Job]:
        """Hold on enter; capture what was delivered on a clean exit; release on an error."""
        key = _new_key()
        held = self.hold(
            account_id,
            tool=tool,
            quantity=quantity,
            amount=amount,
            ttl_seconds=ttl_seconds,
            metadata=metadata,
            idempotency_key=f"{key}-hold",
        )
        job = Job(held, quantity, key)
        try:
            yield job
        except BaseException:
            self.release(held.id, reason="job failed", idempotency_key=f"{key}-release")
            raise
        action, body = job._settlement()
        if action == "release":
            job.result = self.release(
                held.id, reason="nothing delivered", idempotency_key=f"{key}-release"
            )
        else:
            job.result = self.capture(held.id, idempotency_key=f"{key}-capture", **body)


class AsyncTally:
    """The same client for asyncio code."""

    def __init__(
        self,
        base_url: str,
        api_key: str,
        *,
        timeout: float = DEFAULT_TIMEOUT,
        max_retries: int = DEFAULT_RETRIES,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        assert max_retries >= 0
        self.max_retries = max_retries
        self._http = httpx.AsyncClient(
            base_url=base_url.rstrip("/"),
            headers={"Authorization": f"Bearer {api_key}", "User-Agent": "tally-python"},
            timeout=timeout,
            transport=transport,
        )

    async def __aenter__(self) -> AsyncTally:
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.close()

    async def close(self) -> None:
        await self._http.aclose()

    async def _send(self, call: _Call[M]) -> M:
        response: httpx.Response | None = None
        for attempt in range(self.max_retries + 1):
            last = attempt == self.max_retries
            try:
                response = await self._http.request(
                    call.method,
                    call.path,
                    json=call.json,
                    params=call.params,
                    headers=call.headers(),
                )
            except httpx.TransportError:
                if last:
                    raise
                await asyncio.sleep(_delay(attempt, None))
                continue
            if response.is_success:
                return call.answer.model_validate_json(response.content)
            if last or not _retryable(response):
                raise _error(response)
            await asyncio.sleep(_delay(attempt, response))
        raise AssertionError("unreachable: the last attempt returns or raises")

    async def put_account(self, account_id: str, *, email: str | None = None) -> AccountOut:
        return await self._send(_Calls.put_account(account_id, email))

    async def balance(self, account_id: str, *, at: str | None = None) -> BalanceOut:
        return await self._send(_Calls.balance(account_id, at))

    async def lots(
        self, account_id: str, *, limit: int = 100, starting_after: str | None = None
    ) -> LotList:
        return await self._send(_Calls.lots(account_id, limit, starting_after))

    async def entries(
        self, account_id: str, *, limit: int = 100, starting_after: str | None = None
    ) -> EntryList:
        return await self._send(_Calls.entries(account_id, limit, starting_after))

    async def grant(
        self,
        account_id: str,
        amount: int,
        *,
        reason: str,
        source: str | None = None,
        valid_for: str | None = None,
        expires_at: str | None = None,
        priority: int | None = None,
        metadata: dict[str, Any] | None = None,
        idempotency_key: str | None = None,
    ) -> LotOut:
        body = {
            "amount": amount,
            "reason": reason,
            "source": source,
            "valid_for": valid_for,
            "expires_at": expires_at,
            "priority": priority,
            "metadata": metadata,
        }
        return await self._send(_Calls.grant(account_id, body, idempotency_key))

    async def void_lot(
        self, lot_id: str, *, reason: str, idempotency_key: str | None = None
    ) -> LotOut:
        return await self._send(_Calls.void_lot(lot_id, reason, idempotency_key))

    async def hold(
        self,
        account_id: str,
        *,
        tool: str | None = None,
        quantity: int | None = None,
        amount: int | None = None,
        ttl_seconds: int | None = None,
        metadata: dict[str, Any] | None = None,
        idempotency_key: str | None = None,
    ) -> HoldOut:
        body = _spend_body(tool, quantity, amount, ttl_seconds=ttl_seconds, metadata=metadata)
        return await self._send(_Calls.hold(account_id, body, idempotency_key))

    async def capture(
        self,
        hold_id: str,
        *,
        quantity: int | None = None,
        amount: int | None = None,
        idempotency_key: str | None = None,
    ) -> HoldOut:
        body = {"quantity": quantity, "amount": amount}
        return await self._send(_Calls.capture(hold_id, body, idempotency_key))

    async def release(
        self, hold_id: str, *, reason: str | None = None, idempotency_key: str | None = None
    ) -> HoldOut:
        return await self._send(_Calls.release(hold_id, reason, idempotency_key))

    async def debit(
        self,
        account_id: str,
        *,
        tool: str | None = None,
        quantity: int | None = None,
        amount: int | None = None,
        metadata: dict[str, Any] | None = None,
        idempotency_key: str | None = None,
    ) -> DebitOut:
        body = _spend_body(tool, quantity, amount, metadata=metadata)
        return await self._send(_Calls.debit(account_id, body, idempotency_key))

    async def tools(self) -> ToolList:
        return await self._send(_Calls.tools())

    async def packages(self) -> PackageList:
        return await self._send(_Calls.packages())

    @asynccontextmanager
    async def charge(
        self,
        account_id: str,
        *,
        tool: str | None = None,
        quantity: int | None = None,
        amount: int | None = None,
        ttl_seconds: int | None = None,
        metadata: dict[str, Any] | None = None,
    ) -> AsyncIterator[Job]:
        """Hold on enter; capture what was delivered on a clean exit; release on an error."""
        key = _new_key()
        held = await self.hold(
            account_id,
            tool=tool,
            quantity=quantity,
            amount=amount,
            ttl_seconds=ttl_seconds,
            metadata=metadata,
            idempotency_key=f"{key}-hold",
        )
        job = Job(held, quantity, key)
        try:
            yield job
        except BaseException:
            await self.release(held.id, reason="job failed", idempotency_key=f"{key}-release")
            raise
        action, body = job._settlement()
        if action == "release":
            job.result = await self.release(
                held.id, reason="nothing delivered", idempotency_key=f"{key}-release"
            )
        else:
            job.result = await self.capture(held.id, idempotency_key=f"{key}-capture", **body)
