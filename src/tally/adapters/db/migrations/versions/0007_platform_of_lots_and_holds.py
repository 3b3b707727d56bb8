"""The platform that granted each lot and placed each hold: platforms are isolated, so only a
hold's own platform may capture or release it, and only a lot's own platform sees its metadata.

Existing rows take the platform of the entry that made them (a lot's `grant`, a hold's `hold`
entries); rows Tally made itself keep null.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-07 06:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None

#: (table, key column, the entry type that made the row). One grouped read of the journal per
#: table, joined by key: no per-row subquery scanning entries (which has no lot_id index).
_BACKFILLS = (("lots", "lot_id", "grant"), ("holds", "hold_id", "hold"))


def upgrade() -> None:
    # A plain nullable column: both databases add it in place (SQLite without copying the
    # table, which the foreign keys into lots and holds would refuse).
    for table, key, entry_type in _BACKFILLS:
        op.add_column(table, sa.Column("platform_id", sa.String(length=64), nullable=True))
        # UPDATE ... FROM: PostgreSQL, and SQLite since 3.33. Names are constants above.
        op.execute(
            f"UPDATE {table} SET platform_id = made.platform_id "  # noqa: S608
            f"FROM (SELECT {key}, MIN(platform_id) AS platform_id FROM entries "
            f"WHERE type = '{entry_type}' AND {key} IS NOT NULL AND platform_id IS NOT NULL "
            f"GROUP BY {key}) AS made "
            f"WHERE {table}.{key} = made.{key}"
        )


def downgrade() -> None:
    # SQLite (3.35+) drops a column without constraints or indexes in place too.
    for table, _, _ in reversed(_BACKFILLS):
        op.drop_column(table, "platform_id")
