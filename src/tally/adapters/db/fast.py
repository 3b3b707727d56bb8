"""Run hot-path Core statements on the driver's cursor, compiled once per dialect.

SQLAlchemy Core stays the one place where SQL is written; this only skips its per-execution
machinery (cache keys, result proxies, type processors), which costs about four times the
statement itself on SQLite. Values cross here in the forms both drivers take: aware UTC
datetimes (SQLite: the same text SQLAlchemy writes) and JSON as text.
"""

from __future__ import annotations

import json
from collections import namedtuple
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from datetime import UTC, datetime
from typing import Any, Final
from weakref import WeakKeyDictionary

from sqlalchemy import Connection, Dialect, Engine, Table, bindparam, event, update
from sqlalchemy.sql.compiler import SQLCompiler
from sqlalchemy.sql.dml import Insert
from sqlalchemy.sql.expression import ClauseElement

#: The text SQLAlchemy's SQLite DATETIME writes and parses back.
SQLITE_TIME_FORMAT = "%Y-%m-%d %H:%M:%S.%f"
#: PostgreSQL: most rows per multi-row UPDATE. Bounds the parameters per statement (far below
#: the protocol's 65,535) and the distinct statement texts each connection prepares.
UPDATE_ROWS_MAX = 64
#: PostgreSQL: most rows per multi-row INSERT, which bounds the JSON one statement sends.
INSERT_ROWS_MAX = 1_000
#: psycopg keeps its parse of a query text only up to these sizes (`psycopg._queries`) and
#: parses a larger one again on every call: deferred writes are joined up to them.
CACHED_QUERY_PARAMS_MAX: Final = 50
CACHED_QUERY_LENGTH_MAX: Final = 4_096


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


def update_by_key(table: Table, key: str, columns: tuple[str, ...]) -> FastStatement:
    """`UPDATE table SET columns... WHERE key = ...`, parameters named `b_<column>`; on
    PostgreSQL many rows run as one `UPDATE ... FROM (VALUES ...)`."""
    statement = (
        update(table)
        .where(table.c[key] == bindparam(f"b_{key}"))
        .values({column: bindparam(f"b_{column}") for column in columns})
    )
    return FastStatement(statement, keyed=(table, key))


def _jsonable(value: Any) -> Any:
    """A value as `json_populate_recordset` reads it into the column's own type."""
    kind = type(value)
    if kind in _PLAIN or kind is bool:
        return value  # ints stay exact: the server parses bigint from the JSON text
    if kind is datetime:
        assert value.tzinfo is not None
        return value.isoformat()
    if kind is Json:
        return value.value  # a JSON column takes the nested value as it is
    raise TypeError(f"no JSON form for a {kind.__name__} column value")


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
#: Per driver connection inside `deferred_writes`: the writes not yet sent, with arguments.
_DEFERRED: WeakKeyDictionary[Any, list[tuple[str, Sequence[Any]]]] = WeakKeyDictionary()


@contextmanager
def deferred_writes(connection: Connection) -> Iterator[None]:
    """PostgreSQL: inside, the writes of fast statements wait for `flush_writes`, which
    sends them joined into one statement of data-modifying WITH clauses: one round trip for
    every kind of row a batch writes, without the bookkeeping a psycopg pipeline spends per
    statement (measured: a fifth of a group-commit leader's Python). Writes answer no row
    counts here, and each row may be written once: the parts of one statement run on one
    snapshot and do not see each other's rows (the foreign keys are checked after all)."""
    driver = connection.connection.driver_connection
    assert driver not in _DEFERRED, "deferred writes do not nest"
    _DEFERRED[driver] = []
    try:
        yield
        assert not _DEFERRED[driver], "deferred writes are sent by a commit inside the block"
    finally:
        del _DEFERRED[driver]


def refuse_core_inside_deferred_writes(engine: Engine) -> None:
    """PostgreSQL: inside `deferred_writes` only fast statements may run. A Core statement
    there would reach the server before the writes queued ahead of it, and a read would not
    see them; this makes such a mistake fail at once instead of reordering writes. The check
    costs Core executions a global's truth, and fast statements nothing."""

    @event.listens_for(engine, "before_execute")
    def _refuse(connection: Connection, *_: Any) -> None:
        assert not (_DEFERRED and connection.connection.driver_connection in _DEFERRED), (
            "a Core statement inside deferred writes (uow.batch()): use fast statements"
        )


def flush_writes(connection: Connection) -> None:
    """Send the deferred writes, in order; each run of them that psycopg can cache as one
    query text goes as one statement."""
    if not _DEFERRED:
        return  # the common case, checked for the cost of a global's truth
    queued = _DEFERRED.get(connection.connection.driver_connection)
    if not queued:
        return
    cursor = _write_cursor(connection)
    run: list[tuple[str, Sequence[Any]]] = []
    params = length = 0
    for sql, arguments in queued:
        if run and (
            params + len(arguments) > CACHED_QUERY_PARAMS_MAX
            or length + len(sql) > CACHED_QUERY_LENGTH_MAX
        ):
            _execute_joined(cursor, run)
            run, params, length = [], 0, 0
        run.append((sql, arguments))
        params += len(arguments)
        length += len(sql) + len(" , w00 AS () ")  # the text that joins it
    _execute_joined(cursor, run)
    queued.clear()


def _execute_joined(cursor: Any, run: list[tuple[str, Sequence[Any]]]) -> None:
    """`WITH w0 AS (first), w1 AS (second) last`: the writes of a run as one statement."""
    *parts, (last, _) = run
    clauses = ", ".join(f"w{n} AS ({sql})" for n, (sql, _) in enumerate(parts))
    text = f"WITH {clauses} {last}" if parts else last
    cursor.execute(text, [argument for _, arguments in run for argument in arguments])


def _send(connection: Connection, sql: str, arguments: Sequence[Any] | dict[str, Any]) -> Any:
    """Run a write now, or keep it for `flush_writes`: then there is no cursor to answer."""
    if _DEFERRED:
        queued = _DEFERRED.get(connection.connection.driver_connection)
        if queued is not None:
            assert not isinstance(arguments, dict), "joined statements take positional arguments"
            queued.append((sql, arguments))
            return None
    return _write_cursor(connection).execute(sql, arguments)


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
    __slots__ = ("defaults", "insert_json", "many", "positions", "row", "sql")

    def __init__(self, statement: ClauseElement, dialect: Dialect) -> None:
        dialect = _positional(dialect)
        compiled = statement.compile(dialect=dialect)
        assert isinstance(compiled, SQLCompiler)
        self.sql = compiled.string
        self.positions = tuple(compiled.positiontup or ()) if dialect.positional else None
        self.defaults = dict(compiled.params)
        self.row: Any = None
        self.many: dict[int, str] = {}  # UPDATE ... FROM (VALUES ...) texts by row count
        self.insert_json: str | None = None  # all rows as JSON; "" when there is no such form


class FastStatement:
    """A Core statement to run many times. Not for statements with expanding IN lists.

    On PostgreSQL, `execute_many` sends many rows of an INSERT, or of an UPDATE made by
    `update_by_key`, as one statement: the server runs one statement and the driver parses
    one result, instead of one per row.
    """

    __slots__ = ("_by_dialect", "_keyed", "statement")

    def __init__(self, statement: ClauseElement, *, keyed: tuple[Table, str] | None = None) -> None:
        self.statement = statement
        self._keyed = keyed
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

    def execute(self, connection: Connection, params: dict[str, Any]) -> int | None:
        """Run a statement that returns no rows; answers how many rows it changed, or None
        when the write is deferred (`deferred_writes`)."""
        compiled = self._compiled(connection)
        cursor = _send(connection, compiled.sql, self._arguments(compiled, connection, params))
        if cursor is None:
            return None
        changed: int = cursor.rowcount
        return changed

    def execute_many(self, connection: Connection, rows: list[dict[str, Any]]) -> None:
        if len(rows) == 1:
            self.execute(connection, rows[0])
            return
        compiled = self._compiled(connection)
        if connection.dialect.name == "postgresql":
            if self._keyed is not None:
                self._update_many(compiled, connection, rows)
                return
            sql = self._insert_json(compiled)
            if sql is not None:
                assert compiled.positions is not None
                for start in range(0, len(rows), INSERT_ROWS_MAX):
                    chunk = []
                    for row in rows[start : start + INSERT_ROWS_MAX]:
                        merged = {**compiled.defaults, **row}
                        chunk.append({name: _jsonable(merged[name]) for name in compiled.positions})
                    _send(connection, sql, (json.dumps(chunk, separators=(",", ":")),))
                return
            if connection.connection.driver_connection in _DEFERRED:
                for row in rows:
                    _send(connection, compiled.sql, self._arguments(compiled, connection, row))
                return
        _write_cursor(connection).executemany(
            compiled.sql, [self._arguments(compiled, connection, row) for row in rows]
        )

    def _update_many(
        self, compiled: _Compiled, connection: Connection, rows: list[dict[str, Any]]
    ) -> None:
        """`UPDATE ... FROM (VALUES (...), (...))`: a VALUES list, unlike a function of JSON,
        tells the planner how many rows come, so it probes the key's index, not the table."""
        assert self._keyed is not None
        table, key = self._keyed
        # UPDATE ... FROM would apply only one row of a pair with the same key.
        assert len({row[f"b_{key}"] for row in rows}) == len(rows), "one update per row"
        for start in range(0, len(rows), UPDATE_ROWS_MAX):
            chunk = rows[start : start + UPDATE_ROWS_MAX]
            sql = compiled.many.get(len(chunk))
            if sql is None:
                # The single-row text already casts each parameter (`%s::BIGINT`); its casts
                # type the VALUES list, and its parameter order (SET columns, then the key) is
                # kept. Names come from the schema's own compiled statement, never from input.
                head, _, where = compiled.sql.rpartition(" WHERE ")
                assigned = [part.split("=", 1) for part in head.split(" SET ", 1)[1].split(", ")]
                columns = [name.strip() for name, _ in assigned]
                casts = [cast.strip() for _, cast in assigned] + [where.split("=", 1)[1].strip()]
                values = ", ".join([f"({', '.join(casts)})"] * len(chunk))
                assign = ", ".join(f"{c} = v.{c}" for c in columns)
                names = ", ".join([*columns, key])
                sql = compiled.many[len(chunk)] = (
                    f"UPDATE {table.name} SET {assign} FROM (VALUES {values}) "  # noqa: S608
                    f"AS v({names}) WHERE {table.name}.{key} = v.{key}"
                )
            arguments: list[Any] = []
            for row in chunk:
                arguments += self._arguments(compiled, connection, row)
            _send(connection, sql, arguments)

    def _insert_json(self, compiled: _Compiled) -> str | None:
        """The INSERT that takes every row at once as one JSON array of objects, read into
        rows of the table's own type by `json_populate_recordset`; None when it has no such
        form. One short text with one parameter for any number of rows: psycopg converts it
        once (a VALUES list of over 50 parameters it would parse again on every call), the
        server prepares it once, and the rows cost one `json.dumps`."""
        if compiled.insert_json is not None:
            return compiled.insert_json or None
        head, _, row = compiled.sql.partition(" VALUES ")
        if not isinstance(self.statement, Insert) or not (
            row.startswith("(") and row.endswith(")") and ")" not in row[:-1]
        ):
            compiled.insert_json = ""  # ON CONFLICT, RETURNING: one statement per row
            return None
        assert compiled.positions is not None
        table = self.statement.table.name
        # Names come from the schema, never from input.
        compiled.insert_json = (
            f"{head} SELECT {', '.join(compiled.positions)} "  # noqa: S608
            f"FROM json_populate_recordset(NULL::{table}, %s::json)"
        )
        return compiled.insert_json

    def rows(
        self, connection: Connection, params: dict[str, Any], *, after: FastStatement | None = None
    ) -> list[Any]:
        """Run a SELECT; rows are named tuples with the statement's column names.

        With `after`, that statement runs first with the same parameters, in the same round
        trip on PostgreSQL (a pipeline): as its own statement, this one still reads a snapshot
        taken after `after` finished, which is what a lock followed by a read needs.
        """
        flush_writes(connection)  # a read sees the writes made before it
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
