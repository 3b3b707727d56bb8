"""The support console's use cases on SQLite and PostgreSQL: staff and passwords, sessions
and their expiry, rate-limited sign-in, search, the account and order views, resending an
unsent email, and the credits chart."""

from __future__ import annotations

from dataclasses import replace
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, select, text, update
from sqlalchemy.exc import IntegrityError
from typer.testing import CliRunner

from tally.adapters.db.engine import Database, connect
from tally.adapters.db.schema import codes as codes_table
from tally.adapters.db.schema import (
    entries,
    metadata,
    orders,
    outbox,
    staff_actions,
    staff_sessions,
)
from tally.adapters.db.uow import SqlUnitOfWork
from tally.domain import values
from tally.domain.commerce import Message, Sale
from tally.domain.errors import (
    AccountNotFound,
    IdempotencyKeyReused,
    InvalidInput,
    MessageNotFound,
    MessageNotResendable,
    OrderNotFound,
    RateLimited,
    SignInFailed,
    StaffExists,
    StaffNotFound,
)
from tally.entrypoints import cli
from tally.service import commerce, ledger, refunds, staff
from tally.service import orders as orders_service
from tally.service.ports import RefundRequest
from tests.support import CATALOG, LINKS, PEPPER, FakeClock

PASSWORD = "correct horse battery"


def _scalar(db: Database, query: Any) -> Any:
    with db.engine.connect() as connection:
        return connection.execute(query).scalar_one()


def _sale(clock: FakeClock, sale_id: str = "sale-1", **changes: Any) -> Sale:
    sale = Sale(
        processor="gumroad",
        sale_id=sale_id,
        package=CATALOG.packages["pro"],
        email="Ana@Example.com",
        purchased_at=clock(),
        price=2000,
        order_number="1001",
    )
    return replace(sale, **changes)


def _message_id(db: Database, order_id: str, template: str = "purchase_code") -> str:
    found: str = _scalar(
        db,
        select(outbox.c.message_id).where(
            outbox.c.order_id == order_id, outbox.c.template == template
        ),
    )
    return found


# --- staff and passwords ---------------------------------------------------------------------


def test_a_staff_member_is_stored_with_an_argon2_hash_and_a_lower_case_email(
    db: Database, uow: SqlUnitOfWork
) -> None:
    made = staff.create_staff("  Sam@Support.Example ", PASSWORD, uow)
    assert made.staff_id.startswith("stf_")
    assert made.email == "sam@support.example"
    assert made.password_hash.startswith("$argon2id$")
    assert PASSWORD not in made.password_hash
    with pytest.raises(StaffExists):
        staff.create_staff("SAM@support.example", "another password!", uow)


@pytest.mark.parametrize(
    ("email", "password"),
    [
        ("sam@support.example", "short pass1"),  # 11 characters
        ("sam@support.example", "x" * (staff.PASSWORD_MAX_LENGTH + 1)),
        ("sam@support.example", "twelve chars\x00"),
        ("no-at-sign", PASSWORD),
        ("two@@example.com", PASSWORD),
        ("sp ace@example.com", PASSWORD),
        ("@example.com", PASSWORD),
        ("a" * 320 + "@example.com", PASSWORD),
    ],
)
def test_bad_emails_and_passwords_are_refused(
    db: Database, uow: SqlUnitOfWork, email: str, password: str
) -> None:
    with pytest.raises(InvalidInput):
        staff.create_staff(email, password, uow)
    assert _scalar(db, text("SELECT count(*) FROM staff")) == 0


def test_the_database_refuses_a_plaintext_password_or_a_mixed_case_email(
    db: Database, uow: SqlUnitOfWork
) -> None:
    made = staff.create_staff("sam@support.example", PASSWORD, uow)
    for statement in (
        "UPDATE staff SET password_hash = 'hunter2hunter2'",
        "UPDATE staff SET email = 'Sam@support.example'",
    ):
        with pytest.raises(IntegrityError), db.engine.begin() as connection:
            connection.execute(text(statement))
    assert staff.verify_password(made.password_hash, PASSWORD)


# --- signing in, sessions ----------------------------------------------------------------------


def test_sign_in_opens_a_session_that_only_its_token_finds(
    db: Database, uow: SqlUnitOfWork, clock: FakeClock
) -> None:
    made = staff.create_staff("sam@support.example", PASSWORD, uow)
    signed = staff.sign_in("SAM@support.example", PASSWORD, uow, client_address="10.0.0.1")
    assert signed.staff_id == made.staff_id
    assert signed.expires_at == clock() + staff.SESSION_LIFETIME
    # Only the digest is stored.
    stored = _scalar(db, select(staff_sessions.c.digest))
    assert stored == staff.token_digest(signed.token) != signed.token
    session = staff.authenticate(signed.token, uow)
    assert session is not None
    assert (session.staff_id, session.email) == (made.staff_id, "sam@support.example")
    assert session.csrf == staff.csrf_token(signed.token)
    assert staff.authenticate(signed.token + "x", uow) is None
    assert staff.authenticate("", uow) is None
    assert staff.authenticate("é" * 10, uow) is None
    assert staff.authenticate("x" * 1000, uow) is None
    # A second sign-in is a second session with its own CSRF token.
    other = staff.sign_in("sam@support.example", PASSWORD, uow, client_address=None)
    again = staff.authenticate(other.token, uow)
    assert again is not None
    assert again.csrf != session.csrf

    staff.sign_out(signed.token, uow)
    assert staff.authenticate(signed.token, uow) is None
    assert staff.authenticate(other.token, uow) is not None


def test_a_wrong_password_and_an_unknown_email_get_one_answer(
    db: Database, uow: SqlUnitOfWork
) -> None:
    staff.create_staff("sam@support.example", PASSWORD, uow)
    answers = []
    for email, password in [
        ("sam@support.example", "wrong password!"),
        ("nobody@support.example", PASSWORD),
        ("not an email", PASSWORD),
        ("sam@support.example", ""),
    ]:
        with pytest.raises(SignInFailed) as refused:
            staff.sign_in(email, password, uow, client_address="10.0.0.2")
        answers.append((refused.value.code, refused.value.status, refused.value.detail))
    assert len(set(answers)) == 1
    assert answers[0][:2] == ("sign_in_failed", 401)
    assert _scalar(db, select(func.count()).select_from(staff_sessions)) == 0


def test_a_disabled_staff_member_cannot_sign_in_and_loses_open_sessions(
    db: Database, uow: SqlUnitOfWork, clock: FakeClock
) -> None:
    staff.create_staff("sam@support.example", PASSWORD, uow)
    signed = staff.sign_in("sam@support.example", PASSWORD, uow, client_address=None)
    assert staff.disable_staff("Sam@support.example", uow).email == "sam@support.example"
    assert staff.authenticate(signed.token, uow) is None
    assert _scalar(db, select(func.count()).select_from(staff_sessions)) == 0
    with pytest.raises(SignInFailed):
        staff.sign_in("sam@support.example", PASSWORD, uow, client_address=None)
    with pytest.raises(StaffNotFound):
        staff.disable_staff("nobody@support.example", uow)
    # A session that survived some other way still ends once its staff member is disabled.
    with db.engine.begin() as connection:
        connection.execute(text("UPDATE staff SET disabled_at = NULL"))
    other = staff.sign_in("sam@support.example", PASSWORD, uow, client_address=None)
    with db.engine.begin() as connection:
        connection.execute(text("UPDATE staff SET disabled_at = created_at"))
    assert staff.authenticate(other.token, uow) is None


def test_sessions_end_after_two_idle_hours_and_twelve_hours_in_all(
    db: Database, uow: SqlUnitOfWork, clock: FakeClock
) -> None:
    staff.create_staff("sam@support.example", PASSWORD, uow)
    idle = staff.sign_in("sam@support.example", PASSWORD, uow, client_address=None)
    busy = staff.sign_in("sam@support.example", PASSWORD, uow, client_address=None)
    for _ in range(11):  # `busy` is used every hour; `idle` is not
        clock.advance(hours=1)
        assert staff.authenticate(busy.token, uow) is not None
        if _ == 1:
            assert staff.authenticate(idle.token, uow) is None  # 2 h without a request
    assert staff.authenticate(idle.token, uow) is None
    clock.advance(minutes=59, seconds=59)
    assert staff.authenticate(busy.token, uow) is not None
    clock.advance(seconds=1)  # 12 h after sign-in, however busy
    assert staff.authenticate(busy.token, uow) is None
    assert _scalar(db, select(func.count()).select_from(staff_sessions)) == 0


def test_sign_in_is_limited_per_email_and_a_success_is_not_a_failure(
    db: Database, uow: SqlUnitOfWork, clock: FakeClock
) -> None:
    staff.create_staff("sam@support.example", PASSWORD, uow)
    for _ in range(staff.SIGN_IN_ATTEMPTS_PER_EMAIL + 2):  # successes do not count
        staff.sign_in("sam@support.example", PASSWORD, uow, client_address=None)
    for _ in range(staff.SIGN_IN_ATTEMPTS_PER_EMAIL):
        with pytest.raises(SignInFailed):
            staff.sign_in("sam@support.example", "guess guess guess", uow, client_address=None)
        clock.advance(seconds=1)
    # The sixth try is refused before the password is looked at, even the right one.
    with pytest.raises(RateLimited) as limited:
        staff.sign_in("Sam@support.example", PASSWORD, uow, client_address=None)
    window = staff.SIGN_IN_WINDOW.total_seconds()
    assert 0 < limited.value.retry_after <= window
    assert limited.value.retry_after == window - staff.SIGN_IN_ATTEMPTS_PER_EMAIL
    clock.advance(seconds=limited.value.retry_after)
    assert staff.sign_in("sam@support.example", PASSWORD, uow, client_address=None).token


def test_sign_in_is_limited_per_client_address_across_emails(
    db: Database, uow: SqlUnitOfWork, clock: FakeClock
) -> None:
    staff.create_staff("sam@support.example", PASSWORD, uow)
    for n in range(staff.SIGN_IN_ATTEMPTS_PER_ADDRESS):
        with pytest.raises(SignInFailed):
            staff.sign_in(f"guess{n}@support.example", PASSWORD, uow, client_address="10.9.9.9")
    with pytest.raises(RateLimited):
        staff.sign_in("sam@support.example", PASSWORD, uow, client_address="10.9.9.9")
    # Another address is not held back by that one.
    assert staff.sign_in("sam@support.example", PASSWORD, uow, client_address="10.1.1.1").token


# --- search and views ---------------------------------------------------------------------


def test_one_box_finds_orders_and_accounts_by_every_handle(
    db: Database, uow: SqlUnitOfWork, clock: FakeClock
) -> None:
    order = commerce.fulfil(_sale(clock), uow, pepper=PEPPER, links=LINKS).order
    commerce.fulfil(
        _sale(clock, "sale-2", email="bo@example.com", order_number="2002"),
        uow,
        pepper=PEPPER,
        links=LINKS,
    )
    ledger.put_account("acct-7", "Ana@Example.com", uow)
    last4: str = _scalar(db, select(codes_table.c.last4).where(codes_table.c.order_id == order.id))

    for handle in ("ana@example.com", " ANA@EXAMPLE.COM ", "1001", "sale-1", order.id):
        found = staff.search(handle, uow)
        assert [line.order.id for line in found.orders] == [order.id], handle
    by_code = staff.search(last4.lower(), uow)
    assert order.id in [line.order.id for line in by_code.orders]
    line = staff.search("1001", uow).orders[0]
    assert line.code is not None
    assert line.code.last4 == last4
    assert staff.search("ana@example.com", uow).accounts == [("acct-7", "Ana@example.com")]
    assert staff.search("acct-7", uow).accounts == [("acct-7", "Ana@example.com")]
    nothing = staff.search("nobody@example.com", uow)
    assert (nothing.orders, nothing.accounts) == ([], [])
    for bad in ("", "   ", "x" * 321, "nul\x00", "tab\there"):
        with pytest.raises(InvalidInput):
            staff.search(bad, uow)


def test_the_account_view_shows_balance_lots_holds_and_the_journal_by_staff(
    db: Database, uow: SqlUnitOfWork, clock: FakeClock
) -> None:
    sam = staff.create_staff("sam@support.example", PASSWORD, uow)
    lot = ledger.grant(
        ledger.GrantCredits(
            account_id="ana",
            amount=10,
            source="support",
            valid_for="P30D",
            reason="sorry for the outage",
            idempotency_key="console-1",
            platform_id=sam.staff_id,
        ),
        uow,
    )
    ledger.grant(
        ledger.GrantCredits(account_id="ana", amount=65, idempotency_key="g2", reason="promo"),
        uow,
    )
    ledger.place_hold(ledger.PlaceHold(account_id="ana", amount=3, idempotency_key="h1"), uow)
    for n in range(staff.JOURNAL_PAGE_SIZE):
        clock.advance(seconds=1)
        ledger.debit(ledger.DebitCredits(account_id="ana", amount=1, idempotency_key=f"d{n}"), uow)

    view = staff.account_view("ana", uow)
    assert (view.balance.available, view.balance.held, view.balance.debt) == (22, 3, 0)
    assert view.balance.next_expiry is None  # the 30-day lot went first (rule 3)
    assert {x.id for x in view.lots} >= {lot.id}
    assert [h.amount for h in view.holds] == [3]
    assert len(view.entries) == staff.JOURNAL_PAGE_SIZE
    assert view.entries[0].seq > view.entries[-1].seq  # newest first
    assert view.next_before_seq == view.entries[-1].seq
    older = staff.account_view("ana", uow, before_seq=view.next_before_seq)
    assert older.next_before_seq is None
    first = older.entries[-1]
    assert (first.type.value, first.platform_id, first.reason) == (
        "grant",
        sam.staff_id,
        "sorry for the outage",
    )
    assert older.staff_emails == {sam.staff_id: "sam@support.example"}
    with pytest.raises(AccountNotFound):
        staff.account_view("nobody", uow)
    with pytest.raises(InvalidInput):
        staff.account_view("bad id!", uow)
    with pytest.raises(InvalidInput):
        staff.account_view("ana", uow, before_seq=0)


def test_the_order_view_shows_codes_and_email_history(
    db: Database, uow: SqlUnitOfWork, clock: FakeClock
) -> None:
    order = commerce.fulfil(_sale(clock), uow, pepper=PEPPER, links=LINKS).order
    view = staff.order_view(order.id, uow)
    assert view.order.id == order.id
    assert view.code is not None
    assert view.code.status.value == "issued"
    assert [(m["template"], m["status"], m["attempts"]) for m in view.messages] == [
        ("purchase_code", "pending", 0)
    ]
    assert "context" not in view.messages[0]  # never the plaintext code
    for missing in ("ord_00000000000000000000000000", "nope", "ord_x"):
        with pytest.raises(OrderNotFound):
            staff.order_view(missing, uow)


# --- resending -------------------------------------------------------------------------------


def _fail(db: Database, message_id: str, attempts: int = 12) -> None:
    with db.engine.begin() as connection:
        connection.execute(
            update(outbox)
            .where(outbox.c.message_id == message_id)
            .values(status="failed", attempts=attempts, last_error="550 mailbox unavailable")
        )


def test_a_failed_email_is_resent_once_per_key_and_recorded(
    db: Database, uow: SqlUnitOfWork, clock: FakeClock
) -> None:
    sam = staff.create_staff("sam@support.example", PASSWORD, uow)
    order = commerce.fulfil(_sale(clock), uow, pepper=PEPPER, links=LINKS).order
    message_id = _message_id(db, order.id)
    _fail(db, message_id)
    clock.advance(hours=1)
    cmd = staff.ResendMessage(
        message_id=message_id,
        reason="customer asked",
        idempotency_key="console-r1",
        platform_id=sam.staff_id,
    )
    assert staff.resend_message(cmd, uow) == order.id
    with db.engine.connect() as connection:
        row = connection.execute(select(outbox).where(outbox.c.message_id == message_id)).one()
    assert (row.status, row.attempts) == ("pending", 0)
    with uow:
        claimed = uow.commerce.claim_message(clock(), until=clock() + timedelta(minutes=10))
    assert claimed is not None
    assert claimed[0] == message_id
    # A double submit: one action, no second effect even though the message failed again.
    _fail(db, message_id, attempts=3)
    assert staff.resend_message(cmd, uow) == order.id
    assert _scalar(db, select(outbox.c.status).where(outbox.c.message_id == message_id)) == (
        "failed"
    )
    assert _scalar(db, select(func.count()).select_from(staff_actions)) == 1
    assert _scalar(db, select(staff_actions.c.reason)) == "customer asked"


class _Refunded:
    def refund(self, request: RefundRequest) -> str:
        return f"refund-of-{request.sale_id}"


def test_console_refunds_and_reissues_are_recorded_with_the_staff_member(
    db: Database, uow: SqlUnitOfWork, clock: FakeClock
) -> None:
    """Refunding an unredeemed code writes no journal entry: the staff action is the record
    of who did it, and why. One action per key however often the form is sent; a platform's
    call (not a staff member's) records none."""
    sam = staff.create_staff("sam@support.example", PASSWORD, uow)
    first = commerce.fulfil(_sale(clock), uow, pepper=PEPPER, links=LINKS).order
    second = commerce.fulfil(
        _sale(clock, "sale-2", order_number="1002"), uow, pepper=PEPPER, links=LINKS
    ).order
    for _ in range(2):  # a double submit
        orders_service.reissue_code(
            orders_service.ReissueCode(
                order_id=first.id,
                reason="lost in spam",
                idempotency_key="console-k1",
                platform_id=sam.staff_id,
            ),
            uow,
            pepper=PEPPER,
            links=LINKS,
            catalog=CATALOG,
        )
        refunds.refund_order(
            refunds.RefundOrder(
                order_id=second.id,
                reason="changed their mind",
                idempotency_key="console-k2",
                platform_id=sam.staff_id,
            ),
            uow,
            gateway=_Refunded(),
            window_days=30,
            links=LINKS,
            catalog=CATALOG,
        )
    # The same key for a different action is that action's own record.
    orders_service.reissue_code(
        orders_service.ReissueCode(
            order_id=first.id, reason="again", idempotency_key="console-k2", platform_id="plat_1"
        ),
        uow,
        pepper=PEPPER,
        links=LINKS,
        catalog=CATALOG,
    )
    with db.engine.connect() as connection:
        rows = connection.execute(
            select(
                staff_actions.c.staff_id,
                staff_actions.c.action,
                staff_actions.c.subject,
                staff_actions.c.reason,
                staff_actions.c.idempotency_key,
            ).order_by(staff_actions.c.action)
        ).all()
    assert [tuple(row) for row in rows] == [
        (sam.staff_id, "refund", second.id, "changed their mind", "console-k2"),
        (sam.staff_id, "reissue", first.id, "lost in spam", "console-k1"),
    ]
    assert _scalar(db, select(func.count()).select_from(entries)) == 0, "no journal entry"


def test_a_sent_or_replaced_email_is_not_resent(
    db: Database, uow: SqlUnitOfWork, clock: FakeClock
) -> None:
    sam = staff.create_staff("sam@support.example", PASSWORD, uow)
    order = commerce.fulfil(_sale(clock), uow, pepper=PEPPER, links=LINKS).order
    message_id = _message_id(db, order.id)

    def resend(key: str, message: str = message_id, **changes: Any) -> str:
        fields = {
            "message_id": message,
            "reason": "customer asked",
            "idempotency_key": key,
            "platform_id": sam.staff_id,
            **changes,
        }
        return staff.resend_message(staff.ResendMessage(**fields), uow)

    with db.engine.begin() as connection:
        connection.execute(update(outbox).values(status="sent", sent_at=clock()))
    with pytest.raises(MessageNotResendable, match="reissue"):
        resend("k1")
    with db.engine.begin() as connection:
        connection.execute(update(outbox).values(status="failed", sent_at=None))
        connection.execute(update(codes_table).values(status="void", voided_at=clock()))
    with pytest.raises(MessageNotResendable, match="no longer valid"):
        resend("k2")
    with pytest.raises(MessageNotFound):
        resend("k3", "msg_00000000000000000000000000")
    with pytest.raises(MessageNotFound):
        resend("k4", "not-an-id")
    for bad in ({"reason": "  "}, {"reason": "x" * 501}, {"platform_id": None}):
        with pytest.raises(InvalidInput):
            resend("k5", **bad)
    assert _scalar(db, select(func.count()).select_from(staff_actions)) == 0


def test_an_email_without_a_code_is_resent_whatever_became_of_its_order(
    db: Database, uow: SqlUnitOfWork, clock: FakeClock
) -> None:
    sam = staff.create_staff("sam@support.example", PASSWORD, uow)
    order = commerce.fulfil(_sale(clock), uow, pepper=PEPPER, links=LINKS).order
    notice = Message(
        id=values.new_id("msg", clock()),
        cause=f"refund:{order.id}",
        template="refund",
        to_email=order.email,
        subject="Your refund",
        context={},
        order_id=order.id,
        attempts=0,
        created_at=clock(),
    )
    with uow:
        uow.commerce.add_message(notice, clock())
        uow.commit()
    with db.engine.begin() as connection:
        connection.execute(update(orders).values(status="refunded", refunded_at=clock()))
        connection.execute(update(outbox).values(status="failed", attempts=12))
    cmd = staff.ResendMessage(
        message_id=notice.id, reason="bounced", idempotency_key="k", platform_id=sam.staff_id
    )
    assert staff.resend_message(cmd, uow) == order.id
    with pytest.raises(MessageNotResendable, match="refunded"):  # the code's email is void
        staff.resend_message(
            replace(
                cmd, message_id=_message_id(db, order.id, "purchase_code"), idempotency_key="k2"
            ),
            uow,
        )


def test_a_console_grant_replays_under_its_key_and_refuses_another_request(
    db: Database, uow: SqlUnitOfWork
) -> None:
    sam = staff.create_staff("sam@support.example", PASSWORD, uow)
    cmd = ledger.GrantCredits(
        account_id="ana",
        amount=7,
        source="support",
        reason="goodwill",
        idempotency_key="console-abc",
        platform_id=sam.staff_id,
    )
    first = ledger.grant(cmd, uow)
    assert ledger.grant(cmd, uow) == first
    assert uow.replayed
    with pytest.raises(IdempotencyKeyReused):
        ledger.grant(replace(cmd, amount=8), uow)
    assert ledger.get_balance("ana", uow).available == 7


# --- the chart ---------------------------------------------------------------------------------


def test_the_chart_counts_sold_spent_and_expired_per_day(
    db: Database, uow: SqlUnitOfWork, clock: FakeClock
) -> None:
    def grant(key: str, amount: int, source: str, **fields: Any) -> None:
        ledger.grant(
            ledger.GrantCredits(
                account_id="ana", amount=amount, source=source, idempotency_key=key, **fields
            ),
            uow,
        )

    clock.advance(days=-40)
    grant("old", 100, "purchase")  # outside the 30 days
    clock.advance(days=38)  # two days ago
    grant("p1", 25, "purchase", valid_for="P1D")
    grant("g1", 10, "gift")
    grant("s1", 4, "support")  # not sold
    hold = ledger.place_hold(ledger.PlaceHold(account_id="ana", amount=6, idempotency_key="h"), uow)
    ledger.capture(ledger.CaptureHold(hold_id=hold.id, amount=5, idempotency_key="c"), uow)
    ledger.debit(ledger.DebitCredits(account_id="ana", amount=2, idempotency_key="d"), uow)
    clock.advance(days=2)  # today: the P1D lot expired yesterday; the sweep writes it down
    ledger.sweep(uow)

    days = staff.credit_chart(uow)
    assert len(days) == staff.CHART_DAYS
    assert days[-1].day == clock().date()
    assert days[0].day == clock().date() - timedelta(days=29)
    by_day = {d.day: (d.sold, d.spent, d.expired) for d in days}
    assert by_day[clock().date() - timedelta(days=2)] == (35, 7, 0)
    # What was left of the P1D lot, spent first as the soonest to expire: 25 - 5 - 2.
    assert by_day[clock().date()] == (0, 0, 18)
    assert sum(d.sold for d in days) == 35


# --- `tally staff create` -------------------------------------------------------------------


def test_the_cli_asks_for_the_password_twice_hidden_or_reads_it_from_stdin(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    url = f"sqlite:///{tmp_path}/cli.db"
    monkeypatch.setenv("TALLY_DATABASE_URL", url)
    monkeypatch.setenv("TALLY_SECRET_KEY", "cli test")
    database = connect(url)
    metadata.create_all(database.engine)
    runner = CliRunner()
    try:
        # A mismatched confirmation asks again; nothing is echoed.
        typed = "correct horse battery\nsomething else!!\n" + "correct horse battery\n" * 2
        done = runner.invoke(cli.app, ["staff", "create", "Sam@Support.Example"], input=typed)
        assert done.exit_code == 0, done.output
        assert "correct horse" not in done.output
        assert "staff sam@support.example (stf_" in done.output
        piped = runner.invoke(
            cli.app,
            ["staff", "create", "kim@support.example", "--password-stdin"],
            input="another good password\n",
        )
        assert piped.exit_code == 0, piped.output
        again = runner.invoke(
            cli.app,
            ["staff", "create", "kim@support.example", "--password-stdin"],
            input="another good password\n",
        )
        assert again.exit_code == 1
        assert "staff_exists" in again.output
        short = runner.invoke(
            cli.app,
            ["staff", "create", "lee@support.example", "--password-stdin"],
            input="too short\n",
        )
        assert short.exit_code == 1
        assert "12 to 1024 characters" in short.output
        disabled = runner.invoke(cli.app, ["staff", "disable", "LEE@support.example"])
        assert disabled.exit_code == 1
        assert "staff_not_found" in disabled.output
        uow = SqlUnitOfWork(database, FakeClock())
        staff.create_staff("lee@support.example", "lee's password!", uow)
        disabled = runner.invoke(cli.app, ["staff", "disable", "LEE@support.example"])
        assert disabled.exit_code == 0, disabled.output
        assert "staff lee@support.example (stf_" in disabled.output
        with pytest.raises(SignInFailed):
            staff.sign_in("lee@support.example", "lee's password!", uow, client_address=None)
        assert staff.sign_in(
            "kim@support.example", "another good password", uow, client_address=None
        )
        assert staff.sign_in("sam@support.example", PASSWORD, uow, client_address=None)
    finally:
        database.dispose()
