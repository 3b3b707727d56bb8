"""Alembic builds exactly the schema the code declares, on both databases, and back down."""

from __future__ import annotations

from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import inspect, text

from tally.adapters.db.migrate import current, downgrade, upgrade
from tally.adapters.db.schema import metadata
from tests.conftest import DATABASES
from tests.support import database


# SQLite cannot reflect the expression index on lower(email), so autogenerate skips it.
@pytest.mark.filterwarnings(
    "ignore:Skipped unsupported reflection of expression-based index:sqlalchemy.exc.SAWarning"
)
@pytest.mark.filterwarnings("ignore:autogenerate skipping metadata-specified expression-based")
@pytest.mark.parametrize("kind", DATABASES)
def test_migrations_match_the_declared_schema(kind: str, tmp_path: Path) -> None:
    with database(kind, str(tmp_path), create=False) as db:
        upgrade(db)
        assert current(db) == "0007"
        upgrade(db)  # running it again changes nothing
        with db.engine.connect() as connection:
            diff = compare_metadata(MigrationContext.configure(connection), metadata)
            assert diff == []
            tables = set(inspect(connection).get_table_names())
        assert {"accounts", "lots", "holds", "hold_allocations", "entries"} <= tables
        # The journal triggers come with the migration, not only with create_all.
        with pytest.raises(Exception, match="immutable"), db.engine.begin() as connection:
            connection.execute(
                text(
                    "INSERT INTO accounts (account_id, debt, entry_seq, created_at) "
                    "VALUES ('a', 0, 1, CURRENT_TIMESTAMP)"
                )
            )
            connection.execute(
                text(
                    "INSERT INTO lots (lot_id, account_id, source, amount, remaining, is_open, "
                    "priority, created_at) "
                    "VALUES ('lot_a', 'a', 'gift', 1, 1, true, 0, CURRENT_TIMESTAMP)"
                )
            )
            connection.execute(
                text(
                    "INSERT INTO entries (entry_id, account_id, seq, type, amount, lot_id, "
                    "created_at) VALUES ('ent_a', 'a', 1, 'grant', 1, 'lot_a', CURRENT_TIMESTAMP)"
                )
            )
            connection.execute(text("DELETE FROM entries"))
        downgrade(db, "base")
        with db.engine.connect() as connection:
            assert "entries" not in inspect(connection).get_table_names()
