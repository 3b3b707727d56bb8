"""Platforms and API keys in SQL. Off the hot path except `key`, one indexed read per request."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import Connection, bindparam, select, update

from tally.adapters.db.fast import FastStatement, decode_time
from tally.adapters.db.schema import api_keys, platforms
from tally.service.ports import KeyRecordOfPlatform, PlatformRecord

_KEY_COLUMNS = (
    api_keys.c.prefix,
    api_keys.c.platform_id,
    platforms.c.name,
    api_keys.c.digest,
    api_keys.c.scopes,
    api_keys.c.created_at,
    api_keys.c.revoked_at,
)
_KEYS = select(*_KEY_COLUMNS).join_from(api_keys, platforms)
_KEY = FastStatement(_KEYS.where(api_keys.c.prefix == bindparam("prefix")))


_IN_FORCE = FastStatement(
    select(api_keys.c.prefix).where(
        api_keys.c.prefix == bindparam("prefix"), api_keys.c.revoked_at.is_(None)
    )
)


def _key(row: Any) -> KeyRecordOfPlatform:
    return KeyRecordOfPlatform(
        prefix=row.prefix,
        platform_id=row.platform_id,
        platform_name=row.name,
        digest=row.digest,
        scopes=tuple(row.scopes.split(",")),
        created_at=decode_time(row.created_at),
        revoked_at=decode_time(row.revoked_at),
    )


class SqlPlatforms:
    def __init__(self, connection: Connection) -> None:
        self.connection = connection

    def add(self, platform: PlatformRecord) -> None:
        self.connection.execute(
            platforms.insert().values(
                platform_id=platform.platform_id,
                name=platform.name,
                created_at=platform.created_at,
            )
        )

    def by_name(self, name: str) -> PlatformRecord | None:
        row = self.connection.execute(select(platforms).where(platforms.c.name == name)).first()
        return None if row is None else PlatformRecord(row.platform_id, row.name, row.created_at)

    def add_key(self, key: KeyRecordOfPlatform) -> None:
        self.connection.execute(
            api_keys.insert().values(
                prefix=key.prefix,
                platform_id=key.platform_id,
                digest=key.digest,
                scopes=",".join(key.scopes),
                created_at=key.created_at,
                revoked_at=key.revoked_at,
            )
        )

    def key(self, prefix: str) -> KeyRecordOfPlatform | None:
        found = _KEY.rows(self.connection, {"prefix": prefix})
        return _key(found[0]) if found else None

    def keys(self, *, limit: int) -> list[KeyRecordOfPlatform]:
        rows = self.connection.execute(
            _KEYS.order_by(platforms.c.name, api_keys.c.created_at).limit(limit)
        )
        return [_key(row) for row in rows]

    def in_force(self, prefix: str) -> bool:
        return bool(_IN_FORCE.rows(self.connection, {"prefix": prefix}))

    def revoke_key(self, prefix: str, now: datetime) -> None:
        self.connection.execute(
            update(api_keys)
            .where(api_keys.c.prefix == prefix, api_keys.c.revoked_at.is_(None))
            .values(revoked_at=now)
        )
