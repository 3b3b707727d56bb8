"""Run hot-path Core statements on the driver's cursor, compiled once per dialect.

SQLAlchemy Core stays the one place where SQL is written; this only skips its per-execution
machinery (cache keys, result proxies, type processors), which costs about four times the
statement itself on SQLite. Values cross here in the forms both drivers take: aware UTC
datetimes (SQLite: the same text SQLAlchemy writes) and JSON as text.
"""

from __future__ import annotations

import json
from collections import namedtuple
from collections.abc import Sequence
from contextlib import AbstractContextManager, nullcontext
from datetime import UTC, datetime
from typing import Any
from weakref import WeakKeyDictionary

from sqlalchemy import Connection, Dialect
from sqlalchemy.sql.compiler import SQLCompiler
from sqlalchemy.sql.expression import ClauseElement

#: The text SQLAlchemy's SQLite DATETIME writes and parses back.
SQLITE_TIME_FORMAT = "%Y-%m-%d %H:%M:%S.%f"


_PLAIN = frozenset({str, int, type(None)})


class Json:
    """Marks a value for a JSON column; other lists pass as arrays (PostgreSQL `= ANY`)."""

    __slots__ = ("value",)

    def __init__(self, value: Any) -> None:
        self.value = value


def json_or_null(value: Any) -> Json | None:
    return None if value is None else Json(value)


def _encode_sqlite(value: Any) -> Any:
    kind = type(value)
    if kind in _PLAIN:
        return value
    if kind is datetime:
        assert value.tzinfo is not None
        # Same text as SQLAlchemy's SQLITE_TIME_FORMAT, without strftime's cost.
        return value.astimezone(UTC).replace(tzinfo=None).isoformat(" ", "microseconds")
    if kind is Json:
        return json.dumps(value.value, separators=(",", ":"))
    return value


def _encode_postgresql(value: Any) -> Any:
    kind = type(value)
    if kind in _PLAIN:
        return value
    if kind is Json:
        return json.dumps(value.value, separators=(",", ":"))  # the statement casts to JSONB
    assert not isinstance(value, datetime) or value.tzinfo is not None
    return value


def decode_time(value: Any) -> Any:
    """A time from either path: SQLite text or a naive/aware datetime, answered in aware UTC."""
    if value is None:
        return None
    if isinstance(value, str):
        value = datetime.fromisoformat(value)
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def decode_json(value: Any) -> Any:
    return json.loads(value) if isinstance(value, str) else value


_WRITE_CURSORS: WeakKeyDictionary[Any, Any] = WeakKeyDictionary()


def _write_cursor(connection: Connection) -> Any:
    """One cursor per driver connection for statements without results: building a psycopg
    cursor costs as much as running a small statement."""
    driver = connection.connection.driver_connection
    if connection.dialect.name == "sqlite":
        return driver  # sqlite3.Connection.execute makes its own cheap cursor
    cursor = _WRITE_CURSORS.get(driver)
    if cursor is None or cursor.closed:
        cursor = _WRITE_CURSORS[driver] = driver.cursor()  # type: ignore[union-attr]
    return cursor


def _pipeline(driver: Any) -> AbstractContextManager[Any]:
    pipeline = getattr(driver, "pipeline", None)  # psycopg has one; sqlite3 runs in-process
    return pipeline() if pipeline is not None else nullcontext()


def _positional(dialect: Dialect) -> Dialect:
    """The same dialect with positional `%s` parameters: psycopg converts and adapts a tuple
    for less than a dict of named ones."""
    if dialect.positional:
        return dialect
    positional: Dialect = type(dialect)(paramstyle="format")  # type: ignore[call-arg]
    return positional


class _Compiled:
    __slots__ = ("defaults", "positions", "row", "sql")

    def __init__(self, statement: ClauseElement, dialect: Dialect) -> None:
        dialect = _positional(dialect)
        compiled = statement.compile(dialect=dialect)
        assert isinstance(compiled, SQLCompiler)
        self.sql = compiled.string
        self.positions = tuple(compiled.positiontup or ()) if dialect.positional else None
        self.defaults = dict(compiled.params)
        self.row: Any = None


class FastStatement:
    """A Core statement to run many times. Not for statements with expanding IN lists."""

    __slots__ = ("_by_dialect", "statement")

    def __init__(self, statement: ClauseElement) -> None:
        self.statement = statement
        self._by_dialect: dict[str, _Compiled] = {}

    def _compiled(self, connection: Connection) -> _Compiled:
        dialect = connection.dialect
        compiled = self._by_dialect.get(dialect.name)
        if compiled is None:
            compiled = self._by_dialect[dialect.name] = _Compiled(self.statement, dialect)
        return compiled

    @staticmethod
    def _arguments(
        compiled: _Compiled, connection: Connection, params: dict[str, Any]
    ) -> Sequence[Any] | dict[str, Any]:
        encode = _encode_sqlite if connection.dialect.name == "sqlite" else _encode_postgresql
        merged = {**compiled.defaults, **params}
        if compiled.positions is not None:
            return tuple(encode(merged[name]) for name in compiled.positions)
        return {name: encode(value) for name, value in merged.items()}

    def execute(self, connection: Connection, params: dict[str, Any]) -> int:
        """Run a statement that returns no rows; answers how many rows it changed."""
        compiled = self._compiled(connection)
        cursor = _write_cursor(connection).execute(
            compiled.sql, self._arguments(compiled, connection, params)
        )
        changed: int = cursor.rowcount
        return changed

    def execute_many(self, connection: Connection, rows: list[dict[str, Any]]) -> None:
        if len(rows) == 1:
            self.execute(connection, rows[0])
            return
        compiled = self._compiled(connection)
        _write_cursor(connection).executemany(
            compiled.sql, [self._arguments(compiled, connection, row) for row in rows]
        )

    def rows(
        self, connection: Connection, params: dict[str, Any], *, after: FastStatement | None = None
    ) -> list[Any]:
        """Run a SELECT; rows are named tuples with the statement's column names.

        With `after`, that statement runs first with the same parameters, in the same round
        trip on PostgreSQL (a pipeline): as its own statement, this one still reads a snapshot
        taken after `after` finished, which is what a lock followed by a read needs.
        """
        compiled = self._compiled(connection)
        driver = connection.connection.driver_connection
        if after is not None:
            first = after._compiled(connection)
            with _pipeline(driver):
                lock = driver.cursor()  # type: ignore[union-attr]
                lock.execute(first.sql, self._arguments(first, connection, params))
                found = self._fetch(compiled, connection, params)
                lock.close()
            return found
        return self._fetch(compiled, connection, params)

    def _fetch(
        self, compiled: _Compiled, connection: Connection, params: dict[str, Any]
    ) -> list[Any]:
        cursor = connection.connection.driver_connection.cursor()  # type: ignore[union-attr]
        try:
            cursor.execute(compiled.sql, self._arguments(compiled, connection, params))
            values = cursor.fetchall()  # first: in a pipeline, this is what waits for results
            if compiled.row is None:
                compiled.row = namedtuple("Row", [c[0] for c in cursor.description])  # type: ignore[misc]
            make = compiled.row._make
            return [make(row) for row in values]
        finally:
            cursor.close()
