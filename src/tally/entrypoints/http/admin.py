"""The support console at /admin: sign-in, search, the account and order views, the actions
support takes (each a POST form with a reason, a CSRF token and a fresh idempotency key), and
the credits chart.

Sessions: an `HttpOnly`, `SameSite=Strict`, `Path=/admin` cookie holding a random token (only
its SHA-256 is stored), `Secure` whenever Tally is served over https or in production.
Forms: the session's CSRF token in a hidden field, compared in constant time, and the
Origin (or Referer) must be Tally's own when the browser sends one; otherwise 403.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Callable
from typing import Annotated, Any, Final
from urllib.parse import quote, urlsplit

from fastapi import APIRouter, Depends, Form, Path, Query, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from jinja2 import Environment, PackageLoader

from tally.bootstrap import Tally
from tally.domain import values
from tally.domain.errors import (
    CsrfRejected,
    InvalidInput,
    NotFound,
    RateLimited,
    SignInFailed,
    TallyError,
)
from tally.entrypoints.http.edge import note_rate_limited, peer_address
from tally.entrypoints.http.v1 import tally_dependency
from tally.entrypoints.views import lot_status, time_in_words
from tally.service import ledger, orders, refunds, staff
from tally.service.ports import DayTotals
from tally.service.staff import StaffSession

SESSION_COOKIE: Final = "tally_admin_session"
#: The sign-in form's CSRF token, before there is a session: a double-submit cookie.
SIGN_IN_COOKIE: Final = "tally_admin_sign_in"
COOKIE_PATH: Final = "/admin"
FORM_TOKEN_MAX_LENGTH: Final = 200
CHART_HEIGHT: Final = 160
#: What a page says after an action succeeded (a redirect names one of these).
DONE: Final = {
    "granted": "Credits granted.",
    "voided": "Lot voided.",
    "refunded": "Order refunded.",
    "reissued": "A new code was issued and emailed; the old one is void.",
    "resent": "The email is queued to be sent again.",
}
_HEADERS: Final = {
    "Cache-Control": "no-store",
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
    "Content-Security-Policy": (
        "default-src 'none'; style-src 'unsafe-inline'; img-src 'self'; "
        "form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
    ),
}

_pages = Environment(loader=PackageLoader("tally", "templates/pages"), autoescape=True)

App = Annotated[Tally, Depends(tally_dependency)]
FormToken = Annotated[str | None, Form(max_length=FORM_TOKEN_MAX_LENGTH)]
Reason = Annotated[str | None, Form(max_length=2_000)]

router = APIRouter(prefix="/admin", include_in_schema=False)


# --- plumbing ----------------------------------------------------------------------------------


def _page(name: str, status: int = 200, **context: Any) -> Response:
    html = _pages.get_template(f"admin/{name}").render(**context)
    return _secured(HTMLResponse(html, status))


def _secured(response: Response) -> Response:
    for name, value in _HEADERS.items():
        response.headers[name] = value
    return response


def _secure_cookies(tally: Tally) -> bool:
    return tally.settings.public_url.startswith("https://") or tally.settings.production


def _new_key() -> str:
    """An idempotency key for one rendered form: submitting it twice has one effect."""
    return f"console-{secrets.token_urlsafe(18)}"


def _signed_in(request: Request, tally: Tally) -> StaffSession | None:
    return staff.authenticate(request.cookies.get(SESSION_COOKIE), tally.uow())


def _to_sign_in(request: Request) -> Response:
    # Back to the page asked for; a form's target is no page, so a lapsed POST goes home.
    target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
    if request.method != "GET":
        target = "/admin"
    return _secured(RedirectResponse(f"/admin/sign-in?next={quote(target, safe='')}", 303))


def _safe_next(target: str | None) -> str:
    """Only a console path: never another site (`//evil`, `/admin@evil`, backslashes)."""
    if (
        target
        and target.startswith("/admin")
        and not target.startswith("//")
        and "\\" not in target
        and not urlsplit(target).netloc
        and target.isprintable()
    ):
        return target
    return "/admin"


def _origin(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}".lower()


def _same_origin(request: Request, tally: Tally) -> bool:
    """A browser names where a form came from (Origin, else Referer, and Sec-Fetch-Site):
    it must be Tally's public address or the host the request was sent to."""
    if request.headers.get("sec-fetch-site", "same-origin") not in ("same-origin", "none"):
        return False
    source = request.headers.get("origin")
    if source is None:
        referer = request.headers.get("referer")
        if not referer:
            return True  # nothing to check; the CSRF token still is
        source = _origin(referer)
    allowed = {_origin(tally.settings.public_url)}
    host = request.headers.get("host")
    if host:
        allowed.add(f"{request.url.scheme}://{host}".lower())
    return source.lower() in allowed


def _refused(error: TallyError, who: StaffSession | None = None) -> Response:
    headers = {"Retry-After": str(error.retry_after)} if isinstance(error, RateLimited) else {}
    response = _page("refused.html.j2", error.status, error=error, who=who)
    response.headers.update(headers)
    return response


def _checked_form(
    request: Request, tally: Tally, csrf: str | None
) -> tuple[StaffSession | None, Response | None]:
    """A POST's staff member, or the answer that refuses it: 403 from another origin or
    without this session's token, a redirect to sign-in without a session."""
    if not _same_origin(request, tally):
        return None, _refused(CsrfRejected("this form came from another site"))
    who = _signed_in(request, tally)
    if who is None:
        return None, _to_sign_in(request)
    if not staff.csrf_matches(who.csrf, csrf):
        return None, _refused(CsrfRejected("the form's security token is missing or stale"), who)
    return who, None


def _act(
    request: Request,
    tally: Tally,
    csrf: str | None,
    action: Callable[[StaffSession], str],
    on_refusal: Callable[[StaffSession, TallyError], Response],
) -> Response:
    """Run one console action: check the form, run it, and redirect to where the action
    says (the view, with what was done), or show its refusal on the page."""
    who, refusal = _checked_form(request, tally, csrf)
    if refusal is not None:
        return refusal
    assert who is not None
    try:
        target = action(who)
    except TallyError as error:
        return on_refusal(who, error)
    return _secured(RedirectResponse(target, 303))


def _account_refusal(
    tally: Tally, account_id: str
) -> Callable[[StaffSession, TallyError], Response]:
    """A refused action on an account shows the account page with the refusal."""
    return lambda who, error: _account_page(tally, who, account_id, error=error)


def _order_refusal(tally: Tally, order_id: str) -> Callable[[StaffSession, TallyError], Response]:
    """A refused action on an order shows the order page with the refusal."""
    return lambda who, error: _order_page(tally, who, order_id, error=error)


# --- signing in and out --------------------------------------------------------------------------


@router.get("/sign-in", response_class=HTMLResponse)
def sign_in_page(
    request: Request,
    tally: App,
    next_path: Annotated[str | None, Query(alias="next", max_length=2_000)] = None,
) -> Response:
    if _signed_in(request, tally) is not None:
        return _secured(RedirectResponse(_safe_next(next_path), 303))
    return _sign_in_form(tally, next_path=_safe_next(next_path))


def _sign_in_form(
    tally: Tally, *, next_path: str, status: int = 200, message: str | None = None, email: str = ""
) -> Response:
    token = secrets.token_urlsafe(32)
    response = _page(
        "sign_in.html.j2",
        status,
        title="Sign in",
        csrf=token,
        next_path=next_path,
        message=message,
        email=email,
    )
    response.set_cookie(
        SIGN_IN_COOKIE,
        token,
        max_age=3600,
        path=COOKIE_PATH,
        secure=_secure_cookies(tally),
        httponly=True,
        samesite="strict",
    )
    return response


@router.post("/sign-in", response_class=HTMLResponse)
def sign_in(
    *,
    request: Request,
    tally: App,
    email: Annotated[str, Form(max_length=320)] = "",
    password: Annotated[str, Form(max_length=staff.PASSWORD_MAX_LENGTH)] = "",
    csrf: FormToken = None,
    next_path: Annotated[str | None, Form(alias="next", max_length=2_000)] = None,
) -> Response:
    expected = request.cookies.get(SIGN_IN_COOKIE)
    if not _same_origin(request, tally) or not expected or not staff.csrf_matches(expected, csrf):
        return _refused(CsrfRejected("the sign-in form is stale or came from another site"))
    address = peer_address(request.scope)
    try:
        made = staff.sign_in(email, password, tally.uow(), client_address=address)
    except SignInFailed:
        return _sign_in_form(
            tally,
            next_path=_safe_next(next_path),
            status=401,
            message="The email or the password is wrong.",
            email=email[:320],
        )
    except RateLimited as error:
        note_rate_limited(request.scope, error)
        return _refused(error)
    response = _secured(RedirectResponse(_safe_next(next_path), 303))
    response.set_cookie(
        SESSION_COOKIE,
        made.token,
        # Max-Age, not Expires: a browser's clock may be off; the server enforces the end.
        max_age=int((made.expires_at - tally.clock()).total_seconds()),
        path=COOKIE_PATH,
        secure=_secure_cookies(tally),
        httponly=True,
        samesite="strict",
    )
    response.delete_cookie(SIGN_IN_COOKIE, path=COOKIE_PATH)
    return response


@router.post("/sign-out")
def sign_out(request: Request, tally: App, csrf: FormToken = None) -> Response:
    who, refusal = _checked_form(request, tally, csrf)
    if refusal is not None:
        return refusal
    assert who is not None
    staff.sign_out(request.cookies.get(SESSION_COOKIE), tally.uow())
    response = _secured(RedirectResponse("/admin/sign-in", 303))
    response.delete_cookie(
        SESSION_COOKIE,
        path=COOKIE_PATH,
        secure=_secure_cookies(tally),
        httponly=True,
        samesite="strict",
    )
    return response


# --- reading -------------------------------------------------------------------------------------


@router.get("", response_class=HTMLResponse)
def home(request: Request, tally: App) -> Response:
    who = _signed_in(request, tally)
    if who is None:
        return _to_sign_in(request)
    days = staff.credit_chart(tally.uow())
    return _page("home.html.j2", title="Support", who=who, chart=_chart(days), days=days)


def _chart(days: list[DayTotals]) -> dict[str, Any]:
    """Bar geometry for the SVG: three bars a day, scaled to the largest value."""
    peak = max([1, *(max(d.sold, d.spent, d.expired) for d in days)])
    width = 24
    bars = []
    for index, day in enumerate(days):
        for offset, (kind, value) in enumerate(
            (("sold", day.sold), ("spent", day.spent), ("expired", day.expired))
        ):
            height = round(value * CHART_HEIGHT / peak)
            bars.append(
                {
                    "kind": kind,
                    "x": index * width + 2 + offset * 7,
                    "y": CHART_HEIGHT - height,
                    "height": height,
                    "label": f"{staff.day_label(day.day)}: {value} {kind}",
                }
            )
    return {"bars": bars, "width": len(days) * width, "height": CHART_HEIGHT, "peak": peak}


@router.get("/pings", response_class=HTMLResponse)
def pings(request: Request, tally: App) -> Response:
    """Pings and events kept instead of acted on, so support can settle each by hand."""
    who = _signed_in(request, tally)
    if who is None:
        return _to_sign_in(request)
    kept = staff.unmatched_pings(tally.uow())
    shown = [
        {
            "ping": ping,
            "when": time_in_words(ping.created_at),
            "payload": json.dumps(ping.payload, indent=2, sort_keys=True, ensure_ascii=True),
        }
        for ping in kept
    ]
    return _page(
        "pings.html.j2",
        title="Pings Tally did not act on",
        who=who,
        shown=shown,
        limit=staff.UNMATCHED_SHOWN,
    )


@router.get("/search", response_class=HTMLResponse)
def search(
    request: Request, tally: App, q: Annotated[str, Query(max_length=2_000)] = ""
) -> Response:
    who = _signed_in(request, tally)
    if who is None:
        return _to_sign_in(request)
    try:
        found = staff.search(q, tally.uow())
    except InvalidInput as error:
        return _page("search.html.j2", 422, title="Search", who=who, q=q, error=error)
    if len(found.orders) == 1 and not found.accounts:
        return _secured(RedirectResponse(f"/admin/orders/{found.orders[0].order.id}", 303))
    if len(found.accounts) == 1 and not found.orders:
        return _secured(RedirectResponse(_account_path(found.accounts[0][0]), 303))
    return _page("search.html.j2", title="Search", who=who, q=found.text, found=found)


def _account_path(account_id: str) -> str:
    return f"/admin/accounts/{quote(account_id, safe='')}"


@router.get("/accounts/{account_id}", response_class=HTMLResponse)
def account(
    request: Request,
    tally: App,
    account_id: Annotated[str, Path(max_length=128)],
    before: Annotated[int | None, Query(ge=1)] = None,
    done: Annotated[str | None, Query(max_length=32)] = None,
) -> Response:
    who = _signed_in(request, tally)
    if who is None:
        return _to_sign_in(request)
    return _account_page(tally, who, account_id, before=before, done=done)


def _account_page(
    tally: Tally,
    who: StaffSession,
    account_id: str,
    *,
    before: int | None = None,
    done: str | None = None,
    error: TallyError | None = None,
) -> Response:
    try:
        view = staff.account_view(account_id, tally.uow(), before_seq=before)
    except (NotFound, InvalidInput) as missing:
        return _refused(missing, who)
    return _page(
        "account.html.j2",
        error.status if error else 200,
        title=f"Account {account_id}",
        who=who,
        view=view,
        lot_status=lot_status,
        done=DONE.get(done or ""),
        error=error,
        key=_new_key(),
        path=_account_path(account_id),
    )


@router.get("/orders/{order_id}", response_class=HTMLResponse)
def order(
    request: Request,
    tally: App,
    order_id: Annotated[str, Path(max_length=64)],
    done: Annotated[str | None, Query(max_length=32)] = None,
) -> Response:
    who = _signed_in(request, tally)
    if who is None:
        return _to_sign_in(request)
    return _order_page(tally, who, order_id, done=done)


def _order_page(
    tally: Tally,
    who: StaffSession,
    order_id: str,
    *,
    done: str | None = None,
    error: TallyError | None = None,
) -> Response:
    try:
        view = staff.order_view(order_id, tally.uow())
    except NotFound as missing:
        return _refused(missing, who)
    return _page(
        "order.html.j2",
        error.status if error else 200,
        title=f"Order {view.order.order_number}",
        who=who,
        view=view,
        done=DONE.get(done or ""),
        error=error,
        key=_new_key(),
        account_path=_account_path,
    )


# --- actions -------------------------------------------------------------------------------------


@router.post("/accounts/{account_id}/grant")
def grant(
    *,
    request: Request,
    tally: App,
    account_id: Annotated[str, Path(max_length=128)],
    csrf: FormToken = None,
    key: FormToken = None,
    amount: Annotated[str, Form(max_length=32)] = "",
    valid_for: Annotated[str, Form(max_length=32)] = "",
    reason: Reason = None,
) -> Response:
    def action(who: StaffSession) -> str:
        credits = _whole_number(amount)
        ledger.grant(
            ledger.GrantCredits(
                account_id=account_id,
                amount=credits,
                source="support",
                valid_for=valid_for.strip() or None,
                reason=staff.check_reason(reason),
                idempotency_key=key or "",
                platform_id=who.staff_id,
            ),
            tally.uow(),
        )
        return f"{_account_path(account_id)}?done=granted"

    return _act(request, tally, csrf, action, _account_refusal(tally, account_id))


def _whole_number(text: str) -> int:
    cleaned = text.strip()
    if not cleaned.isdigit() or not cleaned.isascii():
        raise InvalidInput("the amount is a whole number of credits")
    return values.credits(int(cleaned))


@router.post("/lots/{lot_id}/void")
def void_lot(
    *,
    request: Request,
    tally: App,
    lot_id: Annotated[str, Path(max_length=64)],
    csrf: FormToken = None,
    key: FormToken = None,
    account_id: Annotated[str, Form(max_length=128)] = "",
    reason: Reason = None,
) -> Response:
    def action(who: StaffSession) -> str:
        lot = ledger.void_lot(
            ledger.VoidLot(
                lot_id=lot_id,
                reason=staff.check_reason(reason),
                idempotency_key=key or "",
                platform_id=who.staff_id,
            ),
            tally.uow(),
        )
        return f"{_account_path(lot.account_id)}?done=voided"

    return _act(request, tally, csrf, action, _account_refusal(tally, account_id))


@router.post("/orders/{order_id}/refund")
def refund(
    *,
    request: Request,
    tally: App,
    order_id: Annotated[str, Path(max_length=64)],
    csrf: FormToken = None,
    key: FormToken = None,
    reason: Reason = None,
) -> Response:
    def action(who: StaffSession) -> str:
        refunds.refund_order(
            refunds.RefundOrder(
                order_id=order_id,
                reason=staff.check_reason(reason),
                idempotency_key=key or "",
                platform_id=who.staff_id,
            ),
            tally.uow(),
            gateway=tally.refund_gateway,
            window_days=tally.catalog.refund_window_days,
            links=tally.links,
            catalog=tally.catalog,
        )
        return f"/admin/orders/{order_id}?done=refunded"

    return _act(request, tally, csrf, action, _order_refusal(tally, order_id))


@router.post("/orders/{order_id}/reissue")
def reissue(
    *,
    request: Request,
    tally: App,
    order_id: Annotated[str, Path(max_length=64)],
    csrf: FormToken = None,
    key: FormToken = None,
    reason: Reason = None,
) -> Response:
    def action(who: StaffSession) -> str:
        orders.reissue_code(
            orders.ReissueCode(
                order_id=order_id,
                reason=staff.check_reason(reason),
                idempotency_key=key or "",
                platform_id=who.staff_id,
            ),
            tally.uow(),
            pepper=tally.pepper,
            links=tally.links,
            catalog=tally.catalog,
        )
        return f"/admin/orders/{order_id}?done=reissued"

    return _act(request, tally, csrf, action, _order_refusal(tally, order_id))


@router.post("/messages/{message_id}/resend")
def resend(
    *,
    request: Request,
    tally: App,
    message_id: Annotated[str, Path(max_length=64)],
    csrf: FormToken = None,
    key: FormToken = None,
    order_id: Annotated[str, Form(max_length=64)] = "",
    reason: Reason = None,
) -> Response:
    def action(who: StaffSession) -> str:
        found = staff.resend_message(
            staff.ResendMessage(
                message_id=message_id,
                reason=reason or "",
                idempotency_key=key or "",
                platform_id=who.staff_id,
            ),
            tally.uow(),
        )
        return f"/admin/orders/{found}?done=resent"

    return _act(request, tally, csrf, action, _order_refusal(tally, order_id))


def staff_label(platform_id: str | None, emails: dict[str, str]) -> str:
    """Who caused an entry, as the journal view shows it."""
    if platform_id is None:
        return "Tally"
    if platform_id in emails:
        return f"staff {emails[platform_id]}"
    return platform_id


_pages.globals["staff_label"] = staff_label
_pages.globals["format_time"] = lambda value: values.format_time(value) or "never"
