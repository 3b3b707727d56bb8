"""The HTTP app in-process, for what a real server cannot be made to do on demand: a bug's
500 answer, and the edge's limits with exact sizes."""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx
import pytest

from tally.adapters.catalog_file import builtin
from tally.adapters.db.engine import Database
from tally.bootstrap import Tally, group_commit
from tally.config import Settings
from tally.entrypoints.http import edge
from tally.entrypoints.http.app import create_app
from tally.service import ledger, platforms
from tests.support import FakeClock

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
async def http(db: Database, clock: FakeClock) -> AsyncIterator[httpx.AsyncClient]:
    tally = Tally(Settings(), db, clock, group_commit(db, clock), builtin())
    key = platforms.create_platform("inproc", "admin", tally.uow()).plaintext
    transport = httpx.ASGITransport(app=create_app(tally))
    async with httpx.AsyncClient(
        transport=transport,
        base_url="http://tally.test",
        headers={"Authorization": f"Bearer {key}"},
    ) as client:
        yield client


async def test_a_bug_answers_500_problem_json_without_a_stack_trace(
    http: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(*_: object, **__: object) -> None:
        raise RuntimeError("secret internals")

    monkeypatch.setattr(ledger, "get_balance", broken)
    answer = await http.get("/v1/accounts/ana/balance", headers={"X-Request-Id": "trace-me-1"})
    assert answer.status_code == 500
    assert answer.headers["content-type"] == "application/problem+json"
    assert answer.headers["x-request-id"] == "trace-me-1"
    body = answer.json()
    assert body["code"] == "internal_error"
    assert body["request_id"] == "trace-me-1"
    assert "secret internals" not in answer.text
    assert "Traceback" not in answer.text


async def test_the_body_limit_is_exact(http: httpx.AsyncClient) -> None:
    headers = {"Idempotency-Key": "big", "Content-Type": "application/json"}
    filler = '{"amount": 1, "reason": "x", "metadata": {"pad": "%s"}}'
    empty = len(filler % "")
    at_limit = (filler % ("a" * (edge.MAX_BODY_BYTES - empty))).encode()
    over = (filler % ("a" * (edge.MAX_BODY_BYTES - empty + 1))).encode()
    assert len(at_limit) == edge.MAX_BODY_BYTES
    # At the limit the body is read and judged on its merits (metadata is over 4 KiB).
    judged = await http.post("/v1/accounts/ana/grants", content=at_limit, headers=headers)
    assert judged.status_code == 422
    refused = await http.post("/v1/accounts/ana/grants", content=over, headers=headers)
    assert refused.status_code == 413
    assert refused.json()["code"] == "payload_too_large"


async def test_a_wrong_content_type_is_named(http: httpx.AsyncClient) -> None:
    answer = await http.post(
        "/v1/accounts/ana/grants",
        content=b"amount=1",
        headers={"Idempotency-Key": "form", "Content-Type": "application/x-www-form-urlencoded"},
    )
    assert answer.status_code == 400
    assert answer.json()["code"] == "invalid_json"
