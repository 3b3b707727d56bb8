"""One error hierarchy, one class per broken rule.

Each class names the rule it protects, the HTTP status the API answers with, and the stable
`code` member of the problem+json body. Driver and SDK exceptions are translated into these
where they enter Tally; nothing else crosses a layer boundary.
"""

from __future__ import annotations

from typing import Any, ClassVar


class TallyError(Exception):
    """Base of every error Tally raises on purpose."""

    code: ClassVar[str] = "tally_error"
    status: ClassVar[int] = 400
    title: ClassVar[str] = "Request refused"

    def __init__(self, detail: str | None = None, **extra: Any) -> None:
        self.detail = detail or self.title
        self.extra = extra
        super().__init__(self.detail)

    def problem(self) -> dict[str, Any]:
        """The RFC 9457 body, with Tally's `code` and any rule-specific members; an extra
        named like a standard member never replaces it (`status` stays the HTTP status)."""
        body: dict[str, Any] = {
            "type": "about:blank",
            "title": self.title,
            "status": self.status,
            "code": self.code,
            "detail": self.detail,
        }
        body.update((k, v) for k, v in self.extra.items() if k not in body)
        return body


# --- bad input (rule 1, identifiers, times, durations) --------------------------------------------


class InvalidInput(TallyError):
    """A value is malformed: the request can never succeed as sent. `invalid_input`, 422."""

    code = "invalid_input"
    status = 422
    title = "Invalid input"


class InvalidAmount(InvalidInput):
    """Rule 1: credits are integers from 1 to 2^53; floats, strings, zero, negatives refused."""

    code = "invalid_amount"
    title = "Invalid amount"


class InvalidAccountId(InvalidInput):
    """An account id is not 1-128 characters of `A-Za-z0-9._:@-`."""

    code = "invalid_account_id"
    title = "Invalid account id"


class InvalidClientAddress(InvalidInput):
    """A client address (`X-Client-Address`) is not one IPv4 or IPv6 address: leading zeros,
    zone ids, ports and anything else are refused, never guessed at. 422."""

    code = "invalid_client_address"
    title = "Invalid client address"


class InvalidDuration(InvalidInput):
    """A validity is neither an ISO 8601 duration (`P2Y`, `P30D`, `PT12H`) nor `never`."""

    code = "invalid_duration"
    title = "Invalid duration"


class InvalidTime(InvalidInput):
    """A time is not RFC 3339 with an offset, or lies where the rule forbids (in the past)."""

    code = "invalid_time"
    title = "Invalid time"


class InvalidIdempotencyKey(InvalidInput):
    """Rule 5: an idempotency key is 1-255 printable characters."""

    code = "invalid_idempotency_key"
    title = "Invalid idempotency key"


class InvalidJson(InvalidInput):
    """The request body is not JSON, or not the object the endpoint takes. `invalid_json`, 400."""

    code = "invalid_json"
    status = 400
    title = "Invalid JSON"


class IdempotencyKeyRequired(InvalidInput):
    """Rule 5: every spend, grant and support call carries an `Idempotency-Key` header. 400."""

    code = "idempotency_key_required"
    status = 400
    title = "Idempotency-Key header required"


class SignatureInvalid(InvalidInput):
    """A webhook's signature is missing, wrong or too old to trust. `signature_invalid`, 400."""

    code = "signature_invalid"
    status = 400
    title = "Signature invalid"


class EventMalformed(InvalidInput):
    """A processor's event is correctly signed but not in the processor's documented shape (a
    field missing or of the wrong type, a time in milliseconds): kept for support, never
    guessed at. `event_malformed`, 400."""

    code = "event_malformed"
    status = 400
    title = "Event malformed"


class UnknownTool(InvalidInput):
    """The tool is not in the catalog, so its price is unknown. `unknown_tool`, 422."""

    code = "unknown_tool"
    title = "Unknown tool"


class InvalidEmail(InvalidInput):
    """An email address is not one bare, deliverable-looking address: a display name, a list,
    a line break, a NUL, a non-ASCII local part or over 254 characters. `invalid_email`, 422;
    `reason` says what is wrong, in the validating library's words."""

    code = "invalid_email"
    title = "Invalid email address"


class PayloadTooLarge(TallyError):
    """A request body is over the limit every endpoint has (64 KiB). 413."""

    code = "payload_too_large"
    status = 413
    title = "Request body too large"


# --- who is asking --------------------------------------------------------------------------------


class ApiKeyRequired(TallyError):
    """The API answers only requests with `Authorization: Bearer <api key>`. 401."""

    code = "api_key_required"
    status = 401
    title = "API key required"


class ApiKeyInvalid(TallyError):
    """The key is malformed, unknown or revoked. 401, with no hint which."""

    code = "api_key_invalid"
    status = 401
    title = "API key invalid"


class ScopeMissing(TallyError):
    """The key is valid but lacks the scope this endpoint needs. 403."""

    code = "scope_missing"
    status = 403
    title = "Scope missing"


# --- unknown things -------------------------------------------------------------------------------


class NotFound(TallyError):
    """Something named in the request does not exist. `not_found`, 404."""

    code = "not_found"
    status = 404
    title = "Not found"


class AccountNotFound(NotFound):
    """The account has never been used (spending does not create accounts; grants do)."""

    code = "account_not_found"
    title = "Account not found"


class LotNotFound(NotFound):
    """No lot has this id."""

    code = "lot_not_found"
    title = "Lot not found"


class HoldNotFound(NotFound):
    """No hold has this id."""

    code = "hold_not_found"
    title = "Hold not found"


class PlatformNotFound(NotFound):
    """No platform has this name or id."""

    code = "platform_not_found"
    title = "Platform not found"


class CodeNotFound(NotFound):
    """Support looked up a code that matches no order."""

    code = "code_not_found"
    title = "Code not found"


class ApiKeyNotFound(NotFound):
    """No API key has this prefix."""

    code = "api_key_not_found"
    title = "API key not found"


class OrderNotFound(NotFound):
    """No order has this id."""

    code = "order_not_found"
    title = "Order not found"


# --- wrong state ----------------------------------------------------------------------------------


class InsufficientCredits(TallyError):
    """Rule 2: available credits would go negative. `insufficient_credits`, 402."""

    code = "insufficient_credits"
    status = 402
    title = "Insufficient credits"

    def __init__(self, *, available: int, required: int) -> None:
        super().__init__(
            f"{required} credits required, {available} available",
            available=available,
            required=required,
        )


class Conflict(TallyError):
    """The request is well-formed but the thing it acts on is in the wrong state. 409."""

    code = "conflict"
    status = 409
    title = "Conflict"


class HoldNotPending(Conflict):
    """A hold is captured, released or past its TTL, so it cannot be captured or released."""

    code = "hold_not_pending"
    title = "Hold is not pending"


class CaptureExceedsHold(TallyError):
    """A capture asks for more credits than the hold reserved. `capture_exceeds_hold`, 422."""

    code = "capture_exceeds_hold"
    status = 422
    title = "Capture exceeds the held amount"


class LotVoided(Conflict):
    """The lot was voided already."""

    code = "lot_voided"
    title = "Lot is already void"


class TooManyPendingHolds(Conflict):
    """An account has reached `max_pending_holds` open holds; capture or release some first."""

    code = "too_many_pending_holds"
    title = "Too many pending holds"


class BalanceLimitExceeded(Conflict):
    """An account would hold more than `MAX_ACCOUNT_CREDITS` (2^53: lots' remaining plus
    pending holds), or owe more than that; nothing changed. `balance_limit_exceeded`, 409."""

    code = "balance_limit_exceeded"
    title = "Balance limit exceeded"


class IdempotencyKeyReused(TallyError):
    """Rule 5: the key was used before with a different request. 422."""

    code = "idempotency_key_reused"
    status = 422
    title = "Idempotency key reused with a different request"


class CodeInvalidOrUsed(TallyError):
    """Rule 11: a code that is wrong, voided or used gets this one answer, which tells a
    guesser nothing. 422."""

    code = "code_invalid_or_used"
    status = 422
    title = "Code invalid or already used"


class RateLimited(TallyError):
    """Too many failed attempts in the window (rule 11); `retry_after` seconds. 429."""

    code = "rate_limited"
    status = 429
    title = "Too many attempts"

    def __init__(
        self, detail: str | None = None, *, retry_after: int, limit: str | None = None
    ) -> None:
        super().__init__(detail, retry_after=retry_after)
        self.retry_after = retry_after
        #: Which limit tripped, for the operator's metric and log (never shown to the caller).
        self.limit = limit


class MethodNotAllowed(TallyError):
    """The path exists but not with this HTTP method. 405."""

    code = "method_not_allowed"
    status = 405
    title = "Method not allowed"


class PlatformExists(Conflict):
    """A platform with this name exists already."""

    code = "platform_exists"
    title = "Platform exists"


# --- money back and support (rules 8-10) ----------------------------------------------------------


class RefundRefused(Conflict):
    """Rule 9 does not allow this refund. 409; the subclass's `code` says why."""

    code = "refund_refused"
    title = "Refund refused"


class RefundWindowPassed(RefundRefused):
    """Rule 9: the order is older than `refund_window_days`, or refunds are off (0 days)."""

    code = "refund_window_passed"
    title = "Refund window passed"


class CreditsUsed(RefundRefused):
    """Rule 9: some of the order's credits were spent or are held for a job."""

    code = "credits_used"
    title = "Credits already used"


class AlreadyRefunded(RefundRefused):
    """The order was refunded (or disputed) already."""

    code = "already_refunded"
    title = "Already refunded"


class OrderReversed(Conflict):
    """The order was refunded or disputed, so its code cannot be reissued or resent."""

    code = "order_reversed"
    title = "Order refunded or disputed"


class OrderExpired(Conflict):
    """Rule 4: the order's credits have expired (`expires_at` passed), so a new code could
    not be redeemed either: nothing is reissued. 409."""

    code = "order_expired"
    title = "Order's credits expired"


class CodeAlreadyRedeemed(Conflict):
    """The order's code was redeemed: its credits are on an account, there is nothing to
    replace."""

    code = "code_already_redeemed"
    title = "Code already redeemed"


class ProcessorFailed(TallyError):
    """The payment processor refused or could not be reached; nothing changed in Tally. 502."""

    code = "processor_failed"
    status = 502
    title = "Payment processor failed"


class SignInFailed(TallyError):
    """Support console: the email or password is wrong (one answer for both). 401."""

    code = "sign_in_failed"
    status = 401
    title = "Sign-in failed"


class CsrfRejected(TallyError):
    """Support console: a form came without this session's CSRF token, or from another
    site. 403."""

    code = "csrf_rejected"
    status = 403
    title = "Cross-site request refused"


# --- the support console


class StaffExists(Conflict):
    """`tally staff create`: a staff member with this email exists already."""

    code = "staff_exists"
    title = "Staff member exists"


class StaffNotFound(NotFound):
    """`tally staff disable`: no staff member has this email."""

    code = "staff_not_found"
    title = "Staff member not found"


class MessageNotFound(NotFound):
    """No outbox message has this id."""

    code = "message_not_found"
    title = "Message not found"


class MessageNotResendable(Conflict):
    """Support asked to resend an email that was sent already (its code is erased), or whose
    code is no longer valid (voided, redeemed, or its order refunded): reissue instead."""

    code = "message_not_resendable"
    title = "Message cannot be resent"


class DatabaseUnavailable(TallyError):
    """The database could not be reached or the transaction could not complete. 503."""

    code = "database_unavailable"
    status = 503
    title = "Database unavailable"


class ProcessorUnavailable(TallyError):
    """A payment processor (its API, or the sandbox's own webhook) could not be asked now.
    503, so a processor's retry or the person's next try finds it back; never blamed on the
    database."""

    code = "processor_unavailable"
    status = 503
    title = "Processor unavailable"


class InternalError(TallyError):
    """A bug: Tally broke one of its own assertions. 500; the details stay in the log."""

    code = "internal_error"
    status = 500
    title = "Internal error"


class ConfigurationInvalid(TallyError):
    """Tally's settings are unsafe or incomplete (production without a real processor, a
    secret key or that processor's secrets). Raised at start-up, before anything is served;
    the detail names every setting missing. `configuration_invalid`."""

    code = "configuration_invalid"
    status = 500
    title = "Configuration invalid"


def by_code() -> dict[str, type[TallyError]]:
    """Every error class by its `code`, so clients raise the class the server named."""
    found: dict[str, type[TallyError]] = {}
    pending: list[type[TallyError]] = [TallyError]
    while pending:
        kind = pending.pop()
        found.setdefault(kind.code, kind)
        pending.extend(kind.__subclasses__())
    return found
