from __future__ import annotations

import os
from datetime import UTC, datetime, timedelta, timezone

import pytest

from tally.domain import values
from tally.domain.errors import (
    InvalidAmount,
    InvalidDuration,
    InvalidEmail,
    InvalidIdempotencyKey,
    InvalidInput,
    InvalidTime,
)


@pytest.mark.parametrize("good", [1, 5, 2**53, "7", " 12 "])
def test_credits_accepts_whole_positive_numbers(good: object) -> None:
    assert values.credits(good) == int(str(good).strip())


@pytest.mark.parametrize(
    "bad", [0, -1, 2**53 + 1, 1.0, 2.5, "2.5", "5.0", "1e3", "", "abc", "-3", True, None, [1]]
)
def test_credits_refuses_everything_else(bad: object) -> None:
    with pytest.raises(InvalidAmount):
        values.credits(bad)


@pytest.mark.parametrize(
    ("text", "start", "end"),
    [
        ("P2Y", datetime(2026, 2, 28, tzinfo=UTC), datetime(2028, 2, 28, tzinfo=UTC)),
        ("P1M", datetime(2026, 1, 31, tzinfo=UTC), datetime(2026, 2, 28, tzinfo=UTC)),
        ("P30D", datetime(2026, 1, 1, tzinfo=UTC), datetime(2026, 1, 31, tzinfo=UTC)),
        ("PT12H", datetime(2026, 1, 1, tzinfo=UTC), datetime(2026, 1, 1, 12, tzinfo=UTC)),
    ],
)
def test_validity_adds_calendar_durations(text: str, start: datetime, end: datetime) -> None:
    assert values.Validity(text).expires_at(start) == end


def test_never_means_no_expiry() -> None:
    assert values.Validity("never").expires_at(datetime(2026, 1, 1, tzinfo=UTC)) is None


@pytest.mark.parametrize("bad", ["2Y", "P", "P-1D", "P0D", "PT0S", "", "forever", "P2Y" * 30])
def test_malformed_durations_are_refused(bad: str) -> None:
    with pytest.raises(InvalidDuration):
        values.Validity(bad)


def test_validity_past_year_9999_is_refused() -> None:
    with pytest.raises(InvalidDuration):
        values.Validity("P7990Y").expires_at(datetime(2026, 1, 1, tzinfo=UTC))


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2026-03-01T10:00:00Z", datetime(2026, 3, 1, 10, tzinfo=UTC)),
        ("2026-03-01T12:00:00+02:00", datetime(2026, 3, 1, 10, tzinfo=UTC)),
        ("2026-03-01T10:00:00.5z", datetime(2026, 3, 1, 10, 0, 0, 500000, tzinfo=UTC)),
    ],
)
def test_times_are_rfc3339_answered_in_utc(text: str, expected: datetime) -> None:
    assert values.parse_time(text) == expected


@pytest.mark.parametrize(
    "bad", ["2026-03-01T10:00:00", "2026-03-01", "yesterday", "2026-13-01T10:00:00Z", ""]
)
def test_times_without_offset_or_malformed_are_refused(bad: str) -> None:
    with pytest.raises(InvalidTime):
        values.parse_time(bad)


def test_format_time_is_utc_with_z() -> None:
    assert values.format_time(datetime(2026, 3, 1, 10, tzinfo=UTC)) == "2026-03-01T10:00:00Z"


@pytest.mark.parametrize("good", ["alice", "user:42", "a.b-c_d@e", "x" * 128])
def test_account_ids(good: str) -> None:
    assert values.account_id(good) == good


@pytest.mark.parametrize("bad", ["", "x" * 129, "has space", "semi;colon", "ünïcode", "a/b"])
def test_bad_account_ids(bad: str) -> None:
    with pytest.raises(Exception, match="account_id"):
        values.account_id(bad)


@pytest.mark.parametrize("bad", ["", "x" * 256, "tab\there", "new\nline"])
def test_bad_idempotency_keys(bad: str) -> None:
    with pytest.raises(InvalidIdempotencyKey):
        values.idempotency_key(bad)


def test_ids_are_prefixed_sortable_and_unique() -> None:
    early = values.new_id("lot", datetime(2026, 1, 1, tzinfo=UTC))
    late = values.new_id("lot", datetime(2026, 1, 2, tzinfo=UTC))
    assert values.is_id(early, "lot")
    assert not values.is_id(early, "hold")
    assert early[:14] < late[:14]
    assert (
        len({values.new_id("ent", datetime(2026, 1, 1, tzinfo=UTC)) for _ in range(1000)}) == 1000
    )


def test_an_id_names_its_millisecond_in_its_first_ten_symbols() -> None:
    moment = datetime(2026, 11, 21, 22, 7, 51, 123456, tzinfo=UTC)
    symbols = values.new_id("ent", moment).removeprefix("ent_")
    alphabet = "0123456789abcdefghjkmnpqrstvwxyz"
    number = 0
    for symbol in symbols:
        number = number * 32 + alphabet.index(symbol)
    assert number >> 80 == int(moment.timestamp() * 1000)
    assert len({values.new_id("ent", moment)[-16:] for _ in range(1000)}) == 1000


def test_ids_drawn_in_a_forked_child_differ_from_the_parents() -> None:
    """Ids draw on a pool of random bytes: a child of `fork` must not draw what its
    parent draws next (two processes of one server would make the same ids)."""
    moment = datetime(2026, 1, 1, tzinfo=UTC)
    values.new_id("ent", moment)  # the pool now holds unread bytes
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        os.write(write, values.new_id("ent", moment).encode())
        os._exit(0)
    os.close(write)
    child = os.read(read, 100).decode()
    os.waitpid(pid, 0)
    assert values.is_id(child, "ent")
    assert child != values.new_id("ent", moment)


@pytest.mark.parametrize(
    "moment",
    [
        datetime(2026, 1, 2, 3, 4, 5, 6, tzinfo=UTC),
        datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC),
        datetime(2026, 1, 2, 5, 4, 5, 999999, tzinfo=timezone(timedelta(hours=2))),
    ],
)
def test_the_fast_path_writes_sqlite_times_as_sqlalchemy_does(moment: datetime) -> None:
    from tally.adapters.db.fast import SQLITE_TIME_FORMAT, _encode_sqlite, decode_time

    text = _encode_sqlite(moment)
    assert text == moment.astimezone(UTC).strftime(SQLITE_TIME_FORMAT)
    assert decode_time(text) == moment


# --- email addresses ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("given", "kept"),
    [
        ("ana@example.com", "ana@example.com"),
        ("Ana.Lee+credits@EXAMPLE.Com", "Ana.Lee+credits@example.com"),  # the local part's case
        ("  ana@example.com\t", "ana@example.com"),  # spaces around are typing
        ("ana@münchen.de", "ana@xn--mnchen-3ya.de"),  # mail leaves in ASCII
        ("a" * 64 + "@" + "b" * 63 + "." + "c" * 63 + "." + "d" * 57 + ".com", None),
    ],
)
def test_email_keeps_one_bare_address_normalised(given: str, kept: str | None) -> None:
    assert len(given.strip()) <= values.EMAIL_MAX_LENGTH
    assert values.email(given) == (kept or given)


@pytest.mark.parametrize(
    ("given", "reason"),
    [
        ("a@x.com\r\nBcc: evil@x.com", "The part after the @-sign contains invalid characters"),
        ("a@x.com\n", "The part after the @-sign contains invalid characters: U+000A."),
        ("a@x.com\r", "The part after the @-sign contains invalid characters: U+000D."),
        (
            '"Evil" <a@x.com>',
            "A display name and angle brackets around the email address are not permitted here.",
        ),
        ("<a@x.com>", "A display name and angle brackets"),
        ("a@x.com, b@y.com", "The part after the @-sign contains invalid characters: ',', '@'"),
        ("a@x.com;b@y.com", "The part after the @-sign contains invalid characters"),
        ("a\x00@x.com", "The email address contains invalid characters before the @-sign: U+0000."),
        ("a b@x.com", "The email address contains invalid characters before the @-sign: SPACE."),
        ("é@x.com", "Internationalized characters before the @-sign are not supported: 'é'."),
        ('"a b"@x.com', "Quoting the part before the @-sign is not allowed here."),
        ("a@[127.0.0.1]", "A bracketed IP address after the @-sign is not allowed here."),
        ("", "An email address must have an @-sign."),
        ("ana", "An email address must have an @-sign."),
        ("a@b", "The part after the @-sign is not valid. It should have a period."),
        ("a@x.test", "The part after the @-sign is a special-use or reserved name"),
        ("a" * 243 + "@example.com", "it is longer than 254 characters"),
        ("a" * 288 + "@example.com", "it is longer than 254 characters"),
    ],
)
def test_email_refuses_all_but_one_bare_address(given: str, reason: str) -> None:
    with pytest.raises(InvalidEmail) as refused:
        values.email(given)
    problem = refused.value.problem()
    assert (problem["status"], problem["code"], problem["field"]) == (422, "invalid_email", "email")
    assert problem["reason"].startswith(reason)
    assert problem["detail"] == f"email is not one email address: {problem['reason']}"
    assert isinstance(refused.value, InvalidInput)


def test_email_names_the_field_and_refuses_what_is_not_text() -> None:
    with pytest.raises(InvalidEmail) as refused:
        values.email(None, field="gifter_email")  # type: ignore[arg-type]
    assert refused.value.extra == {"field": "gifter_email", "reason": "it is not text"}
