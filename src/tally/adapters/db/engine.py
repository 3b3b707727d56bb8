"""Engines for SQLite (WAL, one writer) and PostgreSQL (psycopg 3, row locks) behind one API."""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from sqlalchemy import Connection, Engine, create_engine, event
from sqlalchemy.engine import URL, make_url
from sqlalchemy.pool import ConnectionPoolEntry

from tally.adapters.db import fast

SQLITE_BUSY_TIMEOUT_MS: Final = 10_000
#: SQLite's page cache per connection (its default is 2 MiB). Ledger writes touch pages all over
#: the accounts, lots and journal indexes; a miss costs a read system call inside the write lock.
SQLITE_CACHE_KIB: Final = 65_536
DEFAULT_POOL_SIZE: Final = 10
DEFAULT_POOL_OVERFLOW: Final = 20
POOL_TIMEOUT_SECONDS: Final = 10
POOL_RECYCLE_SECONDS: Final = 1_800
#: Execution option that marks a read-only transaction (plain BEGIN on SQLite).
READ_ONLY: Final = "tally_read_only"


def normalise_url(url: str) -> URL:
    """Operators paste the URL their database gives them; Tally picks the driver."""
    parsed = make_url(url)
    if parsed.drivername in ("postgresql", "postgres"):
        parsed = parsed.set(drivername="postgresql+psycopg")
    if parsed.drivername not in ("sqlite", "postgresql+psycopg"):
        raise ValueError(
            f"unsupported database {parsed.drivername!r}: use sqlite:///path or postgresql://..."
        )
    return parsed


@dataclass
class Database:
    """An engine plus what a unit of work must know about it."""

    engine: Engine
    #: SQLite allows one writer; taking this lock in-process spares threads SQLite's
    #: sleep-and-retry busy handler. Other processes still wait on `busy_timeout`.
    write_lock: threading.Lock | None

    #: SQLite: the connection writes go through, kept between transactions (see `writer`).
    _writer: Connection | None = None

    @property
    def dialect(self) -> str:
        return self.engine.dialect.name

    def writer(self) -> Connection:
        """SQLite: the one connection that writes, for whoever holds `write_lock`. Writers take
        turns anyway, so each spares the pool's check-out, check-in and reset."""
        assert self.write_lock is not None, "SQLite only"
        assert self.write_lock.locked(), "take write_lock first"
        writer = self._writer
        if writer is None or writer.closed or writer.invalidated:
            writer = self._writer = self.engine.connect()
        assert not writer.in_transaction(), "the last writer left its transaction open"
        return writer

    def dispose(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        self.engine.dispose()


def connect(url: str, *, pool_size: int = DEFAULT_POOL_SIZE) -> Database:
    parsed = normalise_url(url)
    if parsed.drivername == "sqlite":
        return Database(_sqlite_engine(parsed, pool_size), threading.Lock())
    engine = create_engine(
        parsed,
        pool_size=pool_size,
        max_overflow=DEFAULT_POOL_OVERFLOW,
        pool_timeout=POOL_TIMEOUT_SECONDS,
        # No pre-ping: it costs a round trip per transaction. A connection the server dropped
        # fails its transaction with 503 (retried by clients) and is replaced.
        pool_recycle=POOL_RECYCLE_SECONDS,
        isolation_level="READ COMMITTED",
    )
    fast.refuse_core_inside_deferred_writes(engine)
    return Database(engine, None)


def _sqlite_engine(url: URL, pool_size: int) -> Engine:
    database = url.database or ""
    if database and database != ":memory:" and not database.startswith("file:"):
        Path(database).parent.mkdir(parents=True, exist_ok=True)
    engine = create_engine(
        url,
        connect_args={"check_same_thread": False},
        pool_size=pool_size,
        max_overflow=DEFAULT_POOL_OVERFLOW,
        pool_timeout=POOL_TIMEOUT_SECONDS,
    )

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: ConnectionPoolEntry) -> None:
        # Let SQLAlchemy's "begin" event decide how each transaction starts.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        # FULL: an acknowledged commit survives power loss too (rule 13).
        cursor.execute("PRAGMA synchronous=FULL")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
        cursor.execute(f"PRAGMA cache_size=-{SQLITE_CACHE_KIB}")  # negative: KiB, not pages
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(connection: Any) -> None:
        # IMMEDIATE takes the write lock up front, so two writers never both read and then
        # fail to upgrade: SQLite's answer to SELECT ... FOR UPDATE.
        options = connection.get_execution_options()
        if options.get("isolation_level") == "AUTOCOMMIT":
            return  # single-statement reads: each statement is its own transaction
        read_only = options.get(READ_ONLY, False)
        connection.connection.driver_connection.execute("BEGIN" if read_only else "BEGIN IMMEDIATE")

    return engine
