"""Alembic environment: runs on the connection Tally hands it (see `tally.adapters.db.migrate`)."""

from __future__ import annotations

from alembic import context

from tally.adapters.db.engine import connect
from tally.adapters.db.schema import metadata

config = context.config
connection = config.attributes.get("connection")


def run(connection_to_use: object) -> None:
    context.configure(
        connection=connection_to_use,  # type: ignore[arg-type]
        target_metadata=metadata,
        render_as_batch=True,  # SQLite alters tables by copying them
        compare_type=True,
    )
    with context.begin_transaction():
        context.run_migrations()


if connection is not None:
    run(connection)
else:
    database = connect(config.get_main_option("sqlalchemy.url") or "")
    with database.engine.connect() as new_connection:
        run(new_connection)
    database.dispose()
