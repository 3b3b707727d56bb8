"""Settings from the environment (SPEC.md §6). Read when asked for, never at import time."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from tally.domain.errors import InvalidInput

DEFAULT_DATABASE_URL: Final = "sqlite:///./var/tally.db"
WORKER_MODES: Final = ("inline", "off")


@dataclass(frozen=True)
class Settings:
    database_url: str = DEFAULT_DATABASE_URL
    pool_size: int = 10
    #: The catalog file; None: ./tally.toml if present, else the built-in default.
    config_path: Path | None = None
    #: `inline`: `tally serve` runs the worker's jobs in-process; `off`: run `tally worker`.
    worker: str = "inline"
    #: `production` turns off development conveniences.
    env: str = "development"

    @classmethod
    def from_env(cls) -> Settings:
        worker = os.environ.get("TALLY_WORKER", "inline")
        if worker not in WORKER_MODES:
            raise InvalidInput(f"TALLY_WORKER is one of {', '.join(WORKER_MODES)}")
        config = os.environ.get("TALLY_CONFIG")
        return cls(
            database_url=os.environ.get("TALLY_DATABASE_URL") or DEFAULT_DATABASE_URL,
            pool_size=int(os.environ.get("TALLY_DB_POOL_SIZE", "10")),
            config_path=Path(config) if config else None,
            worker=worker,
            env=os.environ.get("TALLY_ENV", "development"),
        )
