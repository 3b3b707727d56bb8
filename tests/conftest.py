from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tally import logs
from tally.adapters.db.engine import Database
from tally.adapters.db.uow import SqlUnitOfWork
from tests.support import FakeClock, database

DATABASES = ["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)]


def pytest_configure(config: pytest.Config) -> None:
    # The production log set-up (JSON lines), not structlog's development renderer, which
    # pretty-prints tracebacks slowly.
    logs.configure()


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture(params=DATABASES)
def db(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Database]:
    """Every integration test runs on SQLite and on PostgreSQL, each in a fresh schema."""
    with database(request.param, str(tmp_path)) as db:
        yield db


@pytest.fixture
def uow(db: Database, clock: FakeClock) -> SqlUnitOfWork:
    return SqlUnitOfWork(db, clock)
