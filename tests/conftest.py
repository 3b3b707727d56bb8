from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tally import logs
from tally.adapters.db.engine import Database
from tally.adapters.db.uow import SqlUnitOfWork
from tests.support import SKIPPED_SERVICES, FakeClock, database

DATABASES = ["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)]


def pytest_configure(config: pytest.Config) -> None:
    # The production log set-up (JSON lines), not structlog's development renderer, which
    # pretty-prints tracebacks slowly.
    logs.configure()


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> Iterator[None]:
    """One line when a missing service (PostgreSQL, Chromium) made tests skip, after pytest's
    own summary and just above its final count, so a plain `make test` cannot look complete
    when it was not (in CI they fail instead)."""
    try:
        yield
    finally:
        skipped = terminalreporter.stats.get("skipped", [])
        line = skipped_services_line(list(SKIPPED_SERVICES), skipped)
        if line:
            terminalreporter.write_line(line, yellow=True, bold=True)


def skipped_services_line(reasons: list[str], skipped: list[Any]) -> str | None:
    """`SKIPPED n tests for want of a service: <reason> (n tests); ...`, counting the skip
    reports that carry each reason (with one reason, its count is the total)."""
    if not reasons:
        return None
    counts = dict.fromkeys(reasons, 0)
    for report in skipped:
        text = str(report.longrepr[2] if isinstance(report.longrepr, tuple) else report.longrepr)
        for reason in reasons:
            if reason in text:
                counts[reason] += 1
                break
    if len(counts) == 1:
        [parts] = counts
    else:
        parts = "; ".join(f"{reason} ({_tests(n)})" for reason, n in counts.items())
    total = _tests(sum(counts.values()))
    return f"SKIPPED {total} for want of a service: {parts}. With CI=1 they fail instead."


def _tests(n: int) -> str:
    return f"{n} test" if n == 1 else f"{n} tests"


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
