"""The worker on SQLite and PostgreSQL, with a real SMTP server (aiosmtpd): a message that
cannot be sent fails alone, a 550 fails at once with the reason support sees, a failing job or
a hanging mail server never stops the sweep, the sweep keeps Tally's clock and covers more
accounts than one batch, and two workers never send one message twice."""

from __future__ import annotations

import json
import re
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import replace
from datetime import timedelta

import anyio
import httpx
import pytest
from sqlalchemy import func, select, text, update

from tally.adapters.catalog_file import builtin
from tally.adapters.db.engine import Database, connect
from tally.adapters.db.schema import holds, lots, outbox
from tally.bootstrap import Tally, group_commit
from tally.config import Settings
from tally.domain.commerce import Order, Sale
from tally.entrypoints.http.app import create_app
from tally.entrypoints.http.metrics import Metrics
from tally.entrypoints.worker import Worker
from tally.service import commerce, ledger, staff
from tally.service.commerce import MAIL_CLAIM, MAIL_MAX_ATTEMPTS
from tally.service.ledger import SWEEP_BATCH_SIZE
from tests.mailserver import Inbox, smtp_server
from tests.support import FakeClock

#: The worker wakes this often in these tests (real seconds).
TICK = 0.02
STAFF_EMAIL = "sam@support.example"
STAFF_PASSWORD = "correct horse battery"


@pytest.fixture
def smtp() -> Iterator[tuple[Inbox, int]]:
    with smtp_server() as found:
        yield found


def _tally(db: Database, clock: FakeClock, smtp_port: int) -> Tally:
    settings = Settings(
        public_url="http://tally.test",
        secret_key="worker test",
        smtp_url=f"smtp://127.0.0.1:{smtp_port}",
        mail_from="Tally <credits@tally.test>",
        reconcile_interval_seconds=0,
    )
    return Tally(settings, db, clock, group_commit(db, clock), builtin(), "worker test")


@pytest.fixture
def tally(db: Database, clock: FakeClock, smtp: tuple[Inbox, int]) -> Tally:
    return _tally(db, clock, smtp[1])


@contextmanager
def running(worker: Worker) -> Iterator[Worker]:
    worker.start()
    try:
        yield worker
    finally:
        worker.stop()


def _buy(tally: Tally, email: str) -> Order:
    sale = Sale(
        processor="sandbox",
        sale_id=f"sale-{email}",
        package=tally.catalog.packages["pro"],
        email=email,
        purchased_at=tally.clock(),
    )
    return commerce.fulfil(sale, tally.uow(), pepper=tally.pepper, links=tally.links).order


def _messages(db: Database) -> dict[str, tuple[str, int, str | None]]:
    """{order's email: (status, attempts, last error)} of every outbox row."""
    with db.engine.connect() as connection:
        rows = connection.execute(
            select(outbox.c.to_email, outbox.c.status, outbox.c.attempts, outbox.c.last_error)
        )
        return {row.to_email: (row.status, row.attempts, row.last_error) for row in rows}


def _hold(tally: Tally, account_id: str, ttl_seconds: int) -> str:
    ledger.grant(
        ledger.GrantCredits(account_id=account_id, amount=10, idempotency_key=f"g-{account_id}"),
        tally.uow(),
    )
    hold = ledger.place_hold(
        ledger.PlaceHold(
            account_id=account_id,
            amount=4,
            ttl_seconds=ttl_seconds,
            idempotency_key=f"h-{account_id}",
        ),
        tally.uow(),
    )
    return hold.id


def _hold_status(db: Database, hold_id: str) -> str:
    with db.engine.connect() as connection:
        status: str = connection.execute(
            select(holds.c.status).where(holds.c.hold_id == hold_id)
        ).scalar_one()
        return status


def _cycles(metrics: Metrics, job: str, outcome: str) -> float:
    value = metrics.registry.get_sample_value(
        "tally_worker_cycles_total", {"job": job, "outcome": outcome}
    )
    return value or 0.0


# --- one message, one outcome -----------------------------------------------------------------


def test_a_message_that_cannot_be_sent_fails_alone_and_the_rest_are_sent(
    tally: Tally, db: Database, smtp: tuple[Inbox, int]
) -> None:
    inbox, _ = smtp
    for name in ("ana", "bob", "cat", "dan"):
        _buy(tally, f"{name}@example.com")
    with db.engine.begin() as connection:
        # Stored data a ping or an old bug could have left: a header injection in the address,
        # and a context its template cannot render.
        connection.execute(
            update(outbox)
            .where(outbox.c.to_email == "bob@example.com")
            .values(to_email="bob@example.com\r\nBcc: eve@evil.example")
        )
        context = connection.execute(
            select(outbox.c.context).where(outbox.c.to_email == "cat@example.com")
        ).scalar_one()
        context = json.loads(context) if isinstance(context, str) else context
        del context["code"]
        connection.execute(
            update(outbox).where(outbox.c.to_email == "cat@example.com").values(context=context)
        )
    worker = Worker(tally, every=TICK)
    assert worker.run_once() == {"mail": True, "sweep": True}

    assert sorted(inbox.recipients) == [["ana@example.com"], ["dan@example.com"]]
    assert sorted(m["To"] for m in inbox.messages) == ["ana@example.com", "dan@example.com"]
    found = _messages(db)
    assert found["ana@example.com"] == ("sent", 1, None)
    assert found["dan@example.com"] == ("sent", 1, None)
    status, attempts, error = found["bob@example.com\r\nBcc: eve@evil.example"]
    assert (status, attempts) == ("failed", 1)
    assert error is not None
    assert error.startswith(
        "unusable recipient address 'bob@example.com\\r\\nBcc: eve@evil.example': "
    )
    assert found["cat@example.com"] == (
        "failed",
        1,
        "could not prepare the message: UndefinedError: 'code' is undefined",
    )
    # Failed for good: later runs leave them alone, and send nothing again.
    tally.clock.advance(hours=2)  # type: ignore[attr-defined]
    worker.run_once()
    assert len(inbox.messages) == 2
    assert _messages(db) == found


def test_a_recipient_refused_with_550_fails_at_once_and_support_sees_why(
    tally: Tally, db: Database, smtp: tuple[Inbox, int], clock: FakeClock
) -> None:
    inbox, _ = smtp
    inbox.refuse_recipients["gone@example.com"] = "550 5.1.1 no such mailbox here"
    order = _buy(tally, "gone@example.com")
    _buy(tally, "here@example.com")
    worker = Worker(tally, every=TICK)
    worker.run_once()
    reason = "recipient refused: 550 5.1.1 no such mailbox here"
    assert _messages(db)["gone@example.com"] == ("failed", 1, reason)
    assert _messages(db)["here@example.com"] == ("sent", 1, None)
    clock.advance(hours=6)  # far past every backoff: a 550 is never tried again
    worker.run_once()
    assert _messages(db)["gone@example.com"] == ("failed", 1, reason)
    assert inbox.recipients == [["here@example.com"]]

    page = anyio.run(_order_page, tally, order.id)
    row = re.search(r'<tr id="msg_[0-9a-z]+">(.*?)</tr>', page, re.DOTALL)
    assert row is not None
    cells = re.findall(r"<td[^>]*>(.*?)</td>", row.group(1), re.DOTALL)
    assert cells[:3] == ["purchase_code", "failed", "1"]
    assert cells[5] == reason
    assert "Resend now" in row.group(1)


async def _order_page(tally: Tally, order_id: str) -> str:
    """The support console's page of the order, as a signed-in staff member sees it."""
    staff.create_staff(STAFF_EMAIL, STAFF_PASSWORD, tally.uow())
    transport = httpx.ASGITransport(app=create_app(tally), client=("10.0.0.7", 50000))
    async with httpx.AsyncClient(transport=transport, base_url="http://tally.test") as http:
        form = await http.get("/admin/sign-in")
        token = re.search(r'name="csrf" value="([^"]+)"', form.text)
        assert token is not None
        signed_in = await http.post(
            "/admin/sign-in",
            data={
                "email": STAFF_EMAIL,
                "password": STAFF_PASSWORD,
                "csrf": token.group(1),
                "next": "/admin",
            },
            headers={"Origin": "http://tally.test"},
        )
        assert signed_in.status_code == 303, signed_in.text
        page = await http.get(f"/admin/orders/{order_id}")
        assert page.status_code == 200
        return page.text


def test_a_temporary_failure_is_retried_with_backoff_then_failed_after_the_last_try(
    tally: Tally, db: Database, smtp: tuple[Inbox, int], clock: FakeClock
) -> None:
    inbox, _ = smtp
    inbox.refuse_recipients["full@example.com"] = "452 4.2.2 mailbox full"
    _buy(tally, "full@example.com")
    worker = Worker(tally, every=TICK)
    waits = []
    for attempt in range(1, MAIL_MAX_ATTEMPTS + 1):
        worker.send_mail()
        status, attempts, error = _messages(db)["full@example.com"]
        assert attempts == attempt
        assert error == "recipient refused for now: 452 4.2.2 mailbox full"
        with db.engine.connect() as connection:
            due = connection.execute(select(outbox.c.next_attempt_at)).scalar_one()
        waits.append(round((due - clock()).total_seconds()))
        if attempt < MAIL_MAX_ATTEMPTS:
            assert status == "pending"
            clock.set(due)
        else:
            assert status == "failed"
    assert waits[:-1] == [30, 60, 120, 240, 480, 960, 1920, 3600, 3600, 3600, 3600]


def test_a_message_whose_worker_died_while_sending_is_tried_again_once_its_claim_lapses(
    tally: Tally, db: Database, smtp: tuple[Inbox, int], clock: FakeClock
) -> None:
    inbox, _ = smtp
    _buy(tally, "ana@example.com")
    with tally.uow() as uow:  # a worker claims it, then dies before recording anything
        assert uow.commerce.claim_message(clock(), until=clock() + MAIL_CLAIM) is not None
        uow.commit()
    worker = Worker(tally, every=TICK)
    worker.send_mail()
    assert inbox.messages == []  # claimed: no other worker sends it
    clock.advance(seconds=MAIL_CLAIM.total_seconds())
    worker.send_mail()
    assert inbox.recipients == [["ana@example.com"]]
    assert _messages(db)["ana@example.com"] == ("sent", 2, None)


def test_a_message_that_kills_every_worker_that_sends_it_fails_after_the_last_try(
    tally: Tally, db: Database, smtp: tuple[Inbox, int], clock: FakeClock
) -> None:
    inbox, _ = smtp
    _buy(tally, "ana@example.com")
    for _ in range(MAIL_MAX_ATTEMPTS):
        with tally.uow() as uow:
            assert uow.commerce.claim_message(clock(), until=clock() + MAIL_CLAIM) is not None
            uow.commit()
        clock.advance(seconds=MAIL_CLAIM.total_seconds())
    Worker(tally, every=TICK).send_mail()
    assert inbox.messages == []
    assert _messages(db)["ana@example.com"] == (
        "failed",
        MAIL_MAX_ATTEMPTS + 1,
        f"not sent in {MAIL_MAX_ATTEMPTS} attempts: the worker stopped while sending",
    )


def test_two_workers_never_send_one_message_twice(
    db: Database, clock: FakeClock, smtp: tuple[Inbox, int]
) -> None:
    """Two workers as two processes would be: each its own connections (and on SQLite its own
    writer), over one database."""
    inbox, port = smtp
    first = _tally(db, clock, port)
    emails = [f"buyer{n}@example.com" for n in range(24)]
    for email in emails:
        _buy(first, email)
    other = connect(db.engine.url.render_as_string(hide_password=False))
    try:
        second = _tally(other, clock, port)
        barrier = threading.Barrier(2)

        def send(tally: Tally) -> commerce.Delivery:
            barrier.wait()
            return commerce.deliver_mail(tally.uow(), tally.mailer, tally.templates, tally.links)

        results: list[commerce.Delivery] = []
        threads = [
            threading.Thread(target=lambda t=t: results.append(send(t))) for t in (first, second)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
    finally:
        other.dispose()
    assert sum(r.sent for r in results) == len(emails)
    assert sorted(r[0] for r in inbox.recipients) == sorted(emails)
    assert set(_messages(db).values()) == {("sent", 1, None)}


# --- jobs are isolated from each other --------------------------------------------------------


def test_a_failing_job_does_not_stop_the_sweep(
    tally: Tally, db: Database, clock: FakeClock
) -> None:
    metrics = Metrics(lambda: {})
    first = _hold(tally, "ana", ttl_seconds=30)
    clock.advance(seconds=31)
    with db.engine.begin() as connection:  # every mail run now fails on the database
        connection.execute(text("ALTER TABLE outbox RENAME TO outbox_moved"))
    with running(Worker(tally, every=TICK, sweep_every=60, metrics=metrics)) as worker:
        worker.wait_for_cycles("sweep", 1)
        assert _hold_status(db, first) == "expired"
        worker.wait_for_cycles("mail", worker.cycles("mail") + 3)
        second = _hold(tally, "bob", ttl_seconds=30)
        clock.advance(seconds=60)
        worker.wait_for_cycles("sweep", 2)
        assert _hold_status(db, second) == "expired"
        worker.wait_for_cycles("mail", worker.cycles("mail") + 1)
    assert _cycles(metrics, "sweep", "ok") == 2
    assert _cycles(metrics, "sweep", "failed") == 0
    assert _cycles(metrics, "mail", "ok") == 0
    assert _cycles(metrics, "mail", "failed") == worker.cycles("mail") >= 4


class _SilentMailServer:
    """A port that accepts SMTP connections and never answers, as a stuck mail server does,
    until `drop()` closes them (the stuck sends then fail at once)."""

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(0.05)
        self.port: int = self.listener.getsockname()[1]
        self.accepted: list[socket.socket] = []
        self.closing = threading.Event()
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def _accept(self) -> None:
        while not self.closing.is_set():
            try:
                connection, _ = self.listener.accept()
            except TimeoutError:
                continue
            self.accepted.append(connection)

    def drop(self) -> None:
        self.closing.set()
        self.thread.join(5)
        self.listener.close()
        for connection in self.accepted:
            connection.close()


def test_a_mail_server_that_hangs_blocks_neither_the_sweep_nor_other_writes(
    db: Database, clock: FakeClock
) -> None:
    silent = _SilentMailServer()
    try:
        tally = _tally(db, clock, silent.port)
        _buy(tally, "ana@example.com")
        hold = _hold(tally, "bob", ttl_seconds=30)
        with running(Worker(tally, every=TICK, sweep_every=60)) as worker:
            worker.wait_for_cycles("sweep", 1)
            _wait_until(lambda: _messages(db)["ana@example.com"][:2] == ("pending", 1))
            # The mail job now waits on the silent server, its message claimed.
            clock.advance(seconds=60)
            worker.wait_for_cycles("sweep", 2, timeout=10)
            assert _hold_status(db, hold) == "expired"
            # An API write too: on SQLite nothing holds the write lock while mail waits.
            ledger.grant(
                ledger.GrantCredits(account_id="cat", amount=1, idempotency_key="during"),
                tally.uow(),
            )
            assert worker.cycles("mail") == 0
            # The server drops the connection: the send fails, for now, and is retried.
            silent.drop()
            worker.wait_for_cycles("mail", 1, timeout=10)
    finally:
        silent.drop()
    status, attempts, error = _messages(db)["ana@example.com"]
    assert (status, attempts) == ("pending", 1)
    assert error


def _wait_until(condition: Callable[[], bool], timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "the condition never held"
        time.sleep(0.01)


def test_mail_down_does_not_stop_the_sweep(db: Database, clock: FakeClock) -> None:
    from tests.support import free_port

    tally = _tally(db, clock, free_port())  # nobody listens: connection refused
    _buy(tally, "ana@example.com")
    hold = _hold(tally, "bob", ttl_seconds=30)
    clock.advance(seconds=31)
    with running(Worker(tally, every=TICK, sweep_every=60)) as worker:
        worker.wait_for_cycles("sweep", 1)
        worker.wait_for_cycles("mail", 2)
    assert _hold_status(db, hold) == "expired"
    status, attempts, error = _messages(db)["ana@example.com"]
    assert (status, attempts) == ("pending", 1)
    assert error is not None
    assert "refused" in error.lower()


# --- the sweep ------------------------------------------------------------------------------


def test_the_sweep_runs_every_sweep_interval_of_tallys_clock(
    tally: Tally, db: Database, clock: FakeClock
) -> None:
    start = clock()
    with running(Worker(tally, every=TICK, sweep_every=60)) as worker:
        worker.wait_for_cycles("sweep", 1)  # at once, on start
        hold = _hold(tally, "ana", ttl_seconds=10)
        clock.advance(seconds=11)
        # Expired for every reader at once (rule 2), yet not written down before its time.
        assert ledger.get_balance("ana", tally.uow()).available == 10
        mail = worker.cycles("mail")
        worker.wait_for_cycles("mail", mail + 3)  # the worker woke, and did not sweep
        clock.set(start + timedelta(seconds=59, microseconds=999_999))
        worker.wait_for_cycles("mail", worker.cycles("mail") + 3)
        assert worker.cycles("sweep") == 1
        assert _hold_status(db, hold) == "pending"
        clock.set(start + timedelta(seconds=60))
        worker.wait_for_cycles("sweep", 2)
        assert _hold_status(db, hold) == "expired"
        clock.set(start + timedelta(seconds=119))
        worker.wait_for_cycles("mail", worker.cycles("mail") + 3)
        assert worker.cycles("sweep") == 2
        clock.set(start + timedelta(seconds=120))
        worker.wait_for_cycles("sweep", 3)
    entries = ledger.list_entries("ana", tally.uow(), limit=10).items
    written = [e for e in entries if e.hold_id == hold and e.type.value != "hold"]
    assert [(e.type.value, e.amount, e.created_at) for e in written] == [
        ("release", 4, start + timedelta(seconds=60))
    ]


def test_the_sweep_covers_more_accounts_than_one_batch(
    tally: Tally, db: Database, clock: FakeClock
) -> None:
    count = 2 * SWEEP_BATCH_SIZE + 3
    for n in range(count):
        ledger.grant(
            ledger.GrantCredits(
                account_id=f"acct-{n:04d}",
                amount=n + 1,
                valid_for="PT1H",
                idempotency_key=f"g-{n}",
            ),
            tally.uow(),
        )
    clock.advance(hours=1)
    result = Worker(tally, every=TICK).sweep()
    assert (result.accounts, result.lots_expired, result.holds_expired) == (count, count, 0)
    with db.engine.connect() as connection:
        assert connection.execute(select(func.sum(lots.c.remaining))).scalar_one() == 0
    assert ledger.credit_totals(tally.uow())["expire"] == sum(range(1, count + 1))
    assert ledger.check(tally.uow()).violations == []
    assert Worker(tally, every=TICK).sweep() == replace(result, accounts=0, lots_expired=0)
