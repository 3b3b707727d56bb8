"""API keys: shape, hashing, scopes. Pure rules, no I/O."""

from __future__ import annotations

import pytest

from tally.domain import keys
from tally.domain.errors import ApiKeyInvalid, InvalidInput, ScopeMissing


def test_a_new_key_has_a_visible_prefix_and_160_secret_bits() -> None:
    made = keys.new_key()
    assert made.plaintext.startswith(made.prefix + "_")
    assert made.prefix.startswith("tly_")
    secret = made.plaintext.removeprefix(made.prefix + "_")
    assert len(secret) * 5 >= 160
    assert keys.split(made.plaintext) == made.prefix
    assert keys.matches(made.plaintext, made.digest)
    assert made.plaintext not in made.digest
    assert keys.new_key().plaintext != made.plaintext


@pytest.mark.parametrize(
    "given",
    [
        "",
        "tly_",
        "sk_live_abc",
        "tly_0123456789",  # the prefix alone
        "tly_0123456789_" + "0" * 31,  # one symbol short
        "tly_0123456789_" + "u" * 32,  # u is not Crockford base32
        "TLY_0123456789_" + "0" * 32,
        "tly_0123456789_" + "0" * 32 + "\n",
    ],
)
def test_malformed_keys_are_invalid(given: str) -> None:
    with pytest.raises(ApiKeyInvalid):
        keys.split(given)


def test_a_key_does_not_match_another_digest() -> None:
    one, other = keys.new_key(), keys.new_key()
    assert not keys.matches(one.plaintext, other.digest)


def test_scopes_are_parsed_in_canonical_order_and_unknown_ones_refused() -> None:
    assert keys.scopes("spend, read") == ("read", "spend")
    assert keys.scopes(("admin",)) == ("admin",)
    for bad in ("", "read,write", "READ"):
        with pytest.raises(InvalidInput):
            keys.scopes(bad)


def test_a_principal_needs_the_scope_unless_it_is_admin() -> None:
    reader = keys.Principal("plt_x", "tly_x", ("read",))
    reader.require("read")
    with pytest.raises(ScopeMissing) as refused:
        reader.require("spend")
    assert refused.value.status == 403
    admin = keys.Principal("plt_x", "tly_x", ("admin",))
    for scope in keys.SCOPES:
        admin.require(scope)


def test_platform_names_and_prefixes_are_checked() -> None:
    assert keys.platform_name("portraits.example") == "portraits.example"
    for bad in ("", "-x", "a b", "x" * 65):
        with pytest.raises(InvalidInput):
            keys.platform_name(bad)
    with pytest.raises(InvalidInput):
        keys.visible_prefix("tly_short")
