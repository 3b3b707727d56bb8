"""Wire adapters from settings: the one place that knows which database and clock Tally uses."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime

from tally.adapters import catalog_file
from tally.adapters.db.engine import Database, connect
from tally.adapters.db.uow import SqlUnitOfWork
from tally.config import Settings
from tally.domain.catalog import Catalog
from tally.service.group_commit import GroupCommit
from tally.service.ports import Clock


def system_clock() -> datetime:
    return datetime.now(UTC)


@dataclass
class Tally:
    settings: Settings
    database: Database
    clock: Clock
    group: GroupCommit
    catalog: Catalog

    def uow(self) -> SqlUnitOfWork:
        """A unit of work whose changes share transactions with concurrent ones."""
        return SqlUnitOfWork(self.database, self.clock, self.group)

    def close(self) -> None:
        self.database.dispose()


def group_commit(database: Database, clock: Clock) -> GroupCommit:
    """SQLite has one writer, so one batch at a time; on PostgreSQL two batches in flight
    overlap one's Python with the other's round trips (measured by bench/ledger.py)."""
    leaders = 2 if database.dialect == "postgresql" else 1
    return GroupCommit(lambda: SqlUnitOfWork(database, clock), max_leaders=leaders)


def bootstrap(settings: Settings | None = None, *, clock: Clock = system_clock) -> Tally:
    settings = settings or Settings.from_env()
    database = connect(settings.database_url, pool_size=settings.pool_size)
    group = group_commit(database, clock)
    return Tally(settings, database, clock, group, catalog_file.load(settings.config_path))
