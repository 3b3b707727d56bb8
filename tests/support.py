"""Helpers shared by the test suites: a controllable clock and PostgreSQL schemas per test."""

from __future__ import annotations

import os
import secrets
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

from tally.adapters.catalog_file import builtin
from tally.adapters.db.engine import Database, connect
from tally.adapters.db.schema import metadata
from tally.domain import codes
from tally.service.commerce import Links
from tally.service.ports import Email, MailTemporary

POSTGRES_URL = os.environ.get(
    "TALLY_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test"
)
START = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)


class FakeClock:
    """A clock that moves only when told to; thread-safe so concurrent tests can share it."""

    def __init__(self, now: datetime = START) -> None:
        self._now = now
        self._lock = threading.Lock()

    def __call__(self) -> datetime:
        with self._lock:
            return self._now

    def advance(self, **delta: float) -> datetime:
        with self._lock:
            self._now += timedelta(**delta)
            return self._now

    def set(self, now: datetime) -> None:
        with self._lock:
            self._now = now


def postgres_available() -> bool:
    try:
        engine = create_engine(make_url(POSTGRES_URL).set(drivername="postgresql+psycopg"))
        with engine.connect() as connection:
            connection.execute(text("SELECT 1"))
        engine.dispose()
    except Exception:
        return False
    return True


def require_postgres() -> None:
    """Skip on a developer machine without PostgreSQL; fail in CI, where it is required."""
    if postgres_available():
        return
    message = f"PostgreSQL is not reachable at {POSTGRES_URL}"
    if os.environ.get("CI") == "true":
        pytest.fail(message + " and CI=true requires it", pytrace=False)
    pytest.skip(message)


@contextmanager
def postgres_schema() -> Iterator[str]:
    """A fresh schema for one test; yields a URL whose search_path points into it."""
    require_postgres()
    name = f"t_{secrets.token_hex(6)}"
    admin = create_engine(make_url(POSTGRES_URL).set(drivername="postgresql+psycopg"))
    with admin.begin() as connection:
        connection.execute(text(f"CREATE SCHEMA {name}"))
    url = make_url(POSTGRES_URL).update_query_dict({"options": f"-csearch_path={name}"})
    try:
        yield url.render_as_string(hide_password=False)
    finally:
        with admin.begin() as connection:
            connection.execute(text(f"DROP SCHEMA {name} CASCADE"))
        admin.dispose()


@contextmanager
def _url(kind: str, tmp_dir: str) -> Iterator[str]:
    if kind == "sqlite":
        yield f"sqlite:///{tmp_dir}/tally-{secrets.token_hex(4)}.db"
    else:
        with postgres_schema() as url:
            yield url


@contextmanager
def database(
    kind: str, tmp_dir: str, *, create: bool = True, pool_size: int = 10
) -> Iterator[Database]:
    with _url(kind, tmp_dir) as url:
        db = connect(url, pool_size=pool_size)
        if create:
            metadata.create_all(db.engine)
        try:
            yield db
        finally:
            db.dispose()


def free_port() -> int:
    """A TCP port nobody listens on right now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


# --- commerce: one pepper, one set of links and the default catalog for every test ---------------

PEPPER = codes.pepper("test secret")
LINKS = Links(
    redeem_url="http://tally.test/redeem",
    lost_code_url="http://tally.test/lost-code",
    mail_from="Tally <credits@tally.test>",
    mail_domain="tally.test",
)
CATALOG = builtin()


class Outbox:
    """A mailer that keeps what it was given, and can be told to fail."""

    def __init__(self) -> None:
        self.sent: list[Email] = []
        self.down = False

    def send(self, email: Email, now: datetime) -> None:
        if self.down:
            raise MailTemporary("connection refused")
        self.sent.append(email)
