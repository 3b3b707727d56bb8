"""The support console's use cases: staff members and their passwords, sign-in sessions and
their CSRF tokens, search, the account and order views, resending an unsent email, and the
day-by-day credits chart."""

from __future__ import annotations

import contextlib
import functools
import hashlib
import hmac
import secrets
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, time, timedelta
from typing import Any, Final

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError

from tally.domain import values
from tally.domain.commerce import Code, CodeStatus, Order, OrderStatus
from tally.domain.errors import (
    AccountNotFound,
    InvalidInput,
    MessageNotFound,
    MessageNotResendable,
    OrderNotFound,
    SignInFailed,
    StaffExists,
    StaffNotFound,
)
from tally.domain.model import REASON_MAX_LENGTH, Balance, Entry, Hold, HoldStatus, Lot
from tally.service import limits
from tally.service.changes import Command
from tally.service.ports import DayTotals, StaffRecord, UnitOfWork, UnmatchedPing

PASSWORD_MIN_LENGTH: Final = 12
#: argon2 hashes any length; the cap keeps one sign-in from costing more than a normal one.
PASSWORD_MAX_LENGTH: Final = 1_024
EMAIL_MAX_LENGTH: Final = 320
#: A session ends 12 hours after sign-in, or after 2 hours without a request, whichever first.
SESSION_LIFETIME: Final = timedelta(hours=12)
SESSION_IDLE: Final = timedelta(hours=2)
#: Last-seen is written at most once a minute: a page view is not a write each time.
SESSION_TOUCH_EVERY: Final = timedelta(minutes=1)
SESSION_TOKEN_BYTES: Final = 32
SESSION_TOKEN_MAX_LENGTH: Final = 100
#: Sign-in attempts allowed per window, per email and per client address; then 429.
SIGN_IN_WINDOW: Final = timedelta(minutes=15)
SIGN_IN_ATTEMPTS_PER_EMAIL: Final = 5
SIGN_IN_ATTEMPTS_PER_ADDRESS: Final = 20
SEARCH_TEXT_MAX_LENGTH: Final = 320
SEARCH_RESULTS_MAX: Final = 50
LOTS_SHOWN_MAX: Final = 200
JOURNAL_PAGE_SIZE: Final = 50
CHART_DAYS: Final = 30
STAFF_PREFIX: Final = "stf"

#: argon2id with the library's defaults (RFC 9106's second recommended profile).
_hasher: Final = PasswordHasher()
_CSRF_LABEL: Final = b"tally console csrf"


# --- passwords, tokens ---------------------------------------------------------------------------


def normalise_email(text: str) -> str:
    """A new staff member's email: one bare address (`values.email`), compared in lower case."""
    return values.email(text).lower()


def known_emails(text: str) -> list[str]:
    """The spellings to look a staff member up by, the checked one first. Members created
    before addresses were checked with `values.email` may hold one it refuses
    (`ops@corp.local`) or spells otherwise (a Unicode domain): they must still sign in and,
    above all, be disabled. Empty: nobody can hold it."""
    found: list[str] = []
    with contextlib.suppress(InvalidInput):
        found.append(normalise_email(text))
    plain = text.strip().lower() if isinstance(text, str) else ""
    usable = "@" in plain and len(plain) <= EMAIL_MAX_LENGTH and plain.isprintable()
    if usable and plain not in found:
        found.append(plain)
    return found


def _by_email(uow: UnitOfWork, spellings: list[str], *, lock: bool = False) -> StaffRecord | None:
    for spelling in spellings:
        record = uow.staff.by_email(spelling, lock=lock)
        if record is not None:
            return record
    return None


def check_password(password: str) -> str:
    if not isinstance(password, str) or not (
        PASSWORD_MIN_LENGTH <= len(password) <= PASSWORD_MAX_LENGTH
    ):
        raise InvalidInput(
            f"a password is {PASSWORD_MIN_LENGTH} to {PASSWORD_MAX_LENGTH} characters"
        )
    if "\x00" in password:
        raise InvalidInput("a password must not contain NUL characters")
    return password


def hash_password(password: str) -> str:
    return _hasher.hash(check_password(password))


def verify_password(password_hash: str, password: str) -> bool:
    try:
        return _hasher.verify(password_hash, password)
    except (VerificationError, InvalidHashError):
        return False


@functools.cache
def _decoy_hash() -> str:
    """Checked against when the email is unknown, so both wrong answers cost the same time."""
    return _hasher.hash(secrets.token_hex(16))


def token_digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def csrf_token(session_token: str) -> str:
    """The session's CSRF token: derived from the session's secret cookie, so it needs no
    storage and changes with every sign-in."""
    return hmac.new(session_token.encode(), _CSRF_LABEL, hashlib.sha256).hexdigest()


def csrf_matches(expected: str, given: str | None) -> bool:
    """Constant time, so the comparison says nothing about how much of a guess was right."""
    return given is not None and hmac.compare_digest(expected.encode(), given.encode())


# --- staff and sessions ----------------------------------------------------------------------


def create_staff(email: str, password: str, uow: UnitOfWork) -> StaffRecord:
    """A new staff member who can sign in to the console."""
    address = normalise_email(email)
    password_hash = hash_password(password)
    with uow:
        now = uow.clock()
        record = StaffRecord(values.new_id(STAFF_PREFIX, now), address, password_hash, now, None)
        if not uow.staff.add(record):
            raise StaffExists(f"a staff member with email {address} exists")
        uow.commit()
    return record


def disable_staff(email: str, uow: UnitOfWork) -> StaffRecord:
    """Stop a staff member signing in, and end their open sessions at once; their entries in
    the journal keep naming them."""
    spellings = known_emails(email)
    if not spellings:
        normalise_email(email)  # raises InvalidEmail, saying why
    address = spellings[0]
    with uow:
        record = _by_email(uow, spellings, lock=True)
        if record is None:
            raise StaffNotFound(f"no staff member has email {address}")
        uow.staff.disable(record.staff_id, uow.clock())
        uow.commit()
    return record


@dataclass(frozen=True)
class SignedIn:
    """A new session: `token` goes into the cookie and is never stored."""

    token: str
    staff_id: str
    email: str
    expires_at: datetime


@dataclass(frozen=True)
class StaffSession:
    """Who is signed in, and the CSRF token their forms carry."""

    staff_id: str
    email: str
    csrf: str
    expires_at: datetime


def sign_in(
    email: str,
    password: str,
    uow: UnitOfWork,
    *,
    client_address: str | None,
    per_email: int = SIGN_IN_ATTEMPTS_PER_EMAIL,
    per_address: int = SIGN_IN_ATTEMPTS_PER_ADDRESS,
) -> SignedIn:
    """Check the password and open a session. A wrong email and a wrong password get one
    answer (`SignInFailed`) in the same time. Each attempt is counted before the password is
    checked, with the email and the address locked (service/limits.py), so parallel guesses
    cannot outrun the limit; a success takes its attempt back."""
    spellings = known_emails(email)
    address = spellings[0] if spellings else None
    counted: list[limits.Limit] = []
    own = f"sign-in-address:{client_address}" if client_address else None
    if address is not None:
        # Spares an address that has not failed: strangers guessing a member's password
        # from elsewhere never lock the member out.
        counted.append(
            limits.Limit(
                "sign_in_email",
                f"sign-in-email:{address}",
                per_email,
                SIGN_IN_WINDOW,
                spares_clean=own,
            )
        )
    if own is not None:
        counted.append(limits.Limit("sign_in_address", own, per_address, SIGN_IN_WINDOW))
    with uow:
        now = uow.clock()
        record = _by_email(uow, spellings)
        limits.enforce(uow, counted, now, detail="too many sign-in attempts: try again later")
        attempts = uow.staff.add_attempts([limit.subject for limit in counted], now)
        uow.commit()
    # Outside any transaction: argon2 takes tens of milliseconds on purpose.
    well_formed = isinstance(password, str) and len(password) <= PASSWORD_MAX_LENGTH
    candidate = password if well_formed else ""
    matched = verify_password(record.password_hash if record else _decoy_hash(), candidate)
    if record is None or not matched or not well_formed or record.disabled_at is not None:
        raise SignInFailed("the email or the password is wrong")
    token = secrets.token_urlsafe(SESSION_TOKEN_BYTES)
    with uow:
        now = uow.clock()
        uow.staff.forget_attempts(attempts)
        if _hasher.check_needs_rehash(record.password_hash):
            uow.staff.set_password_hash(record.staff_id, _hasher.hash(password))
        uow.staff.delete_sessions_ended(record.staff_id, now - SESSION_IDLE, now)
        expires_at = now + SESSION_LIFETIME
        uow.staff.add_session(token_digest(token), record.staff_id, now=now, expires_at=expires_at)
        uow.commit()
    return SignedIn(token, record.staff_id, record.email, expires_at)


def authenticate(token: str | None, uow: UnitOfWork) -> StaffSession | None:
    """The session a cookie names, if it is still open: within 12 hours of sign-in, used in
    the last 2 hours, and its staff member not disabled."""
    if not token or len(token) > SESSION_TOKEN_MAX_LENGTH or not token.isascii():
        return None
    digest = token_digest(token)
    with uow.read_only(snapshot=False):
        now = uow.clock()
        found = uow.staff.session(digest)
    if found is None:
        return None
    ended = (
        found.expires_at <= now
        or found.last_seen_at + SESSION_IDLE <= now
        or found.staff_disabled_at is not None
    )
    if ended or now - found.last_seen_at >= SESSION_TOUCH_EVERY:
        with uow:
            if ended:
                uow.staff.delete_session(digest)
            else:
                uow.staff.touch_session(digest, now)
            uow.commit()
    if ended:
        return None
    return StaffSession(found.staff_id, found.email, csrf_token(token), found.expires_at)


def sign_out(token: str | None, uow: UnitOfWork) -> None:
    if not token or len(token) > SESSION_TOKEN_MAX_LENGTH or not token.isascii():
        return
    with uow:
        uow.staff.delete_session(token_digest(token))
        uow.commit()


def check_reason(reason: str | None) -> str:
    """Every console action says why, in 1 to 500 characters."""
    text = (reason or "").strip()
    if not text:
        raise InvalidInput("give a reason")
    if len(text) > REASON_MAX_LENGTH or "\x00" in text:
        raise InvalidInput(f"a reason is at most {REASON_MAX_LENGTH} characters")
    return text


# --- what support reads ----------------------------------------------------------------------


@dataclass(frozen=True)
class OrderLine:
    order: Order
    code: Code | None  # the one that speaks for the order: still issued, else the newest


@dataclass(frozen=True)
class SearchResult:
    text: str
    orders: list[OrderLine]
    accounts: list[tuple[str, str | None]]


def _current_code(found: list[Code]) -> Code | None:
    issued = [code for code in found if code.status is CodeStatus.ISSUED]
    chosen = issued or found
    return chosen[-1] if chosen else None


def search(text: str, uow: UnitOfWork) -> SearchResult:
    """One box: an email, order number, order id, account id, a code's last 4, or a sale id."""
    wanted = text.strip() if isinstance(text, str) else ""
    if not wanted or len(wanted) > SEARCH_TEXT_MAX_LENGTH or not wanted.isprintable():
        raise InvalidInput(f"search for 1 to {SEARCH_TEXT_MAX_LENGTH} printable characters")
    with uow.read_only():
        found = uow.staff.search_orders(wanted, limit=SEARCH_RESULTS_MAX)
        lines = [OrderLine(o, _current_code(uow.commerce.codes_of_order(o.id))) for o in found]
        accounts = uow.staff.search_accounts(wanted, limit=SEARCH_RESULTS_MAX)
    return SearchResult(wanted, lines, accounts)


@dataclass(frozen=True)
class AccountView:
    account_id: str
    email: str | None
    balance: Balance
    lots: list[Lot]
    more_lots: bool
    holds: list[Hold]
    entries: list[Entry]
    next_before_seq: int | None  # the journal's next page, older entries
    staff_emails: dict[str, str]
    now: datetime


def account_view(account_id: str, uow: UnitOfWork, *, before_seq: int | None = None) -> AccountView:
    """Balance, lots with expiry, open holds and a page of the journal, newest first, read
    at one instant."""
    values.account_id(account_id)
    if before_seq is not None and (isinstance(before_seq, bool) or before_seq < 1):
        raise InvalidInput("before is a journal sequence number")
    with uow.read_only():
        now = uow.clock()
        account = uow.accounts.get(account_id)
        if account is None:
            raise AccountNotFound(account_id=account_id)
        lots = uow.accounts.lots(account_id, limit=LOTS_SHOWN_MAX + 1, starting_after=None)
        journal = uow.journal.entries(
            account_id, limit=JOURNAL_PAGE_SIZE + 1, before_seq=before_seq
        )
        staff_ids = sorted({e.platform_id or "" for e in journal if _is_staff(e.platform_id)})
        emails = uow.staff.emails(staff_ids)
    holds = sorted(
        (h for h in account.holds.values() if h.status_at(now) is HoldStatus.PENDING),
        key=lambda h: h.created_at,
    )
    page = journal[:JOURNAL_PAGE_SIZE]
    return AccountView(
        account_id=account_id,
        email=account.email,
        balance=account.balance(now),
        lots=lots[:LOTS_SHOWN_MAX],
        more_lots=len(lots) > LOTS_SHOWN_MAX,
        holds=holds,
        entries=page,
        next_before_seq=page[-1].seq if len(journal) > JOURNAL_PAGE_SIZE else None,
        staff_emails=emails,
        now=now,
    )


def _is_staff(platform_id: str | None) -> bool:
    return platform_id is not None and platform_id.startswith(STAFF_PREFIX + "_")


@dataclass(frozen=True)
class OrderView:
    order: Order
    code: Code | None
    codes: list[Code]
    messages: list[dict[str, Any]] = field(default_factory=list)


def order_view(order_id: str, uow: UnitOfWork) -> OrderView:
    """An order with its codes (status and last 4, never the code) and its email history."""
    if not values.is_id(order_id, "ord"):
        raise OrderNotFound(order_id=str(order_id)[:64])
    with uow.read_only():
        order = uow.commerce.order(order_id)
        if order is None:
            raise OrderNotFound(order_id=order_id)
        found = uow.commerce.codes_of_order(order_id)
        messages = uow.commerce.messages_of_order(order_id)
    return OrderView(order, _current_code(found), found, messages)


# --- recording what staff did -----------------------------------------------------------------

#: What `staff_actions` records: every console action that changes an order or an email.
STAFF_ACTIONS: Final = ("resend", "refund", "reissue")


def record_action(
    uow: UnitOfWork,
    *,
    platform_id: str | None,
    action: str,
    subject: str,
    reason: str | None,
    idempotency_key: str,
    now: datetime,
) -> bool:
    """Inside the caller's transaction: when a staff member (the console) asked, record who
    did `action` to `subject`, why, and under which key, so every console action is
    attributable even when it writes no journal entry (refunding an unredeemed code voids the
    code, and touches no account). A platform's own call records nothing: its entries carry
    its id. Answers False when this staff member's key already recorded this action."""
    assert action in STAFF_ACTIONS
    if not _is_staff(platform_id):
        return True
    assert platform_id is not None
    text = (reason or "").strip() or action
    return uow.staff.add_action(
        staff_id=platform_id,
        action=action,
        subject=subject,
        reason=text[:REASON_MAX_LENGTH],
        idempotency_key=idempotency_key,
        now=now,
    )


# --- resending an email ---------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class ResendMessage(Command):
    """`platform_id` is the staff member's id: the action is recorded under it."""

    message_id: str
    reason: str


def resend_message(cmd: ResendMessage, uow: UnitOfWork) -> str:
    """Put an unsent (pending or failed) email back in the queue, due now, with its retries
    renewed; once per idempotency key. A sent email cannot be resent: its code was erased
    when it went out (rule 10), so support reissues instead. Answers the message's order id."""
    reason = check_reason(cmd.reason)
    key = values.idempotency_key(cmd.idempotency_key)
    if not _is_staff(cmd.platform_id):
        raise InvalidInput("only a staff member resends email")
    assert cmd.platform_id is not None
    if not values.is_id(cmd.message_id, "msg"):
        raise MessageNotFound(message_id=str(cmd.message_id)[:64])
    with uow:
        now = uow.clock()
        message = uow.staff.message_for_update(cmd.message_id)
        if message is None:
            raise MessageNotFound(message_id=cmd.message_id)
        order_id = str(message["order_id"] or "")
        recorded = record_action(
            uow,
            platform_id=cmd.platform_id,
            action="resend",
            subject=cmd.message_id,
            reason=reason,
            idempotency_key=key,
            now=now,
        )
        if not recorded:
            return order_id  # a double submit: the first one did it
        _check_resendable(message, uow)
        uow.staff.requeue_message(cmd.message_id, now)
        uow.commit()
    return order_id


def _check_resendable(message: dict[str, Any], uow: UnitOfWork) -> None:
    if message["status"] == "sent":
        raise MessageNotResendable(
            "this email was sent, and its code erased when it went out: reissue a code instead"
        )
    cause = str(message["cause"])
    if not cause.startswith("code:") or message["order_id"] is None:
        return  # no code in it (a refund notice, say): nothing can have gone stale
    order = uow.commerce.order(message["order_id"])
    if order is not None and order.status is not OrderStatus.FULFILLED:
        raise MessageNotResendable(f"the order is {order.status.value}: its code is void")
    code_id = cause.removeprefix("code:")
    code = next(
        (c for c in uow.commerce.codes_of_order(message["order_id"]) if c.id == code_id), None
    )
    if code is None or code.status is not CodeStatus.ISSUED:
        raise MessageNotResendable("the code in this email is no longer valid")


# --- the chart -------------------------------------------------------------------------------


#: Unmatched pings the console lists, newest first.
UNMATCHED_SHOWN: Final = 100


def unmatched_pings(uow: UnitOfWork, *, limit: int = UNMATCHED_SHOWN) -> list[UnmatchedPing]:
    """Pings and events Tally kept instead of acting on, newest first: support decides what
    each was (a sale to fulfil by hand, a forgery, a product missing from the catalog)."""
    assert 1 <= limit <= 1_000
    with uow.read_only():
        return uow.commerce.unmatched(limit)


def credit_chart(uow: UnitOfWork, *, days: int = CHART_DAYS) -> list[DayTotals]:
    """Credits sold (grants into purchase and gift lots), spent (captures and debits) and
    expired, per UTC day, for the last `days` days including today; days without any are 0."""
    assert 1 <= days <= 366
    with uow.read_only():
        today = uow.clock().astimezone(UTC).date()
        first = today - timedelta(days=days - 1)
        found = {
            t.day: t for t in uow.staff.daily_totals(datetime.combine(first, time(0), tzinfo=UTC))
        }
    return [
        found.get(day, DayTotals(day, 0, 0, 0))
        for day in (first + timedelta(days=n) for n in range(days))
    ]


def day_label(day: date) -> str:
    return day.strftime("%b %d")
