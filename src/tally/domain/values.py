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
        try:
            duration = isodate.parse_duration(text)
        except (isodate.ISO8601Error, ValueError, TypeError) as error:
            raise InvalidDuration(
                f"validity must be an ISO 8601 duration or 'never', got {text!r}"
            ) from error
        start = datetime(2000, 1, 1, tzinfo=UTC)
        try:
            positive = start + duration > start
        except (OverflowError, ValueError) as error:
            raise InvalidDuration(f"validity {text!r} runs past the year 9999") from error
        if not positive:
            raise InvalidDuration(f"validity must be positive, got {text!r}")
        self._duration = duration

    def expires_at(self, start: datetime) -> datetime | None:
        """When credits valid from `start` stop counting; None for `never`."""
        if self._duration is None:
            return None
        try:
            end: datetime = start + self._duration
        except (OverflowError, ValueError) as error:
            raise InvalidDuration(f"validity {self.text!r} runs past the year 9999") from error
        return end

    def __repr__(self) -> str:
        return f"Validity({self.text!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Validity) and other.text == self.text

    def __hash__(self) -> int:
        return hash(self.text)


def parse_time(value: str, *, field: str = "time") -> datetime:
    """RFC 3339 with an explicit offset (`Z` or `+hh:mm`), answered in UTC."""
    if not isinstance(value, str) or not re.fullmatch(
        r"\d{4}-\d{2}-\d{2}[Tt ]\d{2}:\d{2}:\d{2}(\.\d{1,6})?([Zz]|[+-]\d{2}:\d{2})", value
    ):
        raise InvalidTime(f"{field} must be RFC 3339 with an offset, got {value!r}")
    try:
        parsed = datetime.fromisoformat(value.replace("z", "Z"))
    except ValueError as error:
        raise InvalidTime(f"{field} is not a valid time: {value!r}") from error
    return parsed.astimezone(UTC)


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
    "ClientAddress",
    "Validity",
    "account_id",
    "client_address",
    "credits",
    "email",
    "format_time",
    "idempotency_key",
    "is_id",
    "new_id",
    "parse_time",
]
