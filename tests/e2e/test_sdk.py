"""The Python SDK against a real server: typed answers, errors as Tally's classes, charge()
capturing, partly capturing and releasing, and retries that never charge twice."""

from __future__ import annotations

import asyncio
import secrets
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tally.client import AsyncTally, Tally
from tally.domain.errors import (
    AccountNotFound,
    ApiKeyInvalid,
    IdempotencyKeyReused,
    InsufficientCredits,
    UnknownTool,
)
from tests.conftest import DATABASES
from tests.e2e.server import Server, running


def _account() -> str:
    return f"sdk-{secrets.token_hex(4)}"


@pytest.fixture(scope="module")
def client(server: Server, admin_key: str) -> Iterator[Tally]:
    with Tally(server.base_url, admin_key) as tally:
        yield tally


def test_answers_are_typed_and_errors_are_tallys_own(client: Tally) -> None:
    account = _account()
    lot = client.grant(account, 10, reason="welcome", valid_for="P30D")
    assert lot.amount == lot.remaining == 10
    assert lot.expires_at is not None
    debit = client.debit(account, tool="video", quantity=3)  # 2 credits per video
    assert debit.amount == 6
    assert debit.allocations[0].lot_id == lot.id
    assert client.balance(account).available == 4
    with pytest.raises(InsufficientCredits) as refused:
        client.debit(account, amount=5)
    assert refused.value.extra["available"] == 4
    assert refused.value.extra["required"] == 5
    with pytest.raises(AccountNotFound):
        client.balance(_account())
    with pytest.raises(UnknownTool):
        client.hold(account, tool="teleporter", quantity=1)
    client.debit(account, amount=1, idempotency_key="once")
    with pytest.raises(IdempotencyKeyReused):
        client.debit(account, amount=2, idempotency_key="once")
    assert [t.id for t in client.tools().data][:2] == ["background", "logo"]
    assert client.entries(account, limit=1).has_more


class _Counting(httpx.HTTPTransport):
    """The real transport, counting the requests that go through it."""

    def __init__(self) -> None:
        super().__init__()
        self.sent: list[str] = []

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        self.sent.append(f"{request.method} {request.url.path}")
        return super().handle_request(request)


def test_a_bad_key_is_an_error_not_a_retry(server: Server) -> None:
    counted = _Counting()
    with (
        Tally(
            server.base_url, "tly_0000000000_" + "0" * 32, max_retries=5, transport=counted
        ) as bad,
        pytest.raises(ApiKeyInvalid),
    ):
        bad.balance("anyone")
    assert counted.sent == ["GET /v1/accounts/anyone/balance"], "a 401 is final: no retry"


def test_charge_captures_everything_on_a_clean_exit(client: Tally) -> None:
    account = _account()
    client.grant(account, 10, reason="stock")
    with client.charge(account, tool="portrait", quantity=4) as job:
        assert job.hold.status == "pending"
        assert client.balance(account).held == 4
    assert job.result is not None
    assert job.result.status == "captured"
    assert job.result.captured == 4
    balance = client.balance(account)
    assert (balance.available, balance.held) == (6, 0)


def test_charge_captures_only_what_was_delivered(client: Tally) -> None:
    account = _account()
    client.grant(account, 10, reason="stock")
    with client.charge(account, tool="video", quantity=3) as job:  # 6 credits held
        job.delivered(1)
    assert job.result is not None
    assert job.result.captured == 2  # one video at the hold's price
    assert client.balance(account).available == 8


def test_charge_releases_on_an_exception_and_reraises(client: Tally) -> None:
    account = _account()
    client.grant(account, 10, reason="stock")

    class ToolCrashed(Exception):
        pass

    with pytest.raises(ToolCrashed), client.charge(account, tool="portrait", quantity=4):
        raise ToolCrashed
    balance = client.balance(account)
    assert (balance.available, balance.held) == (10, 0)
    with client.charge(account, tool="portrait", quantity=2) as job:
        job.delivered(0)  # nothing came out: nothing is spent
    assert job.result is not None
    assert job.result.status == "released"
    assert client.balance(account).available == 10


def test_async_charge_behaves_the_same(server: Server, admin_key: str) -> None:
    async def scenario() -> tuple[int, int, str]:
        async with AsyncTally(server.base_url, admin_key) as tally:
            account = _account()
            await tally.grant(account, 10, reason="stock")
            async with tally.charge(account, tool="portrait", quantity=4) as job:
                job.delivered(3)
            with pytest.raises(RuntimeError):
                async with tally.charge(account, tool="portrait", quantity=2):
                    raise RuntimeError
            balance = await tally.balance(account)
            assert job.result is not None
            return balance.available, balance.held, job.result.status

    assert asyncio.run(scenario()) == (7, 0, "captured")


class _LoseFirstAnswer(httpx.HTTPTransport):
    """The server handles the request, then the answer is lost on the way back."""

    def __init__(self, path_part: str) -> None:
        super().__init__()
        self.path_part = path_part
        self.lost = 0

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        response = super().handle_request(request)
        if self.path_part in request.url.path and not self.lost:
            self.lost += 1
            response.read()
            raise httpx.ReadError("connection reset after the server answered")
        return response


def test_a_lost_answer_is_retried_with_the_same_key_and_charges_once(
    server: Server, admin_key: str
) -> None:
    transport = _LoseFirstAnswer("/capture")
    with Tally(server.base_url, admin_key, transport=transport) as tally:
        account = _account()
        tally.grant(account, 10, reason="stock")
        with tally.charge(account, tool="portrait", quantity=3) as job:
            pass
        assert transport.lost == 1
        assert job.result is not None
        assert job.result.captured == 3
        assert tally.balance(account).available == 7
        captures = [e for e in tally.entries(account).data if e.type == "capture"]
        assert len(captures) == 1


@pytest.mark.slow
@pytest.mark.parametrize("kind", DATABASES)
def test_charge_survives_a_server_restart_mid_job(kind: str, tmp_path: Path) -> None:
    with (
        running(kind, tmp_path) as server,
        Tally(server.base_url, server.key("restarts"), max_retries=8) as tally,
    ):
        account = _account()
        tally.grant(account, 10, reason="stock")
        with tally.charge(account, tool="video", quantity=2) as job:
            server.stop()  # the deploy starts while the tool works
            back = threading.Timer(1.0, server.start)
            back.start()
            job.delivered(1)
        back.join()
        assert job.result is not None
        assert job.result.captured == 2
        assert tally.balance(account).available == 8
        assert [e.type for e in tally.entries(account).data].count("capture") == 1
