"""Value rules: credits, account ids, validities, times and ids. Pure, no I/O."""

from __future__ import annotations

import ipaddress
import os
import re
import threading
from base64 import b32encode
from datetime import UTC, datetime, timedelta
from typing import Final, NewType

import isodate
from email_validator import EmailNotValidError, validate_email

from tally.domain.errors import (
    InvalidAccountId,
    InvalidAmount,
    InvalidClientAddress,
    InvalidDuration,
    InvalidEmail,
    InvalidIdempotencyKey,
    InvalidTime,
)

#: Rule 1: the largest amount one request may carry. 2^53 keeps every amount exact in
#: JavaScript clients and leaves room below PostgreSQL's BIGINT for sums of many lots.
MAX_AMOUNT: Final = 2**53
ACCOUNT_ID_PATTERN: Final = re.compile(r"[A-Za-z0-9._:@-]{1,128}")
IDEMPOTENCY_KEY_MAX_LENGTH: Final = 255
#: RFC 5321's limit on a path (256) less its angle brackets.
EMAIL_MAX_LENGTH: Final = 254
NEVER: Final = "never"
#: Every time Tally takes, computes or stores lies in these years (UTC): wide enough for any
#: real validity, and far enough from datetime's year 1 and 9999 that converting an offset or
#: adding a few years never overflows.
TIME_YEAR_MIN: Final = 1970
TIME_YEAR_MAX: Final = 8999
TIME_MIN: Final = datetime(TIME_YEAR_MIN, 1, 1, tzinfo=UTC)
TIME_MAX: Final = datetime(TIME_YEAR_MAX, 12, 31, 23, 59, 59, 999_999, tzinfo=UTC)
TIME_RANGE_TEXT: Final = (
    f"between {TIME_YEAR_MIN}-01-01T00:00:00Z and {TIME_YEAR_MAX}-12-31T23:59:59Z"
)


def credits(value: object, *, field: str = "amount") -> int:
    """Rule 1: accept an int in [1, 2^53] or a string of decimal digits; refuse all else."""
    if isinstance(value, bool):
        raise InvalidAmount(f"{field} must be an integer number of credits, not a boolean")
    if isinstance(value, str):
        if not re.fullmatch(r"[0-9]{1,20}", value.strip()):
            raise InvalidAmount(f"{field} must be a whole number of credits, got {value!r}")
        value = int(value.strip())
    if not isinstance(value, int):
        raise InvalidAmount(
            f"{field} must be an integer number of credits, got {type(value).__name__}"
        )
    if value < 1:
        raise InvalidAmount(f"{field} must be at least 1, got {value}")
    if value > MAX_AMOUNT:
        raise InvalidAmount(f"{field} must be at most 2^53, got {value}")
    return value


def account_id(value: str) -> str:
    if not isinstance(value, str) or not ACCOUNT_ID_PATTERN.fullmatch(value):
        raise InvalidAccountId(
            "account_id must be 1-128 characters of A-Za-z0-9._:@-", account_id=str(value)[:140]
        )
    return value


def idempotency_key(value: str) -> str:
    if (
        not isinstance(value, str)
        or not 1 <= len(value) <= IDEMPOTENCY_KEY_MAX_LENGTH
        or not value.isprintable()
    ):
        raise InvalidIdempotencyKey(
            f"an idempotency key is 1-{IDEMPOTENCY_KEY_MAX_LENGTH} printable characters"
        )
    return value


def email(raw: str, *, field: str = "email") -> str:
    """One bare address, normalised (the domain in lower-case ASCII), or InvalidEmail.

    Refused: display names, lists, quoted local parts, IP literals, line breaks and other
    control characters, whitespace inside, a non-ASCII local part (mail leaves without
    SMTPUTF8) and anything over 254 characters. Spaces and tabs around the address are
    typing, not part of it. The local part keeps its case: compare addresses with
    `casefold()`, as everywhere in Tally."""
    if not isinstance(raw, str):
        raise _not_an_address(field, "it is not text")
    text = raw.strip(" \t")
    if len(text) > EMAIL_MAX_LENGTH:
        raise _not_an_address(field, f"it is longer than {EMAIL_MAX_LENGTH} characters")
    try:
        checked = validate_email(
            text,
            check_deliverability=False,  # no DNS where an address enters
            allow_smtputf8=False,
            allow_display_name=False,
            allow_quoted_local=False,
            allow_domain_literal=False,
        )
    except EmailNotValidError as error:
        raise _not_an_address(field, str(error)) from error
    # The library refuses these already; a header line is never built from one regardless.
    if not checked.normalized.isprintable() or any(c.isspace() for c in checked.normalized):
        raise _not_an_address(field, "the address contains whitespace or control characters")
    address: str = checked.ascii_email or checked.normalized
    return address


def _not_an_address(field: str, reason: str) -> InvalidEmail:
    return InvalidEmail(f"{field} is not one email address: {reason}", field=field, reason=reason)


#: A client's address as rate limits count it: see `client_address`.
ClientAddress = NewType("ClientAddress", str)
#: An IPv6 client is its /64: the smallest network a home line or a server is given, so every
#: address in it is one client to the rate limits.
CLIENT_IPV6_PREFIX: Final = 64
CLIENT_ADDRESS_MAX_LENGTH: Final = 64


def client_address(value: str) -> ClientAddress:
    """One spelling per client: dotted-decimal IPv4 (also when it arrives inside IPv6, mapped
    `::ffff:a.b.c.d`, 6to4 or Teredo), or an IPv6 address's /64 as `2001:db8:1:2::/64`.
    IPv4 leading zeros (octal to some parsers), zone ids, ports, brackets and anything else
    are refused: a limit counts what it can name exactly."""
    text = value.strip() if isinstance(value, str) else ""
    if not text or len(text) > CLIENT_ADDRESS_MAX_LENGTH or not text.isascii() or "%" in text:
        raise InvalidClientAddress(
            "a client address is one IPv4 or IPv6 address, without zone id or port"
        )
    try:
        address = ipaddress.ip_address(text)
    except ValueError as error:
        raise InvalidClientAddress(
            "a client address is one IPv4 or IPv6 address (IPv4 without leading zeros)"
        ) from error
    if isinstance(address, ipaddress.IPv6Address):
        teredo = address.teredo
        inside = address.ipv4_mapped or address.sixtofour or (teredo[1] if teredo else None)
        if inside is None:
            network = ipaddress.IPv6Network((address, CLIENT_IPV6_PREFIX), strict=False)
            return ClientAddress(str(network))
        address = inside
    return ClientAddress(str(address))


class Validity:
    """How long credits stay valid: an ISO 8601 duration (`P2Y`, `P1M`, `PT12H`) or `never`."""

    __slots__ = ("_duration", "text")

    def __init__(self, text: str) -> None:
        self.text = text
        self._duration: timedelta | isodate.Duration | None
        if text == NEVER:
            self._duration = None
            return
        if not isinstance(text, str) or not text.startswith("P") or len(text) > 64:
            raise InvalidDuration(f"validity must be an ISO 8601 duration or 'never', got {text!r}")
        too_long = f"validity {text!r} is longer than times can run ({TIME_RANGE_TEXT})"
        try:
            duration = isodate.parse_duration(text)
        except OverflowError as error:  # more days than a timedelta holds
            raise InvalidDuration(too_long) from error
        except (isodate.ISO8601Error, ValueError, TypeError) as error:
            raise InvalidDuration(
                f"validity must be an ISO 8601 duration or 'never', got {text!r}"
            ) from error
        try:
            end = TIME_MIN + duration
        except (OverflowError, ValueError):
            end = None
        if end is None or end > TIME_MAX:
            raise InvalidDuration(too_long)
        if end <= TIME_MIN:
            raise InvalidDuration(f"validity must be positive, got {text!r}")
        self._duration = duration

    def expires_at(self, start: datetime) -> datetime | None:
        """When credits valid from `start` stop counting; None for `never`."""
        if self._duration is None:
            return None
        try:
            end: datetime | None = start + self._duration
        except (OverflowError, ValueError):
            end = None
        if end is None or end > TIME_MAX:
            raise InvalidDuration(
                f"validity {self.text!r} from {format_time(start)} ends after the year"
                f" {TIME_YEAR_MAX}; times are {TIME_RANGE_TEXT}"
            )
        return end

    def __repr__(self) -> str:
        return f"Validity({self.text!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Validity) and other.text == self.text

    def __hash__(self) -> int:
        return hash(self.text)


def parse_time(value: str, *, field: str = "time") -> datetime:
    """RFC 3339 with an explicit offset (`Z` or `+hh:mm`), answered in UTC, within
    `TIME_MIN`..`TIME_MAX`."""
    if not isinstance(value, str) or not re.fullmatch(
        r"\d{4}-\d{2}-\d{2}[Tt ]\d{2}:\d{2}:\d{2}(\.\d{1,6})?([Zz]|[+-]\d{2}:\d{2})", value
    ):
        raise InvalidTime(f"{field} must be RFC 3339 with an offset, got {value!r}")
    # The written year first: converting year 1 or 9999 to UTC overflows.
    if not TIME_YEAR_MIN - 1 <= int(value[:4]) <= TIME_YEAR_MAX + 1:
        raise InvalidTime(f"{field} must be {TIME_RANGE_TEXT}, got {value!r}")
    try:
        parsed = datetime.fromisoformat(value.replace("z", "Z"))
    except ValueError as error:
        raise InvalidTime(f"{field} is not a valid time: {value!r}") from error
    return in_time_range(parsed.astimezone(UTC), field=field)


def in_time_range(value: datetime, *, field: str = "time") -> datetime:
    """`value` (aware) if it lies within `TIME_MIN`..`TIME_MAX`, else InvalidTime."""
    if not TIME_MIN <= value <= TIME_MAX:
        raise InvalidTime(f"{field} must be {TIME_RANGE_TEXT}, got {format_time(value)}")
    return value


def time_from_epoch(seconds: object, *, field: str = "time") -> datetime:
    """Whole seconds since 1970 (as processors send times) within the time range; a boolean,
    a fraction or milliseconds (a year past 8999) are refused with InvalidTime."""
    if isinstance(seconds, bool) or not isinstance(seconds, int):
        raise InvalidTime(f"{field} must be whole seconds since 1970, got {seconds!r}")
    if not 0 <= seconds <= int(TIME_MAX.timestamp()):
        raise InvalidTime(f"{field} must be {TIME_RANGE_TEXT} in seconds, got {seconds}")
    return datetime.fromtimestamp(seconds, UTC)


def format_time(value: datetime | None) -> str | None:
    """RFC 3339 UTC with a `Z`, the one form Tally answers in."""
    if value is None:
        return None
    assert value.tzinfo is not None, "naive datetimes never leave the adapters"
    return value.astimezone(UTC).isoformat().replace("+00:00", "Z")


_ID_ALPHABET: Final = "0123456789abcdefghjkmnpqrstvwxyz"  # Crockford base32, lower case
_ID_RANDOM_BYTES: Final = 10  # 80 bits
_ID_TIME_BITS: Final = 50  # 10 symbols of milliseconds: good until the year 37648
#: Ids take their randomness from a pool this large, refilled from the OS when spent.
ID_RANDOM_POOL_BYTES: Final = 4_000
#: RFC 4648's base32 alphabet (what `b32encode` writes) to Tally's.
_TO_ID_ALPHABET: Final = bytes.maketrans(b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567", _ID_ALPHABET.encode())


class _RandomPool(threading.local):
    """Each thread's unread bytes from `os.urandom`: one system call per 400 ids, not per
    id. The call releases the GIL, and a group-commit leader that releases it in the middle
    of a batch then waits for every thread that takes it meanwhile."""

    def __init__(self) -> None:
        self.pool = b""
        self.offset = 0

    def take(self, size: int) -> bytes:
        if self.offset + size > len(self.pool):
            self.pool, self.offset = os.urandom(ID_RANDOM_POOL_BYTES), 0
        start = self.offset
        self.offset += size
        return self.pool[start : start + size]

    def drop(self) -> None:
        self.pool, self.offset = b"", 0


_random_pool = _RandomPool()
# A forked child must not draw the bytes its parent draws too.
os.register_at_fork(after_in_child=_random_pool.drop)


def new_id(prefix: str, now: datetime) -> str:
    """`prefix_` + 10 symbols of milliseconds + 16 random symbols (80 bits): unique and
    sorted by creation time, so ids make good B-tree keys and pagination cursors."""
    millis = int(now.timestamp() * 1000)
    assert 0 <= millis < 1 << _ID_TIME_BITS, "a time Tally can name"
    # base32 writes 8 symbols per 5 bytes: the time, shifted to the top of 10 bytes, fills
    # the first 10 symbols; 10 random bytes make exactly 16.
    time_part = b32encode((millis << (80 - _ID_TIME_BITS)).to_bytes(10, "big"))[:10]
    symbols = time_part + b32encode(_random_pool.take(_ID_RANDOM_BYTES))
    return f"{prefix}_{symbols.translate(_TO_ID_ALPHABET).decode()}"


ID_PATTERN: Final = re.compile(rf"[a-z]+_[{re.escape(_ID_ALPHABET)}]{{26}}")


def is_id(value: str, prefix: str) -> bool:
    return (
        isinstance(value, str)
        and value.startswith(prefix + "_")
        and ID_PATTERN.fullmatch(value) is not None
    )


__all__ = [
    "EMAIL_MAX_LENGTH",
    "MAX_AMOUNT",
    "NEVER",
    "TIME_MAX",
    "TIME_MIN",
    "ClientAddress",
    "Validity",
    "account_id",
    "client_address",
    "credits",
    "email",
    "format_time",
    "idempotency_key",
    "in_time_range",
    "is_id",
    "new_id",
    "parse_time",
    "time_from_epoch",
]
