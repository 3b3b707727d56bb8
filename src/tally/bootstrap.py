"""Wire adapters from settings: the one place that knows which database and clock Tally uses."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime

from tally.adapters.db.engine import Database, connect
from tally.adapters.db.uow import SqlUnitOfWork
from tally.config import Settings
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

    def uow(self) -> SqlUnitOfWork:
        """A unit of work whose changes share transactions with concurrent ones."""
        return SqlUnitOfWork(self.database, self.clock, self.group)

    def close(self) -> None:
        self.database.dispose()


def bootstrap(settings: Settings | None = None, *, clock: Clock = system_clock) -> Tally:
    settings = settings or Settings.from_env()
    database = connect(settings.database_url, pool_size=settings.pool_size)
    group = GroupCommit(lambda: SqlUnitOfWork(database, clock))
    return Tally(settings, database, clock, group)
