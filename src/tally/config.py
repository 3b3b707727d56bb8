"""Settings from the environment (SPEC.md §6). Read when asked for, never at import time."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Final

DEFAULT_DATABASE_URL: Final = "sqlite:///./var/tally.db"


@dataclass(frozen=True)
class Settings:
    database_url: str = DEFAULT_DATABASE_URL
    pool_size: int = 10

    @classmethod
    def from_env(cls) -> Settings:
        return cls(
            database_url=os.environ.get("TALLY_DATABASE_URL") or DEFAULT_DATABASE_URL,
            pool_size=int(os.environ.get("TALLY_DB_POOL_SIZE", "10")),
        )
