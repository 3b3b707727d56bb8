"""Tally's processes as operators run them: `tally worker` on its own beside `tally serve`,
`tally serve --workers 2` on PostgreSQL, and two `tally serve` writing one SQLite file at once."""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
from sqlalchemy import select

from tally.adapters.db.engine import connect
from tally.adapters.db.schema import holds, outbox
from tests.conftest import DATABASES
from tests.e2e.server import TALLY, Api, Server, ok, running
from tests.mailserver import Inbox


def _wait_until(condition: Callable[[], bool], what: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.05)


def _rows(url: str, query: object) -> list[tuple[object, ...]]:
    database = connect(url)
    try:
        with database.engine.connect() as connection:
            return [tuple(row) for row in connection.execute(query)]  # type: ignore[call-overload]
    finally:
        database.dispose()


@contextmanager
def _worker_process(server: Server) -> Iterator[subprocess.Popen[bytes]]:
    """`tally worker` over the server's database, as an operator starts it."""
    log = server.directory / "worker.log"
    with log.open("ab") as out:
        process = subprocess.Popen(
            [TALLY, "worker"], env=server.env, cwd=server.directory, stdout=out, stderr=out
        )
    try:
        yield process
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


@pytest.mark.parametrize("kind", DATABASES)
def test_tally_worker_on_its_own_sends_mail_and_writes_down_an_expired_hold(
    kind: str, tmp_path: Path, inbox: tuple[Inbox, int]
) -> None:
    box, port = inbox
    buyer = f"walker-{kind}@example.com"
    env = {"TALLY_WORKER": "off", "TALLY_SMTP_URL": f"smtp://127.0.0.1:{port}"}
    with running(kind, tmp_path, env=env) as server:
        api = Api(server, server.key("processes"))
        try:
            api.grant("walker", 10)
            hold = ok(api.post("/v1/accounts/walker/holds", {"amount": 4, "ttl_seconds": 1}), 201)
            paid = httpx.post(f"{server.base_url}/checkout/pro/pay", data={"email": buyer})
            assert paid.status_code == 200, paid.text
            # Expired for every reader at once (rule 2), written down by nobody yet.
            _wait_until(lambda: api.balance("walker")["held"] == 0, "the hold never lapsed")
        finally:
            api.close()
        held = select(holds.c.status).where(holds.c.hold_id == hold["id"])
        assert _rows(server.url, held) == [("pending",)]
        assert _rows(server.url, select(outbox.c.status)) == [("pending",)]
        before = len(box.messages)  # the module's inbox: other tests' mail came before

        with _worker_process(server) as worker:
            box.wait_for(before + 1)
            assert [m["To"] for m in box.messages[before:]] == [buyer]
            _wait_until(lambda: _rows(server.url, held) == [("expired",)], "the sweep did not run")
            assert _rows(server.url, select(outbox.c.status)) == [("sent",)]
            worker.send_signal(signal.SIGTERM)
            assert worker.wait(timeout=20) == 0
        log = (server.directory / "worker.log").read_text()
        assert '"worker_started"' in log
        assert '"worker_stopped"' in log
        assert server.cli("check")


def _serving_processes(pid: int) -> list[int]:
    """uvicorn's server processes under its supervisor `pid` (not multiprocessing's helpers)."""
    with open(f"/proc/{pid}/task/{pid}/children") as found:
        children = [int(child) for child in found.read().split()]
    return [
        child for child in children if b"spawn_main" in Path(f"/proc/{child}/cmdline").read_bytes()
    ]


@pytest.mark.postgres
def test_tally_serve_with_two_worker_processes_on_postgresql(tmp_path: Path) -> None:
    with running("postgresql", tmp_path, workers=2) as server:
        assert server.process is not None
        serving = _serving_processes(server.process.pid)
        assert len(serving) == 2, serving
        key = server.key("two-processes")
        api = Api(server, key)
        api.grant("twice", 60)
        api.close()

        def debit(n: int) -> int:
            # A new connection per request, so the kernel spreads them over both processes.
            answer = httpx.post(
                f"{server.base_url}/v1/accounts/twice/debits",
                json={"amount": 1},
                headers={"Authorization": f"Bearer {key}", "Idempotency-Key": f"d-{n}"},
                timeout=30,
            )
            return answer.status_code

        with ThreadPoolExecutor(12) as pool:
            statuses = list(pool.map(debit, range(90)))
        assert sorted(statuses) == [201] * 60 + [402] * 30  # insufficient_credits
        again = Api(server, key)
        try:
            assert again.balance("twice")["available"] == 0
        finally:
            again.close()
        assert server.cli("check")
        assert all(Path(f"/proc/{p}").exists() for p in serving)  # neither died under load


def test_two_servers_writing_one_sqlite_file_at_once_land_every_grant(tmp_path: Path) -> None:
    """Across processes only SQLite's own lock orders writers: a transaction that read before
    another process wrote cannot write (SQLITE_BUSY), so every write transaction must take the
    lock up front (BEGIN IMMEDIATE) and wait its turn (busy_timeout)."""
    with running("sqlite", tmp_path) as first:
        second = Server(first.url, tmp_path)
        second.start()
        try:
            key = first.key("one-file")
            clients = [
                httpx.Client(
                    base_url=server.base_url,
                    headers={"Authorization": f"Bearer {key}"},
                    timeout=60,
                )
                for server in (first, second)
            ]
            count = 60
            start = threading.Barrier(12)

            def grant(n: int) -> int:
                if n < 12:
                    start.wait()
                answer = clients[n % 2].post(
                    "/v1/accounts/shared/grants",
                    json={"amount": n + 1, "reason": "race"},
                    headers={"Idempotency-Key": f"g-{n}"},
                )
                return answer.status_code

            with ThreadPoolExecutor(12) as pool:
                statuses = list(pool.map(grant, range(count)))
            assert statuses == [201] * count
            for client in clients:
                balance = client.get("/v1/accounts/shared/balance").json()
                assert balance["available"] == sum(range(1, count + 1))
                entries = client.get("/v1/accounts/shared/entries", params={"limit": 500})
                assert len(entries.json()["data"]) == count
            for client in clients:
                client.close()
            assert first.cli("check")
        finally:
            second.stop()
    assert os.path.exists(first.url.removeprefix("sqlite:///"))
