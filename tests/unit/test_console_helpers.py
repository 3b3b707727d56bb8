"""The support console's pure helpers: passwords, session tokens, CSRF tokens and the checks
on where a form came from and where a sign-in may lead."""

from __future__ import annotations

from typing import Any

import pytest
from starlette.requests import Request

from tally.adapters.catalog_file import builtin
from tally.bootstrap import Tally
from tally.config import Settings
from tally.domain.errors import InvalidInput
from tally.entrypoints.http import admin
from tally.service import staff


def test_passwords_are_argon2id_salted_and_verified() -> None:
    first = staff.hash_password("correct horse battery")
    second = staff.hash_password("correct horse battery")
    assert first.startswith("$argon2id$")
    assert first != second  # salted
    assert staff.verify_password(first, "correct horse battery")
    assert not staff.verify_password(first, "correct horse batterY")
    assert not staff.verify_password(first, "")
    assert not staff.verify_password("not a hash", "correct horse battery")


@pytest.mark.parametrize(
    "password", ["", "eleven char", "x" * (staff.PASSWORD_MAX_LENGTH + 1), "nul in it\x00abc"]
)
def test_short_long_and_nul_passwords_are_refused(password: str) -> None:
    with pytest.raises(InvalidInput):
        staff.hash_password(password)


def test_the_shortest_and_longest_passwords_are_accepted() -> None:
    for password in ("twelve chars", "y" * staff.PASSWORD_MAX_LENGTH):
        assert staff.verify_password(staff.hash_password(password), password)


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ("Sam@Example.COM", "sam@example.com"),
        ("  sam@example.com\t", "sam@example.com"),
        ("a@b.co", "a@b.co"),
    ],
)
def test_emails_are_compared_in_lower_case(given: str, expected: str) -> None:
    assert staff.normalise_email(given) == expected


@pytest.mark.parametrize(
    "given",
    [
        "",
        "sam",
        "@example.com",
        "sam@",
        "a@b@c",
        "s am@example.com",
        "sam\x00@x.y",
        "sam@example.com\n",  # a line break is never part of an address
        "a@b",  # no dot in the domain
        "Sam <sam@example.com>",
    ],
)
def test_malformed_emails_are_refused(given: str) -> None:
    with pytest.raises(InvalidInput):
        staff.normalise_email(given)


def test_csrf_tokens_belong_to_one_session_and_compare_exactly() -> None:
    one, two = "session-token-one", "session-token-two"
    assert staff.csrf_token(one) == staff.csrf_token(one)
    assert staff.csrf_token(one) != staff.csrf_token(two)
    assert len(staff.csrf_token(one)) == 64
    expected = staff.csrf_token(one)
    assert staff.csrf_matches(expected, expected)
    for wrong in (None, "", expected[:-1], expected + "0", expected.upper(), staff.csrf_token(two)):
        assert not staff.csrf_matches(expected, wrong)
    # Only a digest of the session token is stored, and it is not the CSRF token.
    assert staff.token_digest(one) not in (one, expected)
    assert len(staff.token_digest(one)) == 64


def test_reasons_are_required_and_bounded() -> None:
    assert staff.check_reason("  refund asked by mail ") == "refund asked by mail"
    for bad in (None, "", "   ", "x" * 501, "a\x00b"):
        with pytest.raises(InvalidInput):
            staff.check_reason(bad)


@pytest.mark.parametrize(
    ("target", "expected"),
    [
        ("/admin/orders/ord_1", "/admin/orders/ord_1"),
        ("/admin?x=1", "/admin?x=1"),
        (None, "/admin"),
        ("", "/admin"),
        ("/v1/accounts", "/admin"),
        ("//evil.example/admin", "/admin"),
        ("https://evil.example/admin", "/admin"),
        ("/admin\\evil", "/admin"),
        ("/admin\n", "/admin"),
    ],
)
def test_after_sign_in_only_console_paths_are_followed(target: str | None, expected: str) -> None:
    assert admin._safe_next(target) == expected


def _request(headers: dict[str, str], host: str = "tally.test") -> Request:
    scope: dict[str, Any] = {
        "type": "http",
        "method": "POST",
        "scheme": "http",
        "path": "/admin/sign-out",
        "query_string": b"",
        "server": (host, 80),
        "headers": [(b"host", host.encode())]
        + [(k.lower().encode(), v.encode()) for k, v in headers.items()],
    }
    return Request(scope)


def _tally(public_url: str) -> Tally:
    settings = Settings(public_url=public_url)
    return Tally(settings, None, None, None, builtin())  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("headers", "allowed"),
    [
        ({}, True),  # nothing to check: the token decides
        ({"Origin": "http://tally.test"}, True),
        ({"Origin": "https://credits.example"}, True),  # the public address
        ({"Origin": "HTTPS://Credits.Example"}, True),
        ({"Referer": "https://credits.example/admin/orders/x"}, True),
        ({"Sec-Fetch-Site": "same-origin", "Origin": "http://tally.test"}, True),
        ({"Sec-Fetch-Site": "none"}, True),  # typed into the address bar
        ({"Origin": "https://evil.example"}, False),
        ({"Origin": "null"}, False),
        ({"Origin": "http://tally.test:8080"}, False),
        ({"Referer": "https://evil.example/credits.example"}, False),
        ({"Sec-Fetch-Site": "cross-site"}, False),
        ({"Sec-Fetch-Site": "same-site", "Origin": "http://tally.test"}, False),
    ],
)
def test_forms_must_come_from_tally_itself(headers: dict[str, str], allowed: bool) -> None:
    tally = _tally("https://credits.example")
    assert admin._same_origin(_request(headers), tally) is allowed


def test_the_journal_names_staff_by_email() -> None:
    emails = {"stf_1": "sam@support.example"}
    assert admin.staff_label("stf_1", emails) == "staff sam@support.example"
    assert admin.staff_label("plt_9", emails) == "plt_9"
    assert admin.staff_label(None, emails) == "Tally"
