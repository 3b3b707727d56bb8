"""`tally`: the operator's command line (docs/rules.md §6). `TALLY_DATABASE_URL` picks the
database."""

from __future__ import annotations

import functools
import json
import secrets
import sys
from collections.abc import Callable
from typing import Annotated, Any, ParamSpec, TypeVar

import structlog
import typer

from tally import logs
from tally.adapters.db.audit import MAX_LISTED_VIOLATIONS
from tally.bootstrap import Tally, bootstrap
from tally.config import Settings
from tally.domain import keys, values
from tally.domain.errors import TallyError
from tally.entrypoints.views import balance_view, debit_view, entry_view, hold_view, lot_view
from tally.service import ledger, platforms

app = typer.Typer(
    name="tally",
    help="Tally: a self-hosted credits platform for AI tool sites.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
log = structlog.get_logger("tally.cli")

P = ParamSpec("P")
T = TypeVar("T")


def _print(data: Any) -> None:
    typer.echo(json.dumps(data, indent=2, ensure_ascii=False))


def refusals(command: Callable[P, T]) -> Callable[P, T]:
    """Turn a TallyError into its problem JSON on stderr and exit status 1."""

    @functools.wraps(command)
    def run(*args: P.args, **kwargs: P.kwargs) -> T:
        try:
            return command(*args, **kwargs)
        except TallyError as error:
            typer.echo(json.dumps(error.problem(), ensure_ascii=False), err=True)
            raise typer.Exit(1) from error

    return run


def _tally() -> Tally:
    return bootstrap()


def _key(given: str | None) -> str:
    # Rule 5: every change has a key. A person at a terminal gets a fresh one; scripts that
    # retry pass their own with --idempotency-key.
    return given if given is not None else f"cli-{secrets.token_hex(12)}"


IdempotencyKey = Annotated[
    str | None,
    typer.Option("--idempotency-key", help="Replays return the first result (rule 5)."),
]


@app.command()
@refusals
def migrate() -> None:
    """Create or upgrade the database schema."""
    from tally.adapters.db.migrate import current, upgrade

    tally = _tally()
    try:
        upgrade(tally.database)
        typer.echo(f"database at revision {current(tally.database)}")
    finally:
        tally.close()


@app.command()
@refusals
def grant(
    account_id: str,
    amount: str,
    source: Annotated[str, typer.Option(help="purchase, gift, membership, ...")] = "promotional",
    valid_for: Annotated[str | None, typer.Option(help="ISO 8601 duration or 'never'")] = None,
    expires_at: Annotated[str | None, typer.Option(help="RFC 3339 time")] = None,
    priority: int = 0,
    reason: str | None = None,
    idempotency_key: IdempotencyKey = None,
) -> None:
    """Grant credits to an account (created on first use); prints the lot."""
    tally = _tally()
    try:
        lot = ledger.grant(
            ledger.GrantCredits(
                account_id=account_id,
                amount=values.credits(amount),
                source=source,
                valid_for=valid_for,
                expires_at=None if expires_at is None else values.parse_time(expires_at),
                priority=priority,
                reason=reason,
                idempotency_key=_key(idempotency_key),
            ),
            tally.uow(),
        )
        _print(lot_view(lot, tally.clock()))
    finally:
        tally.close()


@app.command()
@refusals
def balance(
    account_id: str,
    at: Annotated[str | None, typer.Option(help="RFC 3339: the balance at a past time")] = None,
) -> None:
    """Print an account's balance (docs/rules.md §3)."""
    tally = _tally()
    try:
        when = None if at is None else values.parse_time(at, field="at")
        _print(balance_view(ledger.get_balance(account_id, tally.uow(), at=when)))
    finally:
        tally.close()


@app.command()
@refusals
def hold(
    account_id: str,
    amount: str,
    ttl_seconds: int = 900,
    idempotency_key: IdempotencyKey = None,
) -> None:
    """Reserve credits for a job; prints the hold."""
    tally = _tally()
    try:
        placed = ledger.place_hold(
            ledger.PlaceHold(
                account_id=account_id,
                amount=values.credits(amount),
                ttl_seconds=ttl_seconds,
                idempotency_key=_key(idempotency_key),
            ),
            tally.uow(),
        )
        _print(hold_view(placed, tally.clock()))
    finally:
        tally.close()


@app.command()
@refusals
def capture(
    hold_id: str,
    amount: Annotated[str | None, typer.Option(help="credits to keep; default all")] = None,
    idempotency_key: IdempotencyKey = None,
) -> None:
    """Capture a pending hold, fully or partly; the rest goes back to its lots."""
    tally = _tally()
    try:
        captured = ledger.capture(
            ledger.CaptureHold(
                hold_id=hold_id,
                amount=None if amount is None else values.credits(amount),
                idempotency_key=_key(idempotency_key),
            ),
            tally.uow(),
        )
        _print(hold_view(captured, tally.clock()))
    finally:
        tally.close()


@app.command()
@refusals
def release(
    hold_id: str, reason: str | None = None, idempotency_key: IdempotencyKey = None
) -> None:
    """Release a pending hold: its credits go back to the lots they came from."""
    tally = _tally()
    try:
        released = ledger.release(
            ledger.ReleaseHold(
                hold_id=hold_id, reason=reason, idempotency_key=_key(idempotency_key)
            ),
            tally.uow(),
        )
        _print(hold_view(released, tally.clock()))
    finally:
        tally.close()


@app.command()
@refusals
def debit(account_id: str, amount: str, idempotency_key: IdempotencyKey = None) -> None:
    """Spend credits in one step (a hold and its capture)."""
    tally = _tally()
    try:
        done = ledger.debit(
            ledger.DebitCredits(
                account_id=account_id,
                amount=values.credits(amount),
                idempotency_key=_key(idempotency_key),
            ),
            tally.uow(),
        )
        _print(debit_view(done))
    finally:
        tally.close()


@app.command("void")
@refusals
def void_lot(
    lot_id: str,
    reason: Annotated[str, typer.Option(help="why; recorded in the journal")],
    idempotency_key: IdempotencyKey = None,
) -> None:
    """Void what remains of a lot."""
    tally = _tally()
    try:
        lot = ledger.void_lot(
            ledger.VoidLot(lot_id=lot_id, reason=reason, idempotency_key=_key(idempotency_key)),
            tally.uow(),
        )
        _print(lot_view(lot, tally.clock()))
    finally:
        tally.close()


@app.command()
@refusals
def clawback(
    account_id: str,
    amount: str,
    reason: Annotated[str, typer.Option(help="why; recorded in the journal")],
    lot_id: str | None = None,
    idempotency_key: IdempotencyKey = None,
) -> None:
    """Take credits back; what is already spent becomes debt (rule 8)."""
    tally = _tally()
    try:
        done = ledger.claw_back(
            ledger.ClawBack(
                account_id=account_id,
                amount=values.credits(amount),
                reason=reason,
                lot_id=lot_id,
                idempotency_key=_key(idempotency_key),
            ),
            tally.uow(),
        )
        _print([entry_view(entry) for entry in done])
    finally:
        tally.close()


@app.command()
@refusals
def entries(account_id: str, limit: Annotated[int, typer.Option(min=1, max=500)] = 20) -> None:
    """Print an account's journal, newest first."""
    tally = _tally()
    try:
        found = ledger.list_entries(account_id, tally.uow(), limit=limit).items
        _print([entry_view(entry) for entry in found])
    finally:
        tally.close()


@app.command()
@refusals
def check() -> None:
    """Audit rule 6 for every account, lot and hold; exit 1 listing every violation."""
    tally = _tally()
    try:
        report = ledger.check(tally.uow())
    finally:
        tally.close()
    summary = (
        f"{report.accounts} accounts, {report.lots} lots, {report.holds} holds, "
        f"{report.entries} entries; {report.due_lots} lots and {report.due_holds} holds "
        "due for the sweep"
    )
    if not report.violations:
        typer.echo(f"ok: conservation holds: {summary}")
        return
    for violation in report.violations[:MAX_LISTED_VIOLATIONS]:
        typer.echo(f"violation: {violation}")
    hidden = len(report.violations) - MAX_LISTED_VIOLATIONS
    if hidden > 0:
        typer.echo(f"... and {hidden} more")
    typer.echo(f"FAILED: {len(report.violations)} violations: {summary}")
    raise typer.Exit(1)


platforms_app = typer.Typer(help="Platforms: the AI tool sites that call the API.")
keys_app = typer.Typer(help="API keys of platforms.")
app.add_typer(platforms_app, name="platforms")
app.add_typer(keys_app, name="keys")

DEFAULT_SCOPES = ",".join(keys.DEFAULT_SCOPES)
Scopes = Annotated[
    str, typer.Option("--scopes", help=f"comma-separated, of: {', '.join(keys.SCOPES)}")
]


def _print_key(issued: platforms.IssuedKey) -> None:
    record = issued.record
    typer.echo(f"platform {record.platform_name} ({record.platform_id})")
    typer.echo(f"key {record.prefix} with scopes {','.join(record.scopes)}; shown only once:")
    typer.echo(issued.plaintext)  # alone on the last line, for scripts


@platforms_app.command("create")
@refusals
def platforms_create(name: str, scopes: Scopes = DEFAULT_SCOPES) -> None:
    """Create a platform and its first API key (the key is printed once, on the last line)."""
    tally = _tally()
    try:
        _print_key(platforms.create_platform(name, scopes, tally.uow()))
    finally:
        tally.close()


@keys_app.command("create")
@refusals
def keys_create(platform: str, scopes: Scopes = DEFAULT_SCOPES) -> None:
    """Create another key for a platform (printed once, on the last line)."""
    tally = _tally()
    try:
        _print_key(platforms.create_key(platform, scopes, tally.uow()))
    finally:
        tally.close()


@keys_app.command("list")
@refusals
def keys_list() -> None:
    """Every key: prefix, platform, scopes, created, revoked. Never the secret."""
    tally = _tally()
    try:
        found = platforms.list_keys(tally.uow())
    finally:
        tally.close()
    for key in found:
        revoked = f"revoked {values.format_time(key.revoked_at)}" if key.revoked_at else "active"
        typer.echo(
            f"{key.prefix}  {key.platform_name}  {','.join(key.scopes)}  "
            f"created {values.format_time(key.created_at)}  {revoked}"
        )


@keys_app.command("revoke")
@refusals
def keys_revoke(key_prefix: str) -> None:
    """Revoke a key by its visible prefix (tly_...); it stops working at the next request."""
    tally = _tally()
    try:
        revoked = platforms.revoke_key(key_prefix, tally.uow())
    finally:
        tally.close()
    typer.echo(f"revoked {revoked.prefix} of {revoked.platform_name}")


# --- the support console's staff

staff_app = typer.Typer(help="Staff who sign in to the support console at /admin.")
app.add_typer(staff_app, name="staff")


@staff_app.command("create")
@refusals
def staff_create(
    email: str,
    password_stdin: Annotated[
        bool, typer.Option("--password-stdin", help="read the password from stdin (scripts)")
    ] = False,
) -> None:
    """Create a staff member; the password is asked twice, hidden (at least 12 characters)."""
    from tally.service import staff

    staff.normalise_email(email)  # a wrong address is refused before the password is asked
    if password_stdin:
        password = sys.stdin.readline().rstrip("\r\n")
    else:
        password = typer.prompt("Password", hide_input=True, confirmation_prompt=True)
    tally = _tally()
    try:
        made = staff.create_staff(email, password, tally.uow())
    finally:
        tally.close()
    typer.echo(f"staff {made.email} ({made.staff_id}) can sign in at /admin/sign-in")


@staff_app.command("disable")
@refusals
def staff_disable(email: str) -> None:
    """Stop a staff member signing in; their open sessions end at once."""
    from tally.service import staff

    tally = _tally()
    try:
        done = staff.disable_staff(email, tally.uow())
    finally:
        tally.close()
    typer.echo(f"staff {done.email} ({done.staff_id}) is disabled")


@app.command()
@refusals
def serve(
    host: Annotated[str, typer.Option(help="address to listen on")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="port to listen on")] = 8000,
    workers: Annotated[int, typer.Option(help="worker processes (PostgreSQL)")] = 1,
) -> None:
    """Serve the HTTP API (and, unless TALLY_WORKER=off, the worker's jobs in-process)."""
    import uvicorn

    # Refuse unsafe settings here, as one message, not as a traceback from every server process.
    Settings.from_env().check()
    # A log event, not a bare line: the server's log stays one JSON object per line.
    log.info("serving", url=f"http://{host}:{port}", docs=f"http://{host}:{port}/docs")
    uvicorn.run(
        "tally.entrypoints.http.app:app_from_env",
        factory=True,
        host=host,
        port=port,
        workers=workers,
        log_config=None,
        access_log=False,
        server_header=False,
    )


@app.command()
@refusals
def worker() -> None:
    """Run the worker's jobs (email, the expiry sweep, reconciliation) until SIGTERM."""
    from tally.entrypoints.worker import Worker

    tally = _tally()
    try:
        Worker(tally).run_forever()
    finally:
        tally.close()


@app.command()
@refusals
def sweep() -> None:
    """Write down lots and holds that have expired."""
    tally = _tally()
    try:
        result = ledger.sweep(tally.uow())
    finally:
        tally.close()
    log.info(
        "sweep", accounts=result.accounts, holds=result.holds_expired, lots=result.lots_expired
    )
    typer.echo(
        f"swept {result.accounts} accounts: {result.holds_expired} holds and "
        f"{result.lots_expired} lots expired"
    )


# --- lost codes and reconciliation ----------------------------------------------------------------


@app.command()
@refusals
def reissue(
    order_id: str,
    reason: Annotated[str | None, typer.Option(help="why; kept with the new code's email")] = None,
    idempotency_key: IdempotencyKey = None,
) -> None:
    """Void an order's unredeemed code and email a new one to the order's address."""
    from tally.entrypoints.http.orders import order_view
    from tally.service import orders

    tally = _tally()
    try:
        order = orders.reissue_code(
            orders.ReissueCode(
                order_id=order_id, reason=reason, idempotency_key=_key(idempotency_key)
            ),
            tally.uow(),
            pepper=tally.pepper,
            links=tally.links,
            catalog=tally.catalog,
        )
        _print(order_view(order))
    finally:
        tally.close()


@app.command()
@refusals
def reconcile(
    since: Annotated[
        str | None,
        typer.Option(help="YYYY-MM-DD: sales created on or after it (default: 3 days ago)"),
    ] = None,
) -> None:
    """Fulfil the processors' sales that Tally never saw, once; print what was found and
    fixed as JSON. Exit status 1 if a processor could not be asked."""
    from datetime import date

    from tally.adapters.sales import sources
    from tally.domain.errors import InvalidInput
    from tally.service import reconcile as reconciliation

    try:
        day = None if since is None else date.fromisoformat(since)
    except ValueError as error:
        raise InvalidInput("--since is a date: YYYY-MM-DD") from error
    tally = _tally()
    try:
        reports = reconciliation.reconcile(
            sources(tally.settings, tally.catalog),
            tally.uow(),
            since=day,
            pepper=tally.pepper,
            links=tally.links,
        )
    finally:
        tally.close()
    _print({"processors": [report.as_json() for report in reports]})
    if any(report.error for report in reports):
        raise typer.Exit(1)


# --- refunds --------------------------------------------------------------------------------------


@app.command()
@refusals
def refund(
    order_id: str,
    reason: Annotated[str, typer.Option(help="why; recorded in the journal")],
    idempotency_key: IdempotencyKey = None,
) -> None:
    """Refund an order at its processor and take its credits back (rule 9)."""
    from tally.entrypoints.http.refunds import refund_view
    from tally.service import refunds

    tally = _tally()
    try:
        order = refunds.refund_order(
            refunds.RefundOrder(
                order_id=order_id, reason=reason, idempotency_key=_key(idempotency_key)
            ),
            tally.uow(),
            gateway=tally.refund_gateway,
            window_days=tally.catalog.refund_window_days,
            links=tally.links,
            catalog=tally.catalog,
        )
        _print(refund_view(order))
    finally:
        tally.close()


def main() -> None:
    logs.configure()
    app()
