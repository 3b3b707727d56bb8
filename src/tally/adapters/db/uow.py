"""The SQL unit of work: one transaction, its repositories, and the clock it runs under."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager, suppress
from types import TracebackType
from typing import Self

from sqlalchemy import Connection, RootTransaction
from sqlalchemy.exc import DBAPIError, IntegrityError, OperationalError

from tally.adapters.db import fast
from tally.adapters.db.audit import SqlAudit
from tally.adapters.db.commerce import SqlCommerce
from tally.adapters.db.engine import READ_ONLY, Database
from tally.adapters.db.platforms import SqlPlatforms
from tally.adapters.db.repository import SqlAccounts, SqlIdempotencyStore, SqlJournal
from tally.adapters.db.staff import SqlStaff
from tally.domain.errors import DatabaseUnavailable
from tally.service.group_commit import GroupCommit
from tally.service.ports import Clock, IdempotencyRace

IDEMPOTENCY_KEY_CONSTRAINT = "pk_idempotency_keys"


class SqlUnitOfWork:
    """`with uow:` opens a write transaction; leaving without `commit()` rolls it back."""

    accounts: SqlAccounts
    journal: SqlJournal
    idempotency: SqlIdempotencyStore
    audit: SqlAudit
    platforms: SqlPlatforms
    commerce: SqlCommerce
    staff: SqlStaff
    replayed: bool
    credential: str | None

    def __init__(self, database: Database, clock: Clock, group: GroupCommit | None = None) -> None:
        self.database = database
        self.clock = clock
        self.group = group
        self._read_only = False
        self._snapshot = True
        self.replayed = False
        self.credential: str | None = None
        self._connection: Connection | None = None
        self._transaction: RootTransaction | None = None
        self._locked = False

    def __enter__(self) -> Self:
        assert self._connection is None, "a unit of work is not re-entrant"
        lock = self.database.write_lock
        if lock is not None and not self._read_only:
            lock.acquire()
            self._locked = True
        try:
            connection = self.database.writer() if self._locked else self.database.engine.connect()
            if self._read_only:
                # A snapshot: the several reads of a balance or an audit see one instant.
                options: dict[str, object] = {READ_ONLY: True}
                if not self._snapshot:
                    # One read needs no transaction: on PostgreSQL this saves the BEGIN and
                    # ROLLBACK round trips (every API request reads its key this way).
                    options["isolation_level"] = "AUTOCOMMIT"
                elif self.database.dialect == "postgresql":
                    options["isolation_level"] = "REPEATABLE READ"
                connection = connection.execution_options(**options)
            self._connection = connection
            self._transaction = connection.begin()
        except (OperationalError, DBAPIError) as error:
            self._close()
            raise DatabaseUnavailable(str(error.orig or error)[:200]) from error
        self.accounts = SqlAccounts(connection)
        self.journal = SqlJournal(connection)
        self.idempotency = SqlIdempotencyStore(connection)
        self.audit = SqlAudit(connection)
        self.platforms = SqlPlatforms(connection)
        self.commerce = SqlCommerce(connection)
        self.staff = SqlStaff(connection)
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            if self._transaction is not None and self._transaction.is_active:
                self._transaction.rollback()
        finally:
            self._close()
        if isinstance(exc, OperationalError):
            raise DatabaseUnavailable(str(exc.orig or exc)[:200]) from exc
        driver_operational = self.database.engine.dialect.loaded_dbapi.OperationalError
        if isinstance(exc, driver_operational) and not isinstance(exc, DBAPIError):
            raise DatabaseUnavailable(str(exc)[:200]) from exc

    def commit(self) -> None:
        assert self._transaction is not None, "commit outside `with uow:`"
        assert self._connection is not None
        fast.flush_writes(self._connection)  # those of a `batch()`
        self._transaction.commit()

    @contextmanager
    def batch(self) -> Iterator[None]:
        """Send the writes inside in as few round trips as can be: on PostgreSQL they wait, and
        go as one statement at the `commit()` made inside (`fast.deferred_writes`). Their
        errors surface there; a lost idempotency race is told apart from every other error.
        Inside, write only through the repositories' fast statements, each row once (on
        PostgreSQL a Core statement there fails an assertion)."""
        assert self._connection is not None, "batch outside `with uow:`"
        if self.database.dialect != "postgresql":
            yield
            return
        import psycopg

        driver = self._connection.connection.driver_connection
        assert isinstance(driver, psycopg.Connection)
        try:
            with fast.deferred_writes(self._connection):
                yield
        except BaseException as error:
            # A failed COMMIT leaves the session aborted where SQLAlchemy no longer rolls back.
            # A broken connection cannot roll back; the original error is the one to report.
            with suppress(psycopg.Error):
                driver.rollback()
            self._raise_race_if_idempotency(error)
            raise

    @staticmethod
    def _raise_race_if_idempotency(error: BaseException) -> None:
        import psycopg

        if isinstance(error, psycopg.errors.UniqueViolation | IntegrityError):
            cause = error.orig if isinstance(error, IntegrityError) else error
            if (
                isinstance(cause, psycopg.errors.UniqueViolation)
                and cause.diag.constraint_name == IDEMPOTENCY_KEY_CONSTRAINT
            ):
                raise IdempotencyRace(str(cause.diag.message_detail)) from error

    @contextmanager
    def read_only(self, *, snapshot: bool = True) -> Iterator[Self]:
        self._read_only, self._snapshot = True, snapshot
        try:
            with self as uow:
                yield uow
        finally:
            self._read_only, self._snapshot = False, True

    def _close(self) -> None:
        connection = self._connection
        # The writer connection stays open (Database.writer), unless a failed rollback left
        # it inside a transaction: then the next writer gets a new one.
        if connection is not None and (not self._locked or connection.in_transaction()):
            connection.close()
        self._connection = None
        self._transaction = None
        if self._locked:
            assert self.database.write_lock is not None
            self.database.write_lock.release()
            self._locked = False
