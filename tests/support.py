"""Helpers shared by the test suites: a controllable clock and PostgreSQL schemas per test."""

from __future__ import annotations

import os
import secrets
import socket
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from functools import cache
from typing import Any, Final

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

from tally.adapters.catalog_file import builtin
from tally.adapters.db.engine import Database, connect
from tally.adapters.db.schema import metadata
from tally.domain import codes
from tally.service.group_commit import GroupCommit
from tally.service.issuing import Links
from tally.service.ports import Email, MailTemporary

POSTGRES_URL = os.environ.get(
    "TALLY_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test"
)
START = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)


def recent_sale_time() -> datetime:
    """Yesterday at 10:00 UTC, for a real server that reads the wall clock: a sale that is
    recent whenever the tests run, never on 29 February (two years on is one date)."""
    moment = datetime.now(UTC).replace(hour=10, minute=0, second=0, microsecond=0)
    moment -= timedelta(days=1)
    if (moment.month, moment.day) == (2, 29):
        moment -= timedelta(days=1)
    return moment


def stamp(moment: datetime) -> str:
    """`2026-11-21T10:00:00Z`, as processors and the API write a time."""
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


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


#: The values of `CI` (any case) that mean "not CI". Every other value counts as CI: the true
#: ones (1, true, yes, on), and a CI system that writes its own name there, which must not turn
#: a missing service into a skip either.
CI_FALSE: Final = frozenset({"", "0", "false", "no", "off"})

#: Why a required service was skipped in this run, in the order first seen: the end-of-run
#: summary (tests/conftest.py) names them in one line.
SKIPPED_SERVICES: dict[str, None] = {}


class ServiceMisconfigured(Exception):
    """A service answered but refused us (wrong database, refused login): never a skip."""


def is_ci(environ: Mapping[str, str] = os.environ) -> bool:
    """Whether `CI` asks for every service: any value but unset, empty, 0, false, no or off."""
    return environ.get("CI", "").strip().lower() not in CI_FALSE


def require_service(missing: str | None, *, environ: Mapping[str, str] = os.environ) -> None:
    """Nothing when the service is there (`missing` is None); otherwise fail in CI, and skip on a
    developer machine with the reason kept for the end-of-run line."""
    if missing is None:
        return
    if is_ci(environ):
        pytest.fail(f"{missing}, and CI={environ.get('CI')!r} requires it", pytrace=False)
    SKIPPED_SERVICES[missing] = None
    pytest.skip(missing)


def _refused(host: str | None, port: int, timeout: float) -> bool:
    """Whether nothing listens where the URL points: the connection is refused (TCP), or the
    Unix socket is absent or refused. Other network errors are raised."""
    if host is None or host.startswith("/"):
        path = f"{host or '/var/run/postgresql'}/.s.PGSQL.{port}"
        with socket.socket(socket.AF_UNIX) as unix:
            unix.settimeout(timeout)
            try:
                unix.connect(path)
            except (FileNotFoundError, ConnectionRefusedError):
                return True
        return False
    try:
        socket.create_connection((host, port), timeout=timeout).close()
    except ConnectionRefusedError:
        return True
    return False


def postgres_missing(url: str, *, timeout: float = 5.0) -> str | None:
    """None when PostgreSQL at `url` runs and lets us in; the reason when nothing listens there
    (a refused connection is the one sign of "not running"). Any other failure (a database that
    does not exist, a refused login, an unreachable host) raises ServiceMisconfigured."""
    parsed = make_url(url).set(drivername="postgresql+psycopg")
    shown = make_url(url).render_as_string()  # the password hidden
    try:
        if _refused(parsed.host, parsed.port or 5432, timeout):
            return f"PostgreSQL is not running at {shown} (connection refused)"
    except OSError as error:
        raise ServiceMisconfigured(f"PostgreSQL at {shown} cannot be reached: {error}") from error
    engine = create_engine(parsed, connect_args={"connect_timeout": int(timeout)})
    try:
        with engine.connect() as connection:
            connection.execute(text("SELECT 1"))
    except Exception as error:
        raise ServiceMisconfigured(
            f"PostgreSQL at {shown} answers but refuses the tests: {error}"
        ) from error
    finally:
        engine.dispose()
    return None


@cache
def _postgres_probe() -> tuple[str | None, str | None]:
    """Once per run: (why PostgreSQL is missing, why it refuses the tests)."""
    try:
        return postgres_missing(POSTGRES_URL), None
    except ServiceMisconfigured as error:
        return None, str(error)


def require_postgres() -> None:
    """Skip on a developer machine where PostgreSQL is not running; fail in CI, where it is
    required, and everywhere when it runs but refuses the tests (fix TALLY_TEST_POSTGRES_URL)."""
    missing, refusal = _postgres_probe()
    if refusal is not None:
        pytest.fail(refusal, pytrace=False)
    require_service(missing)


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


# --- the group commit: calls forced into one batch -------------------------------------------


def one_batch(group: GroupCommit, calls: list[Callable[[], Any]]) -> list[Any]:
    """Queue every call behind a pretend leader, in order, then let the first lead them all."""
    with group._lock:
        group._leaders = group._max_leaders  # every lead taken: callers queue
    results: list[Any] = [None] * len(calls)

    def call(index: int) -> None:
        try:
            results[index] = calls[index]()
        except Exception as error:
            results[index] = error

    threads = []
    for index in range(len(calls)):
        thread = threading.Thread(target=call, args=(index,))
        thread.start()
        threads.append(thread)
        deadline = time.monotonic() + 10
        while len(group._queue) < index + 1:
            assert time.monotonic() < deadline, "a caller never queued"
            time.sleep(0.001)
    batches = group.batches
    with group._lock:
        group._queue[0].decide("lead")  # the pretend leader hands its lead on
    for thread in threads:
        thread.join(timeout=60)
        assert not thread.is_alive()
    assert group.batches == batches + 1, "the calls must have run as one batch"
    return results
