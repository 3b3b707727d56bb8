"""API keys and scopes (docs/rules.md §3). Pure rules: the key's shape, its hash, what a scope
allows.

A key reads `tly_<prefix>_<secret>`: the prefix (10 random symbols) is the visible, indexed
half that `tally keys list` shows and `tally keys revoke` takes; the secret (32 symbols, 160
bits) never leaves the one output that creates it. Tally stores the SHA-256 of the whole key:
with 160 random bits, a fast hash is as safe as a slow one and costs microseconds per request.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass
from typing import Final

from tally.domain.errors import ApiKeyInvalid, InvalidInput, ScopeMissing

KEY_PREFIX: Final = "tly_"
SCOPES: Final = ("read", "spend", "grant", "support", "admin")
DEFAULT_SCOPES: Final = ("read", "spend")
_ALPHABET: Final = "0123456789abcdefghjkmnpqrstvwxyz"  # Crockford base32, lower case
_PREFIX_LENGTH: Final = 10
_SECRET_LENGTH: Final = 32  # 5 bits each: 160 bits
_KEY: Final = re.compile(
    rf"{KEY_PREFIX}([{_ALPHABET}]{{{_PREFIX_LENGTH}}})_([{_ALPHABET}]{{{_SECRET_LENGTH}}})"
)
_VISIBLE: Final = re.compile(rf"{KEY_PREFIX}[{_ALPHABET}]{{{_PREFIX_LENGTH}}}")
PLATFORM_NAME: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


def _random(length: int) -> str:
    return "".join(secrets.choice(_ALPHABET) for _ in range(length))


@dataclass(frozen=True)
class NewKey:
    """A freshly made key: `plaintext` is shown once; `prefix` and `digest` are stored."""

    plaintext: str
    prefix: str
    digest: str


def new_key() -> NewKey:
    prefix = KEY_PREFIX + _random(_PREFIX_LENGTH)
    plaintext = f"{prefix}_{_random(_SECRET_LENGTH)}"
    return NewKey(plaintext, prefix, digest(plaintext))


def digest(plaintext: str) -> str:
    return hashlib.sha256(plaintext.encode()).hexdigest()


def split(plaintext: str) -> str:
    """The visible prefix of a well-formed key; any other string is simply invalid."""
    found = _KEY.fullmatch(plaintext)
    if found is None:
        raise ApiKeyInvalid
    return f"{KEY_PREFIX}{found.group(1)}"


def matches(plaintext: str, stored_digest: str) -> bool:
    return hmac.compare_digest(digest(plaintext), stored_digest)


def visible_prefix(value: str) -> str:
    if not _VISIBLE.fullmatch(value):
        raise InvalidInput(f"a key prefix looks like {KEY_PREFIX}{'x' * _PREFIX_LENGTH}")
    return value


def scopes(text: str | tuple[str, ...] | list[str]) -> tuple[str, ...]:
    """Parse `read,spend`: known scopes only, in the canonical order, at least one."""
    given = [s.strip() for s in text.split(",")] if isinstance(text, str) else list(text)
    unknown = sorted(set(given) - set(SCOPES))
    if unknown or not given:
        raise InvalidInput(f"scopes are some of {', '.join(SCOPES)}; got {', '.join(unknown)}")
    return tuple(s for s in SCOPES if s in given)


def platform_name(value: str) -> str:
    if not PLATFORM_NAME.fullmatch(value):
        raise InvalidInput("a platform name is 1-64 characters of A-Za-z0-9._- ")
    return value


@dataclass(frozen=True)
class Principal:
    """Who is calling: a platform, through one of its keys."""

    platform_id: str
    key_prefix: str
    scopes: tuple[str, ...]

    def require(self, scope: str) -> None:
        """`admin` may do everything; every other scope allows only itself."""
        assert scope in SCOPES
        if scope not in self.scopes and "admin" not in self.scopes:
            raise ScopeMissing(f"this key lacks the {scope!r} scope", scope=scope)
