"""Platforms and API keys: create, list, revoke, and authenticate a request's key."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

from tally.domain import keys
from tally.domain.errors import (
    ApiKeyInvalid,
    ApiKeyNotFound,
    ApiKeyRequired,
    PlatformExists,
    PlatformNotFound,
)
from tally.domain.keys import Principal
from tally.domain.values import new_id
from tally.service.ports import KeyRecordOfPlatform, PlatformRecord, UnitOfWork

KEYS_LIST_MAX: Final = 1_000


@dataclass(frozen=True)
class IssuedKey:
    """A key just made: `plaintext` is shown once and never again."""

    record: KeyRecordOfPlatform
    plaintext: str


def create_platform(name: str, scopes: str | tuple[str, ...], uow: UnitOfWork) -> IssuedKey:
    """A new platform and its first key."""
    name = keys.platform_name(name)
    wanted = keys.scopes(scopes)
    with uow:
        now = uow.clock()
        if uow.platforms.by_name(name) is not None:
            raise PlatformExists(f"a platform named {name!r} exists", name=name)
        platform = PlatformRecord(new_id("plt", now), name, now)
        uow.platforms.add(platform)
        issued = _issue(platform, wanted, uow)
        uow.commit()
    return issued


def create_key(platform_name: str, scopes: str | tuple[str, ...], uow: UnitOfWork) -> IssuedKey:
    wanted = keys.scopes(scopes)
    with uow:
        platform = uow.platforms.by_name(platform_name)
        if platform is None:
            raise PlatformNotFound(f"no platform named {platform_name[:64]!r}")
        issued = _issue(platform, wanted, uow)
        uow.commit()
    return issued


def list_keys(uow: UnitOfWork) -> list[KeyRecordOfPlatform]:
    with uow.read_only():
        return uow.platforms.keys(limit=KEYS_LIST_MAX)


def revoke_key(prefix: str, uow: UnitOfWork) -> KeyRecordOfPlatform:
    """Revoked keys stop working at the next request: every request reads its key."""
    prefix = keys.visible_prefix(prefix)
    with uow:
        if uow.platforms.key(prefix) is None:
            raise ApiKeyNotFound(f"no key has the prefix {prefix}")
        uow.platforms.revoke_key(prefix, uow.clock())
        revoked = uow.platforms.key(prefix)
        uow.commit()
    assert revoked is not None
    assert revoked.revoked_at is not None
    return revoked


def authenticate(authorization: str | None, uow: UnitOfWork) -> Principal:
    """The caller behind an `Authorization: Bearer <key>` header, or a 401."""
    if not authorization:
        raise ApiKeyRequired("send Authorization: Bearer <api key>")
    scheme, _, plaintext = authorization.partition(" ")
    if scheme.lower() != "bearer" or not plaintext.strip():
        raise ApiKeyInvalid("send Authorization: Bearer <api key>")
    plaintext = plaintext.strip()
    prefix = keys.split(plaintext)
    with uow.read_only(snapshot=False):
        found = uow.platforms.key(prefix)
    # One answer for unknown, wrong and revoked keys: a caller learns nothing about which.
    if found is None or found.revoked_at is not None or not keys.matches(plaintext, found.digest):
        raise ApiKeyInvalid
    return Principal(found.platform_id, found.prefix, found.scopes)


def _issue(platform: PlatformRecord, scopes: tuple[str, ...], uow: UnitOfWork) -> IssuedKey:
    made = keys.new_key()
    record = KeyRecordOfPlatform(
        prefix=made.prefix,
        platform_id=platform.platform_id,
        platform_name=platform.name,
        digest=made.digest,
        scopes=scopes,
        created_at=uow.clock(),
        revoked_at=None,
    )
    uow.platforms.add_key(record)
    return IssuedKey(record, made.plaintext)
