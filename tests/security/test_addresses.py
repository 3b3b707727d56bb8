"""One client is one address to the rate limits, however its address is spelled: IPv4 inside
IPv6 is the IPv4 address, an IPv6 /64 is one client, and spellings that parsers disagree on
(leading zeros, zone ids, ports) are refused before any code is tried."""

from __future__ import annotations

import httpx
import pytest

from tally.domain import codes, values
from tally.domain.errors import InvalidClientAddress
from tests.security.conftest import Shop

ALLOWED = 10  # TALLY_REDEEM_FAILURES_PER_HOUR's default

#: Ten spellings of 203.0.113.9.
SPELLINGS = [
    "203.0.113.9",
    "::ffff:203.0.113.9",
    "::FFFF:203.0.113.9",
    "::ffff:cb00:7109",
    "0:0:0:0:0:ffff:cb00:7109",
    "0000:0000:0000:0000:0000:ffff:203.0.113.9",
    "::ffff:CB00:7109",
    "2002:cb00:7109::1",  # 6to4: the IPv4 host's own IPv6 network
    "2002:cb00:7109:ffff::9",
    "2001:0:4136:e378:8000:63bf:34ff:8ef6",  # Teredo, the client's IPv4 inverted
]
#: Spellings some parsers read as another address, or not as one address at all.
REFUSED = [
    "203.0.113.009",
    "203.000.113.9",
    "0203.0.113.9",
    "::ffff:203.0.113.09",
    "fe80::1%eth0",
    "203.0.113.9:443",
    "[::ffff:203.0.113.9]",
    "203.0.113",
    "0xcb.0.113.9",
    "unknown",
]


def _redeem(shop: Shop, account: str, address: str) -> httpx.Response:
    return shop.client.post(
        "/v1/redemptions",
        json={"code": codes.display(codes.new_code()), "account_id": account},
        headers={"Idempotency-Key": codes.new_code(), "X-Client-Address": address},
    )


@pytest.mark.parametrize("spelling", SPELLINGS)
def test_every_spelling_is_the_one_address(spelling: str) -> None:
    assert values.client_address(spelling) == "203.0.113.9"


@pytest.mark.parametrize("spelling", REFUSED)
def test_ambiguous_spellings_are_refused(spelling: str) -> None:
    with pytest.raises(InvalidClientAddress):
        values.client_address(spelling)


def test_ten_spellings_of_one_address_count_as_one(shop: Shop) -> None:
    # A new account each time: only the address's limit can stop these.
    first = [_redeem(shop, f"acct-{n}", s).json()["code"] for n, s in enumerate(SPELLINGS)]
    assert first == ["code_invalid_or_used"] * ALLOWED
    again = [_redeem(shop, f"more-{n}", s) for n, s in enumerate(SPELLINGS)]
    assert [answer.json()["code"] for answer in again] == ["rate_limited"] * ALLOWED
    refused = [_redeem(shop, f"odd-{n}", s) for n, s in enumerate(REFUSED)]
    assert {(answer.status_code, answer.json()["code"]) for answer in refused} == {
        (422, "invalid_client_address")
    }
    assert _redeem(shop, "neighbour", "203.0.113.10").json()["code"] == "code_invalid_or_used"


def test_an_ipv6_slash_64_is_one_client(shop: Shop) -> None:
    hosts = [f"2001:db8:1:2:{n:x}:{n * 7:x}::{n + 1:x}" for n in range(ALLOWED)]
    assert [_redeem(shop, f"acct-{n}", h).status_code for n, h in enumerate(hosts)] == [422] * 10
    assert _redeem(shop, "acct-x", "2001:db8:1:2:ffff:ffff:ffff:ffff").status_code == 429
    assert _redeem(shop, "acct-y", "2001:DB8:0001:0002::").status_code == 429
    # The next /64 is another client.
    assert _redeem(shop, "acct-z", "2001:db8:1:3::1").json()["code"] == "code_invalid_or_used"


def test_a_code_look_up_refuses_a_malformed_address(shop: Shop) -> None:
    answer = shop.client.get(
        f"/v1/codes/{codes.display(codes.new_code())}",
        headers={"X-Client-Address": "fe80::1%eth0"},
    )
    assert answer.status_code == 422
    assert answer.json()["code"] == "invalid_client_address"
